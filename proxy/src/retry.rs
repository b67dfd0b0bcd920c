//! Retries: which attempt outcomes are retried (Envoy's `retry_on`), how long to wait
//! before the next attempt, and whether the cluster's retry limits allow one more.
//!
//! This module decides; the request path (`proxy.rs`) runs the attempts. It owns no I/O.

use crate::cluster::UpstreamOutcome;
use crate::config::{RetryBudgetSpec, RetryPolicySpec};
use http::HeaderMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

/// Bit set of retry conditions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn(u8);

impl RetryOn {
    pub const FIVE_XX: u8 = 1;
    pub const GATEWAY_ERROR: u8 = 1 << 1;
    pub const RESET: u8 = 1 << 2;
    pub const CONNECT_FAILURE: u8 = 1 << 3;
    pub const REFUSED_STREAM: u8 = 1 << 4;
    pub const RETRIABLE_STATUS_CODES: u8 = 1 << 5;
    pub const RETRIABLE_4XX: u8 = 1 << 6;

    fn has(self, bit: u8) -> bool {
        self.0 & bit != 0
    }
}

/// Parse Envoy's comma-separated `retry_on`; the error names the unknown condition.
pub fn parse_retry_on(s: &str) -> Result<RetryOn, String> {
    let mut bits = 0;
    for cond in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
        bits |= match cond {
            "5xx" => RetryOn::FIVE_XX,
            "gateway-error" => RetryOn::GATEWAY_ERROR,
            "reset" => RetryOn::RESET,
            "connect-failure" => RetryOn::CONNECT_FAILURE,
            "refused-stream" => RetryOn::REFUSED_STREAM,
            "retriable-status-codes" => RetryOn::RETRIABLE_STATUS_CODES,
            "retriable-4xx" => RetryOn::RETRIABLE_4XX,
            other => {
                return Err(format!(
                    "unknown retry condition `{other}` (expected 5xx, gateway-error, reset, \
                     connect-failure, refused-stream, retriable-status-codes, retriable-4xx)"
                ))
            }
        };
    }
    if bits == 0 {
        return Err("name at least one retry condition".into());
    }
    Ok(RetryOn(bits))
}

/// How an attempt failed, in the terms `retry_on` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptFailure {
    Status(u16),
    ConnectFailure,
    Reset,
    /// HTTP/2 REFUSED_STREAM: the upstream did not process the request at all.
    RefusedStream,
    /// The per-try timeout fired.
    Timeout,
}

impl AttemptFailure {
    pub fn outcome(self) -> UpstreamOutcome {
        match self {
            AttemptFailure::Status(s) => UpstreamOutcome::Response(s),
            AttemptFailure::ConnectFailure => UpstreamOutcome::ConnectFailure,
            AttemptFailure::Reset | AttemptFailure::RefusedStream => UpstreamOutcome::Reset,
            AttemptFailure::Timeout => UpstreamOutcome::Timeout,
        }
    }
}

/// A route's retry policy, compiled.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub on: RetryOn,
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    pub base_interval: Duration,
    pub max_interval: Duration,
    pub buffer_limit: usize,
}

impl RetryPolicy {
    /// From a validated spec.
    pub fn new(spec: &RetryPolicySpec) -> Self {
        let base = spec.retry_back_off.base_interval;
        Self {
            on: parse_retry_on(&spec.retry_on).unwrap_or_default(),
            num_retries: spec.num_retries,
            per_try_timeout: spec.per_try_timeout,
            retriable_status_codes: spec.retriable_status_codes.clone(),
            base_interval: base,
            max_interval: spec.retry_back_off.max_interval.unwrap_or(base * 10),
            buffer_limit: spec.per_request_buffer_limit_bytes,
        }
    }

    /// Whether this failure is one the policy retries (Envoy's semantics: `5xx` covers
    /// every 5xx plus connect failures, resets and timeouts; `gateway-error` the same with
    /// only 502/503/504 among statuses).
    pub fn retries(&self, f: AttemptFailure) -> bool {
        let on = self.on;
        match f {
            AttemptFailure::Status(s) => {
                (on.has(RetryOn::FIVE_XX) && (500..600).contains(&s))
                    || (on.has(RetryOn::GATEWAY_ERROR) && matches!(s, 502..=504))
                    || (on.has(RetryOn::RETRIABLE_4XX) && s == 409)
                    || (on.has(RetryOn::RETRIABLE_STATUS_CODES)
                        && self.retriable_status_codes.contains(&s))
            }
            AttemptFailure::ConnectFailure => {
                on.has(RetryOn::CONNECT_FAILURE)
                    || on.has(RetryOn::FIVE_XX)
                    || on.has(RetryOn::GATEWAY_ERROR)
            }
            AttemptFailure::RefusedStream => {
                on.has(RetryOn::REFUSED_STREAM)
                    || on.has(RetryOn::FIVE_XX)
                    || on.has(RetryOn::GATEWAY_ERROR)
                    || on.has(RetryOn::RESET)
            }
            AttemptFailure::Reset | AttemptFailure::Timeout => {
                on.has(RetryOn::RESET) || on.has(RetryOn::FIVE_XX) || on.has(RetryOn::GATEWAY_ERROR)
            }
        }
    }

    /// The wait before retry number `retry` (1-based): fully jittered exponential back-off,
    /// a random time in `[0, base × 2^(retry-1)]`, capped at `max_interval` (Envoy's rule).
    pub fn back_off(&self, retry: u32) -> Duration {
        let ceiling = self
            .base_interval
            .saturating_mul(1u32 << (retry.saturating_sub(1)).min(16))
            .min(self.max_interval);
        let nanos = ceiling.as_nanos().min(u64::MAX as u128) as u64;
        if nanos == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(rand::random_range(0..=nanos))
    }
}

/// The delay a `retry-after` header asks for (delta-seconds or an HTTP-date).
pub fn retry_after(h: &HeaderMap) -> Option<Duration> {
    let v = h.get(http::header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate_parse(v)?;
    Some(
        when.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Parse an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`), the only HTTP-date form
/// senders may generate (RFC 9110 §5.6.7).
fn httpdate_parse(s: &str) -> Option<SystemTime> {
    let mut it = s.split_ascii_whitespace();
    let _weekday = it.next()?;
    let day: u64 = it.next()?.parse().ok()?;
    let month = match it.next()? {
        "Jan" => 1,
        "Feb" => 2,
        "Mar" => 3,
        "Apr" => 4,
        "May" => 5,
        "Jun" => 6,
        "Jul" => 7,
        "Aug" => 8,
        "Sep" => 9,
        "Oct" => 10,
        "Nov" => 11,
        "Dec" => 12,
        _ => return None,
    };
    // Four digits (RFC 9110 §5.6.7), which also keeps the arithmetic below in range.
    let year: i64 = it.next().filter(|y| y.len() == 4)?.parse().ok()?;
    let mut hms = it.next()?.split(':').map(|x| x.parse::<u64>().ok());
    let (h, m, sec) = (hms.next()??, hms.next()??, hms.next()??);
    if it.next()? != "GMT" || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let (y, mo) = if month <= 2 {
        (year - 1, month + 9)
    } else {
        (year, month - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * mo as i64 + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days).ok()? * 86_400 + h * 3600 + m * 60 + sec;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
}

/// A cluster's retry limit: a fixed number of retries in flight (`max_retries`), or a
/// budget relative to the requests in flight.
#[derive(Debug)]
pub struct RetryLimiter {
    active: AtomicUsize,
    max: usize,
    budget: Option<RetryBudgetSpec>,
}

impl RetryLimiter {
    pub fn new(max: usize, budget: Option<RetryBudgetSpec>) -> Self {
        Self {
            active: AtomicUsize::new(0),
            max,
            budget,
        }
    }

    /// Take a retry slot if the limit allows one; `requests_active` is the cluster's
    /// requests in flight (for the budget).
    pub fn try_acquire(&self, requests_active: usize) -> Option<RetryGuard<'_>> {
        let limit = match &self.budget {
            Some(b) => ((requests_active as f64 * b.budget_percent / 100.0) as usize)
                .max(b.min_retry_concurrency),
            None => self.max,
        };
        let mut cur = self.active.load(Ordering::Relaxed);
        loop {
            if cur >= limit {
                return None;
            }
            match self.active.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(RetryGuard(self)),
                Err(now) => cur = now,
            }
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// A retry in flight; releases its slot when dropped.
pub struct RetryGuard<'a>(&'a RetryLimiter);

impl Drop for RetryGuard<'_> {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The `grpc-timeout` header (`1-8 digits` + unit `H M S m u n`) as a duration.
pub fn grpc_timeout(h: &HeaderMap) -> Option<Duration> {
    // A static name: looking up by `&str` parses and validates the name on every request.
    static GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");
    let v = h.get(&GRPC_TIMEOUT)?.to_str().ok()?;
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    if !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A duration as a `grpc-timeout` value (milliseconds, at least 1).
pub fn grpc_timeout_value(d: Duration) -> String {
    format!("{}m", d.as_millis().clamp(1, 99_999_999))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &str) -> RetryPolicy {
        RetryPolicy::new(&RetryPolicySpec {
            retry_on: on.into(),
            num_retries: 2,
            per_try_timeout: None,
            retriable_status_codes: vec![418],
            retry_back_off: Default::default(),
            per_request_buffer_limit_bytes: 1024,
        })
    }

    #[test]
    fn conditions() {
        assert!(parse_retry_on("5xx, bogus").is_err());
        assert!(parse_retry_on("").is_err());
        let p = policy("5xx");
        assert!(p.retries(AttemptFailure::Status(500)));
        assert!(p.retries(AttemptFailure::ConnectFailure));
        assert!(p.retries(AttemptFailure::Timeout));
        assert!(!p.retries(AttemptFailure::Status(404)));
        let p = policy("gateway-error");
        assert!(!p.retries(AttemptFailure::Status(500)));
        assert!(p.retries(AttemptFailure::Status(503)));
        let p = policy("connect-failure");
        assert!(p.retries(AttemptFailure::ConnectFailure));
        assert!(!p.retries(AttemptFailure::Reset));
        assert!(!p.retries(AttemptFailure::Status(503)));
        let p = policy("retriable-status-codes,retriable-4xx");
        assert!(p.retries(AttemptFailure::Status(418)));
        assert!(p.retries(AttemptFailure::Status(409)));
        assert!(!p.retries(AttemptFailure::Status(500)));
        let p = policy("refused-stream");
        assert!(p.retries(AttemptFailure::RefusedStream));
        assert!(!p.retries(AttemptFailure::Reset));
    }

    #[test]
    fn back_off_is_jittered_and_capped() {
        let p = policy("5xx");
        for retry in 1..20 {
            let d = p.back_off(retry);
            assert!(d <= p.max_interval, "{d:?}");
            assert!(d <= p.base_interval * (1 << (retry - 1).min(16)));
        }
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(http::header::RETRY_AFTER, "3".parse().expect("value"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            http::header::RETRY_AFTER,
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().expect("value"),
        );
        assert_eq!(retry_after(&h), Some(Duration::ZERO));
        assert_eq!(
            httpdate_parse("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777))
        );
        h.insert(http::header::RETRY_AFTER, "soon".parse().expect("value"));
        assert_eq!(retry_after(&h), None);
        // The upstream's to set: out-of-range values are refused or kept as they are,
        // never a panic (the caller bounds the wait).
        h.insert(
            http::header::RETRY_AFTER,
            "Sun, 06 Nov 300000000000 08:49:37 GMT"
                .parse()
                .expect("value"),
        );
        assert_eq!(retry_after(&h), None);
        h.insert(
            http::header::RETRY_AFTER,
            "18446744073709551615".parse().expect("value"),
        );
        assert_eq!(retry_after(&h), Some(Duration::from_secs(u64::MAX)));
        assert!(httpdate_parse("Fri, 31 Dec 9999 23:59:60 GMT").is_some());
    }

    #[test]
    fn budget_and_fixed_limits() {
        let fixed = RetryLimiter::new(1, None);
        let g = fixed.try_acquire(100);
        assert!(g.is_some());
        assert!(fixed.try_acquire(100).is_none());
        drop(g);
        assert!(fixed.try_acquire(100).is_some());
        let budget = RetryLimiter::new(
            0,
            Some(RetryBudgetSpec {
                budget_percent: 20.0,
                min_retry_concurrency: 2,
            }),
        );
        let held: Vec<_> = (0..2).filter_map(|_| budget.try_acquire(1)).collect();
        assert_eq!(held.len(), 2);
        assert!(budget.try_acquire(1).is_none());
        assert!(budget.try_acquire(50).is_some()); // 20% of 50 = 10
    }

    #[test]
    fn grpc_timeouts() {
        let mut h = HeaderMap::new();
        h.insert("grpc-timeout", "250m".parse().expect("value"));
        assert_eq!(grpc_timeout(&h), Some(Duration::from_millis(250)));
        h.insert("grpc-timeout", "2S".parse().expect("value"));
        assert_eq!(grpc_timeout(&h), Some(Duration::from_secs(2)));
        h.insert("grpc-timeout", "123456789m".parse().expect("value"));
        assert_eq!(grpc_timeout(&h), None);
        assert_eq!(grpc_timeout_value(Duration::from_micros(10)), "1m");
    }
}
