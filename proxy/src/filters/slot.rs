//! Filter entries and their versions.
//!
//! A [`FilterSlot`] is one manifest `filters[]` entry; it lives as long as the entry is
//! unchanged across manifest reloads. It points, through an `ArcSwap`, at the
//! [`FilterVersion`] serving new requests: a hot-swap builds the next version aside
//! (compile, instantiate, configure) and stores it in one step. A request keeps the
//! versions it snapshotted at `Chain::start` until it ends.
//!
//! A slot may also hold a rollout [`Candidate`] (`filters[].rollout`): a second version
//! that serves a share of requests and is rolled back, for good, once its share of
//! failed requests crosses the threshold (until a new candidate file or manifest).

use super::bindings::Hooks;
use super::engine::{Compiled, Runtime};
use super::instance;
use super::metrics::{DynMetric, OverflowLabels, VersionMetrics};
use super::state::SharedState;
use crate::config::{FailureMode, FilterSpec, RolloutSpec};
use arc_swap::{ArcSwap, ArcSwapOption};
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

/// Versions dropped so far: worker threads compare it with what they last saw to know
/// when to free instances of versions no longer in use.
pub static RETIRED: AtomicU64 = AtomicU64::new(0);

/// What every instance and version of one filter entry shares.
pub struct EntryShared {
    pub name: String,
    pub failure_mode: FailureMode,
    pub clusters: HashSet<String>,
    pub state: Arc<SharedState>,
    pub rt: Arc<Runtime>,
}

impl EntryShared {
    /// Count a value of a filter-defined metric that went to the overflow label set.
    pub fn overflow(&self, m: &DynMetric) {
        self.rt
            .metrics
            .metric_overflow
            .get_or_create(&OverflowLabels {
                filter: self.name.clone(),
                metric: m.name().to_string(),
            })
            .inc();
    }
}

/// One loaded, configured version of a filter entry.
pub struct FilterVersion {
    /// Process-unique; keys the thread-local instances.
    pub id: u64,
    /// 1, 2, 3... within the slot.
    pub seq: u64,
    pub sha256: String,
    /// `name@SHORTHASH`, as reported by `filters_ran`.
    pub label: String,
    pub compiled: Arc<Compiled>,
    pub config: String,
    pub hooks: Hooks,
    pub entry: Arc<EntryShared>,
    pub metrics: VersionMetrics,
    pub loaded_at: SystemTime,
}

impl Drop for FilterVersion {
    fn drop(&mut self) {
        RETIRED.fetch_add(1, Ordering::Release);
    }
}

/// What `/filters` shows about a slot.
#[derive(Default)]
pub struct SlotStatus {
    pub last_error: Option<String>,
    pub last_error_at: Option<SystemTime>,
    /// Content hash of the last file that failed, so the same broken file is not retried.
    pub failed_sha: Option<String>,
    pub load_failures: u64,
    pub hot_swaps: u64,
    /// Status of the version serving: copied after the version is stored.
    pub sha256: String,
    pub seq: u64,
    pub loaded_at: Option<SystemTime>,
}

/// A rollout candidate version with its own counts (a new candidate file starts afresh).
pub struct Candidate {
    pub version: Arc<FilterVersion>,
    /// Share in basis points (1/10000).
    basis_points: u64,
    /// Spreads the share evenly over requests (see [`Candidate::pick`]).
    counter: AtomicU64,
    /// Requests routed to the candidate.
    pub requests: AtomicU64,
    /// Of those, requests where the candidate failed (trap, deadline, memory, ...).
    pub failed: AtomicU64,
    pub rolled_back: AtomicBool,
    pub rollback_reason: Mutex<Option<String>>,
}

impl Candidate {
    pub fn new(version: Arc<FilterVersion>, spec: &RolloutSpec) -> Self {
        let bp = (spec.percent * 100.0).round().clamp(0.0, 10_000.0) as u64;
        let rt = &version.entry.rt;
        rt.metrics
            .rollout_percent
            .get_or_create(&version.metrics.labels)
            .set(spec.percent);
        Candidate {
            version,
            basis_points: bp,
            counter: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            rolled_back: AtomicBool::new(false),
            rollback_reason: Mutex::new(None),
        }
    }

    /// Whether this request goes to the candidate. A multiplicative stride over a counter
    /// (7919 is coprime with 10000) gives exactly the share over every 10000 requests,
    /// spread out rather than in a burst.
    pub fn pick(&self) -> bool {
        if self.rolled_back.load(Ordering::Relaxed) {
            return false;
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        if n.wrapping_mul(7919) % 10_000 < self.basis_points {
            self.requests.fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }

    /// A request served by the candidate failed: count it and roll back past the threshold.
    pub fn note_failed(&self, spec: &RolloutSpec) {
        let failed = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
        let requests = self.requests.load(Ordering::Relaxed).max(1);
        if requests < spec.min_requests || self.rolled_back.load(Ordering::Relaxed) {
            return;
        }
        let rate = failed as f64 / requests as f64;
        if rate > spec.max_error_rate && !self.rolled_back.swap(true, Ordering::AcqRel) {
            let reason = format!(
                "error rate {rate:.3} ({failed} of {requests} requests) over max_error_rate {}",
                spec.max_error_rate
            );
            let v = &self.version;
            tracing::error!(filter = %v.entry.name, version = %v.label, %reason, "filter rollout rolled back");
            let m = &v.entry.rt.metrics;
            m.rollout_percent.get_or_create(&v.metrics.labels).set(0.0);
            m.rollbacks
                .get_or_create(&super::metrics::FilterLabels {
                    filter: v.entry.name.clone(),
                })
                .inc();
            *self
                .rollback_reason
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(reason);
        }
    }
}

/// The rollout of a slot: where its candidate comes from, and the candidate serving.
pub struct Rollout {
    pub spec: RolloutSpec,
    pub path: PathBuf,
    pub candidate: ArcSwapOption<Candidate>,
    /// Last load error of the candidate file, and its content hash (not retried).
    pub last_error: Mutex<Option<(String, String)>>,
}

/// One manifest filter entry.
pub struct FilterSlot {
    pub name: String,
    pub spec: FilterSpec,
    pub path: PathBuf,
    pub entry: Arc<EntryShared>,
    pub current: ArcSwap<FilterVersion>,
    pub status: Mutex<SlotStatus>,
    /// Serializes swaps (watcher and explicit reloads) so versions are numbered once each.
    pub swap_lock: Mutex<()>,
    pub rollout: Option<Rollout>,
}

impl FilterSlot {
    pub fn status(&self) -> std::sync::MutexGuard<'_, SlotStatus> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Re-read the slot's file and put it in service if its content changed and loads.
    /// Returns whether a new version went into service. The read happens under the swap
    /// lock, so concurrent reloads never put an older content back.
    pub fn reload_file(&self) -> Result<bool, String> {
        let _serial = self.swap_lock.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = std::fs::read(&self.path)
            .map_err(|e| format!("filter {} (file {}): {e}", self.name, self.path.display()))?;
        self.swap_to(&bytes)
    }

    /// Re-read the rollout candidate's file; a new content that loads becomes the
    /// candidate, with fresh counts (a rolled-back rollout restarts). Returns whether it did.
    pub fn reload_rollout(&self) -> Result<bool, String> {
        let Some(r) = &self.rollout else {
            return Ok(false);
        };
        let _serial = self.swap_lock.lock().unwrap_or_else(|e| e.into_inner());
        let ctx = |e: String| {
            format!(
                "filter {} rollout (file {}): {e}",
                self.name,
                r.path.display()
            )
        };
        let bytes = std::fs::read(&r.path).map_err(|e| ctx(e.to_string()))?;
        let sha = sha256_hex(&bytes);
        if r.candidate
            .load()
            .as_ref()
            .is_some_and(|c| c.version.sha256 == sha)
        {
            return Ok(false);
        }
        let mut last = r.last_error.lock().unwrap_or_else(|e| e.into_inner());
        if last.as_ref().is_some_and(|(_, s)| *s == sha) {
            return Ok(false);
        }
        let seq = self.current.load().seq;
        match build_version(
            &self.entry,
            r.spec.sha256.as_deref(),
            &self.spec.config,
            &bytes,
            &sha,
            seq,
        ) {
            Ok(v) => {
                *last = None;
                tracing::info!(filter = %self.name, file = %r.path.display(), sha256 = %v.sha256, percent = r.spec.percent, "filter rollout candidate in service");
                r.candidate
                    .store(Some(Arc::new(Candidate::new(Arc::new(v), &r.spec))));
                Ok(true)
            }
            Err(e) => {
                let e = ctx(e);
                tracing::error!(filter = %self.name, error = %e, "rollout candidate refused");
                *last = Some((e.clone(), sha));
                Err(e)
            }
        }
    }

    /// The rollout candidate serving a share of requests now, if any (not rolled back).
    pub fn candidate(&self) -> Option<Arc<Candidate>> {
        let c = self.rollout.as_ref()?.candidate.load_full()?;
        (!c.rolled_back.load(Ordering::Relaxed)).then_some(c)
    }

    /// Put `bytes` in service as the next version (caller holds `swap_lock`). On success
    /// the version is stored before the status says so.
    fn swap_to(&self, bytes: &[u8]) -> Result<bool, String> {
        let sha = sha256_hex(bytes);
        if sha == self.current.load().sha256 {
            return Ok(false);
        }
        if self.status().failed_sha.as_deref() == Some(sha.as_str()) {
            return Ok(false);
        }
        let seq = self.current.load().seq + 1;
        match build_version(
            &self.entry,
            self.spec.sha256.as_deref(),
            &self.spec.config,
            bytes,
            &sha,
            seq,
        ) {
            Ok(v) => {
                let v = Arc::new(v);
                self.current.store(v.clone());
                let mut st = self.status();
                st.sha256 = v.sha256.clone();
                st.seq = v.seq;
                st.loaded_at = Some(v.loaded_at);
                st.last_error = None;
                st.failed_sha = None;
                st.hot_swaps += 1;
                drop(st);
                self.entry
                    .rt
                    .metrics
                    .hot_swaps
                    .get_or_create(&super::metrics::FilterLabels {
                        filter: self.name.clone(),
                    })
                    .inc();
                tracing::info!(filter = %self.name, file = %self.path.display(), sha256 = %v.sha256, version = v.seq, "filter hot-swapped");
                Ok(true)
            }
            Err(e) => {
                let e = format!("filter {} (file {}): {e}", self.name, self.path.display());
                let mut st = self.status();
                st.last_error = Some(e.clone());
                st.last_error_at = Some(SystemTime::now());
                st.failed_sha = Some(sha);
                st.load_failures += 1;
                drop(st);
                self.entry
                    .rt
                    .metrics
                    .load_failures
                    .get_or_create(&super::metrics::FilterLabels {
                        filter: self.name.clone(),
                    })
                    .inc();
                tracing::error!(filter = %self.name, error = %e, "new filter version refused; the previous version keeps serving");
                Err(e)
            }
        }
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Compile (or reuse), instantiate once and configure: a version ready to serve.
pub fn build_version(
    entry: &Arc<EntryShared>,
    pin: Option<&str>,
    config: &serde_json::Value,
    bytes: &[u8],
    sha: &str,
    seq: u64,
) -> Result<FilterVersion, String> {
    if let Some(pin) = pin {
        if !pin.eq_ignore_ascii_case(sha) {
            return Err(format!(
                "content sha256 {sha} does not match the pinned sha256 {pin}"
            ));
        }
    }
    let compiled = entry.rt.compile(sha, bytes)?;
    let config = if config.is_null() {
        "null".to_string()
    } else {
        config.to_string()
    };
    let hooks = instance::probe(entry, &compiled, &config)?;
    let short = sha.get(..12).unwrap_or(sha).to_string();
    Ok(FilterVersion {
        id: entry.rt.next_version_id(),
        seq,
        sha256: sha.to_string(),
        label: format!("{}@{short}", entry.name),
        metrics: entry.rt.metrics.for_version(&entry.name, &short),
        compiled,
        config,
        hooks,
        entry: entry.clone(),
        loaded_at: SystemTime::now(),
    })
}
