//! OpenTelemetry traces: a SERVER span per inbound request, a CLIENT span per upstream
//! attempt, a child span per filter hook, exported over OTLP (gRPC or HTTP/protobuf).
//!
//! What this module owns:
//! - the effective settings: the manifest's `tracing` section with the standard `OTEL_*`
//!   environment variables on top ([`Settings::resolve`]);
//! - trace context propagation: W3C `traceparent`/`tracestate` (and B3) read from the
//!   request, written into the upstream request with the CLIENT span as parent;
//! - the export path: finished spans go into a bounded queue ([`QueueProcessor`]); one
//!   exporter thread with its own Tokio runtime batches them to the collector. A full queue
//!   drops the span and counts it (`wasmesh_tracing_spans_dropped_total`), as does a batch
//!   the collector refuses or does not answer within `export_timeout`: the request path
//!   never waits on the collector.
//!
//! What it must not do: block or allocate much on a worker thread when tracing is off
//! ([`Tracing::off`] makes every call here a branch on `None`), or hold up a request when
//! the collector is slow.

use crate::config::{OtlpProtocol, TracingSpec};
use crate::error::ProxyError;
use crate::telemetry::metrics::Metrics;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::resource::{Resource, TelemetryResourceDetector};
use opentelemetry_sdk::trace::{
    Sampler, SdkTracer, SdkTracerProvider, Span as SdkSpan, SpanData, SpanExporter as _,
    SpanProcessor,
};
use opentelemetry_semantic_conventions::attribute as semconv;
use prometheus_client::metrics::counter::Counter;
use std::borrow::Cow;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{mpsc, watch};

/// wasmesh's own span attributes (no OpenTelemetry convention covers them).
pub mod attr {
    pub const ROUTE: &str = "wasmesh.route";
    pub const CLUSTER: &str = "wasmesh.cluster";
    pub const RESPONSE_FLAGS: &str = "wasmesh.response_flags";
    pub const UPSTREAM: &str = "wasmesh.upstream";
    pub const FILTER_NAME: &str = "wasmesh.filter.name";
    pub const FILTER_VERSION: &str = "wasmesh.filter.version";
    pub const FILTER_HOOK: &str = "wasmesh.filter.hook";
}

static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
static B3: HeaderName = HeaderName::from_static("b3");
static B3_TRACE: HeaderName = HeaderName::from_static("x-b3-traceid");
static B3_SPAN: HeaderName = HeaderName::from_static("x-b3-spanid");
static B3_PARENT: HeaderName = HeaderName::from_static("x-b3-parentspanid");
static B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum TracingError {
    #[error("{var}: {problem}")]
    Env { var: &'static str, problem: String },
    #[error("tracing: cannot build the OTLP exporter: {0}")]
    Exporter(String),
    #[error("tracing: cannot start the exporter thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// The effective tracing settings: the manifest's, with `OTEL_*` variables applied.
#[derive(Debug, Clone)]
pub struct Settings {
    pub endpoint: String,
    pub protocol: OtlpProtocol,
    pub headers: Vec<(String, String)>,
    pub resource: Resource,
    pub sampler: Sampler,
    pub max_queue_size: usize,
    pub batch_size: usize,
    pub batch_delay: Duration,
    pub export_timeout: Duration,
}

/// Check an endpoint as the manifest gives it: an `http://` or `https://` URL with a host.
pub fn check_endpoint(e: &str) -> Result<(), String> {
    let uri = http::Uri::from_str(e).map_err(|err| format!("`{e}` is not a URL: {err}"))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(format!("`{e}` must start with http:// or https://")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("`{e}` has no host"));
    }
    Ok(())
}

/// An OTLP/HTTP URL for a base endpoint (spec: the generic endpoint gets `v1/traces`).
fn http_traces_url(base: &str) -> String {
    format!("{}/v1/traces", base.trim_end_matches('/'))
}

impl Settings {
    /// The manifest's section (if any) under the environment, as the OpenTelemetry
    /// specification describes the variables, with the variables winning over the
    /// manifest. `None`: tracing is off. `env` is `std::env::var` outside tests.
    pub fn resolve(
        spec: Option<&TracingSpec>,
        workload: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TracingError> {
        let var = |name: &str| {
            env(name)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
            || var("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
        {
            return Ok(None);
        }
        let env_traces_endpoint = var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        let env_endpoint = var("OTEL_EXPORTER_OTLP_ENDPOINT");
        let from_env = env_traces_endpoint.is_some() || env_endpoint.is_some();
        // An endpoint in the environment turns export on for any manifest.
        let default_spec = TracingSpec::default();
        let spec = match spec {
            Some(s) if s.enabled || from_env => s,
            Some(_) => return Ok(None),
            None if from_env => &default_spec,
            None => return Ok(None),
        };

        let protocol = match var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
            .map(|v| ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", v))
            .or_else(|| {
                var("OTEL_EXPORTER_OTLP_PROTOCOL").map(|v| ("OTEL_EXPORTER_OTLP_PROTOCOL", v))
            }) {
            None => spec.protocol,
            Some((_, v)) if v == "grpc" => OtlpProtocol::Grpc,
            Some((_, v)) if v == "http/protobuf" => OtlpProtocol::HttpProtobuf,
            Some((name, v)) => {
                return Err(TracingError::Env {
                    var: if name == "OTEL_EXPORTER_OTLP_PROTOCOL" {
                        "OTEL_EXPORTER_OTLP_PROTOCOL"
                    } else {
                        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
                    },
                    problem: format!("`{v}` is not supported: use `grpc` or `http/protobuf`"),
                })
            }
        };
        let endpoint = match (env_traces_endpoint, env_endpoint, &spec.endpoint) {
            // The per-signal variable is the full URL; the generic one is a base URL.
            (Some(e), _, _) => e,
            (None, Some(e), _) => match protocol {
                OtlpProtocol::Grpc => e,
                OtlpProtocol::HttpProtobuf => http_traces_url(&e),
            },
            (None, None, Some(e)) => match protocol {
                OtlpProtocol::Grpc => e.clone(),
                OtlpProtocol::HttpProtobuf => {
                    let has_path = http::Uri::from_str(e).is_ok_and(|u| u.path() != "/");
                    if has_path {
                        e.clone()
                    } else {
                        http_traces_url(e)
                    }
                }
            },
            (None, None, None) => match protocol {
                OtlpProtocol::Grpc => "http://127.0.0.1:4317".to_string(),
                OtlpProtocol::HttpProtobuf => "http://127.0.0.1:4318/v1/traces".to_string(),
            },
        };
        check_endpoint(&endpoint).map_err(|problem| TracingError::Env {
            var: "OTEL_EXPORTER_OTLP_ENDPOINT",
            problem,
        })?;

        let ratio = spec.sampling.ratio;
        let sampler = match var("OTEL_TRACES_SAMPLER") {
            None => Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio))),
            Some(name) => sampler_from_env(&name, var("OTEL_TRACES_SAMPLER_ARG"))?,
        };

        // service.name, strongest last: the workload, OTEL_RESOURCE_ATTRIBUTES, the
        // manifest's service_name, OTEL_SERVICE_NAME.
        let mut resource = Resource::builder_empty()
            .with_detector(Box::new(TelemetryResourceDetector))
            .with_service_name(workload.unwrap_or("wasmesh").to_string());
        if let Some(attrs) = var("OTEL_RESOURCE_ATTRIBUTES") {
            resource = resource.with_attributes(parse_resource_attributes(&attrs));
        }
        if let Some(name) = &spec.service_name {
            resource = resource.with_service_name(name.clone());
        }
        if let Some(name) = var("OTEL_SERVICE_NAME") {
            resource = resource.with_service_name(name);
        }

        Ok(Some(Settings {
            endpoint,
            protocol,
            headers: spec
                .headers
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            resource: resource.build(),
            sampler,
            max_queue_size: spec.max_queue_size,
            batch_size: spec.batch_size,
            batch_delay: spec.batch_delay,
            export_timeout: spec.export_timeout,
        }))
    }
}

/// `OTEL_TRACES_SAMPLER` (and `_ARG`), as the specification lists them.
fn sampler_from_env(name: &str, arg: Option<String>) -> Result<Sampler, TracingError> {
    let ratio = || -> Result<f64, TracingError> {
        match &arg {
            None => Ok(1.0),
            Some(a) => a
                .parse::<f64>()
                .ok()
                .filter(|r| (0.0..=1.0).contains(r))
                .ok_or_else(|| TracingError::Env {
                    var: "OTEL_TRACES_SAMPLER_ARG",
                    problem: format!("`{a}` is not a ratio between 0 and 1"),
                }),
        }
    };
    let parent = |s: Sampler| Sampler::ParentBased(Box::new(s));
    Ok(match name {
        "always_on" => Sampler::AlwaysOn,
        "always_off" => Sampler::AlwaysOff,
        "traceidratio" => Sampler::TraceIdRatioBased(ratio()?),
        "parentbased_always_on" => parent(Sampler::AlwaysOn),
        "parentbased_always_off" => parent(Sampler::AlwaysOff),
        "parentbased_traceidratio" => parent(Sampler::TraceIdRatioBased(ratio()?)),
        other => {
            return Err(TracingError::Env {
                var: "OTEL_TRACES_SAMPLER",
                problem: format!("`{other}` is not a supported sampler"),
            })
        }
    })
}

/// `key1=value1,key2=value2` with percent-encoded values (W3C Baggage octets).
fn parse_resource_attributes(s: &str) -> Vec<KeyValue> {
    s.split(',')
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            let (k, v) = (k.trim(), v.trim());
            (!k.is_empty()).then(|| KeyValue::new(k.to_string(), percent_decode(v)))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while let Some(&c) = b.get(i) {
        if c == b'%' {
            if let Some(v) = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(c);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Hands finished spans to the exporter thread; never blocks. A full queue (the collector
/// is down or slow) drops the span and counts it: the SDK's own batch processor only logs.
#[derive(Debug)]
struct QueueProcessor {
    tx: mpsc::Sender<SpanData>,
    dropped: Counter,
}

impl SpanProcessor for QueueProcessor {
    fn on_start(&self, _span: &mut SdkSpan, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.dropped.inc();
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

struct Active {
    tracer: SdkTracer,
    provider: SdkTracerProvider,
    stop: watch::Sender<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Process-wide tracing: off, or a tracer feeding the exporter thread.
#[derive(Clone, Default)]
pub struct Tracing {
    active: Option<Arc<Active>>,
}

impl Tracing {
    /// Tracing off: every per-request call is a branch on `None`.
    pub fn off() -> Self {
        Self { active: None }
    }

    pub fn enabled(&self) -> bool {
        self.active.is_some()
    }

    /// Start tracing as the manifest and the environment say (or leave it off).
    pub fn start(
        spec: Option<&TracingSpec>,
        workload: Option<&str>,
        metrics: &Arc<Metrics>,
    ) -> Result<Self, TracingError> {
        match Settings::resolve(spec, workload, |k| std::env::var(k).ok())? {
            None => Ok(Self::off()),
            Some(s) => Self::with_settings(s, metrics),
        }
    }

    /// Build the exporter on its own thread and runtime (tonic and hyper need one), so
    /// the workers' runtimes never run export work.
    pub fn with_settings(s: Settings, metrics: &Arc<Metrics>) -> Result<Self, TracingError> {
        let (tx, rx) = mpsc::channel(s.max_queue_size);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let exporter_settings = s.clone();
        let m = metrics.clone();
        let thread = std::thread::Builder::new()
            .name("wasmesh-otlp".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                rt.block_on(async move {
                    let exporter = match build_exporter(&exporter_settings) {
                        Ok(e) => {
                            let _ = ready_tx.send(Ok(()));
                            e
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    export_loop(exporter, rx, stop_rx, &exporter_settings, &m).await;
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(TracingError::Exporter(e)),
            Err(_) => return Err(TracingError::Exporter("exporter thread died".into())),
        }
        tracing::info!(endpoint = %s.endpoint, protocol = ?s.protocol, "exporting traces over OTLP");
        let provider = SdkTracerProvider::builder()
            .with_span_processor(QueueProcessor {
                tx,
                dropped: metrics.tracing_spans_dropped.clone(),
            })
            .with_sampler(s.sampler)
            .with_resource(s.resource)
            .build();
        let tracer = provider.tracer("wasmesh");
        Ok(Self {
            active: Some(Arc::new(Active {
                tracer,
                provider,
                stop: stop_tx,
                thread: Mutex::new(Some(thread)),
            })),
        })
    }

    /// Export what is queued (up to `export_timeout` per batch) and stop the exporter.
    /// Call once the workers are done, so their last spans are in the queue.
    pub fn shutdown(&self) {
        let Some(a) = &self.active else { return };
        let _ = a.stop.send(true);
        let handle = a.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            let _ = h.join();
        }
        let _ = a.provider.shutdown();
    }

    /// Begin a request's trace: the SERVER span, child of the caller's context if the
    /// request carries one.
    pub fn start_server(
        &self,
        parts: &http::request::Parts,
        peer: SocketAddr,
        local: SocketAddr,
        tls: bool,
    ) -> RequestTrace {
        let Some(a) = &self.active else {
            return RequestTrace::off();
        };
        let parent = extract(&parts.headers);
        let cx = match &parent {
            Some(sc) => Context::new().with_remote_span_context(sc.clone()),
            None => Context::new(),
        };
        let method = method_name(&parts.method);
        let mut span = a.tracer.build_with_context(
            a.tracer
                .span_builder(Cow::Borrowed(method))
                .with_kind(SpanKind::Server),
            &cx,
        );
        let sc = span.span_context().clone();
        if span.is_recording() {
            let authority = parts
                .uri
                .authority()
                .map(|a| a.as_str())
                .or_else(|| {
                    parts
                        .headers
                        .get(http::header::HOST)
                        .and_then(|v| v.to_str().ok())
                })
                .unwrap_or_default();
            let (host, port) = split_authority(authority, local.port());
            let mut attrs = Vec::with_capacity(12);
            attrs.push(KeyValue::new(semconv::HTTP_REQUEST_METHOD, method));
            if method == "_OTHER" {
                attrs.push(KeyValue::new(
                    "http.request.method_original",
                    parts.method.as_str().to_string(),
                ));
            }
            attrs.push(KeyValue::new(
                semconv::URL_PATH,
                parts.uri.path().to_string(),
            ));
            if let Some(q) = parts.uri.query() {
                attrs.push(KeyValue::new(semconv::URL_QUERY, q.to_string()));
            }
            attrs.push(KeyValue::new(
                semconv::URL_SCHEME,
                if tls { "https" } else { "http" },
            ));
            if !host.is_empty() {
                attrs.push(KeyValue::new(semconv::SERVER_ADDRESS, host.to_string()));
            }
            attrs.push(KeyValue::new(semconv::SERVER_PORT, i64::from(port)));
            attrs.push(KeyValue::new(
                semconv::NETWORK_PEER_ADDRESS,
                peer.ip().to_string(),
            ));
            attrs.push(KeyValue::new(
                semconv::NETWORK_PEER_PORT,
                i64::from(peer.port()),
            ));
            attrs.push(KeyValue::new(
                semconv::NETWORK_PROTOCOL_VERSION,
                protocol_version(parts.version),
            ));
            if let Some(ua) = parts
                .headers
                .get(http::header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
            {
                attrs.push(KeyValue::new(semconv::USER_AGENT_ORIGINAL, ua.to_string()));
            }
            span.set_attributes(attrs);
        }
        RequestTrace {
            inner: Some(Box::new(ServerSpan {
                tracer: a.tracer.clone(),
                span,
                cx: sc,
                method,
                template: None,
                attempts: 0,
            })),
        }
    }
}

/// Export batches until told to stop, then export what is left.
async fn export_loop(
    exporter: opentelemetry_otlp::SpanExporter,
    mut rx: mpsc::Receiver<SpanData>,
    mut stop: watch::Receiver<bool>,
    s: &Settings,
    metrics: &Metrics,
) {
    let mut batch: Vec<SpanData> = Vec::with_capacity(s.batch_size);
    let mut stopping = false;
    while !stopping {
        tokio::select! {
            n = rx.recv_many(&mut batch, s.batch_size) => if n == 0 { break },
            _ = stop.changed() => stopping = true,
        }
        // A partial batch waits up to `batch_delay` for company.
        let until = tokio::time::Instant::now() + s.batch_delay;
        while !stopping && batch.len() < s.batch_size {
            let room = s.batch_size - batch.len();
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                n = rx.recv_many(&mut batch, room) => if n == 0 { break },
                _ = stop.changed() => stopping = true,
            }
        }
        export_batch(&exporter, std::mem::take(&mut batch), s, metrics).await;
    }
    // Shutting down: what the workers left in the queue, batch by batch.
    loop {
        while batch.len() < s.batch_size {
            match rx.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
        if batch.is_empty() {
            break;
        }
        export_batch(&exporter, std::mem::take(&mut batch), s, metrics).await;
    }
}

async fn export_batch(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: Vec<SpanData>,
    s: &Settings,
    metrics: &Metrics,
) {
    if batch.is_empty() {
        return;
    }
    let n = batch.len() as u64;
    match tokio::time::timeout(s.export_timeout, exporter.export(batch)).await {
        Ok(Ok(())) => {
            metrics.tracing_spans_exported.inc_by(n);
        }
        Ok(Err(e)) => {
            metrics.tracing_spans_dropped.inc_by(n);
            tracing::debug!(error = %e, spans = n, "span export failed");
        }
        Err(_) => {
            metrics.tracing_spans_dropped.inc_by(n);
            tracing::debug!(spans = n, "span export timed out");
        }
    }
}

fn build_exporter(s: &Settings) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
    let mut exporter = match s.protocol {
        OtlpProtocol::Grpc => {
            let mut headers = HeaderMap::new();
            for (k, v) in &s.headers {
                if let (Ok(k), Ok(v)) = (
                    HeaderName::from_bytes(k.as_bytes()),
                    HeaderValue::from_str(v),
                ) {
                    headers.insert(k, v);
                }
            }
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(s.endpoint.clone())
                .with_timeout(s.export_timeout)
                .with_metadata(
                    opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers),
                )
                .build()
        }
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(s.endpoint.clone())
            .with_timeout(s.export_timeout)
            .with_headers(s.headers.iter().cloned().collect())
            .build(),
    }
    .map_err(|e| e.to_string())?;
    exporter.set_resource(&s.resource);
    Ok(exporter)
}

/// The caller's span from `traceparent`/`tracestate`, else from B3 (single `b3` header or
/// the `x-b3-*` set). Invalid input is ignored: a new trace starts.
pub fn extract(h: &HeaderMap) -> Option<SpanContext> {
    if let Some(tp) = h.get(&TRACEPARENT).and_then(|v| v.to_str().ok()) {
        let t = crate::trace::TraceContext::parse_traceparent(tp)?;
        let state = h
            .get(&TRACESTATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| TraceState::from_str(v).ok())
            .unwrap_or_default();
        return span_context(&t, state);
    }
    let t = crate::trace::TraceContext::from_headers(h).or_else(|| {
        h.get(&B3)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_b3_single)
    })?;
    span_context(&t, TraceState::default())
}

fn span_context(t: &crate::trace::TraceContext, state: TraceState) -> Option<SpanContext> {
    let trace = TraceId::from_hex(&t.trace_id).ok()?;
    let span = SpanId::from_hex(&t.parent_id).ok()?;
    let flags = if t.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Some(SpanContext::new(trace, span, flags, true, state))
}

/// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]` (B3 single header).
fn parse_b3_single(v: &str) -> Option<crate::trace::TraceContext> {
    let mut it = v.trim().split('-');
    let trace = it.next()?;
    let span = it.next()?;
    let sampled = !matches!(it.next(), Some("0"));
    let mut h = HeaderMap::new();
    h.insert(&B3_TRACE, HeaderValue::from_str(trace).ok()?);
    h.insert(&B3_SPAN, HeaderValue::from_str(span).ok()?);
    h.insert(
        &B3_SAMPLED,
        HeaderValue::from_static(if sampled { "1" } else { "0" }),
    );
    crate::trace::TraceContext::from_headers(&h)
}

/// Semantic conventions: the known methods by name, anything else as `_OTHER`.
fn method_name(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::PATCH => "PATCH",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "_OTHER",
    }
}

fn protocol_version(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_11 => "1.1",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "0.9",
    }
}

/// `host[:port]` or `[v6][:port]` → host and port (`default` when none is given).
fn split_authority(a: &str, default: u16) -> (&str, u16) {
    if let Some(rest) = a.strip_prefix('[') {
        let (host, after) = rest.split_once(']').unwrap_or((rest, ""));
        let port = after
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default);
        return (host, port);
    }
    match a.rsplit_once(':') {
        Some((h, p)) => match p.parse() {
            Ok(port) => (h, port),
            Err(_) => (a, default),
        },
        None => (a, default),
    }
}

/// One filter hook as it ran in a sampled request (see `filters::chain`).
#[derive(Debug, Clone)]
pub struct FilterTiming {
    pub filter: String,
    /// `name@HASH` of the version that ran.
    pub version: String,
    pub hook: &'static str,
    pub start: SystemTime,
    pub end: SystemTime,
    pub failed: bool,
}

struct ServerSpan {
    tracer: SdkTracer,
    span: SdkSpan,
    cx: SpanContext,
    method: &'static str,
    /// `http.route`: the matched route's path template.
    template: Option<Arc<str>>,
    /// Upstream attempts so far (a retry's CLIENT span gets `http.request.resend_count`).
    attempts: u32,
}

/// A request's trace: the SERVER span when tracing is on, nothing otherwise.
#[derive(Default)]
pub struct RequestTrace {
    inner: Option<Box<ServerSpan>>,
}

/// How the request ended, for the SERVER span.
pub struct ServerEnd<'a> {
    pub status: u16,
    pub flags: &'a str,
    pub route: Option<&'a str>,
    pub cluster: Option<&'a str>,
    pub upstream: Option<SocketAddr>,
    pub filters: &'a [FilterTiming],
}

impl RequestTrace {
    pub fn off() -> Self {
        Self { inner: None }
    }

    /// Whether this request's spans are recorded (sampled): filter timings are worth
    /// collecting only then.
    pub fn is_recording(&self) -> bool {
        self.inner.as_ref().is_some_and(|s| s.span.is_recording())
    }

    /// The trace id and the proxy's SERVER span id, as lowercase hex; when tracing is off,
    /// the caller's trace id and span id from the request's headers, if any.
    pub fn ids(&self, headers: &HeaderMap) -> Option<(String, String)> {
        match &self.inner {
            Some(s) => Some((s.cx.trace_id().to_string(), s.cx.span_id().to_string())),
            None => {
                if !headers.contains_key(&TRACEPARENT)
                    && !headers.contains_key(&B3_TRACE)
                    && !headers.contains_key(&B3)
                {
                    return None;
                }
                let sc = extract(headers)?;
                Some((sc.trace_id().to_string(), sc.span_id().to_string()))
            }
        }
    }

    /// The matched route's template becomes `http.route` and part of the span name.
    pub fn set_route(&mut self, template: &Arc<str>) {
        if let Some(s) = &mut self.inner {
            s.template = Some(template.clone());
        }
    }

    /// Begin the CLIENT span of one upstream attempt and write its context into the
    /// upstream request (`traceparent`, `tracestate`, and B3 headers if the request uses
    /// them). Call once the request's headers are final.
    pub fn start_client(
        &mut self,
        upstream: SocketAddr,
        cluster: &str,
        parts: &mut http::request::Parts,
    ) -> ClientSpan {
        let Some(s) = &mut self.inner else {
            return ClientSpan { span: None };
        };
        s.attempts += 1;
        let cx = Context::new().with_remote_span_context(s.cx.clone());
        let mut span = s.tracer.build_with_context(
            s.tracer
                .span_builder(Cow::Borrowed(s.method))
                .with_kind(SpanKind::Client),
            &cx,
        );
        inject(span.span_context(), &s.cx, &mut parts.headers);
        if span.is_recording() {
            let authority = parts
                .headers
                .get(http::header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .unwrap_or_else(|| upstream.to_string());
            let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            let mut attrs = Vec::with_capacity(12);
            attrs.push(KeyValue::new(semconv::HTTP_REQUEST_METHOD, s.method));
            attrs.push(KeyValue::new(
                semconv::URL_FULL,
                format!("http://{authority}{pq}"),
            ));
            attrs.push(KeyValue::new(
                semconv::SERVER_ADDRESS,
                upstream.ip().to_string(),
            ));
            attrs.push(KeyValue::new(
                semconv::SERVER_PORT,
                i64::from(upstream.port()),
            ));
            attrs.push(KeyValue::new(
                semconv::NETWORK_PEER_ADDRESS,
                upstream.ip().to_string(),
            ));
            attrs.push(KeyValue::new(
                semconv::NETWORK_PROTOCOL_VERSION,
                protocol_version(parts.version),
            ));
            attrs.push(KeyValue::new(attr::CLUSTER, cluster.to_string()));
            attrs.push(KeyValue::new(attr::UPSTREAM, upstream.to_string()));
            if s.attempts > 1 {
                attrs.push(KeyValue::new(
                    semconv::HTTP_REQUEST_RESEND_COUNT,
                    i64::from(s.attempts - 1),
                ));
            }
            span.set_attributes(attrs);
        }
        ClientSpan { span: Some(span) }
    }

    /// End the SERVER span (and emit the filter spans under it).
    pub fn end(&mut self, e: &ServerEnd<'_>) {
        let Some(mut s) = self.inner.take() else {
            return;
        };
        if !s.span.is_recording() {
            return;
        }
        let name = match &s.template {
            Some(t) => format!("{} {t}", s.method),
            None => s.method.to_string(),
        };
        s.span.update_name(name);
        let mut attrs = Vec::with_capacity(8);
        attrs.push(KeyValue::new(
            semconv::HTTP_RESPONSE_STATUS_CODE,
            i64::from(e.status),
        ));
        if let Some(t) = &s.template {
            attrs.push(KeyValue::new(semconv::HTTP_ROUTE, t.to_string()));
        }
        if let Some(r) = e.route {
            attrs.push(KeyValue::new(attr::ROUTE, r.to_string()));
        }
        if let Some(c) = e.cluster {
            attrs.push(KeyValue::new(attr::CLUSTER, c.to_string()));
        }
        if let Some(u) = e.upstream {
            attrs.push(KeyValue::new(attr::UPSTREAM, u.to_string()));
        }
        attrs.push(KeyValue::new(attr::RESPONSE_FLAGS, e.flags.to_string()));
        // SERVER spans: 5xx is an error, 4xx is the client's and leaves the status unset.
        if e.status >= 500 {
            attrs.push(KeyValue::new(semconv::ERROR_TYPE, e.status.to_string()));
            s.span.set_status(Status::error(""));
        }
        s.span.set_attributes(attrs);
        let cx = Context::new().with_remote_span_context(s.cx.clone());
        for f in e.filters {
            let mut span = s.tracer.build_with_context(
                s.tracer
                    .span_builder(format!("filter {} {}", f.filter, f.hook))
                    .with_kind(SpanKind::Internal)
                    .with_start_time(f.start)
                    .with_attributes([
                        KeyValue::new(attr::FILTER_NAME, f.filter.clone()),
                        KeyValue::new(attr::FILTER_VERSION, f.version.clone()),
                        KeyValue::new(attr::FILTER_HOOK, f.hook),
                    ]),
                &cx,
            );
            if f.failed {
                span.set_status(Status::error("filter failed"));
            }
            span.end_with_timestamp(f.end);
        }
        s.span.end();
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        // A request whose completion never ran still ends its span (unrecorded details).
        if let Some(mut s) = self.inner.take() {
            s.span.end();
        }
    }
}

/// An upstream attempt's CLIENT span; end it with what the upstream answered.
pub struct ClientSpan {
    span: Option<SdkSpan>,
}

impl ClientSpan {
    pub fn end(self, result: Result<StatusCode, &ProxyError>) {
        let Some(mut span) = self.span else { return };
        if span.is_recording() {
            match result {
                Ok(status) => {
                    span.set_attribute(KeyValue::new(
                        semconv::HTTP_RESPONSE_STATUS_CODE,
                        i64::from(status.as_u16()),
                    ));
                    // CLIENT spans: any 4xx or 5xx is an error.
                    if status.as_u16() >= 400 {
                        span.set_attribute(KeyValue::new(
                            semconv::ERROR_TYPE,
                            status.as_u16().to_string(),
                        ));
                        span.set_status(Status::error(""));
                    }
                }
                Err(e) => {
                    span.set_attribute(KeyValue::new(semconv::ERROR_TYPE, error_type(e)));
                    span.set_status(Status::error(e.to_string()));
                }
            }
        }
        span.end();
    }
}

/// `error.type` for a failed attempt: low-cardinality names of the failure.
fn error_type(e: &ProxyError) -> &'static str {
    match e {
        ProxyError::ConnectFailure => "connect_failure",
        ProxyError::Overflow => "overflow",
        ProxyError::UpstreamReset => "upstream_reset",
        ProxyError::UpstreamTimeout => "timeout",
        ProxyError::NoHealthyUpstream => "no_healthy_upstream",
        ProxyError::DownstreamBody(_) => "downstream_body",
        _ => "_OTHER",
    }
}

/// Write `span` as the upstream's parent. `server` is the SERVER span, B3's parent.
fn inject(span: &SpanContext, server: &SpanContext, h: &mut HeaderMap) {
    let sampled = span.is_sampled();
    let tp = format!(
        "00-{}-{}-{}",
        span.trace_id(),
        span.span_id(),
        if sampled { "01" } else { "00" }
    );
    if let Ok(v) = HeaderValue::from_str(&tp) {
        h.insert(TRACEPARENT.clone(), v);
    }
    let state = span.trace_state().header();
    if state.is_empty() {
        h.remove(&TRACESTATE);
    } else if let Ok(v) = HeaderValue::from_str(&state) {
        h.insert(TRACESTATE.clone(), v);
    }
    // Keep B3 callers' upstreams consistent: rewrite B3 headers only if the request had them.
    if h.contains_key(&B3) {
        let v = format!(
            "{}-{}-{}-{}",
            span.trace_id(),
            span.span_id(),
            if sampled { "1" } else { "0" },
            server.span_id()
        );
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(B3.clone(), v);
        }
    }
    if h.contains_key(&B3_TRACE) {
        for (name, value) in [
            (&B3_TRACE, span.trace_id().to_string()),
            (&B3_SPAN, span.span_id().to_string()),
            (&B3_PARENT, server.span_id().to_string()),
            (&B3_SAMPLED, (if sampled { "1" } else { "0" }).to_string()),
        ] {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name.clone(), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn resolve(
        spec: Option<&TracingSpec>,
        env: &[(&str, &str)],
    ) -> Result<Option<Settings>, TracingError> {
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::resolve(spec, Some("shop"), |k| env.get(k).cloned())
    }

    fn service_name(s: &Settings) -> String {
        s.resource
            .get(&opentelemetry::Key::from_static_str(semconv::SERVICE_NAME))
            .map(|v| v.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn off_without_section_or_endpoint_variable() {
        assert!(resolve(None, &[]).expect("ok").is_none());
        let off = TracingSpec {
            enabled: false,
            ..TracingSpec::default()
        };
        assert!(resolve(Some(&off), &[]).expect("ok").is_none());
    }

    #[test]
    fn endpoint_variable_turns_tracing_on() {
        let s = resolve(
            None,
            &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:1234")],
        )
        .expect("ok")
        .expect("on");
        assert_eq!(s.endpoint, "http://127.0.0.1:1234");
        assert_eq!(s.protocol, OtlpProtocol::Grpc);
        assert_eq!(service_name(&s), "shop");
        let s = resolve(
            None,
            &[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318/"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
            ],
        )
        .expect("ok")
        .expect("on");
        assert_eq!(s.endpoint, "http://127.0.0.1:4318/v1/traces");
        assert_eq!(s.protocol, OtlpProtocol::HttpProtobuf);
    }

    #[test]
    fn variables_override_the_manifest() {
        let spec = TracingSpec {
            endpoint: Some("http://127.0.0.1:4318".into()),
            protocol: OtlpProtocol::HttpProtobuf,
            service_name: Some("from-manifest".into()),
            ..TracingSpec::default()
        };
        let s = resolve(Some(&spec), &[]).expect("ok").expect("on");
        assert_eq!(s.endpoint, "http://127.0.0.1:4318/v1/traces");
        assert_eq!(service_name(&s), "from-manifest");
        let s = resolve(
            Some(&spec),
            &[
                ("OTEL_SERVICE_NAME", "from-env"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=prod%20eu",
                ),
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
            ],
        )
        .expect("ok")
        .expect("on");
        assert_eq!(service_name(&s), "from-env");
        assert_eq!(
            s.resource
                .get(&opentelemetry::Key::from_static_str(
                    "deployment.environment"
                ))
                .map(|v| v.to_string()),
            Some("prod eu".to_string())
        );
        assert!(matches!(s.sampler, Sampler::TraceIdRatioBased(r) if r == 0.25));
        assert!(resolve(Some(&spec), &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).is_err());
        assert!(resolve(Some(&spec), &[("OTEL_TRACES_SAMPLER", "sometimes")]).is_err());
        assert!(resolve(Some(&spec), &[("OTEL_SDK_DISABLED", "true")])
            .expect("ok")
            .is_none());
    }

    #[test]
    fn extract_and_inject() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        h.insert("tracestate", HeaderValue::from_static("vendor=x"));
        let sc = extract(&h).expect("context");
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert!(sc.is_sampled() && sc.is_remote());
        assert_eq!(sc.trace_state().header(), "vendor=x");

        let mut b3 = HeaderMap::new();
        b3.insert(
            "b3",
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        );
        let sc = extract(&b3).expect("b3 single");
        assert_eq!(sc.span_id().to_string(), "e457b5a2e4d86bd1");

        let child = SpanContext::new(
            sc.trace_id(),
            SpanId::from_hex("1111111111111111").expect("id"),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        );
        inject(&child, &sc, &mut b3);
        assert_eq!(
            b3.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-80f198ee56343ba864fe8b2a57d3eff7-1111111111111111-01")
        );
        assert_eq!(
            b3.get("b3").and_then(|v| v.to_str().ok()),
            Some("80f198ee56343ba864fe8b2a57d3eff7-1111111111111111-1-e457b5a2e4d86bd1")
        );
    }

    #[test]
    fn authority_split() {
        assert_eq!(split_authority("a.local:8080", 80), ("a.local", 8080));
        assert_eq!(split_authority("a.local", 80), ("a.local", 80));
        assert_eq!(split_authority("[::1]:9", 80), ("::1", 9));
    }
}
