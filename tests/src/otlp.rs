//! A real OTLP trace receiver for the tracing tests, built on the official OpenTelemetry
//! protobuf definitions (`opentelemetry-proto`): the gRPC `TraceService` (what port 4317
//! serves) and OTLP/HTTP `POST /v1/traces` with protobuf bodies (port 4318). Both decode
//! what the proxy exports into [`ReceivedSpan`]s for assertions.
//!
//! Also a black-hole collector: accepts TCP connections and never answers.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One span as the collector received it, ids as lowercase hex.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    /// `opentelemetry_proto::tonic::trace::v1::span::SpanKind` as a number (2 SERVER,
    /// 3 CLIENT, 1 INTERNAL).
    pub kind: i32,
    pub attributes: HashMap<String, String>,
    /// 0 unset, 1 ok, 2 error.
    pub status_code: i32,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    /// The resource's `service.name`.
    pub service_name: String,
}

pub const KIND_INTERNAL: i32 = 1;
pub const KIND_SERVER: i32 = 2;
pub const KIND_CLIENT: i32 = 3;

impl ReceivedSpan {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

fn value_text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), value_text(&kv.value)))
        .collect()
}

#[derive(Default)]
struct Store {
    spans: Mutex<Vec<ReceivedSpan>>,
    requests: Mutex<usize>,
    /// Export requests that came gzipped.
    gzipped: Mutex<usize>,
}

impl Store {
    fn count_gzipped(&self) {
        if let Ok(mut n) = self.gzipped.lock() {
            *n += 1;
        }
    }

    fn add(&self, req: ExportTraceServiceRequest) {
        let mut out = Vec::new();
        for rs in req.resource_spans {
            let service_name = rs
                .resource
                .as_ref()
                .map(|r| attrs(&r.attributes))
                .and_then(|a| a.get("service.name").cloned())
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    out.push(ReceivedSpan {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        name: s.name.clone(),
                        kind: s.kind,
                        attributes: attrs(&s.attributes),
                        status_code: s.status.as_ref().map_or(0, |st| st.code),
                        start_unix_nano: s.start_time_unix_nano,
                        end_unix_nano: s.end_time_unix_nano,
                        service_name: service_name.clone(),
                    });
                }
            }
        }
        if let Ok(mut n) = self.requests.lock() {
            *n += 1;
        }
        if let Ok(mut spans) = self.spans.lock() {
            spans.extend(out);
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct Grpc(Arc<Store>);

#[tonic::async_trait]
impl TraceService for Grpc {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if request
            .metadata()
            .get("grpc-encoding")
            .is_some_and(|v| v == "gzip")
        {
            self.0.count_gzipped();
        }
        self.0.add(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// A collector on `127.0.0.1:0` that keeps every span it receives.
pub struct OtlpReceiver {
    addr: SocketAddr,
    store: Arc<Store>,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    /// OTLP/gRPC (`TraceService/Export`).
    pub async fn grpc() -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP gRPC receiver");
        let addr = listener.local_addr().expect("local addr");
        let store = Arc::new(Store::default());
        // Accepts gzipped requests, as collectors do.
        let svc = TraceServiceServer::new(Grpc(store.clone()))
            .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        OtlpReceiver { addr, store, task }
    }

    /// OTLP/HTTP: `POST /v1/traces` with an `application/x-protobuf` body.
    pub async fn http() -> OtlpReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP HTTP receiver");
        let addr = listener.local_addr().expect("local addr");
        let store = Arc::new(Store::default());
        let s = store.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, std::convert::Infallible>(http_export(&s, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        OtlpReceiver { addr, store, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR`, for the manifest's `tracing.endpoint` or `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.store
            .spans
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Export requests received so far.
    pub fn export_requests(&self) -> usize {
        self.store.requests.lock().map(|n| *n).unwrap_or_default()
    }

    /// Export requests received gzipped (`grpc-encoding: gzip`, `Content-Encoding: gzip`).
    pub fn gzipped_requests(&self) -> usize {
        self.store.gzipped.lock().map(|n| *n).unwrap_or_default()
    }

    /// Wait until the received spans satisfy `done` (polls every 20 ms; panics after
    /// `timeout` with what arrived).
    pub async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&[ReceivedSpan]) -> bool,
    ) -> Vec<ReceivedSpan> {
        crate::eventually_or(
            timeout,
            what,
            || {
                let spans = self.spans();
                let ok = done(&spans);
                async move { ok.then_some(spans) }
            },
            || format!("received spans: {:#?}", self.spans()),
        )
        .await
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn http_export(store: &Store, req: hyper::Request<Incoming>) -> hyper::Response<Full<Bytes>> {
    let reply = |status: u16, body: Bytes| {
        let mut r = hyper::Response::new(Full::new(body));
        *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or_default();
        r.headers_mut().insert(
            hyper::header::CONTENT_TYPE,
            hyper::header::HeaderValue::from_static("application/x-protobuf"),
        );
        r
    };
    if req.method() != hyper::Method::POST || req.uri().path() != "/v1/traces" {
        return reply(404, Bytes::new());
    }
    let gzipped = req
        .headers()
        .get(hyper::header::CONTENT_ENCODING)
        .is_some_and(|v| v == "gzip");
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(400, Bytes::new()),
    };
    let body = if gzipped {
        use std::io::Read as _;
        let mut out = Vec::new();
        if flate2::read::GzDecoder::new(&body[..])
            .read_to_end(&mut out)
            .is_err()
        {
            return reply(400, Bytes::new());
        }
        store.count_gzipped();
        Bytes::from(out)
    } else {
        body
    };
    match ExportTraceServiceRequest::decode(body) {
        Ok(r) => {
            store.add(r);
            let resp = ExportTraceServiceResponse {
                partial_success: None,
            };
            reply(200, Bytes::from(resp.encode_to_vec()))
        }
        Err(_) => reply(400, Bytes::new()),
    }
}

/// A collector that accepts connections and never answers (nor reads): the worst kind of
/// down. Connections are held until the value is dropped.
pub struct BlackHole {
    addr: SocketAddr,
    accepted: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    pub async fn start() -> BlackHole {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the black hole");
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(Mutex::new(0));
        let a = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                if let Ok(mut n) = a.lock() {
                    *n += 1;
                }
                held.push(s);
            }
        });
        BlackHole {
            addr,
            accepted,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.lock().map(|n| *n).unwrap_or_default()
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A private PKI for a TLS collector: a CA, a certificate for `127.0.0.1` (and
/// `localhost`), and a client certificate, all made with rcgen in a temporary directory.
pub struct CollectorPki {
    pub ca: std::path::PathBuf,
    pub server: crate::mtls::CertFiles,
    pub client: crate::mtls::CertFiles,
}

impl CollectorPki {
    pub fn new(tag: &str) -> CollectorPki {
        let dir = crate::proxy::temp_dir(tag);
        let ca_key = rcgen::KeyPair::generate().expect("CA key");
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "collector test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA cert");
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, ca_cert.pem()).expect("write CA");
        let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key).expect("issuer");
        let issue = |name: &str, sans: Vec<rcgen::SanType>, usage| {
            let key = rcgen::KeyPair::generate().expect("key");
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = sans;
            params.extended_key_usages = vec![usage];
            let cert = params.signed_by(&key, &issuer).expect("sign");
            let files = crate::mtls::CertFiles {
                cert: dir.join(format!("{name}.pem")),
                key: dir.join(format!("{name}.key")),
            };
            std::fs::write(&files.cert, cert.pem()).expect("write cert");
            std::fs::write(&files.key, key.serialize_pem()).expect("write key");
            files
        };
        let server = issue(
            "collector",
            vec![
                rcgen::SanType::IpAddress(std::net::IpAddr::from([127, 0, 0, 1])),
                rcgen::SanType::DnsName("localhost".try_into().expect("dns")),
            ],
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        );
        let client = issue(
            "exporter",
            vec![rcgen::SanType::DnsName(
                "exporter.local".try_into().expect("dns"),
            )],
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        );
        CollectorPki { ca, server, client }
    }

    /// The collector's TLS config; `client_auth`: require a client certificate from the CA.
    fn server_config(&self, client_auth: bool, alpn: &[u8]) -> Arc<rustls::ServerConfig> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&self.server.cert)
            .expect("server cert")
            .collect::<Result<_, _>>()
            .expect("server cert");
        let key = PrivateKeyDer::from_pem_file(&self.server.key).expect("server key");
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions");
        let builder = if client_auth {
            let mut roots = rustls::RootCertStore::empty();
            for ca in CertificateDer::pem_file_iter(&self.ca).expect("ca") {
                roots.add(ca.expect("ca")).expect("add ca");
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .expect("client verifier");
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let mut config = builder.with_single_cert(chain, key).expect("server config");
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }
}

/// A TLS connection accepted by a test collector.
struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();
    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl tokio::io::AsyncRead for TlsConn {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConn {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accept TLS connections on `listener` into a channel, counting handshakes that
/// completed and those whose client presented a certificate.
fn accept_tls(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    handshakes: Arc<Mutex<(usize, usize)>>,
) -> (
    tokio::sync::mpsc::Receiver<TlsConn>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx, handshakes) = (acceptor.clone(), tx.clone(), handshakes.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                if let Ok(mut h) = handshakes.lock() {
                    h.0 += 1;
                    if tls.get_ref().1.peer_certificates().is_some() {
                        h.1 += 1;
                    }
                }
                let _ = tx.send(TlsConn(tls)).await;
            });
        }
    });
    (rx, task)
}

/// A collector behind TLS (see [`OtlpReceiver::grpc_tls`]).
pub struct TlsReceiver {
    pub receiver: OtlpReceiver,
    handshakes: Arc<Mutex<(usize, usize)>>,
    accept: tokio::task::JoinHandle<()>,
}

impl TlsReceiver {
    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.receiver.addr)
    }

    /// TLS handshakes completed, and how many of them with a client certificate.
    pub fn handshakes(&self) -> (usize, usize) {
        self.handshakes.lock().map(|h| *h).unwrap_or_default()
    }
}

impl Drop for TlsReceiver {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl OtlpReceiver {
    /// OTLP/gRPC over TLS with the PKI's collector certificate (ALPN `h2`);
    /// `client_auth`: the exporter must present a certificate from the PKI's CA.
    pub async fn grpc_tls(pki: &CollectorPki, client_auth: bool) -> TlsReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP gRPC TLS receiver");
        let addr = listener.local_addr().expect("local addr");
        let store = Arc::new(Store::default());
        let handshakes = Arc::new(Mutex::new((0, 0)));
        let (rx, accept) = accept_tls(
            listener,
            pki.server_config(client_auth, b"h2"),
            handshakes.clone(),
        );
        let incoming = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|c| (Ok::<_, std::io::Error>(c), rx))
        });
        let svc = TraceServiceServer::new(Grpc(store.clone()));
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        });
        TlsReceiver {
            receiver: OtlpReceiver { addr, store, task },
            handshakes,
            accept,
        }
    }

    /// OTLP/HTTP over TLS (ALPN `http/1.1`), as [`OtlpReceiver::grpc_tls`].
    pub async fn http_tls(pki: &CollectorPki, client_auth: bool) -> TlsReceiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the OTLP HTTP TLS receiver");
        let addr = listener.local_addr().expect("local addr");
        let store = Arc::new(Store::default());
        let handshakes = Arc::new(Mutex::new((0, 0)));
        let (mut rx, accept) = accept_tls(
            listener,
            pki.server_config(client_auth, b"http/1.1"),
            handshakes.clone(),
        );
        let s = store.clone();
        let task = tokio::spawn(async move {
            while let Some(conn) = rx.recv().await {
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let s = s.clone();
                        async move { Ok::<_, std::convert::Infallible>(http_export(&s, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(conn.0), svc)
                        .await;
                });
            }
        });
        TlsReceiver {
            receiver: OtlpReceiver { addr, store, task },
            handshakes,
            accept,
        }
    }
}
