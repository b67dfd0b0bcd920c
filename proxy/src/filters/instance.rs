//! Filter instances, kept per worker thread.
//!
//! A worker thread runs one hook call at a time and calls are synchronous, so one
//! instance per (filter version, thread) is enough: it is taken out of the thread's pool
//! for a call and put back after. No locks. An instance whose call failed is dropped (a
//! trap leaves it unusable) and the next call instantiates a fresh one, with a new
//! generation number so requests that had state in the old one can tell.
//!
//! Instances of versions that are no longer referenced are freed the next time the
//! thread starts a chain (see [`sweep`]).

use super::bindings::{Filter, Hooks};
use super::engine::Compiled;
use super::host::{HostState, Phase};
use super::slot::{EntryShared, FilterVersion, RETIRED};
use rustc_hash::FxHashMap;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use wasmtime::Store;

static GENERATION: AtomicU64 = AtomicU64::new(1);

/// A live filter instance.
pub struct Instance {
    pub store: Store<HostState>,
    pub filter: Filter,
    pub generation: u64,
}

struct Pooled {
    version: Weak<FilterVersion>,
    /// Boxed: a hook call takes the instance out and puts it back, and moving a pointer
    /// touches one cache line where moving the bindings (a few hundred bytes) touches
    /// several, cold by the next request.
    instance: Option<Box<Instance>>,
}

#[derive(Default)]
struct Pool {
    /// Keyed by the version's process-unique id (a hook call looks it up twice).
    by_version: FxHashMap<u64, Pooled>,
    seen_retired: u64,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// Why a call could not be made or failed.
#[derive(Debug, Clone)]
pub struct CallFailure {
    /// Metric label: trap, deadline, memory, instantiate, invalid_action, state_lost, callout.
    pub kind: &'static str,
    pub message: String,
}

impl CallFailure {
    pub fn new(kind: &'static str, message: impl Into<String>) -> Self {
        CallFailure {
            kind,
            message: message.into(),
        }
    }

    /// Classify an error returned by a call into wasm.
    pub fn from_wasm(e: &wasmtime::Error) -> Self {
        let kind = match e.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => "deadline",
            Some(_) => "trap",
            None => {
                let text = format!("{e:#}");
                if text.contains("forcing trap when growing memory")
                    || text.contains("memory") && text.contains("limit")
                {
                    "memory"
                } else {
                    "trap"
                }
            }
        };
        let text = format!("{e:#}");
        let message = match kind {
            "deadline" => "deadline exceeded".to_string(),
            "memory" => "memory limit reached".to_string(),
            _ => text
                .lines()
                .next()
                .unwrap_or("trap")
                .chars()
                .take(300)
                .collect(),
        };
        CallFailure { kind, message }
    }
}

fn new_store(entry: &Arc<EntryShared>) -> Store<HostState> {
    let mut store = Store::new(
        &entry.rt.engine,
        HostState::new(entry.clone(), entry.rt.max_memory),
    );
    store.limiter(|s| &mut s.limits);
    store.epoch_deadline_trap();
    store.set_epoch_deadline(entry.rt.deadline_ticks);
    store
}

/// Instantiate and configure; returns the instance and the hooks it declared. A host
/// panic during it (see `ChainRun::invoke`) is a failure, not a crash.
fn instantiate(
    entry: &Arc<EntryShared>,
    compiled: &Compiled,
    config: &str,
) -> Result<(Store<HostState>, Filter, Hooks), CallFailure> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        instantiate_inner(entry, compiled, config)
    }))
    .unwrap_or_else(|_| Err(CallFailure::new("trap", "host function panicked")))
}

fn instantiate_inner(
    entry: &Arc<EntryShared>,
    compiled: &Compiled,
    config: &str,
) -> Result<(Store<HostState>, Filter, Hooks), CallFailure> {
    let mut store = new_store(entry);
    let filter = compiled.pre.instantiate(&mut store).map_err(|e| {
        let f = CallFailure::from_wasm(&e);
        if f.kind == "trap" {
            CallFailure::new("instantiate", format!("cannot instantiate: {}", f.message))
        } else {
            f
        }
    })?;
    store.data_mut().call.phase = Phase::Configure;
    store.set_epoch_deadline(entry.rt.deadline_ticks);
    let hooks = filter.call_configure(&mut store, config);
    store.data().end_call();
    let hooks = hooks.map_err(|e| CallFailure::from_wasm(&e))?;
    store.data_mut().call.phase = Phase::Idle;
    let hooks = hooks.map_err(|e| {
        CallFailure::new(
            "instantiate",
            format!(
                "configure failed: {}",
                e.chars().take(500).collect::<String>()
            ),
        )
    })?;
    Ok((store, filter, hooks))
}

/// Load-time check of a new version: instantiate once and run `configure`.
pub fn probe(entry: &Arc<EntryShared>, compiled: &Compiled, config: &str) -> Result<Hooks, String> {
    instantiate(entry, compiled, config)
        .map(|(_, _, hooks)| hooks)
        .map_err(|f| match f.kind {
            "instantiate" => f.message,
            _ => format!("trapped while starting: {}", f.message),
        })
}

/// Take this thread's instance of `v`, creating it if needed.
pub fn checkout(v: &Arc<FilterVersion>) -> Result<Box<Instance>, CallFailure> {
    let existing = POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.by_version.get_mut(&v.id).and_then(|e| e.instance.take())
    });
    if let Some(i) = existing {
        return Ok(i);
    }
    let (store, filter, _) = instantiate(&v.entry, &v.compiled, &v.config)?;
    Ok(Box::new(Instance {
        store,
        filter,
        generation: GENERATION.fetch_add(1, Ordering::Relaxed),
    }))
}

/// Give a healthy instance back to this thread's pool.
pub fn checkin(v: &Arc<FilterVersion>, instance: Box<Instance>) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.by_version
            .entry(v.id)
            .or_insert_with(|| Pooled {
                version: Arc::downgrade(v),
                instance: None,
            })
            .instance = Some(instance);
    });
}

/// Free this thread's instances of versions nobody references any more. Cheap when
/// nothing was retired since the last sweep (one atomic load).
pub fn sweep() {
    let retired = RETIRED.load(Ordering::Acquire);
    POOL.with(|p| {
        let Ok(mut p) = p.try_borrow_mut() else {
            return;
        };
        if p.seen_retired == retired {
            return;
        }
        p.seen_retired = retired;
        p.by_version.retain(|_, e| e.version.strong_count() > 0);
    });
}

/// Instances this thread holds (for tests and diagnostics).
pub fn thread_instances() -> usize {
    POOL.with(|p| {
        p.borrow()
            .by_version
            .values()
            .filter(|e| e.instance.is_some())
            .count()
    })
}
