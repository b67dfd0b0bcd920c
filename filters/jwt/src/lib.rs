//! `jwt`: verify JSON Web Tokens (RS256, ES256, HS256) on the request side.
//!
//! For each request: strip client-sent copies of the claim headers, decide from the path
//! whether a token is required, optional or not checked, then verify the token (signature
//! with a key from the JWKS, `exp`/`nbf` with clock skew, `iss`, `aud`). A valid token's
//! claims go to request headers and to the request's property bag (`jwt.sub`, `jwt.iss`,
//! `jwt.claim.NAME`) for later filters such as `authz`; an invalid or missing one gets a
//! 401 with `www-authenticate` (RFC 6750), flag `JWT`.
//!
//! Keys come from an inline JWKS or from a JWKS on a cluster, fetched with a callout on the
//! first request that needs it and again when older than `refresh_interval`:
//! - the fetched document lives in the filter's shared state, so every instance on every
//!   worker uses one fetch; instances parse it once per version;
//! - a refresh is single-flight (a compare-and-swap lock in shared state, with a TTL): the
//!   request that takes the lock waits for the callout, the others go on with the previous
//!   keys (stale-while-revalidate);
//! - before the first fetch completes there are no keys to go on with, and a hook cannot
//!   wait without a callout of its own: requests that find the lock taken ask for the same
//!   fetch, and the host, which coalesces identical GET callouts in flight, sends one
//!   request and gives its answer to each (resumed in `on_callout_response`). So a cold
//!   start fetches once however many requests arrive;
//! - a failed fetch keeps the old keys (if any) and blocks new fetches for `retry_interval`.
//!
//! Signatures are checked by the host (`wasmesh_sdk::crypto`): keys are made once per key
//! set and instance, then each check runs natively. Verified tokens are cached per
//! instance by SHA-256 of the token until they expire.

mod cache;
mod config;
mod jwk;
mod token;

use cache::{TokenCache, Verified};
use config::{KeySource, Remote, Requirement, Settings};
use jwk::KeySet;
use std::rc::Rc;
use std::time::Duration;
use token::Invalid;
use wasmesh_sdk::metrics::Counter;
use wasmesh_sdk::{
    export_filter, log, state, Action, CalloutRequest, CalloutResponse, Filter, Hooks,
    LocalResponse, Request, Response,
};

/// Shared-state keys (one map per filter entry).
const DOC_KEY: &str = "jwks:doc";
const LOCK_KEY: &str = "jwks:lock";
const BACKOFF_KEY: &str = "jwks:backoff";
/// The flag of this filter's local answers.
const FLAG: &str = "JWT";
/// The host's limit on one shared-state value.
const MAX_JWKS_BYTES: usize = 60 * 1024;

/// Keys fetched from a cluster, as this instance last saw them.
struct RemoteKeys {
    cfg: Remote,
    keys: Option<Rc<KeySet>>,
    /// When the document in `keys` was fetched (unix ms); 0: never.
    fetched_ms: u64,
}

struct Jwt {
    s: Settings,
    remote: Option<RemoteKeys>,
    cache: TokenCache,
    results: Option<Counter>,
    fetches: Option<Counter>,
}

/// The outcome of checking one request.
enum Check {
    Allow,
    /// Fetch the JWKS, then check again.
    Fetch(CalloutRequest),
    Deny(LocalResponse),
}

fn now_ms() -> u64 {
    wasmesh_sdk::now_unix_nanos() / 1_000_000
}

impl Jwt {
    fn count(&self, result: &str) {
        if let Some(c) = &self.results {
            c.add(&[result], 1);
        }
    }

    fn www_authenticate(&self, error: Option<&str>) -> String {
        let mut parts = Vec::new();
        if let Some(realm) = &self.s.realm {
            parts.push(format!("realm=\"{}\"", realm.replace(['"', '\\'], "")));
        }
        if let Some(desc) = error {
            parts.push("error=\"invalid_token\"".to_string());
            parts.push(format!("error_description=\"{desc}\""));
        }
        if parts.is_empty() {
            "Bearer".to_string()
        } else {
            format!("Bearer {}", parts.join(", "))
        }
    }

    fn unauthorized(&self, req: &Request, why: Option<&Invalid>) -> LocalResponse {
        let desc = why.map(Invalid::description);
        self.count(why.map_or("missing", Invalid::label));
        req.set_attribute("jwt.error", desc.as_deref().unwrap_or("token missing"));
        LocalResponse::new(401)
            .header("www-authenticate", &self.www_authenticate(desc.as_deref()))
            .header("content-type", "text/plain; charset=utf-8")
            .body(match &desc {
                Some(d) => format!("invalid token: {d}\n"),
                None => "token missing\n".to_string(),
            })
            .flag(FLAG)
    }

    fn unavailable(&self, req: &Request, why: &str) -> LocalResponse {
        self.count("keys_unavailable");
        req.set_attribute("jwt.error", why);
        LocalResponse::new(503)
            .header("retry-after", "1")
            .header("content-type", "text/plain; charset=utf-8")
            .body(format!("cannot verify tokens: {why}\n"))
            .flag(FLAG)
    }

    /// The token of the request, if any: the configured header, after the prefix.
    fn token<'a>(&self, value: &'a str) -> Option<&'a str> {
        let p = &self.s.prefix;
        let rest = if p.is_empty() {
            value
        } else if value.len() >= p.len() && value.is_char_boundary(p.len()) {
            let (scheme, rest) = value.split_at(p.len());
            if !scheme.eq_ignore_ascii_case(p) {
                return None;
            }
            rest
        } else {
            return None;
        };
        let t = rest.trim();
        (!t.is_empty()).then_some(t)
    }

    /// Check the request; `may_fetch` is false once a fetch was tried for it.
    fn check(&mut self, req: &Request, may_fetch: bool) -> Check {
        let path = req.path();
        let requirement = self.s.requirement(&path);
        if requirement == Requirement::Skip {
            return Check::Allow;
        }
        let value = req.header(&self.s.header);
        let Some(token) = value.as_deref().and_then(|v| self.token(v)) else {
            if requirement == Requirement::Optional {
                return Check::Allow;
            }
            return Check::Deny(self.unauthorized(req, None));
        };
        let now_ms = now_ms();
        let now = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        let h = cache::hash(token);
        if let Some(v) = self.cache.get(&h) {
            match v.window.check(now, self.s.skew_secs) {
                Ok(()) => {
                    let v = v.clone();
                    self.count("ok_cached");
                    self.apply(req, &v);
                    return Check::Allow;
                }
                Err(e) => {
                    self.cache.remove(&h);
                    return Check::Deny(self.unauthorized(req, Some(&e)));
                }
            }
        }
        let parsed = match token::parse(token, &self.s.algorithms) {
            Ok(p) => p,
            Err(e) => return Check::Deny(self.unauthorized(req, Some(&e))),
        };
        // Cheap claim checks first: no signature work for an expired token.
        let window = match token::check_claims(&parsed.claims, &self.s, now) {
            Ok(w) => w,
            Err(e) => return Check::Deny(self.unauthorized(req, Some(&e))),
        };
        let keys = match self.keys(req, now_ms, parsed.kid.as_deref(), may_fetch) {
            Ok(k) => k,
            Err(c) => return c,
        };
        let verified = match &keys {
            KeysRef::Inline => match &self.s.keys {
                KeySource::Inline(set) => parsed.verify_signature(set),
                KeySource::Remote(_) => Err(Invalid::NoKey),
            },
            KeysRef::Remote(set) => parsed.verify_signature(set),
        };
        if let Err(e) = verified {
            return Check::Deny(self.unauthorized(req, Some(&e)));
        }
        let v = self.prepare(&parsed.claims, window);
        self.count("ok");
        self.apply(req, &v);
        self.cache.insert(h, v, now);
        Check::Allow
    }

    /// Headers and properties a valid token gives, computed once per token.
    fn prepare(
        &self,
        claims: &serde_json::Map<String, serde_json::Value>,
        window: token::Window,
    ) -> Verified {
        let text = |name: &str| claims.get(name).map(token::claim_text);
        let headers = self
            .s
            .forward_claims
            .iter()
            .filter_map(|(claim, header)| text(claim).map(|v| (header.clone(), v)))
            .collect();
        let mut properties = Vec::new();
        for (claim, key) in [("sub", "jwt.sub"), ("iss", "jwt.iss")] {
            if let Some(v) = text(claim) {
                properties.push((key.to_string(), v));
            }
        }
        for claim in &self.s.claims_to_properties {
            if let Some(v) = text(claim) {
                properties.push((format!("jwt.claim.{claim}"), v));
            }
        }
        Verified {
            window,
            headers,
            properties,
        }
    }

    fn apply(&self, req: &Request, v: &Verified) {
        for (h, value) in &v.headers {
            // A claim value that is not a valid header value (e.g. a newline) is dropped.
            let _ = req.set_header(h, value);
        }
        for (k, value) in &v.properties {
            req.set_property(k, value);
        }
        if !self.s.forward_token {
            let _ = req.remove_header(&self.s.header);
        }
    }

    /// The keys to verify with, or what to do instead (fetch, or answer 503).
    fn keys(
        &mut self,
        req: &Request,
        now_ms: u64,
        kid: Option<&str>,
        may_fetch: bool,
    ) -> Result<KeysRef, Check> {
        let Some(remote) = self.remote.as_mut() else {
            return Ok(KeysRef::Inline);
        };
        let cfg = remote.cfg.clone();
        let fresh = |r: &RemoteKeys| {
            r.keys.is_some() && now_ms.saturating_sub(r.fetched_ms) < cfg.refresh_ms
        };
        let knows = |r: &RemoteKeys| match (kid, &r.keys) {
            (Some(kid), Some(k)) => k.has_kid(kid),
            (None, Some(_)) => true,
            (_, None) => false,
        };
        if fresh(remote) && knows(remote) {
            return Ok(KeysRef::Remote(remote.keys.clone().unwrap_or_default()));
        }
        // Another instance may have fetched a newer document.
        if self.adopt_shared() {
            self.cache.clear();
        }
        let Some(remote) = self.remote.as_ref() else {
            return Ok(KeysRef::Inline);
        };
        let age = now_ms.saturating_sub(remote.fetched_ms);
        let have = remote.keys.clone();
        if fresh(remote) && (knows(remote) || age < cfg.min_refresh_ms) {
            return Ok(KeysRef::Remote(have.unwrap_or_default()));
        }
        // Stale, or a kid we do not know (the issuer may have rotated keys): refresh.
        let fetch = || {
            Check::Fetch(
                CalloutRequest::get(&cfg.cluster, &cfg.path)
                    .header("accept", "application/json")
                    .timeout_ms(cfg.timeout_ms),
            )
        };
        if !may_fetch || state::get(BACKOFF_KEY).is_some() {
            return match have {
                Some(k) => Ok(KeysRef::Remote(k)),
                None => Err(Check::Deny(
                    self.unavailable(req, "the JWKS could not be fetched"),
                )),
            };
        }
        let lock_ttl = Duration::from_millis(u64::from(cfg.timeout_ms) + 1000);
        let id = req.id();
        match state::compare_and_swap(LOCK_KEY, None, id.as_bytes(), Some(lock_ttl)) {
            Ok(true) => Err(fetch()),
            // Someone else refreshes: go on with what we have; with nothing, fetch too.
            _ => match have {
                Some(k) => Ok(KeysRef::Remote(k)),
                None => Err(fetch()),
            },
        }
    }

    /// Take the shared document if it is newer than ours; true when the keys changed.
    fn adopt_shared(&mut self) -> bool {
        let Some(remote) = self.remote.as_mut() else {
            return false;
        };
        let Some(raw) = state::get(DOC_KEY) else {
            return false;
        };
        let Some((ms, body)) = split_doc(&raw) else {
            return false;
        };
        if ms <= remote.fetched_ms {
            return false;
        }
        match KeySet::from_json(body) {
            Ok(set) => {
                remote.keys = Some(Rc::new(set));
                remote.fetched_ms = ms;
                true
            }
            Err(_) => false,
        }
    }

    /// A JWKS callout answered: keep the document (here and in shared state).
    fn fetched(&mut self, req: &Request, answer: Result<CalloutResponse, String>) {
        let id = req.id();
        let leader = state::get(LOCK_KEY).as_deref() == Some(id.as_bytes());
        if leader {
            state::delete(LOCK_KEY);
        } else {
            // A cold-start request that fetched while the lock holder did: the host gave
            // it the holder's answer (identical callouts are coalesced), which the holder
            // may have stored already. Then there is nothing to parse or count.
            if self.adopt_shared() {
                self.cache.clear();
            }
            let now = now_ms();
            if let Some(r) = &self.remote {
                if r.keys.is_some() && now.saturating_sub(r.fetched_ms) < r.cfg.refresh_ms {
                    return;
                }
            }
        }
        let Some(remote) = self.remote.as_mut() else {
            return;
        };
        let parsed = match answer {
            Ok(r) if r.status == 200 && r.body.len() <= MAX_JWKS_BYTES => {
                KeySet::from_json(&r.body).and_then(|set| {
                    if set.is_empty() {
                        Err(format!("no usable key ({})", set.skipped.join("; ")))
                    } else {
                        Ok((set, r.body))
                    }
                })
            }
            Ok(r) if r.status == 200 => Err(format!("larger than {MAX_JWKS_BYTES} bytes")),
            Ok(r) => Err(format!("status {}", r.status)),
            Err(e) => Err(e),
        };
        let result = match parsed {
            Ok((set, body)) => {
                for s in &set.skipped {
                    log::warn(&format!("jwks: skipped {s}"));
                }
                let ms = now_ms();
                let mut doc = format!("{ms}\n").into_bytes();
                doc.extend_from_slice(&body);
                let _ = state::set(DOC_KEY, &doc, None);
                remote.keys = Some(Rc::new(set));
                remote.fetched_ms = ms;
                self.cache.clear();
                "ok"
            }
            Err(e) => {
                log::warn(&format!(
                    "jwks fetch from cluster {} path {} failed: {e}",
                    remote.cfg.cluster, remote.cfg.path
                ));
                let backoff = Duration::from_millis(remote.cfg.retry_ms.max(1));
                let _ = state::set(BACKOFF_KEY, b"1", Some(backoff));
                "error"
            }
        };
        if let Some(c) = &self.fetches {
            c.add(&[result], 1);
        }
    }
}

enum KeysRef {
    Inline,
    Remote(Rc<KeySet>),
}

/// `FETCHED_MS\nBODY`.
fn split_doc(raw: &[u8]) -> Option<(u64, &[u8])> {
    let nl = raw.iter().position(|b| *b == b'\n')?;
    let ms = std::str::from_utf8(raw.get(..nl)?).ok()?.parse().ok()?;
    Some((ms, raw.get(nl + 1..)?))
}

impl Filter for Jwt {
    const HOOKS: Hooks = Hooks::REQUEST_HEADERS;

    fn configure(config: &str) -> Result<Self, String> {
        let s = Settings::parse(config)?;
        if let KeySource::Inline(set) = &s.keys {
            for sk in &set.skipped {
                log::warn(&format!("jwks: skipped {sk}"));
            }
        }
        let remote = match &s.keys {
            KeySource::Remote(r) => Some(RemoteKeys {
                cfg: r.clone(),
                keys: None,
                fetched_ms: 0,
            }),
            KeySource::Inline(_) => None,
        };
        Ok(Jwt {
            cache: TokenCache::new(s.cache_size),
            s,
            remote,
            results: Counter::new("jwt_verifications", "Token checks by result", &["result"]).ok(),
            fetches: Counter::new("jwt_jwks_fetches", "JWKS fetches by result", &["result"]).ok(),
        })
    }

    fn on_request_headers(&mut self, req: &Request) -> Action {
        // Claim headers come from verified tokens only, never from the client.
        for (_, h) in &self.s.forward_claims {
            let _ = req.remove_header(h);
        }
        match self.check(req, true) {
            Check::Allow => Action::Continue,
            Check::Fetch(c) => c.into(),
            Check::Deny(r) => r.into(),
        }
    }

    fn on_callout_response(
        &mut self,
        req: &Request,
        _resp: Option<&Response>,
        answer: Result<CalloutResponse, String>,
    ) -> Action {
        self.fetched(req, answer);
        match self.check(req, false) {
            Check::Allow => Action::Continue,
            Check::Deny(r) => r.into(),
            // Not reached: no fetch is asked with `may_fetch` false.
            Check::Fetch(_) => self
                .unavailable(req, "the JWKS could not be fetched")
                .into(),
        }
    }
}

export_filter!(Jwt);
