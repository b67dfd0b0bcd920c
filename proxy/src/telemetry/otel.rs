//! OpenTelemetry traces: a SERVER span per inbound request, a CLIENT span per upstream
//! attempt, a child span per filter hook, exported over OTLP (gRPC or HTTP/protobuf).
//!
//! What this module owns:
//! - the effective settings: the manifest's `tracing` section with the standard `OTEL_*`
//!   environment variables on top ([`Settings::resolve`]);
//! - sampling (the specification's samplers; parent-based ratio by default) and trace
//!   context propagation: W3C `traceparent`/`tracestate` (and B3) read from the request,
//!   written into the upstream request with the CLIENT span as parent;
//! - the hand-over to the exporter: a sampled request's spans are built once, when they
//!   end, as plain records (`super::otlp`) and go into a bounded queue; one exporter
//!   thread with its own Tokio runtime encodes them to OTLP protobuf and sends them in
//!   batches. A full queue drops the span and counts it
//!   (`wasmesh_tracing_spans_dropped_total`), as does a batch the collector refuses or does
//!   not answer within `export_timeout`: the request path never waits on the collector.
//!
//! What it must not do: block or allocate much on a worker thread ([`Tracing::off`] makes
//! every call here a branch on `None`; with tracing on a request costs one record and a
//! few copies of its strings, no attribute maps and no protobuf), wake the exporter per
//! span (it wakes per batch or per `batch_delay`), or hold up a request when the
//! collector is slow.

use crate::config::{OtlpCompression, OtlpProtocol, TracingSpec};
use crate::error::ProxyError;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::otlp::{
    ClientOutcome, ClientRecord, Encoder, Finished, ServerOutcome, ServerRecord, Text, Transport,
};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use opentelemetry::trace::TraceState;
use opentelemetry::KeyValue;
use opentelemetry_sdk::resource::{Resource, TelemetryResourceDetector};
use prometheus_client::metrics::counter::Counter;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Notify};

pub use crate::telemetry::otlp::attr;

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
    pub compression: OtlpCompression,
    pub headers: Vec<(String, String)>,
    pub resource: Resource,
    pub sampler: Sampler,
    pub max_queue_size: usize,
    pub batch_size: usize,
    pub batch_delay: Duration,
    pub export_timeout: Duration,
    /// Used for `https://` endpoints.
    pub tls: super::collector_tls::CollectorTls,
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

/// The value an environment variable (`set`: its name and value) names among `choices`,
/// or `default` when it is not set.
fn one_of<T: Copy>(
    set: Option<(&'static str, String)>,
    choices: &[(&str, T)],
    default: T,
) -> Result<T, TracingError> {
    let Some((var, v)) = set else {
        return Ok(default);
    };
    match choices.iter().find(|(name, _)| *name == v) {
        Some(&(_, choice)) => Ok(choice),
        None => {
            let names: Vec<String> = choices.iter().map(|(n, _)| format!("`{n}`")).collect();
            Err(TracingError::Env {
                var,
                problem: format!("`{v}` is not supported: use {}", names.join(" or ")),
            })
        }
    }
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

        // The per-signal variable, else the generic one; with the name that was set.
        let signal_var = |signal: &'static str, generic: &'static str| {
            var(signal)
                .map(|v| (signal, v))
                .or_else(|| var(generic).map(|v| (generic, v)))
        };
        let protocol = one_of(
            signal_var(
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
                "OTEL_EXPORTER_OTLP_PROTOCOL",
            ),
            &[
                ("grpc", OtlpProtocol::Grpc),
                ("http/protobuf", OtlpProtocol::HttpProtobuf),
            ],
            spec.protocol,
        )?;
        let compression = one_of(
            signal_var(
                "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION",
                "OTEL_EXPORTER_OTLP_COMPRESSION",
            ),
            &[
                ("gzip", OtlpCompression::Gzip),
                ("none", OtlpCompression::None),
            ],
            spec.compression,
        )?;
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
            None => Sampler::parent_based(RootSampler::TraceIdRatio(ratio)),
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

        // TLS files: the per-signal variable, then the generic one, then the manifest.
        let mut tls = spec
            .tls
            .as_ref()
            .map(super::collector_tls::CollectorTls::from_spec)
            .unwrap_or_default();
        let file_var = |signal: &'static str, generic: &'static str| {
            signal_var(signal, generic).map(|(_, v)| std::path::PathBuf::from(v))
        };
        if let Some(f) = file_var(
            "OTEL_EXPORTER_OTLP_TRACES_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CERTIFICATE",
        ) {
            tls.ca_file = Some(f);
        }
        if let Some(f) = file_var(
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_CERTIFICATE",
            "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE",
        ) {
            tls.cert_file = Some(f);
        }
        if let Some(f) = file_var(
            "OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY",
            "OTEL_EXPORTER_OTLP_CLIENT_KEY",
        ) {
            tls.key_file = Some(f);
        }

        // Headers: the manifest's, then the generic variable's, then the per-signal one's;
        // a later value for a name replaces an earlier one.
        let mut headers: Vec<(String, String)> = spec
            .headers
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect();
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(v) = var(name) {
                for (k, v) in parse_headers(name, &v)? {
                    headers.retain(|(have, _)| *have != k);
                    headers.push((k, v));
                }
            }
        }

        Ok(Some(Settings {
            tls,
            endpoint,
            protocol,
            compression,
            headers,
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
    let (parent_based, root) = match name {
        "always_on" => (false, RootSampler::AlwaysOn),
        "always_off" => (false, RootSampler::AlwaysOff),
        "traceidratio" => (false, RootSampler::TraceIdRatio(ratio()?)),
        "parentbased_always_on" => (true, RootSampler::AlwaysOn),
        "parentbased_always_off" => (true, RootSampler::AlwaysOff),
        "parentbased_traceidratio" => (true, RootSampler::TraceIdRatio(ratio()?)),
        other => {
            return Err(TracingError::Env {
                var: "OTEL_TRACES_SAMPLER",
                problem: format!("`{other}` is not a supported sampler"),
            })
        }
    };
    Ok(Sampler { parent_based, root })
}

/// `OTEL_EXPORTER_OTLP_HEADERS` (and the per-signal variable): `key1=value1,key2=value2`
/// with percent-encoded values. Names and values must make valid HTTP headers.
fn parse_headers(var: &'static str, s: &str) -> Result<Vec<(String, String)>, TracingError> {
    let mut out = Vec::new();
    for item in s.split(',').filter(|i| !i.trim().is_empty()) {
        let problem = |p: String| TracingError::Env { var, problem: p };
        let (k, v) = item
            .split_once('=')
            .ok_or_else(|| problem(format!("`{}` is not `name=value`", item.trim())))?;
        let (k, v) = (k.trim().to_ascii_lowercase(), percent_decode(v.trim()));
        if HeaderName::from_bytes(k.as_bytes()).is_err() {
            return Err(problem(format!("`{k}` is not a header name")));
        }
        if HeaderValue::from_str(&v).is_err() {
            return Err(problem(format!("the value of `{k}` is not a header value")));
        }
        out.push((k, v));
    }
    Ok(out)
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

/// Which traces are recorded: the samplers the OpenTelemetry specification names, with
/// the SDK's decisions (see the `same_decisions_as_the_sdk` test).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampler {
    /// A caller's decision (`traceparent` flags, `x-b3-sampled`) wins over `root`.
    pub parent_based: bool,
    /// The decision for a new trace (and for every trace when not parent-based).
    pub root: RootSampler,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RootSampler {
    AlwaysOn,
    AlwaysOff,
    /// Share of trace ids recorded, 0 to 1, decided from the trace id alone so that every
    /// process on the trace decides alike.
    TraceIdRatio(f64),
}

impl Sampler {
    pub fn parent_based(root: RootSampler) -> Self {
        Self {
            parent_based: true,
            root,
        }
    }

    /// `parent`: the caller's sampled flag, if the request carried a context.
    fn sample(&self, parent: Option<bool>, trace_id: u128) -> bool {
        match parent {
            Some(sampled) if self.parent_based => sampled,
            _ => match self.root {
                RootSampler::AlwaysOn => true,
                RootSampler::AlwaysOff => false,
                RootSampler::TraceIdRatio(r) if r >= 1.0 => true,
                RootSampler::TraceIdRatio(r) => {
                    // The SDK's rule: the trace id's low 63 bits under ratio × 2^63.
                    let bound = (r.max(0.0) * (1u64 << 63) as f64) as u64;
                    ((trace_id as u64) >> 1) < bound
                }
            },
        }
    }
}

/// Ids come from the fast per-thread generator, as the SDK's do (they need to be unique,
/// not secret).
fn new_trace_id() -> u128 {
    crate::rng::nonzero()
}

fn new_span_id() -> u64 {
    crate::rng::nonzero()
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// The low `N` × 4 bits of `v` as `N` lowercase hex digits (`N` even, at most 32).
fn hex<const N: usize>(v: u128) -> [u8; N] {
    let mut out = [0u8; N];
    let bytes = v.to_be_bytes();
    let tail = bytes
        .get(16usize.saturating_sub(N / 2)..)
        .unwrap_or_default();
    for (pair, b) in out.chunks_exact_mut(2).zip(tail) {
        if let [hi, lo] = pair {
            *hi = HEX[usize::from(b >> 4)];
            *lo = HEX[usize::from(b & 0xf)];
        }
    }
    out
}

/// Which propagation headers a request carries, found in one pass over its header names:
/// a request has few headers, and a lookup by name hashes the name each time.
#[derive(Default)]
struct Carried {
    traceparent: bool,
    tracestate: bool,
    b3: bool,
    b3_trace: bool,
}

impl Carried {
    fn scan(h: &HeaderMap) -> Self {
        let mut c = Carried::default();
        for name in h.keys() {
            // Each name we look for has its own length: one comparison at most per header.
            let n = name.as_str();
            match n.len() {
                2 => c.b3 |= n == "b3",
                10 => c.tracestate |= n == "tracestate",
                11 => c.traceparent |= n == "traceparent",
                12 => c.b3_trace |= n == "x-b3-traceid",
                _ => {}
            }
        }
        c
    }

    fn context(&self) -> bool {
        self.traceparent || self.b3 || self.b3_trace
    }
}

fn hex_string<const N: usize>(v: u128) -> String {
    // Hex digits are ASCII: the conversion cannot fail.
    String::from_utf8(hex::<N>(v).to_vec()).unwrap_or_default()
}

/// A request's trace id and span id, kept as numbers: most requests never show them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceIds {
    pub trace: u128,
    pub span: u64,
}

impl TraceIds {
    /// The trace id as 32 lowercase hex digits, as in `traceparent`.
    pub fn trace_hex(&self) -> String {
        hex_string::<32>(self.trace)
    }

    /// The span id as 16 lowercase hex digits.
    pub fn span_hex(&self) -> String {
        hex_string::<16>(u128::from(self.span))
    }
}

fn header_value(b: &[u8]) -> Option<HeaderValue> {
    HeaderValue::from_bytes(b).ok()
}

/// Finished spans waiting for the exporter thread. Bounded in spans; a full queue drops
/// and counts. The worker takes the lock only to push, and wakes the exporter only when
/// a full batch is waiting (otherwise the exporter comes by every `batch_delay`): a wake-up
/// per span would cost the worker a system call and its CPU a context switch.
struct Queue {
    pending: Mutex<Pending>,
    capacity: usize,
    batch_size: usize,
    full_batch: Notify,
    dropped: Counter,
}

#[derive(Default)]
struct Pending {
    records: Vec<Finished>,
    spans: usize,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock cannot leave `Pending` inconsistent enough to
        // matter (at worst a count off by one record): keep exporting.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, record: Finished) {
        let n = record.spans();
        let mut p = self.lock();
        if p.spans + n > self.capacity {
            drop(p);
            self.dropped.inc_by(n as u64);
            return;
        }
        let before = p.spans;
        p.spans += n;
        p.records.push(record);
        drop(p);
        if before < self.batch_size && before + n >= self.batch_size {
            self.full_batch.notify_one();
        }
    }

    fn spans(&self) -> usize {
        self.lock().spans
    }

    /// The oldest records, up to `batch_size` spans (at least one record), and their span
    /// count. `spare` (empty) takes their place, so that the queue keeps its capacity and
    /// a worker's push does not grow it again after every batch.
    fn take(&self, spare: Vec<Finished>) -> (Vec<Finished>, usize) {
        let mut p = self.lock();
        if p.spans <= self.batch_size {
            let n = std::mem::take(&mut p.spans);
            return (std::mem::replace(&mut p.records, spare), n);
        }
        let (mut k, mut n) = (0, 0);
        for r in &p.records {
            if k > 0 && n + r.spans() > self.batch_size {
                break;
            }
            n += r.spans();
            k += 1;
        }
        p.spans -= n;
        (p.records.drain(..k).collect(), n)
    }
}

/// Records the exporter is done with, for the next requests: a record allocated on a
/// worker and freed on the exporter thread costs the allocator far more than a short
/// uncontended lock (and the record keeps its string buffers). Bounded: past `limit`
/// records are freed.
// The boxes are the point: a pooled record is handed out as the `Box` a `Finished` holds,
// without allocating.
#[allow(clippy::vec_box)]
struct Pool {
    servers: Mutex<Vec<Box<ServerRecord>>>,
    clients: Mutex<Vec<Box<ClientRecord>>>,
    limit: usize,
}

impl Pool {
    fn server(&self) -> Option<Box<ServerRecord>> {
        self.servers.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    fn client(&self) -> Option<Box<ClientRecord>> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Take back the records of an exported (or dropped) batch.
    fn put(&self, records: &mut Vec<Finished>) {
        let mut servers = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        for r in records.drain(..) {
            // What a pooled record holds on to beyond its own buffers is let go now (a
            // filter version's name, a route template of a configuration since replaced).
            match r {
                Finished::Server(mut s) if servers.len() < self.limit => {
                    s.filters.clear();
                    s.template = None;
                    s.state = None;
                    servers.push(s);
                }
                Finished::Client(mut c) if clients.len() < self.limit => {
                    c.state = None;
                    clients.push(c);
                }
                _ => {}
            }
        }
    }
}

/// What the request path needs: the sampler, the queue, the records to reuse.
struct Core {
    sampler: Sampler,
    queue: Queue,
    pool: Pool,
}

struct Active {
    core: Arc<Core>,
    stop: watch::Sender<bool>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Process-wide tracing: off, or a sampler and a queue feeding the exporter thread.
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
        let core = Arc::new(Core {
            sampler: s.sampler,
            pool: Pool {
                servers: Mutex::new(Vec::new()),
                clients: Mutex::new(Vec::new()),
                limit: s.batch_size,
            },
            queue: Queue {
                pending: Mutex::new(Pending::default()),
                capacity: s.max_queue_size,
                batch_size: s.batch_size.max(1),
                full_batch: Notify::new(),
                dropped: metrics.tracing_spans_dropped.clone(),
            },
        });
        let (stop_tx, stop_rx) = watch::channel(false);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let exporter_settings = s.clone();
        let exporter_core = core.clone();
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
                    let s = exporter_settings;
                    let transport = match connect(&s) {
                        Ok(t) => {
                            let _ = ready_tx.send(Ok(()));
                            t
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let encoder = Encoder::new(&s.resource);
                    export_loop(&exporter_core, transport, encoder, stop_rx, &s, &m).await;
                });
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(TracingError::Exporter(e)),
            Err(_) => return Err(TracingError::Exporter("exporter thread died".into())),
        }
        tracing::info!(endpoint = %s.endpoint, protocol = ?s.protocol, "exporting traces over OTLP");
        Ok(Self {
            active: Some(Arc::new(Active {
                core,
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
    }

    /// Begin a request's trace: the SERVER span, child of the caller's context if the
    /// request carries one. Only a sampled request copies anything from the request.
    /// `authority` (from the URI, else `Host`) and `user_agent` are the request's, looked up
    /// once by the caller.
    pub fn start_server(
        &self,
        parts: &http::request::Parts,
        authority: &str,
        user_agent: Option<&HeaderValue>,
        peer: SocketAddr,
        local_port: u16,
        tls: bool,
    ) -> RequestTrace {
        let Some(a) = &self.active else {
            return RequestTrace::off();
        };
        let core = a.core.clone();
        let (trace_id, parent, state, sampled) = match extract(&parts.headers) {
            Some(p) => (
                p.trace_id,
                Some(p.span_id),
                p.state,
                core.sampler.sample(Some(p.sampled), p.trace_id),
            ),
            None => {
                let t = new_trace_id();
                (t, None, None, core.sampler.sample(None, t))
            }
        };
        let method = method_name(&parts.method);
        let fresh = ServerRecord {
            trace_id,
            span_id: new_span_id(),
            parent,
            sampled,
            state,
            start: SystemTime::UNIX_EPOCH,
            end: SystemTime::UNIX_EPOCH,
            method,
            method_original: None,
            https: tls,
            server_port: local_port,
            peer,
            version: protocol_version(parts.version),
            text: Text::default(),
            path: Default::default(),
            query: None,
            host: None,
            user_agent: None,
            template: None,
            outcome: None,
            filters: Vec::new(),
        };
        let mut rec = match sampled.then(|| core.pool.server()).flatten() {
            Some(mut old) => {
                let text = std::mem::take(&mut old.text);
                let mut filters = std::mem::take(&mut old.filters);
                filters.clear();
                *old = ServerRecord {
                    text,
                    filters,
                    ..fresh
                };
                old
            }
            None => Box::new(fresh),
        };
        if sampled {
            rec.start = SystemTime::now();
            let (host, port) = split_authority(authority, local_port);
            let ua = user_agent.and_then(|v| v.to_str().ok());
            let path = parts.uri.path();
            let query = parts.uri.query();
            // Room for these and for what `end` adds (route, cluster, flags).
            let room =
                path.len() + query.map_or(0, str::len) + host.len() + ua.map_or(0, str::len) + 64;
            rec.text = std::mem::take(&mut rec.text).reuse(room);
            let t = &mut rec.text;
            if method == "_OTHER" {
                rec.method_original = Some(t.push(parts.method.as_str()));
            }
            rec.path = t.push(path);
            rec.query = query.map(|q| t.push(q));
            rec.host = (!host.is_empty()).then(|| t.push(host));
            rec.server_port = port;
            rec.user_agent = ua.map(|u| t.push(u));
        }
        RequestTrace {
            inner: Some((core, rec)),
            attempts: 0,
        }
    }
}

/// The exporter's connection to the collector, as the settings say.
fn connect(s: &Settings) -> Result<Transport, String> {
    Transport::new(
        s.protocol,
        s.compression,
        &s.endpoint,
        &s.headers,
        s.export_timeout,
        &s.tls,
    )
}

/// Export batches until told to stop, then export what is left.
async fn export_loop(
    core: &Core,
    mut transport: Transport,
    mut encoder: Encoder,
    mut stop: watch::Receiver<bool>,
    s: &Settings,
    metrics: &Metrics,
) {
    let q = &core.queue;
    let mut stopping = false;
    let mut spare = Vec::new();
    let mut tls_files = super::collector_tls::FilesWatch::new(&s.tls);
    let https = s
        .endpoint
        .get(..8)
        .is_some_and(|p| p.eq_ignore_ascii_case("https://"));
    loop {
        // A partial batch waits up to `batch_delay` for company; a full one goes now.
        if !stopping && q.spans() < q.batch_size {
            tokio::select! {
                _ = q.full_batch.notified() => {}
                _ = tokio::time::sleep(s.batch_delay) => {}
                _ = stop.changed() => stopping = true,
            }
        }
        let (mut records, n) = q.take(std::mem::take(&mut spare));
        if n == 0 {
            spare = records;
            if stopping {
                break;
            }
            continue;
        }
        for r in &records {
            encoder.add(r);
        }
        // Hand the records back before waiting on the collector; keep the vector.
        core.pool.put(&mut records);
        spare = records;
        let body = encoder.finish();
        // Rotated TLS files: connect with the new ones from the next export on.
        if let Some(stamp) = tls_files.poll().filter(|_| https) {
            match connect(s) {
                Ok(t) => {
                    transport = t;
                    tls_files.applied(stamp);
                    tracing::info!(endpoint = %s.endpoint, "collector TLS files changed: reconnecting with them");
                }
                Err(e) => {
                    tls_files.rejected(stamp);
                    tracing::warn!(endpoint = %s.endpoint, error = %e, "collector TLS files changed but cannot be used: keeping the previous ones");
                }
            }
        }
        match tokio::time::timeout(s.export_timeout, transport.send(body)).await {
            Ok(Ok(())) => {
                metrics.tracing_spans_exported.inc_by(n as u64);
            }
            Ok(Err(e)) => {
                metrics.tracing_spans_dropped.inc_by(n as u64);
                tracing::debug!(error = %e, spans = n, "span export failed");
            }
            Err(_) => {
                metrics.tracing_spans_dropped.inc_by(n as u64);
                tracing::debug!(spans = n, "span export timed out");
            }
        }
    }
}

/// A caller's span context, as read from the request.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Parent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
    /// `tracestate`, validated and re-serialised; `None` when absent or empty.
    pub state: Option<Arc<str>>,
}

/// The caller's span from `traceparent`/`tracestate`, else from B3 (single `b3` header or
/// the `x-b3-*` set). Invalid input is ignored: a new trace starts.
pub(crate) fn extract(h: &HeaderMap) -> Option<Parent> {
    if !Carried::scan(h).context() {
        return None;
    }
    if let Some(tp) = h.get(&TRACEPARENT).and_then(|v| v.to_str().ok()) {
        let t = crate::trace::TraceContext::parse_traceparent(tp)?;
        let state = h
            .get(&TRACESTATE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| TraceState::from_str(v).ok())
            .map(|s| s.header())
            .filter(|s| !s.is_empty())
            .map(Arc::from);
        return parent(&t, state);
    }
    let t = crate::trace::TraceContext::from_headers(h).or_else(|| {
        h.get(&B3)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_b3_single)
    })?;
    parent(&t, None)
}

fn parent(t: &crate::trace::TraceContext, state: Option<Arc<str>>) -> Option<Parent> {
    Some(Parent {
        trace_id: u128::from_str_radix(&t.trace_id, 16).ok()?,
        span_id: u64::from_str_radix(&t.parent_id, 16).ok()?,
        sampled: t.sampled,
        state,
    })
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

/// A request's trace: the SERVER span when tracing is on, nothing otherwise.
#[derive(Default)]
pub struct RequestTrace {
    inner: Option<(Arc<Core>, Box<ServerRecord>)>,
    /// Upstream attempts so far (a retry's CLIENT span gets `http.request.resend_count`).
    attempts: u32,
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
        Self {
            inner: None,
            attempts: 0,
        }
    }

    /// Whether this request's spans are recorded (sampled): filter timings are worth
    /// collecting only then.
    pub fn is_recording(&self) -> bool {
        self.inner.as_ref().is_some_and(|(_, s)| s.sampled)
    }

    /// The trace id and the proxy's SERVER span id; when tracing is off, the caller's
    /// trace id and span id from the request's headers, if any. Render them with
    /// [`TraceIds::trace_hex`] and [`TraceIds::span_hex`] only where they are shown (a filter asks, the access log).
    pub fn ids(&self, headers: &HeaderMap) -> Option<TraceIds> {
        match &self.inner {
            Some((_, s)) => Some(TraceIds {
                trace: s.trace_id,
                span: s.span_id,
            }),
            None => extract(headers).map(|p| TraceIds {
                trace: p.trace_id,
                span: p.span_id,
            }),
        }
    }

    /// The matched route's template becomes `http.route` and part of the span name.
    pub fn set_route(&mut self, template: &Arc<str>) {
        if let Some((_, s)) = &mut self.inner {
            if s.sampled {
                s.template = Some(template.clone());
            }
        }
    }

    /// Begin the CLIENT span of one upstream attempt and write its context into the
    /// upstream request (`traceparent`, `tracestate`, and B3 headers if the request uses
    /// them). Call once the request's headers are final.
    pub fn start_client(
        &mut self,
        upstream: SocketAddr,
        cluster: &Arc<str>,
        parts: &mut http::request::Parts,
    ) -> ClientSpan {
        let Some((core, s)) = &self.inner else {
            return ClientSpan { inner: None };
        };
        self.attempts += 1;
        let span_id = new_span_id();
        inject(
            s.trace_id,
            span_id,
            s.sampled,
            s.state.as_deref(),
            s.span_id,
            &mut parts.headers,
        );
        if !s.sampled {
            return ClientSpan { inner: None };
        }
        let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let host = parts
            .headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok());
        let mut old = core.pool.client();
        let mut url_full = old
            .as_mut()
            .map(|c| std::mem::take(&mut c.url_full))
            .unwrap_or_default();
        url_full.clear();
        url_full.reserve(7 + host.map_or(21, str::len) + pq.len());
        url_full.push_str("http://");
        match host {
            Some(h) => url_full.push_str(h),
            None => {
                use std::fmt::Write as _;
                let _ = write!(url_full, "{upstream}");
            }
        }
        url_full.push_str(pq);
        let fresh = ClientRecord {
            trace_id: s.trace_id,
            span_id,
            parent: s.span_id,
            state: s.state.clone(),
            start: SystemTime::now(),
            end: SystemTime::UNIX_EPOCH,
            method: s.method,
            url_full,
            upstream,
            version: protocol_version(parts.version),
            cluster: cluster.clone(),
            resend: self.attempts - 1,
            outcome: None,
        };
        let rec = match old {
            Some(mut old) => {
                *old = fresh;
                old
            }
            None => Box::new(fresh),
        };
        ClientSpan {
            inner: Some((core.clone(), rec)),
        }
    }

    /// End the SERVER span (and emit the filter spans under it).
    pub fn end(&mut self, e: &ServerEnd<'_>) {
        let Some((core, mut s)) = self.inner.take() else {
            return;
        };
        if !s.sampled {
            return;
        }
        let t = &mut s.text;
        s.outcome = Some(ServerOutcome {
            status: e.status,
            flags: t.push(e.flags),
            route: e.route.map(|r| t.push(r)),
            cluster: e.cluster.map(|c| t.push(c)),
            upstream: e.upstream,
        });
        s.filters.clear();
        s.filters
            .extend(e.filters.iter().map(|f| (new_span_id(), f.clone())));
        s.end = SystemTime::now();
        core.queue.push(Finished::Server(s));
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        // A request whose completion never ran still ends its span (without the outcome).
        if let Some((core, mut s)) = self.inner.take() {
            if s.sampled {
                s.end = SystemTime::now();
                core.queue.push(Finished::Server(s));
            }
        }
    }
}

/// An upstream attempt's CLIENT span; end it with what the upstream answered.
pub struct ClientSpan {
    inner: Option<(Arc<Core>, Box<ClientRecord>)>,
}

impl ClientSpan {
    pub fn end(mut self, result: Result<StatusCode, &ProxyError>) {
        let Some((core, mut c)) = self.inner.take() else {
            return;
        };
        c.outcome = Some(match result {
            Ok(status) => ClientOutcome::Status(status.as_u16()),
            Err(e) => ClientOutcome::Failed {
                error_type: error_type(e),
                message: e.to_string(),
            },
        });
        c.end = SystemTime::now();
        core.queue.push(Finished::Client(c));
    }
}

impl Drop for ClientSpan {
    fn drop(&mut self) {
        // An attempt abandoned before its answer (the request timed out, the client left)
        // still ends its span.
        if let Some((core, mut c)) = self.inner.take() {
            c.end = SystemTime::now();
            core.queue.push(Finished::Client(c));
        }
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
        ProxyError::StreamIdleTimeout => "stream_idle_timeout",
        _ => "_OTHER",
    }
}

/// Write the CLIENT span `span` as the upstream's parent. `server` is the SERVER span,
/// B3's parent.
fn inject(
    trace: u128,
    span: u64,
    sampled: bool,
    state: Option<&str>,
    server: u64,
    h: &mut HeaderMap,
) {
    let trace_hex = hex::<32>(trace);
    let span_hex = hex::<16>(u128::from(span));
    // B3's parent: most requests carry no B3 header and never need it.
    let server_hex = || hex::<16>(u128::from(server));
    // 00-{trace}-{span}-{flags}
    let mut tp = [0u8; 55];
    tp[..3].copy_from_slice(b"00-");
    tp[3..35].copy_from_slice(&trace_hex);
    tp[35] = b'-';
    tp[36..52].copy_from_slice(&span_hex);
    tp[52..].copy_from_slice(if sampled { b"-01" } else { b"-00" });
    if let Some(v) = header_value(&tp) {
        h.insert(TRACEPARENT.clone(), v);
    }
    let carried = Carried::scan(h);
    match state.and_then(|s| HeaderValue::from_str(s).ok()) {
        Some(v) => {
            h.insert(TRACESTATE.clone(), v);
        }
        None if carried.tracestate => {
            h.remove(&TRACESTATE);
        }
        None => {}
    }
    // Keep B3 callers' upstreams consistent: rewrite B3 headers only if the request had them.
    if carried.b3 {
        // {trace}-{span}-{sampled}-{parent}
        let mut v = [0u8; 68];
        v[..32].copy_from_slice(&trace_hex);
        v[32] = b'-';
        v[33..49].copy_from_slice(&span_hex);
        v[49..52].copy_from_slice(if sampled { b"-1-" } else { b"-0-" });
        v[52..].copy_from_slice(&server_hex());
        if let Some(v) = header_value(&v) {
            h.insert(B3.clone(), v);
        }
    }
    if carried.b3_trace {
        let server_hex = server_hex();
        for (name, value) in [
            (&B3_TRACE, &trace_hex[..]),
            (&B3_SPAN, &span_hex[..]),
            (&B3_PARENT, &server_hex[..]),
            (&B3_SAMPLED, if sampled { &b"1"[..] } else { &b"0"[..] }),
        ] {
            if let Some(v) = header_value(value) {
                h.insert(name.clone(), v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_semantic_conventions::attribute as semconv;
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
        assert_eq!(
            s.sampler,
            Sampler {
                parent_based: false,
                root: RootSampler::TraceIdRatio(0.25)
            }
        );
        let err = |env: &[(&str, &str)]| match resolve(Some(&spec), env) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("{env:?} accepted"),
        };
        let e = err(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]);
        assert!(e.contains("OTEL_EXPORTER_OTLP_PROTOCOL"), "{e}");
        assert!(
            e.contains("`http/json` is not supported: use `grpc` or `http/protobuf`"),
            "{e}"
        );
        // The per-signal variable is the one named.
        let e = err(&[
            ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
            ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "zstd"),
        ]);
        assert!(e.contains("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION"), "{e}");
        assert!(
            e.contains("`zstd` is not supported: use `gzip` or `none`"),
            "{e}"
        );
        assert!(resolve(Some(&spec), &[("OTEL_TRACES_SAMPLER", "sometimes")]).is_err());
        assert!(resolve(Some(&spec), &[("OTEL_SDK_DISABLED", "true")])
            .expect("ok")
            .is_none());
    }

    #[test]
    fn header_and_tls_variables() {
        let mut spec = TracingSpec::default();
        spec.headers.insert("X-Api-Key".into(), "manifest".into());
        spec.headers.insert("x-team".into(), "shop".into());
        spec.tls = Some(crate::config::CollectorTlsSpec {
            ca_file: Some("/etc/manifest-ca.pem".into()),
            server_name: Some("collector.internal".into()),
            ..Default::default()
        });
        let s = resolve(
            Some(&spec),
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=env,x-tenant=a%20b"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-tenant=traces"),
                ("OTEL_EXPORTER_OTLP_CERTIFICATE", "/etc/env-ca.pem"),
                ("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE", "/etc/client.pem"),
                ("OTEL_EXPORTER_OTLP_TRACES_CLIENT_KEY", "/etc/client.key"),
            ],
        )
        .expect("ok")
        .expect("on");
        let mut headers = s.headers.clone();
        headers.sort();
        assert_eq!(
            headers,
            vec![
                ("x-api-key".to_string(), "env".to_string()),
                ("x-team".to_string(), "shop".to_string()),
                ("x-tenant".to_string(), "traces".to_string()),
            ]
        );
        assert_eq!(s.tls.ca_file, Some("/etc/env-ca.pem".into()));
        assert_eq!(s.tls.cert_file, Some("/etc/client.pem".into()));
        assert_eq!(s.tls.key_file, Some("/etc/client.key".into()));
        assert_eq!(s.tls.server_name.as_deref(), Some("collector.internal"));
        let e = resolve(
            Some(&spec),
            &[("OTEL_EXPORTER_OTLP_HEADERS", "no-equals-sign")],
        )
        .expect_err("malformed");
        assert!(
            e.to_string().starts_with("OTEL_EXPORTER_OTLP_HEADERS"),
            "{e}"
        );
        assert!(resolve(Some(&spec), &[("OTEL_EXPORTER_OTLP_HEADERS", "bad name=1")]).is_err());
    }

    #[test]
    fn extract_and_inject() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        h.insert("tracestate", HeaderValue::from_static("vendor=x"));
        let p = extract(&h).expect("context");
        assert_eq!(p.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736);
        assert_eq!(p.span_id, 0x00f067aa0ba902b7);
        assert!(p.sampled);
        assert_eq!(p.state.as_deref(), Some("vendor=x"));

        let mut b3 = HeaderMap::new();
        b3.insert(
            "b3",
            HeaderValue::from_static("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1"),
        );
        let p = extract(&b3).expect("b3 single");
        assert_eq!(hex_string::<16>(u128::from(p.span_id)), "e457b5a2e4d86bd1");
        assert_eq!(p.state, None);

        inject(
            p.trace_id,
            0x1111111111111111,
            true,
            None,
            p.span_id,
            &mut b3,
        );
        assert_eq!(
            b3.get("traceparent").and_then(|v| v.to_str().ok()),
            Some("00-80f198ee56343ba864fe8b2a57d3eff7-1111111111111111-01")
        );
        assert_eq!(
            b3.get("b3").and_then(|v| v.to_str().ok()),
            Some("80f198ee56343ba864fe8b2a57d3eff7-1111111111111111-1-e457b5a2e4d86bd1")
        );

        let mut multi = HeaderMap::new();
        multi.insert("x-b3-traceid", HeaderValue::from_static("a3ce929d0e0e4736"));
        multi.insert("x-b3-spanid", HeaderValue::from_static("00f067aa0ba902b7"));
        multi.insert("tracestate", HeaderValue::from_static("stale=1"));
        let p = extract(&multi).expect("b3 multi");
        assert_eq!(p.trace_id, 0xa3ce929d0e0e4736);
        inject(p.trace_id, 0x2a, false, None, 0xbeef, &mut multi);
        let get = |k: &str| {
            multi
                .get(k)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        assert_eq!(
            get("traceparent").as_deref(),
            Some("00-0000000000000000a3ce929d0e0e4736-000000000000002a-00")
        );
        assert_eq!(
            get("x-b3-traceid").as_deref(),
            Some("0000000000000000a3ce929d0e0e4736")
        );
        assert_eq!(get("x-b3-spanid").as_deref(), Some("000000000000002a"));
        assert_eq!(
            get("x-b3-parentspanid").as_deref(),
            Some("000000000000beef")
        );
        assert_eq!(get("x-b3-sampled").as_deref(), Some("0"));
        assert_eq!(
            get("tracestate"),
            None,
            "no state of our own: the caller's is dropped"
        );
        assert!(extract(&HeaderMap::new()).is_none());
    }

    /// The sampler decides as the OpenTelemetry SDK's does, for new traces and for
    /// callers' sampled and unsampled decisions.
    #[test]
    fn same_decisions_as_the_sdk() {
        use opentelemetry::trace::{SpanContext, SpanKind, TraceContextExt as _, TraceFlags};
        use opentelemetry_sdk::trace::{Sampler as Sdk, SamplingDecision, ShouldSample as _};
        let pairs = [
            (
                Sampler::parent_based(RootSampler::TraceIdRatio(0.3)),
                Sdk::ParentBased(Box::new(Sdk::TraceIdRatioBased(0.3))),
            ),
            (
                Sampler::parent_based(RootSampler::TraceIdRatio(0.0)),
                Sdk::ParentBased(Box::new(Sdk::TraceIdRatioBased(0.0))),
            ),
            (
                Sampler::parent_based(RootSampler::TraceIdRatio(1.0)),
                Sdk::ParentBased(Box::new(Sdk::TraceIdRatioBased(1.0))),
            ),
            (
                Sampler::parent_based(RootSampler::AlwaysOff),
                Sdk::ParentBased(Box::new(Sdk::AlwaysOff)),
            ),
            (
                Sampler {
                    parent_based: false,
                    root: RootSampler::TraceIdRatio(0.5),
                },
                Sdk::TraceIdRatioBased(0.5),
            ),
            (
                Sampler {
                    parent_based: false,
                    root: RootSampler::AlwaysOn,
                },
                Sdk::AlwaysOn,
            ),
        ];
        for (ours, sdk) in &pairs {
            for _ in 0..2000 {
                let trace = new_trace_id();
                for parent in [None, Some(true), Some(false)] {
                    let cx = parent.map(|sampled| {
                        opentelemetry::Context::new().with_remote_span_context(SpanContext::new(
                            opentelemetry::trace::TraceId::from(trace),
                            opentelemetry::trace::SpanId::from(7u64),
                            if sampled {
                                TraceFlags::SAMPLED
                            } else {
                                TraceFlags::default()
                            },
                            true,
                            TraceState::default(),
                        ))
                    });
                    let want = sdk
                        .should_sample(
                            cx.as_ref(),
                            opentelemetry::trace::TraceId::from(trace),
                            "GET",
                            &SpanKind::Server,
                            &[],
                            &[],
                        )
                        .decision
                        == SamplingDecision::RecordAndSample;
                    assert_eq!(
                        ours.sample(parent, trace),
                        want,
                        "{ours:?} {parent:?} {trace:x}"
                    );
                }
            }
        }
    }

    #[test]
    fn hex_ids() {
        assert_eq!(
            hex_string::<32>(0x4bf92f3577b34da6a3ce929d0e0e4736),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(hex_string::<16>(0xab), "00000000000000ab");
    }

    #[test]
    fn authority_split() {
        assert_eq!(split_authority("a.local:8080", 80), ("a.local", 8080));
        assert_eq!(split_authority("a.local", 80), ("a.local", 80));
        assert_eq!(split_authority("[::1]:9", 80), ("::1", 9));
    }
}
