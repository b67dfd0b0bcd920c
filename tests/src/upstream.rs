//! [`Upstream`]: an in-process HTTP/1.1 + h2c server on `127.0.0.1:0` that records every
//! request it receives and answers as the test tells it ([`Behavior`]), per request or by
//! default. Also [`TcpEcho`] for raw TCP and [`refused_addr`] for a port nobody listens on.

use crate::client::BoxError;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

type RespBody = BoxBody<Bytes, BoxError>;

/// Bodies kept in a [`Recorded`] request are cut at this size (streams are only counted).
const KEEP_BODY: usize = 1024 * 1024;

/// How the upstream answers a request.
#[derive(Debug, Clone)]
pub enum Behavior {
    /// This status, body `upstream NAME`.
    Status(u16),
    /// Full control over the answer.
    Respond {
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    },
    /// 200 with the request body as the response body.
    Echo,
    /// Wait, then 200 `slow`.
    Delay(Duration),
    /// Wait, then this status with body `upstream NAME`.
    SlowStatus(Duration, u16),
    /// Read the request, never answer (the connection stays open).
    Hang,
    /// Close the connection without answering (h2: reset the stream).
    ResetBeforeResponse,
    /// Answer 200 with `Content-Length: 2 * sent`, send `sent` bytes, then break off.
    ResetMidResponse { sent: usize },
    /// 200 with `Content-Length: 2 * sent`, send `sent` bytes, then nothing more (the
    /// connection stays open).
    StallBody { sent: usize },
    /// 200 with a body of `len` bytes of [`crate::pattern_chunk`], streamed in 64 KiB chunks.
    Stream { len: u64 },
    /// 200 with a body of [`crate::pattern_chunk`]s of these sizes, one frame each, with a
    /// yield to the scheduler after the frames marked `true` (no Content-Length, so
    /// HTTP/1.1 sends it chunked).
    StreamFrames(Vec<(usize, bool)>),
    /// Read the body as it streams without keeping it; answer JSON
    /// `{"bytes": N, "pattern_ok": bool}` (checked against [`crate::pattern_chunk`]).
    CountBody,
    /// [`Behavior::CountBody`], but a slow reader: pauses 50 ms after every 64 MiB, so the
    /// sender (through the proxy) has to wait on flow control.
    CountBodySlowly,
    /// gRPC-style: `content-type: application/grpc`, the request body echoed, then trailers
    /// `grpc-status: 0` and `grpc-message: ok`.
    GrpcEcho,
    /// Accept a WebSocket upgrade and echo every message.
    WebSocketEcho,
}

/// One request as the upstream received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub path: String,
    /// The request target's authority: HTTP/2's `:authority` (absent in HTTP/1.1's
    /// origin-form requests).
    pub authority: Option<String>,
    pub version: Version,
    pub headers: HeaderMap,
    /// The body (cut at 1 MiB).
    pub body: Bytes,
    pub body_len: u64,
    pub trailers: Option<HeaderMap>,
    /// The request body broke off.
    pub body_error: Option<String>,
    /// Index of the connection it came on (0, 1, …).
    pub connection: usize,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect()
    }
}

struct State {
    name: String,
    default: Mutex<Behavior>,
    queue: Mutex<VecDeque<Behavior>>,
    requests: Mutex<Vec<Recorded>>,
    connections: AtomicUsize,
}

/// A test upstream. Stops when dropped.
pub struct Upstream {
    addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Start an upstream answering 200 `upstream upstream`.
    pub async fn start() -> Upstream {
        Self::named("upstream").await
    }

    /// Start an upstream whose default body is `upstream NAME` (tells upstreams apart).
    pub async fn named(name: &str) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let state = Arc::new(State {
            name: name.to_string(),
            default: Mutex::new(Behavior::Status(200)),
            queue: Mutex::new(VecDeque::new()),
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let conn_idx = st.connections.fetch_add(1, Ordering::SeqCst);
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(st.clone(), conn_idx, req));
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Upstream { addr, state, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How every request is answered unless a queued behaviour applies.
    pub fn set_default(&self, b: Behavior) -> &Self {
        *self.state.default.lock().expect("lock") = b;
        self
    }

    /// Answer the next request (after those already queued) this way.
    pub fn push(&self, b: Behavior) -> &Self {
        self.state.queue.lock().expect("lock").push_back(b);
        self
    }

    /// Fail the next `n` requests with `status`, then go back to the default.
    pub fn fail_times(&self, n: usize, status: u16) -> &Self {
        for _ in 0..n {
            self.push(Behavior::Status(status));
        }
        self
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("lock").clone()
    }

    pub fn request_count(&self) -> usize {
        self.state.requests.lock().expect("lock").len()
    }

    /// The most recent request; panics if there is none.
    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .expect("the upstream received no request")
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// Wait (up to 10 s) until at least `n` requests have arrived.
    pub async fn wait_requests(&self, n: usize) {
        crate::eventually(
            Duration::from_secs(10),
            &format!("{n} requests at the upstream"),
            || async { (self.request_count() >= n).then_some(()) },
        )
        .await
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn boxed<B>(b: B) -> RespBody
where
    B: http_body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    b.map_err(Into::into).boxed()
}

fn text(status: u16, body: impl Into<Bytes>) -> Response<RespBody> {
    let mut r = Response::new(boxed(Full::new(body.into())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r
}

async fn handle(
    st: Arc<State>,
    conn: usize,
    req: Request<Incoming>,
) -> Result<Response<RespBody>, BoxError> {
    let behavior = {
        let queued = st.queue.lock().expect("lock").pop_front();
        queued.unwrap_or_else(|| st.default.lock().expect("lock").clone())
    };
    let (parts, body) = req.into_parts();
    let idx = {
        let mut reqs = st.requests.lock().expect("lock");
        reqs.push(Recorded {
            method: parts.method.to_string(),
            uri: parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            path: parts.uri.path().to_string(),
            authority: parts.uri.authority().map(|a| a.to_string()),
            version: parts.version,
            headers: parts.headers.clone(),
            body: Bytes::new(),
            body_len: 0,
            trailers: None,
            body_error: None,
            connection: conn,
        });
        reqs.len() - 1
    };
    let record_body = |body: Bytes, len: u64, trailers: Option<HeaderMap>, err: Option<String>| {
        if let Some(r) = st.requests.lock().expect("lock").get_mut(idx) {
            r.body = body;
            r.body_len = len;
            r.trailers = trailers;
            r.body_error = err;
        }
    };

    if let Behavior::WebSocketEcho = behavior {
        return Ok(websocket_echo(Request::from_parts(parts, body)));
    }
    if let Behavior::CountBody | Behavior::CountBodySlowly = behavior {
        let slow = matches!(behavior, Behavior::CountBodySlowly);
        let (n, ok, err) = count_pattern_body(body, slow).await;
        record_body(Bytes::new(), n, None, err);
        return Ok(text(
            200,
            serde_json::json!({"bytes": n, "pattern_ok": ok}).to_string(),
        ));
    }
    // Everything else reads the whole request first.
    let (data, len, trailers, err) = read_body(body).await;
    let echoed = data.clone();
    record_body(data, len, trailers, err);

    Ok(match behavior {
        Behavior::Status(s) => text(s, format!("upstream {}", st.name)),
        Behavior::Respond {
            status,
            headers,
            body,
        } => {
            let mut r = text(status, body);
            for (k, v) in headers {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::from_bytes(k.as_bytes()),
                    http::HeaderValue::from_str(&v),
                ) {
                    r.headers_mut().append(k, v);
                }
            }
            r
        }
        Behavior::Echo => text(200, echoed),
        Behavior::Delay(d) => {
            tokio::time::sleep(d).await;
            text(200, "slow")
        }
        Behavior::SlowStatus(d, status) => {
            tokio::time::sleep(d).await;
            text(status, format!("upstream {}", st.name))
        }
        Behavior::Hang => std::future::pending().await,
        Behavior::ResetBeforeResponse => return Err("reset before response (on purpose)".into()),
        Behavior::ResetMidResponse { sent } => {
            let chunks: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::from(vec![b'x'; sent]))),
                Err("reset mid-response (on purpose)".into()),
            ];
            // Give the first chunk time to leave before the error aborts the connection.
            let stream = futures_util::stream::iter(chunks).then(|c| async move {
                if c.is_err() {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                c
            });
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(sent * 2),
            );
            r
        }
        Behavior::StallBody { sent } => {
            let first =
                futures_util::stream::iter([Ok::<_, BoxError>(Frame::data(Bytes::from(vec![
                    b'x';
                    sent
                ])))]);
            let stream = first.chain(futures_util::stream::pending());
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(stream)));
            r.headers_mut().insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from(sent * 2),
            );
            r
        }
        Behavior::Stream { len } => {
            let mut r = Response::new(pattern_body(len));
            r.headers_mut()
                .insert(http::header::CONTENT_LENGTH, http::HeaderValue::from(len));
            r
        }
        Behavior::StreamFrames(frames) => Response::new(pattern_frames(frames)),
        Behavior::GrpcEcho => {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            trailers.insert("grpc-message", http::HeaderValue::from_static("ok"));
            let frames: Vec<Result<Frame<Bytes>, BoxError>> =
                vec![Ok(Frame::data(echoed)), Ok(Frame::trailers(trailers))];
            let mut r = Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                frames,
            ))));
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            r
        }
        Behavior::CountBody | Behavior::CountBodySlowly | Behavior::WebSocketEcho => {
            unreachable!("handled above")
        }
    })
}

async fn read_body(body: Incoming) -> (Bytes, u64, Option<HeaderMap>, Option<String>) {
    let mut body = std::pin::pin!(body);
    let mut data = Vec::new();
    let mut len = 0u64;
    let mut trailers = None;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => match f.into_data() {
                Ok(d) => {
                    len += d.len() as u64;
                    if data.len() < KEEP_BODY {
                        data.extend_from_slice(&d[..d.len().min(KEEP_BODY - data.len())]);
                    }
                }
                Err(f) => trailers = f.into_trailers().ok(),
            },
            Err(e) => return (Bytes::from(data), len, trailers, Some(e.to_string())),
        }
    }
    (Bytes::from(data), len, trailers, None)
}

/// A slow reader pauses this long after every [`SLOW_EVERY`] bytes.
pub const SLOW_PAUSE: Duration = Duration::from_millis(50);
pub const SLOW_EVERY: u64 = 64 * 1024 * 1024;

async fn count_pattern_body(body: Incoming, slow: bool) -> (u64, bool, Option<String>) {
    let mut body = std::pin::pin!(body);
    let mut n = 0u64;
    let mut ok = true;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(d) = f.data_ref() {
                    ok &= crate::pattern_matches(d, n);
                    if slow && (n + d.len() as u64) / SLOW_EVERY != n / SLOW_EVERY {
                        tokio::time::sleep(SLOW_PAUSE).await;
                    }
                    n += d.len() as u64;
                }
            }
            Err(e) => return (n, ok, Some(e.to_string())),
        }
    }
    (n, ok, None)
}

/// A body of `len` pattern bytes in 64 KiB chunks, produced lazily (never held whole).
pub fn pattern_body(len: u64) -> BoxBody<Bytes, BoxError> {
    const CHUNK: u64 = 64 * 1024;
    let stream = futures_util::stream::unfold(0u64, move |off| async move {
        if off >= len {
            return None;
        }
        let n = CHUNK.min(len - off);
        Some((
            Ok::<_, BoxError>(Frame::data(crate::pattern_chunk(off, n as usize))),
            off + n,
        ))
    });
    BodyExt::boxed(StreamBody::new(stream))
}

/// A body of [`crate::pattern_chunk`]s of the given sizes, one frame each, continuing the
/// pattern from one to the next; after a frame marked `true` the stream yields to the
/// scheduler first, so that the next frame is not ready at once.
pub fn pattern_frames(frames: Vec<(usize, bool)>) -> BoxBody<Bytes, BoxError> {
    let stream = futures_util::stream::unfold((0usize, 0u64), move |(i, off)| {
        let next = frames.get(i).copied();
        async move {
            let (len, pause) = next?;
            if pause {
                tokio::task::yield_now().await;
            }
            Some((
                Ok::<_, BoxError>(Frame::data(crate::pattern_chunk(off, len))),
                (i + 1, off + len as u64),
            ))
        }
    });
    BodyExt::boxed(StreamBody::new(stream))
}

fn websocket_echo(req: Request<Incoming>) -> Response<RespBody> {
    use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
    use tokio_tungstenite::tungstenite::protocol::Role;
    let Some(key) = req
        .headers()
        .get("sec-websocket-key")
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return text(400, "not a websocket handshake");
    };
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = on_upgrade.await else {
            return;
        };
        let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
            TokioIo::new(upgraded),
            Role::Server,
            None,
        )
        .await;
        while let Some(Ok(msg)) = ws.next().await {
            if msg.is_close() {
                break;
            }
            if (msg.is_text() || msg.is_binary())
                && futures_util::SinkExt::send(&mut ws, msg).await.is_err()
            {
                break;
            }
        }
    });
    let mut r = text(101, Bytes::new());
    let h = r.headers_mut();
    h.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    h.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    if let Ok(v) = http::HeaderValue::from_str(&key) {
        h.insert("sec-websocket-accept", v);
    }
    r
}

/// A raw TCP upstream that echoes every byte back.
pub struct TcpEcho {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpEcho {
    pub async fn start() -> TcpEcho {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind tcp echo");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        TcpEcho {
            addr,
            connections,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address nothing listens on, for the life of the test process: a socket is bound to
/// the port but never listens, so connects are refused and no other process of a parallel
/// test run can take the port (dropping a listener and hoping was racy: a proxy started by
/// another test binary once got the port and answered 404).
pub fn refused_addr() -> SocketAddr {
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    sock.bind(&addr.into())
        .expect("bind a never-listening socket");
    let bound = sock
        .local_addr()
        .expect("local addr")
        .as_socket()
        .expect("inet addr");
    // Kept open until the process exits.
    std::mem::forget(sock);
    bound
}
