//! The smallest filter: implements `on-request-headers` and lets every request through.
//! Used to measure the host's per-call overhead and as a template.

use wasmesh_sdk::{export_filter, Action, Filter, Hooks, Request};

struct Passthrough;

impl Filter for Passthrough {
    const HOOKS: Hooks = Hooks::REQUEST_HEADERS;

    fn configure(_config: &str) -> Result<Self, String> {
        Ok(Passthrough)
    }

    fn on_request_headers(&mut self, _req: &Request) -> Action {
        Action::Continue
    }
}

export_filter!(Passthrough);
