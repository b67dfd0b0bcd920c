//! A filter for tests: every host capability, on command.
//!
//! Config (JSON object, every field optional):
//! - `tag`: stamped on requests and responses as `x-testkit-trace: NAME:TAG` (appended,
//!   so the header shows chain order) and `x-testkit-tag` (default "v1");
//! - `name`: the NAME above (default "testkit");
//! - `hooks`: which hooks to declare, from `request_headers`, `request_body`,
//!   `response_headers`, `response_body`, `done` (default: request_headers,
//!   response_headers, done);
//! - `body_suffix`: appended to request and response bodies in the body hooks;
//! - `on_configure`: `"error"` to fail configure, `"trap"` to panic in it;
//! - `do`: a command run on every request (same syntax as the header below).
//!
//! Commands, from config `do` or the request header `x-testkit-do` (comma separated):
//! `respond:STATUS`, `delay:MS`, `trap`, `loop`, `oom`, `cluster:NAME`, `incr:KEY`,
//! `get:KEY`, `path:PATH` (replace the path sent upstream), `callout:CLUSTER:PATH`, `resp-trap` (trap in on-response-headers),
//! `eprint:TEXT` / `print:TEXT` (write a line to WASI stderr / stdout), `bad-effects` (an
//! effects buffer out of format) and `two-actions` (two `hook.set-action` calls in one hook).
//!
//! Bag: each instance stamps `x-testkit-prev-NAME: PREV` with the name the previous
//! testkit of the chain left in the request's property bag (`last-filter`).
//!
//! Build stamp: every request and response gets `x-testkit-build: DIGITS`, the digits of
//! the [`BUILD`] marker; the response also gets `x-testkit-req-build` (the stamp the
//! request left with) and `x-testkit-id` (the request id). Tests make distinct, valid
//! builds of this one filter by overwriting the ten digits in the `.wasm` file (same
//! length, inside a data segment: nothing else changes).

use std::collections::HashSet;
use wasmesh_sdk::metrics::Counter;
use wasmesh_sdk::{
    export_filter, state, Action, CalloutRequest, CalloutResponse, Filter, Hooks, LocalResponse,
    Outcome, Request, Response,
};

/// Patched in `.wasm` files by tests: `WASMESH-BUILD:` then ten ASCII digits.
static BUILD: [u8; 24] = *b"WASMESH-BUILD:0000000000";

/// The digits of [`BUILD`], read through `black_box` so the compiler keeps the bytes in
/// memory instead of folding the constant.
fn build_id() -> String {
    let b: &[u8; 24] = std::hint::black_box(&BUILD);
    String::from_utf8_lossy(&b[14..]).into_owned()
}

struct Testkit {
    name: String,
    tag: String,
    hooks: Hooks,
    body_suffix: String,
    default_do: String,
    seen: HashSet<String>,
    requests: Option<Counter>,
    build: String,
}

fn commands(t: &Testkit, req: &Request) -> Vec<String> {
    let mut all = t.default_do.clone();
    if let Some(h) = req.header("x-testkit-do") {
        if !all.is_empty() {
            all.push(',');
        }
        all.push_str(&h);
    }
    all.split(',')
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

#[allow(clippy::unconditional_recursion)]
fn spin(n: u64) -> u64 {
    let mut x = n;
    loop {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        if x == 0 {
            return x;
        }
    }
}

impl Filter for Testkit {
    const HOOKS: Hooks = Hooks::REQUEST_HEADERS;

    fn configure(config: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(config).map_err(|e| format!("bad config: {e}"))?;
        let s = |k: &str, d: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or(d).to_string();
        match v.get("on_configure").and_then(|x| x.as_str()) {
            Some("error") => return Err("configure refused on request".to_string()),
            Some("trap") => panic!("trap in configure"),
            _ => {}
        }
        let mut hooks = Hooks::empty();
        let names: Vec<String> = match v.get("hooks").and_then(|h| h.as_array()) {
            Some(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            None => vec![
                "request_headers".into(),
                "response_headers".into(),
                "done".into(),
            ],
        };
        for n in &names {
            hooks |= match n.as_str() {
                "request_headers" => Hooks::REQUEST_HEADERS,
                "request_body" => Hooks::REQUEST_BODY,
                "response_headers" => Hooks::RESPONSE_HEADERS,
                "response_body" => Hooks::RESPONSE_BODY,
                "done" => Hooks::DONE,
                other => return Err(format!("unknown hook {other}")),
            };
        }
        Ok(Testkit {
            name: s("name", "testkit"),
            tag: s("tag", "v1"),
            hooks,
            body_suffix: s("body_suffix", ""),
            default_do: s("do", ""),
            seen: HashSet::new(),
            requests: Counter::new("testkit_requests", "Requests seen by testkit", &["tag"]).ok(),
            build: build_id(),
        })
    }

    fn hooks(&self) -> Hooks {
        self.hooks
    }

    fn on_request_headers(&mut self, req: &Request) -> Action {
        let _ = req.add_header("x-testkit-trace", &format!("{}:{}", self.name, self.tag));
        let _ = req.set_header("x-testkit-tag", &self.tag);
        let _ = req.set_header("x-testkit-build", &self.build);
        if let Some(t) = req.trace_id() {
            let _ = req.set_header("x-testkit-trace-id", &t);
        }
        if let Some(c) = &self.requests {
            c.add(&[&self.tag], 1);
        }
        self.seen.insert(req.id());
        req.set_property(&format!("seen-by-{}", self.name), &self.tag);
        // The bag between filters: stamp the previous testkit's name, then leave ours.
        if let Some(prev) = req.get_property("last-filter") {
            let _ = req.set_header(&format!("x-testkit-prev-{}", self.name), &prev);
        }
        req.set_property("last-filter", &self.name);
        if let Some(prev) = req.get_property("seen-by-a") {
            let _ = req.set_header("x-testkit-bag", &prev);
        }
        req.set_attribute("testkit.tag", &self.tag);
        for cmd in commands(self, req) {
            let (verb, arg) = cmd.split_once(':').unwrap_or((cmd.as_str(), ""));
            match verb {
                "respond" => {
                    let status = arg.parse().unwrap_or(403);
                    return LocalResponse::new(status)
                        .header("x-testkit-by", &self.name)
                        .body(format!("answered by {}", self.name))
                        .flag("RL")
                        .into();
                }
                "delay" => return Action::delay_ms_flagged(arg.parse().unwrap_or(10), "DI"),
                "trap" => panic!("trap on command"),
                "loop" => {
                    let r = spin(arg.len() as u64 + 1);
                    let _ = req.set_header("x-never", &r.to_string());
                }
                "oom" => {
                    let mut hog: Vec<Vec<u8>> = Vec::new();
                    loop {
                        hog.push(vec![1u8; 1 << 20]);
                        if hog.len() > 1 << 20 {
                            break;
                        }
                    }
                    let _ = req.set_header("x-hog", &hog.len().to_string());
                }
                "cluster" => {
                    let r = match req.set_cluster(arg) {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("error: {e}"),
                    };
                    let _ = req.set_header("x-testkit-cluster", &r);
                }
                "incr" => {
                    let r = state::increment(arg, 1, None)
                        .map(|n| n.to_string())
                        .unwrap_or_else(|e| e);
                    let _ = req.set_header("x-testkit-count", &r);
                }
                "path" => {
                    let r = match req.set_path(arg) {
                        Ok(()) => "ok".to_string(),
                        Err(e) => format!("error: {e}"),
                    };
                    let _ = req.set_header("x-testkit-path", &r);
                }
                // `header:NAME=VALUE` sets a request header, `append:NAME=VALUE` adds one;
                // the outcome (or the host's error) goes to x-testkit-header.
                "header" | "append" => {
                    let (name, value) = arg.split_once('=').unwrap_or((arg, ""));
                    let r = if verb == "header" {
                        req.set_header(name, value)
                    } else {
                        req.add_header(name, value)
                    };
                    let r = r.map_or_else(|e| format!("error: {e}"), |()| "ok".to_string());
                    let _ = req.set_header("x-testkit-header", &r);
                }
                // The scheme the host reports, in x-testkit-scheme.
                "scheme" => {
                    let _ = req.set_header("x-testkit-scheme", &req.scheme());
                }
                "get" => {
                    let v = state::get(arg)
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default();
                    let _ = req.set_header("x-testkit-get", &v);
                }
                // Malformed replies, through the raw bindings (the SDK never makes them).
                "bad-effects" => wasmesh_sdk::bindings::wasmesh::filter::hook::add_effects(&[99]),
                "two-actions" => {
                    let raw = wasmesh_sdk::bindings::wasmesh::filter::hook::set_action;
                    raw(&Action::delay_ms(1));
                    raw(&Action::delay_ms(1));
                }
                "eprint" => eprintln!("testkit {}: {arg}", self.name),
                "print" => println!("testkit {}: {arg}", self.name),
                "callout" => {
                    let (cluster, path) = arg.split_once(':').unwrap_or((arg, "/"));
                    return CalloutRequest::get(cluster, path)
                        .header("x-from", &self.name)
                        .timeout_ms(500)
                        .into();
                }
                _ => {}
            }
        }
        Action::Continue
    }

    fn on_callout_response(
        &mut self,
        req: &Request,
        _resp: Option<&Response>,
        answer: Result<CalloutResponse, String>,
    ) -> Action {
        let v = match answer {
            Ok(r) => format!("{} {}", r.status, String::from_utf8_lossy(&r.body)),
            Err(e) => format!("error: {e}"),
        };
        let _ = req.set_header("x-testkit-callout", &v);
        Action::Continue
    }

    fn on_request_body(&mut self, req: &Request) -> Action {
        let mut body = req.body();
        body.extend_from_slice(self.body_suffix.as_bytes());
        let _ = req.set_body(&body);
        Action::Continue
    }

    fn on_response_headers(&mut self, req: &Request, resp: &Response) -> Action {
        let _ = resp.add_header("x-testkit-trace", &format!("{}:{}", self.name, self.tag));
        let _ = resp.set_header("x-testkit-tag", &self.tag);
        let seen = if self.seen.contains(&req.id()) {
            "yes"
        } else {
            "no"
        };
        let _ = resp.set_header("x-testkit-seen", seen);
        let _ = resp.set_header("x-testkit-build", &self.build);
        let _ = resp.set_header(
            "x-testkit-req-build",
            &req.header("x-testkit-build").unwrap_or_default(),
        );
        let _ = resp.set_header("x-testkit-id", &req.id());
        if let Some(m) = req.header("x-testkit-do") {
            if m.contains("resp-trap") {
                panic!("trap in response");
            }
        }
        Action::Continue
    }

    fn on_response_body(&mut self, _req: &Request, resp: &Response) -> Action {
        let mut body = resp.body();
        body.extend_from_slice(self.body_suffix.as_bytes());
        let _ = resp.set_body(&body);
        Action::Continue
    }

    fn on_done(&mut self, req: &Request, outcome: &Outcome) {
        self.seen.remove(&req.id());
        let _ = state::increment(&format!("done:{}", self.name), 1, None);
        let _ = state::set(
            &format!("last-status:{}", self.name),
            outcome.status.to_string().as_bytes(),
            None,
        );
    }
}

export_filter!(Testkit);
