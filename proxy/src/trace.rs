//! Trace context carried by a request: W3C `traceparent` (and B3 headers as a fallback).
//!
//! The parsing only: `crate::telemetry::otel` turns the caller's context into the parent of
//! the proxy's SERVER span (tracing on), or hands it to filters and the upstream unchanged
//! (tracing off).

use http::{HeaderMap, HeaderName};

// Static names: a lookup by `&str` parses and validates the name on every request.
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
static B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
static B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");

/// Ids as lowercase hex: 32 digits for the trace, 16 for the parent span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: String,
    pub parent_id: String,
    pub sampled: bool,
}

impl TraceContext {
    pub fn from_headers(h: &HeaderMap) -> Option<Self> {
        if let Some(tp) = h.get(&TRACEPARENT).and_then(|v| v.to_str().ok()) {
            return Self::parse_traceparent(tp);
        }
        // B3 multi-header (Zipkin): x-b3-traceid may be 16 or 32 hex digits.
        let trace = h.get(&B3_TRACE_ID).and_then(|v| v.to_str().ok())?;
        let span = h.get(&B3_SPAN_ID).and_then(|v| v.to_str().ok())?;
        let trace = if trace.len() == 16 {
            format!("{:0>32}", trace)
        } else {
            trace.to_string()
        };
        if !is_hex_id(&trace, 32) || !is_hex_id(span, 16) {
            return None;
        }
        let sampled = h
            .get(&B3_SAMPLED)
            .map(|v| v.as_bytes() == b"1")
            .unwrap_or(true);
        Some(Self {
            trace_id: trace.to_ascii_lowercase(),
            parent_id: span.to_ascii_lowercase(),
            sampled,
        })
    }

    /// `version-traceid-parentid-flags` (W3C Trace Context §3.2); invalid input is ignored,
    /// as the spec requires (a new trace starts instead).
    pub fn parse_traceparent(v: &str) -> Option<Self> {
        let mut it = v.trim().split('-');
        let (version, trace, parent, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
        if version.len() != 2 || version == "ff" || !version.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        // Version 00 has exactly four fields; later versions may append more.
        if version == "00" && it.next().is_some() {
            return None;
        }
        if !is_hex_id(trace, 32) || !is_hex_id(parent, 16) || flags.len() != 2 {
            return None;
        }
        let flags = u8::from_str_radix(flags, 16).ok()?;
        Some(Self {
            trace_id: trace.to_string(),
            parent_id: parent.to_string(),
            sampled: flags & 1 == 1,
        })
    }
}

/// Lowercase hex of `len` digits, not all zero (an all-zero id is invalid).
fn is_hex_id(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && s.bytes().any(|b| b != b'0')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent() {
        let t = TraceContext::parse_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )
        .expect("valid");
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id, "00f067aa0ba902b7");
        assert!(t.sampled);
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "garbage",
        ] {
            assert!(TraceContext::parse_traceparent(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn b3_fallback() {
        let mut h = HeaderMap::new();
        h.insert("x-b3-traceid", "a3ce929d0e0e4736".parse().expect("value"));
        h.insert("x-b3-spanid", "00f067aa0ba902b7".parse().expect("value"));
        h.insert("x-b3-sampled", "0".parse().expect("value"));
        let t = TraceContext::from_headers(&h).expect("b3");
        assert_eq!(t.trace_id, "0000000000000000a3ce929d0e0e4736");
        assert!(!t.sampled);
    }
}
