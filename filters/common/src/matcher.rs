//! Request matchers shared by the filters: [`HeaderMatch`] (`exact`, `prefix` or `present`
//! on one header) and [`Cidr`] (client address ranges such as `10.0.0.0/8` or `::1`).

use crate::RequestData;
use serde::Deserialize;
use std::net::IpAddr;

/// One header condition, as written in a filter's config:
/// `{"name": "x-canary", "exact": "1"}`, `{"name": "x-user", "prefix": "test-"}`,
/// `{"name": "x-debug", "present": true}`. With none of the three, the header must be present.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    /// Header name (matched case-insensitively).
    pub name: String,
    /// The first value equals this.
    #[serde(default)]
    pub exact: Option<String>,
    /// The first value starts with this.
    #[serde(default)]
    pub prefix: Option<String>,
    /// `true`: present (any value); `false`: absent.
    #[serde(default)]
    pub present: Option<bool>,
}

impl HeaderMatch {
    /// Check the matcher's own consistency; `field` is its path for the error message.
    pub fn validate(&mut self, field: &str) -> Result<(), String> {
        self.name = self.name.to_ascii_lowercase();
        if !crate::valid_header_name(&self.name) {
            return Err(crate::config::field_error(
                &format!("{field}.name"),
                format!("{:?} is not a valid header name", self.name),
            ));
        }
        let set = [
            self.exact.is_some(),
            self.prefix.is_some(),
            self.present.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set > 1 {
            return Err(crate::config::field_error(
                field,
                "give at most one of `exact`, `prefix`, `present`",
            ));
        }
        Ok(())
    }

    /// Whether the request matches.
    pub fn matches(&self, req: &impl RequestData) -> bool {
        let value = req.header(&self.name);
        match (&value, &self.exact, &self.prefix, self.present) {
            (Some(v), Some(e), _, _) => v == e,
            (Some(v), _, Some(p), _) => v.starts_with(p.as_str()),
            (_, _, _, Some(want)) => value.is_some() == want,
            (None, _, _, _) => false,
            (Some(_), None, None, None) => true,
        }
    }
}

/// Validate a list of header matchers at `field` (`field[i]` in errors).
pub fn validate_all(list: &mut [HeaderMatch], field: &str) -> Result<(), String> {
    for (i, m) in list.iter_mut().enumerate() {
        m.validate(&format!("{field}[{i}]"))?;
    }
    Ok(())
}

/// An address range: `10.0.0.0/8`, `2001:db8::/32`, or one address (`127.0.0.1`, `::1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Parse the text form.
    ///
    /// ```
    /// let c = filter_common::matcher::Cidr::parse("10.0.0.0/8").unwrap();
    /// assert!(c.contains("10.1.2.3".parse().unwrap()));
    /// ```
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (ip, bits) = match text.split_once('/') {
            Some((ip, bits)) => (ip, Some(bits)),
            None => (text, None),
        };
        let addr: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("{text:?} is not an IP address or CIDR range"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{text:?}: the prefix length must be 0..={max}"))?,
        };
        Ok(Cidr { addr, bits })
    }

    /// Whether `ip` is in the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => prefix_eq(&net.octets(), &a.octets(), self.bits),
            (IpAddr::V6(net), IpAddr::V6(a)) => prefix_eq(&net.octets(), &a.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let full = usize::from(bits / 8);
    let rest = bits % 8;
    if a.get(..full) != b.get(..full) {
        return false;
    }
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    match (a.get(full), b.get(full)) {
        (Some(x), Some(y)) => x & mask == y & mask,
        _ => false,
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Cidr::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Whether the client address (`IP:PORT`) is in any of `ranges`.
pub fn source_in(ranges: &[Cidr], source_address: &str) -> bool {
    match crate::client_ip(source_address).parse::<IpAddr>() {
        Ok(ip) => ranges.iter().any(|c| c.contains(ip)),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::FakeRequest;

    fn m(json: &str) -> HeaderMatch {
        let mut m: HeaderMatch = serde_json::from_str(json).unwrap();
        m.validate("match").unwrap();
        m
    }

    #[test]
    fn header_matches() {
        let req = FakeRequest::default().with_header("x-canary", "yes-please");
        assert!(m(r#"{"name": "X-Canary", "exact": "yes-please"}"#).matches(&req));
        assert!(!m(r#"{"name": "x-canary", "exact": "yes"}"#).matches(&req));
        assert!(m(r#"{"name": "x-canary", "prefix": "yes"}"#).matches(&req));
        assert!(m(r#"{"name": "x-canary"}"#).matches(&req));
        assert!(!m(r#"{"name": "x-other"}"#).matches(&req));
        assert!(m(r#"{"name": "x-other", "present": false}"#).matches(&req));
        assert!(!m(r#"{"name": "x-canary", "present": false}"#).matches(&req));
        let mut bad: HeaderMatch =
            serde_json::from_str(r#"{"name": "x", "exact": "1", "prefix": "2"}"#).unwrap();
        assert!(bad.validate("match[0]").unwrap_err().contains("match[0]"));
        let mut bad: HeaderMatch = serde_json::from_str(r#"{"name": "bad name"}"#).unwrap();
        assert!(bad
            .validate("match[0]")
            .unwrap_err()
            .starts_with("config.match[0].name"));
    }

    #[test]
    fn cidrs() {
        let c = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(c.contains("10.255.0.1".parse().unwrap()));
        assert!(!c.contains("11.0.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.0.0.1".parse().unwrap()));
        let one = Cidr::parse("::1").unwrap();
        assert!(one.contains("::1".parse().unwrap()));
        assert!(!one.contains("::2".parse().unwrap()));
        let odd = Cidr::parse("192.168.4.0/22").unwrap();
        assert!(odd.contains("192.168.7.255".parse().unwrap()));
        assert!(!odd.contains("192.168.8.0".parse().unwrap()));
        assert!(Cidr::parse("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("nope").is_err());
        assert!(source_in(&[c], "10.1.1.1:4000"));
        assert!(!source_in(&[c], "garbage"));
    }
}
