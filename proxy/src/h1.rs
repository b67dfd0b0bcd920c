//! Upstream HTTP/1.1 exchanges, driven by the request's own task.
//!
//! hyper's client runs every connection as a task of its own and hands it each request
//! over a channel, then hands the response back over another: per request, a channel
//! round trip and two more task wake-ups, a large share of a proxied request's CPU. Here
//! the task serving the request writes the request and reads the response itself, as an
//! event-loop proxy does: the response body reads from the connection as it is polled,
//! and gives the connection back to its pool (`pool::ClusterPools`) when the message
//! ended cleanly. A small response costs one write and one read.
//!
//! Protocol switches (WebSocket) still go through hyper's client, which can hand the
//! socket over.
//!
//! Framing follows RFC 9112 §6. A request goes out with its Content-Length when it has
//! one (or its body's exact size), chunked otherwise, and nothing when it has no body. A
//! response body is empty (HEAD, 204, 304), chunked, Content-Length delimited or read to
//! the connection's close; interim 1xx answers are skipped. Anything malformed is an
//! error, never a guess, and the connection is not reused after it.
//!
//! While the response streams, a request body that is still being sent (the upstream
//! answered early) is sent from the response body's polls. If the response ends first,
//! the rest of the request is dropped and so is the connection.

use crate::cluster::{Body, BoxError, UpstreamConn};
use crate::text::{chunk_size, each_list_item, has_token, last_token_is, parse_decimal};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, Version};
use http_body::{Body as _, Frame, SizeHint};
use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::AsyncWrite;

/// The largest response head accepted (status line and headers); HTTP/2 upstreams get
/// the same limit (`pool`).
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The most response headers accepted.
const MAX_HEADERS: usize = 128;
/// Extra room in a response's header map (see `parse_head`).
const SPARE_HEADERS: usize = 16;
/// The longest chunk-size line (extensions included) of a chunked response.
const MAX_CHUNK_LINE: usize = 4096;
/// The largest trailer section of a chunked response.
const MAX_TRAILERS: usize = 64 * 1024;
/// Request body frames up to this size are copied behind what is queued, so a small
/// request goes out in one write.
const COALESCE: usize = 8 * 1024;
/// Free space kept in the read buffer before each read.
const READ_SPACE: usize = 8 * 1024;
/// Reads grow to this much free space once a body is streaming.
const READ_SPACE_BODY: usize = 32 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("upstream connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("upstream closed the connection before the response")]
    ClosedBeforeResponse,
    #[error("upstream closed the connection mid-response")]
    ClosedMidBody,
    #[error("invalid response from upstream: {0}")]
    Invalid(&'static str),
    /// The body being sent (the downstream's) failed or did not match its length.
    #[error("request body failed: {0}")]
    RequestBody(#[source] BoxError),
}

impl Error {
    /// Whether the request's body is at fault rather than the upstream.
    pub fn is_request_body(&self) -> bool {
        matches!(self, Error::RequestBody(_))
    }
}

/// An upstream HTTP/1.1 connection between exchanges.
pub struct Conn {
    io: UpstreamConn,
    rbuf: BytesMut,
    /// Whether an exchange already completed on it (a pooled connection).
    reused: bool,
}

impl Conn {
    pub fn new(io: UpstreamConn) -> Self {
        Self {
            io,
            rbuf: BytesMut::new(),
            reused: false,
        }
    }

    /// The upstream's SPIFFE ID (mTLS clusters).
    pub fn peer(&self) -> &Option<std::sync::Arc<str>> {
        &self.io.peer_identity
    }

    pub fn is_reused(&self) -> bool {
        self.reused
    }

    /// Whether an idle connection can take a request: nothing arrived while it sat in the
    /// pool (anything would be a close, an error or garbage). Costs a read only when the
    /// event loop saw the socket become readable.
    pub fn is_usable(&mut self) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        match self.io.tcp().poll_read_ready(&mut cx) {
            Poll::Pending => return true,
            Poll::Ready(Err(_)) => return false,
            Poll::Ready(Ok(())) => {}
        }
        // Readable: most likely the upstream's FIN. Over TLS it may also be a record that
        // carries no data (a session ticket), which leaves the connection usable.
        match self.poll_fill(&mut cx, READ_SPACE) {
            Poll::Pending => {
                let usable = self.rbuf.is_empty();
                // Still idle: it keeps no buffer.
                self.release_buffer();
                usable
            }
            Poll::Ready(_) => false,
        }
    }

    /// Going idle in a pool: the read buffer goes back to the worker's (see `buf_pool`).
    pub fn release_buffer(&mut self) {
        crate::buf_pool::release(&mut self.rbuf);
    }

    fn poll_fill(&mut self, cx: &mut Context<'_>, space: usize) -> Poll<io::Result<usize>> {
        poll_fill(Pin::new(&mut self.io), cx, &mut self.rbuf, space)
    }
}

/// Read more from `io` into `buf`, first making room for `space` bytes if less than half
/// of that is free. A connection that gave its buffer back while idle borrows one from
/// the worker's pool (see `buf_pool`).
pub(crate) fn poll_fill<R: tokio::io::AsyncRead + ?Sized>(
    io: Pin<&mut R>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    space: usize,
) -> Poll<io::Result<usize>> {
    if buf.capacity() == 0 {
        *buf = crate::buf_pool::take();
    }
    if buf.capacity() - buf.len() < space / 2 {
        buf.reserve(space);
    }
    tokio_util::io::poll_read_buf(io, cx, buf)
}

/// How the request body is framed on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
enum ReqFraming {
    /// No body.
    None,
    /// Content-Length: this many bytes still to send.
    Length(u64),
    Chunked,
}

/// A request on its way out: encoded bytes not yet written, then the body still to send.
pub struct Outgoing {
    /// Encoded bytes to write, in order: `first` from `first_off` on, then `rest`. A
    /// request without a streamed body is all in `first` and never touches `rest` (no
    /// allocation).
    first: Bytes,
    first_off: usize,
    rest: VecDeque<Bytes>,
    body: Option<Body>,
    framing: ReqFraming,
    /// Everything is encoded, only writes (and a flush) remain.
    body_done: bool,
    flushed: bool,
    /// The whole request was encoded up front (into `first`): it can be sent again.
    whole: bool,
    /// A body failure met while encoding ahead, reported by the next `poll_send`.
    failed: Option<Error>,
    /// Writing failed: the upstream stopped reading (it may still have answered). Kept
    /// to report if no answer comes.
    aborted: Option<Error>,
    head_request: bool,
}

impl Outgoing {
    /// Encode the head (and, when it is already at hand, a small body behind it).
    pub fn new(parts: &http::request::Parts, body: Body) -> Self {
        // Without a body (most requests) the headers are not searched for a length.
        let framing = if body.is_end_stream() {
            ReqFraming::None
        } else {
            match (content_length(&parts.headers), body.size_hint().exact()) {
                (Some(n), _) | (None, Some(n)) => ReqFraming::Length(n),
                (None, None) => ReqFraming::Chunked,
            }
        };
        let mut b = BytesMut::with_capacity(head_size(parts));
        b.put_slice(parts.method.as_str().as_bytes());
        b.put_u8(b' ');
        b.put_slice(
            parts
                .uri
                .path_and_query()
                .map(|p| p.as_str())
                .filter(|p| !p.is_empty())
                .unwrap_or("/")
                .as_bytes(),
        );
        b.put_slice(b" HTTP/1.1\r\n");
        // Framing is this client's to decide, and is written once: a Transfer-Encoding
        // or Content-Length in the headers (a filter's, a length the client repeated, a
        // length on a body that turned out empty) is not copied. Some upstreams refuse a
        // repeated Content-Length even when the values agree; one left on an empty body
        // would have the upstream wait for bytes that never come.
        let mut had_length = false;
        for (name, value) in &parts.headers {
            if name == header::TRANSFER_ENCODING || name == header::CONTENT_LENGTH {
                had_length |= name == header::CONTENT_LENGTH;
                continue;
            }
            b.put_slice(name.as_str().as_bytes());
            b.put_slice(b": ");
            b.put_slice(value.as_bytes());
            b.put_slice(b"\r\n");
        }
        let length = match framing {
            ReqFraming::Length(n) => Some(n),
            // An explicit empty length (a POST without a body) stays explicit.
            ReqFraming::None if had_length => Some(0),
            ReqFraming::None => None,
            ReqFraming::Chunked => {
                b.put_slice(b"transfer-encoding: chunked\r\n");
                None
            }
        };
        if let Some(n) = length {
            b.put_slice(b"content-length: ");
            b.put_slice(crate::text::u64_decimal(n, &mut [0; 20]));
            b.put_slice(b"\r\n");
        }
        b.put_slice(b"\r\n");
        let mut out = Outgoing {
            first: Bytes::new(),
            first_off: 0,
            rest: VecDeque::new(),
            body: None,
            framing,
            body_done: framing == ReqFraming::None,
            flushed: false,
            whole: false,
            failed: None,
            aborted: None,
            head_request: parts.method == Method::HEAD,
        };
        if !out.body_done {
            out.body = Some(body);
            // A body already in memory (a small POST, a replayed retry) joins the head.
            out.pull_ready(&mut b);
        }
        out.whole = out.body_done && out.rest.is_empty() && out.failed.is_none();
        out.first = b.freeze();
        out
    }

    /// The same request, to be sent from its start on another connection; `None` when
    /// part of it was streamed (and is gone).
    fn rewind(mut self) -> Option<Outgoing> {
        if !self.whole {
            return None;
        }
        self.first_off = 0;
        self.flushed = false;
        self.aborted = None;
        Some(self)
    }

    /// Move body frames that are ready without waiting into `b` while they are small.
    /// Stops at the first frame queued in `rest` (a large one): `b` goes out first, so a
    /// later frame copied into it would overtake that one.
    fn pull_ready(&mut self, b: &mut BytesMut) {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        while !self.body_done && b.len() < COALESCE && self.rest.is_empty() {
            let Some(body) = self.body.as_mut() else {
                return;
            };
            let result = match Pin::new(body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => self.encode_frame(frame, Some(b)),
                Poll::Ready(None) => self.encode_end(Some(b)),
                Poll::Ready(Some(Err(e))) => Err(Error::RequestBody(e)),
                Poll::Pending => return,
            };
            if let Err(e) = result {
                // Reported by the first real poll; the body is not polled again.
                self.failed = Some(e);
                self.body = None;
                return;
            }
        }
    }

    /// Queue one body frame: into `inline` when given (and the data is small), else as
    /// its own slices.
    fn encode_frame(
        &mut self,
        frame: Frame<Bytes>,
        mut inline: Option<&mut BytesMut>,
    ) -> Result<(), Error> {
        match frame.into_data() {
            Ok(data) => {
                if data.is_empty() {
                    return Ok(());
                }
                match &mut self.framing {
                    ReqFraming::Length(left) => {
                        if data.len() as u64 > *left {
                            return Err(Error::RequestBody(
                                "request body longer than its Content-Length".into(),
                            ));
                        }
                        *left -= data.len() as u64;
                        self.push(data, inline);
                    }
                    ReqFraming::Chunked => {
                        let size = format!("{:x}\r\n", data.len());
                        match inline.as_deref_mut() {
                            Some(b) if data.len() <= COALESCE => {
                                b.put_slice(size.as_bytes());
                                b.put_slice(&data);
                                b.put_slice(b"\r\n");
                            }
                            _ => {
                                self.push(Bytes::from(size), inline.as_deref_mut());
                                self.rest.push_back(data);
                                self.rest.push_back(Bytes::from_static(b"\r\n"));
                            }
                        }
                    }
                    ReqFraming::None => {
                        return Err(Error::RequestBody("request body after its end".into()))
                    }
                }
                Ok(())
            }
            Err(frame) => {
                // Trailers go out only with chunked framing; with a length they are dropped
                // (HTTP/1.1 has nowhere else to put them).
                if let (Ok(trailers), ReqFraming::Chunked) = (frame.into_trailers(), self.framing) {
                    let mut t = BytesMut::from(&b"0\r\n"[..]);
                    for (n, v) in &trailers {
                        t.put_slice(n.as_str().as_bytes());
                        t.put_slice(b": ");
                        t.put_slice(v.as_bytes());
                        t.put_slice(b"\r\n");
                    }
                    t.put_slice(b"\r\n");
                    self.push(t.freeze(), inline);
                    // The last chunk is written: nothing may follow.
                    self.framing = ReqFraming::None;
                    self.finish_body();
                }
                Ok(())
            }
        }
    }

    /// The body ended: close the framing.
    fn encode_end(&mut self, inline: Option<&mut BytesMut>) -> Result<(), Error> {
        match self.framing {
            ReqFraming::Length(0) | ReqFraming::None => {}
            ReqFraming::Length(_) => {
                return Err(Error::RequestBody(
                    "request body shorter than its Content-Length".into(),
                ))
            }
            ReqFraming::Chunked => self.push(Bytes::from_static(b"0\r\n\r\n"), inline),
        }
        self.finish_body();
        Ok(())
    }

    fn finish_body(&mut self) {
        self.body_done = true;
        self.body = None;
    }

    fn push(&mut self, data: Bytes, inline: Option<&mut BytesMut>) {
        match inline {
            Some(b) if data.len() <= COALESCE => b.put_slice(&data),
            _ => self.rest.push_back(data),
        }
    }

    fn is_sent(&self) -> bool {
        self.body_done
            && self.flushed
            && self.aborted.is_none()
            && self.first_off == self.first.len()
            && self.rest.is_empty()
    }

    /// Write what is queued and pull the body, until everything is sent (`Ready`) or the
    /// socket or the body has to wait (`Pending`).
    fn poll_send(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut UpstreamConn,
    ) -> Poll<Result<(), Error>> {
        if let Some(e) = self.failed.take() {
            return Poll::Ready(Err(e));
        }
        loop {
            if self.first_off == self.first.len() {
                if let Some(next) = self.rest.pop_front() {
                    self.first = next;
                    self.first_off = 0;
                    continue;
                }
                if self.body_done {
                    if !self.flushed {
                        ready!(Pin::new(&mut *io).poll_flush(cx))?;
                        self.flushed = true;
                    }
                    return Poll::Ready(Ok(()));
                }
                let Some(body) = self.body.as_mut() else {
                    self.body_done = true;
                    continue;
                };
                match ready!(Pin::new(body).poll_frame(cx)) {
                    Some(Ok(frame)) => self.encode_frame(frame, None)?,
                    Some(Err(e)) => return Poll::Ready(Err(Error::RequestBody(e))),
                    None => self.encode_end(None)?,
                }
                continue;
            }
            let n = if !self.rest.is_empty() && io.is_write_vectored() {
                let mut slices = [io::IoSlice::new(&[]); 8];
                slices[0] = io::IoSlice::new(&self.first[self.first_off..]);
                let mut k = 1;
                for b in self.rest.iter().take(7) {
                    slices[k] = io::IoSlice::new(b);
                    k += 1;
                }
                ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k]))?
            } else {
                ready!(Pin::new(&mut *io).poll_write(cx, &self.first[self.first_off..]))?
            };
            if n == 0 {
                return Poll::Ready(Err(Error::Io(io::ErrorKind::WriteZero.into())));
            }
            self.flushed = false;
            self.advance(n);
        }
    }

    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let take = n.min(self.first.len() - self.first_off);
            self.first_off += take;
            n -= take;
            if self.first_off == self.first.len() {
                match self.rest.pop_front() {
                    Some(next) => {
                        self.first = next;
                        self.first_off = 0;
                    }
                    None => break,
                }
            }
        }
    }
}

/// A rough size for the encoded head, so it is written into one allocation.
fn head_size(parts: &http::request::Parts) -> usize {
    let mut n = 64 + parts.uri.path_and_query().map_or(1, |p| p.as_str().len());
    for (k, v) in &parts.headers {
        n += k.as_str().len() + v.len() + 4;
    }
    n
}

/// The request's Content-Length, when it has exactly one valid value.
fn content_length(h: &HeaderMap) -> Option<u64> {
    let mut it = h.get_all(header::CONTENT_LENGTH).iter();
    let first = it.next()?;
    let n = parse_decimal(first.as_bytes())?;
    for v in it {
        if parse_decimal(v.as_bytes()) != Some(n) {
            return None;
        }
    }
    Some(n)
}

/// Send `out` on `conn` and wait for the response head. The response body reads the rest
/// from the connection and hands the connection to `home` once the exchange ended cleanly.
pub async fn exchange(
    mut conn: Conn,
    mut out: Outgoing,
    home: Home,
) -> Result<Response<ResponseBody>, Failed> {
    let mut got_bytes = false;
    let head = std::future::poll_fn(|cx| poll_head(cx, &mut conn, &mut out, &mut got_bytes)).await;
    let head = head.and_then(|(parts, mut kind, keep_alive)| {
        if let BodyKind::Chunked(Chunk::Size) = kind {
            // A first chunk line that is already here is checked now: broken framing
            // found before the response is handed on is a clean 503, not a response
            // that breaks off before its first byte.
            match decode_chunk(&mut conn.rbuf, Chunk::Size)? {
                Step::Next(next) => kind = BodyKind::Chunked(next),
                Step::More => {}
                Step::Frame(..) | Step::End(_) => {}
            }
        }
        Ok((parts, kind, keep_alive))
    });
    match head {
        Ok((parts, kind, keep_alive)) => {
            conn.reused = true;
            let out = (!out.is_sent()).then(|| Box::new(out));
            let mut body = ResponseBody {
                conn: Some(conn),
                out,
                kind,
                keep_alive,
                home: Some(home),
            };
            if kind == BodyKind::Length(0) {
                // No body to read (HEAD, 204, 304, an empty one): whoever takes the
                // response sees its end without polling it, so the connection goes back now.
                body.finish();
            }
            Ok(Response::from_parts(parts, body))
        }
        Err(error) => {
            // A connection that served an exchange before and gave nothing back this time
            // was most likely closed by the upstream while idle, as the request went out.
            let stale = conn.reused
                && !got_bytes
                && matches!(&error, Error::ClosedBeforeResponse | Error::Io(_));
            Err(Failed {
                error,
                retry: if stale { out.rewind() } else { None },
            })
        }
    }
}

/// An exchange that failed before its response head.
pub struct Failed {
    pub error: Error,
    /// The request, when it may go again on a new connection: the pooled connection it
    /// went out on turned out to be closed, and nothing of it was streamed. Only an
    /// idempotent request should be (RFC 9110 §9.2.2).
    pub retry: Option<Outgoing>,
}

fn poll_head(
    cx: &mut Context<'_>,
    conn: &mut Conn,
    out: &mut Outgoing,
    got_bytes: &mut bool,
) -> Poll<Result<(http::response::Parts, BodyKind, bool), Error>> {
    loop {
        // Send while there is something to send; an early answer is read all the same.
        if out.aborted.is_none() && !out.is_sent() {
            match out.poll_send(cx, &mut conn.io) {
                Poll::Ready(Err(e)) if e.is_request_body() => return Poll::Ready(Err(e)),
                Poll::Ready(Err(e)) => {
                    // The upstream stopped reading; it may have answered (a 413, say).
                    out.aborted = Some(e);
                }
                _ => {}
            }
        }
        if !conn.rbuf.is_empty() {
            if let Some(head) = parse_head(&mut conn.rbuf, out.head_request)? {
                return Poll::Ready(Ok(head));
            }
            if conn.rbuf.len() >= MAX_HEAD {
                return Poll::Ready(Err(Error::Invalid("response head too large")));
            }
        }
        // After a failed write the read side decides: an answer, or the close.
        match ready!(conn.poll_fill(cx, READ_SPACE)) {
            Ok(0) => {
                return Poll::Ready(Err(if let Some(e) = out.aborted.take() {
                    e
                } else if conn.rbuf.is_empty() {
                    Error::ClosedBeforeResponse
                } else {
                    Error::Invalid("response head cut short")
                }))
            }
            Ok(_) => *got_bytes = true,
            Err(e) => return Poll::Ready(Err(out.aborted.take().unwrap_or(Error::Io(e)))),
        }
    }
}

/// Parse a response head from the front of `buf`, skipping interim (1xx) responses.
/// `None`: more bytes are needed.
fn parse_head(
    buf: &mut BytesMut,
    head_request: bool,
) -> Result<Option<(http::response::Parts, BodyKind, bool)>, Error> {
    loop {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let status = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            buf,
            &mut headers,
        );
        let len = match status {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(Error::Invalid("too many response headers"))
            }
            Err(_) => return Err(Error::Invalid("malformed response head")),
        };
        let code = resp.code.unwrap_or(0);
        if (100..200).contains(&code) {
            if code == 101 {
                return Err(Error::Invalid(
                    "101 Switching Protocols to a request that asked for no upgrade",
                ));
            }
            buf.advance(len);
            continue;
        }
        let status =
            StatusCode::from_u16(code).map_err(|_| Error::Invalid("invalid status code"))?;
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        // Header values point into the head, which is kept as shared bytes: no copies.
        let base = buf.as_ptr() as usize;
        // (name start, name length, value start, value length); heads are under 64 KiB.
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        let n = resp.headers.len();
        for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
            let ns = h.name.as_ptr() as usize - base;
            let vs = h.value.as_ptr() as usize - base;
            *span = (
                ns as u32,
                h.name.len() as u32,
                vs as u32,
                h.value.len() as u32,
            );
        }
        let head = buf.split_to(len).freeze();
        // Room to spare: once hyper has written this response downstream, it keeps the
        // map for the next request on that connection, and the headers this proxy adds to
        // a request (x-request-id, x-forwarded-*, traceparent) then fit without a rehash.
        let mut map = crate::header_pool::take(n + SPARE_HEADERS);
        let mut te_chunked = None;
        let mut lengths: Option<Result<u64, ()>> = None;
        let mut lengths_repeated = false;
        let mut close = version == Version::HTTP_10;
        for &(ns, nl, vs, vl) in &spans[..n] {
            let (ns, nl, vs, vl) = (ns as usize, nl as usize, vs as usize, vl as usize);
            let name = HeaderName::from_bytes(&head[ns..ns + nl])
                .map_err(|_| Error::Invalid("invalid header name"))?;
            let value = HeaderValue::from_maybe_shared(head.slice(vs..vs + vl))
                .map_err(|_| Error::Invalid("invalid header value"))?;
            if name == header::TRANSFER_ENCODING {
                // The final coding decides; anything but chunked reads to the close.
                te_chunked = Some(last_token_is(value.as_bytes(), b"chunked"));
            } else if name == header::CONTENT_LENGTH {
                // One decimal number; repeated or listed (`5, 5`), the same number each
                // time (RFC 9110 §8.6), passed on as one.
                let had_length = lengths.is_some();
                let listed = each_list_item(value.as_bytes(), |item| {
                    lengths = Some(match (lengths, parse_decimal(item).ok_or(())) {
                        (None, v) => v,
                        (Some(Ok(a)), Ok(b)) if a == b => Ok(a),
                        _ => Err(()),
                    });
                });
                lengths_repeated |= had_length || listed;
            } else if name == header::CONNECTION {
                if has_token(value.as_bytes(), b"close") {
                    close = true;
                } else if version == Version::HTTP_10 && has_token(value.as_bytes(), b"keep-alive")
                {
                    close = false;
                }
            }
            map.append(name, value);
        }
        if te_chunked.is_some() && lengths.is_some() {
            // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3): a length passed
            // on would cut the body short downstream.
            map.remove(header::CONTENT_LENGTH);
        } else if let (Some(Ok(n)), true) = (lengths, lengths_repeated) {
            // An HTTP/2 client would get every line: several are malformed there.
            map.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        let kind = if head_request
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED
        {
            BodyKind::Length(0)
        } else if let Some(chunked) = te_chunked {
            // Transfer-Encoding overrides Content-Length (RFC 9112 §6.3); a message that
            // had both may have been meant to smuggle: do not reuse the connection.
            if lengths.is_some() {
                close = true;
            }
            if chunked {
                BodyKind::Chunked(Chunk::Size)
            } else {
                close = true;
                BodyKind::UntilClose
            }
        } else {
            match lengths {
                Some(Ok(n)) => BodyKind::Length(n),
                Some(Err(())) => return Err(Error::Invalid("invalid Content-Length")),
                None => {
                    close = true;
                    BodyKind::UntilClose
                }
            }
        };
        let mut parts = Response::new(()).into_parts().0;
        parts.status = status;
        parts.version = version;
        parts.headers = map;
        return Ok(Some((parts, kind, !close)));
    }
}

/// Where a connection goes when its exchange ends cleanly.
pub struct Home {
    pub pools: std::sync::Arc<crate::pool::ClusterPools>,
    pub addr: std::net::SocketAddr,
}

/// How a message body is delimited, and where its reading stands (a response's here; a
/// request's in `crate::h1_server`, which never reads to the close).
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum BodyKind {
    /// This many bytes left.
    Length(u64),
    Chunked(Chunk),
    /// To the connection's close.
    UntilClose,
    Done,
}

impl BodyKind {
    /// Nothing of the body is left to read.
    pub(crate) fn is_end(&self) -> bool {
        matches!(self, BodyKind::Done | BodyKind::Length(0))
    }

    pub(crate) fn size_hint(&self) -> SizeHint {
        match *self {
            BodyKind::Length(n) => SizeHint::with_exact(n),
            BodyKind::Done => SizeHint::with_exact(0),
            BodyKind::Chunked(_) | BodyKind::UntilClose => SizeHint::default(),
        }
    }
}

/// Where a chunked body's reading stands.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk: this many data bytes left.
    Data(u64),
    /// After a chunk's data: its CRLF.
    DataEnd,
    /// After the last chunk: trailers, then the final CRLF.
    Trailers,
}

/// A response body read from the connection as it is polled.
pub struct ResponseBody {
    conn: Option<Conn>,
    /// The request body still being sent (the upstream answered before its end); boxed,
    /// as that is rare and the body is moved around.
    out: Option<Box<Outgoing>>,
    kind: BodyKind,
    keep_alive: bool,
    home: Option<Home>,
}

impl ResponseBody {
    /// The message ended: the connection goes back to its pool if it can serve another
    /// exchange (the request was sent whole, nothing extra arrived, keep-alive).
    fn finish(&mut self) {
        self.kind = BodyKind::Done;
        let Some(conn) = self.conn.take() else {
            return;
        };
        let request_sent = self.out.take().is_none_or(|o| o.is_sent());
        if self.keep_alive && request_sent && conn.rbuf.is_empty() {
            if let Some(home) = self.home.take() {
                home.pools.put_back_h1(home.addr, conn);
            }
        }
    }

    fn fail(&mut self, e: Error) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.kind = BodyKind::Done;
        self.conn = None;
        self.out = None;
        Poll::Ready(Some(Err(Box::new(e))))
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        // Without its connection the body has ended (or failed, which was reported).
        let Some(conn) = this.conn.as_mut() else {
            return Poll::Ready(None);
        };
        // The rest of the request, if the upstream answered before it was all sent.
        if let Some(out) = this.out.as_mut().filter(|o| o.aborted.is_none()) {
            match out.poll_send(cx, &mut conn.io) {
                Poll::Ready(Ok(())) => this.out = None,
                Poll::Ready(Err(e)) if e.is_request_body() => return this.fail(e),
                // The upstream stopped reading; its answer may still be whole.
                Poll::Ready(Err(e)) => out.aborted = Some(e),
                Poll::Pending => {}
            }
        }
        match read_frame(cx, conn, &mut this.kind) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => this.fail(e),
            Poll::Ready(Ok(frame)) => {
                if this.kind.is_end() {
                    // The body is all here: the connection can serve the next request
                    // before this frame is even written downstream.
                    this.finish();
                }
                Poll::Ready(frame.map(Ok))
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

/// A connection's read buffer and the means to refill it: what a body is read from.
pub(crate) trait BodySource {
    fn buf(&mut self) -> &mut BytesMut;
    /// Read more into the buffer; `Ok(0)` at the connection's end.
    fn poll_fill(&mut self, cx: &mut Context<'_>, space: usize) -> Poll<io::Result<usize>>;
}

impl BodySource for Conn {
    fn buf(&mut self) -> &mut BytesMut {
        &mut self.rbuf
    }
    fn poll_fill(&mut self, cx: &mut Context<'_>, space: usize) -> Poll<io::Result<usize>> {
        Conn::poll_fill(self, cx, space)
    }
}

/// The next frame of the body from `conn`; `Ok(None)` at its end (then `kind` is `Done`).
pub(crate) fn read_frame(
    cx: &mut Context<'_>,
    conn: &mut impl BodySource,
    kind: &mut BodyKind,
) -> Poll<Result<Option<Frame<Bytes>>, Error>> {
    loop {
        let need_more = match *kind {
            BodyKind::Done | BodyKind::Length(0) => {
                *kind = BodyKind::Done;
                return Poll::Ready(Ok(None));
            }
            BodyKind::Length(left) => {
                if conn.buf().is_empty() {
                    true
                } else {
                    let n = (conn.buf().len() as u64).min(left) as usize;
                    *kind = BodyKind::Length(left - n as u64);
                    return Poll::Ready(Ok(Some(Frame::data(conn.buf().split_to(n).freeze()))));
                }
            }
            BodyKind::UntilClose => {
                if conn.buf().is_empty() {
                    true
                } else {
                    return Poll::Ready(Ok(Some(Frame::data(conn.buf().split().freeze()))));
                }
            }
            BodyKind::Chunked(state) => match decode_chunk(conn.buf(), state)? {
                Step::Frame(next, frame) => {
                    *kind = BodyKind::Chunked(next);
                    return Poll::Ready(Ok(Some(frame)));
                }
                Step::Next(next) => {
                    *kind = BodyKind::Chunked(next);
                    false
                }
                Step::End(trailers) => {
                    *kind = BodyKind::Done;
                    return Poll::Ready(Ok(trailers.map(Frame::trailers)));
                }
                Step::More => true,
            },
        };
        if need_more {
            match ready!(conn.poll_fill(cx, READ_SPACE_BODY)) {
                Ok(0) if *kind == BodyKind::UntilClose => {
                    *kind = BodyKind::Done;
                    return Poll::Ready(Ok(None));
                }
                Ok(0) => return Poll::Ready(Err(Error::ClosedMidBody)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(Error::Io(e))),
            }
        }
    }
}

/// One step of chunked decoding over what is buffered.
enum Step {
    /// A frame to hand on, and the state after it.
    Frame(Chunk, Frame<Bytes>),
    /// Progress without a frame (a size line or a data CRLF consumed).
    Next(Chunk),
    /// The body ended, with its trailers if it had any.
    End(Option<HeaderMap>),
    /// More bytes are needed.
    More,
}

fn decode_chunk(buf: &mut BytesMut, state: Chunk) -> Result<Step, Error> {
    match state {
        Chunk::Size => {
            let Some(eol) = memchr::memchr(b'\n', buf) else {
                if buf.len() > MAX_CHUNK_LINE {
                    return Err(Error::Invalid("chunk size line too long"));
                }
                return Ok(Step::More);
            };
            if eol == 0 || buf[eol - 1] != b'\r' {
                return Err(Error::Invalid("chunk size line not ended by CRLF"));
            }
            let size = chunk_size(&buf[..eol - 1]).ok_or(Error::Invalid("invalid chunk size"))?;
            buf.advance(eol + 1);
            Ok(Step::Next(if size == 0 {
                Chunk::Trailers
            } else {
                Chunk::Data(size)
            }))
        }
        Chunk::Data(left) => {
            if buf.is_empty() {
                return Ok(Step::More);
            }
            let n = (buf.len() as u64).min(left) as usize;
            let data = buf.split_to(n).freeze();
            let next = if left == n as u64 {
                Chunk::DataEnd
            } else {
                Chunk::Data(left - n as u64)
            };
            Ok(Step::Frame(next, Frame::data(data)))
        }
        Chunk::DataEnd => {
            if buf.len() < 2 {
                return Ok(Step::More);
            }
            if &buf[..2] != b"\r\n" {
                return Err(Error::Invalid("chunk data not followed by CRLF"));
            }
            buf.advance(2);
            Ok(Step::Next(Chunk::Size))
        }
        Chunk::Trailers => {
            if buf.len() < 2 {
                return Ok(Step::More);
            }
            if &buf[..2] == b"\r\n" {
                buf.advance(2);
                return Ok(Step::End(None));
            }
            let mut headers = [httparse::EMPTY_HEADER; 32];
            match httparse::parse_headers(buf, &mut headers) {
                Ok(httparse::Status::Complete((len, hs))) => {
                    let mut map = HeaderMap::with_capacity(hs.len());
                    for h in hs.iter() {
                        let name = HeaderName::from_bytes(h.name.as_bytes())
                            .map_err(|_| Error::Invalid("invalid trailer name"))?;
                        let value = HeaderValue::from_bytes(h.value)
                            .map_err(|_| Error::Invalid("invalid trailer value"))?;
                        map.append(name, value);
                    }
                    buf.advance(len);
                    Ok(Step::End(Some(map)))
                }
                Ok(httparse::Status::Partial) if buf.len() <= MAX_TRAILERS => Ok(Step::More),
                Ok(httparse::Status::Partial) => Err(Error::Invalid("trailers too large")),
                Err(_) => Err(Error::Invalid("malformed trailers")),
            }
        }
    }
}

/// Randomized tests of this module and of `crate::h1_server` (see the file).
#[cfg(test)]
#[path = "h1_fuzz.rs"]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;

    /// Decode `wire` fed `step` bytes at a time; the data and the trailers.
    fn decode_all(wire: &[u8], step: usize) -> Result<(Vec<u8>, Option<HeaderMap>), Error> {
        let mut buf = BytesMut::new();
        let mut state = Chunk::Size;
        let mut data = Vec::new();
        let mut fed = 0;
        loop {
            match decode_chunk(&mut buf, state)? {
                Step::Frame(next, frame) => {
                    state = next;
                    data.extend_from_slice(&frame.into_data().unwrap_or_default());
                }
                Step::Next(next) => state = next,
                Step::End(trailers) => {
                    assert!(buf.is_empty(), "nothing left behind the body");
                    return Ok((data, trailers));
                }
                Step::More => {
                    if fed == wire.len() {
                        return Err(Error::ClosedMidBody);
                    }
                    let n = step.min(wire.len() - fed);
                    buf.extend_from_slice(&wire[fed..fed + n]);
                    fed += n;
                }
            }
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_reads() {
        let wire = b"5;name=value\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nx-checksum: 42\r\nx-other: a\r\n\r\n";
        for step in 1..=wire.len() {
            let (data, trailers) = decode_all(wire, step).unwrap_or_else(|e| panic!("{step}: {e}"));
            assert_eq!(&data[..], b"helloabcdefghijklmnopqrstuvwxyz", "step {step}");
            let t = trailers.expect("trailers");
            assert_eq!(t.get("x-checksum").map(|v| v.as_bytes()), Some(&b"42"[..]));
            assert_eq!(t.len(), 2);
        }
        let (data, trailers) = decode_all(b"3\r\nabc\r\n0\r\n\r\n", 2).expect("plain");
        assert_eq!((&data[..], trailers.is_none()), (&b"abc"[..], true));
    }

    #[test]
    fn malformed_chunking_is_an_error() {
        for wire in [
            &b"zz\r\nab\r\n0\r\n\r\n"[..],
            b"5\nhello\r\n0\r\n\r\n",
            b"3\r\nabcX\r\n0\r\n\r\n",
            b"11111111111111111\r\n",
            b"-1\r\n",
            b"\r\n",
            b"3x\r\nabc\r\n",
            b"0\r\nbad trailer\r\n\r\n",
        ] {
            assert!(
                matches!(decode_all(wire, 64), Err(Error::Invalid(_))),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long = [b'a'; MAX_CHUNK_LINE + 2];
        assert!(matches!(decode_all(&long, 1024), Err(Error::Invalid(_))));
    }

    fn head(
        wire: &[u8],
        head_request: bool,
    ) -> Result<Option<(http::response::Parts, BodyKind, bool)>, Error> {
        parse_head(&mut BytesMut::from(wire), head_request)
    }

    #[test]
    fn response_heads_decide_the_body_and_reuse() {
        let (p, kind, keep) = head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nX-A: b\r\n\r\n",
            false,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!(
            (p.status, kind, keep),
            (StatusCode::OK, BodyKind::Length(12), true)
        );
        assert_eq!(p.headers.get("x-a").map(|v| v.as_bytes()), Some(&b"b"[..]));
        // HEAD and 204/304 have no body, whatever the headers say.
        let (_, kind, _) = head(b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n", true)
            .expect("ok")
            .expect("complete");
        assert_eq!(kind, BodyKind::Length(0));
        let (_, kind, _) = head(
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 12\r\n\r\n",
            false,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!(kind, BodyKind::Length(0));
        // Interim answers are skipped.
        let (p, kind, _) = head(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: <a>\r\n\r\nHTTP/1.1 201 Created\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            false,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!(
            (p.status, kind),
            (StatusCode::CREATED, BodyKind::Chunked(Chunk::Size))
        );
        assert!(p.headers.get("link").is_none());
        // No length: to the close, and the connection ends with it.
        let (_, kind, keep) = head(b"HTTP/1.1 200 OK\r\n\r\n", false)
            .expect("ok")
            .expect("complete");
        assert_eq!((kind, keep), (BodyKind::UntilClose, false));
        // A coding other than chunked last: to the close.
        let (_, kind, keep) = head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", false)
            .expect("ok")
            .expect("complete");
        assert_eq!((kind, keep), (BodyKind::UntilClose, false));
        // Both framings: chunked wins, the length is not passed on, no reuse.
        let (p, kind, keep) = head(
            b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n",
            false,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!((kind, keep), (BodyKind::Chunked(Chunk::Size), false));
        assert!(p.headers.get(header::CONTENT_LENGTH).is_none());
        // The same length repeated or listed is one length, passed on once; a length that
        // is not a number, or two that differ, is an invalid response.
        for wire in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\n\r\n",
        ] {
            let (p, kind, keep) = head(wire, false).expect("ok").expect("complete");
            assert_eq!((kind, keep), (BodyKind::Length(3), true));
            let lengths: Vec<_> = p.headers.get_all(header::CONTENT_LENGTH).iter().collect();
            assert_eq!(lengths, ["3"]);
        }
        for wire in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3, 4\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: +3\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: \r\n\r\n",
        ] {
            assert!(
                head(wire, false).is_err(),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        // Connection: close, HTTP/1.0 with and without keep-alive.
        for (wire, want) in [
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: Close\r\n\r\n"[..],
                false,
            ),
            (b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", false),
            (
                b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\nconnection: keep-alive\r\n\r\n",
                true,
            ),
        ] {
            let (_, _, keep) = head(wire, false).expect("ok").expect("complete");
            assert_eq!(keep, want, "{}", String::from_utf8_lossy(wire));
        }
        assert!(head(b"HTTP/1.1 200 OK\r\ncontent-le", false)
            .expect("ok")
            .is_none());
        for bad in [
            &b"HTTP/1.1 abc\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n",
        ] {
            assert!(
                head(bad, false).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn requests_are_framed_by_what_is_known_of_their_body() {
        fn encode(method: &str, headers: &[(&str, &str)], body: Body) -> (String, bool) {
            let mut b = http::Request::builder()
                .method(method)
                .uri("http://up/p?q=1");
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            let (parts, ()) = b.body(()).expect("request").into_parts();
            let out = Outgoing::new(&parts, body);
            (
                String::from_utf8_lossy(&out.first).into_owned(),
                out.body_done,
            )
        }
        let (head, done) = encode("GET", &[("host", "up")], crate::proxy::empty());
        assert_eq!(head, "GET /p?q=1 HTTP/1.1\r\nhost: up\r\n\r\n");
        assert!(done);
        // A body in memory goes with its length, in the same write as the head.
        let (wire, done) = encode("POST", &[], crate::proxy::full("abc"));
        assert_eq!(wire, "POST /p?q=1 HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc");
        assert!(done);
        // A Transfer-Encoding a filter left is not sent: the framing is the client's.
        let (wire, _) = encode(
            "PUT",
            &[("transfer-encoding", "chunked"), ("content-length", "3")],
            crate::proxy::full("abc"),
        );
        assert_eq!(wire, "PUT /p?q=1 HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc");
        // A Content-Length that says nothing usable is replaced by the body's own length.
        let (wire, _) = encode(
            "PUT",
            &[("content-length", "three"), ("x-a", "1")],
            crate::proxy::full("abc"),
        );
        assert_eq!(
            wire,
            "PUT /p?q=1 HTTP/1.1\r\nx-a: 1\r\ncontent-length: 3\r\n\r\nabc"
        );
        // Unknown length: chunked, the last chunk included once the body ends.
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"c"))),
        ];
        let stream = http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(
            futures_util::stream::iter(frames),
        ));
        let (wire, done) = encode("POST", &[], stream);
        assert_eq!(
            wire,
            "POST /p?q=1 HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n1\r\nc\r\n0\r\n\r\n"
        );
        assert!(done);
    }

    #[test]
    fn a_large_ready_frame_is_not_overtaken_by_a_small_one() {
        // Both frames are ready when the request is encoded (a large read from the client,
        // then a small one): they go out in their order, whatever the framing.
        let big = "a".repeat(COALESCE + 1);
        for chunked in [false, true] {
            let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                Ok(Frame::data(Bytes::from(big.clone()))),
                Ok(Frame::data(Bytes::from_static(b"xyz"))),
            ];
            let body = http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(
                futures_util::stream::iter(frames),
            ));
            let mut b = http::Request::builder().method("POST").uri("http://up/");
            if !chunked {
                b = b.header("content-length", (big.len() + 3).to_string());
            }
            let (parts, ()) = b.body(()).expect("request").into_parts();
            let mut out = Outgoing::new(&parts, body);
            // The rest of the body, encoded as `poll_send` does once writing starts.
            let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
            while !out.body_done {
                let body = out.body.as_mut().expect("a body until it is done");
                match Pin::new(body).poll_frame(&mut cx) {
                    Poll::Ready(Some(Ok(frame))) => out.encode_frame(frame, None).expect("frame"),
                    Poll::Ready(None) => out.encode_end(None).expect("end"),
                    _ => panic!("the body's frames are all ready"),
                }
            }
            let mut wire = out.first[out.first_off..].to_vec();
            for b in &out.rest {
                wire.extend_from_slice(b);
            }
            let wire = String::from_utf8(wire).expect("text");
            let (_, sent) = wire.split_once("\r\n\r\n").expect("a head");
            let expected = if chunked {
                format!("{:x}\r\n{big}\r\n3\r\nxyz\r\n0\r\n\r\n", big.len())
            } else {
                format!("{big}xyz")
            };
            assert!(sent == expected, "chunked: {chunked}: body out of order");
        }
    }
}
