//! Signature verification by the host: RS256, ES256 and HS256 keys parsed once from a JSON
//! Web Key and checked in native code.
//!
//! RSA and ECDSA compiled into a filter run as wasm arithmetic and cost milliseconds per
//! check; the host does the same check in tens of microseconds. Make each key once, when
//! the key material arrives (in `configure`, or when a fetched JWKS is parsed), keep it in
//! the filter, and call [`VerifyingKey::verify`] per token. Dropping a key frees it in the
//! host; an instance holds at most 1024 keys at a time.
//!
//! ```ignore
//! use wasmesh_sdk::crypto::{SignatureAlgorithm, VerifyingKey};
//!
//! let key = VerifyingKey::from_jwk(r#"{"kty":"EC","crv":"P-256","x":"...","y":"..."}"#)?;
//! assert_eq!(key.algorithm(), SignatureAlgorithm::Es256);
//! let ok = key.verify(SignatureAlgorithm::Es256, signing_input.as_bytes(), &signature);
//! ```

pub use crate::bindings::wasmesh::filter::host::{SignatureAlgorithm, VerifyingKey};

impl SignatureAlgorithm {
    /// The JWS name (`alg` header value) of the algorithm, e.g. `"RS256"`.
    ///
    /// ```ignore
    /// assert_eq!(SignatureAlgorithm::Es256.jws_name(), "ES256");
    /// ```
    pub fn jws_name(self) -> &'static str {
        match self {
            SignatureAlgorithm::Rs256 => "RS256",
            SignatureAlgorithm::Es256 => "ES256",
            SignatureAlgorithm::Hs256 => "HS256",
        }
    }

    /// The algorithm of a JWS `alg` name; `None` for any other (including `none`).
    ///
    /// ```ignore
    /// assert_eq!(SignatureAlgorithm::from_jws_name("HS256"), Some(SignatureAlgorithm::Hs256));
    /// ```
    pub fn from_jws_name(name: &str) -> Option<SignatureAlgorithm> {
        match name {
            "RS256" => Some(SignatureAlgorithm::Rs256),
            "ES256" => Some(SignatureAlgorithm::Es256),
            "HS256" => Some(SignatureAlgorithm::Hs256),
            _ => None,
        }
    }
}
