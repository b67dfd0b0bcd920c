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

    /// The request id lent to `f`. The default lends a copy from
    /// [`RequestData::request_id`]; the SDK's request lends the value the host passed
    /// with the hook, without a copy.
    fn with_request_id(&self, f: &mut dyn FnMut(&str)) {
        f(&self.request_id())
    }
    /// The method lent to `f` (see [`RequestData::with_request_id`]).
    fn with_method(&self, f: &mut dyn FnMut(&str)) {
        f(&self.method())
    }
    /// The path lent to `f` (see [`RequestData::with_request_id`]).
    fn with_path(&self, f: &mut dyn FnMut(&str)) {
        f(&self.path())
    }
    /// The client address lent to `f` (see [`RequestData::with_request_id`]).
    fn with_source_address(&self, f: &mut dyn FnMut(&str)) {
        f(&self.source_address())
    }
}

// Named through the type (`wasmesh_sdk::Request::header(self, ..)`): `self.header(..)`
// would name this trait's method again.
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
    fn with_request_id(&self, f: &mut dyn FnMut(&str)) {
        wasmesh_sdk::Request::with_id(self, f)
    }
    fn with_method(&self, f: &mut dyn FnMut(&str)) {
        wasmesh_sdk::Request::with_method(self, f)
    }
    fn with_path(&self, f: &mut dyn FnMut(&str)) {
        wasmesh_sdk::Request::with_path(self, f)
    }
    fn with_source_address(&self, f: &mut dyn FnMut(&str)) {
        wasmesh_sdk::Request::with_source_address(self, f)
    }
}

/// The IP part of an `IP:PORT` / `[IPv6]:PORT` address (the whole string when it has no port).
///
/// ```
/// assert_eq!(filter_common::client_ip("10.1.2.3:5555"), "10.1.2.3");
/// assert_eq!(filter_common::client_ip("[::1]:80"), "::1");
/// ```
pub fn client_ip(addr: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    if let Some(ip) = plain_ipv4_ip(addr) {
        return Cow::Borrowed(ip);
    }
    match addr.parse::<std::net::SocketAddr>() {
        // The text before the port of a valid IPv4 `IP:PORT` already is the address's
        // canonical form (the parser takes no leading zeros or other spellings): borrow
        // it rather than format the address again (this runs on every request).
        Ok(std::net::SocketAddr::V4(_)) => {
            Cow::Borrowed(addr.rsplit_once(':').map_or(addr, |(ip, _)| ip))
        }
        Ok(a) => Cow::Owned(a.ip().to_string()),
        Err(_) => Cow::Borrowed(addr),
    }
}

/// Read the decimal field of `b` at `*i` (its digits, up to the first other byte) and move
/// past it; true when it has 1 to `max_digits` digits, no leading zero and is at most `max`.
fn read_decimal(b: &[u8], i: &mut usize, max_digits: usize, max: u32) -> bool {
    let start = *i;
    let mut n: u32 = 0;
    while let Some(d) = b.get(*i).map(|c| c.wrapping_sub(b'0')).filter(|d| *d <= 9) {
        if *i - start == max_digits {
            return false;
        }
        n = n * 10 + u32::from(d);
        *i += 1;
    }
    let digits = *i - start;
    digits >= 1 && (digits == 1 || b.get(start) != Some(&b'0')) && n <= max
}

/// The IP of `a.b.c.d:port` written the canonical way (what the host's client addresses
/// look like): one pass of byte checks instead of the full address parser. Accepts only
/// addresses the parser accepts too, so [`client_ip`] answers the same either way.
fn plain_ipv4_ip(addr: &str) -> Option<&str> {
    // One pass over the bytes, each looked at once: this runs on every request, and
    // searching, splitting and then parsing the pieces costs a filter several times more.
    let b = addr.as_bytes();
    let mut i = 0;
    for sep in [b'.', b'.', b'.', b':'] {
        if !read_decimal(b, &mut i, 3, 255) || b.get(i) != Some(&sep) {
            return None;
        }
        i += 1;
    }
    let colon = i - 1;
    if !read_decimal(b, &mut i, 5, 65535) || i != b.len() {
        return None;
    }
    addr.get(..colon)
}

/// `n` in decimal, written at the end of `buf`: the text, without allocating (a filter's
/// per-request path formats several numbers; `to_string` costs several times more).
///
/// ```
/// let mut buf = [0u8; 20];
/// assert_eq!(filter_common::fmt_u64(1200, &mut buf), "1200");
/// ```
pub fn fmt_u64(mut n: u64, buf: &mut [u8; 20]) -> &str {
    // Two digits per division, from a table: in a filter each byte stored costs a bounds
    // check, each division a multiplication or more.
    const PAIRS: &[u8; 200] = b"\
        0001020304050607080910111213141516171819\
        2021222324252627282930313233343536373839\
        4041424344454647484950515253545556575859\
        6061626364656667686970717273747576777879\
        8081828384858687888990919293949596979899";
    let mut i = buf.len();
    while n >= 10 {
        let pair = (n % 100) as usize * 2;
        n /= 100;
        i -= 2;
        if let (Some(d), Some(s)) = (buf.get_mut(i..i + 2), PAIRS.get(pair..pair + 2)) {
            d.copy_from_slice(s);
        }
    }
    // The last digit, when there is one left (always, for 0).
    if n > 0 || i == buf.len() {
        i -= 1;
        if let Some(d) = buf.get_mut(i) {
            *d = b'0' + n as u8;
        }
    }
    // Only ASCII digits were written.
    std::str::from_utf8(buf.get(i..).unwrap_or_default()).unwrap_or_default()
}

/// Append `n` in decimal to `out` (see [`fmt_u64`]).
///
/// ```
/// let mut s = String::from("n=");
/// filter_common::push_u64(&mut s, 1200);
/// assert_eq!(s, "n=1200");
/// ```
pub fn push_u64(out: &mut String, n: u64) {
    out.push_str(fmt_u64(n, &mut [0; 20]));
}

/// `n` in decimal (see [`fmt_u64`]).
///
/// ```
/// assert_eq!(filter_common::decimal(u64::MAX), u64::MAX.to_string());
/// ```
pub fn decimal(n: u64) -> String {
    let mut s = String::new();
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
            assert_eq!(super::fmt_u64(n, &mut [0; 20]), n.to_string());
            let mut s = String::from("x");
            super::push_u64(&mut s, n);
            assert_eq!(s, format!("x{n}"));
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
            ("1.2.3.4:080", "1.2.3.4"),
            ("1.2.3.4:65536", "1.2.3.4:65536"),
            ("256.1.1.1:80", "256.1.1.1:80"),
            ("1.2.3:80", "1.2.3:80"),
            ("1.2.3.4.5:80", "1.2.3.4.5:80"),
            ("1.2.3.4:", "1.2.3.4:"),
            ("1..3.4:80", "1..3.4:80"),
            ("+1.2.3.4:80", "+1.2.3.4:80"),
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
