//! `authz`: zero-trust access policy on the request side. Default deny: a request goes on
//! only if an allow rule matches it (see [`policy`] for the rules and [`pattern`] for the
//! pattern syntax); otherwise 403 with flag `RBAC`.
//!
//! `dry_run: true` lets every request through but logs what it would have denied and
//! marks the request with the attribute `authz.dry_run=deny` (access log, span), so a
//! policy can be tried on live traffic before it is enforced.
//!
//! Put it after the filters that establish identity (e.g. `jwt`): it reads their results
//! from the request's property bag.

mod pattern;
mod policy;

use policy::{Policy, Subject};
use wasmesh_sdk::metrics::Counter;
use wasmesh_sdk::{export_filter, log, Action, Filter, Hooks, LocalResponse, Request};

/// The flag of a denial, in the access log and metrics.
const FLAG: &str = "RBAC";

struct Authz {
    policy: Policy,
    decisions: Option<Counter>,
}

/// The request, as the policy reads it.
struct Req<'a>(&'a Request);

impl Subject for Req<'_> {
    fn peer_identity(&self) -> Option<String> {
        self.0.peer_identity()
    }
    fn property(&self, key: &str) -> Option<String> {
        self.0.get_property(key)
    }
    // Lent by the SDK (they come with the hook): no copy per request.
    fn method_is(&self, test: &mut dyn FnMut(&str) -> bool) -> bool {
        self.0.with_method(test)
    }
    fn path_is(&self, test: &mut dyn FnMut(&str) -> bool) -> bool {
        self.0.with_path(test)
    }
    fn header(&self, name: &str) -> Option<String> {
        let all = self.0.header_all(name);
        (!all.is_empty()).then(|| all.join(","))
    }
}

impl Authz {
    fn count(&self, decision: &str) {
        if let Some(c) = &self.decisions {
            c.add(&[decision], 1);
        }
    }
}

impl Filter for Authz {
    const HOOKS: Hooks = Hooks::REQUEST_HEADERS;

    fn configure(config: &str) -> Result<Self, String> {
        let policy = Policy::parse(config)?;
        if policy.rules.is_empty() && !policy.dry_run {
            log::warn("no rules: every request is denied");
        }
        Ok(Authz {
            policy,
            decisions: Counter::new("authz_decisions", "Access decisions", &["decision"]).ok(),
        })
    }

    fn hooks(&self) -> Hooks {
        // Method and path are read on every request (by rules, or to log a denial): they
        // come with the hook rather than through a call each.
        Hooks::REQUEST_HEADERS | Hooks::PASS_METHOD | Hooks::PASS_PATH
    }

    fn on_request_headers(&mut self, req: &Request) -> Action {
        if let Some(rule) = self.policy.allowing(&Req(req)) {
            req.set_attribute("authz.rule", &rule.name);
            req.set_property("authz.rule", &rule.name);
            self.count("allow");
            return Action::Continue;
        }
        let who = format!(
            "peer={} jwt.sub={}",
            req.peer_identity().as_deref().unwrap_or("-"),
            req.get_property("jwt.sub").as_deref().unwrap_or("-"),
        );
        let what = format!("{} {}", req.method(), req.path());
        if self.policy.dry_run {
            log::info(&format!(
                "dry run: would deny {what} ({who}): no rule matched"
            ));
            req.set_attribute("authz.dry_run", "deny");
            self.count("dry_run_deny");
            return Action::Continue;
        }
        log::debug(&format!("denied {what} ({who}): no rule matched"));
        req.set_attribute("authz.denied", "no rule matched");
        self.count("deny");
        LocalResponse::new(403)
            .header("content-type", "text/plain; charset=utf-8")
            .body("RBAC: access denied: no rule allows this request\n")
            .flag(FLAG)
            .into()
    }
}

export_filter!(Authz);
