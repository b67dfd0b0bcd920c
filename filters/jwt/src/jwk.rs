//! JSON Web Keys (RFC 7517) and JWS signature checks (RFC 7515/7518) for RS256, ES256 and
//! HS256, with RustCrypto's pure-Rust crates (no C: they build for wasm32-wasip2).
//!
//! A key only verifies the algorithm of its type (RSA: RS256, EC P-256: ES256, oct:
//! HS256): an RSA public key is never used as an HMAC secret ("algorithm confusion").

use crate::config::Alg;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use hmac::Mac;
use serde_json::Value;

/// base64url, padding optional (RFC 7515 says none; some encoders add it).
pub const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Keys past this many in a JWKS are ignored (a JWKS is a handful of keys).
const MAX_KEYS: usize = 32;
/// RSA moduli smaller than this are refused.
const MIN_RSA_BITS: usize = 2048;
/// HS256 secrets shorter than the hash are refused (RFC 7518 §3.2).
const MIN_HMAC_BYTES: usize = 32;

enum Material {
    Rsa(Box<rsa::pkcs1v15::VerifyingKey<sha2::Sha256>>),
    Ec(Box<p256::ecdsa::VerifyingKey>),
    Hmac(Vec<u8>),
}

/// One usable key.
pub struct Key {
    pub kid: Option<String>,
    material: Material,
}

impl Key {
    /// The algorithm this key verifies.
    pub fn alg(&self) -> Alg {
        match self.material {
            Material::Rsa(_) => Alg::Rs256,
            Material::Ec(_) => Alg::Es256,
            Material::Hmac(_) => Alg::Hs256,
        }
    }

    /// Check `sig` over `input`.
    pub fn verify(&self, input: &[u8], sig: &[u8]) -> bool {
        use p256::ecdsa::signature::Verifier;
        match &self.material {
            Material::Rsa(k) => {
                rsa::pkcs1v15::Signature::try_from(sig).is_ok_and(|s| k.verify(input, &s).is_ok())
            }
            Material::Ec(k) => {
                p256::ecdsa::Signature::from_slice(sig).is_ok_and(|s| k.verify(input, &s).is_ok())
            }
            Material::Hmac(secret) => {
                match hmac::Hmac::<sha2::Sha256>::new_from_slice(secret) {
                    Ok(mut mac) => {
                        mac.update(input);
                        // Constant-time comparison.
                        mac.verify_slice(sig).is_ok()
                    }
                    Err(_) => false,
                }
            }
        }
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

fn field<'a>(jwk: &'a Value, name: &str) -> Result<&'a str, String> {
    jwk.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("missing `{name}`"))
}

fn b64_field(jwk: &Value, name: &str) -> Result<Vec<u8>, String> {
    B64.decode(field(jwk, name)?)
        .map_err(|_| format!("`{name}` is not base64url"))
}

/// `Ok(None)`: a key for something else (encryption, another algorithm), skipped quietly.
fn parse_key(jwk: &Value) -> Result<Option<Key>, String> {
    if jwk
        .get("use")
        .and_then(Value::as_str)
        .is_some_and(|u| u != "sig")
    {
        return Ok(None);
    }
    let alg = jwk.get("alg").and_then(Value::as_str);
    let kid = jwk.get("kid").and_then(Value::as_str).map(str::to_string);
    let material = match field(jwk, "kty")? {
        "RSA" => {
            if alg.is_some_and(|a| a != "RS256") {
                return Ok(None);
            }
            let n = rsa::BigUint::from_bytes_be(&b64_field(jwk, "n")?);
            let e = rsa::BigUint::from_bytes_be(&b64_field(jwk, "e")?);
            if n.bits() < MIN_RSA_BITS {
                return Err(format!(
                    "RSA key of {} bits (at least {MIN_RSA_BITS})",
                    n.bits()
                ));
            }
            let key = rsa::RsaPublicKey::new(n, e).map_err(|e| format!("bad RSA key: {e}"))?;
            Material::Rsa(Box::new(rsa::pkcs1v15::VerifyingKey::new(key)))
        }
        "EC" => {
            if alg.is_some_and(|a| a != "ES256") || field(jwk, "crv")? != "P-256" {
                return Ok(None);
            }
            let x = b64_field(jwk, "x")?;
            let y = b64_field(jwk, "y")?;
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates are 32 bytes".into());
            }
            let point = p256::EncodedPoint::from_affine_coordinates(
                p256::FieldBytes::from_slice(&x),
                p256::FieldBytes::from_slice(&y),
                false,
            );
            let key = p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                .map_err(|_| "EC point not on P-256".to_string())?;
            Material::Ec(Box::new(key))
        }
        "oct" => {
            if alg.is_some_and(|a| a != "HS256") {
                return Ok(None);
            }
            let k = b64_field(jwk, "k")?;
            if k.len() < MIN_HMAC_BYTES {
                return Err(format!(
                    "HS256 secret of {} bytes (at least {MIN_HMAC_BYTES})",
                    k.len()
                ));
            }
            Material::Hmac(k)
        }
        _ => return Ok(None),
    };
    Ok(Some(Key { kid, material }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_foreign_and_weak_keys() {
        let doc = serde_json::json!({"keys": [
            {"kty": "oct", "k": "c2hvcnQ"},
            {"kty": "oct", "use": "enc", "k": "c2hvcnQ"},
            {"kty": "OKP", "crv": "Ed25519", "x": "AA"},
            {"kty": "oct", "kid": "h", "k": B64.encode([7u8; 32])},
        ]});
        let set = KeySet::from_value(&doc).expect("parses");
        assert_eq!(set.keys.len(), 1);
        assert!(set.has_kid("h"));
        assert_eq!(set.skipped.len(), 1, "{:?}", set.skipped);
    }

    #[test]
    fn hmac_verifies() {
        let secret = [9u8; 32];
        let doc = serde_json::json!({"keys": [{"kty": "oct", "k": B64.encode(secret)}]});
        let set = KeySet::from_value(&doc).expect("parses");
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&secret).expect("key");
        mac.update(b"a.b");
        let sig = mac.finalize().into_bytes();
        let key = set.candidates(Alg::Hs256, None).next().expect("a key");
        assert!(key.verify(b"a.b", &sig));
        assert!(!key.verify(b"a.c", &sig));
    }
}
