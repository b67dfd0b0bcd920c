//! Endpoint health: the per-endpoint state that passive outlier detection and active health
//! checks keep, the success-rate math, and the HTTP probe of an active check.
//!
//! `crate::cluster` decides what to do with it (ejecting, load balancing around unhealthy
//! endpoints, the background tasks); this module holds the state (atomics only, so the
//! request path never takes a lock) and the pure parts.

use crate::cluster::{Connector, UpstreamOutcome};
use crate::config::{HealthCheckSpec, UpstreamProtocol};
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

/// One endpoint's health, shared by the request path (outcomes), the outlier sweep and the
/// health checker. Times are milliseconds since the cluster's creation.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    pub consecutive_5xx: AtomicU32,
    pub consecutive_gateway: AtomicU32,
    /// Requests and successes in the current success-rate interval.
    pub interval_total: AtomicU64,
    pub interval_success: AtomicU64,
    /// Ejected until this time (0: not ejected).
    pub ejected_until: AtomicU64,
    pub times_ejected: AtomicU32,
    /// Failing active health checks (or not yet checked).
    pub check_failed: AtomicBool,
    /// Whether any active check has finished yet.
    pub checked: AtomicBool,
    /// Consecutive passes (while failed) or failures (while passing) of active checks.
    pub check_streak: AtomicU32,
}

impl EndpointHealth {
    /// A new endpoint: when its cluster has active checks, it starts unhealthy until its
    /// first check passes (Envoy's rule), so traffic never reaches an endpoint that was
    /// never seen to answer.
    pub fn new(checked_actively: bool) -> Self {
        let h = Self::default();
        h.check_failed.store(checked_actively, Ordering::Relaxed);
        h
    }

    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now_ms
    }

    /// May take traffic: passing its checks and not ejected.
    pub fn is_healthy(&self, now_ms: u64) -> bool {
        !self.check_failed.load(Ordering::Relaxed) && !self.is_ejected(now_ms)
    }
}

/// How outlier detection reads an attempt's outcome: (counts as a 5xx, counts as a gateway
/// failure). Connect failures, resets and timeouts are both, as in Envoy when local-origin
/// errors are not split out.
pub fn classify(outcome: UpstreamOutcome) -> (bool, bool) {
    match outcome {
        UpstreamOutcome::Response(s) => (s >= 500, matches!(s, 502..=504)),
        UpstreamOutcome::ConnectFailure | UpstreamOutcome::Reset | UpstreamOutcome::Timeout => {
            (true, true)
        }
    }
}

/// Envoy's success-rate outlier rule: the endpoints (index, success rate in percent) below
/// `mean - stdev × factor / 1000`, among those given (those with enough requests). Fewer
/// than `minimum_hosts` of them: none.
pub fn success_rate_outliers(
    rates: &[(usize, f64)],
    minimum_hosts: u32,
    factor: u32,
) -> Vec<usize> {
    if factor == 0 || rates.is_empty() || rates.len() < minimum_hosts as usize {
        return Vec::new();
    }
    let n = rates.len() as f64;
    let mean = rates.iter().map(|(_, r)| r).sum::<f64>() / n;
    let var = rates.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n;
    let threshold = mean - var.sqrt() * f64::from(factor) / 1000.0;
    rates
        .iter()
        .filter(|(_, r)| *r < threshold)
        .map(|(i, _)| *i)
        .collect()
}

/// How long the `times`-th ejection of an endpoint lasts: base × times, at most `max`
/// (never less than one base).
pub fn ejection_duration(
    base: std::time::Duration,
    max: std::time::Duration,
    times: u32,
) -> std::time::Duration {
    base.saturating_mul(times.max(1)).min(max.max(base))
}

/// Why an active check failed (logged at debug).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("timed out")]
    Timeout,
    #[error(transparent)]
    Connect(#[from] crate::cluster::ConnectError),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
    #[error("status {0} is not expected")]
    Status(u16),
}

/// One active check of `addr`: a fresh connection from the cluster's connector (so it goes
/// over mTLS when the cluster does, and counts against its connection limit), `GET path`,
/// a status among the expected ones within the timeout.
pub async fn probe(
    connector: &Connector,
    addr: SocketAddr,
    spec: &HealthCheckSpec,
    host: &str,
    protocol: UpstreamProtocol,
) -> Result<(), ProbeError> {
    let check = async {
        let io = connector.connect(addr).await?;
        let empty = http_body_util::Empty::<Bytes>::new();
        let status = match protocol {
            UpstreamProtocol::Http1 => {
                let (mut tx, conn) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let req = http::Request::get(spec.path.as_str())
                    .header(http::header::HOST, host)
                    .header(http::header::USER_AGENT, "wasmesh-health-check")
                    .header(http::header::CONNECTION, "close")
                    .body(empty)?;
                tx.send_request(req).await?.status()
            }
            UpstreamProtocol::Http2 => {
                let (mut tx, conn) =
                    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                        .await?;
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let uri = format!("http://{host}{}", spec.path);
                let req = http::Request::get(uri)
                    .header(http::header::USER_AGENT, "wasmesh-health-check")
                    .body(empty)?;
                tx.send_request(req).await?.status()
            }
        };
        let s = status.as_u16();
        if spec
            .expected_statuses
            .iter()
            .any(|r| (r.start..r.end).contains(&s))
        {
            Ok(())
        } else {
            Err(ProbeError::Status(s))
        }
    };
    match tokio::time::timeout(spec.timeout, check).await {
        Ok(r) => r,
        Err(_) => Err(ProbeError::Timeout),
    }
}

/// Apply one check result to an endpoint's state; returns whether its health changed.
pub fn apply_check(h: &EndpointHealth, passed: bool, spec: &HealthCheckSpec) -> bool {
    let first = !h.checked.swap(true, Ordering::Relaxed);
    let failed = h.check_failed.load(Ordering::Relaxed);
    match (failed, passed) {
        (true, true) => {
            let streak = h.check_streak.fetch_add(1, Ordering::Relaxed) + 1;
            // The very first check decides at once (Envoy: a new endpoint is healthy as
            // soon as one check passes).
            if first || streak >= spec.healthy_threshold {
                h.check_failed.store(false, Ordering::Relaxed);
                h.check_streak.store(0, Ordering::Relaxed);
                return true;
            }
            false
        }
        (false, false) => {
            let streak = h.check_streak.fetch_add(1, Ordering::Relaxed) + 1;
            if streak >= spec.unhealthy_threshold {
                h.check_failed.store(true, Ordering::Relaxed);
                h.check_streak.store(0, Ordering::Relaxed);
                return true;
            }
            false
        }
        // Passing and healthy, or failing and already unhealthy: the streak restarts.
        _ => {
            h.check_streak.store(0, Ordering::Relaxed);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn success_rate_math() {
        // Four endpoints near 99%, one at 50%: mean 89.2, stdev 19.6; factor 1.9 → threshold
        // ≈ 51.96: the 50% one is out.
        let rates = [(0, 99.0), (1, 98.0), (2, 100.0), (3, 99.0), (4, 50.0)];
        assert_eq!(success_rate_outliers(&rates, 5, 1900), vec![4]);
        // Too few endpoints with enough volume: nothing.
        assert!(success_rate_outliers(&rates, 6, 1900).is_empty());
        // All equal: stdev 0, nobody strictly below the mean.
        let same = [(0, 90.0), (1, 90.0), (2, 90.0), (3, 90.0), (4, 90.0)];
        assert!(success_rate_outliers(&same, 5, 1900).is_empty());
        // A looser factor keeps the slow one in.
        assert!(success_rate_outliers(&rates, 5, 3000).is_empty());
        assert!(success_rate_outliers(&rates, 5, 0).is_empty());
    }

    #[test]
    fn ejection_grows_and_caps() {
        let b = Duration::from_secs(30);
        let m = Duration::from_secs(300);
        assert_eq!(ejection_duration(b, m, 1), b);
        assert_eq!(ejection_duration(b, m, 3), Duration::from_secs(90));
        assert_eq!(ejection_duration(b, m, 50), m);
    }

    #[test]
    fn outcome_classes() {
        assert_eq!(classify(UpstreamOutcome::Response(200)), (false, false));
        assert_eq!(classify(UpstreamOutcome::Response(500)), (true, false));
        assert_eq!(classify(UpstreamOutcome::Response(503)), (true, true));
        assert_eq!(classify(UpstreamOutcome::ConnectFailure), (true, true));
    }

    #[test]
    fn check_thresholds() {
        let spec: HealthCheckSpec = serde_json::from_value(serde_json::json!({
            "path": "/h", "healthy_threshold": 2, "unhealthy_threshold": 3
        }))
        .expect("spec");
        let h = EndpointHealth::new(true);
        // The first pass makes a new endpoint healthy at once.
        assert!(apply_check(&h, true, &spec));
        assert!(!h.check_failed.load(Ordering::Relaxed));
        // Two failures are not enough, a pass resets the streak.
        assert!(!apply_check(&h, false, &spec));
        assert!(!apply_check(&h, false, &spec));
        assert!(!apply_check(&h, true, &spec));
        assert!(!apply_check(&h, false, &spec));
        assert!(!apply_check(&h, false, &spec));
        assert!(apply_check(&h, false, &spec));
        assert!(h.check_failed.load(Ordering::Relaxed));
        // Back after healthy_threshold passes.
        assert!(!apply_check(&h, true, &spec));
        assert!(apply_check(&h, true, &spec));
        assert!(!h.check_failed.load(Ordering::Relaxed));
    }
}
