//! Request framing seen on the wire, for what hyper resolves before the proxy sees it.
//!
//! A request with both `Content-Length` and `Transfer-Encoding` is a classic smuggling
//! vector. hyper handles it as RFC 9112 §6.3 allows (drops `Content-Length`, reads the
//! body as chunked, closes the connection after the answer), so the request that reaches
//! [`crate::proxy`] looks like a plain chunked one. Envoy answers such a request 400 and
//! forwards nothing, and so do we: [`ScanIo`] sits between the downstream connection and
//! hyper, follows the HTTP/1 message framing of what the client sends (heads, then
//! `Content-Length` or chunked bodies), and notes which request on the connection carried
//! both headers; the request path asks [`FramingWatch::next_request_conflicts`] first.
//!
//! The scan never changes a byte and never rejects anything itself. Whatever it cannot
//! follow with certainty (an HTTP/2 preface, an upgrade or `CONNECT`, a head or chunk it
//! does not understand, which hyper then refuses anyway) turns it off for the rest of the
//! connection: a missed check, never a wrong 400.

use crate::text::{chunk_size, parse_decimal, trim_ows};
use pin_project_lite::pin_project;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Shared between a connection's [`ScanIo`] and its requests.
#[derive(Default, Debug)]
pub struct FramingWatch {
    /// Requests the proxy has taken from this connection so far.
    served: AtomicU64,
    /// 1 + the index of the first request head that had both headers; 0 if none did.
    conflict_at: AtomicU64,
}

impl FramingWatch {
    /// Count the request being handled and say whether its head carried both
    /// `Content-Length` and `Transfer-Encoding`. Call exactly once per request.
    pub fn next_request_conflicts(&self) -> bool {
        let index = self.served.fetch_add(1, Ordering::Relaxed);
        self.conflict_at.load(Ordering::Relaxed) == index + 1
    }

    fn note_conflict(&self, head_index: u64) {
        // Only the first counts: hyper closes the connection after that request.
        let _ = self.conflict_at.compare_exchange(
            0,
            head_index + 1,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// Longest line (request line, header line, chunk-size line) followed; hyper refuses
/// heads far shorter than this.
const MAX_LINE: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Reading a request head, line by line.
    Head,
    /// Bytes of a `Content-Length` body still to come.
    Body(u64),
    /// A chunk-size line.
    ChunkSize,
    /// Bytes of chunk data still to come.
    ChunkData(u64),
    /// The CRLF after a chunk's data: bytes still to come.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk, up to an empty line.
    Trailers,
    /// Not following this connection any more.
    Off,
}

/// What the head being read said about its framing.
#[derive(Debug, Default)]
struct Head {
    started: bool,
    content_length: Option<u64>,
    transfer_encoding: bool,
    /// A `Content-Length` we cannot read, or two that differ: hyper refuses the request.
    bad: bool,
    /// `Upgrade` or `CONNECT`: what follows the head may not be HTTP/1 at all.
    tunnel: bool,
}

/// Follows the framing of the requests on one connection.
#[derive(Debug)]
struct Scanner {
    state: State,
    /// The current line so far, when it spans reads.
    line: Vec<u8>,
    head: Head,
    heads: u64,
    watch: Arc<FramingWatch>,
}

impl Scanner {
    fn new(watch: Arc<FramingWatch>) -> Self {
        Scanner {
            state: State::Head,
            line: Vec::new(),
            head: Head::default(),
            heads: 0,
            watch,
        }
    }

    /// Follow `data`, the next bytes the client sent.
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Off => return,
                State::Body(n) | State::ChunkData(n) => {
                    let take = usize::try_from(n).map_or(data.len(), |n| n.min(data.len()));
                    data = data.get(take..).unwrap_or_default();
                    let left = n - take as u64;
                    self.state = match (self.state, left) {
                        (State::Body(_), 0) => State::Head,
                        (State::Body(_), _) => State::Body(left),
                        (_, 0) => State::ChunkEnd(2),
                        _ => State::ChunkData(left),
                    };
                }
                State::ChunkEnd(n) => {
                    let (&b, rest) = match data.split_first() {
                        Some(x) => x,
                        None => return,
                    };
                    data = rest;
                    let want = if n == 2 { b'\r' } else { b'\n' };
                    self.state = if b != want {
                        State::Off
                    } else if n == 2 {
                        State::ChunkEnd(1)
                    } else {
                        State::ChunkSize
                    };
                }
                State::Head | State::ChunkSize | State::Trailers => {
                    let Some(end) = memchr::memchr(b'\n', data) else {
                        if self.line.len() + data.len() > MAX_LINE {
                            self.state = State::Off;
                        } else {
                            self.line.extend_from_slice(data);
                        }
                        return;
                    };
                    let (line, rest) = data.split_at(end + 1);
                    data = rest;
                    if self.line.is_empty() {
                        self.on_line(line);
                    } else if self.line.len() + line.len() > MAX_LINE {
                        self.state = State::Off;
                    } else {
                        let mut whole = std::mem::take(&mut self.line);
                        whole.extend_from_slice(line);
                        self.on_line(&whole);
                        // Keep the buffer for the next long line.
                        whole.clear();
                        self.line = whole;
                    }
                }
            }
        }
    }

    /// One whole line, with its `\n` (and `\r`, if any).
    fn on_line(&mut self, line: &[u8]) {
        let text = trim_eol(line);
        match self.state {
            State::Head => self.head_line(text),
            State::ChunkSize => {
                self.state = match chunk_size(text) {
                    Some(0) => State::Trailers,
                    Some(n) => State::ChunkData(n),
                    None => State::Off,
                };
            }
            State::Trailers if text.is_empty() => self.state = State::Head,
            _ => {}
        }
    }

    fn head_line(&mut self, text: &[u8]) {
        let h = &mut self.head;
        if !h.started {
            // Empty lines before a request line are ignored (RFC 9112 §2.2).
            if text.is_empty() {
                return;
            }
            if text.starts_with(b"PRI * HTTP/2.0") {
                // HTTP/2 with prior knowledge: no HTTP/1 framing follows.
                self.state = State::Off;
                return;
            }
            h.started = true;
            h.tunnel = text.starts_with(b"CONNECT ");
            return;
        }
        if text.is_empty() {
            self.end_of_head();
            return;
        }
        match text.first() {
            // Only these three names matter; most lines are decided by their first byte.
            Some(b'c' | b'C' | b't' | b'T' | b'u' | b'U') => {}
            // Obsolete line folding: hyper refuses the request.
            Some(b' ' | b'\t') => {
                self.state = State::Off;
                return;
            }
            _ => return,
        }
        let Some(colon) = text.iter().position(|&b| b == b':') else {
            self.state = State::Off;
            return;
        };
        let (name, value) = text.split_at(colon);
        let value = trim_ows(value.get(1..).unwrap_or_default());
        if name.eq_ignore_ascii_case(b"content-length") {
            match parse_decimal(value) {
                Some(n) if h.content_length.is_none_or(|m| m == n) => {
                    h.content_length = Some(n);
                }
                _ => h.bad = true,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            h.transfer_encoding = true;
        } else if name.eq_ignore_ascii_case(b"upgrade") {
            h.tunnel = true;
        }
    }

    fn end_of_head(&mut self) {
        let h = std::mem::take(&mut self.head);
        let index = self.heads;
        self.heads += 1;
        if h.transfer_encoding && h.content_length.is_some() {
            self.watch.note_conflict(index);
        }
        self.state = if h.bad || h.tunnel {
            State::Off
        } else if h.transfer_encoding {
            // hyper reads a body whose last coding is `chunked` as chunked, and refuses
            // any other (and the connection with it): following it as chunked is right
            // whenever the connection goes on.
            State::ChunkSize
        } else {
            match h.content_length {
                Some(n) if n > 0 => State::Body(n),
                _ => State::Head,
            }
        };
    }
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

pin_project! {
    /// A downstream connection whose incoming bytes are followed by a [`Scanner`]; reads
    /// and writes pass through unchanged.
    pub struct ScanIo<I> {
        #[pin]
        inner: I,
        scanner: Scanner,
    }
}

impl<I> ScanIo<I> {
    pub fn new(inner: I, watch: Arc<FramingWatch>) -> Self {
        ScanIo {
            inner,
            scanner: Scanner::new(watch),
        }
    }
}

impl<I: AsyncRead> AsyncRead for ScanIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if this.scanner.state != State::Off {
            if let Some(new) = buf.filled().get(before..) {
                this.scanner.feed(new);
            }
        }
        r
    }
}

impl<I: AsyncWrite> AsyncWrite for ScanIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `wire` in pieces of `step` bytes; the indexes of the heads with a conflict
    /// (only the first is kept) and whether the scan is still on.
    fn scan(wire: &[u8], step: usize) -> (Option<u64>, bool) {
        let watch = Arc::new(FramingWatch::default());
        let mut s = Scanner::new(watch.clone());
        for piece in wire.chunks(step) {
            s.feed(piece);
        }
        let at = watch.conflict_at.load(Ordering::Relaxed);
        ((at > 0).then(|| at - 1), s.state != State::Off)
    }

    fn every_step(wire: &[u8]) -> (Option<u64>, bool) {
        let first = scan(wire, wire.len().max(1));
        for step in 1..wire.len().min(40) {
            assert_eq!(scan(wire, step), first, "step {step}");
        }
        first
    }

    #[test]
    fn conflict_found_in_the_right_request() {
        let wire = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
            POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
            POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n0\r\nT: v\r\n\r\n\
            POST /d HTTP/1.1\r\nhost: x\r\ncontent-length: 44\r\nTRANSFER-ENCODING:  chunked \r\n\r\n0\r\n\r\n";
        assert_eq!(every_step(wire), (Some(3), true));
    }

    #[test]
    fn header_lookalikes_in_bodies_are_not_heads() {
        // A Content-Length body and a chunked one that both carry a fake head with both
        // headers: the scan skips them as bodies.
        let fake = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        let mut wire =
            format!("POST / HTTP/1.1\r\nContent-Length: {}\r\n\r\n", fake.len()).into_bytes();
        wire.extend_from_slice(fake);
        wire.extend_from_slice(
            format!(
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                fake.len()
            )
            .as_bytes(),
        );
        wire.extend_from_slice(fake);
        wire.extend_from_slice(b"\r\n0\r\n\r\nGET /ok HTTP/1.1\r\n\r\n");
        assert_eq!(every_step(&wire), (None, true));
    }

    #[test]
    fn what_it_cannot_follow_turns_it_off() {
        for wire in [
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
            b"CONNECT h:443 HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nxYZ",
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        ] {
            assert_eq!(
                every_step(wire),
                (None, false),
                "{}",
                String::from_utf8_lossy(wire)
            );
        }
        // Off means off: a conflict after it goes unnoticed (hyper is not reading HTTP/1
        // there either).
        let wire = b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\nPOST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(every_step(wire), (None, false));
    }

    #[test]
    fn the_request_path_sees_the_conflict_once_in_order() {
        let watch = FramingWatch::default();
        watch.note_conflict(1);
        watch.note_conflict(2);
        assert!(!watch.next_request_conflicts());
        assert!(watch.next_request_conflicts());
        assert!(!watch.next_request_conflicts());
    }

    #[test]
    fn long_lines_across_reads() {
        let mut wire = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        wire.extend(std::iter::repeat_n(b'a', 10_000));
        wire.extend_from_slice(b"\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n");
        for step in [1, 7, 4096] {
            assert_eq!(scan(&wire, step), (Some(0), true));
        }
        let mut huge = b"GET / HTTP/1.1\r\nX-Long: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_LINE + 1));
        assert_eq!(scan(&huge, 4096), (None, false));
    }
}
