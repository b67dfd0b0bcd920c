//! TLS to the OTLP collector, for `https://` endpoints: whom to trust (a CA file from the
//! manifest or `OTEL_EXPORTER_OTLP_CERTIFICATE`, else the system's trusted CAs), a client
//! certificate for collectors that ask for one, and one connector that both tonic
//! (OTLP/gRPC) and hyper's client (OTLP/HTTP) dial with.

use crate::config::CollectorTlsSpec;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;

/// The effective collector TLS settings (the manifest's, under the `OTEL_*` variables).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CollectorTls {
    pub ca_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub server_name: Option<String>,
}

impl CollectorTls {
    pub fn from_spec(spec: &CollectorTlsSpec) -> Self {
        Self {
            ca_file: spec.ca_file.clone(),
            cert_file: spec.cert_file.clone(),
            key_file: spec.key_file.clone(),
            server_name: spec.server_name.clone(),
        }
    }
}

/// What is wrong with the collector TLS settings: the field (as in `tracing.tls.FIELD`) and
/// the problem, naming the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("tracing.tls.{field}: {message}")]
pub struct TlsSettingsError {
    pub field: &'static str,
    pub message: String,
}

fn bad(field: &'static str, message: impl Into<String>) -> TlsSettingsError {
    TlsSettingsError {
        field,
        message: message.into(),
    }
}

fn read_certs(
    field: &'static str,
    file: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSettingsError> {
    crate::tls::read_certs(file).map_err(|e| bad(field, e.to_string()))
}

/// Trusted roots: the CA file's certificates, or the system's.
fn roots(tls: &CollectorTls) -> Result<RootCertStore, TlsSettingsError> {
    let mut roots = RootCertStore::empty();
    match &tls.ca_file {
        Some(file) => {
            for ca in read_certs("ca_file", file)? {
                roots
                    .add(ca)
                    .map_err(|e| bad("ca_file", format!("{}: {e}", file.display())))?;
            }
        }
        None => {
            // Certificates the system store holds but webpki cannot use are skipped.
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(bad(
                    "ca_file",
                    "no trusted CA certificates found on this system: give one \
                     (or OTEL_EXPORTER_OTLP_CERTIFICATE)",
                ));
            }
        }
    }
    Ok(roots)
}

/// The client certificate chain and key, when both are given.
#[allow(clippy::type_complexity)]
fn client_cert(
    tls: &CollectorTls,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsSettingsError> {
    match (&tls.cert_file, &tls.key_file) {
        (None, None) => Ok(None),
        (Some(_), None) => Err(bad("key_file", "cert_file needs its key_file")),
        (None, Some(_)) => Err(bad("cert_file", "key_file needs its cert_file")),
        (Some(cert), Some(key)) => {
            let chain = read_certs("cert_file", cert)?;
            let key_der = crate::tls::read_key(&chain, cert, key)
                .map_err(|e| bad("key_file", e.to_string()))?;
            Ok(Some((chain, key_der)))
        }
    }
}

fn server_name(tls: &CollectorTls) -> Result<Option<ServerName<'static>>, TlsSettingsError> {
    tls.server_name
        .as_deref()
        .map(|n| {
            ServerName::try_from(n.to_string())
                .map_err(|e| bad("server_name", format!("`{n}`: {e}")))
        })
        .transpose()
}

/// Check the files the settings name (not the system's store): for `wasmesh check` and
/// the manifest's validation.
pub fn check_files(tls: &CollectorTls) -> Result<(), TlsSettingsError> {
    if let Some(file) = &tls.ca_file {
        read_certs("ca_file", file)?;
    }
    client_cert(tls)?;
    server_name(tls)?;
    Ok(())
}

/// The rustls client configuration for the collector, offering `alpn` (`h2` for gRPC,
/// `http/1.1` for OTLP/HTTP).
pub fn client_config(
    tls: &CollectorTls,
    alpn: &[u8],
) -> Result<Arc<ClientConfig>, TlsSettingsError> {
    let builder = ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("ca_file", e.to_string()))?
        .with_root_certificates(roots(tls)?);
    let mut config = match client_cert(tls)? {
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|e| bad("key_file", e.to_string()))?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(Arc::new(config))
}

/// The TLS files as last seen (modification time and size of each), so the exporter can
/// rebuild its connector when they are rotated (cert-manager, SPIRE and Kubernetes
/// secret mounts all replace the files in place), without a restart.
pub struct FilesWatch {
    files: Vec<PathBuf>,
    /// What the connector in use was built from.
    current: Vec<Option<(std::time::SystemTime, u64)>>,
    /// A change that could not be used (logged once, retried at the next change).
    failed: Option<Vec<Option<(std::time::SystemTime, u64)>>>,
    next_look: std::time::Instant,
}

impl FilesWatch {
    /// Files looked at no more often than this.
    const EVERY: Duration = Duration::from_secs(1);

    pub fn new(tls: &CollectorTls) -> Self {
        let files: Vec<PathBuf> = [&tls.ca_file, &tls.cert_file, &tls.key_file]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        let current = Self::stamp(&files);
        Self {
            files,
            current,
            failed: None,
            next_look: std::time::Instant::now() + Self::EVERY,
        }
    }

    fn stamp(files: &[PathBuf]) -> Vec<Option<(std::time::SystemTime, u64)>> {
        files
            .iter()
            .map(|f| {
                let m = std::fs::metadata(f).ok()?;
                Some((m.modified().ok()?, m.len()))
            })
            .collect()
    }

    /// At most once a second: `Some(stamp)` when the files changed since the connector in
    /// use was built (and not to a state that already failed). Pass it to
    /// [`FilesWatch::applied`] or [`FilesWatch::rejected`].
    pub fn poll(&mut self) -> Option<Vec<Option<(std::time::SystemTime, u64)>>> {
        if self.files.is_empty() {
            return None;
        }
        let now = std::time::Instant::now();
        if now < self.next_look {
            return None;
        }
        self.next_look = now + Self::EVERY;
        let stamp = Self::stamp(&self.files);
        (stamp != self.current && self.failed.as_ref() != Some(&stamp)).then_some(stamp)
    }

    /// The files of `stamp` now serve.
    pub fn applied(&mut self, stamp: Vec<Option<(std::time::SystemTime, u64)>>) {
        self.current = stamp;
        self.failed = None;
    }

    /// The files of `stamp` could not be used (e.g. a certificate written before its key):
    /// keep the old connector until they change again.
    pub fn rejected(&mut self, stamp: Vec<Option<(std::time::SystemTime, u64)>>) {
        self.failed = Some(stamp);
    }
}

/// Dials the collector: TCP, then TLS, within `timeout`.
#[derive(Clone)]
pub struct Connector {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
    timeout: Duration,
}

impl Connector {
    pub fn new(
        tls: &CollectorTls,
        alpn: &[u8],
        timeout: Duration,
    ) -> Result<Self, TlsSettingsError> {
        Ok(Self {
            config: client_config(tls, alpn)?,
            server_name: server_name(tls)?,
            timeout,
        })
    }
}

impl tower_service::Service<http::Uri> for Connector {
    type Response = TlsIo;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TlsIo>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
            let host = uri
                .host()
                .ok_or_else(|| invalid(format!("`{uri}` has no host")))?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(443);
            let name = match this.server_name {
                Some(n) => n,
                None => ServerName::try_from(host.clone())
                    .map_err(|e| invalid(format!("`{host}`: {e}")))?,
            };
            let connect = async {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                let _ = tcp.set_nodelay(true);
                tokio_rustls::TlsConnector::from(this.config)
                    .connect(name, tcp)
                    .await
            };
            let tls = tokio::time::timeout(this.timeout, connect)
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS connect timed out"))??;
            Ok(TlsIo(TokioIo::new(tls)))
        })
    }
}

/// A TLS connection to the collector, as hyper's I/O.
pub struct TlsIo(TokioIo<tokio_rustls::client::TlsStream<TcpStream>>);

impl Connection for TlsIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str, text: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("wasmesh-collector-tls-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let p = dir.join(name);
        std::fs::write(&p, text).expect("write");
        p
    }

    #[test]
    fn rotations_are_seen_once_and_a_rejected_state_is_not_retried() {
        let ca = temp("watch-ca.pem", "one");
        let tls = CollectorTls {
            ca_file: Some(ca.clone()),
            ..Default::default()
        };
        let mut w = FilesWatch::new(&tls);
        let look = |w: &mut FilesWatch| {
            w.next_look = std::time::Instant::now();
            w.poll()
        };
        assert!(look(&mut w).is_none(), "nothing changed");
        std::fs::write(&ca, "two, longer").expect("write");
        let stamp = look(&mut w).expect("a change");
        w.rejected(stamp);
        assert!(
            look(&mut w).is_none(),
            "the same unusable files are not tried again"
        );
        std::fs::write(&ca, "three, longer still").expect("write");
        let stamp = look(&mut w).expect("another change");
        w.applied(stamp);
        assert!(look(&mut w).is_none(), "applied");
        // Not more often than once a second.
        std::fs::write(&ca, "four").expect("write");
        assert!(w.poll().is_none());
    }

    #[test]
    fn files_are_checked_and_named() {
        let missing = CollectorTls {
            ca_file: Some(PathBuf::from("/nonexistent/ca.pem")),
            ..Default::default()
        };
        let e = check_files(&missing).expect_err("missing file");
        assert_eq!(e.field, "ca_file");
        assert!(e.message.contains("/nonexistent/ca.pem"), "{e}");

        let empty = CollectorTls {
            ca_file: Some(temp("empty.pem", "no certificates here\n")),
            ..Default::default()
        };
        let e = check_files(&empty).expect_err("no certificate");
        assert!(e.message.contains("no PEM certificate"), "{e}");

        let half = CollectorTls {
            cert_file: Some(PathBuf::from("client.pem")),
            ..Default::default()
        };
        assert_eq!(check_files(&half).expect_err("half").field, "key_file");

        let ca =
            rcgen::generate_simple_self_signed(vec!["collector.local".to_string()]).expect("cert");
        let ok = CollectorTls {
            ca_file: Some(temp("ca.pem", &ca.cert.pem())),
            cert_file: Some(temp("client.pem", &ca.cert.pem())),
            key_file: Some(temp("client.key", &ca.signing_key.serialize_pem())),
            server_name: Some("collector.local".to_string()),
        };
        check_files(&ok).expect("usable files");
        let config = client_config(&ok, b"h2").expect("config");
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);

        let wrong_key = rcgen::KeyPair::generate().expect("key");
        let mismatch = CollectorTls {
            key_file: Some(temp("other.key", &wrong_key.serialize_pem())),
            ..ok
        };
        assert_eq!(
            check_files(&mismatch).expect_err("mismatch").field,
            "key_file"
        );
    }
}
