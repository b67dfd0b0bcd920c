//! The access policy: a list of allow rules, default deny.
//!
//! A rule allows a request when every condition it states holds (conditions left out
//! hold); within one condition's list, any entry may match. Identity comes only from
//! what the client cannot forge: the connection's verified peer identity (`principals`,
//! from mTLS) and values earlier filters put in the request's property bag
//! (`properties`, e.g. `jwt.sub` from the `jwt` filter). Headers can be matched, but as
//! request attributes, never as identity.

use crate::pattern::{Glob, PathPattern};
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    rules: Vec<RawRule>,
    #[serde(default)]
    dry_run: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    principals: Option<Vec<String>>,
    #[serde(default)]
    properties: BTreeMap<String, Vec<String>>,
    #[serde(default)]
    methods: Option<Vec<String>>,
    #[serde(default)]
    paths: Option<Vec<RawPath>>,
    #[serde(default)]
    headers: Vec<RawHeader>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPath {
    Pattern(String),
    Prefix { prefix: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    #[serde(default)]
    exact: Option<String>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    present: Option<bool>,
}

/// How a header must look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderMatch {
    Exact(String),
    Prefix(String),
    Present(bool),
}

/// One allow rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    principals: Option<Vec<Glob>>,
    properties: Vec<(String, Vec<Glob>)>,
    methods: Option<Vec<String>>,
    paths: Option<Vec<PathPattern>>,
    headers: Vec<(String, HeaderMatch)>,
}

/// What a request looks like to the policy. Functions, so a rule reads only what it needs.
pub trait Subject {
    fn peer_identity(&self) -> Option<String>;
    fn property(&self, key: &str) -> Option<String>;
    /// Whether the method passes `test` (the value is lent, not copied).
    fn method_is(&self, test: &mut dyn FnMut(&str) -> bool) -> bool;
    /// Whether the path passes `test` (the value is lent, not copied).
    fn path_is(&self, test: &mut dyn FnMut(&str) -> bool) -> bool;
    /// Every value of the header, joined by ",".
    fn header(&self, name: &str) -> Option<String>;
}

impl Rule {
    pub fn allows(&self, r: &dyn Subject) -> bool {
        if let Some(methods) = &self.methods {
            if !r.method_is(&mut |m| methods.iter().any(|x| x == m)) {
                return false;
            }
        }
        if let Some(paths) = &self.paths {
            if !r.path_is(&mut |p| paths.iter().any(|x| x.matches(p))) {
                return false;
            }
        }
        if let Some(principals) = &self.principals {
            match r.peer_identity() {
                Some(id) if principals.iter().any(|g| g.matches(&id)) => {}
                _ => return false,
            }
        }
        for (key, values) in &self.properties {
            match r.property(key) {
                Some(v) if values.iter().any(|g| g.matches(&v)) => {}
                _ => return false,
            }
        }
        for (name, m) in &self.headers {
            let v = r.header(name);
            let ok = match (m, v.as_deref()) {
                (HeaderMatch::Present(want), v) => v.is_some() == *want,
                (HeaderMatch::Exact(e), Some(v)) => v == e,
                (HeaderMatch::Prefix(p), Some(v)) => v.starts_with(p.as_str()),
                (_, None) => false,
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

/// The resolved policy.
#[derive(Debug, Clone)]
pub struct Policy {
    pub rules: Vec<Rule>,
    pub dry_run: bool,
}

impl Policy {
    pub fn parse(config: &str) -> Result<Policy, String> {
        let raw: RawConfig = serde_json::from_str(config).map_err(|e| format!("config: {e}"))?;
        let mut rules = Vec::new();
        for (i, r) in raw.rules.into_iter().enumerate() {
            let at = |msg: String| format!("config: rules[{i}]: {msg}");
            let paths = match r.paths {
                None => None,
                Some(list) => Some(
                    list.into_iter()
                        .map(|p| match p {
                            RawPath::Pattern(s) => PathPattern::parse(&s),
                            RawPath::Prefix { prefix } if prefix.starts_with('/') => {
                                Ok(PathPattern::Prefix(prefix))
                            }
                            RawPath::Prefix { prefix } => {
                                Err(format!("prefix {prefix:?} must start with '/'"))
                            }
                        })
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(at)?,
                ),
            };
            let mut headers = Vec::new();
            for h in r.headers {
                let m = match (h.exact, h.prefix, h.present) {
                    (Some(e), None, None) => HeaderMatch::Exact(e),
                    (None, Some(p), None) => HeaderMatch::Prefix(p),
                    (None, None, Some(b)) => HeaderMatch::Present(b),
                    _ => {
                        return Err(at(format!(
                            "header {:?}: give exactly one of exact, prefix, present",
                            h.name
                        )))
                    }
                };
                headers.push((h.name.to_ascii_lowercase(), m));
            }
            let globs = |v: Vec<String>| v.iter().map(|s| Glob::new(s)).collect::<Vec<_>>();
            rules.push(Rule {
                name: r.name.unwrap_or_else(|| format!("rules[{i}]")),
                principals: r.principals.map(globs),
                properties: r
                    .properties
                    .into_iter()
                    .map(|(k, v)| (k, globs(v)))
                    .collect(),
                methods: r
                    .methods
                    .map(|m| m.iter().map(|x| x.to_ascii_uppercase()).collect()),
                paths,
                headers,
            });
        }
        Ok(Policy {
            rules,
            dry_run: raw.dry_run,
        })
    }

    /// The first rule that allows the request.
    pub fn allowing(&self, r: &dyn Subject) -> Option<&Rule> {
        self.rules.iter().find(|rule| rule.allows(r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[derive(Default)]
    struct Fake {
        peer: Option<String>,
        props: HashMap<String, String>,
        method: String,
        path: String,
        headers: HashMap<String, String>,
    }

    impl Subject for Fake {
        fn peer_identity(&self) -> Option<String> {
            self.peer.clone()
        }
        fn property(&self, key: &str) -> Option<String> {
            self.props.get(key).cloned()
        }
        fn method_is(&self, test: &mut dyn FnMut(&str) -> bool) -> bool {
            test(&self.method)
        }
        fn path_is(&self, test: &mut dyn FnMut(&str) -> bool) -> bool {
            test(&self.path)
        }
        fn header(&self, name: &str) -> Option<String> {
            self.headers.get(name).cloned()
        }
    }

    fn req(method: &str, path: &str) -> Fake {
        Fake {
            method: method.into(),
            path: path.into(),
            ..Fake::default()
        }
    }

    #[test]
    fn default_deny_and_rules() {
        let p = Policy::parse(
            r#"{"rules": [
                {"name": "reads", "methods": ["get"], "paths": ["/api/*/orders", {"prefix": "/pub/"}],
                 "properties": {"jwt.sub": ["alice", "svc-*"]}},
                {"name": "mesh", "principals": ["spiffe://mesh.local/ns/shop/sa/checkout"]},
                {"name": "hdr", "paths": ["/h"], "headers": [{"name": "X-T", "exact": "a"}, {"name": "x-no", "present": false}]}
            ]}"#,
        )
        .expect("valid");
        assert!(Policy::parse("{}")
            .expect("empty")
            .allowing(&req("GET", "/"))
            .is_none());
        let mut r = req("GET", "/api/v1/orders");
        assert!(p.allowing(&r).is_none(), "no identity");
        r.props.insert("jwt.sub".into(), "svc-billing".into());
        assert_eq!(p.allowing(&r).map(|x| x.name.as_str()), Some("reads"));
        r.method = "POST".into();
        assert!(p.allowing(&r).is_none());
        let mut m = req("DELETE", "/anything");
        m.peer = Some("spiffe://mesh.local/ns/shop/sa/checkout".into());
        assert_eq!(p.allowing(&m).map(|x| x.name.as_str()), Some("mesh"));
        let mut h = req("GET", "/h");
        h.headers.insert("x-t".into(), "a".into());
        assert!(p.allowing(&h).is_some());
        h.headers.insert("x-no".into(), "1".into());
        assert!(p.allowing(&h).is_none());
    }

    #[test]
    fn bad_config() {
        assert!(Policy::parse(r#"{"rules": [{"paths": ["nope"]}]}"#).is_err());
        assert!(Policy::parse(r#"{"rules": [{"headers": [{"name": "a"}]}]}"#).is_err());
        assert!(Policy::parse(r#"{"rules": [{"bogus": 1}]}"#).is_err());
    }
}
