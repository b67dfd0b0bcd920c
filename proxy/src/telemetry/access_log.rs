//! The JSON access log: one line per request, written off the request path.
//!
//! The request path formats its line and hands it to a bounded channel; a dedicated thread
//! writes lines out in batches. When the writer falls behind (a slow disk, a blocked pipe),
//! lines are dropped and counted in `wasmesh_access_log_dropped_total` rather than slowing
//! or blocking requests. Which fields a line carries, and in what order, is the
//! `access_log.fields` setting ([`Field`]); the default is every field.

use crate::config::AccessLogSpec;
use crate::telemetry::metrics::Metrics;
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

/// One request, as logged. Field names are stable: dashboards and tests read them.
#[derive(Default)]
pub struct Entry<'a> {
    pub time: String,
    pub listener: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    /// The path as the client sent it (routing used the normalized one).
    pub path: &'a str,
    pub protocol: &'static str,
    pub status: u16,
    pub response_flags: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration_ms: f64,
    pub upstream: Option<String>,
    pub route: Option<&'a str>,
    pub cluster: Option<&'a str>,
    pub request_id: &'a str,
    pub client_address: String,
    pub user_agent: Option<&'a str>,
    pub reason: Option<&'a str>,
    pub filters: &'a [String],
    pub attributes: &'a [(String, String)],
    /// The mTLS peer's SPIFFE ID (listeners with `tls` only).
    pub peer_identity: Option<&'a str>,
    /// The request's trace (from `traceparent` or B3 headers), 32 hex digits.
    pub trace_id: Option<&'a str>,
    /// The span this request belongs to, 16 hex digits.
    pub span_id: Option<&'a str>,
    /// A filter answered the request itself (and which one).
    pub local_response: Option<LocalResponseLog<'a>>,
}

/// The `local_response` field: the filter (`name@version`) that answered, and its status.
#[derive(Serialize, Clone, Copy)]
pub struct LocalResponseLog<'a> {
    pub filter: &'a str,
    pub status: u16,
}

/// A field of the access-log line, as named in `access_log.fields` and in the line itself.
/// Optional fields (`reason`, `filters`, `attributes`, `peer_identity`, `trace_id`,
/// `span_id`, `local_response`) are left out of a line that has no value for them;
/// `upstream`, `route`, `cluster` and `user_agent` are written as `null`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Field {
    Time,
    Listener,
    Method,
    Authority,
    Path,
    Protocol,
    Status,
    ResponseFlags,
    BytesReceived,
    BytesSent,
    DurationMs,
    Upstream,
    Route,
    Cluster,
    RequestId,
    ClientAddress,
    UserAgent,
    Reason,
    Filters,
    Attributes,
    PeerIdentity,
    TraceId,
    SpanId,
    LocalResponse,
}

impl Field {
    /// The field's name in the manifest and in the line.
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// Every field, in the order of a line with the default settings.
    pub const ALL: [Field; 24] = [
        Field::Time,
        Field::Listener,
        Field::Method,
        Field::Authority,
        Field::Path,
        Field::Protocol,
        Field::Status,
        Field::ResponseFlags,
        Field::BytesReceived,
        Field::BytesSent,
        Field::DurationMs,
        Field::Upstream,
        Field::Route,
        Field::Cluster,
        Field::RequestId,
        Field::ClientAddress,
        Field::UserAgent,
        Field::Reason,
        Field::Filters,
        Field::Attributes,
        Field::PeerIdentity,
        Field::TraceId,
        Field::SpanId,
        Field::LocalResponse,
    ];
}

/// An entry with the fields to write: serialized field by field, in the configured order,
/// without building an intermediate JSON value.
struct Line<'e, 'a> {
    entry: &'e Entry<'a>,
    fields: &'e [Field],
}

impl Serialize for Line<'_, '_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let e = self.entry;
        let mut m = s.serialize_map(None)?;
        for f in self.fields {
            match f {
                Field::Time => m.serialize_entry("time", &e.time)?,
                Field::Listener => m.serialize_entry("listener", e.listener)?,
                Field::Method => m.serialize_entry("method", e.method)?,
                Field::Authority => m.serialize_entry("authority", e.authority)?,
                Field::Path => m.serialize_entry("path", e.path)?,
                Field::Protocol => m.serialize_entry("protocol", e.protocol)?,
                Field::Status => m.serialize_entry("status", &e.status)?,
                Field::ResponseFlags => m.serialize_entry("response_flags", e.response_flags)?,
                Field::BytesReceived => m.serialize_entry("bytes_received", &e.bytes_received)?,
                Field::BytesSent => m.serialize_entry("bytes_sent", &e.bytes_sent)?,
                Field::DurationMs => m.serialize_entry("duration_ms", &e.duration_ms)?,
                Field::Upstream => m.serialize_entry("upstream", &e.upstream)?,
                Field::Route => m.serialize_entry("route", &e.route)?,
                Field::Cluster => m.serialize_entry("cluster", &e.cluster)?,
                Field::RequestId => m.serialize_entry("request_id", e.request_id)?,
                Field::ClientAddress => m.serialize_entry("client_address", &e.client_address)?,
                Field::UserAgent => m.serialize_entry("user_agent", &e.user_agent)?,
                Field::Reason => {
                    if let Some(r) = e.reason {
                        m.serialize_entry("reason", r)?;
                    }
                }
                Field::Filters => {
                    if !e.filters.is_empty() {
                        m.serialize_entry("filters", e.filters)?;
                    }
                }
                Field::Attributes => {
                    if !e.attributes.is_empty() {
                        m.serialize_entry("attributes", &Attrs(e.attributes))?;
                    }
                }
                Field::PeerIdentity => {
                    if let Some(p) = e.peer_identity {
                        m.serialize_entry("peer_identity", p)?;
                    }
                }
                Field::TraceId => {
                    if let Some(t) = e.trace_id {
                        m.serialize_entry("trace_id", t)?;
                    }
                }
                Field::SpanId => {
                    if let Some(t) = e.span_id {
                        m.serialize_entry("span_id", t)?;
                    }
                }
                Field::LocalResponse => {
                    if let Some(l) = &e.local_response {
                        m.serialize_entry("local_response", l)?;
                    }
                }
            }
        }
        m.end()
    }
}

/// Filter attributes as a JSON object.
struct Attrs<'a>(&'a [(String, String)]);

impl Serialize for Attrs<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

/// Handle the request path uses to log; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<Vec<u8>>>,
    fields: Arc<[Field]>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// Start the writer thread. A file that cannot be opened is an error naming it.
    pub fn start(spec: &AccessLogSpec, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        let fields: Arc<[Field]> = match &spec.fields {
            Some(f) => f.as_slice().into(),
            None => Field::ALL.as_slice().into(),
        };
        if !spec.enabled {
            return Ok(Self {
                tx: None,
                fields,
                metrics,
            });
        }
        let out: Box<dyn Write + Send> = if spec.path == "stdout" {
            Box::new(std::io::stdout())
        } else {
            Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&spec.path)
                    .map_err(|e| {
                        std::io::Error::new(e.kind(), format!("access log `{}`: {e}", spec.path))
                    })?,
            )
        };
        let (tx, rx) = sync_channel(spec.buffer_lines);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, out))?;
        Ok(Self {
            tx: Some(tx),
            fields,
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, entry: &Entry<'_>) {
        let Some(tx) = &self.tx else { return };
        let mut line = Vec::with_capacity(512);
        let line_of = Line {
            entry,
            fields: &self.fields,
        };
        if serde_json::to_writer(&mut line, &line_of).is_err() {
            return;
        }
        line.push(b'\n');
        match tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.metrics.access_log_dropped.inc();
            }
        }
    }
}

fn writer(rx: Receiver<Vec<u8>>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(line) = rx.recv() {
        let _ = out.write_all(&line);
        // Drain what is already queued before flushing: one write per batch, not per line.
        while let Ok(line) = rx.try_recv() {
            let _ = out.write_all(&line);
        }
        let _ = out.flush();
    }
}

/// RFC 3339 UTC timestamp with milliseconds.
pub fn now_rfc3339() -> String {
    rfc3339(std::time::SystemTime::now())
}

/// A time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    let now = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let secs = now.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        now.subsec_millis()
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::{Entry, Field, Line, LocalResponseLog};

    fn json(entry: &Entry<'_>, fields: &[Field]) -> String {
        serde_json::to_string(&Line { entry, fields }).unwrap_or_default()
    }

    #[test]
    fn fields_in_the_configured_order_optional_ones_only_with_a_value() {
        let e = Entry {
            status: 429,
            request_id: "r1",
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            local_response: Some(LocalResponseLog {
                filter: "rl@0123456789ab",
                status: 429,
            }),
            ..Entry::default()
        };
        assert_eq!(
            json(
                &e,
                &[
                    Field::Status,
                    Field::TraceId,
                    Field::SpanId,
                    Field::LocalResponse,
                    Field::Route
                ]
            ),
            r#"{"status":429,"trace_id":"4bf92f3577b34da6a3ce929d0e0e4736","local_response":{"filter":"rl@0123456789ab","status":429},"route":null}"#
        );
    }

    #[test]
    fn every_field_has_a_distinct_name() {
        let names: std::collections::HashSet<String> =
            Field::ALL.iter().map(|f| f.name()).collect();
        assert_eq!(names.len(), Field::ALL.len());
        assert!(names.contains("response_flags") && names.contains("local_response"));
    }

    #[test]
    fn civil() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_781), (2026, 11, 24));
    }
}
