//! Public TLS termination: server certificates for clients outside the mesh, chosen by
//! the ClientHello's server name (SNI), no client certificate asked for.
//!
//! Each certificate serves the DNS names of its subjectAltName (wildcards included); the
//! first is the default for clients that send no name or one no certificate covers. Each
//! certificate rotates on its own ([`super::Rotate`]): new handshakes take the current
//! one, a bad replacement is refused and counted, the previous one stays.

use super::{provider, read, read_certs, versions, Rotate, TlsError, TlsFiles};
use crate::config::PublicTlsSpec;
use crate::telemetry::metrics::{Metrics, TlsCertLabel, TlsReloadLabel};
use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use std::path::Path;
use std::sync::Arc;

/// A loaded certificate: the signing key with its chain, the names it serves, its expiry.
pub struct LoadedCert {
    pub key: Arc<CertifiedKey>,
    /// Lower-case DNS names from the leaf's subjectAltName (`*.example.com` kept as is).
    pub names: Vec<String>,
    pub not_after: i64,
    pub serial: String,
}

/// Load a certificate chain and its key (`files.trust_bundle` is unused); the key must
/// match and the leaf be valid now.
pub fn load_cert(files: &TlsFiles) -> Result<LoadedCert, TlsError> {
    let chain = read_certs(&files.cert)?;
    let (_, leaf) = x509_parser::parse_x509_certificate(&chain[0]).map_err(|e| TlsError::Pem {
        file: files.cert.clone(),
        reason: format!("not an X.509 certificate: {e}"),
    })?;
    let now = super::now_unix();
    let not_after = leaf.validity().not_after.timestamp();
    if now > not_after {
        return Err(TlsError::Expired {
            file: files.cert.clone(),
            at: not_after,
        });
    }
    let not_before = leaf.validity().not_before.timestamp();
    if now < not_before {
        return Err(TlsError::NotYetValid {
            file: files.cert.clone(),
            at: not_before,
        });
    }
    let mut names = Vec::new();
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    let serial = hex::encode(leaf.tbs_certificate.raw_serial());
    let key_pem = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::Key {
        file: files.key.clone(),
        reason: e.to_string(),
    })?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Key {
            file: files.key.clone(),
            reason: e.to_string(),
        })?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            })
        }
    }
    Ok(LoadedCert {
        key: Arc::new(certified),
        names,
        not_after,
        serial,
    })
}

/// Whether `pattern` (an exact name or `*.suffix`, lower case) covers `name`.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        // A wildcard covers exactly one label (RFC 6125 §6.4.3).
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

/// One certificate of a public listener, rotated on its own.
pub struct PublicCert {
    owner: Arc<str>,
    files: TlsFiles,
    current: ArcSwap<LoadedCert>,
    metrics: Arc<Metrics>,
}

impl PublicCert {
    fn record(&self, c: &LoadedCert) {
        self.metrics
            .tls_cert_expiry
            .get_or_create(&TlsCertLabel {
                owner: self.owner.clone(),
                kind: "certificate",
            })
            .set(c.not_after);
    }

    /// Hex serial of the certificate new handshakes present.
    pub fn serial(&self) -> String {
        self.current.load().serial.clone()
    }
}

impl Rotate for PublicCert {
    fn owner(&self) -> &Arc<str> {
        &self.owner
    }
    fn files(&self) -> &TlsFiles {
        &self.files
    }
    fn reload(&self) -> Result<(), TlsError> {
        let r = load_cert(&self.files);
        let result = match &r {
            Ok(c) => {
                tracing::info!(owner = %self.owner, serial = %c.serial, names = ?c.names, "TLS certificate loaded; new handshakes use it");
                self.record(c);
                "success"
            }
            Err(e) => {
                tracing::error!(owner = %self.owner, error = %e, "TLS certificate replacement refused; the previous certificate stays in use");
                "failure"
            }
        };
        self.metrics
            .tls_cert_reloads
            .get_or_create(&TlsReloadLabel {
                owner: self.owner.clone(),
                result,
            })
            .inc();
        let c = r?;
        self.current.store(Arc::new(c));
        Ok(())
    }
}

/// Picks the certificate for a ClientHello.
#[derive(Debug)]
struct SniResolver {
    certs: Vec<Arc<PublicCert>>,
}

impl std::fmt::Debug for PublicCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicCert")
            .field("owner", &self.owner)
            .finish()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name() {
            let name = name.to_ascii_lowercase();
            // Exact names first, then wildcards, across all certificates.
            for exact in [true, false] {
                for c in &self.certs {
                    let cur = c.current.load();
                    if cur
                        .names
                        .iter()
                        .any(|p| p.starts_with("*.") != exact && name_matches(p, &name))
                    {
                        return Some(cur.key.clone());
                    }
                }
            }
        }
        self.certs.first().map(|c| c.current.load().key.clone())
    }
}

/// A listener's public TLS: its certificates and the rustls config that serves them.
pub struct PublicTls {
    pub certs: Vec<Arc<PublicCert>>,
    config: Arc<ServerConfig>,
    spec: PublicTlsSpec,
}

impl PublicTls {
    /// Load the certificates. `alpn`: the protocols to offer (HTTP listeners offer h2 and
    /// http/1.1; TCP listeners none).
    pub fn new(
        listener: &str,
        spec: &PublicTlsSpec,
        base: Option<&Path>,
        alpn: &[&[u8]],
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, TlsError> {
        let mut certs = Vec::new();
        for (i, ck) in spec.certificates.iter().enumerate() {
            let files = TlsFiles::resolve(&ck.cert, &ck.key, &ck.cert, base);
            let loaded = load_cert(&files)?;
            let c = Arc::new(PublicCert {
                owner: Arc::from(format!("listener/{listener}/{i}")),
                files,
                current: ArcSwap::from_pointee(loaded),
                metrics: metrics.clone(),
            });
            c.record(&c.current.load());
            certs.push(c);
        }
        let mut cfg = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(versions(spec.min_version))
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SniResolver {
                certs: certs.clone(),
            }));
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(PublicTls {
            certs,
            config: Arc::new(cfg),
            spec: spec.clone(),
        }))
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.clone())
    }

    pub fn same_spec(&self, spec: &PublicTlsSpec) -> bool {
        &self.spec == spec
    }
}

#[cfg(test)]
mod tests {
    use super::name_matches;

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("api.example.com", "api.example.com"));
        assert!(!name_matches("api.example.com", "www.example.com"));
        assert!(name_matches("*.example.com", "www.example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
    }
}
