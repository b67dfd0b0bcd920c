//! A compact-serialized JWS (RFC 7515) holding JWT claims (RFC 7519): split, decode,
//! check the signature against a key set, then the time and identity claims.

use crate::config::{Alg, Settings};
use crate::jwk::{KeySet, B64};
use base64::Engine;
use serde_json::{Map, Value};

/// Tokens longer than this are refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 8192;

/// Why a token was refused; the text goes to `error_description`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    Malformed(&'static str),
    Algorithm,
    NoKey,
    Signature,
    Expired,
    NotYetValid,
    NoExpiration,
    Issuer,
    Audience,
}

impl Invalid {
    /// For `error_description` (no quotes or backslashes: it is put in a quoted string).
    pub fn description(&self) -> String {
        match self {
            Invalid::Malformed(why) => format!("malformed token: {why}"),
            Invalid::Algorithm => "algorithm not allowed".into(),
            Invalid::NoKey => "no key matches the token".into(),
            Invalid::Signature => "signature verification failed".into(),
            Invalid::Expired => "token expired".into(),
            Invalid::NotYetValid => "token not yet valid".into(),
            Invalid::NoExpiration => "token has no expiration".into(),
            Invalid::Issuer => "issuer not allowed".into(),
            Invalid::Audience => "audience not allowed".into(),
        }
    }

    /// Short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Invalid::Malformed(_) => "malformed",
            Invalid::Algorithm => "algorithm",
            Invalid::NoKey => "no_key",
            Invalid::Signature => "signature",
            Invalid::Expired => "expired",
            Invalid::NotYetValid => "not_yet_valid",
            Invalid::NoExpiration => "no_expiration",
            Invalid::Issuer => "issuer",
            Invalid::Audience => "audience",
        }
    }
}

/// A decoded, not yet verified token.
pub struct Parsed<'t> {
    pub alg: Alg,
    pub kid: Option<String>,
    signing_input: &'t str,
    signature: Vec<u8>,
    pub claims: Map<String, Value>,
}

/// Split and decode; checks the header (`alg` allowed, no `crit`).
pub fn parse<'t>(token: &'t str, allowed: &[Alg]) -> Result<Parsed<'t>, Invalid> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(Invalid::Malformed("too long"));
    }
    let (signing_input, sig_b64) = token
        .rsplit_once('.')
        .ok_or(Invalid::Malformed("not three parts"))?;
    let (header_b64, payload_b64) = signing_input
        .split_once('.')
        .ok_or(Invalid::Malformed("not three parts"))?;
    if payload_b64.contains('.') {
        return Err(Invalid::Malformed("not three parts"));
    }
    let header: Value = B64
        .decode(header_b64)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Invalid::Malformed("bad header"))?;
    if header.get("crit").is_some() {
        return Err(Invalid::Malformed("unsupported crit header"));
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(Alg::parse)
        .filter(|a| allowed.contains(a))
        .ok_or(Invalid::Algorithm)?;
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .map(str::to_string);
    let claims = match B64
        .decode(payload_b64)
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    {
        Some(Value::Object(m)) => m,
        _ => return Err(Invalid::Malformed("bad payload")),
    };
    let signature = B64
        .decode(sig_b64)
        .map_err(|_| Invalid::Malformed("bad signature encoding"))?;
    Ok(Parsed {
        alg,
        kid,
        signing_input,
        signature,
        claims,
    })
}

impl Parsed<'_> {
    /// Check the signature with the key set: by `kid` if the token names one.
    pub fn verify_signature(&self, keys: &KeySet) -> Result<(), Invalid> {
        let mut any = false;
        for key in keys.candidates(self.alg, self.kid.as_deref()) {
            any = true;
            if key.verify(self.signing_input.as_bytes(), &self.signature) {
                return Ok(());
            }
        }
        Err(if any {
            Invalid::Signature
        } else {
            Invalid::NoKey
        })
    }
}

/// A numeric date claim (seconds; fractions allowed by RFC 7519, truncated).
fn numeric(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, Invalid> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_i64()
            .or_else(|| v.as_f64().map(|f| f as i64))
            .map(Some)
            .ok_or(Invalid::Malformed("a time claim is not a number")),
    }
}

/// The time window a token is valid in, skew not applied.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub exp: Option<i64>,
    pub nbf: Option<i64>,
}

impl Window {
    /// Check `now` (unix seconds) against the window, with `skew` seconds of tolerance.
    pub fn check(&self, now: i64, skew: i64) -> Result<(), Invalid> {
        if let Some(exp) = self.exp {
            if now >= exp.saturating_add(skew) {
                return Err(Invalid::Expired);
            }
        }
        if let Some(nbf) = self.nbf {
            if now.saturating_add(skew) < nbf {
                return Err(Invalid::NotYetValid);
            }
        }
        Ok(())
    }
}

/// Check `exp`, `nbf`, `iss` and `aud` against the settings at `now` (unix seconds).
pub fn check_claims(
    claims: &Map<String, Value>,
    s: &Settings,
    now: i64,
) -> Result<Window, Invalid> {
    let window = Window {
        exp: numeric(claims, "exp")?,
        nbf: numeric(claims, "nbf")?,
    };
    if window.exp.is_none() && s.require_expiration {
        return Err(Invalid::NoExpiration);
    }
    window.check(now, s.skew_secs)?;
    if !s.issuers.is_empty() {
        let iss = claims.get("iss").and_then(Value::as_str);
        if !iss.is_some_and(|i| s.issuers.iter().any(|x| x == i)) {
            return Err(Invalid::Issuer);
        }
    }
    if !s.audiences.is_empty() {
        let ok = match claims.get("aud") {
            Some(Value::String(a)) => s.audiences.contains(a),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(Value::as_str)
                .any(|a| s.audiences.iter().any(|x| x == a)),
            _ => false,
        };
        if !ok {
            return Err(Invalid::Audience);
        }
    }
    Ok(window)
}

/// A claim as header or property text: strings as they are, string lists joined by ",",
/// anything else as compact JSON.
pub fn claim_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(items) if items.iter().all(Value::is_string) => items
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(","),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_with_skew() {
        let w = Window {
            exp: Some(100),
            nbf: Some(50),
        };
        assert!(w.check(99, 0).is_ok());
        assert_eq!(w.check(100, 0), Err(Invalid::Expired));
        assert!(w.check(105, 10).is_ok());
        assert_eq!(w.check(40, 5), Err(Invalid::NotYetValid));
        assert!(w.check(45, 5).is_ok());
    }

    #[test]
    fn rejects_structure() {
        let all = [Alg::Rs256, Alg::Es256, Alg::Hs256];
        assert_eq!(
            parse("a.b", &all).err(),
            Some(Invalid::Malformed("not three parts"))
        );
        assert_eq!(
            parse("a.b.c.d", &all).err(),
            Some(Invalid::Malformed("not three parts"))
        );
        let none = format!("{}.{}.", B64.encode(r#"{"alg":"none"}"#), B64.encode("{}"));
        assert_eq!(parse(&none, &all).err(), Some(Invalid::Algorithm));
        let hs = format!(
            "{}.{}.AA",
            B64.encode(r#"{"alg":"HS256"}"#),
            B64.encode("{}")
        );
        assert_eq!(parse(&hs, &[Alg::Rs256]).err(), Some(Invalid::Algorithm));
        assert!(parse(&hs, &all).is_ok());
    }

    #[test]
    fn claim_texts() {
        assert_eq!(claim_text(&serde_json::json!("a")), "a");
        assert_eq!(claim_text(&serde_json::json!(["a", "b"])), "a,b");
        assert_eq!(claim_text(&serde_json::json!(3)), "3");
    }
}
