//! The host functions a filter imports (`wasmesh:filter/host` and `/http`), implemented on
//! the store's data, [`HostState`].
//!
//! During a hook call the store owns what the hook may see: the request parts (request
//! hooks), the response parts (response hooks), the buffered body (body hooks) and the
//! request's context (bag, flags, attributes, cluster choice). The chain moves them in
//! before the call and back out after it, so host functions read plain fields, without
//! locks, tables or copies.

use super::bindings::wasmesh::filter::{
    hook, host, request as wit_request, response as wit_response, types,
};
use super::crypto::KeyTable;
use super::effects::{self, encode_labels, Effect, MetricOp};
use super::metrics::{DynMetric, SeriesCache};
use super::slot::EntryShared;
use super::stderr::FilterOutput;
use super::RequestInfo;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, Uri};
use prometheus_client::metrics::MetricType;
use std::sync::Arc;
use wasmtime::{StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{ResourceTable, WasiCtx, WasiCtxView, WasiView};

/// Per-request values kept along the chain (bag, flags, ...): at most this many of each.
const MAX_ITEMS: usize = 64;
/// Longest key or value put in the bag or the attributes.
const MAX_ITEM_LEN: usize = 4096;
/// Metrics one instance may define.
const MAX_METRICS_PER_INSTANCE: usize = 256;

/// Which hook is running; decides what the request handle may change.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    #[default]
    Idle,
    Configure,
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    Done,
}

/// The request as the response side and `on-done` see it: a copy taken when the request
/// side of the chain finished (only when some filter has a later hook).
pub struct RequestSnapshot {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

/// What a request carries along its chain, between and across filters.
pub struct RequestCtx {
    pub info: RequestInfo,
    pub snapshot: Option<RequestSnapshot>,
    pub bag: Vec<(String, String)>,
    pub flags: Vec<String>,
    pub attributes: Vec<(String, String)>,
    pub cluster: Option<String>,
    /// Response header changes request hooks asked for (`set-response-header` effects),
    /// with the index of the filter that asked: applied when the response head arrives,
    /// at that filter's place in the reverse walk.
    pub response_ops: Vec<(usize, ResponseOp)>,
    /// `info.source_addr` as text, made on the first `source-address` call: several
    /// filters of a chain read it (e.g. a rate limit and a header template).
    source_text: Option<String>,
}

impl RequestCtx {
    pub fn new(info: RequestInfo) -> Self {
        RequestCtx {
            info,
            snapshot: None,
            bag: Vec::new(),
            flags: Vec::new(),
            attributes: Vec::new(),
            cluster: None,
            response_ops: Vec::new(),
            source_text: None,
        }
    }

    /// The client address as `IP:PORT` text, made once per request.
    pub fn source_text(&mut self) -> &str {
        self.source_text
            .get_or_insert_with(|| addr_text(self.info.source_addr))
    }

    pub fn add_flag(&mut self, flag: &str) {
        let flag = flag.trim();
        if !flag.is_empty()
            && flag.len() <= 32
            && self.flags.len() < MAX_ITEMS
            && !self.flags.iter().any(|f| f == flag)
        {
            self.flags.push(flag.to_string());
        }
    }
}

/// A response header change a filter asked for from a request hook.
#[derive(Debug)]
pub enum ResponseOp {
    Set(HeaderName, HeaderValue),
    Add(HeaderName, HeaderValue),
    Remove(HeaderName),
}

impl ResponseOp {
    fn parse(e: &Effect<'_>, names: &mut HeaderNames) -> Result<Option<ResponseOp>, String> {
        let mut name = |n: &[u8]| names.get(n);
        let value = |n: &[u8], v: &[u8]| {
            HeaderValue::from_bytes(v)
                .map_err(|_| format!("invalid value for header {:?}", String::from_utf8_lossy(n)))
        };
        Ok(Some(match *e {
            Effect::SetResponseHeader(n, v) => ResponseOp::Set(name(n)?, value(n, v)?),
            Effect::AddResponseHeader(n, v) => ResponseOp::Add(name(n)?, value(n, v)?),
            Effect::RemoveResponseHeader(n) => ResponseOp::Remove(name(n)?),
            _ => return Ok(None),
        }))
    }

    /// Apply to a response's headers.
    pub fn apply(self, headers: &mut HeaderMap) {
        match self {
            ResponseOp::Set(n, v) => {
                headers.insert(n, v);
            }
            ResponseOp::Add(n, v) => {
                headers.append(n, v);
            }
            ResponseOp::Remove(n) => {
                headers.remove(n);
            }
        }
    }
}

/// What one hook call may see; moved into the store for the call.
#[derive(Default)]
pub struct CallData {
    pub phase: Phase,
    pub req: Option<http::request::Parts>,
    pub resp: Option<http::response::Parts>,
    pub body: Option<Bytes>,
    pub body_replaced: bool,
    pub ctx: Option<Box<RequestCtx>>,
    /// What the hook handed with `hook.set-action` (none: continue).
    pub action: Option<types::Action>,
    /// What the hook handed with `hook.add-effects`, applied once it returns.
    pub effects: Vec<u8>,
    /// The hook misused `hook` (e.g. two actions): it fails once it returns.
    pub reply_error: Option<&'static str>,
}

/// The data of one filter instance's `Store`.
pub struct HostState {
    pub limits: StoreLimits,
    wasi: WasiCtx,
    table: ResourceTable,
    /// The instance's stdout and stderr, as log lines.
    output: Arc<FilterOutput>,
    pub entry: Arc<EntryShared>,
    metrics: Vec<Arc<DynMetric>>,
    /// Series this instance recorded to (see [`SeriesCache`]).
    series: SeriesCache,
    /// Signature keys the instance made (`verifying-key`), by handle.
    pub keys: KeyTable,
    /// Header names this instance wrote, parsed (see [`HeaderNames`]).
    names: HeaderNames,
    pub call: CallData,
}

/// Header names a filter writes, parsed once per instance: a filter sets the same few
/// names on every request, and parsing a name that is not a standard one allocates.
/// Bounded: past [`HeaderNames::MAX`] names, new ones are parsed each time.
#[derive(Default)]
struct HeaderNames(Vec<(Box<[u8]>, HeaderName)>);

impl HeaderNames {
    const MAX: usize = 32;

    fn get(&mut self, n: &[u8]) -> Result<HeaderName, String> {
        if let Some((_, h)) = self.0.iter().find(|(k, _)| **k == *n) {
            return Ok(h.clone());
        }
        let h = HeaderName::from_bytes(n)
            .map_err(|_| format!("invalid header name {:?}", String::from_utf8_lossy(n)))?;
        if self.0.len() < Self::MAX {
            self.0.push((n.into(), h.clone()));
        }
        Ok(h)
    }
}

impl HostState {
    pub fn new(entry: Arc<EntryShared>, max_memory: usize) -> Self {
        // No filesystem, network, environment or arguments: WASI is linked only so that
        // filters built with panics or in debug load; stdout and stderr go to the log
        // (panic messages, `eprintln!`).
        let output = FilterOutput::new(&entry.name);
        let wasi = WasiCtx::builder()
            .stdout(output.stream(false))
            .stderr(output.stream(true))
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            limits: StoreLimitsBuilder::new()
                .memory_size(max_memory)
                .instances(64)
                .tables(64)
                .memories(16)
                .trap_on_grow_failure(true)
                .build(),
            wasi,
            table: ResourceTable::new(),
            output,
            entry,
            metrics: Vec::new(),
            series: SeriesCache::default(),
            keys: KeyTable::default(),
            names: HeaderNames::default(),
            call: CallData::default(),
        }
    }

    /// The WASI resource table (streams, pollables).
    pub(super) fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    /// A call into the instance ended: flush its unfinished output lines.
    pub fn end_call(&self) {
        self.output.end_call();
    }

    fn request_view(&self) -> Option<(&Method, &Uri, &HeaderMap)> {
        if let Some(p) = &self.call.req {
            return Some((&p.method, &p.uri, &p.headers));
        }
        let s = self.call.ctx.as_ref()?.snapshot.as_ref()?;
        Some((&s.method, &s.uri, &s.headers))
    }

    fn info(&self) -> Option<&RequestInfo> {
        self.call.ctx.as_ref().map(|c| &c.info)
    }

    fn request_mut(&mut self) -> Result<&mut http::request::Parts, String> {
        self.call
            .req
            .as_mut()
            .ok_or_else(|| "the request can only be changed in request hooks".to_string())
    }

    fn response_mut(&mut self) -> Result<&mut http::response::Parts, String> {
        self.call
            .resp
            .as_mut()
            .ok_or_else(|| "no response in this hook".to_string())
    }

    /// Apply the effects a hook returned, in order; `idx` is the filter's place in the
    /// chain (for response headers asked from the request side). An effect the host
    /// refuses (e.g. an invalid header name) is skipped and logged: the hook already
    /// returned. A buffer out of format is an error (the entries before it stay applied).
    pub fn apply_effects(&mut self, idx: usize, buf: &[u8]) -> Result<(), String> {
        for e in effects::decode(buf) {
            let e = e?;
            match e {
                Effect::SetProperty(k, v) => {
                    if let Some(ctx) = self.call.ctx.as_mut() {
                        put(&mut ctx.bag, k, v);
                    }
                }
                Effect::SetAttribute(k, v) => {
                    if let Some(ctx) = self.call.ctx.as_mut() {
                        put(&mut ctx.attributes, k, v);
                    }
                }
                Effect::ResponseFlag(f) => {
                    if let Some(ctx) = self.call.ctx.as_mut() {
                        ctx.add_flag(f);
                    }
                }
                Effect::Metric { metric, op, labels } => self.record(metric, labels, op),
                header_op => self.response_op(idx, &header_op),
            }
        }
        Ok(())
    }

    fn response_op(&mut self, idx: usize, e: &Effect<'_>) {
        let op = match ResponseOp::parse(e, &mut self.names) {
            Ok(Some(op)) => op,
            Ok(None) => return,
            Err(err) => {
                tracing::debug!(target: "wasmesh::filter", filter = %self.entry.name, error = %err, "response header not changed");
                return;
            }
        };
        if let Some(resp) = self.call.resp.as_mut() {
            op.apply(&mut resp.headers);
            return;
        }
        match (self.call.phase, self.call.ctx.as_mut()) {
            (Phase::RequestHeaders | Phase::RequestBody, Some(ctx))
                if ctx.response_ops.len() < MAX_ITEMS =>
            {
                ctx.response_ops.push((idx, op));
            }
            _ => {
                tracing::debug!(target: "wasmesh::filter", filter = %self.entry.name, "response header change with no response to apply it to");
            }
        }
    }

    /// `labels`: encoded as in a metric effect (see [`effects::encode_labels`]).
    fn record(&mut self, metric: u32, labels: &[u8], op: MetricOp) {
        let Some((idx, m)) = usize::try_from(metric)
            .ok()
            .and_then(|i| Some((i, self.metrics.get(i)?)))
        else {
            return;
        };
        if self.series.record(idx, m, &self.entry.name, labels, op) {
            self.entry.overflow(m.as_ref());
        }
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// `a` as `IP:PORT`, as `Display` writes it. IPv4 is written digit by digit: going
/// through the formatter cost more than the rest of a rate-limit filter's host work.
fn addr_text(a: std::net::SocketAddr) -> String {
    match a {
        std::net::SocketAddr::V4(v4) => {
            let mut out = String::with_capacity(21);
            let mut digits = [0; 5];
            for (n, octet) in v4.ip().octets().into_iter().enumerate() {
                if n > 0 {
                    out.push('.');
                }
                out.push_str(crate::text::u16_decimal(u16::from(octet), &mut digits));
            }
            out.push(':');
            out.push_str(crate::text::u16_decimal(v4.port(), &mut digits));
            out
        }
        v6 => v6.to_string(),
    }
}

fn lossy(v: &HeaderValue) -> String {
    match v.to_str() {
        Ok(s) => s.to_string(),
        Err(_) => String::from_utf8_lossy(v.as_bytes()).into_owned(),
    }
}

fn first(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get(name).map(lossy)
}

fn all(headers: &HeaderMap, name: &str) -> Vec<String> {
    headers.get_all(name).iter().map(lossy).collect()
}

fn list(headers: &HeaderMap) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str().to_string(), lossy(v)))
        .collect()
}

fn parse_header(
    names: &mut HeaderNames,
    name: &str,
    value: &str,
) -> Result<(HeaderName, HeaderValue), String> {
    let n = names.get(name.as_bytes())?;
    let v =
        HeaderValue::from_str(value).map_err(|_| format!("invalid value for header {name:?}"))?;
    Ok((n, v))
}

fn write_header(headers: &mut HeaderMap, (n, v): (HeaderName, HeaderValue), append: bool) {
    if append {
        headers.append(n, v);
    } else {
        headers.insert(n, v);
    }
}

/// Set `key` in a per-request list (bag or attributes), replacing its value.
fn put(list: &mut Vec<(String, String)>, key: &str, value: &str) {
    if key.len() > MAX_ITEM_LEN || value.len() > MAX_ITEM_LEN {
        return;
    }
    if let Some(slot) = list.iter_mut().find(|(k, _)| k == key) {
        value.clone_into(&mut slot.1);
        return;
    }
    if list.len() < MAX_ITEMS {
        list.push((key.to_string(), value.to_string()));
    }
}

impl types::Host for HostState {}
impl wit_request::Host for HostState {
    fn id(&mut self) -> String {
        self.info()
            .map(|i| i.request_id.to_string())
            .unwrap_or_default()
    }
    fn method(&mut self) -> String {
        self.request_view()
            .map(|(m, _, _)| m.as_str().to_string())
            .unwrap_or_default()
    }
    fn scheme(&mut self) -> String {
        self.info()
            .map(|i| i.scheme.to_string())
            .unwrap_or_default()
    }
    fn authority(&mut self) -> Option<String> {
        let (_, uri, headers) = self.request_view()?;
        uri.authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| first(headers, "host"))
    }
    fn path(&mut self) -> String {
        self.request_view()
            .map(|(_, u, _)| u.path().to_string())
            .unwrap_or_default()
    }
    fn query(&mut self) -> Option<String> {
        self.request_view()?.1.query().map(str::to_string)
    }
    fn header(&mut self, name: String) -> Option<String> {
        first(self.request_view()?.2, &name)
    }
    fn header_all(&mut self, name: String) -> Vec<String> {
        self.request_view()
            .map(|(_, _, h)| all(h, &name))
            .unwrap_or_default()
    }
    fn headers(&mut self) -> Vec<(String, String)> {
        self.request_view()
            .map(|(_, _, h)| list(h))
            .unwrap_or_default()
    }
    fn set_header(&mut self, name: String, value: String) -> Result<(), String> {
        let h = parse_header(&mut self.names, &name, &value)?;
        write_header(&mut self.request_mut()?.headers, h, false);
        Ok(())
    }
    fn add_header(&mut self, name: String, value: String) -> Result<(), String> {
        let h = parse_header(&mut self.names, &name, &value)?;
        write_header(&mut self.request_mut()?.headers, h, true);
        Ok(())
    }
    fn remove_header(&mut self, name: String) -> Result<(), String> {
        let n = self.names.get(name.as_bytes())?;
        self.request_mut()?.headers.remove(n);
        Ok(())
    }
    fn set_path(&mut self, path: String) -> Result<(), String> {
        if !path.starts_with('/') {
            return Err("path must start with '/'".to_string());
        }
        let req = self.request_mut()?;
        let pq: http::uri::PathAndQuery =
            path.parse().map_err(|_| format!("invalid path {path:?}"))?;
        let mut parts = std::mem::take(&mut req.uri).into_parts();
        parts.path_and_query = Some(pq);
        match Uri::from_parts(parts) {
            Ok(uri) => {
                req.uri = uri;
                Ok(())
            }
            Err(e) => Err(format!("invalid path {path:?}: {e}")),
        }
    }
    fn body(&mut self) -> Vec<u8> {
        match (self.call.phase, &self.call.body) {
            (Phase::RequestBody, Some(b)) => b.to_vec(),
            _ => Vec::new(),
        }
    }
    fn set_body(&mut self, body: Vec<u8>) -> Result<(), String> {
        if self.call.phase != Phase::RequestBody {
            return Err("the request body can only be replaced in on-request-body".to_string());
        }
        self.call.body = Some(Bytes::from(body));
        self.call.body_replaced = true;
        Ok(())
    }
    fn source_address(&mut self) -> String {
        self.call
            .ctx
            .as_deref_mut()
            .map(|c| c.source_text().to_string())
            .unwrap_or_default()
    }
    fn peer_identity(&mut self) -> Option<String> {
        self.info()?.peer_identity.as_deref().map(str::to_string)
    }
    fn route_name(&mut self) -> String {
        self.info().map(|i| i.route.to_string()).unwrap_or_default()
    }
    fn trace_id(&mut self) -> Option<String> {
        Some(self.info()?.trace_ids?.trace_hex())
    }
    fn span_id(&mut self) -> Option<String> {
        Some(self.info()?.trace_ids?.span_hex())
    }
    fn set_cluster(&mut self, cluster: String) -> Result<(), String> {
        if !matches!(self.call.phase, Phase::RequestHeaders | Phase::RequestBody) {
            return Err("the cluster can only be chosen in request hooks".to_string());
        }
        if !self.entry.clusters.contains(&cluster) {
            return Err(format!(
                "cluster {cluster:?} is not in filter {}'s clusters list",
                self.entry.name
            ));
        }
        if let Some(ctx) = self.call.ctx.as_mut() {
            ctx.cluster = Some(cluster);
        }
        Ok(())
    }
    fn get_property(&mut self, key: String) -> Option<String> {
        let ctx = self.call.ctx.as_ref()?;
        ctx.bag
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.clone())
    }
}

impl wit_response::Host for HostState {
    fn status(&mut self) -> u16 {
        self.call.resp.as_ref().map_or(0, |r| r.status.as_u16())
    }
    fn set_status(&mut self, status: u16) -> Result<(), String> {
        let s =
            http::StatusCode::from_u16(status).map_err(|_| format!("invalid status {status}"))?;
        self.response_mut()?.status = s;
        Ok(())
    }
    fn header(&mut self, name: String) -> Option<String> {
        first(&self.call.resp.as_ref()?.headers, &name)
    }
    fn header_all(&mut self, name: String) -> Vec<String> {
        self.call
            .resp
            .as_ref()
            .map(|r| all(&r.headers, &name))
            .unwrap_or_default()
    }
    fn headers(&mut self) -> Vec<(String, String)> {
        self.call
            .resp
            .as_ref()
            .map(|r| list(&r.headers))
            .unwrap_or_default()
    }
    fn set_header(&mut self, name: String, value: String) -> Result<(), String> {
        let h = parse_header(&mut self.names, &name, &value)?;
        write_header(&mut self.response_mut()?.headers, h, false);
        Ok(())
    }
    fn add_header(&mut self, name: String, value: String) -> Result<(), String> {
        let h = parse_header(&mut self.names, &name, &value)?;
        write_header(&mut self.response_mut()?.headers, h, true);
        Ok(())
    }
    fn remove_header(&mut self, name: String) -> Result<(), String> {
        let n = self.names.get(name.as_bytes())?;
        self.response_mut()?.headers.remove(n);
        Ok(())
    }
    fn body(&mut self) -> Vec<u8> {
        match (self.call.phase, &self.call.body) {
            (Phase::ResponseBody, Some(b)) => b.to_vec(),
            _ => Vec::new(),
        }
    }
    fn set_body(&mut self, body: Vec<u8>) -> Result<(), String> {
        if self.call.phase != Phase::ResponseBody {
            return Err("the response body can only be replaced in on-response-body".to_string());
        }
        self.call.body = Some(Bytes::from(body));
        self.call.body_replaced = true;
        Ok(())
    }
}

impl hook::Host for HostState {
    fn set_action(&mut self, action: types::Action) {
        let call = &mut self.call;
        if matches!(call.phase, Phase::Idle | Phase::Configure | Phase::Done) {
            call.reply_error = Some("hook.set-action is only for hooks that can act");
        } else if call.action.is_some() {
            call.reply_error = Some("hook.set-action called twice in one hook");
        } else {
            call.action = Some(action);
        }
    }
    fn add_effects(&mut self, effects: Vec<u8>) {
        let call = &mut self.call;
        if matches!(call.phase, Phase::Idle | Phase::Configure) {
            return;
        }
        // Bounded like a reply read from the instance's memory was: by that memory's cap.
        if call.effects.len().saturating_add(effects.len()) > self.entry.rt.max_memory {
            call.reply_error = Some("effects larger than the instance's memory cap");
        } else if call.effects.is_empty() {
            call.effects = effects;
        } else {
            call.effects.extend_from_slice(&effects);
        }
    }
}

impl host::Host for HostState {
    fn log(&mut self, level: types::LogLevel, message: String) {
        let filter = self.entry.name.as_str();
        let message: String = message.chars().take(8192).collect();
        match level {
            types::LogLevel::Trace => {
                tracing::trace!(target: "wasmesh::filter", filter, "{message}")
            }
            types::LogLevel::Debug => {
                tracing::debug!(target: "wasmesh::filter", filter, "{message}")
            }
            types::LogLevel::Info => tracing::info!(target: "wasmesh::filter", filter, "{message}"),
            types::LogLevel::Warn => tracing::warn!(target: "wasmesh::filter", filter, "{message}"),
            types::LogLevel::Error => {
                tracing::error!(target: "wasmesh::filter", filter, "{message}")
            }
        }
    }

    fn define_metric(
        &mut self,
        kind: types::MetricKind,
        name: String,
        help: String,
        labels: Vec<String>,
        buckets: Vec<f64>,
    ) -> Result<u32, String> {
        let kind = match kind {
            types::MetricKind::Counter => MetricType::Counter,
            types::MetricKind::Gauge => MetricType::Gauge,
            types::MetricKind::Histogram => MetricType::Histogram,
        };
        let m = self
            .entry
            .rt
            .dyn_metrics
            .define(kind, &name, &help, &labels, &buckets)?;
        if let Some(i) = self.metrics.iter().position(|x| Arc::ptr_eq(x, &m)) {
            return u32::try_from(i).map_err(|_| "too many metrics".to_string());
        }
        if self.metrics.len() >= MAX_METRICS_PER_INSTANCE {
            return Err(format!(
                "at most {MAX_METRICS_PER_INSTANCE} metrics per filter"
            ));
        }
        self.metrics.push(m);
        u32::try_from(self.metrics.len() - 1).map_err(|_| "too many metrics".to_string())
    }
    // Outside hooks (a hook's updates come as effects): encoded like an effect's labels.
    fn counter_add(&mut self, metric: u32, labels: Vec<String>, value: u64) {
        self.record(metric, &encode_labels(&labels), MetricOp::CounterAdd(value))
    }
    fn gauge_set(&mut self, metric: u32, labels: Vec<String>, value: i64) {
        self.record(metric, &encode_labels(&labels), MetricOp::GaugeSet(value))
    }
    fn gauge_add(&mut self, metric: u32, labels: Vec<String>, value: i64) {
        self.record(metric, &encode_labels(&labels), MetricOp::GaugeAdd(value))
    }
    fn histogram_observe(&mut self, metric: u32, labels: Vec<String>, value: f64) {
        self.record(metric, &encode_labels(&labels), MetricOp::Observe(value))
    }

    fn state_get(&mut self, key: String) -> Option<Vec<u8>> {
        self.entry.state.get(&key)
    }
    fn state_set(&mut self, key: String, value: Vec<u8>, ttl_millis: u64) -> Result<(), String> {
        self.entry.state.set(&key, value, ttl_millis)
    }
    fn state_compare_and_swap(
        &mut self,
        key: String,
        expected: Option<Vec<u8>>,
        value: Vec<u8>,
        ttl_millis: u64,
    ) -> Result<bool, String> {
        self.entry
            .state
            .compare_and_swap(&key, expected.as_deref(), value, ttl_millis)
    }
    fn state_increment(&mut self, key: String, delta: i64, ttl_millis: u64) -> Result<i64, String> {
        self.entry.state.increment(&key, delta, ttl_millis)
    }
    fn state_take_token(
        &mut self,
        key: String,
        burst: u64,
        interval_nanos: u64,
    ) -> Result<host::TokenDecision, String> {
        let now = self.monotonic_nanos();
        let d = self
            .entry
            .state
            .take_token(&key, now, burst, interval_nanos)?;
        Ok(host::TokenDecision {
            allowed: d.allowed,
            remaining: d.remaining,
            reset_nanos: d.reset_ns,
            retry_after_nanos: d.retry_after_ns,
        })
    }
    fn state_delete(&mut self, key: String) -> bool {
        self.entry.state.delete(&key)
    }
    fn state_list_keys(&mut self, prefix: String, limit: u32) -> Vec<String> {
        self.entry.state.list_keys(&prefix, limit)
    }

    fn now_unix_nanos(&mut self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
    fn monotonic_nanos(&mut self) -> u64 {
        u64::try_from(self.entry.rt.epoch_start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
    fn random_u64(&mut self) -> u64 {
        rand::random()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses_as_display_writes_them() {
        for a in [
            "0.0.0.0:0",
            "127.0.0.1:8080",
            "10.20.30.40:65535",
            "255.255.255.255:9",
            "[::1]:443",
            "[fe80::1%2]:80",
        ] {
            let addr: std::net::SocketAddr = a.parse().expect("address");
            assert_eq!(super::addr_text(addr), addr.to_string());
        }
    }
}
