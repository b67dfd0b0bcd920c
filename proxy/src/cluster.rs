//! Clusters: named groups of upstream endpoints, their connection pools, load balancing and
//! endpoint health.
//!
//! A cluster resolves its endpoints (static IPs, or DNS names re-resolved on an interval),
//! picks one per request (weighted round robin, least-request with two choices, or a
//! consistent-hash ring), and owns one HTTP client (connection pool) per worker thread, as
//! Envoy does, so a connection is only ever driven by the thread that opened it. A shared
//! semaphore bounds the cluster's upstream connections across all workers: past it a
//! request fails fast with `UO` instead of queueing.
//!
//! Health (see `crate::health` for the state and the math): outlier detection ejects
//! endpoints from the outcomes the request path reports ([`Cluster::record_outcome`]);
//! active checks probe every endpoint from a background task; the balancer skips unhealthy
//! endpoints, fails over across locality priority levels, and spreads over every endpoint
//! in panic mode. While every endpoint is healthy and no locality or hashing is asked for,
//! picking is the plain round robin / least request it always was.

use crate::breaker::Breakers;
use crate::config::{ClusterSpec, LbPolicy, LocalitySpec};
use crate::health::{self, EndpointHealth};
use crate::lb::{self, Ring};
use crate::pool::ClusterPools;
use crate::telemetry::metrics::{ClusterLabel, ClusterReasonLabel, EndpointLabel, Metrics};
use crate::tls::ClientTls;
use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body type sent upstream and returned downstream.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// An endpoint address as written in the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointAddr {
    Ip(SocketAddr),
    Dns { host: String, port: u16 },
}

/// Parse `IP:PORT`, `[IPv6]:PORT` or `HOST:PORT`.
pub fn parse_endpoint_address(s: &str) -> Result<EndpointAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(EndpointAddr::Ip(a));
    }
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}` needs a port (HOST:PORT)"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| format!("`{port}` is not a port number"))?;
    let valid_host = !host.is_empty()
        && host.len() <= 253
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if !valid_host {
        return Err(format!("`{host}` is neither an IP address nor a DNS name"));
    }
    Ok(EndpointAddr::Dns {
        host: host.to_string(),
        port,
    })
}

/// One resolved upstream address.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `IP:PORT`, used as the pool key in the upstream request's URI.
    pub authority: http::uri::Authority,
    pub weight: u32,
    pub locality: LocalitySpec,
    /// Requests in flight to this endpoint (least-request balancing, `/clusters`).
    pub active: AtomicUsize,
    pub total: AtomicUsize,
    /// Outlier detection and active health-check state.
    pub health: EndpointHealth,
}

/// What a request tells the load balancer about itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct PickContext<'a> {
    /// Endpoints this request already tried: a retry prefers another one.
    pub tried: &'a [SocketAddr],
    /// Hash of the request's affinity key, for hashing load balancers.
    pub hash: Option<u64>,
    /// The region this request should be served from (an override or the client's location).
    pub region: Option<&'a str>,
}

/// How one upstream attempt ended, as the load balancer's health tracking sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamOutcome {
    /// The upstream answered with this status.
    Response(u16),
    /// The connection could not be made (refused, connect timeout, TLS handshake).
    ConnectFailure,
    /// The connection broke before or during the response head.
    Reset,
    /// No response head before the (per-try) timeout.
    Timeout,
}

/// The endpoints currently in use, a precomputed weighted round-robin schedule, each
/// endpoint's locality priority level (relative to this proxy's locality) and the hash ring.
struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    schedule: Vec<u32>,
    levels: Vec<u8>,
    ring: Option<Ring>,
}

pub struct Cluster {
    pub name: Arc<str>,
    pub spec: ClusterSpec,
    label: ClusterLabel,
    /// `upstream_rq_active` for this cluster, looked up once: every attempt moves it twice.
    rq_active: prometheus_client::metrics::gauge::Gauge,
    set: ArcSwap<EndpointSet>,
    rr: AtomicUsize,
    /// Connection pools, one per worker thread.
    pools: Arc<ClusterPools>,
    metrics: Arc<Metrics>,
    /// Limits on requests, pending requests and retries in flight.
    pub breakers: Arc<Breakers>,
    /// This proxy's locality (`node.locality`): the first priority level of `locality_lb`.
    node_locality: LocalitySpec,
    /// Opens health-check connections (same TLS and connection limit as requests).
    connector: Connector,
    /// Health times are milliseconds since this instant.
    epoch: Instant,
    /// Endpoints not healthy at the last look: 0 lets `pick` take the plain fast path. May
    /// overstate (an ejection that just ran out), never understate for long.
    degraded: AtomicUsize,
    /// Serialises ejection decisions (rare) so `max_ejection_percent` holds exactly.
    eject_lock: Mutex<()>,
}

thread_local! {
    /// Index of the data-plane worker running on this thread; `usize::MAX` elsewhere.
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// Mark the current thread as data-plane worker `i` (selects its connection pools).
pub fn set_worker_index(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// The data-plane worker running on this thread, `usize::MAX` on other threads.
pub fn worker_index() -> usize {
    WORKER.with(|w| w.get())
}

/// An endpoint's priority level: 0 same zone, 1 same region, 2 elsewhere (with
/// `locality_lb`; otherwise all 0). A request's `region` puts that region first and shifts
/// the rest down one level, unless it is this proxy's own region under `locality_lb`.
fn level_of(ep: &LocalitySpec, node: &LocalitySpec, locality_lb: bool, region: Option<&str>) -> u8 {
    let same_zone = ep.region == node.region && node.zone.is_some() && ep.zone == node.zone;
    let base = if !locality_lb || node.region.is_none() || same_zone {
        0
    } else if ep.region == node.region {
        1
    } else {
        2
    };
    match region {
        Some(r) if !(locality_lb && node.region.as_deref() == Some(r)) => {
            if ep.region.as_deref() == Some(r) {
                0
            } else {
                base + 1
            }
        }
        _ => base,
    }
}

impl Cluster {
    /// Build a cluster and resolve its endpoints once. DNS failures leave the cluster without
    /// endpoints (requests get 503 `UH`) until a refresh succeeds; they do not fail the load.
    /// `tls`: originate mTLS with this client config (the cluster's `tls` block). `node`:
    /// this proxy's locality. With active health checks, the first check of every endpoint
    /// has finished (passed, failed or timed out) when this returns, so a new cluster starts
    /// serving with its endpoints' health known rather than all of them unhealthy.
    pub async fn new(
        spec: &ClusterSpec,
        workers: usize,
        metrics: Arc<Metrics>,
        tls: Option<Arc<ClientTls>>,
        node: &LocalitySpec,
    ) -> Arc<Self> {
        let name: Arc<str> = Arc::from(spec.name.as_str());
        let label = Metrics::cluster_label(&name);
        let limit = Arc::new(Semaphore::new(spec.circuit_breakers.max_connections));
        let connector = Connector {
            timeout: spec.connect_timeout,
            limit,
            metrics: metrics.clone(),
            label: label.clone(),
            tls,
        };
        let breakers = Arc::new(Breakers::new(&spec.circuit_breakers));
        let pools = Arc::new(ClusterPools::new(
            workers,
            breakers.clone(),
            connector.clone(),
            spec.protocol,
            spec.idle_timeout,
            spec.max_idle_per_endpoint
                .unwrap_or(spec.circuit_breakers.max_connections),
        ));
        let rq_active = metrics.upstream_rq_active.get_or_create(&label).clone();
        let cluster = Arc::new(Cluster {
            name,
            spec: spec.clone(),
            rq_active,
            label,
            set: ArcSwap::from_pointee(EndpointSet {
                endpoints: Vec::new(),
                schedule: Vec::new(),
                levels: Vec::new(),
                ring: None,
            }),
            rr: AtomicUsize::new(0),
            pools,
            metrics,
            breakers,
            node_locality: node.clone(),
            connector,
            epoch: Instant::now(),
            degraded: AtomicUsize::new(0),
            eject_lock: Mutex::new(()),
        });
        cluster.resolve().await;
        if cluster.spec.health_check.is_some() {
            cluster.check_all().await;
            cluster.spawn_health_checks();
        }
        if cluster.spec.outlier_detection.is_some() {
            cluster.spawn_outlier_sweep();
        }
        cluster
    }

    /// Whether this cluster was built from the same spec and node locality (so a reload can
    /// keep it, pools, health and all).
    pub fn same_spec(&self, spec: &ClusterSpec, node: &LocalitySpec) -> bool {
        &self.spec == spec && &self.node_locality == node
    }

    pub fn has_dns_endpoints(&self) -> bool {
        self.spec.endpoints.iter().any(|e| {
            matches!(
                parse_endpoint_address(&e.address),
                Ok(EndpointAddr::Dns { .. })
            )
        })
    }

    /// Whether endpoints' health is tracked (and exported per endpoint).
    fn tracks_health(&self) -> bool {
        self.spec.health_check.is_some() || self.spec.outlier_detection.is_some()
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn endpoint_label(&self, e: &Endpoint) -> EndpointLabel {
        EndpointLabel {
            cluster: self.name.clone(),
            endpoint: Arc::from(e.addr.to_string()),
        }
    }

    /// Resolve every endpoint again; keeps the previous addresses of a name that fails to resolve.
    pub async fn resolve(&self) {
        let old = self.set.load();
        let mut endpoints: Vec<Arc<Endpoint>> = Vec::new();
        for ep in &self.spec.endpoints {
            let addrs: Vec<SocketAddr> = match parse_endpoint_address(&ep.address) {
                Ok(EndpointAddr::Ip(a)) => vec![a],
                Ok(EndpointAddr::Dns { host, port }) => {
                    match tokio::net::lookup_host((host.as_str(), port)).await {
                        Ok(it) => it.collect(),
                        Err(e) => {
                            tracing::warn!(cluster = %self.name, endpoint = %ep.address, error = %e, "DNS resolution failed; keeping previous addresses");
                            old.endpoints
                                .iter()
                                .filter(|o| o.weight == ep.weight && o.locality == ep.locality)
                                .map(|o| o.addr)
                                .collect()
                        }
                    }
                }
                Err(_) => Vec::new(), // validated at load
            };
            for addr in addrs {
                if endpoints.iter().any(|e| e.addr == addr) {
                    continue;
                }
                // Keep the existing object (and its counters and health) when the address is unchanged.
                let existing = old
                    .endpoints
                    .iter()
                    .find(|o| o.addr == addr && o.weight == ep.weight);
                let e = match existing {
                    Some(e) => e.clone(),
                    None => match http::uri::Authority::try_from(addr.to_string().as_str()) {
                        Ok(authority) => Arc::new(Endpoint {
                            addr,
                            authority,
                            weight: ep.weight,
                            locality: ep.locality.clone(),
                            active: AtomicUsize::new(0),
                            total: AtomicUsize::new(0),
                            health: EndpointHealth::new(self.spec.health_check.is_some()),
                        }),
                        Err(_) => continue,
                    },
                };
                endpoints.push(e);
            }
        }
        if self.tracks_health() {
            // Series of endpoints that left go with them: one series per endpoint at most.
            for o in &old.endpoints {
                if !endpoints.iter().any(|e| e.addr == o.addr) {
                    self.metrics
                        .endpoint_healthy
                        .remove(&self.endpoint_label(o));
                }
            }
        }
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight).collect();
        let schedule = smooth_wrr_schedule(&weights);
        let levels = endpoints
            .iter()
            .map(|e| {
                level_of(
                    &e.locality,
                    &self.node_locality,
                    self.spec.locality_lb,
                    None,
                )
            })
            .collect();
        let ring = (self.spec.lb_policy == LbPolicy::RingHash).then(|| {
            let keys: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
            let size = self
                .spec
                .ring_hash
                .as_ref()
                .map(|r| r.minimum_ring_size)
                .unwrap_or(1024);
            Ring::build(&keys, &weights, size)
        });
        self.set.store(Arc::new(EndpointSet {
            endpoints,
            schedule,
            levels,
            ring,
        }));
        self.refresh_health();
    }

    /// Re-resolve DNS endpoints every `dns_refresh_rate` while the cluster is alive.
    pub fn spawn_dns_refresh(self: &Arc<Self>) {
        if !self.has_dns_endpoints() {
            return;
        }
        let weak = Arc::downgrade(self);
        let every = self.spec.dns_refresh_rate;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                match weak.upgrade() {
                    Some(c) => c.resolve().await,
                    None => return,
                }
            }
        });
    }

    /// Recount unhealthy endpoints (the fast-path hint), clear ejections that ran out, and
    /// set the health gauges.
    fn refresh_health(&self) {
        let now = self.now_ms();
        let set = self.set.load();
        let mut unhealthy = 0;
        let mut ejected = 0;
        for e in &set.endpoints {
            let until = e.health.ejected_until.load(Ordering::Relaxed);
            if until != 0 && until <= now {
                e.health.ejected_until.store(0, Ordering::Relaxed);
            }
            if e.health.is_ejected(now) {
                ejected += 1;
            }
            let healthy = e.health.is_healthy(now);
            if !healthy {
                unhealthy += 1;
            }
            if self.tracks_health() {
                self.metrics
                    .endpoint_healthy
                    .get_or_create(&self.endpoint_label(e))
                    .set(i64::from(healthy));
            }
        }
        self.degraded.store(unhealthy, Ordering::Relaxed);
        if self.spec.outlier_detection.is_some() {
            self.metrics
                .outlier_ejections_active
                .get_or_create(&self.label)
                .set(ejected);
        }
    }

    /// Check every endpoint once, concurrently; each check is bounded by the check timeout.
    async fn check_all(&self) {
        let Some(spec) = &self.spec.health_check else {
            return;
        };
        let set = self.set.load_full();
        let host = spec.host.clone().unwrap_or_else(|| self.spec.name.clone());
        let checks = set.endpoints.iter().map(|e| {
            let host = host.as_str();
            async move {
                let r =
                    health::probe(&self.connector, e.addr, spec, host, self.spec.protocol).await;
                self.metrics
                    .health_check_attempts
                    .get_or_create(&self.label)
                    .inc();
                if let Err(err) = &r {
                    self.metrics
                        .health_check_failures
                        .get_or_create(&self.label)
                        .inc();
                    tracing::debug!(cluster = %self.name, endpoint = %e.addr, error = %err, "health check failed");
                }
                if health::apply_check(&e.health, r.is_ok(), spec) {
                    let state = if r.is_ok() { "healthy" } else { "unhealthy" };
                    tracing::info!(cluster = %self.name, endpoint = %e.addr, state, "health check changed the endpoint's state");
                }
            }
        });
        futures_util::future::join_all(checks).await;
        self.refresh_health();
    }

    /// Check every endpoint each `interval` (plus up to `interval_jitter`) while the cluster
    /// is alive: the task holds a weak reference, so a reload that drops the cluster stops it.
    fn spawn_health_checks(self: &Arc<Self>) {
        let Some(spec) = &self.spec.health_check else {
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        let (interval, jitter) = (spec.interval, spec.interval_jitter);
        tokio::spawn(async move {
            loop {
                let extra = if jitter.is_zero() {
                    Duration::ZERO
                } else {
                    jitter.mul_f64(rand::random::<f64>())
                };
                tokio::time::sleep(interval + extra).await;
                match weak.upgrade() {
                    Some(c) => c.check_all().await,
                    None => return,
                }
            }
        });
    }

    /// Every `interval` (outlier detection's): success-rate ejections. More often (at most a
    /// second apart): ejections that ran out come back, gauges are refreshed.
    fn spawn_outlier_sweep(self: &Arc<Self>) {
        let Some(od) = &self.spec.outlier_detection else {
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        let interval = od.interval;
        let tick = interval.min(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut last_eval = Instant::now();
            loop {
                tokio::time::sleep(tick).await;
                let Some(c) = weak.upgrade() else { return };
                if last_eval.elapsed() >= interval {
                    last_eval = Instant::now();
                    c.evaluate_success_rate();
                }
                c.refresh_health();
            }
        });
    }

    /// Envoy's success-rate ejection over the interval's counts, which start over.
    fn evaluate_success_rate(&self) {
        let Some(od) = &self.spec.outlier_detection else {
            return;
        };
        let set = self.set.load();
        let mut rates = Vec::new();
        for (i, e) in set.endpoints.iter().enumerate() {
            let total = e.health.interval_total.swap(0, Ordering::Relaxed);
            let ok = e.health.interval_success.swap(0, Ordering::Relaxed);
            if total >= od.success_rate_request_volume && total > 0 {
                rates.push((i, ok as f64 * 100.0 / total as f64));
            }
        }
        for i in health::success_rate_outliers(
            &rates,
            od.success_rate_minimum_hosts,
            od.success_rate_stdev_factor,
        ) {
            if let Some(e) = set.endpoints.get(i) {
                self.eject(e, "success_rate");
            }
        }
    }

    /// Choose an endpoint for a request.
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<Arc<Endpoint>> {
        let set = self.set.load();
        let n = set.endpoints.len();
        if n == 0 {
            return None;
        }
        let plain = self.degraded.load(Ordering::Relaxed) == 0
            && !self.spec.locality_lb
            && ctx.region.is_none()
            && self.spec.lb_policy != LbPolicy::RingHash;
        if !plain {
            return self.pick_balanced(&set, ctx);
        }
        if n == 1 {
            return set.endpoints.first().cloned();
        }
        if !ctx.tried.is_empty() {
            // A retry: an endpoint not tried yet, by weight, if there is one.
            let untried: Vec<&Arc<Endpoint>> = set
                .endpoints
                .iter()
                .filter(|e| !ctx.tried.contains(&e.addr))
                .collect();
            let total: u64 = untried.iter().map(|e| u64::from(e.weight)).sum();
            if total > 0 {
                let mut r = rand::random_range(0..total);
                for e in untried {
                    if r < u64::from(e.weight) {
                        return Some(e.clone());
                    }
                    r -= u64::from(e.weight);
                }
            }
        }
        self.pick_one(&set, n)
    }

    /// The full balancer: health, locality priority levels, panic mode, hashing.
    fn pick_balanced(&self, set: &EndpointSet, ctx: &PickContext<'_>) -> Option<Arc<Endpoint>> {
        let now = self.now_ms();
        let eps = &set.endpoints;
        let n = eps.len();
        let healthy: Vec<bool> = eps.iter().map(|e| e.health.is_healthy(now)).collect();
        let region_levels: Vec<u8>;
        let levels: &[u8] = match ctx.region {
            None => &set.levels,
            Some(r) => {
                region_levels = eps
                    .iter()
                    .map(|e| {
                        level_of(
                            &e.locality,
                            &self.node_locality,
                            self.spec.locality_lb,
                            Some(r),
                        )
                    })
                    .collect();
                &region_levels
            }
        };
        let healthy_n = healthy.iter().filter(|h| **h).count();
        // Panic mode (Envoy): too few healthy endpoints to carry the load, so use them all
        // rather than overload the few left.
        let panic = self.spec.healthy_panic_threshold > 0.0
            && (healthy_n as f64) * 100.0 < self.spec.healthy_panic_threshold * n as f64;
        let level = if panic {
            self.metrics
                .lb_healthy_panic
                .get_or_create(&self.label)
                .inc();
            None
        } else {
            if healthy_n == 0 {
                return None;
            }
            let nlevels = levels.iter().copied().max().unwrap_or(0) as usize + 1;
            let mut counts = vec![(0usize, 0usize); nlevels];
            for (l, h) in levels.iter().zip(&healthy) {
                if let Some(c) = counts.get_mut(*l as usize) {
                    c.1 += 1;
                    if *h {
                        c.0 += 1;
                    }
                }
            }
            let loads = lb::priority_loads(&counts);
            // A hashed request draws its level from its hash, so it stays put while health does.
            let draw = match ctx.hash {
                Some(h) => h % 100,
                None => rand::random_range(0..100),
            };
            lb::level_for(&loads, draw)
        };
        let eligible = |i: usize| -> bool {
            panic
                || (healthy.get(i).copied().unwrap_or(false)
                    && level.is_some()
                    && levels.get(i).map(|l| *l as usize) == level)
        };
        // A retry prefers endpoints it has not tried yet.
        let fresh =
            |i: usize| eligible(i) && eps.get(i).is_some_and(|e| !ctx.tried.contains(&e.addr));
        let prefer_fresh = !ctx.tried.is_empty() && (0..n).any(fresh);
        let ok = |i: usize| {
            if prefer_fresh {
                fresh(i)
            } else {
                eligible(i)
            }
        };
        let idx = match (self.spec.lb_policy, &set.ring, ctx.hash) {
            // Walk clockwise past unhealthy endpoints: only the keys they owned move.
            (LbPolicy::RingHash, Some(ring), Some(h)) => ring.walk(h).find(|i| ok(*i)),
            (LbPolicy::LeastRequest, _, _) => {
                let cands: Vec<usize> = (0..n).filter(|i| ok(*i)).collect();
                let a = cands
                    .get(rand::random_range(0..cands.len().max(1)))
                    .copied();
                let b = cands
                    .get(rand::random_range(0..cands.len().max(1)))
                    .copied();
                let load = |i: usize| {
                    eps.get(i).map_or(u64::MAX, |e| {
                        (e.active.load(Ordering::Relaxed) as u64 + 1) * 1000
                            / u64::from(e.weight.max(1))
                    })
                };
                match (a, b) {
                    (Some(a), Some(b)) if load(b) < load(a) => Some(b),
                    (a, _) => a,
                }
            }
            _ => {
                // Weighted round robin over the eligible endpoints.
                let cands: Vec<usize> = (0..n).filter(|i| ok(*i)).collect();
                let total: u64 = cands
                    .iter()
                    .filter_map(|i| eps.get(*i))
                    .map(|e| u64::from(e.weight))
                    .sum();
                if total == 0 {
                    None
                } else {
                    let mut r = self.rr.fetch_add(1, Ordering::Relaxed) as u64 % total;
                    let mut chosen = None;
                    for i in cands {
                        let w = eps.get(i).map_or(0, |e| u64::from(e.weight));
                        if r < w {
                            chosen = Some(i);
                            break;
                        }
                        r -= w;
                    }
                    chosen
                }
            }
        };
        idx.and_then(|i| eps.get(i).cloned())
    }

    /// Record how an attempt to `endpoint` ended (passive health: outlier detection). On the
    /// request path: atomics only, and no write at all for a success after a success.
    pub fn record_outcome(&self, endpoint: &Endpoint, outcome: UpstreamOutcome) {
        let Some(od) = &self.spec.outlier_detection else {
            return;
        };
        let h = &endpoint.health;
        let (is_5xx, is_gateway) = health::classify(outcome);
        if od.success_rate_stdev_factor > 0 {
            h.interval_total.fetch_add(1, Ordering::Relaxed);
            if !is_5xx {
                h.interval_success.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !is_5xx {
            if h.consecutive_5xx.load(Ordering::Relaxed) != 0 {
                h.consecutive_5xx.store(0, Ordering::Relaxed);
            }
            if h.consecutive_gateway.load(Ordering::Relaxed) != 0 {
                h.consecutive_gateway.store(0, Ordering::Relaxed);
            }
            return;
        }
        let gateway = if is_gateway {
            h.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            h.consecutive_gateway.store(0, Ordering::Relaxed);
            0
        };
        let fives = h.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
        // Gateway failures first, as Envoy checks them.
        if od.consecutive_gateway_failure > 0 && gateway >= od.consecutive_gateway_failure {
            self.eject(endpoint, "consecutive_gateway_failure");
        } else if od.consecutive_5xx > 0 && fives >= od.consecutive_5xx {
            self.eject(endpoint, "consecutive_5xx");
        }
    }

    /// Eject `e` unless it already is or `max_ejection_percent` would be exceeded (checked
    /// before this ejection, as Envoy does, so one endpoint can always be ejected).
    fn eject(&self, e: &Endpoint, reason: &'static str) {
        let Some(od) = &self.spec.outlier_detection else {
            return;
        };
        let _guard = match self.eject_lock.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let h = &e.health;
        // Whatever the verdict, it takes a fresh run of failures to try again.
        h.consecutive_5xx.store(0, Ordering::Relaxed);
        h.consecutive_gateway.store(0, Ordering::Relaxed);
        let now = self.now_ms();
        if h.is_ejected(now) {
            return;
        }
        let set = self.set.load();
        let total = set.endpoints.len().max(1);
        let ejected = set
            .endpoints
            .iter()
            .filter(|o| o.health.is_ejected(now))
            .count();
        if (ejected as f64) * 100.0 / total as f64 >= od.max_ejection_percent {
            tracing::debug!(cluster = %self.name, endpoint = %e.addr, reason, "not ejected: max_ejection_percent reached");
            return;
        }
        let times = h.times_ejected.fetch_add(1, Ordering::Relaxed) + 1;
        let duration =
            health::ejection_duration(od.base_ejection_time, od.max_ejection_time, times);
        h.ejected_until
            .store(now + duration.as_millis().max(1) as u64, Ordering::Relaxed);
        self.metrics
            .outlier_ejections
            .get_or_create(&ClusterReasonLabel {
                cluster: self.name.clone(),
                reason,
            })
            .inc();
        tracing::info!(cluster = %self.name, endpoint = %e.addr, reason, times, duration = ?duration, "endpoint ejected");
        self.refresh_health();
    }

    fn pick_one(&self, set: &EndpointSet, n: usize) -> Option<Arc<Endpoint>> {
        match self.spec.lb_policy {
            // Ring hash without a key spreads like round robin (Envoy picks at random);
            // hashed requests never come here.
            LbPolicy::RoundRobin | LbPolicy::RingHash => {
                let i = self.rr.fetch_add(1, Ordering::Relaxed) % set.schedule.len().max(1);
                let idx = set.schedule.get(i).copied().unwrap_or(0) as usize;
                set.endpoints.get(idx).cloned()
            }
            LbPolicy::LeastRequest => {
                // Power of two choices: the one with fewer requests in flight per unit of weight.
                let a = rand::random_range(0..n);
                let mut b = rand::random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (&set.endpoints[a], &set.endpoints[b]);
                let load = |e: &Endpoint| {
                    (e.active.load(Ordering::Relaxed) as u64 + 1) * 1000 / e.weight as u64
                };
                Some(if load(eb) < load(ea) {
                    eb.clone()
                } else {
                    ea.clone()
                })
            }
        }
    }

    /// A raw connection to `addr` for TCP proxying, through the cluster's connector:
    /// connection limit, connect timeout, mTLS origination and connection metrics.
    pub async fn connect_stream(&self, addr: SocketAddr) -> Result<UpstreamConn, ConnectError> {
        self.pools.connector().connect(addr).await
    }

    /// The cluster's connection pools. Requests must be sent from a worker thread.
    pub fn pools(&self) -> &Arc<ClusterPools> {
        &self.pools
    }

    pub fn label(&self) -> &ClusterLabel {
        &self.label
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// This cluster's `upstream_rq_active` gauge.
    pub fn rq_active(&self) -> &prometheus_client::metrics::gauge::Gauge {
        &self.rq_active
    }

    /// State for the admin endpoint's `/clusters`.
    pub fn status_json(&self) -> serde_json::Value {
        let set = self.set.load();
        let now = self.now_ms();
        let endpoints: Vec<serde_json::Value> = set
            .endpoints
            .iter()
            .zip(&set.levels)
            .map(|(e, level)| {
                let h = &e.health;
                let until = h.ejected_until.load(Ordering::Relaxed);
                let state = if h.check_failed.load(Ordering::Relaxed) {
                    "unhealthy"
                } else if h.is_ejected(now) {
                    "ejected"
                } else {
                    "healthy"
                };
                let mut v = serde_json::json!({
                    "address": e.addr.to_string(),
                    "weight": e.weight,
                    "locality": e.locality,
                    "health": state,
                    "active_requests": e.active.load(Ordering::Relaxed),
                    "total_requests": e.total.load(Ordering::Relaxed),
                });
                if self.spec.locality_lb {
                    v["priority"] = serde_json::json!(level);
                }
                if self.spec.outlier_detection.is_some() {
                    v["times_ejected"] = serde_json::json!(h.times_ejected.load(Ordering::Relaxed));
                    if h.is_ejected(now) {
                        let left = Duration::from_millis(until.saturating_sub(now));
                        v["ejected_until"] = serde_json::json!(
                            crate::telemetry::access_log::rfc3339(SystemTime::now() + left)
                        );
                    }
                }
                if self.spec.health_check.is_some() {
                    v["health_check"] = serde_json::json!({
                        "passing": !h.check_failed.load(Ordering::Relaxed),
                        "checked": h.checked.load(Ordering::Relaxed),
                    });
                }
                v
            })
            .collect();
        let healthy = set
            .endpoints
            .iter()
            .filter(|e| e.health.is_healthy(now))
            .count();
        serde_json::json!({
            "name": &*self.name,
            "lb_policy": self.spec.lb_policy,
            "protocol": self.spec.protocol,
            "healthy_endpoints": healthy,
            "panic": self.spec.healthy_panic_threshold > 0.0
                && (healthy as f64) * 100.0
                    < self.spec.healthy_panic_threshold * set.endpoints.len() as f64,
            "endpoints": endpoints,
        })
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A cluster rebuilt by a reload sets its series again on its next health tick.
        if self.tracks_health() {
            for e in &self.set.load().endpoints {
                self.metrics
                    .endpoint_healthy
                    .remove(&self.endpoint_label(e));
            }
        }
    }
}

/// Endpoint indices in the order smooth weighted round robin (nginx's algorithm) visits
/// them, so weights spread evenly rather than in bursts. Weights are scaled so one cycle
/// stays short.
fn smooth_wrr_schedule(weights: &[u32]) -> Vec<u32> {
    if weights.is_empty() {
        return Vec::new();
    }
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u64> = weights.iter().map(|x| (*x / g) as u64).collect();
    let total: u64 = w.iter().sum();
    const MAX_CYCLE: u64 = 10_000;
    if total > MAX_CYCLE {
        for x in w.iter_mut() {
            *x = (*x * MAX_CYCLE / total).max(1);
        }
    }
    let total: i64 = w.iter().sum::<u64>() as i64;
    let mut current = vec![0i64; w.len()];
    let mut out = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for i in 0..w.len() {
            current[i] += w[i] as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        out.push(best as u32);
    }
    out
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Why an upstream connection could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("upstream connection limit reached")]
    Overflow,
    #[error("too many requests waiting for an upstream connection")]
    PendingOverflow,
    #[error("upstream connect timeout")]
    Timeout,
    #[error("upstream connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("upstream address is not IP:PORT")]
    BadAddress,
    #[error("upstream TLS handshake failed ({reason}): {source}")]
    Tls {
        reason: &'static str,
        source: std::io::Error,
    },
}

/// Opens upstream TCP connections: connect timeout, TCP_NODELAY, the cluster's connection
/// limit, mTLS when the cluster originates it, and connection metrics that follow the
/// connection's life.
#[derive(Clone)]
pub struct Connector {
    timeout: Duration,
    limit: Arc<Semaphore>,
    metrics: Arc<Metrics>,
    label: ClusterLabel,
    tls: Option<Arc<ClientTls>>,
}

impl Connector {
    /// Count a request refused by `max_pending_requests`.
    pub fn pending_overflow(&self) {
        self.metrics
            .upstream_rq_pending_overflow
            .get_or_create(&self.label)
            .inc();
    }

    /// Count a request waiting for a new upstream connection (none was free) until the
    /// returned guard drops: `wasmesh_upstream_rq_pending_active` / `_total`.
    pub fn pending(&self) -> PendingGuard {
        self.metrics
            .upstream_rq_pending_total
            .get_or_create(&self.label)
            .inc();
        let gauge = self
            .metrics
            .upstream_rq_pending_active
            .get_or_create(&self.label)
            .clone();
        gauge.inc();
        PendingGuard(gauge)
    }

    /// Open a connection to `addr`, holding a slot of the cluster's connection limit.
    pub async fn connect(&self, addr: SocketAddr) -> Result<UpstreamConn, ConnectError> {
        let permit = match self.limit.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                self.metrics
                    .upstream_cx_overflow
                    .get_or_create(&self.label)
                    .inc();
                return Err(ConnectError::Overflow);
            }
        };
        let stream = match tokio::time::timeout(self.timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                self.metrics
                    .upstream_cx_connect_fail
                    .get_or_create(&self.label)
                    .inc();
                return Err(ConnectError::Io(e));
            }
            Err(_) => {
                self.metrics
                    .upstream_cx_connect_fail
                    .get_or_create(&self.label)
                    .inc();
                return Err(ConnectError::Timeout);
            }
        };
        let _ = stream.set_nodelay(true);
        let mut peer_identity = None;
        let stream = match &self.tls {
            None => MaybeTls::Plain(stream),
            Some(tls) => {
                // The handshake shares the connect timeout: a peer that accepts TCP but never
                // finishes TLS is a connect failure like any other.
                let hs = tls.connector().connect(tls.server_name(addr), stream);
                let r = match tokio::time::timeout(self.timeout, hs).await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "TLS handshake timed out",
                    )),
                };
                match r {
                    Ok(s) => {
                        peer_identity =
                            crate::tls::peer_identity(s.get_ref().1.peer_certificates());
                        MaybeTls::Tls(Box::new(s))
                    }
                    Err(source) => {
                        let reason = if source.kind() == std::io::ErrorKind::TimedOut {
                            "timeout"
                        } else {
                            crate::tls::failure_reason(&source)
                        };
                        self.metrics
                            .upstream_tls_handshake_failures
                            .get_or_create(&ClusterReasonLabel {
                                cluster: self.label.cluster.clone(),
                                reason,
                            })
                            .inc();
                        self.metrics
                            .upstream_cx_connect_fail
                            .get_or_create(&self.label)
                            .inc();
                        tracing::warn!(cluster = %self.label.cluster, upstream = %addr, reason, error = %source, "upstream TLS handshake failed");
                        return Err(ConnectError::Tls { reason, source });
                    }
                }
            }
        };
        self.metrics
            .upstream_cx_total
            .get_or_create(&self.label)
            .inc();
        let gauge = self
            .metrics
            .upstream_cx_active
            .get_or_create(&self.label)
            .clone();
        gauge.inc();
        Ok(UpstreamConn {
            io: TokioIo::new(stream),
            _permit: permit,
            gauge,
            peer_identity,
        })
    }
}

/// A request waiting for an upstream connection; see [`Connector::pending`].
pub struct PendingGuard(prometheus_client::metrics::gauge::Gauge);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A connection that is plain TCP or TLS over it: upstream connections (`UpstreamIo`) and, in `crate::listener`, downstream ones. The TLS
/// stream is boxed: it is large, and the plain case is the common one.
pub enum MaybeTls<P, T> {
    Plain(P),
    Tls(Box<T>),
}

/// An upstream connection.
pub type UpstreamIo = MaybeTls<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

impl<P, T> tokio::io::AsyncRead for MaybeTls<P, T>
where
    P: tokio::io::AsyncRead + Unpin,
    T: tokio::io::AsyncRead + Unpin,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<P, T> tokio::io::AsyncWrite for MaybeTls<P, T>
where
    P: tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncWrite + Unpin,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }
    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(s) => s.is_write_vectored(),
            MaybeTls::Tls(s) => s.is_write_vectored(),
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream TCP connection holding its slot in the cluster's connection limit.
    pub struct UpstreamConn {
        #[pin]
        io: TokioIo<UpstreamIo>,
        _permit: OwnedSemaphorePermit,
        gauge: prometheus_client::metrics::gauge::Gauge,
        // The upstream's SPIFFE ID (mTLS clusters only).
        pub peer_identity: Option<Arc<str>>,
    }
    impl PinnedDrop for UpstreamConn {
        fn drop(this: Pin<&mut Self>) {
            this.gauge.dec();
        }
    }
}

impl UpstreamConn {
    /// The TCP socket under TLS (if any): its readiness tells whether the upstream has
    /// sent anything (a close, most likely) while the connection sat idle in a pool.
    pub fn tcp(&self) -> &TcpStream {
        match self.io.inner() {
            MaybeTls::Plain(s) => s,
            MaybeTls::Tls(s) => s.get_ref().0,
        }
    }
}

// Tokio's traits too, for TCP proxying (`copy_bidirectional`).
impl tokio::io::AsyncRead for UpstreamConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(self.project().io.get_mut().inner_mut()).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for UpstreamConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(self.project().io.get_mut().inner_mut()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.project().io.get_mut().inner_mut()).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(self.project().io.get_mut().inner_mut()).poll_shutdown(cx)
    }
}

impl hyper::rt::Read for UpstreamConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl hyper::rt::Write for UpstreamConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().io.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrr_spreads_by_weight() {
        let s = smooth_wrr_schedule(&[5, 1, 1]);
        assert_eq!(s.len(), 7);
        assert_eq!(s.iter().filter(|&&i| i == 0).count(), 5);
        // smooth: the heavy endpoint never runs more than 3 times in a row here
        assert_eq!(s, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn endpoint_addresses() {
        assert!(matches!(
            parse_endpoint_address("127.0.0.1:80"),
            Ok(EndpointAddr::Ip(_))
        ));
        assert!(matches!(
            parse_endpoint_address("[::1]:80"),
            Ok(EndpointAddr::Ip(_))
        ));
        assert!(matches!(
            parse_endpoint_address("svc.ns.local:8080"),
            Ok(EndpointAddr::Dns { .. })
        ));
        assert!(parse_endpoint_address("svc").is_err());
        assert!(parse_endpoint_address("bad host:1").is_err());
    }
}
