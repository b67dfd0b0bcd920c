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
}

impl Store {
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
        let svc = TraceServiceServer::new(Grpc(store.clone()));
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
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return reply(400, Bytes::new()),
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
