//! SPIFFE IDs: parsing (the SPIFFE ID spec's rules) and extraction from a certificate's
//! URI SAN, the one place both directions of mTLS read a peer's identity from.

use rustls_pki_types::CertificateDer;
use std::fmt;

/// A syntactically valid SPIFFE ID: `spiffe://TRUST_DOMAIN/PATH`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId(String);

impl SpiffeId {
    /// Parse by the SPIFFE ID spec: lower-case scheme and trust domain (`a-z 0-9 . - _`),
    /// path segments of `A-Z a-z 0-9 . - _` that are neither empty, `.` nor `..`; no port,
    /// user info, query or fragment; no trailing `/`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("`{s}` is not a SPIFFE ID (spiffe://TRUST_DOMAIN/PATH)"))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(format!("`{s}`: the trust domain is empty"));
        }
        if !td
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_'))
        {
            return Err(format!(
                "`{s}`: the trust domain may only hold a-z, 0-9, '.', '-' and '_'"
            ));
        }
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() {
                    return Err(format!("`{s}`: empty path segment or trailing '/'"));
                }
                if seg == "." || seg == ".." {
                    return Err(format!("`{s}`: '.' and '..' are not allowed in the path"));
                }
                if !seg
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
                {
                    return Err(format!(
                        "`{s}`: path segments may only hold letters, digits, '.', '-' and '_'"
                    ));
                }
            }
        }
        Ok(SpiffeId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a certificate carries no usable SPIFFE ID (also a handshake refusal reason).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("the certificate cannot be parsed: {0}")]
    Unparsable(String),
    #[error("the certificate has no spiffe:// URI SAN")]
    NoSpiffeId,
    #[error("the certificate has {0} URI SANs; an SVID has exactly one")]
    ManyUris(usize),
    #[error("the certificate's URI SAN is not a valid SPIFFE ID: {0}")]
    Invalid(String),
    #[error("peer identity `{0}` is not allowed")]
    NotAllowed(String),
}

impl IdentityError {
    /// The `reason` label of a refused handshake.
    pub fn reason(&self) -> &'static str {
        match self {
            IdentityError::NotAllowed(_) => "identity_not_allowed",
            _ => "no_spiffe_id",
        }
    }
}

/// The SPIFFE ID of an X.509-SVID: its one URI SAN, which must be a valid `spiffe://` ID.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, IdentityError> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert)
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let uris: Vec<&str> = match x509.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|g| match g {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(IdentityError::Unparsable(e.to_string())),
    };
    match uris.as_slice() {
        [] => Err(IdentityError::NoSpiffeId),
        [one] if !one.starts_with("spiffe://") => Err(IdentityError::NoSpiffeId),
        [one] => SpiffeId::parse(one).map_err(IdentityError::Invalid),
        many => Err(IdentityError::ManyUris(many.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_id_syntax() {
        for ok in [
            "spiffe://mesh.local/ns/shop/sa/checkout",
            "spiffe://example.org",
            "spiffe://a-b_c.1/x.y/z-1",
        ] {
            assert!(SpiffeId::parse(ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://mesh.local/ns/a",
            "spiffe://",
            "spiffe:///path",
            "spiffe://Mesh.local/x",
            "spiffe://mesh.local/",
            "spiffe://mesh.local//x",
            "spiffe://mesh.local/a/../b",
            "spiffe://mesh.local:8080/x",
            "spiffe://mesh.local/x?y=1",
            "spiffe://user@mesh.local/x",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
    }
}
