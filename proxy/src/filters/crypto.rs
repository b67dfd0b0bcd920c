//! Signature verification for filters (`wasmesh:filter/host.verifying-key`): keys parsed
//! once from a JSON Web Key, then checked in native code.
//!
//! Why it is a host service: RSA and ECDSA compiled into a filter run as wasm arithmetic
//! (no 64×64→128 multiply), which made RS256 and ES256 checks cost about 2 ms per token in
//! the `jwt` filter; here they take tens of microseconds.
//!
//! Owns the per-instance key table ([`KeyTable`], in the store's [`HostState`]) and the
//! algorithms. The checks are `ring`'s (the proxy's crypto provider for TLS already, and
//! several times faster than the pure-Rust crates for RSA and P-256); `p256` only
//! validates EC points when a key is made, so that a bad key fails then rather than on
//! every check. A key verifies one algorithm, decided by its type, and a check under
//! another algorithm is false: an RSA public key is never an HMAC secret.
//!
//! Nothing here may panic on what a filter passes: every input is parsed with errors.

use super::bindings::wasmesh::filter::host::{self, SignatureAlgorithm};
use super::host::HostState;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::Value;
use wasmtime::component::Resource;

/// Keys one instance may hold at a time (a JWKS is a handful of keys).
pub const MAX_KEYS_PER_INSTANCE: usize = 1024;
/// RSA moduli smaller than this are refused.
const MIN_RSA_BITS: usize = 2048;
/// RSA moduli larger than this are refused.
const MAX_RSA_BITS: usize = 4096;
/// HS256 secrets shorter than the hash are refused (RFC 7518 §3.2).
const MIN_HMAC_BYTES: usize = 32;
/// Longest JWK text accepted (an RSA-4096 JWK is under 1 KiB).
const MAX_JWK_LEN: usize = 16 * 1024;

/// base64url, padding optional (RFC 7515 says none; some encoders add it).
const B64: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// A parsed key, ready to verify.
pub enum NativeKey {
    /// Modulus and exponent, big-endian without leading zeros.
    Rs256(RsaPublicKeyComponents<Vec<u8>>),
    /// The uncompressed point (`04 || x || y`), checked to be on the curve.
    Es256(UnparsedPublicKey<Vec<u8>>),
    Hs256(ring::hmac::Key),
}

/// Big-endian unsigned integer without its leading zero bytes.
fn minimal(mut b: Vec<u8>) -> Vec<u8> {
    let zeros = b.iter().take_while(|x| **x == 0).count();
    b.drain(..zeros);
    b
}

impl NativeKey {
    /// Parse a JSON Web Key (RFC 7517). Only the members that make the key are read.
    pub fn from_jwk(text: &str) -> Result<NativeKey, String> {
        if text.len() > MAX_JWK_LEN {
            return Err(format!("JWK longer than {MAX_JWK_LEN} bytes"));
        }
        let jwk: Value = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        match field(&jwk, "kty")? {
            "RSA" => {
                let n = minimal(b64_field(&jwk, "n")?);
                let e = minimal(b64_field(&jwk, "e")?);
                let bits = n.len() * 8 - n.first().map_or(8, |b| b.leading_zeros() as usize);
                if bits < MIN_RSA_BITS {
                    return Err(format!("RSA key of {bits} bits (at least {MIN_RSA_BITS})"));
                }
                // The bound keeps one check cheap (ring accepts up to 8192).
                if bits > MAX_RSA_BITS {
                    return Err(format!("RSA key of {bits} bits (at most {MAX_RSA_BITS})"));
                }
                // What ring checks on every verification, refused once here instead.
                let e_ok = e.len() <= 5
                    && e.last().is_some_and(|b| b & 1 == 1)
                    && e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)) >= 3
                    && e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)) < (1 << 33);
                if !e_ok {
                    return Err("bad RSA key: the exponent must be odd, 3 to 2^33".into());
                }
                Ok(NativeKey::Rs256(RsaPublicKeyComponents { n, e }))
            }
            "EC" => {
                let crv = field(&jwk, "crv")?;
                if crv != "P-256" {
                    return Err(format!("unsupported curve {crv:?} (P-256 only)"));
                }
                let x = b64_field(&jwk, "x")?;
                let y = b64_field(&jwk, "y")?;
                if x.len() != 32 || y.len() != 32 {
                    return Err("P-256 coordinates are 32 bytes".into());
                }
                let point = p256::EncodedPoint::from_affine_coordinates(
                    p256::FieldBytes::from_slice(&x),
                    p256::FieldBytes::from_slice(&y),
                    false,
                );
                p256::ecdsa::VerifyingKey::from_encoded_point(&point)
                    .map_err(|_| "EC point not on P-256".to_string())?;
                Ok(NativeKey::Es256(UnparsedPublicKey::new(
                    &signature::ECDSA_P256_SHA256_FIXED,
                    point.as_bytes().to_vec(),
                )))
            }
            "oct" => {
                let k = b64_field(&jwk, "k")?;
                if k.len() < MIN_HMAC_BYTES {
                    return Err(format!(
                        "HS256 secret of {} bytes (at least {MIN_HMAC_BYTES})",
                        k.len()
                    ));
                }
                Ok(NativeKey::Hs256(ring::hmac::Key::new(
                    ring::hmac::HMAC_SHA256,
                    &k,
                )))
            }
            other => Err(format!("unsupported key type {other:?}")),
        }
    }

    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> SignatureAlgorithm {
        match self {
            NativeKey::Rs256(_) => SignatureAlgorithm::Rs256,
            NativeKey::Es256(_) => SignatureAlgorithm::Es256,
            NativeKey::Hs256(_) => SignatureAlgorithm::Hs256,
        }
    }

    /// Whether `sig` signs `msg` under `alg` with this key.
    pub fn verify(&self, alg: SignatureAlgorithm, msg: &[u8], sig: &[u8]) -> bool {
        if alg != self.algorithm() {
            return false;
        }
        match self {
            NativeKey::Rs256(k) => k
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, msg, sig)
                .is_ok(),
            NativeKey::Es256(k) => k.verify(msg, sig).is_ok(),
            // Constant-time comparison.
            NativeKey::Hs256(k) => ring::hmac::verify(k, msg, sig).is_ok(),
        }
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

/// The keys one instance holds, by handle (the resource's rep): a slab with a free list.
#[derive(Default)]
pub struct KeyTable {
    slots: Vec<Option<NativeKey>>,
    free: Vec<u32>,
    len: usize,
}

impl KeyTable {
    fn insert(&mut self, key: NativeKey) -> Result<u32, String> {
        if self.len >= MAX_KEYS_PER_INSTANCE {
            return Err(format!(
                "at most {MAX_KEYS_PER_INSTANCE} keys per filter instance"
            ));
        }
        let rep = match self.free.pop() {
            Some(rep) => {
                if let Some(slot) = self.slots.get_mut(rep as usize) {
                    *slot = Some(key);
                }
                rep
            }
            None => {
                let rep = u32::try_from(self.slots.len()).map_err(|_| "too many keys")?;
                self.slots.push(Some(key));
                rep
            }
        };
        self.len += 1;
        Ok(rep)
    }

    fn get(&self, rep: u32) -> Option<&NativeKey> {
        self.slots.get(rep as usize)?.as_ref()
    }

    fn remove(&mut self, rep: u32) {
        if let Some(slot) = self.slots.get_mut(rep as usize) {
            if slot.take().is_some() {
                self.len -= 1;
                self.free.push(rep);
            }
        }
    }
}

impl host::HostVerifyingKey for HostState {
    fn from_jwk(&mut self, jwk: String) -> Result<Resource<host::VerifyingKey>, String> {
        let key = NativeKey::from_jwk(&jwk)?;
        let rep = self.keys.insert(key)?;
        Ok(Resource::new_own(rep))
    }

    fn algorithm(&mut self, key: Resource<host::VerifyingKey>) -> SignatureAlgorithm {
        // A handle the guest holds always has its key (the component model checks handles);
        // RS256 is only a well-typed answer for the impossible case.
        self.keys
            .get(key.rep())
            .map_or(SignatureAlgorithm::Rs256, NativeKey::algorithm)
    }

    fn verify(
        &mut self,
        key: Resource<host::VerifyingKey>,
        alg: SignatureAlgorithm,
        message: Vec<u8>,
        signature: Vec<u8>,
    ) -> bool {
        self.keys
            .get(key.rep())
            .is_some_and(|k| k.verify(alg, &message, &signature))
    }

    fn drop(&mut self, key: Resource<host::VerifyingKey>) -> wasmtime::Result<()> {
        self.keys.remove(key.rep());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hs_key(secret: &[u8]) -> NativeKey {
        NativeKey::from_jwk(&json!({"kty": "oct", "k": B64.encode(secret)}).to_string())
            .expect("HMAC key")
    }

    #[test]
    fn hmac_verifies_only_its_own_algorithm() {
        let secret = [9u8; 32];
        let key = hs_key(&secret);
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            b"a.b",
        );
        let sig = tag.as_ref();
        assert!(key.verify(SignatureAlgorithm::Hs256, b"a.b", sig));
        assert!(!key.verify(SignatureAlgorithm::Hs256, b"a.c", sig));
        assert!(!key.verify(SignatureAlgorithm::Rs256, b"a.b", sig));
        assert!(!key.verify(SignatureAlgorithm::Hs256, b"a.b", &sig[..31]));
    }

    #[test]
    fn ecdsa_verifies() {
        use p256::ecdsa::signature::Signer;
        let sk = p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).expect("scalar");
        let point = sk.verifying_key().to_encoded_point(false);
        let jwk = json!({"kty": "EC", "crv": "P-256",
            "x": B64.encode(point.x().expect("x")), "y": B64.encode(point.y().expect("y"))});
        let key = NativeKey::from_jwk(&jwk.to_string()).expect("EC key");
        let sig: p256::ecdsa::Signature = sk.sign(b"a.b");
        assert!(key.verify(SignatureAlgorithm::Es256, b"a.b", &sig.to_bytes()));
        assert!(!key.verify(SignatureAlgorithm::Es256, b"a.c", &sig.to_bytes()));
        assert!(!key.verify(SignatureAlgorithm::Es256, b"a.b", b"short"));
    }

    #[test]
    fn refuses_weak_and_malformed_keys() {
        let cases = [
            ("{", "not JSON"),
            (
                r#"{"kty": "OKP", "crv": "Ed25519", "x": "AA"}"#,
                "unsupported key type",
            ),
            (
                r#"{"kty": "oct", "k": "c2hvcnQ"}"#,
                "HS256 secret of 5 bytes",
            ),
            (
                r#"{"kty": "RSA", "n": "AQAB", "e": "AQAB"}"#,
                "RSA key of 17 bits",
            ),
            (
                r#"{"kty": "EC", "crv": "P-384", "x": "", "y": ""}"#,
                "unsupported curve",
            ),
            (
                r#"{"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}"#,
                "32 bytes",
            ),
            (r#"{"kty": "oct", "k": "!!"}"#, "not base64url"),
        ];
        for (jwk, want) in cases {
            match NativeKey::from_jwk(jwk) {
                Ok(_) => panic!("{jwk} was accepted"),
                Err(e) => assert!(e.contains(want), "{jwk}: {e}"),
            }
        }
    }

    #[test]
    fn table_is_bounded_and_reuses_slots() {
        let mut t = KeyTable::default();
        for _ in 0..MAX_KEYS_PER_INSTANCE {
            t.insert(hs_key(&[1; 32])).expect("room");
        }
        assert!(t.insert(hs_key(&[1; 32])).is_err());
        t.remove(7);
        t.remove(7);
        assert_eq!(t.insert(hs_key(&[1; 32])), Ok(7));
        assert!(t.get(7).is_some());
        assert!(t.get(u32::MAX).is_none());
    }
}
