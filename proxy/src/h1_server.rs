//! Downstream HTTP/1.1, served by the connection's own task.
//!
//! hyper's server reads a request head in its dispatcher, hands the request to the
//! service, feeds the request body to it through a channel and writes the response from
//! a queue, moving the service's (large) future several times on the way. Here the task
//! that owns the connection does each step in line, as an event-loop proxy does: read and
//! parse the head (one `httparse` pass; the header values are slices of the read buffer,
//! not copies), call the service, write the head and the body as the body yields it, and
//! go back for the next head. The request body reads from the connection's read half as
//! it is polled; the response is written from the other half, so an upstream that
//! answers before the upload ended is relayed at once.
//!
//! Framing follows RFC 9112 §6:
//! - A request body is delimited by Content-Length or by chunked coding (which must be
//!   the last transfer coding). A request with both, with a coding other than chunked,
//!   or with Content-Lengths that disagree reaches the service with an empty body (the
//!   request path answers it 400, see `UntrustedFraming`), and the connection closes
//!   after the answer: what follows on the wire cannot be trusted.
//! - A response is delimited by its Content-Length, or the body's known size, or chunked
//!   coding for an HTTP/1.1 client, or the connection's close for an HTTP/1.0 one. HEAD,
//!   1xx, 204 and 304 answers carry no body.
//! - A connection is reused when both sides agree (`Connection: close`, HTTP/1.0 without
//!   `keep-alive`), the request body was read to its end, and the response was written
//!   whole. Pipelined requests are served in order.
//!
//! Limits: a head larger than `max_head` or with more than `max_headers` fields is
//! answered 431; a head that does not arrive within the header timeout (counted from the
//! connection's start for the first request, from its first byte for the next ones)
//! closes the connection, and so does a keep-alive connection idle for the idle
//! timeout. A malformed head is answered 400. Each is counted by the caller's
//! `on_reject`.
//!
//! `Expect: 100-continue` is answered by the proxy itself before the request goes on,
//! as Envoy does by default, and the header is not forwarded.
//!
//! An HTTP/2 connection preface as the first bytes hands the connection, and the bytes
//! read of it, back to the caller ([`Served::Http2`]); an upgrade (WebSocket) that the
//! upstream accepts with 101 turns the connection into a tunnel ([`UpgradeTo`]).

use crate::cluster::BoxError;
use crate::h1::{read_frame, BodyKind, Chunk};
use crate::text::{each_list_item, has_token, last_token_is, list_items, parse_decimal, trim_ows};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use std::future::{poll_fn, Future};
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::sync::watch;
use tokio::time::Instant;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Free space kept in the read buffer before each read of a head.
const READ_SPACE: usize = 4 * 1024;
/// Header slots parsed on the stack; a larger `max_headers` uses the heap.
const STACK_HEADERS: usize = 128;
/// Extra room in a request's header map for what the proxy adds (request id,
/// `x-forwarded-for`, tracing headers...), so adding them does not rehash.
const SPARE_HEADERS: usize = 8;
/// Body frames up to this size are copied behind the head (one write for a small
/// response); larger ones are written from their own buffer.
const COALESCE: usize = 8 * 1024;
/// The most of an unread request body read and dropped to keep the connection.
const DISCARD_MAX: usize = 64 * 1024;
/// Response bytes queued before the body is polled again (backpressure).
const HIGH_WATER: usize = 64 * 1024;
/// The write buffer an idle connection keeps: room for a small response's head and body.
const WBUF_KEEP: usize = 1024;

/// What a connection is served with.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Past this size, a head that has not ended is answered 431.
    pub max_head: usize,
    /// Past this many fields, a head is answered 431.
    pub max_headers: usize,
    pub header_timeout: Duration,
    /// Keep-alive connections without a request for this long are closed.
    pub idle_timeout: Duration,
    /// Upgraded connections (tunnels) with no byte moving for this long are closed.
    pub stream_idle_timeout: Duration,
}

/// How a connection's service ended.
pub enum Served<I> {
    /// The connection is done (closed by either side, timed out, drained or failed).
    Closed,
    /// The client sent the HTTP/2 preface: the connection, with what was read of it, for
    /// an HTTP/2 server.
    Http2(Prefixed<I>),
}

/// Why a connection was refused without reaching the service, for the caller's counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    HeadersTooLarge,
    BadRequest,
    HeaderTimeout,
}

impl Rejection {
    pub fn reason(self) -> &'static str {
        match self {
            Rejection::HeadersTooLarge => "headers_too_large",
            Rejection::BadRequest => "bad_request",
            Rejection::HeaderTimeout => "header_timeout",
        }
    }
}

/// Set by the server on an upgrade request (`Connection: upgrade` with `Upgrade`): the
/// client's connection can be taken over if the upstream switches protocols.
#[derive(Clone, Copy, Debug)]
pub struct CanUpgrade;

/// Set by the server on a request whose framing cannot be trusted (RFC 9112 §6.1, §6.3):
/// Content-Length beside Transfer-Encoding, a transfer coding other than `chunked` last,
/// an invalid or conflicting Content-Length, Transfer-Encoding in HTTP/1.0. No byte of its
/// body was read; the request path answers 400 and the connection closes after it. The
/// text says which.
#[derive(Clone, Copy, Debug)]
pub struct UntrustedFraming(pub &'static str);

/// Put on a 101 response by the request path: once the 101 is written, the client's
/// connection is spliced to this (the upstream's switched connection).
#[derive(Clone)]
pub struct UpgradeTo(pub hyper::upgrade::OnUpgrade);

/// The connection's read side, shared by the connection's task (heads) and the current
/// request's body. Single-threaded in practice (one worker's tasks); the mutex is there
/// because bodies must be `Send`.
struct ReadSide<I> {
    io: ReadHalf<I>,
    buf: BytesMut,
    body: BodyState,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum BodyState {
    /// No body outstanding (none, or read to its end).
    Done,
    /// The current request's body is still being read.
    Reading,
    /// The body was dropped unread (the proxy answered without it); this much of it is
    /// still to come. Discarded after the response if it is small, as nginx does.
    Unread(BodyKind),
    /// The body failed: the connection's framing is lost.
    Broken,
}

impl<I: AsyncRead> ReadSide<I> {
    fn poll_fill(&mut self, cx: &mut Context<'_>, space: usize) -> Poll<io::Result<usize>> {
        crate::h1::poll_fill(Pin::new(&mut self.io), cx, &mut self.buf, space)
    }

    /// `poll_fill` between requests: while nothing arrives, the connection holds no read
    /// buffer (it goes back to the worker's pool, see `buf_pool`).
    fn poll_fill_idle(&mut self, cx: &mut Context<'_>, space: usize) -> Poll<io::Result<usize>> {
        let read = self.poll_fill(cx, space);
        if read.is_pending() {
            crate::buf_pool::release(&mut self.buf);
        }
        read
    }
}

type Shared<I> = Arc<Mutex<ReadSide<I>>>;

fn lock<I>(s: &Shared<I>) -> MutexGuard<'_, ReadSide<I>> {
    // Poisoned only if a body panicked mid-read; the state is still consistent enough to
    // fail the connection with.
    s.lock().unwrap_or_else(|e| e.into_inner())
}

/// A request body, read from the client's connection as it is polled.
pub struct RequestBody<I> {
    read: Option<Shared<I>>,
    kind: BodyKind,
}

/// Why a request body failed.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("client closed the connection mid-body")]
    Closed,
    #[error("invalid chunked request body: {0}")]
    Invalid(&'static str),
    #[error("reading the request body: {0}")]
    Io(#[from] io::Error),
}

impl<I> RequestBody<I> {
    fn empty() -> Self {
        Self {
            read: None,
            kind: BodyKind::Done,
        }
    }
}

impl<I: AsyncRead> RequestBody<I> {
    fn end(&mut self, state: BodyState) {
        self.kind = BodyKind::Done;
        if let Some(read) = self.read.take() {
            lock(&read).body = state;
        }
    }
}

impl<I: AsyncRead> crate::h1::BodySource for ReadSide<I> {
    fn buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }
    fn poll_fill(&mut self, cx: &mut Context<'_>, space: usize) -> Poll<io::Result<usize>> {
        ReadSide::poll_fill(self, cx, space)
    }
}

impl<I: AsyncRead> Body for RequestBody<I> {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let Some(read) = this.read.clone() else {
            return Poll::Ready(None);
        };
        let result = ready!(read_frame(cx, &mut *lock(&read), &mut this.kind));
        match result {
            Ok(frame) => {
                // Whatever was the last frame, the body is complete once nothing is left:
                // the connection can read the next head.
                if this.kind.is_end() {
                    this.end(BodyState::Done);
                }
                Poll::Ready(frame.map(Ok))
            }
            Err(e) => {
                this.end(BodyState::Broken);
                Poll::Ready(Some(Err(match e {
                    crate::h1::Error::Invalid(what) => BodyError::Invalid(what),
                    crate::h1::Error::ClosedMidBody => BodyError::Closed,
                    crate::h1::Error::Io(e) => BodyError::Io(e),
                    _ => BodyError::Invalid("malformed body"),
                })))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.kind.is_end()
    }

    fn size_hint(&self) -> SizeHint {
        self.kind.size_hint()
    }
}

impl<I> Drop for RequestBody<I> {
    fn drop(&mut self) {
        if let Some(read) = self.read.take() {
            let mut side = lock(&read);
            if side.body == BodyState::Reading {
                side.body = match self.kind {
                    // Left unread (the proxy answered without it), but already here: skip
                    // it, and the connection can serve the next request.
                    BodyKind::Length(left) if left <= side.buf.len() as u64 => {
                        side.buf.advance(left as usize);
                        BodyState::Done
                    }
                    kind => BodyState::Unread(kind),
                };
            }
        }
    }
}

/// A parsed request head and what the server needs to know of it.
struct Head {
    parts: http::request::Parts,
    body: BodyKind,
    /// The client wants the connection kept (HTTP/1.1 without `close`, HTTP/1.0 with
    /// `keep-alive`), and nothing about the framing forces a close.
    keep_alive: bool,
    expect_continue: bool,
    upgrade: bool,
    /// `TE: trailers`: the client accepts trailers in a chunked response.
    trailers: bool,
}

/// A head could not be read.
enum HeadError {
    TooLarge,
    Bad,
}

/// Header slot positions in the head's buffer (names and values are slices of it).
#[derive(Clone, Copy)]
struct Slot {
    name: (u32, u32),
    value: (u32, u32),
}

/// Parse a complete head off the front of `buf`. `Ok(None)`: more bytes are needed.
fn parse_head(
    buf: &mut BytesMut,
    max_headers: usize,
    slots: &mut Vec<Slot>,
) -> Result<Option<Head>, HeadError> {
    let mut stack: [MaybeUninit<httparse::Header<'_>>; STACK_HEADERS] =
        [const { MaybeUninit::uninit() }; STACK_HEADERS];
    let mut heap: Vec<MaybeUninit<httparse::Header<'_>>> = Vec::new();
    let storage: &mut [MaybeUninit<httparse::Header<'_>>] = if max_headers <= STACK_HEADERS {
        &mut stack[..max_headers]
    } else {
        heap.resize_with(max_headers, MaybeUninit::uninit);
        &mut heap
    };
    let base = buf.as_ptr() as usize;
    let offsets = |s: &[u8]| {
        let start = s.as_ptr() as usize - base;
        (start as u32, (start + s.len()) as u32)
    };
    let mut req = httparse::Request::new(&mut []);
    let (len, method, target, minor) = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, storage)
    {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(len)) => {
            slots.clear();
            for h in req.headers.iter() {
                slots.push(Slot {
                    name: offsets(h.name.as_bytes()),
                    value: offsets(h.value),
                });
            }
            let method = req.method.ok_or(HeadError::Bad)?;
            let method = Method::from_bytes(method.as_bytes()).map_err(|_| HeadError::Bad)?;
            let target = offsets(req.path.ok_or(HeadError::Bad)?.as_bytes());
            (len, method, target, req.version.ok_or(HeadError::Bad)?)
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Bad),
    };
    let head = buf.split_to(len).freeze();
    let slice = |(a, b): (u32, u32)| head.slice(a as usize..b as usize);
    let uri = Uri::from_maybe_shared(slice(target)).map_err(|_| HeadError::Bad)?;
    let version = if minor == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };

    let mut headers = crate::header_pool::take(slots.len() + SPARE_HEADERS);
    let mut content_length: Option<u64> = None;
    let mut lengths_disagree = false;
    let mut lengths_repeated = false;
    let mut te = false;
    let mut chunked = false;
    let mut te_bad = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut conn_upgrade = false;
    let mut has_upgrade = false;
    let mut expect_continue = false;
    let mut trailers = false;
    for slot in slots.iter() {
        let name = HeaderName::from_bytes(&head[slot.name.0 as usize..slot.name.1 as usize])
            .map_err(|_| HeadError::Bad)?;
        let value =
            HeaderValue::from_maybe_shared(slice(slot.value)).map_err(|_| HeadError::Bad)?;
        let v = value.as_bytes();
        if name == header::CONTENT_LENGTH {
            // One decimal number; repeated or listed (`5, 5`), the same number each time
            // (RFC 9110 §8.6), sent on as one.
            let had_length = content_length.is_some();
            let listed = each_list_item(v, |item| match parse_decimal(item) {
                Some(n) if content_length.is_none_or(|m| m == n) => content_length = Some(n),
                _ => lengths_disagree = true,
            });
            lengths_repeated |= had_length || listed;
        } else if name == header::TRANSFER_ENCODING {
            // Only `chunked`, last, is understood; anything else cannot be framed.
            te = true;
            chunked = last_token_is(v, b"chunked");
            te_bad |= !list_items(v).all(|t| t.eq_ignore_ascii_case(b"chunked"));
        } else if name == header::CONNECTION {
            close |= has_token(v, b"close");
            keep_alive_token |= has_token(v, b"keep-alive");
            conn_upgrade |= has_token(v, b"upgrade");
        } else if name == header::UPGRADE {
            has_upgrade = true;
        } else if name == header::EXPECT {
            expect_continue |= v.eq_ignore_ascii_case(b"100-continue");
        } else if name == header::TE {
            trailers |= has_token(v, b"trailers");
        }
        headers.append(name, value);
    }
    if expect_continue {
        // Answered here (see the module's comment): the upstream must not wait for it.
        headers.remove(header::EXPECT);
    }
    // Framing that cannot be trusted (RFC 9112 §6.1, §6.3): no body is read, the request
    // path refuses the request (see `UntrustedFraming`), and the connection closes after
    // the answer.
    let untrusted = if te && content_length.is_some() {
        Some("both Content-Length and Transfer-Encoding")
    } else if te_bad {
        Some("unsupported Transfer-Encoding")
    } else if lengths_disagree {
        Some("invalid or conflicting Content-Length")
    } else if te && version == Version::HTTP_10 {
        Some("Transfer-Encoding in an HTTP/1.0 request")
    } else {
        None
    };
    let body = if untrusted.is_some() {
        BodyKind::Done
    } else if te && chunked {
        BodyKind::Chunked(Chunk::Size)
    } else {
        match content_length {
            Some(0) | None => BodyKind::Done,
            Some(n) => BodyKind::Length(n),
        }
    };
    let keep_alive =
        untrusted.is_none() && !close && (version == Version::HTTP_11 || keep_alive_token);
    let mut parts = Request::new(()).into_parts().0;
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    match (untrusted, content_length) {
        (Some(why), _) => {
            parts.extensions.insert(UntrustedFraming(why));
        }
        // An HTTP/2 upstream would get every line as it came: several content-length
        // fields are malformed there (RFC 9113 §8.1.1).
        (None, Some(n)) if lengths_repeated => {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        _ => {}
    }
    Ok(Some(Head {
        parts,
        body,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11 && body != BodyKind::Done,
        upgrade: conn_upgrade && has_upgrade,
        trailers,
    }))
}

/// Serve HTTP/1.1 requests on `io` until the connection ends; `svc` answers each request.
/// `shutdown` turning true drains the connection: the request in progress is answered
/// (with `Connection: close`), an idle connection closes at once.
pub async fn serve<I, S, F, B>(
    io: I,
    settings: &Settings,
    mut shutdown: watch::Receiver<bool>,
    on_reject: impl Fn(Rejection),
    mut svc: S,
) -> Served<I>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: FnMut(Request<RequestBody<I>>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (r, mut w) = tokio::io::split(io);
    let read: Shared<I> = Arc::new(Mutex::new(ReadSide {
        io: r,
        buf: BytesMut::new(),
        body: BodyState::Done,
    }));
    let mut wbuf = BytesMut::new();
    let mut slots = Vec::new();
    // One timer for the connection's life, moved forward as it goes (moving a deadline
    // later costs an atomic store, not a timer-wheel update).
    let mut timer = pin!(tokio::time::sleep_until(deadline(settings.header_timeout)));
    let mut first = true;
    loop {
        // 1. The next request's head.
        let head = match read_head(
            &read,
            settings,
            &mut slots,
            timer.as_mut(),
            &mut shutdown,
            first,
        )
        .await
        {
            Ok(HeadRead::Head(h)) => h,
            Ok(HeadRead::Closed) => return Served::Closed,
            Ok(HeadRead::Http2) => {
                drop(slots);
                return match Arc::try_unwrap(read) {
                    Ok(side) => {
                        let side = side.into_inner().unwrap_or_else(|e| e.into_inner());
                        Served::Http2(Prefixed {
                            prefix: side.buf.freeze(),
                            io: side.io.unsplit(w),
                        })
                    }
                    Err(_) => Served::Closed,
                };
            }
            Err(rejection) => {
                on_reject(rejection);
                if rejection != Rejection::HeaderTimeout {
                    let (status, text) = match rejection {
                        Rejection::HeadersTooLarge => (
                            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                            "request headers too large\n",
                        ),
                        _ => (StatusCode::BAD_REQUEST, "malformed request head\n"),
                    };
                    let _ = write_simple(&mut w, status, text).await;
                }
                return Served::Closed;
            }
        };
        first = false;

        // 2. The request and its response. The exchange's state lives on the heap for the
        // request's duration only: with the request path's future it is kilobytes, which
        // inline would sit in every idle keep-alive connection.
        let call = crate::heap::pin_in_place(|| {
            exchange(
                head, &read, &mut w, &mut wbuf, settings, &shutdown, &mut svc,
            )
        });
        match call.await {
            Next::KeepAlive => {}
            Next::Close => return Served::Closed,
            Next::Tunnel(up) => {
                drop(slots);
                // Boxed, once per upgrade: inline, the splice's state would size every
                // connection's future.
                Box::pin(tunnel(read, w, up, settings.stream_idle_timeout)).await;
                return Served::Closed;
            }
        }
        // Idle until the next request: a large write buffer goes back to the worker's
        // pool (a small one stays, so that small responses need no pool round trip), as
        // the read buffer does when the next read waits (see `buf_pool`).
        if wbuf.capacity() > WBUF_KEEP {
            crate::buf_pool::give(std::mem::take(&mut wbuf));
        }
        timer.as_mut().reset(deadline(settings.idle_timeout));
    }
}

/// How an exchange left the connection.
enum Next {
    /// Ready for the next request.
    KeepAlive,
    /// Closed, or to be closed.
    Close,
    /// The upstream switched protocols: the connection is spliced to it.
    Tunnel(hyper::upgrade::OnUpgrade),
}

/// Serve one request whose head has been read: call the service, write its response,
/// and tell what the connection does next.
async fn exchange<I, S, F, B>(
    head: Head,
    read: &Shared<I>,
    w: &mut WriteHalf<I>,
    wbuf: &mut BytesMut,
    settings: &Settings,
    shutdown: &watch::Receiver<bool>,
    svc: &mut S,
) -> Next
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: FnMut(Request<RequestBody<I>>) -> F,
    F: Future<Output = Response<B>>,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    // The request, to the service.
    let Head {
        mut parts,
        body,
        keep_alive,
        expect_continue,
        upgrade,
        trailers,
    } = head;
    let is_head = parts.method == Method::HEAD;
    let client_version = parts.version;
    if upgrade {
        parts.extensions.insert(CanUpgrade);
    }
    let body = match body {
        BodyKind::Done => RequestBody::empty(),
        kind => {
            lock(read).body = BodyState::Reading;
            RequestBody {
                read: Some(read.clone()),
                kind,
            }
        }
    };
    if expect_continue
        && write_all(w, b"HTTP/1.1 100 Continue\r\n\r\n")
            .await
            .is_err()
    {
        return Next::Close;
    }
    // The client leaving (its side closed) cancels the request, as in hyper and Envoy:
    // the upstream exchange is dropped with it, which frees its connection.
    let resp = {
        let mut call = pin!(svc(Request::from_parts(parts, body)));
        let gone = client_gone(read, settings.max_head);
        tokio::select! {
            biased;
            resp = call.as_mut() => resp,
            () = gone => return Next::Close,
        }
    };

    // Its response.
    let (mut rparts, rbody) = resp.into_parts();
    let switching = rparts.status == StatusCode::SWITCHING_PROTOCOLS;
    let upgrade_to = if switching && upgrade {
        rparts.extensions.remove::<UpgradeTo>()
    } else {
        None
    };
    let draining = *shutdown.borrow();
    let wants_close = !keep_alive
        || draining
        || rparts
            .headers
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v.as_bytes(), b"close"));
    if wbuf.capacity() == 0 {
        *wbuf = crate::buf_pool::take();
    }
    let mut out = encode_head(
        wbuf,
        &mut rparts,
        is_head,
        client_version,
        wants_close,
        rbody.size_hint().exact(),
    );
    let keep = out.keep_alive;
    // Written out: the map serves a later message.
    crate::header_pool::give(std::mem::take(&mut rparts.headers));
    if upgrade_to.is_some() {
        out.framing = Framing::None;
    }
    let written = write_body(w, wbuf, &mut out, rbody, trailers).await;
    if written.is_err() {
        return Next::Close;
    }
    if let Some(UpgradeTo(up)) = upgrade_to {
        return Next::Tunnel(up);
    }
    let body_state = lock(read).body;
    let reusable = match body_state {
        BodyState::Done => true,
        BodyState::Unread(kind) if keep && !switching => {
            discard(read, kind, settings.header_timeout).await
        }
        _ => false,
    };
    if switching || !keep || !reusable {
        let _ = poll_fn(|cx| Pin::new(&mut *w).poll_shutdown(cx)).await;
        return Next::Close;
    }
    Next::KeepAlive
}

/// Read and drop the rest of a request body the proxy answered without, so that the
/// connection can serve the next request: at most [`DISCARD_MAX`] bytes, within
/// `timeout`. `false`: the body is larger, slower or broken, and the connection closes.
async fn discard<I: AsyncRead>(read: &Shared<I>, mut kind: BodyKind, timeout: Duration) -> bool {
    let mut left = DISCARD_MAX;
    let drain = poll_fn(|cx| loop {
        let mut side = lock(read);
        match ready!(read_frame(cx, &mut *side, &mut kind)) {
            Ok(None) => return Poll::Ready(true),
            Ok(Some(frame)) => {
                let n = frame.data_ref().map_or(0, Bytes::len);
                if n > left {
                    return Poll::Ready(false);
                }
                left -= n;
            }
            Err(_) => return Poll::Ready(false),
        }
    });
    let done = matches!(tokio::time::timeout(timeout, drain).await, Ok(true));
    lock(read).body = if done {
        BodyState::Done
    } else {
        BodyState::Broken
    };
    done
}

/// When a timeout that starts now ends; zero means none (a year away).
fn deadline(timeout: Duration) -> Instant {
    let timeout = if timeout.is_zero() {
        Duration::from_secs(365 * 24 * 3600)
    } else {
        timeout
    };
    Instant::now() + timeout
}

/// Resolves when the client's side of the connection closes (or fails) while its
/// request is being served. Bytes that arrive meanwhile (a pipelined request) are kept
/// for later, up to `limit`; a request body still being read is left to its reader.
async fn client_gone<I: AsyncRead>(read: &Shared<I>, limit: usize) {
    poll_fn(|cx| {
        let mut side = lock(read);
        if side.body != BodyState::Done || side.buf.len() >= limit {
            return Poll::Pending;
        }
        match side.poll_fill(cx, READ_SPACE) {
            Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(()),
            // More of a pipelined request: kept, and watched on.
            Poll::Ready(Ok(_)) => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

// Returned once per request and matched at once: boxing the head would cost an
// allocation per request to save a move.
#[allow(clippy::large_enum_variant)]
enum HeadRead {
    Head(Head),
    Http2,
    Closed,
}

/// Read until a head is complete, the connection ends, or a timeout or drain closes it.
async fn read_head<I: AsyncRead>(
    read: &Shared<I>,
    settings: &Settings,
    slots: &mut Vec<Slot>,
    mut timer: Pin<&mut tokio::time::Sleep>,
    shutdown: &mut watch::Receiver<bool>,
    first: bool,
) -> Result<HeadRead, Rejection> {
    // Whether the head has started (then the header timeout runs, not the idle one).
    let mut started = first;
    loop {
        {
            let mut side = lock(read);
            if !side.buf.is_empty() {
                let n = side.buf.len().min(H2_PREFACE.len());
                if first && side.buf[..n] == H2_PREFACE[..n] {
                    // The HTTP/2 preface, or so far the start of it.
                    if n == H2_PREFACE.len() {
                        return Ok(HeadRead::Http2);
                    }
                } else {
                    match parse_head(&mut side.buf, settings.max_headers, slots) {
                        Ok(Some(head)) => return Ok(HeadRead::Head(head)),
                        Ok(None) if side.buf.len() >= settings.max_head => {
                            return Err(Rejection::HeadersTooLarge)
                        }
                        Ok(None) => {}
                        Err(HeadError::TooLarge) => return Err(Rejection::HeadersTooLarge),
                        Err(HeadError::Bad) => return Err(Rejection::BadRequest),
                    }
                }
                if !started {
                    started = true;
                    timer.as_mut().reset(deadline(settings.header_timeout));
                }
            }
        }
        if !wait_more(read, &mut timer, shutdown, started).await? {
            return Ok(HeadRead::Closed);
        }
    }
}

/// Wait for more bytes of a head. `Ok(false)`: the connection is done (closed, idle
/// timeout, drained while idle).
async fn wait_more<I: AsyncRead>(
    read: &Shared<I>,
    timer: &mut Pin<&mut tokio::time::Sleep>,
    shutdown: &mut watch::Receiver<bool>,
    started: bool,
) -> Result<bool, Rejection> {
    let mut fill = pin!(poll_fn(|cx| lock(read).poll_fill_idle(cx, READ_SPACE)));
    loop {
        tokio::select! {
            biased;
            r = fill.as_mut() => return match r {
                Ok(0) | Err(_) => Ok(false),
                Ok(_) => Ok(true),
            },
            () = timer.as_mut() => {
                return if started { Err(Rejection::HeaderTimeout) } else { Ok(false) };
            }
            changed = shutdown.changed(), if !started => {
                if changed.is_err() || *shutdown.borrow() {
                    return Ok(false);
                }
            }
        }
    }
}

/// How the response body goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    /// No body bytes (HEAD, 1xx, 204, 304); the body is still polled to its end.
    None,
    Length(u64),
    Chunked,
    /// Delimited by closing the connection (an HTTP/1.0 client, unknown length).
    Close,
}

struct Out {
    framing: Framing,
    keep_alive: bool,
}

/// Write the status line and headers into `wbuf`, deciding the body's framing.
fn encode_head(
    wbuf: &mut BytesMut,
    parts: &mut http::response::Parts,
    is_head: bool,
    client: Version,
    mut close: bool,
    exact: Option<u64>,
) -> Out {
    let status = parts.status;
    let h = &mut parts.headers;
    // Transfer codings are this hop's business.
    h.remove(header::TRANSFER_ENCODING);
    let framing = if status.is_informational() || status == StatusCode::NO_CONTENT {
        h.remove(header::CONTENT_LENGTH);
        Framing::None
    } else if is_head || status == StatusCode::NOT_MODIFIED {
        // The Content-Length, if any, describes the GET's body: kept as it is.
        Framing::None
    } else if let Some(n) = single_length(h) {
        Framing::Length(n)
    } else {
        // No usable Content-Length (none, unparseable, or several: a filter may have
        // added one): the framing is chosen here and written once.
        h.remove(header::CONTENT_LENGTH);
        if let Some(n) = exact {
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            Framing::Length(n)
        } else if client == Version::HTTP_11 {
            h.insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
            Framing::Chunked
        } else {
            close = true;
            Framing::Close
        }
    };
    let switching = status == StatusCode::SWITCHING_PROTOCOLS;
    if !switching {
        h.remove(header::CONNECTION);
    }
    if !h.contains_key(header::DATE) {
        h.insert(header::DATE, date_now());
    }

    wbuf.reserve(256);
    wbuf.put_slice(b"HTTP/1.1 ");
    wbuf.put_slice(status.as_str().as_bytes());
    wbuf.put_u8(b' ');
    wbuf.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    wbuf.put_slice(b"\r\n");
    for (name, value) in h.iter() {
        wbuf.put_slice(name.as_str().as_bytes());
        wbuf.put_slice(b": ");
        wbuf.put_slice(value.as_bytes());
        wbuf.put_slice(b"\r\n");
    }
    if !switching {
        if close {
            wbuf.put_slice(b"connection: close\r\n");
        } else if client == Version::HTTP_10 {
            wbuf.put_slice(b"connection: keep-alive\r\n");
        }
    }
    wbuf.put_slice(b"\r\n");
    Out {
        framing,
        keep_alive: !close,
    }
}

/// The response's Content-Length when it has exactly one that is a number. Two, even
/// equal, are not passed on: a client that reads the second would frame the body
/// differently.
fn single_length(h: &http::HeaderMap) -> Option<u64> {
    // No name with two values in the whole map (the common case, two field reads): one
    // lookup is enough.
    if h.len() == h.keys_len() {
        return parse_decimal(trim_ows(h.get(header::CONTENT_LENGTH)?.as_bytes()));
    }
    let mut all = h.get_all(header::CONTENT_LENGTH).iter();
    let n = parse_decimal(trim_ows(all.next()?.as_bytes()))?;
    all.next().is_none().then_some(n)
}

/// Why a response could not be written whole.
#[derive(Debug)]
enum WriteError {
    Io,
    /// The body failed, or did not match its Content-Length.
    Body,
}

/// Write `wbuf` (the head) and the body, as the body yields it.
async fn write_body<W, B>(
    w: &mut W,
    wbuf: &mut BytesMut,
    out: &mut Out,
    body: B,
    trailers_ok: bool,
) -> Result<(), WriteError>
where
    W: AsyncWrite + Unpin,
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    let mut body = pin!(body);
    // A large data frame waiting behind `wbuf`, and the chunk's CRLF after it.
    let mut big: Bytes = Bytes::new();
    let mut crlf: &'static [u8] = b"";
    let mut ended = false;
    let mut failed = false;
    let mut left = match out.framing {
        Framing::Length(n) => n,
        _ => 0,
    };
    poll_fn(|cx| loop {
        // Write what is queued first when there is much of it, or at the end.
        if ended || !big.is_empty() || wbuf.len() >= HIGH_WATER {
            ready!(poll_drain(w, cx, wbuf, &mut big, &mut crlf))?;
            if ended {
                ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(|_| WriteError::Io)?;
                return Poll::Ready(if failed {
                    Err(WriteError::Body)
                } else {
                    Ok(())
                });
            }
        }
        match body.as_mut().poll_frame(cx) {
            Poll::Pending => {
                // Nothing more for now: send what is queued while the body waits.
                match poll_drain(w, cx, wbuf, &mut big, &mut crlf) {
                    Poll::Ready(Ok(())) => {
                        ready!(Pin::new(&mut *w).poll_flush(cx)).map_err(|_| WriteError::Io)?;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
                return Poll::Pending;
            }
            Poll::Ready(None) => {
                match out.framing {
                    Framing::Chunked => wbuf.put_slice(b"0\r\n\r\n"),
                    // Shorter than announced: the client must not take it for whole.
                    Framing::Length(_) if left > 0 => failed = true,
                    _ => {}
                }
                ended = true;
            }
            // What came before the failure still goes out (the client sees the head and a
            // truncated body rather than nothing), then the connection closes.
            Poll::Ready(Some(Err(_))) => {
                failed = true;
                ended = true;
            }
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => {
                    if data.is_empty() {
                        continue;
                    }
                    match out.framing {
                        Framing::None => continue,
                        Framing::Length(_) => {
                            if data.len() as u64 > left {
                                // Longer than announced: what fits goes, then the close.
                                failed = true;
                                ended = true;
                                continue;
                            }
                            left -= data.len() as u64;
                        }
                        Framing::Chunked => {
                            use std::fmt::Write;
                            let _ = write!(wbuf, "{:x}\r\n", data.len());
                        }
                        Framing::Close => {}
                    }
                    if data.len() <= COALESCE {
                        wbuf.put_slice(&data);
                        if out.framing == Framing::Chunked {
                            wbuf.put_slice(b"\r\n");
                        }
                    } else {
                        big = data;
                        if out.framing == Framing::Chunked {
                            crlf = b"\r\n";
                        }
                    }
                }
                Err(frame) => {
                    if let (Ok(t), Framing::Chunked) = (frame.into_trailers(), out.framing) {
                        wbuf.put_slice(b"0\r\n");
                        if trailers_ok {
                            for (name, value) in t.iter() {
                                wbuf.put_slice(name.as_str().as_bytes());
                                wbuf.put_slice(b": ");
                                wbuf.put_slice(value.as_bytes());
                                wbuf.put_slice(b"\r\n");
                            }
                        }
                        wbuf.put_slice(b"\r\n");
                        out.framing = Framing::None;
                        ended = true;
                    }
                }
            },
        }
    })
    .await
}

/// Write out `wbuf`, then `big`, then `crlf`, as far as the socket takes them.
fn poll_drain<W: AsyncWrite + Unpin>(
    w: &mut W,
    cx: &mut Context<'_>,
    wbuf: &mut BytesMut,
    big: &mut Bytes,
    crlf: &mut &'static [u8],
) -> Poll<Result<(), WriteError>> {
    while !(wbuf.is_empty() && big.is_empty() && crlf.is_empty()) {
        let n = if w.is_write_vectored() {
            let bufs = [IoSlice::new(wbuf), IoSlice::new(big), IoSlice::new(crlf)];
            ready!(Pin::new(&mut *w).poll_write_vectored(cx, &bufs))
        } else if !wbuf.is_empty() {
            ready!(Pin::new(&mut *w).poll_write(cx, wbuf))
        } else if !big.is_empty() {
            ready!(Pin::new(&mut *w).poll_write(cx, big))
        } else {
            ready!(Pin::new(&mut *w).poll_write(cx, crlf))
        }
        .map_err(|_| WriteError::Io)?;
        if n == 0 {
            return Poll::Ready(Err(WriteError::Io));
        }
        let mut n = n;
        let a = n.min(wbuf.len());
        wbuf.advance(a);
        n -= a;
        let b = n.min(big.len());
        big.advance(b);
        n -= b;
        *crlf = &crlf[n.min(crlf.len())..];
    }
    Poll::Ready(Ok(()))
}

async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, bytes: &[u8]) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    w.write_all(bytes).await?;
    w.flush().await
}

/// An answer from the server itself (a head it could not take), then the connection closes.
async fn write_simple<W: AsyncWrite + Unpin>(
    w: &mut W,
    status: StatusCode,
    text: &str,
) -> io::Result<()> {
    let wire = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        text.len(),
    );
    write_all(w, wire.as_bytes()).await?;
    poll_fn(|cx| Pin::new(&mut *w).poll_shutdown(cx)).await
}

/// Splice the client's connection (with what it sent after the head) to the upstream's.
async fn tunnel<I>(read: Shared<I>, w: WriteHalf<I>, up: hyper::upgrade::OnUpgrade, idle: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(side) = Arc::try_unwrap(read) else {
        return;
    };
    let side = side.into_inner().unwrap_or_else(|e| e.into_inner());
    let down = Prefixed {
        prefix: side.buf.freeze(),
        io: side.io.unsplit(w),
    };
    let Ok(up) = up.await else {
        return;
    };
    crate::idle::tunnel(down, hyper_util::rt::TokioIo::new(up), idle).await;
}

/// `Date` for responses without one, rendered once a second per thread.
fn date_now() -> HeaderValue {
    use std::cell::RefCell;
    use std::time::SystemTime;
    thread_local! {
        static CACHE: RefCell<(u64, HeaderValue)> =
            const { RefCell::new((u64::MAX, HeaderValue::from_static(""))) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let text = httpdate::fmt_http_date(now);
            c.1 = HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""));
            c.0 = secs;
        }
        c.1.clone()
    })
}

/// A connection with bytes already read off it in front: they are read first.
pub struct Prefixed<I> {
    prefix: Bytes,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;
    use http_body_util::{BodyExt, Full, StreamBody};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn settings() -> Settings {
        Settings {
            max_head: 8192,
            max_headers: 20,
            header_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(5),
            stream_idle_timeout: Duration::from_secs(5),
        }
    }

    fn parse(wire: &[u8]) -> Result<Option<Head>, HeadError> {
        parse_head(&mut BytesMut::from(wire), 20, &mut Vec::new())
    }

    fn head(wire: &[u8]) -> Head {
        match parse(wire) {
            Ok(Some(h)) => h,
            _ => panic!("no head in {:?}", String::from_utf8_lossy(wire)),
        }
    }

    #[test]
    fn heads_decide_body_and_keep_alive() {
        let h = head(b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello");
        assert_eq!(h.body, BodyKind::Length(5));
        assert!(h.keep_alive);
        assert_eq!(h.parts.uri, "/a?b=1");
        assert_eq!(h.parts.headers["host"], "x");

        let h = head(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n");
        assert_eq!(
            h.body,
            BodyKind::Done,
            "a coding other than chunked is untrusted"
        );
        assert!(!h.keep_alive);

        let h = head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(h.body, BodyKind::Chunked(Chunk::Size));

        for untrusted in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3x\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3, 4\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: \r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
        ] {
            let h = head(untrusted);
            let what = String::from_utf8_lossy(untrusted);
            assert_eq!(h.body, BodyKind::Done, "{what:?}");
            assert!(!h.keep_alive);
            assert!(
                h.parts.extensions.get::<UntrustedFraming>().is_some(),
                "the request path must refuse it: {what:?}"
            );
        }
        // Repeated or listed equal lengths are one length (RFC 9110 §8.6), sent on as one.
        for repeated in [
            &b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\nContent-Length: 3, 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 3,3\r\nContent-Length: 3\r\n\r\n",
        ] {
            let h = head(repeated);
            let what = String::from_utf8_lossy(repeated);
            assert_eq!(h.body, BodyKind::Length(3), "{what:?}");
            let lengths: Vec<_> = h
                .parts
                .headers
                .get_all(header::CONTENT_LENGTH)
                .iter()
                .collect();
            assert_eq!(lengths, ["3"], "{what:?}");
            assert!(h.parts.extensions.get::<UntrustedFraming>().is_none());
        }

        assert!(!head(b"GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
        assert!(!head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").keep_alive);

        let h = head(b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n");
        assert!(h.upgrade);
        let h = head(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n");
        assert!(h.expect_continue);
        assert!(
            !h.parts.headers.contains_key(header::EXPECT),
            "answered, not forwarded"
        );
    }

    #[test]
    fn bad_and_partial_heads() {
        assert!(matches!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None)));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n"),
            Err(HeadError::Bad)
        ));
        assert!(matches!(
            parse(b"G@T / HTTP/1.1\r\n\r\n"),
            Err(HeadError::Bad)
        ));
        let many: String = (0..30).map(|i| format!("h{i}: v\r\n")).collect();
        let wire = format!("GET / HTTP/1.1\r\n{many}\r\n");
        assert!(matches!(parse(wire.as_bytes()), Err(HeadError::TooLarge)));
    }

    /// Serve `client`'s other end with a service that answers every request with its
    /// method, path and body.
    fn echo_server(s: Settings) -> (DuplexStream, tokio::task::JoinHandle<bool>) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (_tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let _tx = _tx;
            let served = serve(
                server,
                &s,
                rx,
                |_| {},
                |req: Request<RequestBody<DuplexStream>>| async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let text = format!(
                        "{} {} {}",
                        parts.method,
                        parts.uri,
                        String::from_utf8_lossy(&body)
                    );
                    Response::new(Full::new(Bytes::from(text)))
                },
            )
            .await;
            matches!(served, Served::Http2(_))
        });
        (client, task)
    }

    /// Serve `client`'s other end with a service that answers every request with its
    /// path, without reading its body.
    fn path_server() -> (DuplexStream, tokio::task::JoinHandle<()>) {
        let (client, server) = tokio::io::duplex(1 << 20);
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            let _tx = tx;
            serve(
                server,
                &settings(),
                rx,
                |_| {},
                |req: Request<RequestBody<DuplexStream>>| {
                    let path = req.uri().path().to_string();
                    async move { Response::new(Full::new(Bytes::from(path))) }
                },
            )
            .await;
        });
        (client, task)
    }

    async fn read_all(c: &mut DuplexStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn an_idle_connection_holds_no_read_buffer() {
        // The test's runtime runs the server on this thread, so the buffer pool it gives
        // to is this thread's.
        let (mut c, _task) = path_server();
        for path in ["/one", "/two"] {
            c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .expect("write");
            let mut got = Vec::new();
            while !got.ends_with(path.as_bytes()) {
                let mut b = [0u8; 256];
                let n = c.read(&mut b).await.expect("read");
                assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&b[..n]);
            }
            assert!(got.starts_with(b"HTTP/1.1 200 OK\r\n"));
            // Waiting for the next request, the connection gives its read buffer back.
            let mut lent = BytesMut::new();
            for _ in 0..100 {
                lent = crate::buf_pool::take();
                if lent.capacity() > 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            assert!(lent.capacity() > 0, "no read buffer came back after {path}");
            // The next request borrows it again.
            crate::buf_pool::give(lent);
        }
    }

    #[tokio::test]
    async fn pipelined_requests_and_bodies_are_served_in_order() {
        let (mut c, task) = echo_server(settings());
        c.write_all(
            b"POST /one HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n\
              PUT /two HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nxyz\
              HEAD /three HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await
        .expect("write");
        let out = read_all(&mut c).await;
        assert!(!task.await.expect("server task"));
        let replies: Vec<&str> = out.split("HTTP/1.1 ").filter(|r| !r.is_empty()).collect();
        assert_eq!(replies.len(), 3, "{out}");
        assert!(replies[0].starts_with("200 OK\r\n"), "{out}");
        assert!(replies[0].contains("content-length: 15\r\n"), "{out}");
        assert!(replies[0].ends_with("\r\n\r\nPOST /one abcde"), "{out}");
        assert!(replies[1].ends_with("\r\n\r\nPUT /two xyz"), "{out}");
        // HEAD: no body (the service set no length, so none is sent).
        assert!(!replies[2].contains("content-length"), "{out}");
        assert!(replies[2].contains("connection: close\r\n"), "{out}");
        assert!(replies[2].ends_with("\r\n\r\n"), "{out}");
    }

    #[tokio::test]
    async fn an_unread_body_that_arrived_whole_keeps_the_connection() {
        let (mut client, _task) = path_server();
        client
            .write_all(
                b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\nConnection: close\r\n\r\n",
            )
            .await
            .expect("write");
        let out = read_all(&mut client).await;
        assert!(
            out.contains("\r\n\r\n/a") && out.ends_with("\r\n\r\n/b"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn an_unread_body_arriving_later_is_discarded_up_to_a_limit() {
        let (mut client, task) = path_server();
        // The answer comes before the body: the body follows, and the next request.
        client
            .write_all(b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            .await
            .expect("write");
        let mut buf = vec![0u8; 4096];
        let n = client.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("\r\n\r\n/a"));
        client
            .write_all(b"5\r\nhello\r\n0\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
            .await
            .expect("write");
        let n = client.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("\r\n\r\n/b"));

        // Past the limit: the connection closes instead.
        let big = format!("POST /c HTTP/1.1\r\nContent-Length: {}\r\n\r\n", 1 << 20);
        client.write_all(big.as_bytes()).await.expect("write");
        let n = client.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("\r\n\r\n/c"));
        let _ = client.write_all(&vec![b'x'; 128 * 1024]).await;
        let out = read_all(&mut client).await;
        assert_eq!(out, "", "closed without another answer");
        task.await.expect("server task");
    }

    #[tokio::test]
    async fn expect_continue_is_answered_before_the_body_is_read() {
        let (mut c, _task) = echo_server(settings());
        c.write_all(
            b"PUT /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n",
        )
        .await
        .expect("write");
        let mut buf = [0u8; 25];
        c.read_exact(&mut buf).await.expect("read");
        assert_eq!(&buf, b"HTTP/1.1 100 Continue\r\n\r\n");
        c.write_all(b"ok").await.expect("write");
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).await.expect("read");
        assert!(String::from_utf8_lossy(&buf[..n]).ends_with("PUT /up ok"));
    }

    #[tokio::test]
    async fn bad_heads_are_answered_and_the_connection_closed() {
        let (mut c, _task) = echo_server(settings());
        c.write_all(b"GET / HTTP/1.1\r\nx: a\r\n b\r\n\r\n")
            .await
            .expect("write");
        let out = read_all(&mut c).await;
        assert!(out.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{out}");
        assert!(out.contains("connection: close"), "{out}");

        let (mut c, _task) = echo_server(settings());
        let big = "a".repeat(10_000);
        c.write_all(format!("GET / HTTP/1.1\r\nx: {big}\r\n\r\n").as_bytes())
            .await
            .expect("write");
        let out = read_all(&mut c).await;
        assert!(
            out.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
            "{out}"
        );
    }

    #[tokio::test]
    async fn an_http2_preface_is_handed_back() {
        let (mut c, task) = echo_server(settings());
        c.write_all(H2_PREFACE).await.expect("write");
        assert!(task.await.expect("server task"), "served as HTTP/2");
    }

    #[test]
    fn a_response_goes_out_with_one_framing() {
        // Headers as a filter may leave them: repeated or conflicting lengths, a
        // Transfer-Encoding of its own. The client must see exactly one framing.
        fn head(headers: &[(&str, &str)], exact: Option<u64>) -> (String, Framing) {
            let mut b = http::Response::builder().status(200);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            let (mut parts, ()) = b.body(()).expect("response").into_parts();
            let mut wbuf = BytesMut::new();
            let out = encode_head(&mut wbuf, &mut parts, false, Version::HTTP_11, false, exact);
            let text = String::from_utf8_lossy(&wbuf).to_lowercase();
            (text, out.framing)
        }
        let count = |t: &str, h: &str| t.matches(&format!("\r\n{h}:")).count();
        let (t, f) = head(&[("content-length", "3"), ("content-length", "3")], Some(3));
        assert_eq!(
            (count(&t, "content-length"), f),
            (1, Framing::Length(3)),
            "{t}"
        );
        let (t, f) = head(&[("content-length", "3"), ("content-length", "9")], None);
        assert_eq!(
            (
                count(&t, "content-length"),
                count(&t, "transfer-encoding"),
                f
            ),
            (0, 1, Framing::Chunked),
            "{t}"
        );
        let (t, f) = head(
            &[("content-length", "abc"), ("transfer-encoding", "gzip")],
            Some(3),
        );
        assert_eq!(
            (
                count(&t, "content-length"),
                count(&t, "transfer-encoding"),
                f
            ),
            (1, 0, Framing::Length(3)),
            "{t}"
        );
        assert!(t.contains("\r\ncontent-length: 3\r\n"), "{t}");
        let (t, f) = head(&[("content-length", "7")], Some(3));
        assert_eq!(
            f,
            Framing::Length(7),
            "a stated length is the body's to meet: {t}"
        );
    }

    #[tokio::test]
    async fn response_framing_follows_the_body_and_the_client() {
        async fn one(wire: &'static [u8], frames: Vec<Result<Frame<Bytes>, BoxError>>) -> String {
            let (mut client, server) = tokio::io::duplex(1 << 20);
            let (_tx, rx) = watch::channel(false);
            let frames = std::sync::Mutex::new(Some(frames));
            let task = tokio::spawn(async move {
                serve(server, &settings(), rx, |_| {}, |_req| {
                    let frames = frames.lock().expect("frames").take().unwrap_or_default();
                    async move {
                        Response::new(StreamBody::new(futures_util::stream::iter(frames)))
                    }
                })
                .await;
            });
            client.write_all(wire).await.expect("write");
            let out = read_all(&mut client).await;
            task.await.expect("the server task");
            out
        }
        let data = |s: &'static str| Ok(Frame::data(Bytes::from_static(s.as_bytes())));
        // Unknown length, HTTP/1.1: chunked, with the client's permission for trailers.
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        let out = one(
            b"GET / HTTP/1.1\r\nTE: trailers\r\nConnection: close\r\n\r\n",
            vec![data("ab"), data("cde"), Ok(Frame::trailers(trailers))],
        )
        .await;
        assert!(out.contains("transfer-encoding: chunked\r\n"), "{out}");
        assert!(
            out.ends_with("\r\n\r\n2\r\nab\r\n3\r\ncde\r\n0\r\ngrpc-status: 0\r\n\r\n"),
            "{out}"
        );
        // HTTP/1.0: delimited by the close.
        let out = one(b"GET / HTTP/1.0\r\n\r\n", vec![data("ab"), data("cd")]).await;
        assert!(!out.contains("transfer-encoding"), "{out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nabcd"), "{out}");
        // A body that fails: the chunked message is left unterminated and the connection closed.
        let out = one(
            b"GET / HTTP/1.1\r\n\r\n",
            vec![data("ab"), Err("upstream reset".into())],
        )
        .await;
        assert!(out.ends_with("\r\n\r\n2\r\nab\r\n"), "{out}");
    }
}
