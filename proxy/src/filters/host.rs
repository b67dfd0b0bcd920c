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
///
/// Contexts are reused within a worker thread ([`RequestCtx::take`] and
/// [`RequestCtx::recycle`]): a chain that sets properties, attributes and response headers
/// on every request would otherwise allocate each of them, and the context itself, anew
/// per request (ten allocations for a typical three-filter chain, a sixth of what the
/// chain adds to a request's instructions). A reused context keeps its lists' and
/// strings' memory; its contents are cleared.
pub struct RequestCtx {
    pub info: RequestInfo,
    pub snapshot: Option<RequestSnapshot>,
    pub bag: Pairs,
    pub flags: Vec<String>,
    pub attributes: Pairs,
    pub cluster: Option<String>,
    /// Response header changes request hooks asked for (`set-response-header` effects),
    /// with the index of the filter that asked: applied when the response head arrives,
    /// at that filter's place in the reverse walk.
    pub response_ops: Vec<(usize, ResponseOp)>,
    /// `info.source_addr` as text, made on the first `source-address` call: several
    /// filters of a chain read it (e.g. a rate limit and a header template). Valid when
    /// `source_text_set`; the string keeps its memory across reuses.
    source_text: String,
    source_text_set: bool,
    /// The string `on-request-headers` gets its `prefetched` values in, kept for the next
    /// hook (see `chain::prefetch`).
    pub prefetch_text: String,
}

/// Contexts kept per worker thread for the next requests.
const CTX_KEEP: usize = 64;
/// A context whose lists and strings hold more than this is freed, not kept.
const CTX_MAX_RETAINED: usize = 8 * 1024;

thread_local! {
    // Without a destructor, as the buffer pool's: workers end with the process. Boxes,
    // because contexts travel boxed (into each hook call's store and back): keeping the
    // boxes is what saves the allocation.
    #[allow(clippy::vec_box)]
    static CTX_POOL: std::cell::RefCell<std::mem::ManuallyDrop<Vec<Box<RequestCtx>>>> =
        const { std::cell::RefCell::new(std::mem::ManuallyDrop::new(Vec::new())) };
}

impl RequestCtx {
    pub fn new(info: RequestInfo) -> Self {
        RequestCtx {
            info,
            snapshot: None,
            bag: Pairs::default(),
            flags: Vec::new(),
            attributes: Pairs::default(),
            cluster: None,
            response_ops: Vec::new(),
            source_text: String::new(),
            source_text_set: false,
            prefetch_text: String::new(),
        }
    }

    /// A context for a new request: a cleared one this thread kept, or a new one.
    pub fn take(info: RequestInfo) -> Box<Self> {
        let kept = CTX_POOL.with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()));
        match kept {
            Some(mut ctx) => {
                ctx.info = info;
                ctx
            }
            None => Box::new(RequestCtx::new(info)),
        }
    }

    /// Clear the request's values and keep the context for the next request on this
    /// thread, unless it grew large (a filter that stored big values keeps no memory).
    pub fn recycle(mut self: Box<Self>) {
        let retained = self.bag.retained()
            + self.attributes.retained()
            + self.source_text.capacity()
            + self.prefetch_text.capacity()
            + self.response_ops.capacity() * std::mem::size_of::<(usize, ResponseOp)>();
        if retained > CTX_MAX_RETAINED {
            return;
        }
        self.snapshot = None;
        self.bag.clear();
        self.flags.clear();
        self.attributes.clear();
        self.cluster = None;
        self.response_ops.clear();
        self.source_text_set = false;
        CTX_POOL.with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                if p.len() < CTX_KEEP {
                    p.push(self);
                }
            }
        });
    }

    /// The client address as `IP:PORT` text, made once per request.
    pub fn source_text(&mut self) -> &str {
        if !self.source_text_set {
            self.source_text.clear();
            write_addr(&mut self.source_text, self.info.source_addr);
            self.source_text_set = true;
        }
        &self.source_text
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

/// Key/value pairs set along a request (its bag of properties, its attributes), at most
/// `MAX_ITEMS`, each key and value at most `MAX_ITEM_LEN` bytes. Clearing keeps the
/// strings, so that the next request's values are written into the same memory.
#[derive(Default)]
pub struct Pairs {
    items: Vec<(String, String)>,
    /// Pairs in use: `items[..len]`; the rest are kept strings.
    len: usize,
}

impl Pairs {
    /// The pairs, in the order their keys were first set.
    pub fn as_slice(&self) -> &[(String, String)] {
        self.items.get(..self.len).unwrap_or_default()
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.as_slice()
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Set `key`, replacing its value. Too long a key or value, or one pair too many, is
    /// dropped.
    pub fn put(&mut self, key: &str, value: &str) {
        if key.len() > MAX_ITEM_LEN || value.len() > MAX_ITEM_LEN {
            return;
        }
        let len = self.len;
        if let Some((_, v)) = self.items.iter_mut().take(len).find(|(k, _)| k == key) {
            v.clear();
            v.push_str(value);
            return;
        }
        if len >= MAX_ITEMS {
            return;
        }
        match self.items.get_mut(len) {
            Some((k, v)) => {
                k.clear();
                k.push_str(key);
                v.clear();
                v.push_str(value);
            }
            None => self.items.push((key.to_string(), value.to_string())),
        }
        self.len += 1;
    }

    fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes of memory the pairs hold.
    fn retained(&self) -> usize {
        self.items.capacity() * std::mem::size_of::<(String, String)>()
            + self
                .items
                .iter()
                .map(|(k, v)| k.capacity() + v.capacity())
                .sum::<usize>()
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
    /// Guest strings copied out by the hand-written host functions (`hot`), kept
    /// between calls so that lifting them allocates nothing.
    pub(super) scratch: String,
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
        if is_framing(&h) {
            return Err(format!("{h} is set by the proxy from the body"));
        }
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
            scratch: String::new(),
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

    /// `set-header` (`append`: `add-header`) of the `request` interface, or of the
    /// `response` one (`response`).
    pub(super) fn change_header(
        &mut self,
        response: bool,
        name: &str,
        value: &str,
        append: bool,
    ) -> Result<(), String> {
        let h = parse_header(&mut self.names, name, value)?;
        let headers = if response {
            &mut self.response_mut()?.headers
        } else {
            &mut self.request_mut()?.headers
        };
        write_header(headers, h, append);
        Ok(())
    }

    /// `hook.add-effects`, first half: the running hook's effects buffer, taken out of the
    /// state so that the caller can append `len` bytes to it (from the instance's memory,
    /// which the store lends only while the state is not borrowed), then hand it back with
    /// [`Self::put_effects`]. None: nothing to append (outside a hook), or too much (over
    /// the instance's memory cap, which fails the hook).
    pub(super) fn take_effects(&mut self, len: usize) -> Option<Vec<u8>> {
        let call = &mut self.call;
        if matches!(call.phase, Phase::Idle | Phase::Configure) {
            return None;
        }
        if call.effects.len().saturating_add(len) > self.entry.rt.max_memory {
            call.reply_error = Some("effects larger than the instance's memory cap");
            return None;
        }
        Some(std::mem::take(&mut call.effects))
    }

    /// `hook.add-effects`, second half (see [`Self::take_effects`]).
    pub(super) fn put_effects(&mut self, buf: Vec<u8>) {
        self.call.effects = buf;
    }

    /// `host.state-take-token`.
    pub(super) fn take_token(
        &mut self,
        key: &str,
        burst: u64,
        interval_nanos: u64,
    ) -> Result<host::TokenDecision, String> {
        let at = std::time::Instant::now();
        let since = at.saturating_duration_since(self.entry.rt.epoch_start);
        let now = u64::try_from(since.as_nanos()).unwrap_or(u64::MAX);
        let d = self
            .entry
            .state
            .take_token_at(key, at, now, burst, interval_nanos)?;
        Ok(host::TokenDecision {
            allowed: d.allowed,
            remaining: d.remaining,
            reset_nanos: d.reset_ns,
            retry_after_nanos: d.retry_after_ns,
        })
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
                        ctx.bag.put(k, v);
                    }
                }
                Effect::SetAttribute(k, v) => {
                    if let Some(ctx) = self.call.ctx.as_mut() {
                        ctx.attributes.put(k, v);
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

/// Append `a` as `IP:PORT`, as `Display` writes it. IPv4 is written digit by digit: going
/// through the formatter cost more than the rest of a rate-limit filter's host work.
fn write_addr(out: &mut String, a: std::net::SocketAddr) {
    match a {
        std::net::SocketAddr::V4(v4) => {
            for (n, octet) in v4.ip().octets().into_iter().enumerate() {
                if n > 0 {
                    out.push('.');
                }
                push_decimal(out, u32::from(octet));
            }
            out.push(':');
            push_decimal(out, u32::from(v4.port()));
        }
        v6 => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// Headers a filter may not set: a message's framing is the proxy's, following the body
/// (a replaced body gets its own length); a second or stale length from a filter would
/// have the peer frame the message differently.
pub(super) fn is_framing(name: &HeaderName) -> bool {
    name == http::header::CONTENT_LENGTH || name == http::header::TRANSFER_ENCODING
}

/// A status a filter gives a response: a final one, 200..=599 (RFC 9110 §15: 1xx are
/// interim, and a client takes one sent as the answer for a preamble and waits on; codes
/// past 599 are not HTTP).
pub(super) fn final_status(status: u16) -> Result<http::StatusCode, String> {
    match status {
        200..=599 => http::StatusCode::from_u16(status).map_err(|e| e.to_string()),
        _ => Err(format!(
            "invalid status {status}: a filter's answer needs 200..=599"
        )),
    }
}

/// `v` (at most 99999: an octet or a port) in decimal, appended to `out`, without a
/// buffer in between: five of these write a client address on every request that asks.
fn push_decimal(out: &mut String, v: u32) {
    let mut started = false;
    for div in [10_000, 1_000, 100, 10, 1] {
        let d = (v / div) % 10;
        if d != 0 || started || div == 1 {
            out.push(char::from(b'0' + d as u8));
            started = true;
        }
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
        self.change_header(false, &name, &value, false)
    }
    fn add_header(&mut self, name: String, value: String) -> Result<(), String> {
        self.change_header(false, &name, &value, true)
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
        // Built from a copy: on an error the request keeps its URI.
        let mut parts = req.uri.clone().into_parts();
        parts.path_and_query = Some(pq);
        let uri = Uri::from_parts(parts).map_err(|e| format!("invalid path {path:?}: {e}"))?;
        req.uri = uri;
        Ok(())
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
        ctx.bag.get(&key).map(str::to_string)
    }
}

impl wit_response::Host for HostState {
    fn status(&mut self) -> u16 {
        self.call.resp.as_ref().map_or(0, |r| r.status.as_u16())
    }
    fn set_status(&mut self, status: u16) -> Result<(), String> {
        let s = final_status(status)?;
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
        self.change_header(true, &name, &value, false)
    }
    fn add_header(&mut self, name: String, value: String) -> Result<(), String> {
        self.change_header(true, &name, &value, true)
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
        if let Some(mut buf) = self.take_effects(effects.len()) {
            buf.extend_from_slice(&effects);
            self.put_effects(buf);
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
        self.take_token(&key, burst, interval_nanos)
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
    use super::{Pairs, RequestCtx, MAX_ITEMS};
    use crate::filters::RequestInfo;

    fn info(id: &str, addr: &str) -> RequestInfo {
        RequestInfo {
            request_id: id.into(),
            source_addr: addr.parse().expect("address"),
            peer_identity: None,
            route: "r".into(),
            scheme: "http",
            trace_ids: None,
        }
    }

    #[test]
    fn pairs_replace_and_keep_their_order_and_bounds() {
        let mut p = Pairs::default();
        p.put("a", "1");
        p.put("b", "2");
        p.put("a", "3");
        assert_eq!(p.get("a"), Some("3"));
        assert_eq!(
            p.as_slice(),
            [("a".into(), "3".into()), ("b".into(), "2".into())]
        );
        p.put("long", &"x".repeat(super::MAX_ITEM_LEN + 1));
        assert_eq!(p.get("long"), None, "too long a value is dropped");
        for i in 0..MAX_ITEMS + 5 {
            p.put(&format!("k{i}"), "v");
        }
        assert_eq!(p.as_slice().len(), MAX_ITEMS);
        p.clear();
        assert!(p.as_slice().is_empty());
        assert_eq!(
            p.get("a"),
            None,
            "cleared pairs are gone, whatever memory is kept"
        );
        p.put("c", "4");
        assert_eq!(p.as_slice(), [("c".into(), "4".into())]);
    }

    #[test]
    fn a_reused_context_carries_nothing_of_the_last_request() {
        let mut ctx = RequestCtx::take(info("one", "10.0.0.1:1000"));
        ctx.bag.put("tenant", "a");
        ctx.attributes.put("authz.rule", "admins");
        ctx.add_flag("RL");
        ctx.cluster = Some("canary".into());
        assert_eq!(ctx.source_text(), "10.0.0.1:1000");
        let first: *const RequestCtx = &*ctx;
        ctx.recycle();

        let mut ctx = RequestCtx::take(info("two", "192.168.1.20:65535"));
        assert!(
            std::ptr::eq(first, &*ctx),
            "the context was kept and reused"
        );
        assert_eq!(&*ctx.info.request_id, "two");
        assert_eq!(ctx.bag.get("tenant"), None);
        assert!(ctx.attributes.as_slice().is_empty());
        assert!(ctx.flags.is_empty());
        assert!(ctx.cluster.is_none() && ctx.snapshot.is_none());
        assert!(ctx.response_ops.is_empty());
        assert_eq!(ctx.source_text(), "192.168.1.20:65535");
    }

    #[test]
    fn a_context_that_grew_large_is_not_kept() {
        let mut ctx = RequestCtx::take(info("big", "127.0.0.1:1"));
        for i in 0..8 {
            ctx.bag.put(&format!("k{i}"), &"v".repeat(4000));
        }
        ctx.recycle();
        let again = RequestCtx::take(info("next", "127.0.0.1:2"));
        assert_eq!(
            again.bag.retained(),
            0,
            "a large context is freed, not reused"
        );
    }

    #[test]
    fn addresses_as_display_writes_them() {
        for a in [
            "0.0.0.0:0",
            "127.0.0.1:8080",
            "10.20.30.40:65535",
            "255.255.255.255:9",
            "[::1]:443",
            "[fe80::1%2]:80",
            "100.0.9.10:10000",
            "1.2.3.4:10",
        ] {
            let addr: std::net::SocketAddr = a.parse().expect("address");
            let mut text = String::new();
            super::write_addr(&mut text, addr);
            assert_eq!(text, addr.to_string());
        }
    }
}
