//! `ratelimit`: token buckets shared by every worker thread, keyed by client address, a
//! header, the peer identity, the route (or a combination); several limits at once.
//! Over the limit: `429` with `retry-after` and `x-ratelimit-*`, flag `RL`. In `shadow`
//! mode it only logs and counts. The algorithms are in [`bucket`]; the config schema is in
//! this crate's README.

// Unit tests unwrap freely: a panic there is a failed test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod bucket;

use bucket::{Decision, Store};
use filter_common::config::{self, field_error};
use filter_common::duration::Duration;
use serde::Deserialize;
use wasmesh_sdk::metrics::Counter;
use wasmesh_sdk::{export_filter, state, Action, Filter, Hooks, LocalResponse, Request};

const SEC: u64 = 1_000_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    limits: Vec<LimitSpec>,
    /// Report only: count and log what would be limited, let everything through.
    #[serde(default)]
    shadow: bool,
    /// Add `x-ratelimit-*` to responses that passed too.
    #[serde(default = "yes")]
    response_headers: bool,
    /// Status of the rejection.
    #[serde(default = "too_many")]
    status: u16,
}

fn yes() -> bool {
    true
}
fn too_many() -> u16 {
    429
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitSpec {
    #[serde(default)]
    name: Option<String>,
    key: KeySpec,
    burst: u64,
    #[serde(default)]
    refill: Option<Refill>,
    #[serde(default)]
    window: Option<Duration>,
    #[serde(default)]
    when_missing: Missing,
    #[serde(default)]
    shadow: Option<bool>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum KeySpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Refill {
    tokens: u64,
    #[serde(default = "one_second")]
    period: Duration,
}

fn one_second() -> Duration {
    Duration(SEC)
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum Missing {
    /// The limit does not apply to a request without its key.
    #[default]
    Skip,
    /// Requests without the key share one bucket.
    Shared,
}

/// What a bucket is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyPart {
    ClientAddress,
    PeerIdentity,
    Route,
    Header(String),
    Global,
}

impl KeyPart {
    fn parse(text: &str, field: &str) -> Result<KeyPart, String> {
        Ok(match text {
            "client_address" => KeyPart::ClientAddress,
            "peer_identity" => KeyPart::PeerIdentity,
            "route" => KeyPart::Route,
            "global" => KeyPart::Global,
            t => match t.strip_prefix("header:") {
                Some(h) if filter_common::valid_header_name(&h.to_ascii_lowercase()) => {
                    KeyPart::Header(h.to_ascii_lowercase())
                }
                _ => {
                    return Err(field_error(
                        field,
                        format!(
                            "unknown key {t:?}: use client_address, peer_identity, route, \
                             global or header:NAME"
                        ),
                    ))
                }
            },
        })
    }

    /// Append this part's value for `req` to `key` (kept short: see
    /// [`filter_common::hash::bounded_key`]); false when the request has none.
    fn push_value(&self, req: &Request, key: &mut String) -> bool {
        let push = |key: &mut String, v: &str| {
            if v.len() <= 128 {
                key.push_str(v);
            } else {
                key.push_str(&filter_common::hash::bounded_key(v));
            }
        };
        match self {
            KeyPart::ClientAddress => {
                // Lent by the SDK (it comes with the hook): no copy of the address.
                req.with_source_address(|a| push(key, &filter_common::client_ip(a)));
            }
            KeyPart::PeerIdentity => match req.peer_identity().filter(|s| !s.is_empty()) {
                Some(v) => push(key, &v),
                None => return false,
            },
            KeyPart::Route => push(key, &req.route_name()),
            KeyPart::Header(h) => match req.header(h) {
                Some(v) => push(key, &v),
                None => return false,
            },
            KeyPart::Global => {}
        }
        true
    }
}

/// How a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// GCRA: one token back every `interval_ns`.
    Bucket { interval_ns: u64 },
    /// No refill: `burst` per window (or in all).
    Quota { window_ns: Option<u64> },
}

#[derive(Debug)]
struct Limit {
    name: String,
    key: Vec<KeyPart>,
    burst: u64,
    /// `burst` in decimal, the `x-ratelimit-limit` value (written once, not per request).
    burst_text: String,
    kind: Kind,
    missing: Missing,
    shadow: bool,
}

impl Limit {
    fn from_spec(i: usize, spec: LimitSpec, shadow: bool) -> Result<Limit, String> {
        let f = |sub: &str| format!("limits[{i}].{sub}");
        let name = spec.name.unwrap_or_else(|| format!("limit{i}"));
        if name.is_empty() || name.len() > 64 || name.contains('|') {
            return Err(field_error(&f("name"), "1 to 64 characters, no '|'"));
        }
        let parts = match spec.key {
            KeySpec::One(s) => vec![s],
            KeySpec::Many(v) => v,
        };
        if parts.is_empty() {
            return Err(field_error(&f("key"), "give at least one key part"));
        }
        let key = parts
            .iter()
            .enumerate()
            .map(|(j, p)| KeyPart::parse(p, &f(&format!("key[{j}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        if spec.burst == 0 {
            return Err(field_error(&f("burst"), "must be at least 1"));
        }
        let kind = match spec.refill {
            Some(r) if r.tokens > 0 => {
                if spec.window.is_some() {
                    return Err(field_error(
                        &f("window"),
                        "only for limits without refill (a refilling bucket has no window)",
                    ));
                }
                let interval_ns = r.period.nanos() / r.tokens;
                if interval_ns == 0 {
                    return Err(field_error(
                        &f("refill"),
                        "more than one token per nanosecond: use a longer period",
                    ));
                }
                if spec.burst.checked_mul(interval_ns).is_none() {
                    return Err(field_error(
                        &f("burst"),
                        "burst × refill interval is too long",
                    ));
                }
                Kind::Bucket { interval_ns }
            }
            _ => {
                let window_ns = spec.window.map(Duration::nanos);
                if window_ns == Some(0) {
                    return Err(field_error(&f("window"), "must be longer than 0"));
                }
                Kind::Quota { window_ns }
            }
        };
        Ok(Limit {
            name,
            key,
            burst: spec.burst,
            burst_text: filter_common::decimal(spec.burst),
            kind,
            missing: spec.when_missing,
            shadow: spec.shadow.unwrap_or(shadow),
        })
    }

    /// The shared-state key of this request's bucket, or `None` when the limit does not apply.
    fn state_key(&self, req: &Request) -> Option<String> {
        let mut key = String::with_capacity(self.name.len() + 48);
        key.push_str(&self.name);
        for part in &self.key {
            key.push('|');
            if !part.push_value(req, &mut key) {
                if self.missing != Missing::Shared {
                    return None;
                }
                key.push('\u{0}');
            }
        }
        Some(key)
    }
}

/// The SDK's shared state as a [`Store`].
struct HostStore;

impl Store for HostStore {
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        state::get(key)
    }
    fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        value: &[u8],
        ttl_ms: u64,
    ) -> Result<bool, String> {
        state::compare_and_swap(
            key,
            expected,
            value,
            Some(std::time::Duration::from_millis(ttl_ms)),
        )
    }
    fn increment(&self, key: &str, delta: i64, ttl_ms: u64) -> Result<i64, String> {
        let ttl = (ttl_ms > 0).then(|| std::time::Duration::from_millis(ttl_ms));
        state::increment(key, delta, ttl)
    }
}

/// A token taken, to give back if a later limit denies the request.
struct Taken {
    /// Index of the limit in `RateLimit::limits`.
    limit: usize,
    key: String,
}

struct RateLimit {
    limits: Vec<Limit>,
    response_headers: bool,
    status: u16,
    decisions: Option<Counter>,
    /// Monotonic time of the last shadow log line (at most one a second per instance).
    last_shadow_log: u64,
    shadow_unlogged: u64,
    /// The tokens the running request took (empty between requests; kept to reuse its
    /// allocation).
    taken: Vec<Taken>,
}

fn secs_ceil(ns: u64) -> u64 {
    ns.div_ceil(SEC)
}

impl RateLimit {
    fn count(&self, limit: &Limit, decision: &str) {
        if let Some(c) = &self.decisions {
            c.add(&[&limit.name, decision], 1);
        }
    }

    fn take(&self, limit: &Limit, key: &str) -> Result<Decision, String> {
        match limit.kind {
            Kind::Bucket { interval_ns } => {
                let interval = std::time::Duration::from_nanos(interval_ns);
                let d = state::take_token(key, limit.burst, interval)?;
                Ok(Decision {
                    allowed: d.allowed,
                    remaining: d.remaining,
                    reset_ns: Some(d.reset_nanos),
                    retry_after_ns: (!d.allowed).then_some(d.retry_after_nanos),
                })
            }
            Kind::Quota { window_ns } => {
                let (k, left) = bucket::quota_key(key, wasmesh_sdk::now_unix_nanos(), window_ns);
                bucket::take_quota(&HostStore, &k, left, limit.burst)
            }
        }
    }

    fn give_back(&self, limit: &Limit, taken: &Taken) {
        match limit.kind {
            Kind::Bucket { interval_ns } => bucket::return_token(
                &HostStore,
                &taken.key,
                wasmesh_sdk::monotonic_nanos(),
                interval_ns,
            ),
            Kind::Quota { window_ns } => {
                let (k, _) =
                    bucket::quota_key(&taken.key, wasmesh_sdk::now_unix_nanos(), window_ns);
                bucket::return_quota(&HostStore, &k)
            }
        }
    }

    fn log_shadow(&mut self, limit: &Limit, req: &Request) {
        let now = wasmesh_sdk::monotonic_nanos();
        if now.saturating_sub(self.last_shadow_log) < SEC && self.last_shadow_log != 0 {
            self.shadow_unlogged += 1;
            return;
        }
        wasmesh_sdk::info!(
            "shadow: limit {} would reject request {} from {} ({} more since the last line)",
            limit.name,
            req.id(),
            req.source_address(),
            self.shadow_unlogged
        );
        self.last_shadow_log = now;
        self.shadow_unlogged = 0;
    }

    fn reject(&self, limit: &Limit, d: &Decision) -> Action {
        let mut r = LocalResponse::new(self.status)
            .header("x-ratelimit-limit", &limit.burst_text)
            .header("x-ratelimit-remaining", "0");
        if let Some(reset) = d.reset_ns {
            r = r.header("x-ratelimit-reset", &secs_ceil(reset).to_string());
        }
        if let Some(after) = d.retry_after_ns {
            r = r.header("retry-after", &secs_ceil(after).max(1).to_string());
        }
        r.header("content-type", "text/plain; charset=utf-8")
            .body(format!("rate limited ({})\n", limit.name))
            .flag("RL")
            .into()
    }
}

impl Filter for RateLimit {
    const HOOKS: Hooks = Hooks::REQUEST_HEADERS;

    fn configure(json: &str) -> Result<Self, String> {
        let cfg: Config = config::parse(json)?;
        if cfg.limits.is_empty() {
            return Err(field_error("limits", "give at least one limit"));
        }
        if !(400..=599).contains(&cfg.status) {
            return Err(field_error("status", "must be 400..=599"));
        }
        let mut limits = Vec::with_capacity(cfg.limits.len());
        for (i, spec) in cfg.limits.into_iter().enumerate() {
            let l = Limit::from_spec(i, spec, cfg.shadow)?;
            if limits.iter().any(|o: &Limit| o.name == l.name) {
                return Err(field_error(
                    &format!("limits[{i}].name"),
                    format!("{:?} is used by another limit", l.name),
                ));
            }
            limits.push(l);
        }
        let decisions = Counter::new(
            "ratelimit_requests",
            "Rate-limit decisions: allowed, limited, or shadow_limited (would have been limited)",
            &["limit", "decision"],
        )?;
        Ok(RateLimit {
            limits,
            response_headers: cfg.response_headers,
            status: cfg.status,
            decisions: Some(decisions),
            last_shadow_log: 0,
            shadow_unlogged: 0,
            taken: Vec::new(),
        })
    }

    fn hooks(&self) -> Hooks {
        // `x-ratelimit-*` on passes are set from the request side (`set_response_header`):
        // no response hook. The client address, read by most limits, comes with the hook.
        let by_client = self
            .limits
            .iter()
            .any(|l| l.key.contains(&KeyPart::ClientAddress));
        if by_client {
            Hooks::REQUEST_HEADERS | Hooks::PASS_SOURCE_ADDRESS
        } else {
            Hooks::REQUEST_HEADERS
        }
    }

    fn on_request_headers(&mut self, req: &Request) -> Action {
        let limits = std::mem::take(&mut self.limits);
        let mut taken = std::mem::take(&mut self.taken);
        let action = self.check(&limits, &mut taken, req);
        taken.clear();
        self.limits = limits;
        self.taken = taken;
        action
    }
}

impl RateLimit {
    fn check(&mut self, limits: &[Limit], taken: &mut Vec<Taken>, req: &Request) -> Action {
        // The limit closest to its end, for the x-ratelimit-* headers of a pass.
        let mut tightest: Option<(&Limit, Decision)> = None;
        for (i, limit) in limits.iter().enumerate() {
            let Some(key) = limit.state_key(req) else {
                continue;
            };
            let d = match self.take(limit, &key) {
                Ok(d) => d,
                Err(e) => {
                    // State full or hopelessly contended: do not fail the request on it.
                    wasmesh_sdk::warn!("limit {}: {e}; request let through", limit.name);
                    continue;
                }
            };
            if d.allowed {
                if tightest.is_none_or(|(_, t)| d.remaining < t.remaining) {
                    tightest = Some((limit, d));
                }
                taken.push(Taken { limit: i, key });
                continue;
            }
            req.set_attribute("ratelimit.limited_by", &limit.name);
            if limit.shadow {
                self.count(limit, "shadow_limited");
                self.log_shadow(limit, req);
                continue;
            }
            // Rejected: the other limits did not really serve this request.
            for t in taken.iter() {
                if let Some(l) = limits.get(t.limit) {
                    self.give_back(l, t);
                }
            }
            self.count(limit, "limited");
            return self.reject(limit, &d);
        }
        for t in taken.iter() {
            if let Some(l) = limits.get(t.limit) {
                self.count(l, "allowed");
            }
        }
        if self.response_headers {
            if let Some((limit, d)) = tightest {
                req.set_response_header("x-ratelimit-limit", &limit.burst_text);
                let buf = &mut [0; 20];
                let remaining = filter_common::fmt_u64(d.remaining, buf);
                req.set_response_header("x-ratelimit-remaining", remaining);
                if let Some(reset) = d.reset_ns {
                    let reset = filter_common::fmt_u64(secs_ceil(reset), buf);
                    req.set_response_header("x-ratelimit-reset", reset);
                }
            }
        }
        Action::Continue
    }
}

export_filter!(RateLimit);

#[cfg(test)]
mod tests {
    use super::*;

    fn limit(json: &str) -> Result<Limit, String> {
        let spec: LimitSpec = serde_json::from_str(json).map_err(|e| e.to_string())?;
        Limit::from_spec(0, spec, false)
    }

    #[test]
    fn limits_from_config() {
        let l =
            limit(r#"{"key": "client_address", "burst": 10, "refill": {"tokens": 5}}"#).unwrap();
        assert_eq!(
            l.kind,
            Kind::Bucket {
                interval_ns: SEC / 5
            }
        );
        assert_eq!(l.name, "limit0");
        let l = limit(
            r#"{"name": "t", "key": ["route", "header:X-Tenant"], "burst": 3,
                "window": "1m", "when_missing": "shared"}"#,
        )
        .unwrap();
        assert_eq!(
            l.key,
            vec![KeyPart::Route, KeyPart::Header("x-tenant".into())]
        );
        assert_eq!(
            l.kind,
            Kind::Quota {
                window_ns: Some(60 * SEC)
            }
        );
        assert_eq!(l.missing, Missing::Shared);
        let l = limit(r#"{"key": "global", "burst": 3, "refill": {"tokens": 0}}"#).unwrap();
        assert_eq!(l.kind, Kind::Quota { window_ns: None });
    }

    #[test]
    fn errors_name_the_field() {
        let e = limit(r#"{"key": "ip", "burst": 1}"#).unwrap_err();
        assert!(e.starts_with("config.limits[0].key[0]: unknown key"), "{e}");
        let e = limit(r#"{"key": "route", "burst": 0}"#).unwrap_err();
        assert!(e.starts_with("config.limits[0].burst"), "{e}");
        let e = limit(r#"{"key": "route", "burst": 1, "refill": {"tokens": 1}, "window": "1s"}"#)
            .unwrap_err();
        assert!(e.starts_with("config.limits[0].window"), "{e}");
        let e = config::parse::<Config>(r#"{"limits": [{"key": "route", "burst": "x"}]}"#)
            .err()
            .unwrap();
        assert!(e.starts_with("config.limits[0].burst"), "{e}");
        let e = config::parse::<Config>(
            r#"{"limits": [{"key": "route", "burst": 1, "refill": {"tokens": 1, "period": "1 sec"}}]}"#,
        )
        .err()
        .unwrap();
        assert!(e.starts_with("config.limits[0].refill.period"), "{e}");
    }
}
