//! Mesh mTLS: certificates, rustls configs, SPIFFE identities and rotation.
//!
//! A listener with a `tls` block terminates mTLS before hyper sees the connection
//! ([`ServerTls`], used by `crate::listener`); a cluster with a `tls` block originates it
//! ([`ClientTls`], used by `crate::cluster::Connector`). Peers are identified by the SPIFFE
//! ID in their certificate's URI SAN, checked on top of webpki's chain check by the
//! verifiers in [`verify`].
//!
//! Certificates rotate without a restart: each [`ServerTls`]/[`ClientTls`] keeps its rustls
//! config behind an `ArcSwap`; new handshakes take the current one, established connections
//! keep the one they began with. [`watch`] reloads on file changes; a replacement that does
//! not load (bad PEM, key mismatch, expired) is refused, logged and counted, and the previous
//! files stay in use.
//!
//! One crypto provider (ring) is used everywhere and installed as the process default by
//! [`install_crypto_provider`]; configs also name it explicitly so nothing depends on the
//! process default being set first.
//!
//! This module never logs key material: errors name files and reasons only.

pub mod public;
pub mod sni;
pub mod spiffe;
pub mod verify;
pub mod watch;

use crate::config::{ClusterTlsSpec, ListenerTlsSpec, TlsMode, TlsVersion};
use crate::telemetry::metrics::{Metrics, TlsCertLabel, TlsReloadLabel};
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

pub use spiffe::{spiffe_id_of, IdentityError, SpiffeId};
use verify::{Allowed, SpiffeClientVerifier, SpiffeServerVerifier};

/// ALPN protocols a TLS listener offers, in order of preference.
const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The crypto provider every TLS config uses.
pub fn provider() -> Arc<CryptoProvider> {
    static P: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    P.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// Install ring as the process-wide default provider (idempotent). With two providers
/// compiled in and none installed, rustls refuses to guess; we compile one and install it.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A problem with TLS files or settings, naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("{file}: no PEM certificate found")]
    NoCertificate { file: PathBuf },
    #[error("{file}: invalid PEM: {reason}")]
    Pem { file: PathBuf, reason: String },
    #[error("{file}: no usable private key: {reason}")]
    Key { file: PathBuf, reason: String },
    #[error("{key} is not the private key of the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("{file}: the certificate expired at {at} (unix seconds)")]
    Expired { file: PathBuf, at: i64 },
    #[error("{file}: the certificate is not valid before {at} (unix seconds)")]
    NotYetValid { file: PathBuf, at: i64 },
    #[error("{file}: {reason}")]
    Identity {
        file: PathBuf,
        reason: IdentityError,
    },
    #[error("{file}: trust bundle: {reason}")]
    Bundle { file: PathBuf, reason: String },
    #[error("TLS settings: {0}")]
    Config(String),
}

/// Where a TLS owner's files are, resolved against the manifest's directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub trust_bundle: PathBuf,
}

impl TlsFiles {
    pub fn resolve(cert: &Path, key: &Path, bundle: &Path, base: Option<&Path>) -> Self {
        let abs = |p: &Path| match base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p.to_path_buf(),
        };
        TlsFiles {
            cert: abs(cert),
            key: abs(key),
            trust_bundle: abs(bundle),
        }
    }

    pub fn paths(&self) -> [&Path; 3] {
        [&self.cert, &self.key, &self.trust_bundle]
    }
}

/// A loaded, checked certificate, key and trust bundle.
pub struct Material {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub roots: Arc<RootCertStore>,
    pub identity: SpiffeId,
    /// The leaf's serial number, hex.
    pub serial: String,
    pub not_after: i64,
    /// The earliest expiry among the bundle's CA certificates.
    pub bundle_not_after: i64,
}

fn read(file: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(file).map_err(|source| TlsError::Read {
        file: file.to_path_buf(),
        source,
    })
}

/// The PEM certificates in `file`; at least one. Also reads the OTLP exporter's files.
pub(crate) fn read_certs(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(file)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            file: file.to_path_buf(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            file: file.to_path_buf(),
        });
    }
    Ok(certs)
}

/// The private key in `key_file`, checked to be the key of `chain`'s leaf (read from
/// `cert_file`, named in the error). Also reads the OTLP exporter's client key.
pub(crate) fn read_key(
    chain: &[CertificateDer<'static>],
    cert_file: &Path,
    key_file: &Path,
) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bad_key = |reason: String| TlsError::Key {
        file: key_file.to_path_buf(),
        reason,
    };
    let pem = read(key_file)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| bad_key(e.to_string()))?;
    let signing = provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| bad_key(e.to_string()))?;
    match rustls::sign::CertifiedKey::new(chain.to_vec(), signing).keys_match() {
        Ok(()) => Ok(key),
        // Key types whose public key rustls cannot derive: let the handshake judge.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(key),
        Err(_) => Err(TlsError::KeyMismatch {
            cert: cert_file.to_path_buf(),
            key: key_file.to_path_buf(),
        }),
    }
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Serial and validity period of a certificate.
fn cert_facts(file: &Path, der: &CertificateDer<'_>) -> Result<(String, i64, i64), TlsError> {
    let (_, x) = x509_parser::parse_x509_certificate(der).map_err(|e| TlsError::Pem {
        file: file.to_path_buf(),
        reason: format!("not an X.509 certificate: {e}"),
    })?;
    Ok((
        hex::encode(x.tbs_certificate.raw_serial()),
        x.validity().not_before.timestamp(),
        x.validity().not_after.timestamp(),
    ))
}

/// Load and check a certificate chain, its key and a trust bundle: the key must match the
/// leaf, the leaf must be valid now and carry exactly one SPIFFE ID, the bundle must hold at
/// least one usable CA certificate.
pub fn load_material(files: &TlsFiles) -> Result<Material, TlsError> {
    let chain = read_certs(&files.cert)?;
    let leaf = &chain[0];
    let (serial, not_before, not_after) = cert_facts(&files.cert, leaf)?;
    let now = now_unix();
    if now > not_after {
        return Err(TlsError::Expired {
            file: files.cert.clone(),
            at: not_after,
        });
    }
    if now < not_before {
        return Err(TlsError::NotYetValid {
            file: files.cert.clone(),
            at: not_before,
        });
    }
    let identity = spiffe_id_of(leaf).map_err(|reason| TlsError::Identity {
        file: files.cert.clone(),
        reason,
    })?;

    let key = read_key(&chain, &files.cert, &files.key)?;

    let cas = read_certs(&files.trust_bundle)?;
    let mut roots = RootCertStore::empty();
    let mut bundle_not_after = i64::MAX;
    for ca in cas {
        let (_, _, na) = cert_facts(&files.trust_bundle, &ca)?;
        bundle_not_after = bundle_not_after.min(na);
        roots.add(ca).map_err(|e| TlsError::Bundle {
            file: files.trust_bundle.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(Material {
        chain,
        key,
        roots: Arc::new(roots),
        identity,
        serial,
        not_after,
        bundle_not_after,
    })
}

fn versions(min: TlsVersion) -> &'static [&'static rustls::SupportedProtocolVersion] {
    static BOTH: [&rustls::SupportedProtocolVersion; 2] =
        [&rustls::version::TLS13, &rustls::version::TLS12];
    static V13: [&rustls::SupportedProtocolVersion; 1] = [&rustls::version::TLS13];
    match min {
        TlsVersion::Tls12 => &BOTH,
        TlsVersion::Tls13 => &V13,
    }
}

fn allowed(ids: Option<&[String]>) -> Allowed {
    match ids {
        None => Allowed::Any,
        Some(ids) => Allowed::Only(ids.to_vec().into()),
    }
}

/// Build the rustls server config of a TLS listener from loaded material.
pub fn server_config(spec: &ListenerTlsSpec, m: &Material) -> Result<ServerConfig, TlsError> {
    let inner =
        rustls::server::WebPkiClientVerifier::builder_with_provider(m.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = SpiffeClientVerifier::new(inner, allowed(spec.allowed_identities.as_deref()));
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(spec.min_version))
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_single_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(cfg)
}

/// Build the rustls client config of a TLS cluster; ALPN offers the cluster's protocol.
pub fn client_config(
    spec: &ClusterTlsSpec,
    m: &Material,
    alpn: &[u8],
) -> Result<ClientConfig, TlsError> {
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(m.roots.clone(), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let verifier = SpiffeServerVerifier::new(inner, allowed(Some(&spec.allowed_identities)));
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(versions(spec.min_version))
        .map_err(|e| TlsError::Config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(m.chain.clone(), m.key.clone_key())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Ok(cfg)
}

/// What the rotation machinery needs from a TLS owner (a listener or a cluster).
pub trait Rotate: Send + Sync {
    /// `listener/NAME` or `cluster/NAME`, for logs and metric labels.
    fn owner(&self) -> &Arc<str>;
    fn files(&self) -> &TlsFiles;
    /// Load the files again and, if they are good, use them for new handshakes.
    fn reload(&self) -> Result<(), TlsError>;
}

/// Shared bookkeeping of [`ServerTls`] and [`ClientTls`]: the current certificate's facts,
/// its metrics and the result of each reload.
struct Current {
    owner: Arc<str>,
    files: TlsFiles,
    metrics: Arc<Metrics>,
    /// (serial, identity) of the certificate in use.
    facts: Mutex<(String, Arc<str>)>,
}

impl Current {
    fn new(owner: Arc<str>, files: TlsFiles, metrics: Arc<Metrics>, m: &Material) -> Self {
        let c = Current {
            owner,
            files,
            metrics,
            facts: Mutex::new((String::new(), Arc::from(""))),
        };
        c.record(m);
        c
    }

    fn record(&self, m: &Material) {
        for (kind, at) in [
            ("certificate", m.not_after),
            ("trust_bundle", m.bundle_not_after),
        ] {
            self.metrics
                .tls_cert_expiry
                .get_or_create(&TlsCertLabel {
                    owner: self.owner.clone(),
                    kind,
                })
                .set(at);
        }
        if let Ok(mut f) = self.facts.lock() {
            *f = (m.serial.clone(), intern(m.identity.as_str()));
        }
    }

    /// Load the files; on success hand the material to `apply` and record it, on failure
    /// keep what is in use. Either way the result is logged and counted.
    fn reload(
        &self,
        apply: impl FnOnce(&Material) -> Result<(), TlsError>,
    ) -> Result<(), TlsError> {
        let r = load_material(&self.files).and_then(|m| {
            apply(&m)?;
            Ok(m)
        });
        let result = match &r {
            Ok(m) => {
                tracing::info!(owner = %self.owner, serial = %m.serial, identity = %m.identity, not_after = m.not_after, "TLS certificate loaded; new handshakes use it");
                self.record(m);
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
        r.map(|_| ())
    }

    fn serial(&self) -> String {
        self.facts.lock().map(|f| f.0.clone()).unwrap_or_default()
    }

    fn identity(&self) -> Arc<str> {
        self.facts
            .lock()
            .map(|f| f.1.clone())
            .unwrap_or_else(|_| Arc::from(""))
    }
}

/// A TLS listener's server side: the current rustls config, swapped on rotation.
pub struct ServerTls {
    pub mode: TlsMode,
    spec: ListenerTlsSpec,
    config: ArcSwap<ServerConfig>,
    current: Current,
}

impl ServerTls {
    /// Load the listener's files and build its config (no watching yet: see [`watch::spawn`]).
    pub fn new(
        listener: &str,
        spec: &ListenerTlsSpec,
        base: Option<&Path>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, TlsError> {
        let files = TlsFiles::resolve(&spec.cert, &spec.key, &spec.trust_bundle, base);
        let m = load_material(&files)?;
        let cfg = server_config(spec, &m)?;
        Ok(Arc::new(ServerTls {
            mode: spec.mode,
            spec: spec.clone(),
            config: ArcSwap::from_pointee(cfg),
            current: Current::new(
                Arc::from(format!("listener/{listener}")),
                files,
                metrics,
                &m,
            ),
        }))
    }

    /// The acceptor for a new connection (the config in use right now).
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    /// Hex serial of the certificate new handshakes present.
    pub fn serial(&self) -> String {
        self.current.serial()
    }

    /// The SPIFFE ID of the certificate new handshakes present (interned, like peers').
    pub fn identity(&self) -> Arc<str> {
        self.current.identity()
    }

    pub fn same_spec(&self, spec: &ListenerTlsSpec) -> bool {
        &self.spec == spec
    }
}

impl Rotate for ServerTls {
    fn owner(&self) -> &Arc<str> {
        &self.current.owner
    }
    fn files(&self) -> &TlsFiles {
        &self.current.files
    }
    fn reload(&self) -> Result<(), TlsError> {
        self.current.reload(|m| {
            let cfg = server_config(&self.spec, m)?;
            self.config.store(Arc::new(cfg));
            Ok(())
        })
    }
}

/// A TLS cluster's client side: the current rustls config and the server name to send.
pub struct ClientTls {
    spec: ClusterTlsSpec,
    alpn: &'static [u8],
    config: ArcSwap<ClientConfig>,
    current: Current,
}

impl ClientTls {
    pub fn new(
        cluster: &str,
        spec: &ClusterTlsSpec,
        http2: bool,
        base: Option<&Path>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, TlsError> {
        let files = TlsFiles::resolve(&spec.cert, &spec.key, &spec.trust_bundle, base);
        let m = load_material(&files)?;
        let alpn: &'static [u8] = if http2 { b"h2" } else { b"http/1.1" };
        let cfg = client_config(spec, &m, alpn)?;
        Ok(Arc::new(ClientTls {
            spec: spec.clone(),
            alpn,
            config: ArcSwap::from_pointee(cfg),
            current: Current::new(Arc::from(format!("cluster/{cluster}")), files, metrics, &m),
        }))
    }

    /// The connector for a new connection (the config in use right now).
    pub fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.config.load_full())
    }

    /// The name sent as SNI: the configured `sni`, else the endpoint's IP (no SNI is sent
    /// for an IP address).
    pub fn server_name(&self, addr: std::net::SocketAddr) -> ServerName<'static> {
        self.spec
            .sni
            .as_deref()
            .and_then(|s| ServerName::try_from(s.to_string()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }

    pub fn serial(&self) -> String {
        self.current.serial()
    }
}

impl Rotate for ClientTls {
    fn owner(&self) -> &Arc<str> {
        &self.current.owner
    }
    fn files(&self) -> &TlsFiles {
        &self.current.files
    }
    fn reload(&self) -> Result<(), TlsError> {
        self.current.reload(|m| {
            let cfg = client_config(&self.spec, m, self.alpn)?;
            self.config.store(Arc::new(cfg));
            Ok(())
        })
    }
}

/// The `reason` label of a failed handshake, from the rustls error inside an I/O error.
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(e) => rustls_reason(e),
        None => match e.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            _ => "io",
        },
    }
}

fn rustls_reason(e: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature | C::UnknownRevocationStatus => "unknown_ca",
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
            C::Revoked => "revoked",
            C::Other(o) => match o.0.downcast_ref::<IdentityError>() {
                Some(ie) => ie.reason(),
                None => "bad_certificate",
            },
            _ => "bad_certificate",
        },
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::AlertReceived(_) => "peer_alert",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. }
        | rustls::Error::InvalidMessage(_) => "bad_message",
        _ => "other",
    }
}

/// The upstream's SPIFFE ID, put by the connection pool in the extensions of each response
/// that came over an mTLS connection (Istio's `destination_principal` on the caller's side).
#[derive(Clone, Debug)]
pub struct UpstreamIdentity(pub Arc<str>);

/// The peer's SPIFFE ID after a successful handshake (its verifier already checked it),
/// interned so equal identities share one `Arc` (the metrics cache keys on the pointer).
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Arc<str>> {
    let leaf = certs?.first()?;
    let id = spiffe_id_of(leaf).ok()?;
    Some(intern(id.as_str()))
}

fn intern(s: &str) -> Arc<str> {
    static IDS: OnceLock<Mutex<std::collections::HashMap<Box<str>, Arc<str>>>> = OnceLock::new();
    let map = IDS.get_or_init(Default::default);
    let Ok(mut m) = map.lock() else {
        return Arc::from(s);
    };
    if let Some(a) = m.get(s) {
        return a.clone();
    }
    let a: Arc<str> = Arc::from(s);
    // Bounded: a mesh has a handful of identities; past this they are simply not shared.
    if m.len() < 4096 {
        m.insert(Box::from(s), a.clone());
    }
    a
}

/// The first byte of a TLS connection: a handshake record (a ClientHello).
pub const TLS_HANDSHAKE_BYTE: u8 = 0x16;
