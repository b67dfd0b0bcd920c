//! Randomized tests of the HTTP/1.1 code the request path is built on: the downstream
//! server (`h1_server`) and the upstream response decoder (`h1`). Both are written for
//! this proxy rather than taken from hyper, so they get what hyper gets from its fuzzers:
//! generated and mutated byte streams, delivered in random pieces, checked against what
//! the bytes mean.
//!
//! What is checked, for each generated stream:
//! - nothing panics or hangs;
//! - the same bytes give the same requests and responses however they are cut into reads
//!   (whole, one byte at a time, random pieces): a parser that depends on where a read
//!   ended is the classic source of request smuggling;
//! - a well-formed stream is understood exactly: every request reaches the service with
//!   its method, target and body, and every response is decoded to its status, body and
//!   trailers;
//! - after framing the server must not trust (Content-Length with Transfer-Encoding,
//!   lengths that disagree, a coding other than chunked, a broken chunked body) or a
//!   malformed head, nothing more of the connection reaches the service: whatever the
//!   attacker put behind it is never read as a request;
//! - a mutated stream (bytes replaced, inserted or dropped) still yields only complete,
//!   well-formed responses, and the requests that came whole before the first mutated byte
//!   are served as they were;
//! - a request encoded for the upstream (`Outgoing`) reads back, as a strict server reads
//!   it, with one framing, the body it was given and nothing behind it.
//!
//! `WASMESH_FUZZ_CASES` sets the number of streams per test (default 1,500);
//! `WASMESH_FUZZ_SEED` runs the one case a failure names.

use super as h1;
use super::{BodyKind, BodySource};
use crate::h1_server::{serve, RequestBody, Settings};
use bytes::{Bytes, BytesMut};
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;
use wasmesh_e2e::generate::{mutate_bytes, Rng};

/// The cases to run: every seed from a fixed base, or the one seed asked for.
fn seeds(salt: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("WASMESH_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return vec![seed];
    }
    let cases = std::env::var("WASMESH_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_500u64);
    (0..cases)
        .map(|i| salt.wrapping_mul(1_000_003) + i)
        .collect()
}

/// The ways a byte stream is cut into reads.
fn cuts(rng: &mut Rng, len: usize) -> Vec<Vec<usize>> {
    let mut out = vec![vec![len]];
    if len <= 600 {
        out.push(vec![1; len]);
    }
    for max in [7, 64] {
        let mut sizes = Vec::new();
        let mut left = len;
        while left > 0 {
            let n = (1 + rng.below(max)).min(left);
            sizes.push(n);
            left -= n;
        }
        out.push(sizes);
    }
    out
}

/// Replace, insert or drop bytes at or after `from` (see `mutate_bytes`).
fn mutate(rng: &mut Rng, wire: &mut Vec<u8>, from: usize) -> Option<usize> {
    mutate_bytes(rng, wire, from, b"\r\n\0 \t:;,0fFx-+\x7f\x80\xff")
}

// ---------------------------------------------------------------------------------------
// The server: request streams.

/// A request as the service saw it.
#[derive(Clone, Debug, PartialEq)]
struct Seen {
    method: String,
    target: String,
    /// `None`: reading the body failed.
    body: Option<Vec<u8>>,
}

/// What the server must make of one generated message.
#[derive(Clone, Debug)]
enum Meant {
    /// Served as `seen`; the connection stays open if `keep`.
    Served { seen: Seen, keep: bool },
    /// Framing the server must not trust: the service gets the request with an empty
    /// body, then the connection closes.
    Untrusted { method: String, target: String },
    /// A malformed head: answered with this status, without the service; then closed.
    Refused(u16),
    /// A body that is malformed or breaks off: the service may get the request (its body
    /// failing), then the connection closes.
    BadBody { method: String, target: String },
}

const PATH: &[u8] = b"abcxyz019-._~/?=&";
const VALUE: &[u8] = b"abc XYZ 019-._~/?=&;,()\"";

/// Chunked bodies that break their own framing (each is a whole body as sent).
const BAD_CHUNKED: &[&[u8]] = &[
    b"zz\r\nab\r\n0\r\n\r\n",
    b"3\r\nabcX\r\n0\r\n\r\n",
    b"11111111111111111\r\n",
    b"-1\r\n",
    b"3 xyz\r\nabc\r\n0\r\n\r\n",
    b"3;a\rb\r\nabc\r\n0\r\n\r\n",
    b"3;a\nabc\r\n0\r\n\r\n",
    b"3\r\nabc\r\n0\r\nbad trailer\r\n\r\n",
    b"3\r\nabc\r\n",
];

/// A request that smuggling would have the server read from a body.
const SMUGGLED: &[u8] = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

fn chunked(rng: &mut Rng, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let n = (1 + rng.below(rest.len())).min(rest.len());
        let size = match rng.below(3) {
            0 => format!("{n:x}"),
            1 => format!("{n:X}"),
            _ => format!("00{n:x}"),
        };
        out.extend_from_slice(size.as_bytes());
        if rng.chance(20) {
            out.extend_from_slice(b";ext=\"v\";e");
        }
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&rest[..n]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[n..];
    }
    out.extend_from_slice(b"0\r\n");
    if rng.chance(25) {
        out.extend_from_slice(b"x-trailer: t\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// One request: its bytes and what they mean.
fn request(rng: &mut Rng) -> (Vec<u8>, Meant) {
    let method = rng
        .pick(&["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"])
        .to_string();
    let target = if rng.chance(10) {
        format!("http://x/{}", rng.token(PATH, 12))
    } else {
        format!("/{}", rng.token(PATH, 16))
    };
    let http10 = rng.chance(10);
    let mut head = format!(
        "{method} {target} HTTP/1.{}\r\n",
        if http10 { 0 } else { 1 }
    );
    let host = *rng.pick(&["Host", "host", "HOST"]);
    head.push_str(&format!("{host}: x\r\n"));
    for i in 0..rng.below(4) {
        let ows = *rng.pick(&["", " ", "  ", "\t"]);
        head.push_str(&format!("x-h{i}:{ows}{}{ows}\r\n", rng.token(VALUE, 10)));
    }
    let mut keep = !http10;
    if http10 && rng.chance(50) {
        head.push_str("Connection: keep-alive\r\n");
        keep = true;
    } else if rng.chance(8) {
        head.push_str("Connection: close\r\n");
        keep = false;
    }
    let has_body = !matches!(method.as_str(), "GET" | "HEAD") || rng.chance(15);
    let body = if has_body { rng.bytes(40) } else { Vec::new() };
    let seen = |body: Vec<u8>| Seen {
        method: method.clone(),
        target: target.clone(),
        body: Some(body),
    };

    // One in four requests breaks a rule; the rest are well-formed.
    let broken = rng.below(16);
    let mut wire = Vec::new();
    let meant = match broken {
        0 => {
            head.push_str(&format!(
                "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
                body.len()
            ));
            wire.extend_from_slice(head.as_bytes());
            wire.extend_from_slice(&chunked(rng, &body));
            Meant::Untrusted { method, target }
        }
        1 => {
            let (a, b) = (body.len(), body.len() + 1 + rng.below(5));
            head.push_str(&format!(
                "Content-Length: {a}\r\nContent-Length: {b}\r\n\r\n"
            ));
            wire.extend_from_slice(head.as_bytes());
            wire.extend_from_slice(&body);
            Meant::Untrusted { method, target }
        }
        2 => {
            let bad = rng.pick(&["3x", "-1", "+3", "0x3", "3 3", "1e2"]);
            head.push_str(&format!("Content-Length: {bad}\r\n\r\n"));
            wire.extend_from_slice(head.as_bytes());
            Meant::Untrusted { method, target }
        }
        3 => {
            let te = rng.pick(&["gzip", "gzip, chunked", "chunked, gzip", "identity"]);
            head.push_str(&format!("Transfer-Encoding: {te}\r\n\r\n"));
            wire.extend_from_slice(head.as_bytes());
            wire.extend_from_slice(&chunked(rng, &body));
            Meant::Untrusted { method, target }
        }
        4 => {
            // A malformed head: the service never sees it.
            let bad: &[&[u8]] = &[
                b"G@T / HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nx-a: 1\r\n folded\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
                b"GET / HTTP/1.1\r\nx(y: 1\r\n\r\n",
                b"GET / HTTP/1.1\r\nx-a: a\0b\r\n\r\n",
                b"GET / HTTP/1.1\r\nno colon\r\n\r\n",
                b"GET / HTTP/9.9\r\n\r\n",
                b"GET /a b HTTP/1.1\r\n\r\n",
            ];
            wire.extend_from_slice(rng.pick::<&[u8]>(bad));
            Meant::Refused(400)
        }
        5 => {
            let many: String = (0..30).map(|i| format!("h{i}: v\r\n")).collect();
            wire.extend_from_slice(format!("GET / HTTP/1.1\r\n{many}\r\n").as_bytes());
            Meant::Refused(431)
        }
        6 if !http10 => {
            // A chunked body that breaks its own framing.
            head.push_str("Transfer-Encoding: chunked\r\n\r\n");
            wire.extend_from_slice(head.as_bytes());
            let bad = BAD_CHUNKED;
            wire.extend_from_slice(rng.pick::<&[u8]>(bad));
            Meant::BadBody { method, target }
        }
        _ => {
            if has_body {
                let use_chunked = !http10 && rng.chance(40);
                if rng.chance(15) && !http10 {
                    head.push_str("Expect: 100-continue\r\n");
                }
                if use_chunked {
                    head.push_str("Transfer-Encoding: chunked\r\n\r\n");
                    wire.extend_from_slice(head.as_bytes());
                    wire.extend_from_slice(&chunked(rng, &body));
                } else {
                    head.push_str(&format!("Content-Length: {}\r\n", body.len()));
                    if rng.chance(10) {
                        // Repeated equal lengths are one length (RFC 9110 §8.6).
                        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
                    }
                    head.push_str("\r\n");
                    wire.extend_from_slice(head.as_bytes());
                    wire.extend_from_slice(&body);
                }
            } else {
                head.push_str("\r\n");
                wire.extend_from_slice(head.as_bytes());
            }
            Meant::Served {
                seen: seen(body),
                keep,
            }
        }
    };
    (wire, meant)
}

/// A response as the client read it. 1xx answers are left out: whether `100 Continue`
/// goes out depends on whether the body had arrived, which is timing, not meaning.
#[derive(Clone, Debug, PartialEq)]
struct Answer {
    status: u16,
    body: Vec<u8>,
}

/// Split the server's output into responses; `heads` tells which requests were HEAD (no
/// body whatever the headers say). An `Err` is output that is not well-formed HTTP/1.1.
fn answers(mut out: &[u8], heads: &[bool]) -> Result<Vec<Answer>, String> {
    let mut got = Vec::new();
    while !out.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let n = match resp.parse(out) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return Err("a response head breaks off".into()),
            Err(e) => return Err(format!("malformed response head: {e}")),
        };
        let status = resp.code.ok_or("no status")?;
        let mut length = None;
        let mut chunked = false;
        for h in resp.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value).map_err(|e| e.to_string())?;
                length = Some(v.parse::<usize>().map_err(|e| e.to_string())?);
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = true;
            }
        }
        out = &out[n..];
        if (100..200).contains(&status) {
            continue;
        }
        let head_request = heads.get(got.len()).copied().unwrap_or(false);
        let body = if head_request || status == 204 || status == 304 {
            Vec::new()
        } else if let Some(len) = length {
            if out.len() < len {
                return Err("a response body breaks off".into());
            }
            let (b, rest) = out.split_at(len);
            out = rest;
            b.to_vec()
        } else if chunked {
            let mut body = Vec::new();
            loop {
                let line_end = out
                    .windows(2)
                    .position(|w| w == b"\r\n")
                    .ok_or("a chunk line breaks off")?;
                let size = std::str::from_utf8(&out[..line_end]).map_err(|e| e.to_string())?;
                let size = usize::from_str_radix(size, 16).map_err(|e| e.to_string())?;
                out = &out[line_end + 2..];
                if size == 0 {
                    let end = out
                        .windows(2)
                        .position(|w| w == b"\r\n")
                        .ok_or("trailers break off")?;
                    out = &out[end + 2..];
                    break;
                }
                if out.len() < size + 2 || &out[size..size + 2] != b"\r\n" {
                    return Err("a chunk breaks off".into());
                }
                body.extend_from_slice(&out[..size]);
                out = &out[size + 2..];
            }
            body
        } else {
            std::mem::take(&mut out).to_vec()
        };
        got.push(Answer { status, body });
    }
    Ok(got)
}

/// Serve `wire`, delivered in reads of `sizes`, with a service that records each request
/// and answers with its method, target and body.
async fn serve_wire(wire: &[u8], sizes: &[usize]) -> Result<(Vec<Seen>, Vec<u8>), String> {
    let settings = Settings {
        max_head: 8192,
        max_headers: 20,
        header_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(30),
        stream_idle_timeout: Duration::from_secs(30),
    };
    let (mut client, server) = tokio::io::duplex(1 << 20);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let (_tx, rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        serve(
            server,
            &settings,
            rx,
            |_| {},
            move |req: Request<RequestBody<_>>| {
                let log = log.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body.collect().await.map(|b| b.to_bytes().to_vec()).ok();
                    let text = format!(
                        "{} {} {}",
                        parts.method,
                        parts.uri,
                        String::from_utf8_lossy(body.as_deref().unwrap_or(b"<failed>"))
                    );
                    if let Ok(mut l) = log.lock() {
                        l.push(Seen {
                            method: parts.method.to_string(),
                            target: parts.uri.to_string(),
                            body,
                        });
                    }
                    Response::new(Full::new(Bytes::from(text)))
                }
            },
        )
        .await;
    });
    let mut at = 0;
    for &n in sizes {
        if client.write_all(&wire[at..at + n]).await.is_err() {
            break; // The server closed: what is left is not read.
        }
        at += n;
        // Let the server take this piece before the next one arrives.
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
    }
    for _ in 0..8 {
        tokio::task::yield_now().await;
    }
    let _ = client.shutdown().await;
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out)).await;
    if read.is_err() {
        return Err("the server neither answered nor closed".into());
    }
    match tokio::time::timeout(Duration::from_secs(10), task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("the server task failed: {e}")),
        Err(_) => return Err("the server task did not end".into()),
    }
    let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
    Ok((seen, out))
}

fn show(wire: &[u8]) -> String {
    wire.escape_ascii().to_string()
}

/// The server, on a generated stream: one run per way of cutting it, all alike, and
/// what the stream means.
async fn server_case(seed: u64, mutated: bool) -> Result<(), String> {
    let mut rng = Rng(seed);
    let mut wire = Vec::new();
    let mut meant = Vec::new();
    let mut ends = Vec::new();
    for _ in 0..1 + rng.below(4) {
        let (w, m) = request(&mut rng);
        wire.extend_from_slice(&w);
        ends.push(wire.len());
        meant.push(m);
    }
    // Behind everything, a request that must not be served if anything before it ended
    // the connection.
    wire.extend_from_slice(SMUGGLED);
    ends.push(wire.len());
    let mutated_at = if mutated {
        let from = rng.below(wire.len());
        match mutate(&mut rng, &mut wire, from) {
            Some(at) => Some(at),
            None => return Ok(()),
        }
    } else {
        None
    };

    let mut runs = Vec::new();
    for sizes in cuts(&mut rng, wire.len()) {
        let (seen, out) = serve_wire(&wire, &sizes).await?;
        runs.push((sizes.len(), seen, out));
    }
    let fail = |what: String| -> Result<(), String> {
        Err(format!(
            "seed {seed} (mutated: {mutated}): {what}\nstream: {}",
            show(&wire)
        ))
    };
    let heads_of =
        |seen: &[Seen]| -> Vec<bool> { seen.iter().map(|s| s.method == "HEAD").collect() };

    let (_, seen0, out0) = &runs[0];
    let answers0 = match answers(out0, &heads_of(seen0)) {
        Ok(a) => a,
        Err(e) => return fail(format!("{e}; output: {}", show(out0))),
    };
    for (reads, seen, out) in &runs[1..] {
        if seen != seen0 {
            return fail(format!(
                "in {reads} reads the service saw {seen:?}, in one read {seen0:?}"
            ));
        }
        match answers(out, &heads_of(seen)) {
            Ok(a) if a == answers0 => {}
            Ok(a) => {
                return fail(format!(
                    "in {reads} reads the answers were {a:?}, in one read {answers0:?}"
                ))
            }
            Err(e) => return fail(format!("in {reads} reads: {e}; output: {}", show(out))),
        }
    }

    // What the stream means, up to where it ends the connection (or, mutated, up to the
    // first request the mutation touched).
    let mut want_seen: Vec<Seen> = Vec::new();
    let mut want_answers: Vec<u16> = Vec::new();
    let mut open = true;
    let mut settled = true; // Whether the expectation is exact past this point.
    for (m, &end) in meant.iter().zip(&ends) {
        if mutated_at.is_some_and(|at| at < end) {
            settled = false;
            break;
        }
        match m {
            Meant::Served { seen, keep } => {
                want_seen.push(seen.clone());
                want_answers.push(200);
                if !keep {
                    open = false;
                    break;
                }
            }
            Meant::Untrusted { method, target } => {
                want_seen.push(Seen {
                    method: method.clone(),
                    target: target.clone(),
                    body: Some(Vec::new()),
                });
                want_answers.push(200);
                open = false;
                break;
            }
            Meant::Refused(status) => {
                want_answers.push(*status);
                open = false;
                break;
            }
            Meant::BadBody { method, target } => {
                // The service may or may not have got the request: both are fine, as long
                // as nothing after it is served.
                let n = want_seen.len();
                let extra = &seen0[n.min(seen0.len())..];
                let ok = extra.is_empty()
                    || (extra.len() == 1
                        && extra[0].method == *method
                        && extra[0].target == *target
                        && extra[0].body.is_none());
                if seen0.len() < n || seen0[..n] != want_seen[..] || !ok {
                    return fail(format!(
                        "a broken body: the service saw {seen0:?}, wanted {want_seen:?} and \
                         at most the broken request"
                    ));
                }
                if answers0.len() > want_answers.len() + 1
                    || answers0
                        .iter()
                        .map(|a| a.status)
                        .take(n)
                        .ne(want_answers.iter().copied())
                {
                    return fail(format!("a broken body: answers {answers0:?}"));
                }
                return Ok(());
            }
        }
    }
    if settled && open {
        // Only the smuggling canary is left, and it is a well-formed request.
        if mutated_at.is_none_or(|at| at >= *ends.last().unwrap_or(&0)) {
            want_seen.push(Seen {
                method: "GET".into(),
                target: "/smuggled".into(),
                body: Some(Vec::new()),
            });
            want_answers.push(200);
        } else {
            settled = false;
        }
    }
    if settled {
        if *seen0 != want_seen {
            return fail(format!("the service saw {seen0:?}, wanted {want_seen:?}"));
        }
        let statuses: Vec<u16> = answers0.iter().map(|a| a.status).collect();
        if statuses != want_answers {
            return fail(format!(
                "answered {answers0:?}, wanted statuses {want_answers:?}"
            ));
        }
        for (a, s) in answers0.iter().zip(seen0) {
            let want = format!(
                "{} {} {}",
                s.method,
                s.target,
                String::from_utf8_lossy(s.body.as_deref().unwrap_or(b"<failed>"))
            );
            if s.method != "HEAD" && a.body != want.as_bytes() {
                return fail(format!("answer {a:?} to {s:?}"));
            }
        }
    } else if seen0.len() < want_seen.len() || seen0[..want_seen.len()] != want_seen[..] {
        return fail(format!(
            "the requests before the mutation were served as {seen0:?}, wanted {want_seen:?} first"
        ));
    }
    Ok(())
}

#[tokio::test]
async fn server_generated_streams() {
    for seed in seeds(1) {
        if let Err(e) = server_case(seed, false).await {
            panic!("{e}");
        }
    }
}

#[tokio::test]
async fn server_mutated_streams() {
    for seed in seeds(2) {
        if let Err(e) = server_case(seed, true).await {
            panic!("{e}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The upstream side: response streams, decoded as `h1::exchange` does.

/// A response as decoded: status, body and trailer names; or that it failed.
#[derive(Clone, Debug, PartialEq)]
enum Decoded {
    Ok {
        status: u16,
        body: Vec<u8>,
        trailers: Vec<String>,
    },
    Failed,
}

/// A connection whose reads are scripted.
struct Script {
    buf: BytesMut,
    pieces: VecDeque<Vec<u8>>,
}

impl BodySource for Script {
    fn buf(&mut self) -> &mut BytesMut {
        &mut self.buf
    }
    fn poll_fill(&mut self, _cx: &mut Context<'_>, _space: usize) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(match self.pieces.pop_front() {
            Some(p) => {
                self.buf.extend_from_slice(&p);
                p.len()
            }
            None => 0,
        }))
    }
}

/// Decode the response in `wire`, read in pieces of `sizes`.
fn decode(wire: &[u8], sizes: &[usize], head_request: bool) -> Decoded {
    let mut at = 0;
    let pieces = sizes
        .iter()
        .map(|&n| {
            at += n;
            wire[at - n..at].to_vec()
        })
        .collect();
    let mut conn = Script {
        buf: BytesMut::new(),
        pieces,
    };
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    let (parts, mut kind) = loop {
        match h1::parse_head(&mut conn.buf, head_request) {
            Ok(Some((parts, kind, _keep_alive))) => break (parts, kind),
            Ok(None) => match conn.poll_fill(&mut cx, 0) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) | Poll::Pending => return Decoded::Failed,
                Poll::Ready(Ok(_)) => {}
            },
            Err(_) => return Decoded::Failed,
        }
    };
    let mut body = Vec::new();
    let mut trailers = Vec::new();
    loop {
        match h1::read_frame(&mut cx, &mut conn, &mut kind) {
            Poll::Ready(Ok(Some(frame))) => match frame.into_data() {
                Ok(data) => body.extend_from_slice(&data),
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers.extend(t.keys().map(|k| k.to_string()));
                    }
                }
            },
            Poll::Ready(Ok(None)) => break,
            Poll::Ready(Err(_)) | Poll::Pending => return Decoded::Failed,
        }
    }
    if kind != BodyKind::Done {
        return Decoded::Failed;
    }
    Decoded::Ok {
        status: parts.status.as_u16(),
        body,
        trailers,
    }
}

/// One generated response: its bytes, whether it answers a HEAD request, and what it
/// must decode to (`None`: any decoding, as long as it is the same for every cut).
fn response(rng: &mut Rng) -> (Vec<u8>, bool, Option<Decoded>) {
    let mut wire = Vec::new();
    for _ in 0..rng.below(3) {
        let interim: &[&[u8]] = &[
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n",
        ];
        wire.extend_from_slice(rng.pick::<&[u8]>(interim));
    }
    let status = *rng.pick(&[200u16, 201, 204, 304, 404, 500, 503]);
    let head_request = rng.chance(15);
    let mut head = format!(
        "HTTP/1.{} {status} X\r\n",
        if rng.chance(10) { 0 } else { 1 }
    );
    for i in 0..rng.below(4) {
        let ows = *rng.pick(&["", " ", "\t"]);
        head.push_str(&format!("x-h{i}:{ows}{}\r\n", rng.token(VALUE, 10)));
    }
    let body = rng.bytes(60);
    let bodiless = head_request || status == 204 || status == 304;
    let ok = |body: Vec<u8>, trailers: Vec<String>| Decoded::Ok {
        status,
        body: if bodiless { Vec::new() } else { body },
        trailers: if bodiless { Vec::new() } else { trailers },
    };
    let meant = match rng.below(12) {
        0 => {
            head.push_str(&format!(
                "content-length: {}\r\ncontent-length: {}\r\n\r\n",
                body.len(),
                body.len() + 1
            ));
            (!bodiless).then_some(Decoded::Failed)
        }
        1 => {
            head.push_str(&format!(
                "content-length: {}\r\n\r\n",
                rng.pick(&["-1", "3x", "+3", ""])
            ));
            (!bodiless).then_some(Decoded::Failed)
        }
        2 if !bodiless => {
            // Cut short: the connection closes before the body's end.
            head.push_str(&format!("content-length: {}\r\n\r\n", body.len() + 1));
            wire.extend_from_slice(head.as_bytes());
            wire.extend_from_slice(&body);
            return (wire, head_request, Some(Decoded::Failed));
        }
        3 if !bodiless => {
            head.push_str("transfer-encoding: chunked\r\n\r\n");
            wire.extend_from_slice(head.as_bytes());
            let bad = BAD_CHUNKED;
            wire.extend_from_slice(rng.pick::<&[u8]>(bad));
            return (wire, head_request, Some(Decoded::Failed));
        }
        4 => {
            wire.extend_from_slice(b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
            return (wire, head_request, Some(Decoded::Failed));
        }
        5 => {
            // Both framings: chunked wins (RFC 9112 §6.3).
            let trailer = rng.chance(30);
            head.push_str(&format!(
                "content-length: {}\r\ntransfer-encoding: chunked\r\n\r\n",
                body.len()
            ));
            wire.extend_from_slice(head.as_bytes());
            if !bodiless {
                wire.extend_from_slice(&chunked_with(rng, &body, trailer));
            }
            return (wire, head_request, Some(ok(body, trailer_names(trailer))));
        }
        6 | 7 => {
            let trailer = rng.chance(30);
            head.push_str("transfer-encoding: chunked\r\n\r\n");
            wire.extend_from_slice(head.as_bytes());
            if !bodiless {
                wire.extend_from_slice(&chunked_with(rng, &body, trailer));
            }
            return (wire, head_request, Some(ok(body, trailer_names(trailer))));
        }
        8 => {
            // No length: the body runs to the close.
            head.push_str("\r\n");
            wire.extend_from_slice(head.as_bytes());
            if !bodiless {
                wire.extend_from_slice(&body);
            }
            return (wire, head_request, Some(ok(body, Vec::new())));
        }
        _ => {
            head.push_str(&format!("content-length: {}\r\n\r\n", body.len()));
            Some(ok(body.clone(), Vec::new()))
        }
    };
    wire.extend_from_slice(head.as_bytes());
    if !bodiless {
        wire.extend_from_slice(&body);
    }
    (wire, head_request, meant)
}

fn chunked_with(rng: &mut Rng, body: &[u8], trailer: bool) -> Vec<u8> {
    let mut out = chunked(rng, body);
    // `chunked` may have put a trailer in: start over from its last chunk.
    let last = out
        .windows(5)
        .rposition(|w| w == b"\r\n0\r\n")
        .map_or(0, |p| p + 2);
    out.truncate(last);
    out.extend_from_slice(b"0\r\n");
    if trailer {
        out.extend_from_slice(b"x-checksum: 1\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

fn trailer_names(trailer: bool) -> Vec<String> {
    if trailer {
        vec!["x-checksum".to_string()]
    } else {
        Vec::new()
    }
}

fn client_case(seed: u64, mutated: bool) -> Result<(), String> {
    let mut rng = Rng(seed);
    let (mut wire, head_request, mut meant) = response(&mut rng);
    if mutated {
        let from = rng.below(wire.len());
        if mutate(&mut rng, &mut wire, from).is_none() {
            return Ok(());
        }
        meant = None;
    }
    let all = cuts(&mut rng, wire.len());
    let first = decode(&wire, &all[0], head_request);
    for sizes in &all[1..] {
        let got = decode(&wire, sizes, head_request);
        if got != first {
            return Err(format!(
                "seed {seed}: in {} reads decoded {got:?}, in one read {first:?}\nstream: {}",
                sizes.len(),
                show(&wire)
            ));
        }
    }
    if let Some(meant) = meant {
        if first != meant {
            return Err(format!(
                "seed {seed}: decoded {first:?}, meant {meant:?} (HEAD: {head_request})\nstream: {}",
                show(&wire)
            ));
        }
    }
    Ok(())
}

#[test]
fn client_generated_responses() {
    for seed in seeds(3) {
        if let Err(e) = client_case(seed, false) {
            panic!("{e}");
        }
    }
}

#[test]
fn client_mutated_responses() {
    for seed in seeds(4) {
        if let Err(e) = client_case(seed, true) {
            panic!("{e}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// The upstream side: requests as encoded for the upstream.

/// A request encoded by [`h1::Outgoing`] and read back as a strict upstream would:
/// exactly one framing (at most one Content-Length, never with Transfer-Encoding), the
/// body that was given, nothing behind the message, and every other header as it was.
fn outgoing_case(seed: u64) -> Result<(), String> {
    let mut rng = Rng(seed);
    let method = *rng.pick(&["GET", "POST", "PUT", "HEAD", "DELETE"]);
    let target = format!("/{}", rng.token(PATH, 12));
    let uri = if rng.chance(50) {
        format!("http://up{target}")
    } else {
        target.clone()
    };
    let mut req = http::Request::builder().method(method).uri(&uri);
    let mut kept = Vec::new();
    for i in 0..rng.below(4) {
        let mut value = rng.token(VALUE, 8).into_bytes();
        if rng.chance(20) {
            value.push(0xe9); // obs-text: allowed in a field value
        }
        let name = format!("x-h{i}");
        req = req.header(&name, value.as_slice());
        // Read back without the spaces at its ends (they are not part of a field value).
        kept.push((name, crate::text::trim_ows(&value).to_vec()));
    }
    // The body, as frames; what the body says of its own length.
    let body: Vec<u8> = rng.bytes(50);
    let shape = rng.below(4);
    let declared = match rng.below(6) {
        0 => Some(body.len().to_string()),
        1 => Some((body.len() + 1 + rng.below(5)).to_string()),
        2 => Some("abc".to_string()),
        3 if body.len() > 1 => Some((body.len() - 1).to_string()),
        _ => None,
    };
    if let Some(cl) = &declared {
        req = req.header("content-length", cl.as_str());
        if rng.chance(30) {
            req = req.header("content-length", cl.as_str());
        }
    }
    if rng.chance(15) {
        req = req.header("transfer-encoding", "chunked");
    }
    let (parts, ()) = req
        .body(())
        .map_err(|e| format!("seed {seed}: {e}"))?
        .into_parts();
    let trailers = shape == 3 && rng.chance(50);
    let sent: crate::cluster::Body = match shape {
        0 => crate::proxy::empty(),
        1 => crate::proxy::full(body.clone()),
        _ => {
            let mut frames: Vec<Result<http_body::Frame<Bytes>, crate::cluster::BoxError>> =
                Vec::new();
            let mut rest = &body[..];
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len());
                frames.push(Ok(http_body::Frame::data(Bytes::copy_from_slice(
                    &rest[..n],
                ))));
                rest = &rest[n..];
            }
            if trailers {
                let mut t = http::HeaderMap::new();
                t.insert("x-sum", http::HeaderValue::from_static("1"));
                frames.push(Ok(http_body::Frame::trailers(t)));
            }
            http_body_util::BodyExt::boxed_unsync(http_body_util::StreamBody::new(
                futures_util::stream::iter(frames),
            ))
        }
    };
    let body = if shape == 0 { Vec::new() } else { body };

    // Encode, as `poll_send` does.
    let mut out = h1::Outgoing::new(&parts, sent);
    let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
    let mut failed = out.failed.take().is_some();
    while !failed && !out.body_done {
        let Some(b) = out.body.as_mut() else {
            return Err(format!("seed {seed}: no body and not done"));
        };
        let step = match http_body::Body::poll_frame(std::pin::Pin::new(b), &mut cx) {
            Poll::Ready(Some(Ok(frame))) => out.encode_frame(frame, None),
            Poll::Ready(None) => out.encode_end(None),
            _ => return Err(format!("seed {seed}: the body's frames are all ready")),
        };
        failed = step.is_err();
    }
    let mut wire = out.first[out.first_off..].to_vec();
    for b in &out.rest {
        wire.extend_from_slice(b);
    }
    let ctx = || {
        format!(
            "seed {seed}: {method} {uri}, declared {declared:?}, body {} bytes in shape {shape}\nwire: {}",
            body.len(),
            show(&wire)
        )
    };
    if failed {
        // Refusing is right only when the declared length is a number the body breaks.
        let mismatch = declared
            .as_deref()
            .and_then(|d| d.parse::<usize>().ok())
            .is_some_and(|n| n != body.len());
        return if mismatch && shape != 0 {
            Ok(())
        } else {
            Err(format!("refused: {}", ctx()))
        };
    }

    // Read it back.
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut parsed = httparse::Request::new(&mut headers);
    let n = match parsed.parse(&wire) {
        Ok(httparse::Status::Complete(n)) => n,
        other => return Err(format!("head: {other:?}: {}", ctx())),
    };
    if parsed.method != Some(method) || parsed.path != Some(target.as_str()) {
        return Err(format!("request line: {}", ctx()));
    }
    let lengths: Vec<&[u8]> = parsed
        .headers
        .iter()
        .filter(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| h.value)
        .collect();
    let chunked = parsed
        .headers
        .iter()
        .any(|h| h.name.eq_ignore_ascii_case("transfer-encoding"));
    if lengths.len() > 1 || (chunked && !lengths.is_empty()) {
        return Err(format!("framing: {}", ctx()));
    }
    let others: Vec<(String, Vec<u8>)> = parsed
        .headers
        .iter()
        .filter(|h| h.name.starts_with("x-"))
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    if others != kept {
        return Err(format!("headers {others:?}: {}", ctx()));
    }
    let mut kind = if chunked {
        BodyKind::Chunked(h1::Chunk::Size)
    } else if let Some(v) = lengths.first() {
        match crate::text::parse_decimal(v) {
            Some(n) => BodyKind::Length(n),
            None => return Err(format!("content-length {v:?}: {}", ctx())),
        }
    } else {
        BodyKind::Done
    };
    let mut conn = Script {
        buf: BytesMut::from(&wire[n..]),
        pieces: VecDeque::new(),
    };
    let mut got = Vec::new();
    let mut got_trailers = false;
    loop {
        match h1::read_frame(&mut cx, &mut conn, &mut kind) {
            Poll::Ready(Ok(Some(frame))) => match frame.into_data() {
                Ok(d) => got.extend_from_slice(&d),
                Err(_) => got_trailers = true,
            },
            Poll::Ready(Ok(None)) => break,
            other => return Err(format!("body: {other:?}: {}", ctx())),
        }
    }
    if got != body {
        return Err(format!("body read back as {} bytes: {}", got.len(), ctx()));
    }
    if !conn.buf.is_empty() {
        return Err(format!("bytes behind the message: {}", ctx()));
    }
    if got_trailers != (trailers && chunked) {
        return Err(format!("trailers: {}", ctx()));
    }
    Ok(())
}

#[test]
fn outgoing_requests_read_back() {
    for seed in seeds(5) {
        if let Err(e) = outgoing_case(seed) {
            panic!("{e}");
        }
    }
}
