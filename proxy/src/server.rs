//! The proxy's life cycle: load → build → bind → serve → reload → drain.
//!
//! [`run`] is the library's entry point (the binary's `main` only parses the command line).
//! Configuration that changes at run time is an immutable snapshot behind `ArcSwap`: a
//! reload builds the next snapshot aside (clusters whose spec did not change are kept, pools
//! and all) and swaps it in with one store; requests in flight keep the snapshot they began
//! with.

use crate::cluster::Cluster;
use crate::config::{self, Direction, ListenerProtocol, ListenerSpec, Manifest};
use crate::filters::{Callout, Chain, FilterHost, FilterSet};
use crate::routing::RouteTable;
use crate::telemetry::access_log::AccessLog;
use crate::telemetry::metrics::{Metrics, ResultLabel};
use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::BodyExt;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::{watch, Semaphore};

/// Errors that stop the proxy from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] config::ConfigErrors),
    #[error("{0}")]
    Build(String),
    #[error("listener `{name}` cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: String,
        source: std::io::Error,
    },
    #[error("admin endpoint cannot bind {addr}: {source}")]
    AdminBind {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Who this proxy is (from the manifest's `node`).
pub struct Node {
    pub workload: Arc<str>,
}

/// What changes on reload, apart from the listeners' own configs.
pub struct Snapshot {
    pub manifest: Manifest,
    pub clusters: HashMap<String, Arc<Cluster>>,
    pub filters: FilterSet,
}

/// A listener's settings and compiled routes, swapped as a whole on reload.
pub struct ListenerConfig {
    pub spec: ListenerSpec,
    pub routes: RouteTable,
    pub tcp_cluster: Option<Arc<Cluster>>,
    /// mTLS termination (`tls` block), if any.
    pub tls: Option<Arc<crate::tls::ServerTls>>,
    /// Public TLS termination (`public_tls` block), if any.
    pub public_tls: Option<Arc<crate::tls::public::PublicTls>>,
    /// `tls_passthrough`: (server name patterns, cluster), first match wins.
    pub sni_routes: Vec<(Vec<String>, Arc<Cluster>)>,
}

/// A listener for the life of the process (its socket cannot change on reload).
pub struct ListenerRuntime {
    pub name: Arc<str>,
    pub address: SocketAddr,
    pub protocol: ListenerProtocol,
    pub direction: Direction,
    pub current: ArcSwap<ListenerConfig>,
}

/// Process-wide state shared by workers, the admin endpoint and the reloader.
pub struct Shared {
    pub config: ArcSwap<Snapshot>,
    pub listeners: Vec<Arc<ListenerRuntime>>,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    /// OTLP trace export (off unless configured).
    pub tracing: crate::telemetry::otel::Tracing,
    pub node: Node,
    /// The label value for unknown peers and workloads.
    pub unknown: Arc<str>,
    /// The `response_flags` label value of a request without flags.
    pub no_flags: Arc<str>,
    pub filters: Arc<FilterHost>,
    pub manifest_path: PathBuf,
    pub workers: usize,
    pub ready: AtomicBool,
    pub draining: AtomicBool,
    pub last_reload_error: std::sync::Mutex<Option<String>>,
    reload_lock: tokio::sync::Mutex<()>,
}

impl Shared {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.config.load_full()
    }
}

/// What a started proxy tells its caller.
pub struct Started {
    pub shared: Arc<Shared>,
    pub admin_addr: SocketAddr,
}

/// Load the manifest, bind everything, serve until `shutdown` resolves, then drain.
/// `on_start` is called once every listener is bound and the proxy is ready.
pub async fn run(
    manifest_path: &Path,
    shutdown: impl Future<Output = ()>,
    on_start: impl FnOnce(&Started),
) -> Result<(), StartError> {
    crate::tls::install_crypto_provider();
    crate::memory::spawn_idle_trim();
    let manifest = config::load(manifest_path)?;
    for w in config::warnings(&manifest) {
        tracing::warn!(manifest = %manifest_path.display(), "{w}");
    }
    let workers = manifest
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let metrics = Metrics::new(
        manifest.metrics.request_metrics_prefix == config::RequestMetricsPrefix::Istio,
    );
    let access_log = AccessLog::start(&manifest.access_log, metrics.clone())?;
    let tracing = crate::telemetry::otel::Tracing::start(
        manifest.tracing.as_ref(),
        manifest.node.workload.as_deref(),
        &metrics,
    )
    .map_err(|e| StartError::Build(e.to_string()))?;
    let callout = Arc::new(ClusterCallout::default());
    let filters = {
        let mut reg = metrics
            .registry
            .lock()
            .map_err(|_| StartError::Build("metrics registry poisoned".into()))?;
        FilterHost::new(&manifest.filter_engine, workers, &mut reg, callout.clone())
            .map_err(|e| StartError::Build(format!("filter engine: {e}")))?
    };

    let (snapshot, listener_configs) = build(
        &manifest,
        manifest_path.parent(),
        None,
        &metrics,
        workers,
        &filters,
    )
    .await
    .map_err(|errs| StartError::Build(errs.join("\n")))?;

    // Bind every listener before serving anything: a port in use fails the start, clearly.
    let mut listeners = Vec::new();
    let mut sockets: Vec<Vec<(usize, std::net::TcpListener)>> =
        (0..workers).map(|_| Vec::new()).collect();
    for (idx, (spec, lc)) in manifest.listeners.iter().zip(listener_configs).enumerate() {
        let addr: SocketAddr = spec.address.parse().map_err(|_| StartError::Bind {
            name: spec.name.clone(),
            addr: spec.address.clone(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not IP:PORT"),
        })?;
        let socks =
            crate::listener::bind_reuseport(addr, workers).map_err(|source| StartError::Bind {
                name: spec.name.clone(),
                addr: spec.address.clone(),
                source,
            })?;
        let bound = socks
            .first()
            .and_then(|s| s.local_addr().ok())
            .unwrap_or(addr);
        for (w, s) in socks.into_iter().enumerate() {
            sockets[w].push((idx, s));
        }
        listeners.push(Arc::new(ListenerRuntime {
            name: Arc::from(spec.name.as_str()),
            address: bound,
            protocol: spec.protocol,
            direction: spec.direction,
            current: ArcSwap::from_pointee(lc),
        }));
    }

    let admin_addr: SocketAddr = manifest.admin.address.parse().map_err(|_| {
        StartError::Build(format!(
            "admin.address `{}` is not IP:PORT",
            manifest.admin.address
        ))
    })?;
    let admin_listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .map_err(|source| StartError::AdminBind {
            addr: manifest.admin.address.clone(),
            source,
        })?;
    let admin_addr = admin_listener.local_addr()?;

    let drain_timeout = manifest.drain_timeout;
    let shared = Arc::new(Shared {
        node: Node {
            workload: Arc::from(manifest.node.workload.as_deref().unwrap_or("unknown")),
        },
        config: ArcSwap::from_pointee(snapshot),
        listeners,
        metrics,
        access_log,
        tracing,
        unknown: Arc::from("unknown"),
        no_flags: Arc::from("-"),
        filters: filters.clone(),
        manifest_path: manifest_path.to_path_buf(),
        workers,
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        last_reload_error: std::sync::Mutex::new(None),
        reload_lock: tokio::sync::Mutex::new(()),
    });
    let _ = callout.shared.set(Arc::downgrade(&shared));
    filters.activate(&shared.snapshot().filters);
    set_filter_routes(&shared);

    // Per listener, one connection limit shared by all workers.
    let limits: Vec<Arc<Semaphore>> = shared
        .listeners
        .iter()
        .map(|l| Arc::new(Semaphore::new(l.current.load().spec.limits.max_connections)))
        .collect();

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut threads = Vec::new();
    for (w, socks) in sockets.into_iter().enumerate() {
        let shared = shared.clone();
        let stop_rx = stop_rx.clone();
        let socks: Vec<_> = socks
            .into_iter()
            .map(|(idx, s)| (shared.listeners[idx].clone(), s, limits[idx].clone()))
            .collect();
        let t = std::thread::Builder::new()
            .name(format!("wasmesh-worker-{w}"))
            .spawn(move || {
                crate::cluster::set_worker_index(w);
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(worker = w, error = %e, "cannot start worker runtime");
                        return;
                    }
                };
                let local = tokio::task::LocalSet::new();
                local.block_on(
                    &rt,
                    crate::listener::run_worker(shared, socks, stop_rx, drain_timeout),
                );
            })?;
        threads.push(t);
    }

    tokio::spawn(crate::admin::serve(
        shared.clone(),
        admin_listener,
        stop_rx.clone(),
    ));
    tokio::spawn(crate::reload::watch(shared.clone(), stop_rx.clone()));

    shared.ready.store(filters.ready(), Ordering::SeqCst);
    on_start(&Started {
        shared: shared.clone(),
        admin_addr,
    });

    shutdown.await;
    tracing::info!(
        "shutting down: draining connections for up to {:?}",
        drain_timeout
    );
    shared.draining.store(true, Ordering::SeqCst);
    shared.ready.store(false, Ordering::SeqCst);
    let _ = stop_tx.send(true);
    tokio::task::spawn_blocking(move || {
        for t in threads {
            let _ = t.join();
        }
    })
    .await
    .map_err(|e| StartError::Build(format!("worker join: {e}")))?;
    // The workers are gone: their last spans are queued; send them before exiting.
    let tracing = shared.tracing.clone();
    let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
    Ok(())
}

/// Build the runtime configuration for a manifest: clusters (keeping unchanged ones from
/// `prev`), filters (all or nothing), and each listener's routes with their chains.
pub async fn build(
    manifest: &Manifest,
    manifest_dir: Option<&Path>,
    prev: Option<&Snapshot>,
    metrics: &Arc<Metrics>,
    workers: usize,
    filters: &Arc<FilterHost>,
) -> Result<(Snapshot, Vec<ListenerConfig>), Vec<String>> {
    let mut clusters = HashMap::new();
    let mut tls_errors = Vec::new();
    for spec in &manifest.clusters {
        let reused = prev
            .and_then(|p| p.clusters.get(&spec.name))
            .filter(|c| c.same_spec(spec, &manifest.node.locality))
            .cloned();
        let c = match reused {
            Some(c) => c,
            None => {
                // Originating mTLS: load the cluster's certificate now (a bad file fails the
                // load or reload) and watch it for rotation while the cluster lives.
                let tls = match &spec.tls {
                    None => None,
                    Some(t) => match crate::tls::ClientTls::new(
                        &spec.name,
                        t,
                        spec.protocol == config::UpstreamProtocol::Http2,
                        manifest_dir,
                        metrics.clone(),
                    ) {
                        Ok(t) => {
                            crate::tls::watch::spawn(&(t.clone() as Arc<dyn crate::tls::Rotate>));
                            Some(t)
                        }
                        Err(e) => {
                            tls_errors.push(format!("cluster `{}`: {e}", spec.name));
                            continue;
                        }
                    },
                };
                let c = Cluster::new(spec, workers, metrics.clone(), tls, &manifest.node.locality)
                    .await;
                c.spawn_dns_refresh();
                c
            }
        };
        clusters.insert(spec.name.clone(), c);
    }
    if !tls_errors.is_empty() {
        return Err(tls_errors);
    }
    let names: HashSet<String> = clusters.keys().cloned().collect();
    // A relative filter_dir is relative to the manifest's directory, so a manifest and its
    // filters can move together (a ConfigMap and a volume beside it).
    let filter_dir = manifest.filter_dir.as_ref().map(|d| match manifest_dir {
        Some(base) if d.is_relative() => base.join(d),
        _ => d.clone(),
    });
    let filter_set = filters
        .prepare(filter_dir.as_deref(), &manifest.filters, &names)
        .await?;

    let mut listener_configs = Vec::new();
    let mut errors = Vec::new();
    for l in &manifest.listeners {
        let default_chain = l.filters.clone();
        let chain_for = |names: Option<&Vec<String>>| -> Result<Chain, String> {
            filter_set.chain(names.unwrap_or(&default_chain))
        };
        let routes = match RouteTable::build(&l.name, &l.routes, &clusters, &chain_for) {
            Ok(r) => r,
            Err(e) => {
                errors.push(e);
                continue;
            }
        };
        // Terminating mTLS: the listener's certificate, watched for rotation.
        let tls = match &l.tls {
            None => None,
            Some(t) => {
                match crate::tls::ServerTls::new(&l.name, t, manifest_dir, metrics.clone()) {
                    Ok(t) => {
                        crate::tls::watch::spawn(&(t.clone() as Arc<dyn crate::tls::Rotate>));
                        Some(t)
                    }
                    Err(e) => {
                        errors.push(format!("listener `{}`: {e}", l.name));
                        continue;
                    }
                }
            }
        };
        let public_tls = match &l.public_tls {
            None => None,
            Some(p) => {
                let alpn: &[&[u8]] = match l.protocol {
                    crate::config::ListenerProtocol::Http => &[b"h2", b"http/1.1"],
                    _ => &[],
                };
                match crate::tls::public::PublicTls::new(
                    &l.name,
                    p,
                    manifest_dir,
                    alpn,
                    metrics.clone(),
                ) {
                    Ok(t) => {
                        for c in &t.certs {
                            crate::tls::watch::spawn(&(c.clone() as Arc<dyn crate::tls::Rotate>));
                        }
                        Some(t)
                    }
                    Err(e) => {
                        errors.push(format!("listener `{}`: {e}", l.name));
                        continue;
                    }
                }
            }
        };
        let sni_routes = l
            .sni_routes
            .iter()
            .filter_map(|r| {
                let names = r
                    .server_names
                    .iter()
                    .map(|n| n.to_ascii_lowercase())
                    .collect();
                clusters.get(&r.cluster).map(|c| (names, c.clone()))
            })
            .collect();
        listener_configs.push(ListenerConfig {
            spec: l.clone(),
            routes,
            tcp_cluster: l.cluster.as_ref().and_then(|c| clusters.get(c).cloned()),
            tls,
            public_tls,
            sni_routes,
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok((
        Snapshot {
            manifest: manifest.clone(),
            clusters,
            filters: filter_set,
        },
        listener_configs,
    ))
}

/// Tell the filter host which routes use each filter (for `/filters`).
fn set_filter_routes(shared: &Shared) {
    let snap = shared.snapshot();
    let mut uses: HashMap<String, Vec<String>> = HashMap::new();
    for (li, l) in snap.manifest.listeners.iter().enumerate() {
        for (ri, r) in l.routes.iter().enumerate() {
            let route = r.name.clone().unwrap_or_else(|| format!("{}/{ri}", l.name));
            for f in r
                .filters
                .as_ref()
                .unwrap_or(&snap.manifest.listeners[li].filters)
            {
                uses.entry(f.clone()).or_default().push(route.clone());
            }
        }
    }
    for f in &snap.manifest.filters {
        shared
            .filters
            .set_routes(&f.name, uses.remove(&f.name).unwrap_or_default());
    }
}

/// Validate, build and swap in the manifest on disk. On any error the old config keeps
/// serving; the error is logged, counted and kept for the admin endpoint.
pub async fn reload(shared: &Arc<Shared>) -> Result<(), String> {
    let _guard = shared.reload_lock.lock().await;
    let result = reload_inner(shared).await;
    let label = ResultLabel {
        result: if result.is_ok() { "success" } else { "failure" },
    };
    shared.metrics.reloads.get_or_create(&label).inc();
    match &result {
        Ok(()) => {
            tracing::info!(manifest = %shared.manifest_path.display(), "manifest reloaded");
            if let Ok(mut e) = shared.last_reload_error.lock() {
                *e = None;
            }
        }
        Err(e) => {
            tracing::error!(manifest = %shared.manifest_path.display(), errors = %e, "manifest reload rejected; the previous configuration keeps serving");
            if let Ok(mut last) = shared.last_reload_error.lock() {
                *last = Some(e.clone());
            }
        }
    }
    result
}

async fn reload_inner(shared: &Arc<Shared>) -> Result<(), String> {
    let manifest = config::load(&shared.manifest_path).map_err(|e| e.to_string())?;
    for w in config::warnings(&manifest) {
        tracing::warn!(manifest = %shared.manifest_path.display(), "{w}");
    }
    let prev = shared.snapshot();
    if manifest == prev.manifest {
        return Ok(());
    }
    // Sockets and threads are fixed for the life of the process.
    let mut errs = Vec::new();
    if manifest.listeners.len() != shared.listeners.len() {
        errs.push("adding or removing listeners needs a restart".to_string());
    }
    for (i, (new, old)) in manifest
        .listeners
        .iter()
        .zip(prev.manifest.listeners.iter())
        .enumerate()
    {
        if new.name != old.name || new.address != old.address || new.protocol != old.protocol {
            errs.push(format!(
                "listeners[{i}]: changing a listener's name, address or protocol needs a restart"
            ));
        }
    }
    if manifest.workers != prev.manifest.workers {
        errs.push("changing `workers` needs a restart".into());
    }
    if manifest.admin != prev.manifest.admin
        || manifest.access_log != prev.manifest.access_log
        || manifest.metrics != prev.manifest.metrics
    {
        errs.push("changing `admin`, `access_log` or `metrics` needs a restart".into());
    }
    if manifest.filter_engine != prev.manifest.filter_engine {
        errs.push("changing `filter_engine` needs a restart".into());
    }
    if manifest.tracing != prev.manifest.tracing {
        errs.push("changing `tracing` needs a restart".into());
    }
    if !errs.is_empty() {
        return Err(errs.join("\n"));
    }
    let (snapshot, lcs) = build(
        &manifest,
        shared.manifest_path.parent(),
        Some(&prev),
        &shared.metrics,
        shared.workers,
        &shared.filters,
    )
    .await
    .map_err(|e| e.join("\n"))?;
    shared.filters.activate(&snapshot.filters);
    shared.config.store(Arc::new(snapshot));
    for (rt, lc) in shared.listeners.iter().zip(lcs) {
        rt.current.store(Arc::new(lc));
    }
    set_filter_routes(shared);
    Ok(())
}

/// Lets filters call out to the manifest's clusters (e.g. external auth, JWKS fetches).
#[derive(Default)]
pub struct ClusterCallout {
    shared: OnceLock<Weak<Shared>>,
}

/// Callout responses larger than this are refused.
const MAX_CALLOUT_RESPONSE: usize = 1024 * 1024;

impl Callout for ClusterCallout {
    fn call(
        &self,
        cluster: &str,
        req: http::Request<Bytes>,
        timeout: Duration,
    ) -> Pin<Box<dyn Future<Output = Result<http::Response<Bytes>, String>>>> {
        let shared = self.shared.get().and_then(Weak::upgrade);
        let cluster = cluster.to_string();
        Box::pin(async move {
            let shared = shared.ok_or("proxy is shutting down")?;
            let c = shared
                .snapshot()
                .clusters
                .get(&cluster)
                .cloned()
                .ok_or_else(|| format!("unknown cluster `{cluster}`"))?;
            let ep = c
                .pick(&Default::default())
                .ok_or_else(|| format!("cluster `{cluster}`: no healthy upstream"))?;
            let (mut parts, body) = req.into_parts();
            let pq = parts
                .uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".into());
            parts.uri = http::Uri::builder()
                .scheme("http")
                .authority(ep.authority.clone())
                .path_and_query(pq)
                .build()
                .map_err(|e| e.to_string())?;
            parts.version = match c.spec.protocol {
                config::UpstreamProtocol::Http1 => http::Version::HTTP_11,
                config::UpstreamProtocol::Http2 => http::Version::HTTP_2,
            };
            if !parts.headers.contains_key(http::header::HOST) {
                if let Ok(v) = http::HeaderValue::from_str(&cluster) {
                    parts.headers.insert(http::header::HOST, v);
                }
            }
            let req = http::Request::from_parts(parts, crate::proxy::full(body));
            let resp = tokio::time::timeout(timeout, c.pools().send(ep.addr, req))
                .await
                .map_err(|_| format!("callout to `{cluster}` timed out"))?
                .map_err(|e| format!("callout to `{cluster}` failed: {e}"))?;
            let (parts, body) = resp.into_parts();
            let body = http_body_util::Limited::new(body, MAX_CALLOUT_RESPONSE)
                .collect()
                .await
                .map_err(|e| format!("callout to `{cluster}`: reading the response: {e}"))?
                .to_bytes();
            Ok(http::Response::from_parts(parts, body))
        })
    }
}
