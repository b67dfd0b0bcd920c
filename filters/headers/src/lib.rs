//! `headers`: add, set, remove and rename request and response headers. Values are
//! templates over request data (`%REQ(x-user)%`, `%REQUEST_ID%`, `%PATH%`, ... see
//! `filter_common::template`), parsed once at configure time. The config schema is in
//! this crate's README.

// Unit tests unwrap freely: a panic there is a failed test.
#![cfg_attr(test, allow(clippy::unwrap_used))]

use filter_common::config::{self, field_error};
use filter_common::template::Template;
use serde::Deserialize;
use std::collections::BTreeMap;
use wasmesh_sdk::{export_filter, Action, Filter, Hooks, Request, Response};

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    request: OpsSpec,
    #[serde(default)]
    response: OpsSpec,
}

/// One side's operations, applied in this order: rename, remove, set, add.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct OpsSpec {
    #[serde(default)]
    rename: BTreeMap<String, String>,
    #[serde(default)]
    remove: Vec<String>,
    #[serde(default)]
    set: BTreeMap<String, Template>,
    #[serde(default)]
    add: BTreeMap<String, OneOrMany>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(Template),
    Many(Vec<Template>),
}

/// Validated operations of one side.
#[derive(Default, Debug)]
struct Ops {
    rename: Vec<(String, String)>,
    remove: Vec<String>,
    set: Vec<(String, Template)>,
    add: Vec<(String, Template)>,
}

impl Ops {
    /// The `Hooks::PASS_*` flags for the request data the templates read.
    fn pass_flags(&self) -> Hooks {
        self.set
            .iter()
            .chain(&self.add)
            .fold(Hooks::empty(), |h, (_, t)| h | t.pass_flags())
    }

    /// The operations can be decided on the request side (no rename, which reads the
    /// response, and values that stay the same all along the request): the host then
    /// applies them to the response without a response hook.
    fn decidable_on_request_side(&self) -> bool {
        self.rename.is_empty()
            && self
                .set
                .iter()
                .chain(&self.add)
                .all(|(_, t)| t.is_request_constant())
    }

    fn is_empty(&self) -> bool {
        self.rename.is_empty()
            && self.remove.is_empty()
            && self.set.is_empty()
            && self.add.is_empty()
    }
}

/// A header name from the config: lower-cased, and it must be a valid, ordinary header.
fn header_name(name: &str, field: &str) -> Result<String, String> {
    let n = name.to_ascii_lowercase();
    if !filter_common::valid_header_name(&n) {
        return Err(field_error(
            field,
            format!("{name:?} is not a valid header name"),
        ));
    }
    // Framing headers belong to the proxy: changing them would corrupt the message.
    if matches!(
        n.as_str(),
        "content-length" | "transfer-encoding" | "connection" | "upgrade" | "te" | "keep-alive"
    ) {
        return Err(field_error(
            field,
            format!("{name:?} is managed by the proxy"),
        ));
    }
    Ok(n)
}

fn ops(spec: OpsSpec, side: &str) -> Result<Ops, String> {
    let mut out = Ops::default();
    for (from, to) in spec.rename {
        let f = format!("{side}.rename.{from}");
        out.rename
            .push((header_name(&from, &f)?, header_name(&to, &f)?));
    }
    for (i, name) in spec.remove.iter().enumerate() {
        out.remove
            .push(header_name(name, &format!("{side}.remove[{i}]"))?);
    }
    for (name, t) in spec.set {
        out.set
            .push((header_name(&name, &format!("{side}.set.{name}"))?, t));
    }
    for (name, v) in spec.add {
        let n = header_name(&name, &format!("{side}.add.{name}"))?;
        match v {
            OneOrMany::One(t) => out.add.push((n, t)),
            OneOrMany::Many(ts) => out.add.extend(ts.into_iter().map(|t| (n.clone(), t))),
        }
    }
    Ok(out)
}

/// The header operations a request and a response both offer.
trait Headers {
    fn all(&self, name: &str) -> Vec<String>;
    fn set(&self, name: &str, value: &str) -> Result<(), String>;
    fn add(&self, name: &str, value: &str) -> Result<(), String>;
    fn remove(&self, name: &str) -> Result<(), String>;
}

impl Headers for Request {
    fn all(&self, name: &str) -> Vec<String> {
        self.header_all(name)
    }
    fn set(&self, name: &str, value: &str) -> Result<(), String> {
        self.set_header(name, value)
    }
    fn add(&self, name: &str, value: &str) -> Result<(), String> {
        self.add_header(name, value)
    }
    fn remove(&self, name: &str) -> Result<(), String> {
        self.remove_header(name)
    }
}

impl Headers for Response {
    fn all(&self, name: &str) -> Vec<String> {
        self.header_all(name)
    }
    fn set(&self, name: &str, value: &str) -> Result<(), String> {
        self.set_header(name, value)
    }
    fn add(&self, name: &str, value: &str) -> Result<(), String> {
        self.add_header(name, value)
    }
    fn remove(&self, name: &str) -> Result<(), String> {
        self.remove_header(name)
    }
}

/// Apply `ops` to `target`, with template values taken from `req`. A value that renders
/// empty (e.g. `%REQ(x-user)%` without the header) is not written; one the host refuses
/// (e.g. a control character from a client's header) is skipped and logged at debug.
/// `v`: room to render values in (most are lent without it).
fn apply(ops: &Ops, target: &impl Headers, req: &Request, v: &mut String) {
    let check = |r: Result<(), String>| {
        if let Err(e) = r {
            wasmesh_sdk::debug!("header not changed: {e}");
        }
    };
    for (from, to) in &ops.rename {
        let values = target.all(from);
        if values.is_empty() {
            continue;
        }
        check(target.remove(from));
        for v in &values {
            check(target.add(to, v));
        }
    }
    for name in &ops.remove {
        check(target.remove(name));
    }
    for (name, t) in &ops.set {
        t.with_rendered(req, v, &mut |v| {
            if !v.is_empty() {
                check(target.set(name, v));
            }
        });
    }
    for (name, t) in &ops.add {
        t.with_rendered(req, v, &mut |v| {
            if !v.is_empty() {
                check(target.add(name, v));
            }
        });
    }
}

/// Response operations queued from the request hook (see [`Ops::decidable_on_request_side`]).
/// `v`: room to render values in (most are lent without it).
fn queue_response(ops: &Ops, req: &Request, v: &mut String) {
    for name in &ops.remove {
        req.remove_response_header(name);
    }
    for (name, t) in &ops.set {
        t.with_rendered(req, v, &mut |v| {
            if !v.is_empty() {
                req.set_response_header(name, v);
            }
        });
    }
    for (name, t) in &ops.add {
        t.with_rendered(req, v, &mut |v| {
            if !v.is_empty() {
                req.add_response_header(name, v);
            }
        });
    }
}

struct HeadersFilter {
    request: Ops,
    response: Ops,
    /// Response operations are queued from `on_request_headers` (no response hook).
    response_early: bool,
    /// Room to render values in, kept from hook to hook (no allocation per request).
    scratch: String,
}

impl Filter for HeadersFilter {
    const HOOKS: Hooks = Hooks::REQUEST_HEADERS;

    fn configure(json: &str) -> Result<Self, String> {
        let cfg: Config = config::parse(json)?;
        let request = ops(cfg.request, "request")?;
        let response = ops(cfg.response, "response")?;
        let response_early = !response.is_empty() && response.decidable_on_request_side();
        let f = HeadersFilter {
            request,
            response,
            response_early,
            scratch: String::new(),
        };
        if f.request.is_empty() && f.response.is_empty() {
            return Err("config: no header operations (give `request` or `response`)".to_string());
        }
        Ok(f)
    }

    fn hooks(&self) -> Hooks {
        let mut h = Hooks::empty();
        if !self.request.is_empty() {
            h |= Hooks::REQUEST_HEADERS | self.request.pass_flags();
        }
        if self.response_early {
            h |= Hooks::REQUEST_HEADERS | self.response.pass_flags();
        } else if !self.response.is_empty() {
            h |= Hooks::RESPONSE_HEADERS;
        }
        h
    }

    fn on_request_headers(&mut self, req: &Request) -> Action {
        apply(&self.request, req, req, &mut self.scratch);
        if self.response_early {
            queue_response(&self.response, req, &mut self.scratch);
        }
        Action::Continue
    }

    fn on_response_headers(&mut self, req: &Request, resp: &Response) -> Action {
        apply(&self.response, resp, req, &mut self.scratch);
        Action::Continue
    }
}

export_filter!(HeadersFilter);

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<(Ops, Ops), String> {
        let cfg: Config = config::parse(json)?;
        Ok((ops(cfg.request, "request")?, ops(cfg.response, "response")?))
    }

    #[test]
    fn shapes() {
        let (req, resp) = parse(
            r#"{"request": {"rename": {"X-Old": "x-new"}, "remove": ["x-debug"],
                            "set": {"x-path": "%PATH%"}, "add": {"x-via": ["a", "%METHOD%"]}},
                "response": {"set": {"x-request-id": "%REQUEST_ID%"}}}"#,
        )
        .unwrap();
        assert_eq!(req.rename, vec![("x-old".into(), "x-new".into())]);
        assert_eq!(req.remove, vec!["x-debug".to_string()]);
        assert_eq!(req.add.len(), 2);
        assert_eq!(resp.set.len(), 1);
        assert!(resp.remove.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        let e = parse(r#"{"request": {"set": {"x-a": "%BOGUS%"}}}"#).unwrap_err();
        assert!(
            e.starts_with("config.request.set.x-a: unknown variable %BOGUS%"),
            "{e}"
        );
        let e = parse(r#"{"response": {"remove": ["ok", "bad name"]}}"#).unwrap_err();
        assert!(e.starts_with("config.response.remove[1]"), "{e}");
        let e = parse(r#"{"request": {"set": {"content-length": "1"}}}"#).unwrap_err();
        assert!(e.contains("managed by the proxy"), "{e}");
        let e = parse(r#"{"request": {"sett": {}}}"#).unwrap_err();
        assert!(e.contains("unknown field `sett`"), "{e}");
    }
}
