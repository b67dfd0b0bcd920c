//! The process-wide wasmtime engine: configuration, the epoch ticker, the linker, and
//! compilation of filter files (with an on-disk cache of compiled artifacts).
//!
//! Everything here runs off the request path (start, manifest reload, hot-swap).

use super::bindings::{Filter, FilterPre};
use super::host::HostState;
use super::metrics::{DynMetrics, HostMetrics};
use super::{Callout, FilterError};
use crate::config::FilterEngineSpec;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Filter versions (entries × versions) one worker thread can hold instances of at once.
/// Sizes the pooling allocator: instances past it fail to instantiate (and follow the
/// filter's failure mode) instead of growing the process's address space without bound.
pub const MAX_LIVE_VERSIONS_PER_THREAD: u32 = 32;

/// A compiled filter file, shared by every filter entry that uses the same content.
pub struct Compiled {
    pub sha256: String,
    pub pre: FilterPre<HostState>,
}

/// The engine and what every call needs; shared by the host, slots and instances.
pub struct Runtime {
    pub engine: Engine,
    pub linker: Linker<HostState>,
    /// Epoch ticks a call may run.
    pub deadline_ticks: u64,
    pub max_memory: usize,
    pub callout: Arc<dyn Callout>,
    pub metrics: Arc<HostMetrics>,
    pub dyn_metrics: Arc<DynMetrics>,
    pub cache_dir: Option<PathBuf>,
    pub epoch_start: Instant,
    next_version: AtomicU64,
    compiled: Mutex<HashMap<String, Weak<Compiled>>>,
    stop: Arc<AtomicBool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn default_cache_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Some(PathBuf::from(x).join("wasmesh"));
    }
    std::env::var_os("HOME")
        .filter(|x| !x.is_empty())
        .map(|h| PathBuf::from(h).join(".cache").join("wasmesh"))
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

impl Runtime {
    pub fn new(
        spec: &FilterEngineSpec,
        workers: usize,
        callout: Arc<dyn Callout>,
        metrics: Arc<HostMetrics>,
        dyn_metrics: Arc<DynMetrics>,
    ) -> Result<Arc<Self>, FilterError> {
        let max_memory = spec.max_instance_memory_mib.max(1).saturating_mul(1 << 20);
        // Threads that hold instances: the workers, plus loaders (configure probes).
        let threads = u32::try_from(workers.max(1))
            .unwrap_or(1024)
            .saturating_add(2);
        let instances = threads.saturating_mul(MAX_LIVE_VERSIONS_PER_THREAD);
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(instances)
            // A Rust component holds a few core instances (the program and adapter shims).
            .total_core_instances(instances.saturating_mul(8))
            .total_memories(instances.saturating_mul(2))
            .total_tables(instances.saturating_mul(4))
            .max_memory_size(max_memory);
        let mut config = Config::new();
        config
            .concurrency_support(false)
            .epoch_interruption(true)
            .memory_init_cow(true)
            // Bounded virtual memory: each slot reserves the cap plus a small guard.
            .memory_reservation(u64::try_from(max_memory).unwrap_or(u64::MAX))
            .memory_guard_size(64 << 10)
            .memory_reservation_for_growth(0)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        // Profiling aid: `/tmp/perf-PID.map` names the filters' compiled functions (for
        // `perf`, or to name the JIT addresses in a callgrind profile of a filter chain).
        if std::env::var_os("WASMESH_PERFMAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| FilterError::Engine(format!("{e:#}")))?;
        let mut linker: Linker<HostState> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)
            .map_err(|e| FilterError::Engine(format!("{e:#}")))?;
        // wasmtime-wasi's blocking calls nest a Tokio runtime: replace them (see `wasi`).
        super::wasi::shadow_blocking_io(&mut linker)
            .map_err(|e| FilterError::Engine(format!("{e:#}")))?;
        Filter::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| FilterError::Engine(format!("{e:#}")))?;
        // The calls every request makes, without the generated code's copies (see `hot`).
        super::hot::shadow_hot_calls(&mut linker)
            .map_err(|e| FilterError::Engine(format!("{e:#}")))?;

        // The epoch ticks `tick` apart; a call may run `deadline_ticks` of them (so the real
        // limit is between deadline - tick and deadline).
        let deadline = spec.call_deadline.max(Duration::from_millis(1));
        let tick = (deadline / 10).clamp(Duration::from_millis(1), Duration::from_millis(10));
        let deadline_ticks = (deadline.as_nanos() / tick.as_nanos()).max(1);
        let deadline_ticks = u64::try_from(deadline_ticks).unwrap_or(u64::MAX);
        let stop = Arc::new(AtomicBool::new(false));
        {
            let engine = engine.clone();
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("wasmesh-epoch".to_string())
                .spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(tick);
                        engine.increment_epoch();
                    }
                })
                .map_err(|e| FilterError::Engine(format!("cannot start the epoch thread: {e}")))?;
        }
        let cache_dir = spec.cache_dir.clone().or_else(default_cache_dir);
        Ok(Arc::new(Runtime {
            engine,
            linker,
            deadline_ticks,
            max_memory,
            callout,
            metrics,
            dyn_metrics,
            cache_dir,
            epoch_start: Instant::now(),
            next_version: AtomicU64::new(1),
            compiled: Mutex::new(HashMap::new()),
            stop,
        }))
    }

    /// A process-unique id for a new filter version.
    pub fn next_version_id(&self) -> u64 {
        self.next_version.fetch_add(1, Ordering::Relaxed)
    }

    /// Compile `bytes` (whose sha256 is `sha`), or reuse the compiled component of the same
    /// content that is still in use, or load it from the disk cache.
    pub fn compile(&self, sha: &str, bytes: &[u8]) -> Result<Arc<Compiled>, String> {
        if let Some(c) = self
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(sha)
            .and_then(Weak::upgrade)
        {
            return Ok(c);
        }
        let component = self.load_or_compile(sha, bytes)?;
        let pre = self
            .linker
            .instantiate_pre(&component)
            .map_err(|e| format!("does not match the wasmesh:filter@0.3.0 imports: {e:#}"))?;
        let pre = FilterPre::new(pre)
            .map_err(|e| format!("does not match the wasmesh:filter@0.3.0 exports: {e:#}"))?;
        let compiled = Arc::new(Compiled {
            sha256: sha.to_string(),
            pre,
        });
        let mut map = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        map.insert(sha.to_string(), Arc::downgrade(&compiled));
        Ok(compiled)
    }

    fn cache_path(&self, sha: &str) -> Option<PathBuf> {
        let dir = self.cache_dir.as_ref()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.engine.precompile_compatibility_hash().hash(&mut h);
        Some(dir.join(format!(
            "{sha}-wasmtime{}-{:016x}.cwasm",
            wasmtime_version(),
            h.finish()
        )))
    }

    fn load_or_compile(&self, sha: &str, bytes: &[u8]) -> Result<Component, String> {
        let cached = self.cache_path(sha);
        if let Some(path) = cached.as_deref() {
            if let Some(c) = self.load_cached(path) {
                return Ok(c);
            }
        }
        if !bytes.starts_with(b"\0asm") {
            return Err("not a WebAssembly file".to_string());
        }
        let component =
            Component::new(&self.engine, bytes).map_err(|e| format!("cannot compile: {e:#}"))?;
        if let Some(path) = cached.as_deref() {
            self.store_cached(path, &component);
        }
        Ok(component)
    }

    /// Load a compiled artifact from our cache directory, if present and compatible.
    fn load_cached(&self, path: &Path) -> Option<Component> {
        if !path.is_file() {
            return None;
        }
        match Engine::detect_precompiled_file(path) {
            Ok(Some(wasmtime::Precompiled::Component)) => {}
            _ => return None,
        }
        // SAFETY: `deserialize_file` trusts the file to be an artifact this wasmtime produced.
        // The cache directory is created 0700 by this process, lives outside filter_dir,
        // and files are named by content hash + wasmtime version + engine settings, written
        // atomically (temp file + rename) by `store_cached` below.
        #[allow(unsafe_code)]
        let loaded = unsafe { Component::deserialize_file(&self.engine, path) };
        match loaded {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "ignoring unusable compiled filter in cache");
                None
            }
        }
    }

    fn store_cached(&self, path: &Path, component: &Component) {
        let Some(dir) = path.parent() else { return };
        let result = (|| -> Result<(), String> {
            create_private_dir(dir).map_err(|e| e.to_string())?;
            let bytes = component.serialize().map_err(|e| format!("{e:#}"))?;
            let tmp = dir.join(format!(
                ".tmp-{}-{}",
                std::process::id(),
                self.next_version_id()
            ));
            std::fs::write(&tmp, bytes).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                e.to_string()
            })
        })();
        if let Err(e) = result {
            tracing::debug!(dir = %dir.display(), error = %e, "cannot write the compiled-filter cache");
        }
    }
}

/// The wasmtime version compiled in (part of the cache key).
pub fn wasmtime_version() -> &'static str {
    "48"
}
