//! The WebAssembly filter host.
//!
//! Owns everything between the proxy core and filter code: the wasmtime engine
//! ([`engine`]), the host functions filters call ([`host`]), per-thread instances
//! ([`instance`]), filter entries and versions ([`slot`]), running a request through a
//! chain ([`chain`]), hot-swap of filter files ([`watch`]), the shared state
//! ([`state`]) and metrics ([`metrics`]). The contract with filters is the WIT package
//! in `sdk/wit/filter.wit`.
//!
//! Life cycle: [`FilterHost::new`] once per process; [`FilterHost::prepare`] loads a
//! manifest's filters (all or nothing) into a [`FilterSet`]; [`FilterHost::activate`]
//! makes it live and watches its files; routes get a [`Chain`] from
//! [`FilterSet::chain`] and run each request through [`Chain::start`].
//!
//! Nothing a filter does may panic the proxy or block a worker thread for longer than
//! `filter_engine.call_deadline`.

pub mod bindings;
pub mod chain;
mod coalesce;
pub mod crypto;
pub mod effects;
pub mod engine;
pub mod host;
mod hot;
pub mod instance;
pub mod metrics;
pub mod slot;
pub mod state;
mod stderr;
mod wasi;
pub mod watch;

pub use chain::{Chain, ChainRun};

use crate::config::{FailureMode, FilterEngineSpec, FilterSpec};
use engine::Runtime;
use slot::{build_version, sha256_hex, EntryShared, FilterSlot, SlotStatus};
use state::SharedState;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

/// The filter host could not start.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The wasmtime engine could not be set up (e.g. virtual memory for the instance pool).
    #[error("filter engine: {0}")]
    Engine(String),
}

/// How filters reach clusters for callouts; implemented by the proxy core. The future
/// runs on the worker thread that asked (it need not be `Send`).
pub trait Callout: Send + Sync {
    /// Send `req` (path-only URI) to `cluster`, giving up after `timeout`.
    fn call(
        &self,
        cluster: &str,
        req: http::Request<bytes::Bytes>,
        timeout: std::time::Duration,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<http::Response<bytes::Bytes>, String>>>,
    >;
}

/// What a filter may know about the request beyond its head.
#[derive(Debug, Clone)]
pub struct RequestInfo {
    pub request_id: Arc<str>,
    pub source_addr: std::net::SocketAddr,
    pub peer_identity: Option<Arc<str>>,
    pub route: Arc<str>,
    pub scheme: &'static str,
    /// The request's trace and span ids, rendered as hex only if a filter asks.
    pub trace_ids: Option<crate::telemetry::otel::TraceIds>,
}

/// What the chain decided.
#[derive(Debug)]
pub enum Verdict {
    /// Go on.
    Continue,
    /// Answer with this (a filter's local answer, or a 500 `FE` from a failed filter).
    Respond(LocalResponse),
}

/// A response produced by a filter (or by the host for a failed filter).
#[derive(Debug, Clone)]
pub struct LocalResponse {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
    /// Response flag for logs and metrics, e.g. "RL", "FE".
    pub flag: Option<String>,
}

/// How a request ended, for the `done` hooks.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: u16,
    pub response_flags: String,
    pub duration: std::time::Duration,
    pub cluster: Option<String>,
    pub upstream: Option<String>,
}

/// A loaded manifest's filters, by name. Cheap to clone.
#[derive(Clone, Default)]
pub struct FilterSet {
    slots: Arc<HashMap<String, Arc<FilterSlot>>>,
}

impl FilterSet {
    /// The chain of these filters, in this order; an error names an unknown filter.
    pub fn chain(&self, names: &[String]) -> Result<Chain, String> {
        let slots = names
            .iter()
            .map(|n| {
                self.slots
                    .get(n)
                    .cloned()
                    .ok_or_else(|| format!("unknown filter {n:?}"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Chain { slots })
    }

    /// Names of the filters in the set.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.slots.keys().cloned().collect();
        v.sort();
        v
    }

    /// Hot-swap check for one filter now (what the watcher does on a file event); returns
    /// whether a new version went into service. For tests and admin tooling.
    pub fn reload_now(&self, name: &str) -> Result<bool, String> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| format!("unknown filter {name:?}"))?;
        let main = slot.reload_file()?;
        Ok(slot.reload_rollout()? || main)
    }
}

/// `/filters`' view of a rollout.
fn rollout_json(r: &slot::Rollout) -> serde_json::Value {
    let c = r.candidate.load_full();
    let requests = c.as_ref().map_or(0, |c| c.requests.load(Ordering::Relaxed));
    let failed = c.as_ref().map_or(0, |c| c.failed.load(Ordering::Relaxed));
    let rolled_back = c
        .as_ref()
        .is_some_and(|c| c.rolled_back.load(Ordering::Relaxed));
    serde_json::json!({
        "file": r.path.display().to_string(),
        "sha256": c.as_ref().map(|c| c.version.sha256.clone()),
        "version_id": c.as_ref().map(|c| c.version.sha256.get(..12).unwrap_or("").to_string()),
        "percent": r.spec.percent,
        "max_error_rate": r.spec.max_error_rate,
        "min_requests": r.spec.min_requests,
        "requests": requests,
        "failed_requests": failed,
        "error_rate": if requests == 0 { 0.0 } else { failed as f64 / requests as f64 },
        "state": if rolled_back { "rolled_back" } else { "serving" },
        "rollback_reason": c.as_ref().and_then(|c| c.rollback_reason.lock().unwrap_or_else(|e| e.into_inner()).clone()),
        "last_error": lock(&r.last_error).as_ref().map(|(e, _)| e.clone()),
    })
}

/// The process's filter host.
pub struct FilterHost {
    /// The wasmtime engine, created when the first filter loads: a proxy without filters
    /// never touches wasmtime or Cranelift (about 3 MB less resident code).
    rt: OnceLock<Arc<Runtime>>,
    engine_spec: FilterEngineSpec,
    workers: usize,
    callout: Arc<dyn Callout>,
    metrics: Arc<metrics::HostMetrics>,
    dyn_metrics: Arc<metrics::DynMetrics>,
    /// Shared state by filter name: kept across reloads and hot-swaps.
    states: Mutex<HashMap<String, Arc<SharedState>>>,
    active: Mutex<FilterSet>,
    activated: AtomicBool,
    routes: Mutex<HashMap<String, Vec<String>>>,
    watcher: Mutex<Option<watch::FileWatcher>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl FilterHost {
    /// Set up the engine (one per process), its instance pool and the epoch ticker, and
    /// register the filter metrics in `registry`.
    pub fn new(
        spec: &FilterEngineSpec,
        workers: usize,
        registry: &mut prometheus_client::registry::Registry,
        callout: Arc<dyn Callout>,
    ) -> Result<Arc<Self>, FilterError> {
        let (metrics, dyn_metrics) = metrics::HostMetrics::new(registry);
        Ok(Arc::new(FilterHost {
            rt: OnceLock::new(),
            engine_spec: spec.clone(),
            workers,
            callout,
            metrics,
            dyn_metrics,
            states: Mutex::new(HashMap::new()),
            active: Mutex::new(FilterSet::default()),
            activated: AtomicBool::new(false),
            routes: Mutex::new(HashMap::new()),
            watcher: Mutex::new(None),
        }))
    }

    /// The engine, created on first use (loads run on one thread at a time, but a race
    /// would only build a second engine and drop it).
    fn runtime(&self) -> Result<Arc<Runtime>, FilterError> {
        if let Some(rt) = self.rt.get() {
            return Ok(rt.clone());
        }
        let rt = Runtime::new(
            &self.engine_spec,
            self.workers,
            self.callout.clone(),
            self.metrics.clone(),
            self.dyn_metrics.clone(),
        )?;
        Ok(self.rt.get_or_init(|| rt).clone())
    }

    /// Load a manifest's filters, all or nothing: read each file, check its pin, compile
    /// (or reuse by content hash), instantiate once and run `configure`. Entries unchanged
    /// since the active set (same spec, same file content) keep their slot. The work runs
    /// on a separate thread. On error: every problem, each naming the filter and its file.
    pub async fn prepare(
        self: &Arc<Self>,
        filter_dir: Option<&Path>,
        specs: &[FilterSpec],
        clusters: &HashSet<String>,
    ) -> Result<FilterSet, Vec<String>> {
        let host = self.clone();
        let dir = filter_dir.map(Path::to_path_buf);
        let specs = specs.to_vec();
        let clusters = clusters.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("wasmesh-filter-load".to_string())
            .spawn(move || {
                let _ = tx.send(host.prepare_blocking(dir.as_deref(), &specs, &clusters));
            });
        if let Err(e) = spawned {
            return Err(vec![format!("cannot start the filter loader thread: {e}")]);
        }
        rx.await
            .unwrap_or_else(|_| Err(vec!["the filter loader thread died".to_string()]))
    }

    /// [`FilterHost::prepare`] on the calling thread (for callers without a runtime).
    pub fn prepare_blocking(
        self: &Arc<Self>,
        filter_dir: Option<&Path>,
        specs: &[FilterSpec],
        clusters: &HashSet<String>,
    ) -> Result<FilterSet, Vec<String>> {
        let active = lock(&self.active).clone();
        let mut errors = Vec::new();
        let mut slots = HashMap::new();
        for spec in specs {
            match self.load_entry(filter_dir, spec, clusters, &active) {
                Ok(slot) => {
                    if slots.insert(spec.name.clone(), slot).is_some() {
                        errors.push(format!("filter {}: defined twice", spec.name));
                    }
                }
                Err(e) => {
                    self.metrics
                        .load_failures
                        .get_or_create(&metrics::FilterLabels {
                            filter: spec.name.clone(),
                        })
                        .inc();
                    errors.push(e);
                }
            }
        }
        if errors.is_empty() {
            Ok(FilterSet {
                slots: Arc::new(slots),
            })
        } else {
            Err(errors)
        }
    }

    fn load_entry(
        &self,
        dir: Option<&Path>,
        spec: &FilterSpec,
        clusters: &HashSet<String>,
        active: &FilterSet,
    ) -> Result<Arc<FilterSlot>, String> {
        let path: PathBuf = match dir {
            Some(d) if spec.file.is_relative() => d.join(&spec.file),
            _ => spec.file.clone(),
        };
        let ctx = |msg: String| format!("filter {} (file {}): {msg}", spec.name, path.display());
        if spec.name.is_empty() {
            return Err(ctx("empty name".to_string()));
        }
        let mut unknown: Vec<&String> = spec
            .clusters
            .iter()
            .filter(|c| !clusters.contains(*c))
            .collect();
        unknown.sort();
        if !unknown.is_empty() {
            return Err(ctx(format!("unknown clusters in `clusters`: {unknown:?}")));
        }
        let bytes = std::fs::read(&path).map_err(|e| ctx(format!("cannot read: {e}")))?;
        let sha = sha256_hex(&bytes);
        // The rollout candidate's file, if any.
        let candidate = match &spec.rollout {
            Some(r) => {
                let p = match dir {
                    Some(d) if r.file.is_relative() => d.join(&r.file),
                    _ => r.file.clone(),
                };
                let b = std::fs::read(&p)
                    .map_err(|e| ctx(format!("cannot read rollout file {}: {e}", p.display())))?;
                let sha = sha256_hex(&b);
                Some((p, b, sha))
            }
            None => None,
        };
        if let Some(old) = active.slots.get(&spec.name) {
            let same_candidate = match (&candidate, &old.rollout) {
                (None, None) => true,
                (Some((p, _, sha)), Some(r)) => {
                    r.path == *p
                        && r.candidate
                            .load()
                            .as_ref()
                            .is_some_and(|c| c.version.sha256 == *sha)
                }
                _ => false,
            };
            if old.spec == *spec
                && old.path == path
                && old.current.load().sha256 == sha
                && same_candidate
            {
                return Ok(old.clone());
            }
        }
        let state = lock(&self.states)
            .entry(spec.name.clone())
            .or_default()
            .clone();
        let entry = Arc::new(EntryShared {
            name: spec.name.clone(),
            failure_mode: spec.failure_mode,
            clusters: spec.clusters.iter().cloned().collect(),
            state,
            rt: self.runtime().map_err(|e| ctx(e.to_string()))?,
        });
        let version = build_version(
            &entry,
            spec.sha256.as_deref(),
            &spec.config,
            &bytes,
            &sha,
            1,
        )
        .map_err(ctx)?;
        let rollout = match (&spec.rollout, candidate) {
            (Some(r), Some((p, b, csha))) => {
                let v = build_version(&entry, r.sha256.as_deref(), &spec.config, &b, &csha, 1)
                    .map_err(|e| ctx(format!("rollout file {}: {e}", p.display())))?;
                Some(slot::Rollout {
                    spec: r.clone(),
                    path: p,
                    candidate: arc_swap::ArcSwapOption::from_pointee(slot::Candidate::new(
                        Arc::new(v),
                        r,
                    )),
                    last_error: Mutex::new(None),
                })
            }
            _ => None,
        };
        let status = SlotStatus {
            sha256: version.sha256.clone(),
            seq: version.seq,
            loaded_at: Some(version.loaded_at),
            ..SlotStatus::default()
        };
        Ok(Arc::new(FilterSlot {
            name: spec.name.clone(),
            spec: spec.clone(),
            path,
            entry,
            current: arc_swap::ArcSwap::from_pointee(version),
            status: Mutex::new(status),
            swap_lock: Mutex::new(()),
            rollout,
        }))
    }

    /// Make `set` the live one and watch its files for hot-swaps (replacing any previous
    /// watcher). A watcher that cannot start is logged; filters still serve.
    pub fn activate(self: &Arc<Self>, set: &FilterSet) {
        *lock(&self.active) = set.clone();
        let slots: Vec<Arc<FilterSlot>> = set.slots.values().cloned().collect();
        let mut w = lock(&self.watcher);
        *w = None;
        if !slots.is_empty() {
            match watch::start(Arc::downgrade(self), slots) {
                Ok(watcher) => *w = Some(watcher),
                Err(e) => tracing::error!(error = %e, "filter hot-swap disabled"),
            }
        }
        self.activated.store(true, Ordering::Release);
    }

    /// Tell `/filters` which routes use filter `name`.
    pub fn set_routes(&self, name: &str, routes: Vec<String>) {
        lock(&self.routes).insert(name.to_string(), routes);
    }

    /// The active set.
    pub fn active(&self) -> FilterSet {
        lock(&self.active).clone()
    }

    /// JSON for the admin endpoint's `/filters`: one object per filter of the active set.
    pub fn status_json(&self) -> serde_json::Value {
        let set = self.active();
        let routes = lock(&self.routes).clone();
        let mut names: Vec<&String> = set.slots.keys().collect();
        names.sort();
        let list: Vec<serde_json::Value> = names
            .into_iter()
            .filter_map(|n| set.slots.get(n))
            .map(|s| {
                let st = s.status();
                let hooks = s.current.load().hooks;
                let hook_names: Vec<&str> = [
                    (bindings::Hooks::REQUEST_HEADERS, "request_headers"),
                    (bindings::Hooks::REQUEST_BODY, "request_body"),
                    (bindings::Hooks::RESPONSE_HEADERS, "response_headers"),
                    (bindings::Hooks::RESPONSE_BODY, "response_body"),
                    (bindings::Hooks::DONE, "done"),
                ]
                .into_iter()
                .filter(|(h, _)| hooks.contains(*h))
                .map(|(_, n)| n)
                .collect();
                serde_json::json!({
                    "name": s.name,
                    "file": s.path.display().to_string(),
                    "sha256": st.sha256,
                    "version": st.seq,
                    "version_id": st.sha256.get(..12).unwrap_or(""),
                    "loaded_at_unix_ms": st.loaded_at.map(unix_millis),
                    "failure_mode": match s.spec.failure_mode { FailureMode::FailOpen => "fail_open", FailureMode::FailClosed => "fail_closed" },
                    "hooks": hook_names,
                    "clusters": s.spec.clusters,
                    "routes": routes.get(&s.name).cloned().unwrap_or_default(),
                    "hot_swaps": st.hot_swaps,
                    "load_failures": st.load_failures,
                    "last_error": st.last_error,
                    "last_error_at_unix_ms": st.last_error_at.map(unix_millis),
                    "shared_state_keys": s.entry.state.len(),
                    "requests": s.current.load().metrics.requests.get(),
                    "rollout": s.rollout.as_ref().map(rollout_json),
                })
            })
            .collect();
        serde_json::Value::Array(list)
    }

    /// True once a filter set is active (every filter of it loaded: `prepare` is all or nothing).
    pub fn ready(&self) -> bool {
        self.activated.load(Ordering::Acquire)
    }
}
