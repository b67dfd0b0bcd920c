//! Clusters: named groups of upstream endpoints, their connection pools and load balancing.
//!
//! A cluster resolves its endpoints (static IPs, or DNS names re-resolved on an interval),
//! picks one per request (weighted round robin or least-request with two choices), and owns
//! one HTTP client (connection pool) per worker thread, as Envoy does, so a connection is only
//! ever driven by the thread that opened it. A shared semaphore bounds the cluster's upstream
//! connections across all workers: past it a request fails fast with `UO` instead of queueing.

use crate::config::{ClusterSpec, LbPolicy, LocalitySpec};
use crate::pool::ClusterPools;
use crate::telemetry::metrics::{ClusterLabel, ClusterReasonLabel, Metrics};
use crate::tls::ClientTls;
use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
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

/// The endpoints currently in use and a precomputed weighted round-robin schedule.
struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    schedule: Vec<u32>,
}

pub struct Cluster {
    pub name: Arc<str>,
    pub spec: ClusterSpec,
    label: ClusterLabel,
    set: ArcSwap<EndpointSet>,
    rr: AtomicUsize,
    /// Connection pools, one per worker thread.
    pools: Arc<ClusterPools>,
    metrics: Arc<Metrics>,
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

impl Cluster {
    /// Build a cluster and resolve its endpoints once. DNS failures leave the cluster without
    /// endpoints (requests get 503 `UH`) until a refresh succeeds; they do not fail the load.
    /// `tls`: originate mTLS with this client config (the cluster's `tls` block).
    pub async fn new(
        spec: &ClusterSpec,
        workers: usize,
        metrics: Arc<Metrics>,
        tls: Option<Arc<ClientTls>>,
    ) -> Arc<Self> {
        let name: Arc<str> = Arc::from(spec.name.as_str());
        let label = Metrics::cluster_label(&name);
        let limit = Arc::new(Semaphore::new(spec.max_connections));
        let connector = Connector {
            timeout: spec.connect_timeout,
            limit,
            metrics: metrics.clone(),
            label: label.clone(),
            tls,
        };
        let pools = Arc::new(ClusterPools::new(
            workers,
            connector,
            spec.protocol,
            spec.idle_timeout,
            spec.max_idle_per_endpoint,
        ));
        let cluster = Arc::new(Cluster {
            name,
            spec: spec.clone(),
            label,
            set: ArcSwap::from_pointee(EndpointSet {
                endpoints: Vec::new(),
                schedule: Vec::new(),
            }),
            rr: AtomicUsize::new(0),
            pools,
            metrics,
        });
        cluster.resolve().await;
        cluster
    }

    /// Whether this cluster was built from the same spec (so a reload can keep it, pools and all).
    pub fn same_spec(&self, spec: &ClusterSpec) -> bool {
        &self.spec == spec
    }

    pub fn has_dns_endpoints(&self) -> bool {
        self.spec.endpoints.iter().any(|e| {
            matches!(
                parse_endpoint_address(&e.address),
                Ok(EndpointAddr::Dns { .. })
            )
        })
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
                // Keep the existing object (and its counters) when the address is unchanged.
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
                        }),
                        Err(_) => continue,
                    },
                };
                endpoints.push(e);
            }
        }
        let schedule = smooth_wrr_schedule(&endpoints.iter().map(|e| e.weight).collect::<Vec<_>>());
        self.set.store(Arc::new(EndpointSet {
            endpoints,
            schedule,
        }));
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

    /// Choose an endpoint for a request.
    pub fn pick(&self, ctx: &PickContext<'_>) -> Option<Arc<Endpoint>> {
        let set = self.set.load();
        let n = set.endpoints.len();
        if n == 0 {
            return None;
        }
        if n == 1 {
            return set.endpoints.first().cloned();
        }
        if !ctx.tried.is_empty() {
            // A retry: a few more draws to find an endpoint not yet tried, else any.
            let mut first = None;
            for _ in 0..n.min(4) {
                let e = self.pick_one(&set, n)?;
                if !ctx.tried.contains(&e.addr) {
                    return Some(e);
                }
                first.get_or_insert(e);
            }
            return first;
        }
        self.pick_one(&set, n)
    }

    /// Record how an attempt to `endpoint` ended (passive health: outlier detection).
    pub fn record_outcome(&self, _endpoint: &Endpoint, _outcome: UpstreamOutcome) {}

    fn pick_one(&self, set: &EndpointSet, n: usize) -> Option<Arc<Endpoint>> {
        match self.spec.lb_policy {
            LbPolicy::RoundRobin => {
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

    /// State for the admin endpoint's `/clusters`.
    pub fn status_json(&self) -> serde_json::Value {
        let set = self.set.load();
        serde_json::json!({
            "name": &*self.name,
            "lb_policy": self.spec.lb_policy,
            "protocol": self.spec.protocol,
            "endpoints": set.endpoints.iter().map(|e| serde_json::json!({
                "address": e.addr.to_string(),
                "weight": e.weight,
                "locality": e.locality,
                "health": "healthy",
                "active_requests": e.active.load(Ordering::Relaxed),
                "total_requests": e.total.load(Ordering::Relaxed),
            })).collect::<Vec<_>>(),
        })
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

/// An upstream connection: plain TCP, or TLS over it.
pub enum MaybeTls {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl tokio::io::AsyncRead for MaybeTls {
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

impl tokio::io::AsyncWrite for MaybeTls {
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
        io: TokioIo<MaybeTls>,
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
