//! Listeners: sockets, worker threads, and the life of a downstream connection.
//!
//! Each worker is one thread with a single-threaded Tokio runtime. Every listener gets one
//! `SO_REUSEPORT` socket per worker, so the kernel spreads connections over workers and a
//! connection, and each request on it, stays on the thread that accepted it (no work
//! stealing, no cross-thread wakeups, thread-local filter instances). This is nginx's and
//! Envoy's model, and what lets `workers: 1` be compared with one nginx worker.

use crate::cluster::Cluster;
use crate::config::{ListenerLimits, ListenerProtocol};
use crate::proxy::{self, ConnInfo};
use crate::server::{ListenerRuntime, Shared};
use crate::telemetry::metrics::{ListenerLabel, ReasonLabel};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

/// Bind `count` sockets to one address with `SO_REUSEPORT`. Port 0 picks a free port once;
/// every socket then shares it.
pub fn bind_reuseport(
    addr: SocketAddr,
    count: usize,
) -> std::io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(count);
    let mut addr = addr;
    for _ in 0..count.max(1) {
        let domain = socket2::Domain::for_address(addr);
        let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        s.set_tcp_nodelay(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        let l: std::net::TcpListener = s.into();
        addr = l.local_addr()?;
        out.push(l);
    }
    Ok(out)
}

/// Runs the futures hyper spawns (HTTP/2 streams) on the worker's own thread.
#[derive(Clone, Copy)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// Run one worker: accept on its sockets until shutdown, then drain its connections.
pub async fn run_worker(
    shared: Arc<Shared>,
    sockets: Vec<(Arc<ListenerRuntime>, std::net::TcpListener, Arc<Semaphore>)>,
    shutdown: watch::Receiver<bool>,
    drain_timeout: Duration,
) {
    let mut conns = JoinSet::new();
    let mut accepts = JoinSet::new();
    for (listener, socket, limit) in sockets {
        let tl = match TcpListener::from_std(socket) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(listener = %listener.name, error = %e, "cannot register listener socket");
                continue;
            }
        };
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        accepts.spawn_local(accept_loop(listener, tl, limit, shutdown.clone(), tx));
        conns.spawn_local(spawn_conns(shared.clone(), rx, shutdown.clone()));
    }
    // Accept loops end at shutdown (dropping their sockets: no new connections); the
    // connection tasks then finish their requests, bounded by the drain timeout.
    while accepts.join_next().await.is_some() {}
    if tokio::time::timeout(drain_timeout, async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
}

type Accepted = (
    Arc<ListenerRuntime>,
    TcpStream,
    SocketAddr,
    tokio::sync::OwnedSemaphorePermit,
);

async fn accept_loop(
    listener: Arc<ListenerRuntime>,
    tl: TcpListener,
    limit: Arc<Semaphore>,
    mut shutdown: watch::Receiver<bool>,
    tx: tokio::sync::mpsc::UnboundedSender<Accepted>,
) {
    loop {
        // Take a connection slot first: at the limit, new connections wait in the backlog.
        let permit = tokio::select! {
            p = limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            _ = shutdown.changed() => return,
        };
        let (stream, peer) = tokio::select! {
            r = tl.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = %listener.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => return,
        };
        if tx.send((listener.clone(), stream, peer, permit)).is_err() {
            return;
        }
    }
}

/// Owns the connection tasks of one listener on one worker.
async fn spawn_conns(
    shared: Arc<Shared>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Accepted>,
    shutdown: watch::Receiver<bool>,
) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            next = rx.recv() => match next {
                Some((listener, stream, peer, permit)) => {
                    let shared = shared.clone();
                    let shutdown = shutdown.clone();
                    tasks.spawn_local(async move {
                        let label = ListenerLabel { listener: listener.name.clone() };
                        shared.metrics.downstream_cx_total.get_or_create(&label).inc();
                        let gauge = shared.metrics.downstream_cx_active.get_or_create(&label).clone();
                        gauge.inc();
                        match listener.protocol {
                            ListenerProtocol::Http => serve_http(shared, listener, stream, peer, shutdown).await,
                            ListenerProtocol::Tcp => serve_tcp(shared, listener, stream, peer, shutdown).await,
                        }
                        gauge.dec();
                        drop(permit);
                    });
                }
                None => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

fn http_builder(limits: &ListenerLimits) -> auto::Builder<LocalExec> {
    let mut b = auto::Builder::new(LocalExec);
    b.http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(limits.request_headers_timeout)
        // hyper answers 431 when the head outgrows its buffer or the header count.
        .max_buf_size((limits.max_request_headers_kb * 1024).max(8192))
        .max_headers(limits.max_headers_count);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size((limits.max_request_headers_kb * 1024) as u32)
        // Rapid reset (CVE-2023-44487): bound streams reset before we even saw them, and
        // streams our side had to reset because the peer misbehaved.
        .max_pending_accept_reset_streams(Some(50))
        .max_local_error_reset_streams(Some(256))
        .max_send_buf_size(256 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20))
        .enable_connect_protocol();
    b
}

async fn serve_http(
    shared: Arc<Shared>,
    listener: Arc<ListenerRuntime>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let local = stream.local_addr().unwrap_or(peer);
    let _ = stream.set_nodelay(true);
    let lc = listener.current.load_full();
    let activity = Arc::new(Activity::new());
    let mut conn_info = ConnInfo {
        peer,
        local,
        peer_identity: None,
        local_identity: None,
    };
    let Some(tls) = lc.tls.clone() else {
        let io = IdleIo {
            inner: stream,
            activity: activity.clone(),
        };
        return serve_http_conn(
            shared,
            listener,
            lc,
            TokioIo::new(io),
            conn_info,
            activity,
            shutdown,
        )
        .await;
    };
    // mTLS: told apart from plaintext by the first byte (a TLS record starts with 0x16, no
    // HTTP method does), then the handshake, both bounded by the header timeout so a
    // silent client cannot hold a connection slot.
    let limit = lc.spec.limits.request_headers_timeout;
    let refuse = |reason: &'static str| {
        shared
            .metrics
            .tls_handshake_failures
            .get_or_create(&ReasonLabel {
                listener: listener.name.clone(),
                reason,
            })
            .inc();
    };
    let mut first = [0u8; 1];
    let is_tls = match tokio::time::timeout(limit, stream.peek(&mut first)).await {
        Ok(Ok(1)) => first[0] == crate::tls::TLS_HANDSHAKE_BYTE,
        Ok(_) => return, // closed before sending anything
        Err(_) => {
            refuse("timeout");
            return;
        }
    };
    let io = IdleIo {
        inner: stream,
        activity: activity.clone(),
    };
    if !is_tls {
        if tls.mode == crate::config::TlsMode::Permissive {
            return serve_http_conn(
                shared,
                listener,
                lc,
                TokioIo::new(io),
                conn_info,
                activity,
                shutdown,
            )
            .await;
        }
        tracing::debug!(listener = %listener.name, %peer, "plaintext connection to a strict mTLS listener refused");
        refuse("plaintext");
        return;
    }
    let tls_stream = match tokio::time::timeout(limit, tls.acceptor().accept(io)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = crate::tls::failure_reason(&e);
            // The error names the certificate problem, never key material.
            tracing::info!(listener = %listener.name, %peer, reason, error = %e, "TLS handshake refused");
            refuse(reason);
            return;
        }
        Err(_) => {
            refuse("timeout");
            return;
        }
    };
    shared
        .metrics
        .tls_handshakes
        .get_or_create(&ListenerLabel {
            listener: listener.name.clone(),
        })
        .inc();
    conn_info.peer_identity = crate::tls::peer_identity(tls_stream.get_ref().1.peer_certificates());
    conn_info.local_identity = Some(tls.identity());
    serve_http_conn(
        shared,
        listener,
        lc,
        TokioIo::new(tls_stream),
        conn_info,
        activity,
        shutdown,
    )
    .await
}

/// Serve HTTP/1.1 and HTTP/2 on an accepted (and, for TLS listeners, decrypted) connection
/// until it ends, goes idle or the worker drains.
async fn serve_http_conn<I>(
    shared: Arc<Shared>,
    listener: Arc<ListenerRuntime>,
    lc: Arc<crate::server::ListenerConfig>,
    io: I,
    conn_info: ConnInfo,
    activity: Arc<Activity>,
    mut shutdown: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = conn_info.peer;
    let idle_timeout = lc.spec.limits.idle_timeout;
    let svc_shared = shared.clone();
    let svc_listener = listener.clone();
    let svc = service_fn(move |req| {
        proxy::handle(
            svc_shared.clone(),
            svc_listener.clone(),
            conn_info.clone(),
            req,
        )
    });
    let builder = http_builder(&lc.spec.limits);
    let mut conn = pin!(builder.serve_connection_with_upgrades(io, svc));
    let mut draining = false;
    loop {
        let idle_at = activity.last() + idle_timeout;
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(listener = %listener.name, %peer, error = %e, "downstream connection ended with an error");
                    if let Some(reason) = classify_conn_error(&*e) {
                        shared.metrics.downstream_rq_rejected
                            .get_or_create(&ReasonLabel { listener: listener.name.clone(), reason })
                            .inc();
                    }
                }
                return;
            }
            _ = shutdown.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep_until(idle_at), if !draining => {
                if activity.last() + idle_timeout <= Instant::now() {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

fn classify_conn_error(
    e: &(dyn std::error::Error + Send + Sync + 'static),
) -> Option<&'static str> {
    let h = e.downcast_ref::<hyper::Error>()?;
    if h.is_parse_too_large() {
        Some("headers_too_large")
    } else if h.is_parse() {
        Some("bad_request")
    } else if h.is_timeout() {
        Some("header_timeout")
    } else {
        None
    }
}

/// Raw TCP: pick an endpoint of the listener's cluster, connect, splice both ways until
/// either side closes or nothing moves for the idle timeout.
async fn serve_tcp(
    shared: Arc<Shared>,
    listener: Arc<ListenerRuntime>,
    stream: TcpStream,
    peer: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let lc = listener.current.load_full();
    let Some(cluster): Option<Arc<Cluster>> = lc.tcp_cluster.clone() else {
        return;
    };
    shared
        .metrics
        .tcp_cx_total
        .get_or_create(&ListenerLabel {
            listener: listener.name.clone(),
        })
        .inc();
    let Some(endpoint) = cluster.pick(&Default::default()) else {
        tracing::warn!(listener = %listener.name, cluster = %cluster.name, %peer, "no healthy upstream for tcp connection");
        return;
    };
    let upstream = match tokio::time::timeout(
        cluster.spec.connect_timeout,
        TcpStream::connect(endpoint.addr),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            cluster
                .metrics()
                .upstream_cx_connect_fail
                .get_or_create(cluster.label())
                .inc();
            tracing::warn!(listener = %listener.name, upstream = %endpoint.addr, error = %e, "tcp upstream connect failed");
            return;
        }
        Err(_) => {
            cluster
                .metrics()
                .upstream_cx_connect_fail
                .get_or_create(cluster.label())
                .inc();
            tracing::warn!(listener = %listener.name, upstream = %endpoint.addr, "tcp upstream connect timeout");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    cluster
        .metrics()
        .upstream_cx_total
        .get_or_create(cluster.label())
        .inc();
    let gauge = cluster
        .metrics()
        .upstream_cx_active
        .get_or_create(cluster.label())
        .clone();
    gauge.inc();
    endpoint
        .active
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    endpoint
        .total
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let activity = Arc::new(Activity::new());
    let mut down = IdleIo {
        inner: stream,
        activity: activity.clone(),
    };
    let mut up = IdleIo {
        inner: upstream,
        activity: activity.clone(),
    };
    let idle = cluster.spec.idle_timeout;
    {
        let copy = tokio::io::copy_bidirectional(&mut down, &mut up);
        let mut copy = pin!(copy);
        loop {
            let idle_at = activity.last() + idle;
            tokio::select! {
                _ = copy.as_mut() => break,
                _ = tokio::time::sleep_until(idle_at) => {
                    if activity.last() + idle <= Instant::now() {
                        break;
                    }
                }
                // A TCP stream has no graceful end we could signal: let it run out the drain.
                _ = shutdown.changed() => {}
            }
        }
    }
    endpoint
        .active
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    gauge.dec();
}

pin_project_lite::pin_project! {
    /// A socket that records when it last moved a byte (idle timeouts).
    pub struct IdleIo {
        #[pin]
        inner: TcpStream,
        activity: Arc<Activity>,
    }
}

impl AsyncRead for IdleIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl AsyncWrite for IdleIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.activity.touch();
            }
        }
        r
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.activity.touch();
            }
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// When a connection last moved a byte, as milliseconds since the process started
/// (an atomic, because hyper needs connection I/O to be `Send`).
pub struct Activity(AtomicU64);

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl Activity {
    fn new() -> Self {
        let a = Activity(AtomicU64::new(0));
        a.touch();
        a
    }
    fn touch(&self) {
        self.0
            .store(epoch().elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn last(&self) -> Instant {
        epoch() + Duration::from_millis(self.0.load(Ordering::Relaxed))
    }
}
