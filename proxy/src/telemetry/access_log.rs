//! The JSON access log: one line per request, written off the request path.
//!
//! The request path formats its line and hands it to a bounded channel; a dedicated thread
//! writes lines out in batches. When the writer falls behind (a slow disk, a blocked pipe),
//! lines are dropped and counted in `wasmesh_access_log_dropped_total` rather than slowing
//! or blocking requests.

use crate::config::AccessLogSpec;
use crate::telemetry::metrics::Metrics;
use serde::Serialize;
use std::io::Write;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

/// One request, as logged. Field names are stable: dashboards and tests read them.
#[derive(Serialize, Default)]
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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub filters: &'a [String],
    #[serde(
        skip_serializing_if = "<[_]>::is_empty",
        serialize_with = "attrs_as_map"
    )]
    pub attributes: &'a [(String, String)],
    /// The mTLS peer's SPIFFE ID (listeners with `tls` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer_identity: Option<&'a str>,
}

fn attrs_as_map<S: serde::Serializer>(
    attrs: &&[(String, String)],
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(attrs.len()))?;
    for (k, v) in attrs.iter() {
        m.serialize_entry(k, v)?;
    }
    m.end()
}

/// Handle the request path uses to log; cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<Vec<u8>>>,
    metrics: Arc<Metrics>,
}

impl AccessLog {
    /// Start the writer thread. A file that cannot be opened is an error naming it.
    pub fn start(spec: &AccessLogSpec, metrics: Arc<Metrics>) -> std::io::Result<Self> {
        if !spec.enabled {
            return Ok(Self { tx: None, metrics });
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
            metrics,
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, entry: &Entry<'_>) {
        let Some(tx) = &self.tx else { return };
        let mut line = Vec::with_capacity(512);
        if serde_json::to_writer(&mut line, entry).is_err() {
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
    #[test]
    fn civil() {
        assert_eq!(super::civil_from_days(0), (1970, 1, 1));
        assert_eq!(super::civil_from_days(20_781), (2026, 11, 24));
    }
}
