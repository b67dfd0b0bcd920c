//! `canary`: send a share of traffic to other clusters (listed in the filter entry's
//! `clusters`) by weight; sticky per user (a hash of a header or cookie value, so a user
//! stays on one side on every worker and every proxy); header matches override the split.
//! Requests not sent elsewhere keep the route's cluster. The config schema is in this
//! crate's README.

// Unit tests unwrap freely: a panic there is a failed test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use filter_common::config::{self, field_error};
use filter_common::hash::hash64;
use filter_common::matcher::{self, HeaderMatch};
use serde::Deserialize;
use wasmesh_sdk::metrics::Counter;
use wasmesh_sdk::{export_filter, Action, Filter, Hooks, Request};

/// Weights are in parts per million of traffic.
const PPM: u64 = 1_000_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    targets: Vec<TargetSpec>,
    #[serde(default)]
    sticky: Option<Sticky>,
    #[serde(default)]
    salt: String,
    #[serde(default)]
    when_missing: Missing,
    #[serde(default)]
    overrides: Vec<Override>,
    #[serde(default)]
    mark_header: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSpec {
    cluster: String,
    percent: f64,
}

/// Where the user's identity comes from.
#[derive(Deserialize, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum Sticky {
    Header(String),
    Cookie(String),
}

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum Missing {
    /// Requests without a user identity are split at random.
    #[default]
    Random,
    /// Requests without a user identity keep the route's cluster.
    Route,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Override {
    #[serde(rename = "match")]
    when: Vec<HeaderMatch>,
    /// The cluster to use; absent: the route's own cluster (an opt-out).
    #[serde(default)]
    cluster: Option<String>,
}

struct Target {
    cluster: String,
    /// Upper end (exclusive) of this target's slice of `0..PPM`.
    upto: u64,
}

struct Canary {
    targets: Vec<Target>,
    sticky: Option<Sticky>,
    salt: String,
    missing: Missing,
    overrides: Vec<Override>,
    mark_header: Option<String>,
    decisions: Option<Counter>,
    warned: bool,
}

/// The value of cookie `name` in the request's `cookie` headers.
fn cookie(req: &Request, name: &str) -> Option<String> {
    req.header_all("cookie").iter().find_map(|line| {
        line.split(';').find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k.trim() == name).then(|| v.trim().trim_matches('"').to_string())
        })
    })
}

/// Which target (if any) the point `p` in `0..PPM` falls in.
fn pick(targets: &[Target], p: u64) -> Option<&Target> {
    targets.iter().find(|t| p < t.upto)
}

impl Canary {
    fn user(&self, req: &Request) -> Option<String> {
        match self.sticky.as_ref()? {
            Sticky::Header(h) => req.header(h),
            Sticky::Cookie(c) => cookie(req, c),
        }
        .filter(|v| !v.is_empty())
    }

    /// The cluster for this request (`None`: the route's) and why.
    fn decide(&self, req: &Request) -> (Option<String>, &'static str) {
        if let Some(o) = self
            .overrides
            .iter()
            .find(|o| o.when.iter().all(|m| m.matches(req)))
        {
            return (o.cluster.clone(), "override");
        }
        let (point, reason) = match (self.sticky.is_some(), self.user(req)) {
            (true, Some(user)) => (hash64(&self.salt, user.as_bytes()) % PPM, "sticky"),
            (true, None) if self.missing == Missing::Route => return (None, "no_user"),
            _ => (wasmesh_sdk::random_u64() % PPM, "random"),
        };
        (
            pick(&self.targets, point).map(|t| t.cluster.clone()),
            reason,
        )
    }
}

impl Filter for Canary {
    const HOOKS: Hooks = Hooks::REQUEST_HEADERS;

    fn configure(json: &str) -> Result<Self, String> {
        let mut cfg: Config = config::parse(json)?;
        if cfg.targets.is_empty() && cfg.overrides.is_empty() {
            return Err(field_error(
                "targets",
                "give at least one target or override",
            ));
        }
        let mut targets = Vec::with_capacity(cfg.targets.len());
        let mut upto = 0u64;
        for (i, t) in cfg.targets.iter().enumerate() {
            if t.cluster.is_empty() {
                return Err(field_error(
                    &format!("targets[{i}].cluster"),
                    "must not be empty",
                ));
            }
            if !(0.0..=100.0).contains(&t.percent) {
                return Err(field_error(
                    &format!("targets[{i}].percent"),
                    "must be between 0 and 100",
                ));
            }
            upto += (t.percent * (PPM as f64 / 100.0)).round() as u64;
            if upto > PPM {
                return Err(field_error(
                    &format!("targets[{i}].percent"),
                    "the targets' percentages add up to more than 100",
                ));
            }
            targets.push(Target {
                cluster: t.cluster.clone(),
                upto,
            });
        }
        match &mut cfg.sticky {
            Some(Sticky::Header(h)) => {
                *h = h.to_ascii_lowercase();
                if !filter_common::valid_header_name(h) {
                    return Err(field_error("sticky.header", "not a valid header name"));
                }
            }
            Some(Sticky::Cookie(c)) if c.is_empty() || c.contains([';', '=', ' ']) => {
                return Err(field_error("sticky.cookie", "not a valid cookie name"));
            }
            _ => {}
        }
        for (i, o) in cfg.overrides.iter_mut().enumerate() {
            if o.when.is_empty() {
                return Err(field_error(
                    &format!("overrides[{i}].match"),
                    "give at least one header match",
                ));
            }
            matcher::validate_all(&mut o.when, &format!("overrides[{i}].match"))?;
        }
        if let Some(h) = &mut cfg.mark_header {
            *h = h.to_ascii_lowercase();
            if !filter_common::valid_header_name(h) {
                return Err(field_error("mark_header", "not a valid header name"));
            }
        }
        let decisions = Counter::new(
            "canary_requests",
            "Canary routing decisions, by chosen cluster (\"route\": the route's own) and reason",
            &["cluster", "reason"],
        )?;
        Ok(Canary {
            targets,
            sticky: cfg.sticky,
            salt: cfg.salt,
            missing: cfg.when_missing,
            overrides: cfg.overrides,
            mark_header: cfg.mark_header,
            decisions: Some(decisions),
            warned: false,
        })
    }

    fn on_request_headers(&mut self, req: &Request) -> Action {
        let (cluster, reason) = self.decide(req);
        let mut label = "route".to_string();
        if let Some(c) = cluster {
            match req.set_cluster(&c) {
                Ok(()) => {
                    req.set_attribute("canary.cluster", &c);
                    if let Some(h) = &self.mark_header {
                        let _ = req.set_header(h, &c);
                    }
                    label = c;
                }
                Err(e) => {
                    // The manifest entry does not list the cluster: keep the route's.
                    if !self.warned {
                        wasmesh_sdk::warn!("{e} (add it to the filter entry's `clusters`)");
                        self.warned = true;
                    }
                }
            }
        }
        if let Some(c) = &self.decisions {
            c.add(&[&label, reason], 1);
        }
        Action::Continue
    }
}

export_filter!(Canary);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices() {
        let t = vec![
            Target {
                cluster: "a".into(),
                upto: 100_000,
            },
            Target {
                cluster: "b".into(),
                upto: 150_000,
            },
        ];
        assert_eq!(pick(&t, 0).map(|t| t.cluster.as_str()), Some("a"));
        assert_eq!(pick(&t, 99_999).map(|t| t.cluster.as_str()), Some("a"));
        assert_eq!(pick(&t, 100_000).map(|t| t.cluster.as_str()), Some("b"));
        assert!(pick(&t, 150_000).is_none());
    }

    #[test]
    fn config_shapes() {
        let c: Config = config::parse(
            r#"{"targets": [{"cluster": "v2", "percent": 10}], "sticky": {"cookie": "uid"},
                "overrides": [{"match": [{"name": "x-canary", "exact": "1"}], "cluster": "v2"},
                              {"match": [{"name": "x-canary", "exact": "0"}]}]}"#,
        )
        .unwrap();
        assert_eq!(c.sticky, Some(Sticky::Cookie("uid".into())));
        assert!(c.overrides[1].cluster.is_none());
        let e = config::parse::<Config>(r#"{"sticky": {"query": "u"}}"#)
            .err()
            .unwrap();
        assert!(e.starts_with("config.sticky"), "{e}");
        let e = config::parse::<Config>(r#"{"targets": [{"cluster": "v2"}]}"#)
            .err()
            .unwrap();
        assert!(e.contains("percent"), "{e}");
    }
}
