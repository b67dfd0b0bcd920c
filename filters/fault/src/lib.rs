//! `fault`: inject aborts (a status code, flag `FI`) and delays (flag `DI`) into a share of
//! requests, optionally only for requests whose headers or client address match. Delays
//! are the host's delay action: the worker thread keeps serving other requests meanwhile.
//! The config schema is in this crate's README.

// Unit tests unwrap freely: a panic there is a failed test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use filter_common::config::{self, field_error};
use filter_common::duration::Duration;
use filter_common::matcher::{self, Cidr, HeaderMatch};
use serde::Deserialize;
use wasmesh_sdk::metrics::Counter;
use wasmesh_sdk::{export_filter, Action, Filter, Hooks, LocalResponse, Request};

/// Percentages are rolled in parts per million: `0.0001` % is the finest share.
const PPM: u64 = 1_000_000;
/// The host caps a delay at 300 s; refuse more at load instead of silently shortening it.
const MAX_DELAY_MS: u64 = 300_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    abort: Option<AbortSpec>,
    #[serde(default)]
    delay: Option<DelaySpec>,
    #[serde(default, rename = "match")]
    when: Match,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AbortSpec {
    percent: f64,
    status: u16,
    #[serde(default)]
    body: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DelaySpec {
    percent: f64,
    duration: Duration,
}

/// Which requests faults apply to: all of the headers match and the client is in one of
/// the ranges (each part optional).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Match {
    #[serde(default)]
    headers: Vec<HeaderMatch>,
    #[serde(default)]
    sources: Vec<Cidr>,
}

impl Match {
    fn matches(&self, req: &Request) -> bool {
        self.headers.iter().all(|h| h.matches(req))
            && (self.sources.is_empty() || matcher::source_in(&self.sources, &req.source_address()))
    }
}

fn per_million(percent: f64, field: &str) -> Result<u64, String> {
    if !(0.0..=100.0).contains(&percent) {
        return Err(field_error(field, "must be between 0 and 100"));
    }
    Ok((percent * (PPM as f64 / 100.0)).round() as u64)
}

struct Abort {
    ppm: u64,
    status: u16,
    body: String,
}

struct Delay {
    ppm: u64,
    millis: u32,
}

struct Fault {
    abort: Option<Abort>,
    delay: Option<Delay>,
    when: Match,
    injected: Option<Counter>,
}

fn roll(ppm: u64) -> bool {
    ppm > 0 && wasmesh_sdk::random_u64() % PPM < ppm
}

impl Filter for Fault {
    const HOOKS: Hooks = Hooks::REQUEST_HEADERS;

    fn configure(json: &str) -> Result<Self, String> {
        let mut cfg: Config = config::parse(json)?;
        if cfg.abort.is_none() && cfg.delay.is_none() {
            return Err("config: give `abort`, `delay` or both".to_string());
        }
        matcher::validate_all(&mut cfg.when.headers, "match.headers")?;
        let abort = match cfg.abort {
            None => None,
            Some(a) => {
                if !(200..=599).contains(&a.status) {
                    return Err(field_error("abort.status", "must be 200..=599"));
                }
                Some(Abort {
                    ppm: per_million(a.percent, "abort.percent")?,
                    status: a.status,
                    body: a.body.unwrap_or_else(|| "fault filter abort\n".to_string()),
                })
            }
        };
        let delay = match cfg.delay {
            None => None,
            Some(d) => {
                let ms = d.duration.millis();
                if ms == 0 || ms > MAX_DELAY_MS {
                    return Err(field_error("delay.duration", "must be 1ms..=300s"));
                }
                Some(Delay {
                    ppm: per_million(d.percent, "delay.percent")?,
                    millis: u32::try_from(ms).unwrap_or(u32::MAX),
                })
            }
        };
        let injected = Counter::new(
            "fault_injected",
            "Faults injected, by kind (abort, delay)",
            &["kind"],
        )?;
        Ok(Fault {
            abort,
            delay,
            when: cfg.when,
            injected: Some(injected),
        })
    }

    fn on_request_headers(&mut self, req: &Request) -> Action {
        if !self.when.matches(req) {
            return Action::Continue;
        }
        // One hook answers one action: when both faults fire, the abort wins (a delayed
        // abort would need a second request-side hook).
        if let Some(a) = &self.abort {
            if roll(a.ppm) {
                if let Some(c) = &self.injected {
                    c.add(&["abort"], 1);
                }
                return LocalResponse::new(a.status)
                    .header("content-type", "text/plain; charset=utf-8")
                    .body(a.body.clone())
                    .flag("FI")
                    .into();
            }
        }
        if let Some(d) = &self.delay {
            if roll(d.ppm) {
                if let Some(c) = &self.injected {
                    c.add(&["delay"], 1);
                }
                return Action::delay_ms_flagged(d.millis, "DI");
            }
        }
        Action::Continue
    }
}

export_filter!(Fault);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentages() {
        assert_eq!(per_million(10.0, "p"), Ok(100_000));
        assert_eq!(per_million(0.5, "p"), Ok(5_000));
        assert_eq!(per_million(100.0, "p"), Ok(PPM));
        assert!(per_million(100.5, "p").unwrap_err().starts_with("config.p"));
        assert!(per_million(-1.0, "p").is_err());
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = config::parse::<Config>(r#"{"abort": {"percent": 1}}"#)
            .err()
            .unwrap();
        assert!(e.contains("missing field `status`"), "{e}");
        let e = config::parse::<Config>(r#"{"delay": {"percent": 1, "duration": "soon"}}"#)
            .err()
            .unwrap();
        assert!(e.starts_with("config.delay.duration"), "{e}");
        let e = config::parse::<Config>(r#"{"match": {"sources": ["10.0.0.0/40"]}}"#)
            .err()
            .unwrap();
        assert!(e.starts_with("config.match.sources[0]"), "{e}");
    }
}
