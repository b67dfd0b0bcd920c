//! Upstream connection pools: one per cluster per worker thread.
//!
//! A worker only ever uses the connections it opened (as in Envoy), so a pool needs no
//! cross-thread coordination: each worker's pool sits behind its own mutex, which only that
//! worker takes (uncontended). HTTP/1.1 keeps a stack of idle connections per endpoint (the
//! most recently used first, so idle ones age out), driven by the requests' own tasks
//! (`crate::h1`); HTTP/2 keeps one multiplexed connection per endpoint, driven by hyper.
//! The cluster-wide `max_connections` limit is a semaphore the connector holds a permit of
//! for each open connection.
//!
//! Written for the request path rather than taken from hyper-util's generic client: the
//! generic pool hashes a (scheme, authority) key under a shared lock and spawns a
//! bookkeeping task per request, which was a measurable share of a proxied request's CPU.

use crate::breaker::Breakers;
use crate::cluster::{Body, BoxError, ConnectError, Connector, UpstreamConn};
use crate::config::UpstreamProtocol;
use crate::h1;
use crate::h2_streams::{StreamGuard, Streams, Tracked};
use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// Why an upstream request failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("upstream handshake failed: {0}")]
    Handshake(hyper::Error),
    #[error("upstream request failed: {0}")]
    Send(#[from] hyper::Error),
    #[error(transparent)]
    H1(#[from] h1::Error),
    /// Connections are driven by worker threads' event loops; other threads cannot use them.
    #[error("upstream requests are sent from worker threads only")]
    NotOnWorker,
}

/// The SPIFFE ID the upstream presented on this connection (mTLS clusters), kept with the
/// connection so each response can say who answered it.
type Peer = Option<Arc<str>>;

#[derive(Default)]
struct EndpointConns {
    /// HTTP/1.1: the idle connections and when each was put back, the most recent last.
    idle: Vec<(h1::Conn, Instant)>,
    /// HTTP/2: the shared connection.
    h2: Option<H2Conn>,
}

/// An endpoint's HTTP/2 connection, with what the sweeper needs to close it once it has
/// had no request in progress for the cluster's `idle_timeout`.
struct H2Conn {
    send: http2::SendRequest<Body>,
    peer: Peer,
    /// Requests in progress on it (until their response bodies are dropped), and since
    /// when there have been none: as Envoy's `idle_timeout`, "no active streams", so a
    /// long response (a gRPC stream) keeps its connection however long it runs.
    streams: Arc<Streams>,
}

#[derive(Default)]
struct WorkerPool {
    endpoints: FxHashMap<SocketAddr, EndpointConns>,
    /// A sweeper task is scheduled for this pool's idle connections.
    sweeping: bool,
}

/// The pools of one cluster, one per worker thread (plus one for other threads).
pub struct ClusterPools {
    workers: Vec<Mutex<WorkerPool>>,
    breakers: std::sync::Arc<Breakers>,
    connector: Connector,
    protocol: UpstreamProtocol,
    idle_timeout: Duration,
    max_idle: usize,
}

impl ClusterPools {
    pub fn new(
        slots: usize,
        breakers: std::sync::Arc<Breakers>,
        connector: Connector,
        protocol: UpstreamProtocol,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        Self {
            workers: (0..slots.max(1))
                .map(|_| Mutex::new(WorkerPool::default()))
                .collect(),
            breakers,
            connector,
            protocol,
            idle_timeout,
            max_idle,
        }
    }

    pub fn connector(&self) -> &Connector {
        &self.connector
    }

    fn pool(&self) -> &Mutex<WorkerPool> {
        let i = crate::cluster::worker_index().min(self.workers.len() - 1);
        &self.workers[i]
    }

    /// A pooled HTTP/1.1 connection to `addr` that can take a request now, if any.
    fn idle_h1(&self, addr: SocketAddr) -> Option<h1::Conn> {
        let mut p = self.pool().lock().ok()?;
        let ep = p.endpoints.get_mut(&addr)?;
        let now = Instant::now();
        while let Some((mut conn, since)) = ep.idle.pop() {
            if now.duration_since(since) >= self.idle_timeout {
                // The most recent one is too old, so are all the others: dropping them
                // closes them.
                ep.idle.clear();
                return None;
            }
            if conn.is_usable() {
                return Some(conn);
            }
        }
        None
    }

    /// Open a connection to `addr`, as one pending request of the cluster.
    async fn open(&self, addr: SocketAddr) -> Result<UpstreamConn, PoolError> {
        // A request waiting for its connection is "pending" (Envoy's term): bounded, so a
        // slow-to-accept upstream cannot pile up connecting requests.
        let Some(_pending) = self.breakers.pending.try_enter() else {
            self.connector.pending_overflow();
            return Err(PoolError::Connect(ConnectError::PendingOverflow));
        };
        let _gauge = self.connector.pending();
        Ok(self.connector.connect(addr).await?)
    }

    /// The shared HTTP/2 connection to `addr`, opened if there is none.
    async fn h2(
        self: &std::sync::Arc<Self>,
        addr: SocketAddr,
    ) -> Result<(http2::SendRequest<Body>, Peer, StreamGuard), PoolError> {
        if let Ok(mut p) = self.pool().lock() {
            let ep = p.endpoints.entry(addr).or_default();
            if let Some(c) = &mut ep.h2 {
                if !c.send.is_closed() {
                    return Ok((c.send.clone(), c.peer.clone(), c.streams.enter()));
                }
                ep.h2 = None;
            }
        }
        let io = self.open(addr).await?;
        let peer = io.peer_identity.clone();
        let (sr, conn) = http2::Builder::new(crate::listener::LocalExec)
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            // As for HTTP/1.1 upstreams (`h1::MAX_HEAD`). hyper's default is 16 KiB, which
            // refused over HTTP/2 a response head the same upstream could send over
            // HTTP/1.1.
            .max_header_list_size(crate::h1::MAX_HEAD as u32)
            .handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        tokio::task::spawn_local(async move {
            if let Err(e) = conn.await {
                tracing::debug!(upstream = %addr, error = %e, "upstream h2 connection closed with an error");
            }
        });
        let streams = Streams::new();
        let guard = streams.enter();
        if let Ok(mut p) = self.pool().lock() {
            p.endpoints.entry(addr).or_default().h2 = Some(H2Conn {
                send: sr.clone(),
                peer: peer.clone(),
                streams,
            });
            self.ensure_sweeping(&mut p);
        }
        Ok((sr, peer, guard))
    }

    /// An HTTP/1.1 connection the request's exchange ended cleanly on: kept for the next
    /// request unless the pool is full.
    pub(crate) fn put_back_h1(self: &std::sync::Arc<Self>, addr: SocketAddr, conn: h1::Conn) {
        let Ok(mut p) = self.pool().lock() else {
            return;
        };
        let ep = p.endpoints.entry(addr).or_default();
        if ep.idle.len() >= self.max_idle {
            return;
        }
        let mut conn = conn;
        conn.release_buffer();
        ep.idle.push((conn, Instant::now()));
        self.ensure_sweeping(&mut p);
    }

    /// Start this worker's sweeper if it is not running (worker threads only: the
    /// sweeper is a task on the worker's event loop).
    fn ensure_sweeping(self: &std::sync::Arc<Self>, p: &mut WorkerPool) {
        if !p.sweeping && crate::cluster::worker_index() != usize::MAX {
            p.sweeping = true;
            tokio::task::spawn_local(self.clone().sweep());
        }
    }

    /// Close this worker's idle HTTP/1.1 connections that expired or that the upstream
    /// closed. Nothing polls an idle connection (requests drive them), so without this an
    /// upstream's close would leave the socket half-closed until the next request to that
    /// endpoint, or for ever once the endpoint gets none. HTTP/2 connections are let go
    /// once they have had no request in progress for the idle timeout (hyper's keep-alive
    /// PINGs would otherwise hold them for ever, also to endpoints no longer in the
    /// cluster); hyper closes one when the pool lets go of it, and the next request opens
    /// a new one. Runs while the pool holds connections, one pass per half idle timeout,
    /// so a connection closes between one and one and a half timeouts after its last
    /// request ended.
    async fn sweep(self: std::sync::Arc<Self>) {
        let every = (self.idle_timeout / 2).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            let Ok(mut p) = self.pool().lock() else {
                return;
            };
            let now = Instant::now();
            let idle_h2 = |c: &H2Conn| {
                c.streams
                    .idle_since()
                    .is_some_and(|t| t.elapsed() >= self.idle_timeout)
            };
            for ep in p.endpoints.values_mut() {
                ep.idle.retain_mut(|(conn, since)| {
                    now.duration_since(*since) < self.idle_timeout && conn.is_usable()
                });
                if ep
                    .h2
                    .as_ref()
                    .is_some_and(|c| c.send.is_closed() || idle_h2(c))
                {
                    ep.h2 = None;
                }
            }
            p.endpoints
                .retain(|_, ep| !ep.idle.is_empty() || ep.h2.is_some());
            if p.endpoints.is_empty() {
                p.sweeping = false;
                return;
            }
        }
    }

    /// Send a request to `addr`. HTTP/2: a connection that went away before our request
    /// went out is replaced once (the request was never sent, so this is safe for any
    /// method). HTTP/1.1: an idempotent request without a streamed body that meets a
    /// pooled connection the upstream had just closed goes again once on a new one.
    pub async fn send(
        self: &std::sync::Arc<Self>,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<UpBody>, PoolError> {
        if crate::cluster::worker_index() == usize::MAX {
            return Err(PoolError::NotOnWorker);
        }
        match self.protocol {
            UpstreamProtocol::Http1 => self.send_h1(addr, req).await,
            UpstreamProtocol::Http2 => self.send_h2(addr, req).await,
        }
    }

    async fn send_h1(
        self: &std::sync::Arc<Self>,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<UpBody>, PoolError> {
        let (parts, body) = req.into_parts();
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::TRACE
                | Method::PUT
                | Method::DELETE
        );
        let mut out = h1::Outgoing::new(&parts, body);
        // The head is encoded: its header map serves a later message.
        crate::header_pool::give(parts.headers);
        let mut conn = match self.idle_h1(addr) {
            Some(c) => c,
            None => h1::Conn::new(self.open(addr).await?),
        };
        let mut retried = false;
        loop {
            let peer = conn.peer().clone();
            let home = h1::Home {
                pools: self.clone(),
                addr,
            };
            match h1::exchange(conn, out, home).await {
                Ok(resp) => return Ok(with_peer(resp.map(UpBody::H1), peer)),
                Err(failed) => match failed.retry {
                    Some(again) if idempotent && !retried => {
                        tracing::debug!(upstream = %addr, error = %failed.error, "pooled connection was closed; sending again on a new one");
                        retried = true;
                        out = again;
                        conn = h1::Conn::new(self.open(addr).await?);
                    }
                    _ => return Err(PoolError::H1(failed.error)),
                },
            }
        }
    }

    async fn send_h2(
        self: &std::sync::Arc<Self>,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<UpBody>, PoolError> {
        let mut req = req;
        for attempt in 0..2 {
            // The request is in progress on the connection until its response body is
            // dropped (or it fails: the guard goes with it).
            let (mut sr, peer, guard) = self.h2(addr).await?;
            match sr.try_send_request(req).await {
                Ok(r) => {
                    let r = r.map(|b| UpBody::H2(Tracked::new(b, guard)));
                    return Ok(with_peer(r, peer));
                }
                Err(mut e) => match e.take_message() {
                    Some(r) if attempt == 0 => {
                        // The connection went away under us: forget it and retry.
                        if let Ok(mut p) = self.pool().lock() {
                            if let Some(ep) = p.endpoints.get_mut(&addr) {
                                ep.h2 = None;
                            }
                        }
                        req = r;
                    }
                    _ => return Err(PoolError::Send(e.into_error())),
                },
            }
        }
        Err(PoolError::Connect(ConnectError::BadAddress))
    }

    /// Send a request that asks for a protocol switch (WebSocket) on a connection of its
    /// own, through hyper's client, which hands the socket over once the upstream agrees.
    /// The connection is never pooled: after a switch it belongs to the tunnel.
    pub async fn send_upgrade(
        self: &std::sync::Arc<Self>,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<UpBody>, PoolError> {
        if self.protocol == UpstreamProtocol::Http2 {
            return self.send(addr, req).await;
        }
        if crate::cluster::worker_index() == usize::MAX {
            return Err(PoolError::NotOnWorker);
        }
        let io = self.open(addr).await?;
        let peer = io.peer_identity.clone();
        let (mut sr, conn) = http1::Builder::new()
            .handshake(io)
            .await
            .map_err(PoolError::Handshake)?;
        tokio::task::spawn_local(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(upstream = %addr, error = %e, "upstream connection closed with an error");
            }
        });
        let resp = sr.send_request(req).await?;
        Ok(with_peer(resp.map(UpBody::Hyper), peer))
    }

    /// Idle connections held by this worker's pool (for `/clusters`).
    pub fn idle_connections(&self) -> usize {
        self.workers
            .iter()
            .filter_map(|w| w.lock().ok())
            .map(|p| {
                p.endpoints
                    .values()
                    .map(|e| e.idle.len() + usize::from(e.h2.is_some()))
                    .sum::<usize>()
            })
            .sum()
    }
}

/// Tell the request path who answered (an `Arc` clone; nothing for plaintext clusters).
fn with_peer(mut resp: Response<UpBody>, peer: Peer) -> Response<UpBody> {
    if let Some(id) = peer {
        resp.extensions_mut()
            .insert(crate::tls::UpstreamIdentity(id));
    }
    resp
}

/// A response body from an upstream: read by the request's task (HTTP/1.1) or handed over
/// by hyper (HTTP/2, protocol switches).
pub enum UpBody {
    H1(h1::ResponseBody),
    /// From a pooled HTTP/2 connection: the request stays in progress on it until dropped.
    H2(Tracked<Incoming>),
    /// From hyper's client (upgrades, on connections of their own).
    Hyper(Incoming),
}

impl http_body::Body for UpBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpBody::H1(b) => Pin::new(b).poll_frame(cx),
            UpBody::H2(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            UpBody::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::H1(b) => b.is_end_stream(),
            UpBody::H2(b) => b.is_end_stream(),
            UpBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::H1(b) => b.size_hint(),
            UpBody::H2(b) => b.size_hint(),
            UpBody::Hyper(b) => b.size_hint(),
        }
    }
}
