//! JSON Web Keys (RFC 7517): which keys of a JWKS this filter uses, for which algorithm,
//! and the host's verifying keys made from them (RFC 7518 checks for RS256, ES256 and
//! HS256 run in the host, natively: in wasm, RSA and ECDSA cost milliseconds per token).
//!
//! A key only verifies the algorithm of its type (RSA: RS256, EC P-256: ES256, oct:
//! HS256): an RSA public key is never used as an HMAC secret ("algorithm confusion"). The
//! host enforces the same rule and the minimum key sizes (RSA ≥ 2048 bits, HMAC ≥ 32 bytes).

use crate::config::Alg;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use serde_json::Value;
use wasmesh_sdk::crypto::{SignatureAlgorithm, VerifyingKey};

/// base64url, padding optional (RFC 7515 says none; some encoders add it).
pub const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Keys past this many in a JWKS are ignored (a JWKS is a handful of keys).
const MAX_KEYS: usize = 32;

impl Alg {
    fn host(self) -> SignatureAlgorithm {
        match self {
            Alg::Rs256 => SignatureAlgorithm::Rs256,
            Alg::Es256 => SignatureAlgorithm::Es256,
            Alg::Hs256 => SignatureAlgorithm::Hs256,
        }
    }
}

/// One usable key.
pub struct Key {
    pub kid: Option<String>,
    alg: Alg,
    key: VerifyingKey,
}

impl Key {
    /// The algorithm this key verifies.
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// Check `sig` over `input` (in the host).
    pub fn verify(&self, input: &[u8], sig: &[u8]) -> bool {
        self.key.verify(self.alg.host(), input, sig)
    }
}

/// A parsed JWKS: the keys this filter can use. Keys of other types or algorithms, or
/// that are malformed or too weak, are skipped (a JWKS may carry keys for other users).
#[derive(Default)]
pub struct KeySet {
    pub keys: Vec<Key>,
    /// Why keys were skipped, for the log.
    pub skipped: Vec<String>,
}

impl KeySet {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Parse a JWKS document (`{"keys": [...]}`).
    pub fn from_json(text: &[u8]) -> Result<KeySet, String> {
        let v: Value = serde_json::from_slice(text).map_err(|e| format!("not JSON: {e}"))?;
        KeySet::from_value(&v)
    }

    pub fn from_value(doc: &Value) -> Result<KeySet, String> {
        let list = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("a JWKS is an object with a `keys` array")?;
        let mut set = KeySet::default();
        for (i, jwk) in list.iter().take(MAX_KEYS).enumerate() {
            match parse_key(jwk) {
                Ok(Some(k)) => set.keys.push(k),
                Ok(None) => {}
                Err(e) => set.skipped.push(format!("keys[{i}]: {e}")),
            }
        }
        Ok(set)
    }

    /// Whether a key with this `kid` exists.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }

    /// Candidate keys for a token: by `kid` when it has one, else every key of `alg`.
    pub fn candidates<'a>(
        &'a self,
        alg: Alg,
        kid: Option<&'a str>,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys.iter().filter(move |k| {
            k.alg() == alg
                && match kid {
                    Some(kid) => k.kid.as_deref() == Some(kid),
                    None => true,
                }
        })
    }
}

/// The algorithm a JWK is for, when this filter uses it: `None` for a key meant for
/// something else (encryption, another algorithm or curve), skipped quietly.
fn select(jwk: &Value) -> Option<Alg> {
    if jwk
        .get("use")
        .and_then(Value::as_str)
        .is_some_and(|u| u != "sig")
    {
        return None;
    }
    let alg = jwk.get("alg").and_then(Value::as_str);
    let (ours, name) = match jwk.get("kty").and_then(Value::as_str)? {
        "RSA" => (Alg::Rs256, "RS256"),
        "EC" if jwk.get("crv").and_then(Value::as_str) == Some("P-256") => (Alg::Es256, "ES256"),
        "oct" => (Alg::Hs256, "HS256"),
        _ => return None,
    };
    if alg.is_some_and(|a| a != name) {
        return None;
    }
    Some(ours)
}

/// `Ok(None)`: a key for something else, skipped quietly; `Err`: a key of ours that the
/// host refused (malformed, too weak).
fn parse_key(jwk: &Value) -> Result<Option<Key>, String> {
    if jwk.get("kty").is_none() {
        return Err("missing `kty`".into());
    }
    let Some(alg) = select(jwk) else {
        return Ok(None);
    };
    let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_string);
    let key = VerifyingKey::from_jwk(&jwk.to_string())?;
    Ok(Some(Key { kid, alg, key }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // Parsing and checking keys is the host's (`wasmesh` `filters::crypto`, tested there);
    // choosing keys is this filter's.
    #[test]
    fn selects_signing_keys_by_type_use_and_alg() {
        let cases = [
            (json!({"kty": "RSA", "n": "", "e": ""}), Some(Alg::Rs256)),
            (
                json!({"kty": "RSA", "alg": "RS256", "use": "sig"}),
                Some(Alg::Rs256),
            ),
            (json!({"kty": "RSA", "alg": "PS256"}), None),
            (json!({"kty": "RSA", "use": "enc"}), None),
            (json!({"kty": "EC", "crv": "P-256"}), Some(Alg::Es256)),
            (json!({"kty": "EC", "crv": "P-384"}), None),
            (json!({"kty": "EC", "crv": "P-256", "alg": "HS256"}), None),
            (json!({"kty": "oct", "k": "AA"}), Some(Alg::Hs256)),
            (json!({"kty": "OKP", "crv": "Ed25519"}), None),
        ];
        for (jwk, want) in cases {
            assert_eq!(select(&jwk), want, "{jwk}");
        }
    }
}
