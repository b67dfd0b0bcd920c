//! A wasmesh filter: adds a header to every request, and answers 403 itself to requests
//! that carry a header named in its config. Start from here: keep what you need.
//!
//! Manifest entry (`config` is given to `configure` as JSON text):
//!
//! ```json
//! { "name": "hello", "file": "hello.wasm",
//!   "config": { "header": "x-hello", "value": "world", "deny_if_present": "x-debug" } }
//! ```

use wasmesh_sdk::metrics::Counter;
use wasmesh_sdk::{export_filter, Action, Filter, Hooks, LocalResponse, Request};

/// One value lives in each filter instance; an instance serves many requests, one hook
/// call at a time. Keep per-request state keyed by `req.id()` (and drop it in `on_done`).
struct Template {
    header: String,
    value: String,
    deny_if_present: Option<String>,
    /// Exported as `wasmesh_filter_template_requests_total{filter="ENTRY",result}`.
    requests: Option<Counter>,
}

impl Filter for Template {
    /// The host calls only the hooks listed here (each call costs a little).
    const HOOKS: Hooks = Hooks::REQUEST_HEADERS;

    /// Called once per instance with the manifest's `config` ("null" when absent). An
    /// error refuses this version of the filter: it shows on the admin endpoint's
    /// `/filters`, and during a hot-swap the previous version keeps serving.
    fn configure(config: &str) -> Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_str(config).map_err(|e| format!("config: {e}"))?;
        let text = |key: &str| v.get(key).and_then(|x| x.as_str()).map(str::to_string);
        Ok(Template {
            header: text("header").unwrap_or_else(|| "x-hello".to_string()),
            value: text("value").unwrap_or_else(|| "world".to_string()),
            deny_if_present: text("deny_if_present"),
            requests: Counter::new("template_requests", "Requests seen", &["result"]).ok(),
        })
    }

    /// The request head arrived. Return `Action::Continue` to go on, or answer now.
    /// Hooks must return promptly (there is a deadline): ask the host to wait or call
    /// out by returning an action, never block here.
    fn on_request_headers(&mut self, req: &Request) -> Action {
        if let Some(h) = &self.deny_if_present {
            if req.header(h).is_some() {
                self.count("denied");
                // The flag shows in the access log's `response_flags`.
                return LocalResponse::new(403)
                    .header("content-type", "text/plain")
                    .body(format!("{h} is not allowed here\n"))
                    .flag("TPL")
                    .into();
            }
        }
        // Errors (an invalid header value) are returned, never panics.
        let _ = req.set_header(&self.header, &self.value);
        self.count("passed");
        Action::Continue
    }
}

impl Template {
    fn count(&self, result: &str) {
        if let Some(c) = &self.requests {
            c.add(&[result], 1);
        }
    }
}

export_filter!(Template);
