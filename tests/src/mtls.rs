//! mTLS scenarios: a mesh CA made by the real `wasmesh ca`, workload certificates issued by
//! it, certificates no well-behaved CA would issue (expired, without a SPIFFE ID), and a raw
//! mTLS client that reports the handshake's outcome and the server's certificate serial.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// A mesh CA in a temporary directory, made by `wasmesh ca init`.
pub struct MeshCa {
    pub dir: PathBuf,
}

/// A certificate and its key on disk.
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Run the real `wasmesh` binary with `args`; its stdout, or a panic with its stderr.
pub fn wasmesh(args: &[&str]) -> String {
    let out = Command::new(crate::binary::wasmesh_bin())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run wasmesh {args:?}: {e}"));
    assert!(
        out.status.success(),
        "wasmesh {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl MeshCa {
    /// `wasmesh ca init --dir TMP`.
    pub fn init(tag: &str) -> MeshCa {
        let dir = crate::proxy::temp_dir(tag);
        wasmesh(&["ca", "init", "--dir", &dir.display().to_string(), "--force"]);
        MeshCa { dir }
    }

    /// The CA certificate: every proxy's trust bundle.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// `wasmesh ca issue --spiffe-id ID --out DIR/NAME`.
    pub fn issue(&self, name: &str, spiffe_id: &str) -> CertFiles {
        let out = self.dir.join(name);
        wasmesh(&[
            "ca",
            "issue",
            "--dir",
            &self.dir.display().to_string(),
            "--spiffe-id",
            spiffe_id,
            "--out",
            &out.display().to_string(),
        ]);
        CertFiles {
            cert: out.with_extension("crt"),
            key: out.with_extension("key"),
        }
    }

    /// A certificate signed by this CA that `wasmesh ca` would never issue: `uri` as its
    /// URI SAN (or a DNS name only, with `None`), valid from `not_before` to `not_after`
    /// seconds from now (negative: in the past).
    pub fn craft(
        &self,
        name: &str,
        uri: Option<&str>,
        not_before: i64,
        not_after: i64,
    ) -> CertFiles {
        let ca_pem = std::fs::read_to_string(self.bundle()).expect("ca.crt");
        let ca_key = std::fs::read_to_string(self.dir.join("ca.key")).expect("ca.key");
        let ca_key = rcgen::KeyPair::from_pem(&ca_key).expect("CA key");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key).expect("CA cert");
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = match uri {
            Some(u) => vec![rcgen::SanType::URI(u.try_into().expect("uri"))],
            None => vec![rcgen::SanType::DnsName(
                "workload.local".try_into().expect("dns"),
            )],
        };
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = std::time::SystemTime::now();
        let at = |s: i64| {
            if s >= 0 {
                now + Duration::from_secs(s as u64)
            } else {
                now - Duration::from_secs((-s) as u64)
            }
        };
        params.not_before = at(not_before).into();
        params.not_after = at(not_after).into();
        let cert = params.signed_by(&key, &issuer).expect("sign");
        let files = CertFiles {
            cert: self.dir.join(format!("{name}.crt")),
            key: self.dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.key, key.serialize_pem()).expect("write key");
        std::fs::write(&files.cert, cert.pem()).expect("write cert");
        files
    }
}

/// A listener `tls` block.
pub fn listener_tls(mode: &str, c: &CertFiles, bundle: &Path) -> serde_json::Value {
    serde_json::json!({"mode": mode, "cert": c.cert, "key": c.key, "trust_bundle": bundle})
}

/// A cluster `tls` block allowing `ids`.
pub fn cluster_tls(c: &CertFiles, bundle: &Path, ids: &[&str]) -> serde_json::Value {
    serde_json::json!({"cert": c.cert, "key": c.key, "trust_bundle": bundle, "allowed_identities": ids})
}

/// What a raw mTLS exchange saw.
#[derive(Debug)]
pub struct TlsOutcome {
    /// The HTTP status, if a response came back.
    pub status: Option<u16>,
    /// The server certificate's serial (hex), if the handshake got that far.
    pub server_serial: Option<String>,
    pub error: Option<String>,
}

/// Trusts any server certificate (the refusal tests look at what the *server* refuses) and
/// records the serial it presented.
#[derive(Debug)]
struct RecordingVerifier {
    serial: std::sync::Mutex<Option<String>>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _i: &[rustls::pki_types::CertificateDer<'_>],
        _n: &rustls::pki_types::ServerName<'_>,
        _o: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if let Ok((_, x)) = x509_parser::parse_x509_certificate(end_entity) {
            if let Ok(mut s) = self.serial.lock() {
                *s = Some(hex(x.tbs_certificate.raw_serial()));
            }
        }
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            m,
            c,
            d,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The serial (hex) of the certificate in a PEM file.
pub fn serial_of(cert: &Path) -> String {
    let pem = std::fs::read(cert).expect("read cert");
    let der = rustls::pki_types::pem::PemObject::from_pem_slice(&pem)
        .map(|d: rustls::pki_types::CertificateDer<'static>| d)
        .expect("PEM certificate");
    let (_, x) = x509_parser::parse_x509_certificate(&der).expect("X.509");
    hex(x.tbs_certificate.raw_serial())
}

/// Connect to `addr` with mTLS, presenting `client` (or no certificate), and send one
/// HTTP/1.1 `GET path`.
pub async fn mtls_get(addr: SocketAddr, client: Option<&CertFiles>, path: &str) -> TlsOutcome {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(RecordingVerifier {
        serial: std::sync::Mutex::new(None),
        provider: provider.clone(),
    });
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier.clone());
    let mut cfg = match client {
        Some(c) => {
            let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&c.cert)
                .expect("cert")
                .collect::<Result<_, _>>()
                .expect("cert PEM");
            let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&c.key).expect("key");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let serial = || verifier.serial.lock().ok().and_then(|s| s.clone());
    let result = tokio::time::timeout(Duration::from_secs(10), async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: mesh\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .map_err(|e| format!("write: {e}"))?;
        let mut buf = Vec::new();
        // TLS 1.3: a client certificate the server refuses shows up here, as an alert.
        let read = tls.read_to_end(&mut buf).await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        let status = text
            .strip_prefix("HTTP/1.1 ")
            .and_then(|r| r.get(..3))
            .and_then(|s| s.parse::<u16>().ok());
        match (status, read) {
            (Some(s), _) => Ok(s),
            (None, Err(e)) => Err(format!("read: {e}")),
            (None, Ok(_)) => Err("connection closed without a response".to_string()),
        }
    })
    .await
    .unwrap_or_else(|_| Err("timed out".into()));
    match result {
        Ok(s) => TlsOutcome {
            status: Some(s),
            server_serial: serial(),
            error: None,
        },
        Err(e) => TlsOutcome {
            status: None,
            server_serial: serial(),
            error: Some(e),
        },
    }
}

/// A TLS server that requires a client certificate chaining to `bundle`, records each
/// client's leaf serial, and answers every connection with one `200 ok` and a close (so
/// each request through a proxy is a new handshake).
pub struct ClientCertRecorder {
    pub addr: SocketAddr,
    serials: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl ClientCertRecorder {
    pub async fn start(server: &CertFiles, bundle: &Path) -> ClientCertRecorder {
        use rustls::pki_types::pem::PemObject;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_file_iter(bundle).expect("bundle") {
            roots.add(c.expect("PEM")).expect("root");
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .expect("client verifier");
        let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&server.cert)
            .expect("cert")
            .collect::<Result<_, _>>()
            .expect("PEM");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&server.key).expect("key");
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .expect("server config");
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let serials = Arc::new(std::sync::Mutex::new(Vec::new()));
        let rec = serials.clone();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                let rec = rec.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let serial = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first().cloned())
                        .and_then(|leaf| {
                            x509_parser::parse_x509_certificate(&leaf)
                                .ok()
                                .map(|(_, x)| hex(x.tbs_certificate.raw_serial()))
                        });
                    if let (Some(s), Ok(mut r)) = (serial, rec.lock()) {
                        r.push(s);
                    }
                    let mut buf = vec![0u8; 8192];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(buf.get(..n).unwrap_or_default()),
                        }
                    }
                    let _ = tls
                        .write_all(
                            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                        )
                        .await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        ClientCertRecorder {
            addr,
            serials,
            task,
        }
    }

    /// The client serials seen, in order.
    pub fn serials(&self) -> Vec<String> {
        self.serials.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

impl Drop for ClientCertRecorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}
