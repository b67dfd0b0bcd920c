//! Helpers shared by the reference filters under `filters/` (a library, not a filter: it
//! builds no `.wasm` of its own).
//!
//! - [`config`]: parse a filter's JSON `config` into typed structs; errors name the field
//!   (`limits[1].burst: ...`).
//! - [`duration`]: `"250ms"`, `"5s"`, `"2m"`, `"1h"`, as in the manifest.
//! - [`matcher`]: header matches (`exact` / `prefix` / `present`) and client-address CIDRs.
//! - [`template`]: header values and attributes built from request data (`%REQ(x-user)%`).
//! - [`hash`]: a stable hash for sticky decisions and bounded state keys.
//!
//! Everything that reads the request goes through [`RequestData`], so the logic is unit
//! tested on the host without a proxy.

// Unit tests unwrap freely: a panic there is a failed test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod config;
pub mod duration;
pub mod hash;
pub mod matcher;
pub mod template;

/// What the helpers read from a request. Implemented for the SDK's [`wasmesh_sdk::Request`];
/// tests implement it on plain structs.
pub trait RequestData {
    /// First value of header `name` (lower-case).
    fn header(&self, name: &str) -> Option<String>;
    /// Host-generated request id.
    fn request_id(&self) -> String;
    /// HTTP method.
    fn method(&self) -> String;
    /// Path without the query.
    fn path(&self) -> String;
    /// `:authority` / Host.
    fn authority(&self) -> Option<String>;
    /// Client address, `IP:PORT`.
    fn source_address(&self) -> String;
    /// Matched route's name.
    fn route(&self) -> String;
    /// Verified peer identity (mTLS), if any.
    fn peer_identity(&self) -> Option<String>;
}

impl RequestData for wasmesh_sdk::Request {
    fn header(&self, name: &str) -> Option<String> {
        wasmesh_sdk::Request::header(self, name)
    }
    fn request_id(&self) -> String {
        self.id()
    }
    fn method(&self) -> String {
        wasmesh_sdk::Request::method(self)
    }
    fn path(&self) -> String {
        wasmesh_sdk::Request::path(self)
    }
    fn authority(&self) -> Option<String> {
        wasmesh_sdk::Request::authority(self)
    }
    fn source_address(&self) -> String {
        wasmesh_sdk::Request::source_address(self)
    }
    fn route(&self) -> String {
        self.route_name()
    }
    fn peer_identity(&self) -> Option<String> {
        wasmesh_sdk::Request::peer_identity(self)
    }
}

/// The IP part of an `IP:PORT` / `[IPv6]:PORT` address (the whole string when it has no port).
///
/// ```
/// assert_eq!(filter_common::client_ip("10.1.2.3:5555"), "10.1.2.3");
/// assert_eq!(filter_common::client_ip("[::1]:80"), "::1");
/// ```
pub fn client_ip(addr: &str) -> String {
    match addr.parse::<std::net::SocketAddr>() {
        // The text before the port of a valid IPv4 `IP:PORT` already is the address's
        // canonical form (the parser takes no leading zeros or other spellings): slice it
        // rather than format the address again (this runs on every request).
        Ok(std::net::SocketAddr::V4(_)) => {
            addr.rsplit_once(':').map_or(addr, |(ip, _)| ip).to_string()
        }
        Ok(a) => a.ip().to_string(),
        Err(_) => addr.to_string(),
    }
}

/// Append `n` in decimal to `out`. Same text as `n.to_string()`, without the formatting
/// machinery, which costs a filter several times more on its per-request path.
///
/// ```
/// let mut s = String::from("n=");
/// filter_common::push_u64(&mut s, 1200);
/// assert_eq!(s, "n=1200");
/// ```
pub fn push_u64(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut len = 0;
    for slot in buf.iter_mut().rev() {
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
        len += 1;
        if n == 0 {
            break;
        }
    }
    for &d in buf.get(buf.len() - len..).unwrap_or_default() {
        out.push(char::from(d));
    }
}

/// `n` in decimal (see [`push_u64`]).
///
/// ```
/// assert_eq!(filter_common::decimal(u64::MAX), u64::MAX.to_string());
/// ```
pub fn decimal(n: u64) -> String {
    let mut s = String::with_capacity(20);
    push_u64(&mut s, n);
    s
}

/// Whether `name` is a valid lower-case HTTP header name (RFC 9110 token), not a pseudo-header.
pub fn valid_header_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b"!#$%&'*+-.^_`|~".contains(&b)
        })
}

#[cfg(test)]
mod tests {
    #[test]
    fn decimal_is_to_string() {
        for n in [
            0,
            1,
            9,
            10,
            99,
            100,
            12_345,
            u64::from(u32::MAX),
            u64::MAX - 1,
            u64::MAX,
        ] {
            assert_eq!(super::decimal(n), n.to_string());
        }
    }

    #[test]
    fn client_ip_is_the_canonical_address() {
        for (addr, ip) in [
            ("10.1.2.3:5555", "10.1.2.3"),
            ("0.0.0.0:0", "0.0.0.0"),
            ("255.255.255.255:65535", "255.255.255.255"),
            ("[::1]:80", "::1"),
            ("[0:0:0:0:0:0:0:1]:80", "::1"),
            ("[::ffff:10.0.0.1]:80", "::ffff:10.0.0.1"),
            ("010.1.2.3:80", "010.1.2.3:80"),
            ("10.1.2.3", "10.1.2.3"),
            ("garbage", "garbage"),
        ] {
            let slow = match addr.parse::<std::net::SocketAddr>() {
                Ok(a) => a.ip().to_string(),
                Err(_) => addr.to_string(),
            };
            assert_eq!(super::client_ip(addr), ip, "{addr}");
            assert_eq!(super::client_ip(addr), slow, "{addr}");
        }
    }
}

#[cfg(test)]
pub(crate) mod testing {
    use super::RequestData;
    use std::collections::HashMap;

    /// A request made of plain fields, for unit tests.
    #[derive(Default)]
    pub struct FakeRequest {
        pub headers: HashMap<String, String>,
        pub source: String,
        pub peer: Option<String>,
    }

    impl FakeRequest {
        pub fn with_header(mut self, k: &str, v: &str) -> Self {
            self.headers.insert(k.to_string(), v.to_string());
            self
        }
    }

    impl RequestData for FakeRequest {
        fn header(&self, name: &str) -> Option<String> {
            self.headers.get(name).cloned()
        }
        fn request_id(&self) -> String {
            "rid-1".into()
        }
        fn method(&self) -> String {
            "GET".into()
        }
        fn path(&self) -> String {
            "/p".into()
        }
        fn authority(&self) -> Option<String> {
            Some("shop.local".into())
        }
        fn source_address(&self) -> String {
            self.source.clone()
        }
        fn route(&self) -> String {
            "api".into()
        }
        fn peer_identity(&self) -> Option<String> {
            self.peer.clone()
        }
    }
}
