//! `telemetry`: add attributes built from request data to the request's access-log line
//! and span, and count requests and record their latency by a label taken from a header
//! (e.g. the tenant), with bounded cardinality. The config schema is in this crate's README.

// Unit tests unwrap freely: a panic there is a failed test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use filter_common::config::{self, field_error};
use filter_common::template::Template;
use serde::Deserialize;
use std::collections::BTreeMap;
use wasmesh_sdk::metrics::{Counter, Histogram};
use wasmesh_sdk::{export_filter, Action, Filter, Hooks, Outcome, Request};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    attributes: BTreeMap<String, Template>,
    #[serde(default)]
    label: Option<LabelSpec>,
    #[serde(default = "default_prefix")]
    metric_prefix: String,
    #[serde(default)]
    buckets: Vec<f64>,
    #[serde(default = "yes")]
    metrics: bool,
}

fn default_prefix() -> String {
    "telemetry".to_string()
}
fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LabelSpec {
    name: String,
    header: String,
    #[serde(default = "unknown")]
    default: String,
    #[serde(default)]
    values: Option<Vec<String>>,
    #[serde(default = "max_len")]
    max_length: usize,
}

fn unknown() -> String {
    "unknown".to_string()
}
fn max_len() -> usize {
    64
}

/// Default latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Where the label value comes from and how it is kept bounded.
struct Label {
    header: String,
    default: String,
    /// Allowed values; anything else counts as `other`.
    values: Option<Vec<String>>,
    max_length: usize,
}

impl Label {
    fn value(&self, req: &Request) -> String {
        let Some(v) = req.header(&self.header).filter(|v| !v.is_empty()) else {
            return self.default.clone();
        };
        match &self.values {
            Some(allowed) if allowed.contains(&v) => v,
            Some(_) => "other".to_string(),
            None => truncate(v, self.max_length),
        }
    }
}

fn truncate(mut v: String, max: usize) -> String {
    if v.len() > max {
        let mut cut = max;
        while !v.is_char_boundary(cut) {
            cut -= 1;
        }
        v.truncate(cut);
    }
    v
}

fn metric_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn code_class(status: u16) -> &'static str {
    match status / 100 {
        1 => "1xx",
        2 => "2xx",
        3 => "3xx",
        4 => "4xx",
        5 => "5xx",
        _ => "none",
    }
}

struct Telemetry {
    attributes: Vec<(String, Template)>,
    label: Option<Label>,
    requests: Option<Counter>,
    duration: Option<Histogram>,
}

impl Filter for Telemetry {
    const HOOKS: Hooks = Hooks::REQUEST_HEADERS;

    fn configure(json: &str) -> Result<Self, String> {
        let cfg: Config = config::parse(json)?;
        for key in cfg.attributes.keys() {
            if key.is_empty() || key.len() > 128 {
                return Err(field_error(
                    &format!("attributes.{key}"),
                    "attribute names are 1 to 128 characters",
                ));
            }
        }
        if !metric_ident(&cfg.metric_prefix) {
            return Err(field_error(
                "metric_prefix",
                "letters, digits and '_', not starting with a digit",
            ));
        }
        if cfg.buckets.windows(2).any(|w| w[0] >= w[1])
            || cfg.buckets.iter().any(|b| !b.is_finite())
        {
            return Err(field_error(
                "buckets",
                "must be finite and strictly increasing",
            ));
        }
        let label = match cfg.label {
            None => None,
            Some(l) => {
                if !metric_ident(&l.name) || l.name.starts_with("__") {
                    return Err(field_error(
                        "label.name",
                        "a Prometheus label name: letters, digits and '_', not starting with a digit or \"__\"",
                    ));
                }
                if matches!(l.name.as_str(), "filter" | "le" | "response_code_class") {
                    return Err(field_error(
                        "label.name",
                        format!("{:?} is used by the metric itself", l.name),
                    ));
                }
                let header = l.header.to_ascii_lowercase();
                if !filter_common::valid_header_name(&header) {
                    return Err(field_error("label.header", "not a valid header name"));
                }
                if l.max_length == 0 {
                    return Err(field_error("label.max_length", "must be at least 1"));
                }
                Some((
                    l.name,
                    Label {
                        header,
                        default: l.default,
                        values: l.values,
                        max_length: l.max_length,
                    },
                ))
            }
        };
        let (requests, duration) = if cfg.metrics {
            let names: Vec<&str> = label.iter().map(|(n, _)| n.as_str()).collect();
            let mut counter_labels = names.clone();
            counter_labels.push("response_code_class");
            let buckets: &[f64] = if cfg.buckets.is_empty() {
                &BUCKETS
            } else {
                &cfg.buckets
            };
            (
                Some(Counter::new(
                    &format!("{}_requests", cfg.metric_prefix),
                    "Requests, by the configured label and response code class",
                    &counter_labels,
                )?),
                Some(Histogram::new(
                    &format!("{}_request_duration_seconds", cfg.metric_prefix),
                    "Time from the request head to the end of the response, by the configured label",
                    &names,
                    buckets,
                )?),
            )
        } else {
            (None, None)
        };
        let t = Telemetry {
            attributes: cfg.attributes.into_iter().collect(),
            label: label.map(|(_, l)| l),
            requests,
            duration,
        };
        if t.attributes.is_empty() && t.requests.is_none() {
            return Err(
                "config: nothing to do (give `attributes` or leave `metrics` on)".to_string(),
            );
        }
        Ok(t)
    }

    fn hooks(&self) -> Hooks {
        let mut h = Hooks::empty();
        if !self.attributes.is_empty() {
            h |= Hooks::REQUEST_HEADERS;
        }
        if self.requests.is_some() {
            h |= Hooks::DONE;
        }
        h
    }

    fn on_request_headers(&mut self, req: &Request) -> Action {
        // Set on the request side: the access-log line takes the attributes before `on-done`.
        for (key, t) in &self.attributes {
            let v = t.render(req);
            if !v.is_empty() {
                req.set_attribute(key, &v);
            }
        }
        Action::Continue
    }

    fn on_done(&mut self, req: &Request, outcome: &Outcome) {
        let label = self.label.as_ref().map(|l| l.value(req));
        let mut values: Vec<&str> = label.iter().map(String::as_str).collect();
        if let Some(h) = &self.duration {
            h.observe(&values, outcome.duration_nanos as f64 / 1e9);
        }
        if let Some(c) = &self.requests {
            values.push(code_class(outcome.status));
            c.add(&values, 1);
        }
    }
}

export_filter!(Telemetry);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(code_class(204), "2xx");
        assert_eq!(code_class(0), "none");
        assert_eq!(truncate("héllo".into(), 2), "h");
        assert_eq!(truncate("abc".into(), 5), "abc");
        assert!(metric_ident("tenant_1"));
        assert!(!metric_ident("1tenant"));
        assert!(!metric_ident("ten-ant"));
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = config::parse::<Config>(r#"{"attributes": {"a": "%NOPE%"}}"#)
            .err()
            .unwrap();
        assert!(e.starts_with("config.attributes.a"), "{e}");
        let e = config::parse::<Config>(r#"{"label": {"name": "t"}}"#)
            .err()
            .unwrap();
        assert!(e.contains("missing field `header`"), "{e}");
    }
}
