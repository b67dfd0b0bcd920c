//! Listeners: sockets, worker threads, and the life of a downstream connection.
//!
//! Each worker is one thread with a single-threaded Tokio runtime. Every listener gets one
//! `SO_REUSEPORT` socket per worker, so the kernel spreads connections over workers and a
//! connection, and each request on it, stays on the thread that accepted it (no work
//! stealing, no cross-thread wakeups, thread-local filter instances). This is nginx's and
//! Envoy's model, and what lets `workers: 1` be compared with one nginx worker.

use crate::cluster::Cluster;
use crate::config::{ListenerLimits, ListenerProtocol};
use crate::h1_server::{self, Served};
use crate::h2_headers::{self, HeaderBlockClock};
use crate::h2_streams::{Streams, Tracked};
use crate::idle::AtomicInstant;
use crate::proxy::{self, ConnInfo};
use crate::server::{ListenerRuntime, Shared};
use crate::telemetry::metrics::{ListenerLabel, ReasonLabel};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::io::InspectReader;

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
    let ticker = tokio::task::spawn_local(keep_next_wake_near());
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
    ticker.abort();
}

/// A timer that always fires within a second. tokio's timer driver wakes its thread
/// through the IO driver (an eventfd `write`) whenever a timer is registered earlier than
/// the driver's next planned wake-up, even from that same thread; with only long timers
/// pending (connections' idle timeouts of minutes, which the timer wheel plans at a coarse
/// granularity), each request's own timeout (10 to 15 s) was such a timer: a `write`
/// per request at low rates in about half the processes (strace). With this one pending,
/// the next wake-up is always under a second away, later timers never move it, and the
/// cost is one wake-up a second.
async fn keep_next_wake_near() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
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
                    // Boxed for the same reason as the HTTP/2 streams' futures (see
                    // `serve_h2`): the connection's future holds the request path's, and
                    // spawning moves it by value, kilobytes per accepted connection.
                    tasks.spawn_local(Box::pin(async move {
                        let label = ListenerLabel { listener: listener.name.clone() };
                        shared.metrics.downstream_cx_total.get_or_create(&label).inc();
                        let gauge = shared.metrics.downstream_cx_active.get_or_create(&label).clone();
                        gauge.inc();
                        match listener.protocol {
                            ListenerProtocol::Http => serve_http(shared, listener, stream, peer, shutdown).await,
                            // Boxed: the larger arm sizes every connection's future.
                            ListenerProtocol::Tcp => Box::pin(serve_tcp(shared, listener, stream, peer, shutdown)).await,
                            // Boxed: reading the ClientHello takes kilobytes of state,
                            // which inline would size every connection's future.
                            ListenerProtocol::TlsPassthrough => Box::pin(serve_passthrough(shared, listener, stream, peer, shutdown)).await,
                        }
                        gauge.dec();
                        drop(permit);
                    }));
                }
                None => break,
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    while tasks.join_next().await.is_some() {}
}

fn http2_builder(limits: &ListenerLimits) -> hyper::server::conn::http2::Builder<LocalExec> {
    let mut b = hyper::server::conn::http2::Builder::new(LocalExec);
    b.timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_header_list_size((limits.max_request_headers_kb * 1024) as u32)
        // Rapid reset (CVE-2023-44487): bound streams reset before we even saw them, and
        // streams our side had to reset because the peer misbehaved.
        .max_pending_accept_reset_streams(Some(50))
        .max_local_error_reset_streams(Some(256))
        .max_send_buf_size(256 * 1024)
        .keep_alive_interval(Some(Duration::from_secs(60)))
        .keep_alive_timeout(Duration::from_secs(20));
    // No `enable_connect_protocol`: extended CONNECT (RFC 8441, WebSocket over HTTP/2)
    // is not bridged to an upstream, and a client told it may use it would not fall back
    // to the HTTP/1.1 Upgrade that is.
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
    // Never recorded: HTTP connections time their idleness by requests, not bytes
    // (HTTP/1.1 between requests, HTTP/2 by streams in progress). `terminate` wants one
    // for the TCP listeners that share it.
    let activity = Arc::new(Activity::paused());
    let mut conn_info = ConnInfo::new(peer, local);
    if lc.tls.is_none() && lc.public_tls.is_none() {
        let io = Downstream::Plain(IdleIo {
            inner: stream,
            activity: activity.clone(),
        });
        return serve_http_conn(shared, listener, lc, io, conn_info, shutdown).await;
    }
    // Boxed, once per TLS connection: the handshake's state would otherwise size every
    // connection's future, plaintext ones included, for its whole life.
    let Some((io, identity)) =
        Box::pin(terminate(&shared, &listener, &lc, stream, &activity)).await
    else {
        return;
    };
    conn_info.peer_identity = identity;
    // On mesh mTLS this proxy answers as its own SPIFFE ID (`destination_principal`).
    if matches!(io, Downstream::Tls(_)) {
        conn_info.local_identity = lc.tls.as_ref().map(|t| t.identity());
        conn_info.tls = true;
    }
    serve_http_conn(shared, listener, lc, io, conn_info, shutdown).await
}

/// A downstream connection after the listener's TLS (if any) has been dealt with.
pub type Downstream =
    crate::cluster::MaybeTls<IdleIo<TcpStream>, tokio_rustls::server::TlsStream<IdleIo<TcpStream>>>;

/// Terminate the listener's TLS on a new connection: mesh mTLS (`tls`: told apart from
/// plaintext by the first byte, a TLS record starts with 0x16 and no HTTP method does;
/// plaintext passes only in permissive mode) or public TLS (`public_tls`). Both are bounded
/// by the header timeout, so a silent client cannot hold a connection slot. Refusals are
/// counted by reason. Returns the stream and the peer's SPIFFE ID (mesh mTLS only).
async fn terminate(
    shared: &Arc<Shared>,
    listener: &Arc<ListenerRuntime>,
    lc: &crate::server::ListenerConfig,
    stream: TcpStream,
    activity: &Arc<Activity>,
) -> Option<(Downstream, Option<Arc<str>>)> {
    let limit = lc.spec.limits.request_headers_timeout;
    let peer = stream.peer_addr().ok();
    let refuse = |reason: &'static str| count_tls_refusal(shared, listener, reason);
    let io = |stream| IdleIo {
        inner: stream,
        activity: activity.clone(),
    };
    let acceptor = match (&lc.tls, &lc.public_tls) {
        (Some(mesh), _) => {
            let mut first = [0u8; 1];
            let is_tls = match tokio::time::timeout(limit, stream.peek(&mut first)).await {
                Ok(Ok(1)) => first[0] == crate::tls::TLS_HANDSHAKE_BYTE,
                Ok(_) => return None, // closed before sending anything
                Err(_) => {
                    refuse("timeout");
                    return None;
                }
            };
            if !is_tls {
                if mesh.mode == crate::config::TlsMode::Permissive {
                    return Some((Downstream::Plain(io(stream)), None));
                }
                tracing::debug!(listener = %listener.name, ?peer, "plaintext connection to a strict mTLS listener refused");
                refuse("plaintext");
                return None;
            }
            mesh.acceptor()
        }
        (None, Some(public)) => public.acceptor(),
        (None, None) => return Some((Downstream::Plain(io(stream)), None)),
    };
    let tls_stream = match tokio::time::timeout(limit, acceptor.accept(io(stream))).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            let reason = crate::tls::failure_reason(&e);
            // The error names the certificate problem, never key material.
            tracing::info!(listener = %listener.name, ?peer, reason, error = %e, "TLS handshake refused");
            refuse(reason);
            return None;
        }
        Err(_) => {
            refuse("timeout");
            return None;
        }
    };
    shared
        .metrics
        .tls_handshakes
        .get_or_create(&ListenerLabel {
            listener: listener.name.clone(),
        })
        .inc();
    let identity = if lc.tls.is_some() {
        crate::tls::peer_identity(tls_stream.get_ref().1.peer_certificates())
    } else {
        None
    };
    Some((Downstream::Tls(Box::new(tls_stream)), identity))
}

/// Serve HTTP/1.1 and HTTP/2 on an accepted (and, for TLS listeners, decrypted) connection
/// until it ends, goes idle or the worker drains. HTTP/1.1 is served by
/// `crate::h1_server`; a connection that opens with the HTTP/2 preface (h2c prior
/// knowledge, or h2 negotiated by ALPN) goes on to hyper's HTTP/2 server.
async fn serve_http_conn(
    shared: Arc<Shared>,
    listener: Arc<ListenerRuntime>,
    lc: Arc<crate::server::ListenerConfig>,
    io: Downstream,
    conn_info: ConnInfo,
    shutdown: watch::Receiver<bool>,
) {
    let limits = &lc.spec.limits;
    let settings = h1_server::Settings {
        max_head: (limits.max_request_headers_kb * 1024).max(8192),
        max_headers: limits.max_headers_count,
        header_timeout: limits.request_headers_timeout,
        idle_timeout: limits.idle_timeout,
        stream_idle_timeout: limits.stream_idle_timeout,
    };
    let on_reject = |r: h1_server::Rejection| {
        shared
            .metrics
            .downstream_rq_rejected
            .get_or_create(&ReasonLabel {
                listener: listener.name.clone(),
                reason: r.reason(),
            })
            .inc();
    };
    let svc = |req| proxy::handle(shared.clone(), listener.clone(), conn_info.clone(), req);
    match h1_server::serve(io, &settings, shutdown.clone(), on_reject, svc).await {
        Served::Closed => {}
        Served::Http2(io) => {
            let headers = HeaderBlockClock::new();
            let io = InspectReader::new(io, h2_headers::watch(headers.clone()));
            // Boxed (once per HTTP/2 connection): inline, hyper's connection state would
            // size every HTTP/1.1 connection's future too.
            Box::pin(serve_h2(
                shared,
                listener,
                lc,
                TokioIo::new(io),
                conn_info,
                headers,
                shutdown,
            ))
            .await
        }
    }
}

/// Serve an HTTP/2 connection until it ends, goes idle (no request in progress for
/// `idle_timeout`, see `crate::h2_streams`), takes too long to send a request's headers
/// (`headers`, see `crate::h2_headers`), or the worker drains.
async fn serve_h2<I>(
    shared: Arc<Shared>,
    listener: Arc<ListenerRuntime>,
    lc: Arc<crate::server::ListenerConfig>,
    io: I,
    conn_info: ConnInfo,
    headers: Arc<HeaderBlockClock>,
    mut shutdown: watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = conn_info.peer;
    let idle_timeout = lc.spec.limits.idle_timeout;
    let header_timeout = lc.spec.limits.request_headers_timeout;
    let svc_shared = shared.clone();
    let svc_listener = listener.clone();
    let streams = Streams::new();
    let svc_streams = streams.clone();
    let svc = service_fn(move |req| {
        // In progress from here until the response body is dropped.
        let guard = svc_streams.enter();
        // Boxed: hyper spawns each stream's future as a task, and tokio moves a task's
        // future by value on spawn and again as it stores it. The request path's future
        // is kilobytes; those moves cost more than the rest of an HTTP/2 request
        // (callgrind: about 70k instructions of memcpy per request) where one allocation
        // costs about a hundred.
        let fut = crate::heap::pin_in_place(|| {
            proxy::handle(
                svc_shared.clone(),
                svc_listener.clone(),
                conn_info.clone(),
                req,
            )
        });
        async move {
            let resp = fut.await;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Tracked::new(body, guard)))
        }
    });
    let builder = http2_builder(&lc.spec.limits);
    let mut conn = pin!(builder.serve_connection(io, svc));
    let mut draining = false;
    loop {
        // With a request in progress, look again in `idle_timeout`: it cannot be idle
        // before then.
        let idle_at = streams.idle_since().unwrap_or_else(Instant::now) + idle_timeout;
        // A header block the client has been sending for too long (a validated manifest
        // has a non-zero timeout).
        let headers_due = headers.open_since().map(|t| t + header_timeout);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(listener = %listener.name, %peer, error = %e, "downstream connection ended with an error");
                    if let Some(reason) = classify_conn_error(&e) {
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
            _ = tokio::time::sleep_until(idle_at), if !draining && !idle_timeout.is_zero() => {
                if streams.idle_since().is_some_and(|t| t + idle_timeout <= Instant::now()) {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            // Re-arm: a block opened after this loop's deadlines were computed.
            () = headers.opened(), if headers_due.is_none() => {}
            _ = tokio::time::sleep_until(headers_due.unwrap_or(idle_at)), if headers_due.is_some() => {
                if headers.open_since().is_some_and(|t| t + header_timeout <= Instant::now()) {
                    // As the HTTP/1.1 server does: close, nothing reached the service.
                    tracing::debug!(listener = %listener.name, %peer, timeout = ?header_timeout, "HTTP/2 header block not finished in time; closing the connection");
                    shared.metrics.downstream_rq_rejected
                        .get_or_create(&ReasonLabel { listener: listener.name.clone(), reason: "header_timeout" })
                        .inc();
                    return;
                }
            }
        }
    }
}

fn classify_conn_error(h: &hyper::Error) -> Option<&'static str> {
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

/// Raw TCP: terminate the listener's TLS if it has some, then splice to the cluster.
async fn serve_tcp(
    shared: Arc<Shared>,
    listener: Arc<ListenerRuntime>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let lc = listener.current.load_full();
    let Some(cluster): Option<Arc<Cluster>> = lc.tcp_cluster.clone() else {
        return;
    };
    count_tcp(&shared, &listener);
    let activity = Arc::new(Activity::new());
    let Some((down, _identity)) = terminate(&shared, &listener, &lc, stream, &activity).await
    else {
        return;
    };
    splice(
        &listener,
        &cluster,
        down,
        Vec::new(),
        peer,
        activity,
        shutdown,
    )
    .await
}

/// TLS passthrough: read the ClientHello, choose the cluster by its server name, and
/// splice the still-encrypted connection (ClientHello first) to it.
async fn serve_passthrough(
    shared: Arc<Shared>,
    listener: Arc<ListenerRuntime>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let lc = listener.current.load_full();
    count_tcp(&shared, &listener);
    let refuse = |reason: &'static str| count_tls_refusal(&shared, &listener, reason);
    let activity = Arc::new(Activity::new());
    let mut down = IdleIo {
        inner: stream,
        activity: activity.clone(),
    };
    let limit = lc.spec.limits.request_headers_timeout;
    let (hello, name) = match tokio::time::timeout(
        limit,
        crate::tls::sni::read_client_hello(&mut down),
    )
    .await
    {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => {
            tracing::info!(listener = %listener.name, %peer, error = %e, "passthrough connection refused");
            refuse("bad_client_hello");
            return;
        }
        Err(_) => {
            refuse("timeout");
            return;
        }
    };
    let routed = name.as_deref().and_then(|n| {
        lc.sni_routes
            .iter()
            .find(|(patterns, _)| {
                patterns
                    .iter()
                    .any(|p| crate::tls::public::name_matches(p, n))
            })
            .map(|(_, c)| c.clone())
    });
    let Some(cluster) = routed.or_else(|| lc.tcp_cluster.clone()) else {
        tracing::info!(listener = %listener.name, %peer, server_name = ?name, "no sni_route for this server name");
        refuse("no_sni_route");
        return;
    };
    splice(
        &listener,
        &cluster,
        Downstream::Plain(down),
        hello,
        peer,
        activity,
        shutdown,
    )
    .await
}

/// A connection refused at the TLS layer, by reason.
fn count_tls_refusal(shared: &Shared, listener: &ListenerRuntime, reason: &'static str) {
    shared
        .metrics
        .tls_handshake_failures
        .get_or_create(&ReasonLabel {
            listener: listener.name.clone(),
            reason,
        })
        .inc();
}

fn count_tcp(shared: &Shared, listener: &ListenerRuntime) {
    shared
        .metrics
        .tcp_cx_total
        .get_or_create(&ListenerLabel {
            listener: listener.name.clone(),
        })
        .inc();
}

/// Connect to an endpoint of `cluster` (through its connector: connection limit, connect
/// timeout, mTLS if the cluster originates it), send `prefix`, then copy both ways until
/// either side closes or nothing moves for the cluster's idle timeout.
async fn splice(
    listener: &ListenerRuntime,
    cluster: &Arc<Cluster>,
    mut down: Downstream,
    prefix: Vec<u8>,
    peer: SocketAddr,
    activity: Arc<Activity>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Some(endpoint) = cluster.pick(&Default::default()) else {
        tracing::warn!(listener = %listener.name, cluster = %cluster.name, %peer, "no healthy upstream for tcp connection");
        return;
    };
    let mut up = match cluster.connect_stream(endpoint.addr).await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(listener = %listener.name, upstream = %endpoint.addr, error = %e, "tcp upstream connect failed");
            cluster.record_outcome(&endpoint, crate::cluster::UpstreamOutcome::ConnectFailure);
            return;
        }
    };
    endpoint.active.fetch_add(1, Ordering::Relaxed);
    endpoint.total.fetch_add(1, Ordering::Relaxed);
    let idle = cluster.spec.idle_timeout;
    {
        let copy = async {
            if !prefix.is_empty() {
                tokio::io::AsyncWriteExt::write_all(&mut up, &prefix).await?;
            }
            tokio::io::copy_bidirectional(&mut down, &mut up).await
        };
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
    endpoint.active.fetch_sub(1, Ordering::Relaxed);
}

pin_project_lite::pin_project! {
    /// A socket (or a tunnel's side, see `crate::idle::tunnel`) that records when it last
    /// moved a byte (idle timeouts).
    pub struct IdleIo<T> {
        #[pin]
        inner: T,
        activity: Arc<Activity>,
    }
}

impl<T> IdleIo<T> {
    pub(crate) fn new(inner: T, activity: Arc<Activity>) -> Self {
        Self { inner, activity }
    }
}

impl<T: AsyncRead> AsyncRead for IdleIo<T> {
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

impl<T: AsyncWrite> AsyncWrite for IdleIo<T> {
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
/// (an atomic, because hyper needs connection I/O to be `Send`): the idle timeout of raw
/// TCP connections. A paused one records nothing: HTTP connections time idleness by
/// requests (see `serve_http`), and reading the clock on every read and write cost a few
/// hundred instructions per request.
pub struct Activity {
    last: AtomicInstant,
    paused: std::sync::atomic::AtomicBool,
}

impl Activity {
    pub(crate) fn new() -> Self {
        let a = Activity::paused();
        a.resume();
        a
    }
    /// An activity that records nothing until [`Activity::resume`].
    pub(crate) fn paused() -> Self {
        Activity {
            last: AtomicInstant::none(),
            paused: std::sync::atomic::AtomicBool::new(true),
        }
    }
    /// Start recording, from now.
    pub(crate) fn resume(&self) {
        self.paused.store(false, Ordering::Relaxed);
        self.touch();
    }
    fn touch(&self) {
        if self.paused.load(Ordering::Relaxed) {
            return;
        }
        self.last.set_now();
    }
    pub(crate) fn last(&self) -> Instant {
        // Recording since `new`/`resume`, so always set where it is read.
        self.last.get().unwrap_or_else(Instant::now)
    }
}
