//! Upstream connection pools: one per cluster per worker thread.
//!
//! A worker only ever uses the connections it opened (as in Envoy), so a pool needs no
//! cross-thread coordination: each worker's pool sits behind its own mutex, which only that
//! worker takes (uncontended). HTTP/1.1 keeps a stack of idle connections per endpoint (the
//! most recently used first, so idle ones age out); HTTP/2 keeps one multiplexed connection
//! per endpoint. The cluster-wide `max_connections` limit is a semaphore the connector
//! holds a permit of for each open connection.
//!
//! Written for the request path rather than taken from hyper-util's generic client: the
//! generic pool hashes a (scheme, authority) key under a shared lock and spawns a
//! bookkeeping task per request, which was a measurable share of a proxied request's CPU.

use crate::breaker::Breakers;
use crate::cluster::{Body, ConnectError, Connector, UpstreamConn};
use crate::config::UpstreamProtocol;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use rustc_hash::FxHashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
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
    /// Connections are driven by worker threads' event loops; other threads cannot use them.
    #[error("upstream requests are sent from worker threads only")]
    NotOnWorker,
}

enum Sender {
    H1(http1::SendRequest<Body>, Peer),
    H2(http2::SendRequest<Body>, Peer),
}

/// The SPIFFE ID the upstream presented on this connection (mTLS clusters), kept with the
/// connection so each response can say who answered it.
type Peer = Option<Arc<str>>;

#[derive(Default)]
struct EndpointConns {
    /// HTTP/1.1: the pooled connections (idle or still reading a response) and when each
    /// was last handed a request.
    idle: Vec<(http1::SendRequest<Body>, Instant, Peer)>,
    /// HTTP/2: the shared connection.
    h2: Option<(http2::SendRequest<Body>, Peer)>,
}

#[derive(Default)]
struct WorkerPool {
    endpoints: FxHashMap<SocketAddr, EndpointConns>,
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

    /// Take a usable connection to `addr`: a pooled one, or a new one.
    async fn checkout(&self, addr: SocketAddr) -> Result<Sender, PoolError> {
        let now = Instant::now();
        if let Ok(mut p) = self.pool().lock() {
            let ep = p.endpoints.entry(addr).or_default();
            match self.protocol {
                UpstreamProtocol::Http1 => {
                    // The pool holds busy connections too (put back as soon as their
                    // response headers arrived): take the most recent one that is ready
                    // for a new request, and drop the closed and the expired ones.
                    let mut i = ep.idle.len();
                    while i > 0 {
                        i -= 1;
                        let (sr, since, _) = &ep.idle[i];
                        if sr.is_closed() {
                            ep.idle.swap_remove(i);
                        } else if sr.is_ready() {
                            if now.duration_since(*since) < self.idle_timeout {
                                let (sr, _, peer) = ep.idle.swap_remove(i);
                                return Ok(Sender::H1(sr, peer));
                            }
                            // Idle too long: dropping the sender closes the connection.
                            ep.idle.swap_remove(i);
                        }
                    }
                }
                UpstreamProtocol::Http2 => {
                    if let Some((sr, peer)) = &ep.h2 {
                        if !sr.is_closed() {
                            return Ok(Sender::H2(sr.clone(), peer.clone()));
                        }
                        ep.h2 = None;
                    }
                }
            }
        }
        self.connect(addr).await
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Sender, PoolError> {
        // A request waiting for its connection is "pending" (Envoy's term): bounded, so a
        // slow-to-accept upstream cannot pile up connecting requests.
        let Some(_pending) = self.breakers.pending.try_enter() else {
            self.connector.pending_overflow();
            return Err(PoolError::Connect(ConnectError::PendingOverflow));
        };
        let _gauge = self.connector.pending();
        let io: UpstreamConn = self.connector.connect(addr).await?;
        let peer = io.peer_identity.clone();
        match self.protocol {
            UpstreamProtocol::Http1 => {
                let (sr, conn) = http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(PoolError::Handshake)?;
                tokio::task::spawn_local(async move {
                    // Upgrades (WebSocket) need the connection to hand over its socket.
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(upstream = %addr, error = %e, "upstream connection closed with an error");
                    }
                });
                Ok(Sender::H1(sr, peer))
            }
            UpstreamProtocol::Http2 => {
                let (sr, conn) = http2::Builder::new(crate::listener::LocalExec)
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_while_idle(true)
                    .handshake(io)
                    .await
                    .map_err(PoolError::Handshake)?;
                tokio::task::spawn_local(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(upstream = %addr, error = %e, "upstream h2 connection closed with an error");
                    }
                });
                if let Ok(mut p) = self.pool().lock() {
                    p.endpoints.entry(addr).or_default().h2 = Some((sr.clone(), peer.clone()));
                }
                Ok(Sender::H2(sr, peer))
            }
        }
    }

    fn put_back(&self, addr: SocketAddr, sr: http1::SendRequest<Body>, peer: Peer) {
        if let Ok(mut p) = self.pool().lock() {
            let ep = p.endpoints.entry(addr).or_default();
            if ep.idle.len() < self.max_idle {
                ep.idle.push((sr, Instant::now(), peer));
            }
        }
    }

    /// Send a request to `addr`. A pooled HTTP/1.1 connection that turns out to have been
    /// closed by the upstream before our request went out is retried once on a new one
    /// (the request was never sent, so this is safe for any method).
    pub async fn send(
        self: &std::sync::Arc<Self>,
        addr: SocketAddr,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, PoolError> {
        if crate::cluster::worker_index() == usize::MAX {
            return Err(PoolError::NotOnWorker);
        }
        let mut req = req;
        for attempt in 0..2 {
            match self.checkout(addr).await? {
                Sender::H2(mut sr, peer) => {
                    return match sr.try_send_request(req).await {
                        Ok(r) => Ok(with_peer(r, peer)),
                        Err(mut e) => match e.take_message() {
                            Some(r) if attempt == 0 => {
                                // The connection went away under us: forget it and retry.
                                if let Ok(mut p) = self.pool().lock() {
                                    if let Some(ep) = p.endpoints.get_mut(&addr) {
                                        ep.h2 = None;
                                    }
                                }
                                req = r;
                                continue;
                            }
                            _ => Err(PoolError::Send(e.into_error())),
                        },
                    };
                }
                Sender::H1(mut sr, peer) => match sr.try_send_request(req).await {
                    Ok(resp) => {
                        // Back in the pool at once: it stays busy (not `is_ready`) until
                        // the response body has been read, and checkout skips it until
                        // then. Cheaper than a task per request waiting for it.
                        self.put_back(addr, sr, peer.clone());
                        return Ok(with_peer(resp, peer));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(r) if attempt == 0 => {
                            req = r;
                            continue;
                        }
                        _ => return Err(PoolError::Send(e.into_error())),
                    },
                },
            }
        }
        unreachable_send()
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
fn with_peer(mut resp: Response<Incoming>, peer: Peer) -> Response<Incoming> {
    if let Some(id) = peer {
        resp.extensions_mut()
            .insert(crate::tls::UpstreamIdentity(id));
    }
    resp
}

/// The retry loop above always returns inside its second iteration.
fn unreachable_send() -> Result<Response<Incoming>, PoolError> {
    Err(PoolError::Connect(ConnectError::BadAddress))
}
