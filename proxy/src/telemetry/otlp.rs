//! Finished spans on their way out: the plain records the request path hands over, their
//! OTLP protobuf encoding, and the two transports (OTLP/gRPC, OTLP/HTTP with protobuf).
//!
//! Why not the OpenTelemetry SDK's `SpanData` and the `opentelemetry-otlp` exporter: that
//! path builds every attribute as an owned `KeyValue` on the worker, copies each one again
//! into the generated protobuf structs on the exporter thread, and encodes those. At 100%
//! sampling that was most of the 8.7 µs tracing added to a request. Here a record keeps
//! what the request path knew (ids as integers, `&'static str` names, the request's
//! strings in one buffer) and is written straight to protobuf bytes, once, on the exporter
//! thread, with the message layout of `opentelemetry-proto` (the unit tests decode the
//! output with it).
//!
//! What it must not do: run on a worker thread (only [`ServerRecord`]/[`ClientRecord`] are
//! built there), or block: every export is bounded by the caller's `export_timeout`.

use crate::telemetry::otel::FilterTiming;
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry_sdk::resource::Resource;
use opentelemetry_semantic_conventions::attribute as semconv;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// wasmesh's own span attributes (no OpenTelemetry convention covers them).
pub mod attr {
    pub const ROUTE: &str = "wasmesh.route";
    pub const CLUSTER: &str = "wasmesh.cluster";
    pub const RESPONSE_FLAGS: &str = "wasmesh.response_flags";
    pub const UPSTREAM: &str = "wasmesh.upstream";
    pub const FILTER_NAME: &str = "wasmesh.filter.name";
    pub const FILTER_VERSION: &str = "wasmesh.filter.version";
    pub const FILTER_HOOK: &str = "wasmesh.filter.hook";
    pub const METHOD_ORIGINAL: &str = "http.request.method_original";
}

/// Several strings of one span in one allocation (a request's path, host, ...).
#[derive(Debug, Default)]
pub(crate) struct Text(String);

/// Where one string sits in a [`Text`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Slot {
    start: u32,
    end: u32,
}

impl Text {
    #[cfg(test)]
    pub(crate) fn with_capacity(n: usize) -> Self {
        Self(String::with_capacity(n))
    }

    /// Empty, keeping the allocation (records are reused), with room for `n` bytes.
    pub(crate) fn reuse(mut self, n: usize) -> Self {
        self.0.clear();
        self.0.reserve(n);
        self
    }

    pub(crate) fn push(&mut self, s: &str) -> Slot {
        let start = self.0.len();
        self.0.push_str(s);
        Slot {
            start: u32::try_from(start).unwrap_or(u32::MAX),
            end: u32::try_from(self.0.len()).unwrap_or(u32::MAX),
        }
    }

    pub(crate) fn get(&self, s: Slot) -> &str {
        self.0
            .get(s.start as usize..s.end as usize)
            .unwrap_or_default()
    }
}

/// A request's SERVER span, and the filter spans under it, as the request path saw them.
#[derive(Debug)]
pub(crate) struct ServerRecord {
    pub trace_id: u128,
    pub span_id: u64,
    /// The caller's span (from `traceparent` or B3), if the request carried one.
    pub parent: Option<u64>,
    pub sampled: bool,
    /// `tracestate` as it is propagated (validated, re-serialised).
    pub state: Option<Arc<str>>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: &'static str,
    /// Set only for methods outside the conventions' list (`method` is `_OTHER`).
    pub method_original: Option<Slot>,
    pub https: bool,
    pub server_port: u16,
    pub peer: SocketAddr,
    pub version: &'static str,
    pub text: Text,
    pub path: Slot,
    pub query: Option<Slot>,
    pub host: Option<Slot>,
    pub user_agent: Option<Slot>,
    /// `http.route`: the matched route's path template.
    pub template: Option<Arc<str>>,
    /// `None`: the request never reached its end (the client went away).
    pub outcome: Option<ServerOutcome>,
    /// Each filter hook that ran, with the span id it gets.
    pub filters: Vec<(u64, FilterTiming)>,
}

#[derive(Debug)]
pub(crate) struct ServerOutcome {
    pub status: u16,
    pub flags: Slot,
    pub route: Option<Slot>,
    pub cluster: Option<Slot>,
    pub upstream: Option<SocketAddr>,
}

/// One upstream attempt's CLIENT span (recorded only for sampled requests).
#[derive(Debug)]
pub(crate) struct ClientRecord {
    pub trace_id: u128,
    pub span_id: u64,
    /// The SERVER span.
    pub parent: u64,
    pub state: Option<Arc<str>>,
    pub start: SystemTime,
    pub end: SystemTime,
    pub method: &'static str,
    pub url_full: String,
    pub upstream: SocketAddr,
    pub version: &'static str,
    pub cluster: Arc<str>,
    /// `http.request.resend_count` (0: the first attempt, attribute left out).
    pub resend: u32,
    /// `None`: the attempt was abandoned before an answer (timeout of the whole request,
    /// client gone).
    pub outcome: Option<ClientOutcome>,
}

#[derive(Debug)]
pub(crate) enum ClientOutcome {
    Status(u16),
    Failed {
        error_type: &'static str,
        message: String,
    },
}

/// What the request path hands to the exporter.
#[derive(Debug)]
pub(crate) enum Finished {
    Server(Box<ServerRecord>),
    Client(Box<ClientRecord>),
}

impl Finished {
    /// Spans this record becomes (a SERVER record carries its filter spans).
    pub(crate) fn spans(&self) -> usize {
        match self {
            Finished::Server(s) => 1 + s.filters.len(),
            Finished::Client(_) => 1,
        }
    }
}

// ------------------------------------------------------------------ protobuf wire format

const VARINT: u32 = 0;
const I64: u32 = 1;
const LEN: u32 = 2;
const I32: u32 = 5;

// opentelemetry.proto.trace.v1.Span.SpanKind and Status.StatusCode.
const KIND_INTERNAL: u64 = 1;
const KIND_SERVER: u64 = 2;
const KIND_CLIENT: u64 = 3;
const STATUS_ERROR: u64 = 2;
// opentelemetry.proto.trace.v1.SpanFlags.
const FLAG_SAMPLED: u32 = 0x1;
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
const FLAG_IS_REMOTE: u32 = 0x200;

#[inline]
fn varint(buf: &mut Vec<u8>, mut v: u64) {
    if v < 0x80 {
        buf.push(v as u8);
        return;
    }
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

#[inline]
fn varint_len(v: u64) -> usize {
    // 1 byte per started 7 bits; 0 takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
fn key(buf: &mut Vec<u8>, field: u32, wire: u32) {
    varint(buf, u64::from((field << 3) | wire));
}

#[inline]
fn key_len(field: u32) -> usize {
    varint_len(u64::from(field << 3))
}

/// A length-delimited field whose content is `parts` one after the other.
#[inline]
fn str_field(buf: &mut Vec<u8>, field: u32, parts: &[&str]) {
    let n: usize = parts.iter().map(|p| p.len()).sum();
    key(buf, field, LEN);
    varint(buf, n as u64);
    for p in parts {
        buf.extend_from_slice(p.as_bytes());
    }
}

#[inline]
fn bytes_field(buf: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(buf, field, LEN);
    varint(buf, b.len() as u64);
    buf.extend_from_slice(b);
}

#[inline]
fn fixed64(buf: &mut Vec<u8>, field: u32, v: u64) {
    key(buf, field, I64);
    buf.extend_from_slice(&v.to_le_bytes());
}

/// An attribute value (`opentelemetry.proto.common.v1.AnyValue`).
enum Val<'a> {
    Str(&'a [&'a str]),
    Int(i64),
    Bool(bool),
    F64(f64),
}

impl Val<'_> {
    /// Length of the encoded AnyValue message.
    fn len(&self) -> usize {
        match self {
            Val::Str(parts) => {
                let n: usize = parts.iter().map(|p| p.len()).sum();
                1 + varint_len(n as u64) + n
            }
            Val::Int(v) => 1 + varint_len(*v as u64),
            Val::Bool(_) => 2,
            Val::F64(_) => 9,
        }
    }

    fn write(&self, buf: &mut Vec<u8>) {
        match self {
            Val::Str(parts) => str_field(buf, 1, parts),
            Val::Bool(b) => {
                key(buf, 2, VARINT);
                buf.push(u8::from(*b));
            }
            Val::Int(v) => {
                key(buf, 3, VARINT);
                varint(buf, *v as u64);
            }
            Val::F64(v) => fixed64(buf, 4, v.to_bits()),
        }
    }
}

/// A `KeyValue` as field `field` of the enclosing message (9 in a Span, 1 in a Resource).
fn kv(buf: &mut Vec<u8>, field: u32, k: &str, v: Val<'_>) {
    let av = v.len();
    let body = 1 + varint_len(k.len() as u64) + k.len() + 1 + varint_len(av as u64) + av;
    key(buf, field, LEN);
    varint(buf, body as u64);
    str_field(buf, 1, &[k]);
    key(buf, 2, LEN);
    varint(buf, av as u64);
    v.write(buf);
}

/// A string attribute of a span (field 9): the bulk of what is encoded, so written
/// without the general [`kv`]'s slices of parts.
#[inline]
fn attr_str(buf: &mut Vec<u8>, k: &str, v: &str) {
    let av = 1 + varint_len(v.len() as u64) + v.len();
    let body = 2 + varint_len(k.len() as u64) + k.len() + varint_len(av as u64) + av;
    if body < 0x80 {
        // Every length fits in one byte (nearly every attribute): two fixed headers.
        buf.reserve(2 + body);
        buf.extend_from_slice(&[0x4a, body as u8, 0x0a, k.len() as u8]);
        buf.extend_from_slice(k.as_bytes());
        buf.extend_from_slice(&[0x12, av as u8, 0x0a, v.len() as u8]);
        buf.extend_from_slice(v.as_bytes());
        return;
    }
    buf.reserve(1 + varint_len(body as u64) + body);
    buf.push(0x4a); // field 9, length-delimited
    varint(buf, body as u64);
    buf.push(0x0a); // KeyValue.key
    varint(buf, k.len() as u64);
    buf.extend_from_slice(k.as_bytes());
    buf.push(0x12); // KeyValue.value
    varint(buf, av as u64);
    buf.push(0x0a); // AnyValue.string_value
    varint(buf, v.len() as u64);
    buf.extend_from_slice(v.as_bytes());
}

#[inline]
fn attr_int(buf: &mut Vec<u8>, k: &str, v: i64) {
    // int64 is a plain varint: negative numbers take ten bytes.
    let av = 1 + varint_len(v as u64);
    let body = 2 + varint_len(k.len() as u64) + k.len() + varint_len(av as u64) + av;
    if body < 0x80 {
        // Every length fits in one byte (every attribute we write): fixed headers.
        buf.reserve(2 + body);
        buf.extend_from_slice(&[0x4a, body as u8, 0x0a, k.len() as u8]);
        buf.extend_from_slice(k.as_bytes());
        buf.extend_from_slice(&[0x12, av as u8, 0x18]);
        varint(buf, v as u64);
        return;
    }
    buf.reserve(1 + varint_len(body as u64) + body);
    buf.push(0x4a); // field 9, length-delimited
    varint(buf, body as u64);
    buf.push(0x0a); // KeyValue.key
    varint(buf, k.len() as u64);
    buf.extend_from_slice(k.as_bytes());
    buf.push(0x12); // KeyValue.value
    varint(buf, av as u64);
    buf.push(0x18); // AnyValue.int_value
    varint(buf, v as u64);
}

#[inline]
fn nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| {
        d.as_secs()
            .saturating_mul(1_000_000_000)
            .saturating_add(u64::from(d.subsec_nanos()))
    })
}

/// What every span starts with (Span fields 1 to 8, in field order).
struct Head<'a> {
    trace_id: u128,
    span_id: u64,
    state: Option<&'a str>,
    parent: Option<u64>,
    name: &'a [&'a str],
    kind: u64,
    start: SystemTime,
    end: SystemTime,
}

#[inline]
fn head(buf: &mut Vec<u8>, h: &Head<'_>) {
    bytes_field(buf, 1, &h.trace_id.to_be_bytes());
    bytes_field(buf, 2, &h.span_id.to_be_bytes());
    if let Some(s) = h.state.filter(|s| !s.is_empty()) {
        str_field(buf, 3, &[s]);
    }
    if let Some(p) = h.parent {
        bytes_field(buf, 4, &p.to_be_bytes());
    }
    str_field(buf, 5, h.name);
    key(buf, 6, VARINT);
    varint(buf, h.kind);
    fixed64(buf, 7, nanos(h.start));
    fixed64(buf, 8, nanos(h.end));
}

/// Span fields 15 (status, always present as the SDK's exporter sends it) and 16 (flags).
#[inline]
fn tail(buf: &mut Vec<u8>, error: Option<&str>, parent_remote: bool) {
    match error {
        None => {
            key(buf, 15, LEN);
            buf.push(0);
        }
        Some(message) => {
            let m = if message.is_empty() {
                0
            } else {
                1 + varint_len(message.len() as u64) + message.len()
            };
            key(buf, 15, LEN);
            varint(buf, (m + 2) as u64);
            if !message.is_empty() {
                str_field(buf, 2, &[message]);
            }
            key(buf, 3, VARINT);
            varint(buf, STATUS_ERROR);
        }
    }
    // Only sampled spans are recorded; whether the parent came from another process is
    // known for every span.
    let mut flags = FLAG_SAMPLED | FLAG_HAS_IS_REMOTE;
    if parent_remote {
        flags |= FLAG_IS_REMOTE;
    }
    key(buf, 16, I32);
    buf.extend_from_slice(&flags.to_le_bytes());
}

fn resource_value(v: &opentelemetry::Value) -> (Option<Val<'static>>, Option<String>) {
    match v {
        opentelemetry::Value::Bool(b) => (Some(Val::Bool(*b)), None),
        opentelemetry::Value::I64(i) => (Some(Val::Int(*i)), None),
        opentelemetry::Value::F64(f) => (Some(Val::F64(*f)), None),
        other => (None, Some(other.as_str().into_owned())),
    }
}

/// Room left before the first span for the request's own fields (resource and scope).
const GAP: usize = 256;

/// Builds export requests (`ExportTraceServiceRequest`): one resource, one scope, the
/// spans added since the last [`Encoder::finish`].
pub(crate) struct Encoder {
    /// The encoded `Resource` and `InstrumentationScope` messages, the same in every request.
    resource: Vec<u8>,
    scope: Vec<u8>,
    schema_url: String,
    /// [`GAP`] bytes, then the spans so far, each already framed as field 2 of `ScopeSpans`.
    spans: Vec<u8>,
    peers: AddrText,
    upstreams: AddrText,
}

impl Encoder {
    pub(crate) fn new(resource: &Resource) -> Self {
        let mut r = Vec::new();
        for (k, v) in resource.iter() {
            match resource_value(v) {
                (Some(val), _) => kv(&mut r, 1, k.as_str(), val),
                (None, Some(s)) => kv(&mut r, 1, k.as_str(), Val::Str(&[s.as_str()])),
                (None, None) => {}
            }
        }
        let mut scope = Vec::new();
        str_field(&mut scope, 1, &["wasmesh"]);
        Self {
            resource: r,
            scope,
            schema_url: resource.schema_url().unwrap_or_default().to_string(),
            spans: vec![0; GAP],
            peers: AddrText::default(),
            upstreams: AddrText::default(),
        }
    }

    /// Start a span (field 2 of `ScopeSpans`) in place: its length goes first and is not
    /// known yet, so two bytes are left for it (a span is 128 bytes to 16 KiB long but
    /// for an odd one); returns where they are, for [`Self::end_span`].
    fn begin_span(&mut self) -> usize {
        key(&mut self.spans, 2, LEN);
        let at = self.spans.len();
        self.spans.extend_from_slice(&[0, 0]);
        at
    }

    /// Write the length of the span begun at `at`.
    fn end_span(&mut self, at: usize) {
        let len = self.spans.len().saturating_sub(at + 2);
        match self.spans.get_mut(at..at + 2) {
            Some([lo, hi]) if (0x80..0x4000).contains(&len) => {
                *lo = (len as u8) | 0x80;
                *hi = (len >> 7) as u8;
            }
            _ => {
                // Shorter or longer: the length takes 1 or 3 bytes; move the span to fit.
                let mut v = Vec::with_capacity(3);
                varint(&mut v, len as u64);
                self.spans.splice(at..at + 2, v);
            }
        }
    }

    /// Add a record's spans (filter spans before their SERVER span, the order they ended).
    pub(crate) fn add(&mut self, f: &Finished) {
        match f {
            Finished::Server(s) => {
                for (id, t) in &s.filters {
                    self.filter(s, *id, t);
                }
                self.server(s);
            }
            Finished::Client(c) => self.client(c),
        }
    }

    fn server(&mut self, s: &ServerRecord) {
        let at = self.begin_span();
        let b = &mut self.spans;
        let template = s.template.as_deref().filter(|_| s.outcome.is_some());
        let full_name = [s.method, " ", template.unwrap_or_default()];
        let name = if template.is_some() {
            &full_name[..]
        } else {
            &full_name[..1]
        };
        head(
            b,
            &Head {
                trace_id: s.trace_id,
                span_id: s.span_id,
                state: s.state.as_deref(),
                parent: s.parent,
                name,
                kind: KIND_SERVER,
                start: s.start,
                end: s.end,
            },
        );
        attr_str(b, semconv::HTTP_REQUEST_METHOD, s.method);
        if let Some(m) = s.method_original {
            attr_str(b, attr::METHOD_ORIGINAL, s.text.get(m));
        }
        attr_str(b, semconv::URL_PATH, s.text.get(s.path));
        if let Some(q) = s.query {
            attr_str(b, semconv::URL_QUERY, s.text.get(q));
        }
        attr_str(
            b,
            semconv::URL_SCHEME,
            if s.https { "https" } else { "http" },
        );
        if let Some(h) = s.host {
            attr_str(b, semconv::SERVER_ADDRESS, s.text.get(h));
        }
        attr_int(b, semconv::SERVER_PORT, i64::from(s.server_port));
        let peer_ip = self.peers.get(SocketAddr::new(s.peer.ip(), 0)).0;
        attr_str(b, semconv::NETWORK_PEER_ADDRESS, peer_ip);
        attr_int(b, semconv::NETWORK_PEER_PORT, i64::from(s.peer.port()));
        attr_str(b, semconv::NETWORK_PROTOCOL_VERSION, s.version);
        if let Some(ua) = s.user_agent {
            attr_str(b, semconv::USER_AGENT_ORIGINAL, s.text.get(ua));
        }
        let mut error = None;
        if let Some(o) = &s.outcome {
            attr_int(b, semconv::HTTP_RESPONSE_STATUS_CODE, i64::from(o.status));
            if let Some(t) = template {
                attr_str(b, semconv::HTTP_ROUTE, t);
            }
            if let Some(r) = o.route {
                attr_str(b, attr::ROUTE, s.text.get(r));
            }
            if let Some(c) = o.cluster {
                attr_str(b, attr::CLUSTER, s.text.get(c));
            }
            if let Some(u) = o.upstream {
                attr_str(b, attr::UPSTREAM, self.upstreams.get(u).1);
            }
            attr_str(b, attr::RESPONSE_FLAGS, s.text.get(o.flags));
            // SERVER spans: 5xx is an error, 4xx is the client's and leaves the status unset.
            if o.status >= 500 {
                let mut digits = [0; 5];
                attr_str(
                    b,
                    semconv::ERROR_TYPE,
                    crate::text::u16_decimal(o.status, &mut digits),
                );
                error = Some("");
            }
        }
        tail(b, error, s.parent.is_some());
        self.end_span(at);
    }

    fn filter(&mut self, s: &ServerRecord, span_id: u64, t: &FilterTiming) {
        let at = self.begin_span();
        let b = &mut self.spans;
        head(
            b,
            &Head {
                trace_id: s.trace_id,
                span_id,
                state: s.state.as_deref(),
                parent: Some(s.span_id),
                name: &["filter ", &t.filter, " ", t.hook],
                kind: KIND_INTERNAL,
                start: t.start,
                end: t.end,
            },
        );
        attr_str(b, attr::FILTER_NAME, &t.filter);
        attr_str(b, attr::FILTER_VERSION, &t.version);
        attr_str(b, attr::FILTER_HOOK, t.hook);
        tail(b, t.failed.then_some("filter failed"), false);
        self.end_span(at);
    }

    fn client(&mut self, c: &ClientRecord) {
        let at = self.begin_span();
        let b = &mut self.spans;
        head(
            b,
            &Head {
                trace_id: c.trace_id,
                span_id: c.span_id,
                state: c.state.as_deref(),
                parent: Some(c.parent),
                name: &[c.method],
                kind: KIND_CLIENT,
                start: c.start,
                end: c.end,
            },
        );
        let (ip, addr) = self.upstreams.get(c.upstream);
        attr_str(b, semconv::HTTP_REQUEST_METHOD, c.method);
        attr_str(b, semconv::URL_FULL, &c.url_full);
        attr_str(b, semconv::SERVER_ADDRESS, ip);
        attr_int(b, semconv::SERVER_PORT, i64::from(c.upstream.port()));
        attr_str(b, semconv::NETWORK_PEER_ADDRESS, ip);
        attr_str(b, semconv::NETWORK_PROTOCOL_VERSION, c.version);
        attr_str(b, attr::CLUSTER, &c.cluster);
        attr_str(b, attr::UPSTREAM, addr);
        if c.resend > 0 {
            attr_int(b, semconv::HTTP_REQUEST_RESEND_COUNT, i64::from(c.resend));
        }
        let error = match &c.outcome {
            None => None,
            Some(ClientOutcome::Status(status)) => {
                attr_int(b, semconv::HTTP_RESPONSE_STATUS_CODE, i64::from(*status));
                // CLIENT spans: any 4xx or 5xx is an error.
                if *status >= 400 {
                    let mut digits = [0; 5];
                    attr_str(
                        b,
                        semconv::ERROR_TYPE,
                        crate::text::u16_decimal(*status, &mut digits),
                    );
                    Some("")
                } else {
                    None
                }
            }
            Some(ClientOutcome::Failed {
                error_type,
                message,
            }) => {
                attr_str(b, semconv::ERROR_TYPE, error_type);
                Some(message.as_str())
            }
        };
        tail(b, error, false);
        self.end_span(at);
    }

    /// The request for the spans added so far (and start over).
    pub(crate) fn finish(&mut self) -> Bytes {
        let spans_len = self.spans.len().saturating_sub(GAP);
        let scope_part = key_len(1) + varint_len(self.scope.len() as u64) + self.scope.len();
        let scope_spans = scope_part + spans_len;
        let resource_part =
            key_len(1) + varint_len(self.resource.len() as u64) + self.resource.len();
        let schema_part = if self.schema_url.is_empty() {
            0
        } else {
            key_len(3) + varint_len(self.schema_url.len() as u64) + self.schema_url.len()
        };
        let resource_spans =
            resource_part + key_len(2) + varint_len(scope_spans as u64) + scope_spans + schema_part;
        // Everything before the spans, written into the gap left for it (when it fits:
        // the resource is small), so that the spans are not copied.
        let mut head = Vec::with_capacity(GAP);
        // ExportTraceServiceRequest.resource_spans[0]
        key(&mut head, 1, LEN);
        varint(&mut head, resource_spans as u64);
        bytes_field(&mut head, 1, &self.resource);
        // ResourceSpans.scope_spans[0]
        key(&mut head, 2, LEN);
        varint(&mut head, scope_spans as u64);
        bytes_field(&mut head, 1, &self.scope);
        // The next batch is likely as large as this one: grow the buffer once.
        let mut next = Vec::with_capacity(self.spans.len());
        next.resize(GAP, 0);
        let mut out = std::mem::replace(&mut self.spans, next);
        let start = match GAP.checked_sub(head.len()) {
            Some(start) => {
                if let Some(gap) = out.get_mut(start..GAP) {
                    gap.copy_from_slice(&head);
                }
                start
            }
            None => {
                head.extend_from_slice(out.get(GAP..).unwrap_or_default());
                out = head;
                0
            }
        };
        if !self.schema_url.is_empty() {
            str_field(&mut out, 3, &[&self.schema_url]);
        }
        Bytes::from(out).slice(start..)
    }
}

/// An address as text, kept for the next span: formatting an address costs more than
/// encoding the rest of a span, and the same few addresses come by again and again (the
/// upstreams; the clients' addresses, without their ports).
#[derive(Default)]
struct AddrText {
    key: Option<SocketAddr>,
    ip: String,
    addr: String,
}

impl AddrText {
    /// `a`'s IP address and `ip:port` (`[ip]:port` for IPv6).
    fn get(&mut self, a: SocketAddr) -> (&str, &str) {
        if self.key != Some(a) {
            self.ip.clear();
            self.addr.clear();
            let _ = write!(self.ip, "{}", a.ip());
            let _ = write!(self.addr, "{a}");
            self.key = Some(a);
        }
        (&self.ip, &self.addr)
    }
}

// ------------------------------------------------------------------ transports

const GRPC_EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// Sends already-encoded requests as they are (`tonic`'s prost codec would encode a
/// message struct we never build).
#[derive(Clone, Copy, Default)]
struct EncodedCodec;

struct EncodedEncoder;
struct ReplyDecoder;

impl tonic::codec::Codec for EncodedCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = EncodedEncoder;
    type Decoder = ReplyDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedEncoder
    }
    fn decoder(&mut self) -> Self::Decoder {
        ReplyDecoder
    }
}

impl tonic::codec::Encoder for EncodedEncoder {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Bytes,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), Self::Error> {
        bytes::BufMut::put(dst, item);
        Ok(())
    }
}

impl tonic::codec::Decoder for ReplyDecoder {
    type Item = ();
    type Error = tonic::Status;

    /// The reply (`ExportTraceServiceResponse`) can only report a partial success, which
    /// the SDK's exporter also counted as exported: read past it.
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Self::Item>, Self::Error> {
        let n = bytes::Buf::remaining(src);
        bytes::Buf::advance(src, n);
        Ok(Some(()))
    }
}

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    http_body_util::Full<Bytes>,
>;
type HttpsClient = hyper_util::client::legacy::Client<
    super::collector_tls::Connector,
    http_body_util::Full<Bytes>,
>;

/// Where export requests go.
pub(crate) enum Transport {
    Grpc {
        client: tonic::client::Grpc<tonic::transport::Channel>,
        metadata: tonic::metadata::MetadataMap,
    },
    Http {
        client: Box<HttpClient>,
        uri: http::Uri,
        headers: HeaderMap,
        gzip: bool,
    },
    Https {
        client: Box<HttpsClient>,
        uri: http::Uri,
        headers: HeaderMap,
        gzip: bool,
    },
}

/// Why an export failed (logged at debug level; the spans are counted as dropped).
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExportError {
    #[error("grpc: {0}")]
    Grpc(#[from] tonic::Status),
    #[error("grpc channel: {0}")]
    Channel(#[from] tonic::transport::Error),
    #[error("http: {0}")]
    Http(#[from] hyper_util::client::legacy::Error),
    #[error("http: the collector answered {0}")]
    Status(http::StatusCode),
    #[error("http: {0}")]
    Request(#[from] http::Error),
    #[error("gzip: {0}")]
    Compress(std::io::Error),
}

fn header_map(headers: &[(String, String)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            HeaderName::from_bytes(k.as_bytes()),
            HeaderValue::from_str(v),
        ) {
            map.insert(k, v);
        }
    }
    map
}

impl Transport {
    /// A lazy client: nothing connects until the first export, so a collector that is down
    /// at start only costs dropped spans. Call inside a Tokio runtime.
    pub(crate) fn new(
        protocol: crate::config::OtlpProtocol,
        compression: crate::config::OtlpCompression,
        endpoint: &str,
        headers: &[(String, String)],
        timeout: Duration,
        tls: &super::collector_tls::CollectorTls,
    ) -> Result<Self, String> {
        use super::collector_tls::Connector;
        let gzip = compression == crate::config::OtlpCompression::Gzip;
        match protocol {
            crate::config::OtlpProtocol::Grpc => {
                let ep = tonic::transport::Endpoint::from_shared(endpoint.to_string())
                    .map_err(|e| format!("invalid endpoint '{endpoint}': {e}"))?
                    .timeout(timeout);
                let channel = if ep.uri().scheme() == Some(&http::uri::Scheme::HTTPS) {
                    // gRPC over TLS negotiates HTTP/2 with ALPN `h2`.
                    let connector =
                        Connector::new(tls, b"h2", timeout).map_err(|e| e.to_string())?;
                    ep.connect_with_connector_lazy(connector)
                } else {
                    ep.connect_lazy()
                };
                let mut client = tonic::client::Grpc::new(channel);
                if gzip {
                    client = client.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                Ok(Transport::Grpc {
                    client,
                    metadata: tonic::metadata::MetadataMap::from_headers(header_map(headers)),
                })
            }
            crate::config::OtlpProtocol::HttpProtobuf => {
                let uri = http::Uri::try_from(endpoint)
                    .map_err(|e| format!("invalid endpoint '{endpoint}': {e}"))?;
                let builder = hyper_util::client::legacy::Client::builder(
                    hyper_util::rt::TokioExecutor::new(),
                );
                if uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
                    let connector =
                        Connector::new(tls, b"http/1.1", timeout).map_err(|e| e.to_string())?;
                    return Ok(Transport::Https {
                        client: Box::new(builder.build(connector)),
                        uri,
                        headers: header_map(headers),
                        gzip,
                    });
                }
                Ok(Transport::Http {
                    client: Box::new(builder.build_http()),
                    uri,
                    headers: header_map(headers),
                    gzip,
                })
            }
        }
    }

    /// Send one encoded `ExportTraceServiceRequest`.
    pub(crate) async fn send(&mut self, body: Bytes) -> Result<(), ExportError> {
        match self {
            Transport::Grpc { client, metadata } => {
                client.ready().await?;
                let mut req = tonic::Request::new(body);
                *req.metadata_mut() = metadata.clone();
                client
                    .unary::<Bytes, (), _>(
                        req,
                        http::uri::PathAndQuery::from_static(GRPC_EXPORT),
                        EncodedCodec,
                    )
                    .await?;
                Ok(())
            }
            Transport::Http {
                client,
                uri,
                headers,
                gzip,
            } => post(client, uri, headers, body, *gzip).await,
            Transport::Https {
                client,
                uri,
                headers,
                gzip,
            } => post(client, uri, headers, body, *gzip).await,
        }
    }
}

/// One OTLP/HTTP export.
async fn post<C>(
    client: &hyper_util::client::legacy::Client<C, http_body_util::Full<Bytes>>,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: Bytes,
    gzip: bool,
) -> Result<(), ExportError>
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let mut req = http::Request::post(uri.clone())
        .header(http::header::CONTENT_TYPE, "application/x-protobuf");
    let body = if gzip {
        req = req.header(http::header::CONTENT_ENCODING, "gzip");
        gzip_body(&body)?
    } else {
        body
    };
    let mut req = req.body(http_body_util::Full::new(body))?;
    for (k, v) in headers.iter() {
        req.headers_mut().insert(k.clone(), v.clone());
    }
    let resp = client.request(req).await?;
    let status = resp.status();
    // Read the reply to the end so the connection can carry the next export.
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    if status.is_success() {
        Ok(())
    } else {
        Err(ExportError::Status(status))
    }
}

/// An OTLP/HTTP body, gzipped. The fast level: a batch of spans is repetitive (the same
/// attribute keys, routes and hosts), so it already shrinks several times over, and the
/// exporter thread shares the machine with the workers.
fn gzip_body(body: &[u8]) -> Result<Bytes, ExportError> {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(
        Vec::with_capacity(body.len() / 4),
        flate2::Compression::fast(),
    );
    enc.write_all(body).map_err(ExportError::Compress)?;
    Ok(Bytes::from(enc.finish().map_err(ExportError::Compress)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as Av;
    use opentelemetry_proto::tonic::common::v1::KeyValue;
    use prost::Message as _;
    use std::collections::HashMap;

    fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
        kvs.iter()
            .map(|kv| {
                let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                    Some(Av::StringValue(s)) => s.clone(),
                    Some(Av::IntValue(i)) => format!("int:{i}"),
                    Some(Av::BoolValue(b)) => format!("bool:{b}"),
                    Some(Av::DoubleValue(d)) => format!("f64:{d}"),
                    other => format!("{other:?}"),
                };
                (kv.key.clone(), v)
            })
            .collect()
    }

    #[test]
    fn gzipped_bodies_decompress_to_the_same_bytes() {
        use std::io::Read as _;
        let body: Vec<u8> = b"wasmesh.route\x00GET /api/items\x00".repeat(200);
        let zipped = gzip_body(&body).expect("gzip");
        assert!(zipped.len() * 4 < body.len(), "repetitive spans shrink");
        let mut back = Vec::new();
        flate2::read::GzDecoder::new(&zipped[..])
            .read_to_end(&mut back)
            .expect("valid gzip");
        assert_eq!(back, body);
    }

    #[test]
    fn varint_lengths() {
        for v in [
            0u64,
            1,
            127,
            128,
            16383,
            16384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut b = Vec::new();
            varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v), "{v}");
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn records_decode_as_otlp() {
        let resource = Resource::builder_empty()
            .with_service_name("shop")
            .with_attributes([
                opentelemetry::KeyValue::new("n", 7i64),
                opentelemetry::KeyValue::new("b", true),
            ])
            .build();
        let mut enc = Encoder::new(&resource);
        let mut text = Text::with_capacity(64);
        let path = text.push("/api/items");
        let query = Some(text.push("page=2"));
        let host = Some(text.push("shop.local"));
        let flags = text.push("UF");
        let route = Some(text.push("to-b"));
        let peer: SocketAddr = "127.0.0.1:5555".parse().expect("addr");
        let up: SocketAddr = "10.0.0.2:8080".parse().expect("addr");
        let server = ServerRecord {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x1111,
            parent: Some(0x00f067aa0ba902b7),
            sampled: true,
            state: Some(Arc::from("vendor=x")),
            start: at(10),
            end: at(11),
            method: "GET",
            method_original: None,
            https: false,
            server_port: 8080,
            peer,
            version: "1.1",
            text,
            path,
            query,
            host,
            user_agent: None,
            template: Some(Arc::from("/api/*")),
            outcome: Some(ServerOutcome {
                status: 503,
                flags,
                route,
                cluster: None,
                upstream: Some(up),
            }),
            filters: vec![(
                0x2222,
                FilterTiming {
                    filter: "a".into(),
                    version: "a@123".into(),
                    hook: "request_headers",
                    start: at(10),
                    end: at(10),
                    failed: true,
                },
            )],
        };
        let client = ClientRecord {
            trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
            span_id: 0x3333,
            parent: 0x1111,
            state: None,
            start: at(10),
            end: at(11),
            method: "GET",
            url_full: "http://shop.local/api/items?page=2".into(),
            upstream: up,
            version: "1.1",
            cluster: Arc::from("b"),
            resend: 1,
            outcome: Some(ClientOutcome::Failed {
                error_type: "connect_failure",
                message: "connect failed".into(),
            }),
        };
        enc.add(&Finished::Server(Box::new(server)));
        enc.add(&Finished::Client(Box::new(client)));
        let req = ExportTraceServiceRequest::decode(enc.finish()).expect("valid protobuf");

        assert_eq!(req.resource_spans.len(), 1);
        let rs = &req.resource_spans[0];
        let res = attrs(&rs.resource.as_ref().expect("resource").attributes);
        assert_eq!(res.get("service.name").map(String::as_str), Some("shop"));
        assert_eq!(res.get("n").map(String::as_str), Some("int:7"));
        assert_eq!(res.get("b").map(String::as_str), Some("bool:true"));
        let ss = &rs.scope_spans[0];
        assert_eq!(ss.scope.as_ref().map(|s| s.name.as_str()), Some("wasmesh"));
        let [f, s, c] = &ss.spans[..] else {
            panic!("three spans: {:?}", ss.spans)
        };

        assert_eq!(f.name, "filter a request_headers");
        assert_eq!(f.kind, 1);
        assert_eq!(f.parent_span_id, 0x1111u64.to_be_bytes());
        assert_eq!(
            f.status.as_ref().map(|s| (s.code, s.message.as_str())),
            Some((2, "filter failed"))
        );
        let fa = attrs(&f.attributes);
        assert_eq!(
            fa.get(attr::FILTER_VERSION).map(String::as_str),
            Some("a@123")
        );

        assert_eq!(s.name, "GET /api/*");
        assert_eq!(s.kind, 2);
        assert_eq!(
            s.trace_id,
            0x4bf92f3577b34da6a3ce929d0e0e4736u128.to_be_bytes()
        );
        assert_eq!(s.span_id, 0x1111u64.to_be_bytes());
        assert_eq!(s.parent_span_id, 0x00f067aa0ba902b7u64.to_be_bytes());
        assert_eq!(s.trace_state, "vendor=x");
        assert_eq!(s.start_time_unix_nano, 10_000_000_000);
        assert_eq!(s.end_time_unix_nano, 11_000_000_000);
        assert_eq!(s.flags, 0x301);
        assert_eq!(
            s.status.as_ref().map(|s| (s.code, s.message.as_str())),
            Some((2, ""))
        );
        let sa = attrs(&s.attributes);
        for (k, v) in [
            ("http.request.method", "GET"),
            ("url.path", "/api/items"),
            ("url.query", "page=2"),
            ("url.scheme", "http"),
            ("server.address", "shop.local"),
            ("server.port", "int:8080"),
            ("network.peer.address", "127.0.0.1"),
            ("network.peer.port", "int:5555"),
            ("network.protocol.version", "1.1"),
            ("http.response.status_code", "int:503"),
            ("http.route", "/api/*"),
            ("wasmesh.route", "to-b"),
            ("wasmesh.upstream", "10.0.0.2:8080"),
            ("wasmesh.response_flags", "UF"),
            ("error.type", "503"),
        ] {
            assert_eq!(sa.get(k).map(String::as_str), Some(v), "{k}");
        }
        assert_eq!(sa.len(), 15, "{sa:?}");

        assert_eq!(c.name, "GET");
        assert_eq!(c.kind, 3);
        assert_eq!(c.flags, 0x101);
        assert_eq!(
            c.status.as_ref().map(|s| (s.code, s.message.as_str())),
            Some((2, "connect failed"))
        );
        let ca = attrs(&c.attributes);
        for (k, v) in [
            ("url.full", "http://shop.local/api/items?page=2"),
            ("server.address", "10.0.0.2"),
            ("server.port", "int:8080"),
            ("wasmesh.cluster", "b"),
            ("http.request.resend_count", "int:1"),
            ("error.type", "connect_failure"),
        ] {
            assert_eq!(ca.get(k).map(String::as_str), Some(v), "{k}");
        }

        // The encoder starts over after each request.
        let empty = ExportTraceServiceRequest::decode(enc.finish()).expect("valid");
        assert!(empty.resource_spans[0].scope_spans[0].spans.is_empty());
    }

    /// A resource too large for the room left before the spans, and a schema URL.
    #[test]
    fn large_resource() {
        let big = "x".repeat(400);
        let resource = Resource::builder_empty()
            .with_schema_url(
                [opentelemetry::KeyValue::new("big", big.clone())],
                "https://opentelemetry.io/schemas/1.26.0",
            )
            .build();
        let mut enc = Encoder::new(&resource);
        let client = ClientRecord {
            trace_id: 1,
            span_id: 2,
            parent: 3,
            state: None,
            start: at(1),
            end: at(2),
            method: "POST",
            url_full: format!("http://h/{big}"),
            upstream: "[::1]:80".parse().expect("addr"),
            version: "2",
            cluster: Arc::from("c"),
            resend: 0,
            outcome: Some(ClientOutcome::Status(200)),
        };
        enc.add(&Finished::Client(Box::new(client)));
        let req = ExportTraceServiceRequest::decode(enc.finish()).expect("valid protobuf");
        let rs = &req.resource_spans[0];
        assert_eq!(rs.schema_url, "https://opentelemetry.io/schemas/1.26.0");
        let res = attrs(&rs.resource.as_ref().expect("resource").attributes);
        assert_eq!(res.get("big"), Some(&big));
        let c = &rs.scope_spans[0].spans[0];
        let ca = attrs(&c.attributes);
        assert_eq!(ca.get("url.full").map(String::len), Some(9 + 400));
        assert_eq!(ca.get("server.address").map(String::as_str), Some("::1"));
        assert_eq!(
            ca.get("wasmesh.upstream").map(String::as_str),
            Some("[::1]:80")
        );
        assert_eq!(c.status.as_ref().map(|s| s.code), Some(0));
    }

    /// A span's length is written after the span, in the two bytes left for it: spans
    /// shorter than 128 bytes or longer than 16 KiB move to fit, and every size decodes.
    #[test]
    fn span_lengths_of_every_size() {
        let mut enc = Encoder::new(&Resource::builder_empty().build());
        let sizes = [0usize, 1, 30, 100, 127, 128, 500, 16_000, 16_500, 70_000];
        for (i, n) in sizes.iter().enumerate() {
            enc.add(&Finished::Client(Box::new(ClientRecord {
                trace_id: 1,
                span_id: i as u64 + 1,
                parent: 3,
                state: None,
                start: at(1),
                end: at(2),
                method: "GET",
                url_full: "u".repeat(*n),
                upstream: "127.0.0.1:80".parse().expect("addr"),
                version: "1.1",
                cluster: Arc::from(""),
                resend: 0,
                outcome: None,
            })));
        }
        let req = ExportTraceServiceRequest::decode(enc.finish()).expect("valid protobuf");
        let spans = &req.resource_spans[0].scope_spans[0].spans;
        assert_eq!(spans.len(), sizes.len());
        for ((span, n), i) in spans.iter().zip(sizes).zip(1u64..) {
            assert_eq!(span.span_id, i.to_be_bytes());
            let full = attrs(&span.attributes)
                .remove("url.full")
                .unwrap_or_default();
            assert_eq!(full.len(), n);
        }
    }

    #[test]
    fn span_framing_moves_short_and_long_spans() {
        let mut enc = Encoder::new(&Resource::builder_empty().build());
        for n in [0usize, 1, 127, 128, 16_383, 16_384, 100_000] {
            enc.spans.clear();
            let at = enc.begin_span();
            enc.spans.extend(std::iter::repeat_n(7u8, n));
            enc.end_span(at);
            let mut want = vec![0x12];
            varint(&mut want, n as u64);
            want.extend(std::iter::repeat_n(7u8, n));
            assert_eq!(enc.spans, want, "{n}");
        }
    }

    /// No TLS client is built into the exporter: an `https://` collector is refused when
    /// tracing starts (the proxy does not start), for both protocols, rather than every
    /// export failing later.
    #[test]
    fn https_collectors_with_unusable_tls_files_are_refused_at_start() {
        let tls = crate::telemetry::collector_tls::CollectorTls {
            ca_file: Some(std::path::PathBuf::from("/nonexistent/collector-ca.pem")),
            ..Default::default()
        };
        for protocol in [
            crate::config::OtlpProtocol::Grpc,
            crate::config::OtlpProtocol::HttpProtobuf,
        ] {
            let e = Transport::new(
                protocol,
                crate::config::OtlpCompression::None,
                "https://collector:4318",
                &[],
                Duration::from_secs(1),
                &tls,
            )
            .err()
            .unwrap_or_default();
            assert!(
                e.contains("tracing.tls.ca_file") && e.contains("/nonexistent/collector-ca.pem"),
                "{protocol:?}: {e}"
            );
        }
    }
}
