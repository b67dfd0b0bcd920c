//! Running a request through its filters.
//!
//! [`Chain`] is the list of filter slots a route uses, resolved at load. [`Chain::start`]
//! snapshots the version each slot serves, and the resulting [`ChainRun`] carries the
//! request's context along the phases: request side in chain order, response side and
//! `done` in reverse order. Between hook calls the run performs what hooks asked:
//! delays and callouts (no instance is held while waiting).
//!
//! Failures (trap, deadline, memory, an invalid answer, lost per-request state) follow
//! the filter's `failure_mode`: `fail_closed` answers 500 with flag `FE`, `fail_open`
//! skips the filter for the rest of the request.

use super::bindings::wasmesh::filter::types::{self as wt, Action};
use super::bindings::Hooks;
use super::coalesce;
use super::host::{Phase, RequestCtx, RequestSnapshot};
use super::instance::{self, CallFailure};
use super::slot::{Candidate, EntryShared, FilterSlot, FilterVersion};
use super::{LocalResponse, Outcome, RequestInfo, Verdict};
use crate::config::FailureMode;
use crate::telemetry::otel::FilterTiming;
use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderMap, StatusCode};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// Callouts (and their follow-ups) one hook may chain before it counts as a failure.
const MAX_ROUNDS: usize = 8;
/// An instance keeps its effects buffer between hooks up to this capacity.
const MAX_KEPT_EFFECTS: usize = 16 * 1024;
/// Longest delay a filter may ask for.
const MAX_DELAY: Duration = Duration::from_secs(300);
/// Callout timeout when the filter gives none, and the longest it may give.
const DEFAULT_CALLOUT_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_CALLOUT_TIMEOUT: Duration = Duration::from_secs(60);

/// A route's filters, in order.
#[derive(Clone, Default)]
pub struct Chain {
    pub(crate) slots: Vec<Arc<FilterSlot>>,
}

impl Chain {
    /// No filters: the core may skip every filter step.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Names of the filters, in order.
    pub fn names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.name.clone()).collect()
    }

    /// Begin a request: snapshot the version each filter serves now.
    pub fn start(&self, info: RequestInfo) -> ChainRun {
        instance::sweep();
        let mut entries = take_entries();
        entries.extend(self.slots.iter().map(|s| {
            // A rollout candidate takes its share; the rest get the current version.
            let candidate = s.candidate().filter(|c| c.pick());
            let version = match &candidate {
                Some(c) => c.version.clone(),
                None => s.current.load_full(),
            };
            version.metrics.requests.inc();
            RunEntry {
                version,
                candidate: candidate.map(|c| (c, s.clone())),
                failed: false,
                generation: None,
                disabled: false,
                ran: false,
            }
        }));
        let any = |h: Hooks| entries.iter().any(|e| e.version.hooks.contains(h));
        let wants_req_body = any(Hooks::REQUEST_BODY);
        let wants_resp_body = any(Hooks::RESPONSE_BODY);
        let wants_done = any(Hooks::DONE);
        let wants_snapshot =
            any(Hooks::RESPONSE_HEADERS) || any(Hooks::RESPONSE_BODY) || wants_done;
        ChainRun {
            entries,
            ctx: Some(RequestCtx::take(info)),
            wants_req_body,
            wants_resp_body,
            wants_snapshot,
            wants_done,
            local_response: None,
            timings: None,
        }
    }
}

struct RunEntry {
    version: Arc<FilterVersion>,
    /// Set when this request went to the slot's rollout candidate.
    candidate: Option<(Arc<Candidate>, Arc<FilterSlot>)>,
    /// The filter failed once in this request (counted once for the rollout).
    failed: bool,
    /// Generation of the instance that served this request's first hook.
    generation: Option<u64>,
    /// Failed open: skipped for the rest of the request.
    disabled: bool,
    ran: bool,
}

/// Which export to call.
enum Hook<'a> {
    RequestHeaders,
    RequestBody,
    ResponseHeaders,
    ResponseBody,
    Done(&'a wt::Outcome),
    Callout(Result<wt::CalloutResponse, String>),
}

/// What a hook may touch, lent by the caller of the phase.
#[derive(Default)]
struct Io<'a> {
    req: Option<&'a mut http::request::Parts>,
    resp: Option<&'a mut http::response::Parts>,
    body: Option<&'a mut Bytes>,
    body_replaced: bool,
}

enum Step {
    Next,
    Stop(Verdict),
}

fn empty_request_parts() -> http::request::Parts {
    http::Request::new(()).into_parts().0
}

fn empty_response_parts() -> http::response::Parts {
    http::Response::new(()).into_parts().0
}

/// One request's walk through its chain. `!Send`: it stays on its worker thread.
pub struct ChainRun {
    entries: Vec<RunEntry>,
    /// Always `Some` outside a hook call (moved into the store during one).
    ctx: Option<Box<RequestCtx>>,
    wants_req_body: bool,
    wants_resp_body: bool,
    wants_snapshot: bool,
    wants_done: bool,
    /// The filter (`name@version`) that answered the request itself, and its status.
    local_response: Option<(String, u16)>,
    /// Each hook's wall-clock span, kept only for sampled requests (`record_timings`):
    /// the request's trace shows which policy added latency.
    timings: Option<Vec<FilterTiming>>,
}

/// Entry lists kept per worker thread for the next requests (see [`RequestCtx::take`]
/// for why).
const ENTRIES_KEEP: usize = 64;

thread_local! {
    // Without a destructor, as the buffer pool's: workers end with the process.
    static ENTRIES_POOL: std::cell::RefCell<std::mem::ManuallyDrop<Vec<Vec<RunEntry>>>> =
        const { std::cell::RefCell::new(std::mem::ManuallyDrop::new(Vec::new())) };
}

fn take_entries() -> Vec<RunEntry> {
    ENTRIES_POOL
        .with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
        .unwrap_or_default()
}

impl Drop for ChainRun {
    fn drop(&mut self) {
        if let Some(ctx) = self.ctx.take() {
            ctx.recycle();
        }
        let mut entries = std::mem::take(&mut self.entries);
        entries.clear();
        if entries.capacity() > 0 && entries.capacity() <= 64 {
            ENTRIES_POOL.with(|p| {
                if let Ok(mut p) = p.try_borrow_mut() {
                    if p.len() < ENTRIES_KEEP {
                        p.push(entries);
                    }
                }
            });
        }
    }
}

impl ChainRun {
    /// Record when each filter hook ran (the request is traced).
    pub fn record_timings(&mut self) {
        self.timings = Some(Vec::new());
    }

    /// The hooks that ran, in order, when [`Self::record_timings`] was called.
    pub fn take_timings(&mut self) -> Vec<FilterTiming> {
        self.timings.take().unwrap_or_default()
    }

    fn note_timing(&mut self, idx: usize, phase: Phase, start: SystemTime, failed: bool) {
        let (Some(t), Some(e)) = (self.timings.as_mut(), self.entries.get(idx)) else {
            return;
        };
        t.push(FilterTiming {
            filter: e.version.entry.name.clone(),
            version: e.version.label.clone(),
            hook: match phase {
                Phase::RequestHeaders => "request_headers",
                Phase::RequestBody => "request_body",
                Phase::ResponseHeaders => "response_headers",
                Phase::ResponseBody => "response_body",
                Phase::Done => "done",
                Phase::Idle | Phase::Configure => "other",
            },
            start,
            end: SystemTime::now(),
            failed,
        });
    }

    /// Run `on-request-headers` of each filter, in chain order. A local answer stops
    /// the chain and is returned.
    pub async fn request_headers(&mut self, parts: &mut http::request::Parts) -> Verdict {
        for idx in 0..self.entries.len() {
            if !self.has(idx, Hooks::REQUEST_HEADERS) {
                continue;
            }
            let mut io = Io {
                req: Some(&mut *parts),
                ..Io::default()
            };
            if let Step::Stop(v) = self.run_hook(idx, Phase::RequestHeaders, &mut io).await {
                // Earlier filters' done hooks still read this request (e.g. to count a
                // rate-limited request under its tenant).
                self.snapshot(parts);
                return v;
            }
        }
        self.snapshot(parts);
        Verdict::Continue
    }

    /// Some filter implements `on-request-body`: buffer the request body and call
    /// [`ChainRun::request_body`] before sending the request on.
    pub fn wants_request_body(&self) -> bool {
        self.wants_req_body
    }

    /// Run `on-request-body` in chain order with the whole body; returns the (possibly
    /// replaced) body, or a local answer. A replaced body gets a new `content-length`.
    pub async fn request_body(
        &mut self,
        parts: &mut http::request::Parts,
        mut body: Bytes,
    ) -> Result<Bytes, Verdict> {
        let mut replaced = false;
        for idx in 0..self.entries.len() {
            if !self.has(idx, Hooks::REQUEST_BODY) {
                continue;
            }
            let mut io = Io {
                req: Some(&mut *parts),
                body: Some(&mut body),
                ..Io::default()
            };
            let step = self.run_hook(idx, Phase::RequestBody, &mut io).await;
            replaced |= io.body_replaced;
            if let Step::Stop(v) = step {
                self.snapshot(parts);
                return Err(v);
            }
        }
        if replaced {
            parts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            parts.headers.remove(http::header::TRANSFER_ENCODING);
        }
        self.snapshot(parts);
        Ok(body)
    }

    /// Run `on-response-headers` in reverse chain order. A local answer replaces the response.
    pub async fn response_headers(&mut self, parts: &mut http::response::Parts) -> Verdict {
        let mut queued = self
            .ctx
            .as_mut()
            .map(|c| std::mem::take(&mut c.response_ops))
            .unwrap_or_default();
        for idx in (0..self.entries.len()).rev() {
            // Response headers this filter asked for from the request side go first, where
            // its own response hook would run.
            if !queued.is_empty() {
                let enabled = self.entries.get(idx).is_some_and(|e| !e.disabled);
                for (_, op) in queued.extract_if(.., |(i, _)| *i == idx) {
                    if enabled {
                        op.apply(&mut parts.headers);
                    }
                }
            }
            if !self.has(idx, Hooks::RESPONSE_HEADERS) {
                continue;
            }
            let mut io = Io {
                resp: Some(&mut *parts),
                ..Io::default()
            };
            if let Step::Stop(v) = self.run_hook(idx, Phase::ResponseHeaders, &mut io).await {
                return v;
            }
        }
        // The list's memory goes back to the context for the next request.
        queued.clear();
        if let Some(c) = self.ctx.as_mut() {
            if c.response_ops.is_empty() {
                c.response_ops = queued;
            }
        }
        Verdict::Continue
    }

    /// Some filter implements `on-response-body`: buffer the response body.
    pub fn wants_response_body(&self) -> bool {
        self.wants_resp_body
    }

    /// Run `on-response-body` in reverse chain order with the whole body.
    pub async fn response_body(
        &mut self,
        parts: &mut http::response::Parts,
        mut body: Bytes,
    ) -> Result<Bytes, Verdict> {
        let mut replaced = false;
        for idx in (0..self.entries.len()).rev() {
            if !self.has(idx, Hooks::RESPONSE_BODY) {
                continue;
            }
            let mut io = Io {
                resp: Some(&mut *parts),
                body: Some(&mut body),
                ..Io::default()
            };
            let step = self.run_hook(idx, Phase::ResponseBody, &mut io).await;
            replaced |= io.body_replaced;
            if let Step::Stop(v) = step {
                return Err(v);
            }
        }
        if replaced {
            parts
                .headers
                .insert(CONTENT_LENGTH, HeaderValue::from(body.len()));
            parts.headers.remove(http::header::TRANSFER_ENCODING);
        }
        Ok(body)
    }

    /// Some filter implements `on-done`: build an [`Outcome`] and call [`ChainRun::done`].
    /// Without one, `done` does nothing, and the outcome need not be built.
    pub fn wants_done(&self) -> bool {
        self.wants_done
    }

    /// The request is over: run `on-done` in reverse chain order. Failures are counted
    /// and logged; nothing can change the answer any more, but attributes and flags set
    /// here still reach the access log (read them after this call).
    pub fn done(&mut self, outcome: &Outcome) {
        if !self.wants_done {
            return;
        }
        let o = wt::Outcome {
            status: outcome.status,
            response_flags: outcome.response_flags.clone(),
            duration_nanos: u64::try_from(outcome.duration.as_nanos()).unwrap_or(u64::MAX),
            cluster: outcome.cluster.clone(),
            upstream: outcome.upstream.clone(),
        };
        for idx in (0..self.entries.len()).rev() {
            if !self.has(idx, Hooks::DONE) {
                continue;
            }
            let mut io = Io::default();
            let start = SystemTime::now();
            let result = self.invoke(idx, Phase::Done, Hook::Done(&o), &mut io);
            self.note_timing(idx, Phase::Done, start, result.is_err());
            if let Err(f) = result {
                self.note_failure(idx, &f);
            }
        }
    }

    /// The cluster a filter chose with `set-cluster`, if any.
    pub fn cluster_override(&self) -> Option<&str> {
        self.ctx.as_ref()?.cluster.as_deref()
    }

    /// Response flags set by filters (e.g. "RL", "FI", "DI", "FE").
    pub fn response_flags(&self) -> &[String] {
        self.ctx.as_ref().map_or(&[], |c| c.flags.as_slice())
    }

    /// Span and access-log attributes set by filters.
    pub fn attributes(&self) -> &[(String, String)] {
        self.ctx.as_ref().map_or(&[], |c| c.attributes.as_slice())
    }

    /// The filter (`name@version`) that answered the request locally, and the status it
    /// answered with (a fail-closed failure counts: 500 from the failed filter).
    pub fn local_response(&self) -> Option<(&str, u16)> {
        self.local_response.as_ref().map(|(f, s)| (f.as_str(), *s))
    }

    /// `name@version` of each filter that ran, in chain order. Built when asked (for the
    /// access log), not kept up along the request.
    pub fn filters_ran(&self) -> Vec<String> {
        self.entries
            .iter()
            .filter(|e| e.ran)
            .map(|e| e.version.label.clone())
            .collect()
    }

    /// A value of the request's bag (what filters passed along with `set-property`).
    pub fn property(&self, key: &str) -> Option<&str> {
        self.ctx.as_ref()?.bag.get(key)
    }

    fn has(&self, idx: usize, hook: Hooks) -> bool {
        self.entries
            .get(idx)
            .is_some_and(|e| !e.disabled && e.version.hooks.contains(hook))
    }

    fn snapshot(&mut self, parts: &http::request::Parts) {
        if !self.wants_snapshot {
            return;
        }
        if let Some(ctx) = self.ctx.as_mut() {
            ctx.snapshot = Some(RequestSnapshot {
                method: parts.method.clone(),
                uri: parts.uri.clone(),
                headers: parts.headers.clone(),
            });
        }
    }

    fn ctx_mut(&mut self) -> Option<&mut RequestCtx> {
        self.ctx.as_deref_mut()
    }

    /// [`Self::run_hook_untimed`], timed when the request is traced.
    async fn run_hook(&mut self, idx: usize, phase: Phase, io: &mut Io<'_>) -> Step {
        if self.timings.is_none() {
            return self.run_hook_untimed(idx, phase, io).await;
        }
        let start = SystemTime::now();
        let step = self.run_hook_untimed(idx, phase, io).await;
        let failed = self.entries.get(idx).is_some_and(|e| e.disabled);
        self.note_timing(idx, phase, start, failed);
        step
    }

    /// Call one hook, then carry out what it asks until it says continue or answers.
    async fn run_hook_untimed(&mut self, idx: usize, phase: Phase, io: &mut Io<'_>) -> Step {
        let first = match phase {
            Phase::RequestHeaders => Hook::RequestHeaders,
            Phase::RequestBody => Hook::RequestBody,
            Phase::ResponseHeaders => Hook::ResponseHeaders,
            _ => Hook::ResponseBody,
        };
        let mut action = match self.invoke(idx, phase, first, io) {
            Ok(a) => a,
            Err(f) => return self.fail(idx, f),
        };
        for _ in 0..MAX_ROUNDS {
            match action {
                Action::Continue => return Step::Next,
                Action::Respond(r) => {
                    return match to_local(r) {
                        Ok(local) => {
                            if let (Some(flag), Some(ctx)) =
                                (local.flag.as_deref(), self.ctx.as_deref_mut())
                            {
                                ctx.add_flag(flag);
                            }
                            self.note_local_response(idx, local.status);
                            Step::Stop(Verdict::Respond(local))
                        }
                        Err(e) => self.fail(idx, CallFailure::new("invalid_action", e)),
                    };
                }
                Action::Delay(d) => {
                    if let (Some(flag), Some(ctx)) = (d.flag.as_deref(), self.ctx_mut()) {
                        ctx.add_flag(flag);
                    }
                    let wait = Duration::from_millis(u64::from(d.millis)).min(MAX_DELAY);
                    tokio::time::sleep(wait).await;
                    return Step::Next;
                }
                Action::Callout(c) => {
                    // `_flight`: callouts identical to this one get its answer until the
                    // filter has seen it (e.g. stored a fetched JWKS for other requests).
                    let (answer, _flight) = self.callout(idx, c).await;
                    action = match self.invoke(idx, phase, Hook::Callout(answer), io) {
                        Ok(a) => a,
                        Err(f) => return self.fail(idx, f),
                    };
                }
            }
        }
        self.fail(
            idx,
            CallFailure::new(
                "invalid_action",
                format!("more than {MAX_ROUNDS} callouts in one hook"),
            ),
        )
    }

    /// Send a hook's callout, or wait for the answer of an identical one in flight. When
    /// this one leads, the returned [`coalesce::Leader`] keeps serving its answer to
    /// identical callouts until dropped.
    async fn callout(
        &mut self,
        idx: usize,
        c: wt::CalloutRequest,
    ) -> (
        Result<wt::CalloutResponse, String>,
        Option<coalesce::Leader>,
    ) {
        let Some(entry) = self.entries.get(idx) else {
            return (Err("no such filter".to_string()), None);
        };
        let shared = entry.version.entry.clone();
        if !shared.clusters.contains(&c.cluster) {
            let e = format!(
                "cluster {:?} is not in filter {}'s clusters list",
                c.cluster, shared.name
            );
            return (Err(e), None);
        }
        let req = match build_callout(&c) {
            Ok(r) => r,
            Err(e) => return (Err(e), None),
        };
        let timeout = match c.timeout_millis {
            0 => DEFAULT_CALLOUT_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)).min(MAX_CALLOUT_TIMEOUT),
        };
        // An identical GET already in flight (e.g. every request of a cold start fetching
        // the same JWKS): wait for its answer rather than send another request.
        let leader = match coalesce::join(&c) {
            coalesce::Role::Alone => None,
            coalesce::Role::Leader(l) => Some(l),
            coalesce::Role::Follower(rx) => {
                match tokio::time::timeout(timeout, coalesce::wait(rx)).await {
                    Ok(Some(answer)) => return (answer, None),
                    // The leader went away without an answer: call for ourselves.
                    Ok(None) => None,
                    Err(_) => {
                        let e = format!("callout to {} timed out after {timeout:?}", c.cluster);
                        return (Err(e), None);
                    }
                }
            }
        };
        let answer = Self::send_callout(&shared, &c, req, timeout).await;
        if let Some(l) = &leader {
            l.publish(&answer);
        }
        (answer, leader)
    }

    async fn send_callout(
        shared: &EntryShared,
        c: &wt::CalloutRequest,
        req: http::Request<Bytes>,
        timeout: Duration,
    ) -> Result<wt::CalloutResponse, String> {
        let fut = shared.rt.callout.call(&c.cluster, req, timeout);
        let resp = match tokio::time::timeout(timeout, fut).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(format!(
                    "callout to {} timed out after {timeout:?}",
                    c.cluster
                ))
            }
        };
        let (parts, body) = resp.into_parts();
        Ok(wt::CalloutResponse {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            body: body.to_vec(),
        })
    }

    /// One synchronous call into the filter's instance on this thread.
    fn invoke(
        &mut self,
        idx: usize,
        phase: Phase,
        hook: Hook<'_>,
        io: &mut Io<'_>,
    ) -> Result<Action, CallFailure> {
        let Some(entry) = self.entries.get_mut(idx) else {
            return Err(CallFailure::new("invalid_action", "no such filter"));
        };
        // Borrowed, not cloned: a clone is an atomic write to a line shared by every
        // request using this version.
        let v = &entry.version;
        let mut inst = instance::checkout(v)?;
        match entry.generation {
            Some(g) if g != inst.generation => {
                instance::checkin(v, inst);
                return Err(CallFailure::new(
                    "state_lost",
                    "the filter instance holding this request's state was restarted",
                ));
            }
            Some(_) => {}
            None => entry.generation = Some(inst.generation),
        }
        entry.ran = true;
        let has_resp = io.resp.is_some();
        let mut pre = match (&hook, io.req.as_deref()) {
            (Hook::RequestHeaders, Some(parts)) => {
                prefetch(v.hooks, parts, self.ctx.as_deref_mut())
            }
            _ => no_prefetch(),
        };
        {
            // Only what this hook sees goes in, field by field: the rest of `call` is at
            // rest from the last call (see below), and rewriting the whole struct (about
            // 500 bytes, in cache lines that are cold by the next request) costs more than
            // the call's own bookkeeping.
            let call = &mut inst.store.data_mut().call;
            call.phase = phase;
            call.req = io
                .req
                .as_deref_mut()
                .map(|p| std::mem::replace(p, empty_request_parts()));
            call.resp = io
                .resp
                .as_deref_mut()
                .map(|p| std::mem::replace(p, empty_response_parts()));
            call.body = io.body.as_deref_mut().map(std::mem::take);
            call.ctx = self.ctx.take();
        }
        inst.store.set_epoch_deadline(v.entry.rt.deadline_ticks);
        let started = Instant::now();
        // A host function that panics unwinds through the guest to here: count it as a
        // trap rather than lose the worker thread.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let (f, store) = (&inst.filter, &mut inst.store);
            match hook {
                Hook::RequestHeaders => f.call_on_request_headers(&mut *store, &pre)?,
                Hook::RequestBody => f.call_on_request_body(&mut *store)?,
                Hook::ResponseHeaders => f.call_on_response_headers(&mut *store)?,
                Hook::ResponseBody => f.call_on_response_body(&mut *store)?,
                Hook::Done(o) => f.call_on_done(&mut *store, o)?,
                Hook::Callout(answer) => {
                    let answer = answer.as_ref().map_err(String::as_str);
                    f.call_on_callout_response(&mut *store, has_resp, answer)?
                }
            }
            // Applied while the store still holds the request's context and parts. A
            // misused reply is the filter's error, not a trap: the instance stays usable.
            let data = store.data_mut();
            let mut effects = std::mem::take(&mut data.call.effects);
            let applied = match data.call.reply_error {
                Some(e) => Err(e.to_string()),
                None => data.apply_effects(idx, &effects),
            };
            // The buffer's memory stays with the instance for its next hook.
            if effects.capacity() <= MAX_KEPT_EFFECTS {
                effects.clear();
                data.call.effects = effects;
            }
            wasmtime::Result::Ok(
                applied.map(|()| data.call.action.take().unwrap_or(Action::Continue)),
            )
        }))
        .unwrap_or_else(|_| Err(wasmtime::format_err!("host function panicked")));
        inst.store.data().end_call();
        v.metrics.invocations.inc();
        v.metrics.duration.observe(started.elapsed().as_secs_f64());
        // Move everything back, whether the call worked or not, and leave `call` at rest:
        // nothing in it, phase idle (host calls outside a hook are refused by phase).
        let call = &mut inst.store.data_mut().call;
        call.phase = Phase::Idle;
        if let (Some(dst), Some(src)) = (io.req.as_deref_mut(), call.req.take()) {
            *dst = src;
        }
        if let (Some(dst), Some(src)) = (io.resp.as_deref_mut(), call.resp.take()) {
            *dst = src;
        }
        if let (Some(dst), Some(src)) = (io.body.as_deref_mut(), call.body.take()) {
            *dst = src;
        }
        io.body_replaced |= std::mem::take(&mut call.body_replaced);
        self.ctx = call.ctx.take();
        if let (Some(text), Some(ctx)) = (pre.text.take(), self.ctx.as_deref_mut()) {
            ctx.prefetch_text = text;
        }
        // Set by a hook that failed before they were read.
        call.action = None;
        call.effects.clear();
        call.reply_error = None;
        match result {
            Ok(Ok(action)) => {
                instance::checkin(v, inst);
                Ok(action)
            }
            Ok(Err(e)) => {
                instance::checkin(v, inst);
                Err(CallFailure::new("invalid_action", e))
            }
            // The instance is dropped here: after a trap it cannot be entered again.
            Err(e) => Err(CallFailure::from_wasm(&e)),
        }
    }

    fn note_failure(&mut self, idx: usize, f: &CallFailure) {
        let Some(entry) = self.entries.get_mut(idx) else {
            return;
        };
        let v = &entry.version;
        v.entry.rt.metrics.error(&v.metrics, f.kind);
        if !entry.failed {
            entry.failed = true;
            if let Some((c, slot)) = &entry.candidate {
                if let Some(r) = &slot.rollout {
                    c.note_failed(&r.spec);
                }
            }
        }
        tracing::warn!(filter = %v.entry.name, version = %v.label, kind = f.kind, error = %f.message, "filter call failed");
    }

    fn note_local_response(&mut self, idx: usize, status: StatusCode) {
        if let Some(e) = self.entries.get(idx) {
            self.local_response = Some((e.version.label.clone(), status.as_u16()));
        }
    }

    /// Apply the filter's failure mode. Either way the filter is not called again for
    /// this request.
    fn fail(&mut self, idx: usize, f: CallFailure) -> Step {
        self.note_failure(idx, &f);
        let Some(entry) = self.entries.get_mut(idx) else {
            return Step::Next;
        };
        entry.disabled = true;
        match entry.version.entry.failure_mode {
            FailureMode::FailOpen => Step::Next,
            FailureMode::FailClosed => {
                let name = entry.version.entry.name.clone();
                if let Some(ctx) = self.ctx_mut() {
                    ctx.add_flag("FE");
                }
                self.note_local_response(idx, StatusCode::INTERNAL_SERVER_ERROR);
                let mut headers = HeaderMap::new();
                headers.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; charset=utf-8"),
                );
                Step::Stop(Verdict::Respond(LocalResponse {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    headers,
                    body: Bytes::from(format!("filter {name} failed: {}\n", f.message)),
                    flag: Some("FE".to_string()),
                }))
            }
        }
    }
}

fn no_prefetch() -> wt::Prefetched {
    wt::Prefetched {
        text: None,
        id_len: None,
        method_len: None,
        path_len: None,
        source_address_len: None,
    }
}

/// The request data a filter asked to get with `on-request-headers` (`pass-*` flags),
/// back to back in one string.
fn prefetch(
    hooks: Hooks,
    parts: &http::request::Parts,
    ctx: Option<&mut RequestCtx>,
) -> wt::Prefetched {
    let mut pre = no_prefetch();
    let pass = Hooks::PASS_ID | Hooks::PASS_METHOD | Hooks::PASS_PATH | Hooks::PASS_SOURCE_ADDRESS;
    if !hooks.intersects(pass) {
        // Nothing asked: no string (even an empty one costs a call into the filter).
        return pre;
    }
    // The context's string from the last hook or request (room for the usual id,
    // method, path and address), or one allocation.
    let mut ctx = ctx;
    let mut text = ctx
        .as_deref_mut()
        .map(|c| std::mem::take(&mut c.prefetch_text))
        .unwrap_or_default();
    text.clear();
    text.reserve(96);
    let mut push = |v: &str| {
        text.push_str(v);
        u32::try_from(v.len()).ok()
    };
    if let (true, Some(c)) = (hooks.contains(Hooks::PASS_ID), ctx.as_deref()) {
        pre.id_len = push(&c.info.request_id);
    }
    if hooks.contains(Hooks::PASS_METHOD) {
        pre.method_len = push(parts.method.as_str());
    }
    if hooks.contains(Hooks::PASS_PATH) {
        pre.path_len = push(parts.uri.path());
    }
    if let (true, Some(c)) = (hooks.contains(Hooks::PASS_SOURCE_ADDRESS), ctx) {
        pre.source_address_len = push(c.source_text());
    }
    pre.text = Some(text);
    pre
}

fn to_local(r: wt::LocalResponse) -> Result<LocalResponse, String> {
    let status = super::host::final_status(r.status)?;
    let mut headers = HeaderMap::with_capacity(r.headers.len());
    for (n, v) in &r.headers {
        let name = HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| format!("invalid header name {n:?}"))?;
        let value =
            HeaderValue::from_str(v).map_err(|_| format!("invalid value for header {n:?}"))?;
        // The answer's framing follows its body.
        if super::host::is_framing(&name) {
            continue;
        }
        headers.append(name, value);
    }
    Ok(LocalResponse {
        status,
        headers,
        body: Bytes::from(r.body),
        flag: r.flag.filter(|f| !f.is_empty()),
    })
}

fn build_callout(c: &wt::CalloutRequest) -> Result<http::Request<Bytes>, String> {
    let method = http::Method::from_bytes(c.method.as_bytes())
        .map_err(|_| format!("invalid method {:?}", c.method))?;
    if !c.path.starts_with('/') {
        return Err(format!("callout path must start with '/': {:?}", c.path));
    }
    let uri: http::Uri = c
        .path
        .parse()
        .map_err(|_| format!("invalid callout path {:?}", c.path))?;
    let mut req = http::Request::new(Bytes::from(c.body.clone()));
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    for (n, v) in &c.headers {
        let name = HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| format!("invalid header name {n:?}"))?;
        let value =
            HeaderValue::from_str(v).map_err(|_| format!("invalid value for header {n:?}"))?;
        req.headers_mut().append(name, value);
    }
    Ok(req)
}
