//! `wasmesh ca`: a small mesh CA for users without a PKI of their own.
//!
//! `init` writes a self-signed CA (DIR/ca.crt, DIR/ca.key); `issue` signs a workload
//! certificate (an X.509-SVID: exactly one URI SAN, the SPIFFE ID; client and server auth)
//! with a short lifetime, so rotation is the normal case rather than an emergency. Keys
//! are ECDSA P-256 and written with mode 0600. Anything with an existing PKI (cert-manager,
//! SPIRE) uses its own certificates instead: see docs/manifest.md.

use crate::tls::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// Lifetime of a CA made by `init` unless told otherwise.
pub const DEFAULT_CA_DAYS: u32 = 365;
/// Lifetime of a workload certificate unless told otherwise: a day.
pub const DEFAULT_CERT_HOURS: u32 = 24;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{0} already exists (remove it, or use --force to replace the CA)")]
    Exists(PathBuf),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, std::io::Error),
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0}: {1}")]
    Bad(PathBuf, String),
    #[error("{0}")]
    Invalid(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// What `init` or `issue` wrote.
pub struct Written {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub not_after: SystemTime,
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and no leading zero byte to strip
    SerialNumber::from_slice(&b)
}

/// Write a file; a key gets mode 0600 from its creation on (never briefly world-readable).
fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), CaError> {
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        o.mode(0o600);
    }
    let mut f = o
        .open(path)
        .map_err(|e| CaError::Write(path.to_path_buf(), e))?;
    if secret {
        use std::os::unix::fs::PermissionsExt;
        // An existing file keeps its mode on open: tighten it.
        f.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| CaError::Write(path.to_path_buf(), e))?;
    }
    f.write_all(text.as_bytes())
        .map_err(|e| CaError::Write(path.to_path_buf(), e))
}

/// `wasmesh ca init --dir DIR`: a new CA in DIR/ca.crt and DIR/ca.key.
pub fn init(dir: &Path, days: u32, force: bool) -> Result<Written, CaError> {
    if days == 0 {
        return Err(CaError::Invalid("--days must be at least 1".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| CaError::Write(dir.to_path_buf(), e))?;
    let cert_path = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    if !force {
        for p in [&cert_path, &key_path] {
            if p.exists() {
                return Err(CaError::Exists(p.clone()));
            }
        }
    }
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "wasmesh mesh CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "wasmesh");
    // Signs workload certificates only, never other CAs.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.serial_number = Some(random_serial());
    let now = SystemTime::now();
    let not_after = now + Duration::from_secs(u64::from(days) * 86_400);
    params.not_before = (now - Duration::from_secs(300)).into();
    params.not_after = not_after.into();
    let cert = params.self_signed(&key)?;
    write_file(&key_path, &key.serialize_pem(), true)?;
    write_file(&cert_path, &cert.pem(), false)?;
    Ok(Written {
        cert: cert_path,
        key: key_path,
        not_after,
    })
}

/// `wasmesh ca issue`: a workload certificate for `spiffe_id`, valid for `lifetime`,
/// written to PREFIX.crt and PREFIX.key.
pub fn issue(
    dir: &Path,
    spiffe_id: &str,
    out: &Path,
    lifetime: Duration,
) -> Result<Written, CaError> {
    let id = SpiffeId::parse(spiffe_id).map_err(CaError::Invalid)?;
    if lifetime.is_zero() {
        return Err(CaError::Invalid("the lifetime must be more than 0".into()));
    }
    let ca_cert_path = dir.join("ca.crt");
    let ca_key_path = dir.join("ca.key");
    let ca_pem = std::fs::read_to_string(&ca_cert_path)
        .map_err(|e| CaError::Read(ca_cert_path.clone(), e))?;
    let ca_key_pem =
        std::fs::read_to_string(&ca_key_path).map_err(|e| CaError::Read(ca_key_path.clone(), e))?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|e| CaError::Bad(ca_key_path.clone(), format!("not a private key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)
        .map_err(|e| CaError::Bad(ca_cert_path.clone(), format!("not a CA certificate: {e}")))?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    // The identity is the URI SAN; the CN only helps people reading the certificate.
    params
        .distinguished_name
        .push(DnType::CommonName, id.as_str());
    params.subject_alt_names = vec![SanType::URI(
        id.as_str()
            .try_into()
            .map_err(|e| CaError::Invalid(format!("`{id}`: {e}")))?,
    )];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    let now = SystemTime::now();
    let not_after = now + lifetime;
    // A little slack for clocks that disagree between workloads.
    params.not_before = (now - Duration::from_secs(300)).into();
    params.not_after = not_after.into();
    let cert = params.signed_by(&key, &issuer)?;

    let cert_path = with_suffix(out, "crt");
    let key_path = with_suffix(out, "key");
    if let Some(parent) = cert_path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent).map_err(|e| CaError::Write(parent.to_path_buf(), e))?;
        }
    }
    // Key first: a watcher that sees the new certificate finds its key already there.
    write_atomically(&key_path, &key.serialize_pem(), true)?;
    write_atomically(&cert_path, &cert.pem(), false)?;
    Ok(Written {
        cert: cert_path,
        key: key_path,
        not_after,
    })
}

/// Write beside the target, then rename: a proxy watching the file never reads half of it.
fn write_atomically(path: &Path, text: &str, secret: bool) -> Result<(), CaError> {
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".tmp~");
    let tmp = PathBuf::from(tmp);
    write_file(&tmp, text, secret)?;
    std::fs::rename(&tmp, path).map_err(|e| CaError::Write(path.to_path_buf(), e))
}

fn with_suffix(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_os_string();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{load_material, TlsFiles};

    #[test]
    fn init_then_issue_gives_an_svid_that_loads() {
        let dir = std::env::temp_dir().join(format!("wasmesh-ca-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        init(&dir, 30, false).expect("init");
        assert!(matches!(init(&dir, 30, false), Err(CaError::Exists(_))));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("ca.key"))
            .expect("ca.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let id = "spiffe://mesh.local/ns/shop/sa/checkout";
        let w = issue(&dir, id, &dir.join("checkout"), Duration::from_secs(3600)).expect("issue");
        let m = load_material(&TlsFiles {
            cert: w.cert,
            key: w.key,
            trust_bundle: dir.join("ca.crt"),
        })
        .expect("load");
        assert_eq!(m.identity.as_str(), id);
        assert!(issue(&dir, "https://x", &dir.join("x"), Duration::from_secs(1)).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
