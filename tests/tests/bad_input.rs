//! Bad input: oversized or too many headers, slowloris, request smuggling (conflicting
//! framing, bad chunked encoding, obsolete line folding), connection limits, and HTTP/2
//! rapid reset. Malformed requests are refused and nothing of them reaches the upstream.

use serde_json::json;
use std::time::{Duration, Instant};
use wasmesh_e2e::client::{Conn, Req};
use wasmesh_e2e::raw::RawConn;
use wasmesh_e2e::raw_h2::{self, header_block_of, H2Outcome, RawH2};
use wasmesh_e2e::{cluster, Behavior, Proxy, Upstream};

async fn setup() -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    up.set_default(Behavior::Echo);
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0",
            "limits": {"max_request_headers_kb": 8, "max_headers_count": 20, "request_headers_timeout": "1s"},
            "routes": [{"cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    (up, proxy)
}

#[tokio::test]
async fn oversized_and_too_many_headers_are_431() {
    let (up, proxy) = setup().await;
    let l = proxy.listener("in");
    let big = "a".repeat(12 * 1024);
    let r = RawConn::exchange(
        l,
        format!("GET / HTTP/1.1\r\nHost: x\r\nx-big: {big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status(), Some(431), "{}", r.text());

    let many: String = (0..40).map(|i| format!("x-h{i}: v\r\n")).collect();
    let r = RawConn::exchange(
        l,
        format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status(), Some(431), "{}", r.text());

    // Just under the limits passes.
    let some: String = (0..10).map(|i| format!("x-h{i}: v\r\n")).collect();
    let r = RawConn::exchange(
        l,
        format!("GET /ok HTTP/1.1\r\nHost: x\r\n{some}Connection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert_eq!(up.request_count(), 1);
    assert_eq!(
        proxy
            .metric(
                "wasmesh_downstream_rq_rejected_total",
                &[("listener", "in"), ("reason", "headers_too_large")]
            )
            .await,
        2.0,
        "rejections are counted by reason"
    );
}

#[tokio::test]
async fn http2_oversized_and_too_many_headers_are_431() {
    let (up, proxy) = setup().await;
    let l = proxy.listener("in");
    let r = Conn::h2(l)
        .await
        .send(Req::get("/big").header("x-big", &"a".repeat(12 * 1024)))
        .await;
    assert_eq!(r.status, 431);
    let mut many = Req::get("/many");
    for i in 0..40 {
        many = many.header(&format!("x-h{i}"), "v");
    }
    let r = Conn::h2(l).await.send(many).await;
    assert_eq!(r.status, 431, "{}", r.text());
    assert_eq!(up.request_count(), 0, "{:?}", up.requests());
    let mut some = Req::get("/some");
    for i in 0..10 {
        some = some.header(&format!("x-h{i}"), "v");
    }
    assert_eq!(Conn::h2(l).await.send(some).await.status, 200);
}

#[tokio::test]
async fn slowloris_headers_time_out() {
    let (up, proxy) = setup().await;
    let mut c = RawConn::connect(proxy.listener("in")).await;
    c.write(b"GET / HTTP/1.1\r\nHost: x\r\nx-slow: ").await;
    let start = Instant::now();
    let r = c.read_until_close(Duration::from_secs(5)).await;
    let took = start.elapsed();
    assert!(
        r.closed,
        "the proxy must close a connection whose headers never finish"
    );
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
    assert_eq!(up.request_count(), 0);
}

/// Send one byte at a time, 100 ms apart, until the server ends the connection (or
/// `limit` passes); then how it ended and when.
async fn trickle_until_closed(c: &mut RawH2, limit: Duration) -> (H2Outcome, Duration) {
    let start = Instant::now();
    loop {
        c.send_bytes(&[0]).await;
        let o = c.outcome(1, Duration::from_millis(100)).await;
        if o != H2Outcome::TimedOut || start.elapsed() > limit {
            return (o, start.elapsed());
        }
    }
}

/// A frame's 9-byte header alone: its payload is sent separately.
fn frame_head(kind: u8, flags: u8, stream_id: u32, len: usize) -> Vec<u8> {
    let l = u32::try_from(len).expect("fits").to_be_bytes();
    let id = stream_id.to_be_bytes();
    vec![l[1], l[2], l[3], kind, flags, id[0], id[1], id[2], id[3]]
}

#[tokio::test]
async fn http2_slowloris_header_blocks_time_out() {
    let (up, proxy) = setup().await;
    let l = proxy.listener("in");
    let block = header_block_of(&[
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/slow"),
        (b":authority", b"x"),
    ]);

    // A header block that never ends while bytes keep moving, so the idle timeout (300 s)
    // never fires: HEADERS without END_HEADERS, then a CONTINUATION whose payload trickles
    // (one frame: h2's own limit on CONTINUATION floods is not what ends it); and a single
    // HEADERS frame whose payload trickles. Before the header timeout covered HTTP/2, both
    // kept their connections.
    let mut continuation = RawH2::connect(l).await;
    continuation
        .send_frame(raw_h2::HEADERS, raw_h2::END_STREAM, 1, &block)
        .await;
    continuation
        .send_bytes(&frame_head(
            raw_h2::CONTINUATION,
            raw_h2::END_HEADERS,
            1,
            4000,
        ))
        .await;
    let mut trickled = RawH2::connect(l).await;
    trickled
        .send_bytes(&frame_head(
            raw_h2::HEADERS,
            raw_h2::END_HEADERS | raw_h2::END_STREAM,
            1,
            4000,
        ))
        .await;
    let (a, b) = tokio::join!(
        trickle_until_closed(&mut continuation, Duration::from_secs(5)),
        trickle_until_closed(&mut trickled, Duration::from_secs(5)),
    );
    for (case, (outcome, took)) in [("HEADERS payload", b), ("CONTINUATION", a)] {
        assert_eq!(
            outcome,
            H2Outcome::Closed,
            "{case}: the connection is closed"
        );
        // request_headers_timeout is 1 s.
        assert!(
            took >= Duration::from_millis(800) && took < Duration::from_secs(4),
            "{case}: closed after {took:?}"
        );
    }
    assert_eq!(up.request_count(), 0);
    assert_eq!(
        proxy
            .metric(
                "wasmesh_downstream_rq_rejected_total",
                &[("listener", "in"), ("reason", "header_timeout")]
            )
            .await,
        2.0,
    );

    // What is not a slow header block keeps its connection: PINGs with no request for
    // longer than the timeout, then a request whose block is split in two frames.
    let mut patient = RawH2::connect(l).await;
    for i in 0..8u8 {
        patient.send_frame(raw_h2::PING, 0, 0, &[i; 8]).await;
        assert_eq!(
            patient.outcome(1, Duration::from_millis(200)).await,
            H2Outcome::TimedOut
        );
    }
    let (first, rest) = block.split_at(block.len() / 2);
    patient
        .send_frame(raw_h2::HEADERS, raw_h2::END_STREAM, 1, first)
        .await;
    patient
        .send_frame(raw_h2::CONTINUATION, raw_h2::END_HEADERS, 1, rest)
        .await;
    match patient.outcome(1, Duration::from_secs(5)).await {
        H2Outcome::Response { status, .. } => assert_eq!(status, Some(200)),
        other => panic!("a split header block is answered: {other:?}"),
    }
    assert_eq!(up.request_count(), 1);
}

const CL_AND_TE: &[u8] = b"POST /cl-te HTTP/1.1\r\nHost: x\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";

#[tokio::test]
async fn content_length_with_transfer_encoding_smuggles_nothing() {
    let (up, proxy) = setup().await;
    let r = RawConn::exchange(proxy.listener("in"), CL_AND_TE).await;
    assert!(
        r.closed,
        "the connection is closed after conflicting framing (RFC 9112 §6.1)"
    );
    assert_eq!(r.statuses().len(), 1, "exactly one answer: {}", r.text());
    assert!(
        up.requests().iter().all(|q| q.path != "/smuggled"),
        "smuggled: {:?}",
        up.requests()
    );
    for q in up.requests() {
        assert_eq!(q.header("content-length"), None, "{q:?}");
        assert!(q.body.is_empty(), "{q:?}");
    }
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_400_and_never_forwarded() {
    let (up, proxy) = setup().await;
    let r = RawConn::exchange(proxy.listener("in"), CL_AND_TE).await;
    assert_eq!(r.status(), Some(400), "{}", r.text());
    assert!(
        r.closed,
        "the connection is closed after conflicting framing"
    );
    assert!(
        r.text()
            .contains("both Content-Length and Transfer-Encoding"),
        "{}",
        r.text()
    );
    assert_eq!(
        up.request_count(),
        0,
        "the upstream must receive nothing: {:?}",
        up.requests()
    );
    // Transfer-Encoding first, then Content-Length, after a good request on the same
    // connection: only the second request is refused.
    let wire = b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nPOST /te-cl HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n";
    let r = RawConn::exchange(proxy.listener("in"), wire).await;
    assert_eq!(r.statuses(), vec![200, 400], "{}", r.text());
    assert_eq!(
        up.requests()
            .iter()
            .map(|q| q.path.as_str())
            .collect::<Vec<_>>(),
        ["/first"]
    );
}

#[tokio::test]
async fn conflicting_content_lengths_are_refused() {
    let (up, proxy) = setup().await;
    let req = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 30\r\n\r\nhelloGET /smuggled HTTP/1.1\r\n\r\n";
    let r = RawConn::exchange(proxy.listener("in"), req).await;
    assert_eq!(r.status(), Some(400), "{}", r.text());
    assert_eq!(up.request_count(), 0, "{:?}", up.requests());
}

/// A Content-Length that is not one decimal number, or Transfer-Encoding in HTTP/1.0, is
/// framing the server cannot trust (RFC 9112 §6.1, §6.3): 400 and close, as for a
/// conflict. (A front end that reads `+44` as 44 and a back end that reads no body would
/// disagree on where the next request starts.)
#[tokio::test]
async fn invalid_content_length_and_http10_chunked_are_refused() {
    let (up, proxy) = setup().await;
    let cases: &[(&str, &str)] = &[
        ("plus", "Content-Length: +5\r\n"),
        ("hex", "Content-Length: 0x5\r\n"),
        ("list", "Content-Length: 5, 6\r\n"),
        ("space", "Content-Length: 5 5\r\n"),
        ("negative", "Content-Length: -5\r\n"),
        ("overflow", "Content-Length: 99999999999999999999\r\n"),
        ("empty", "Content-Length: \r\n"),
    ];
    for (name, framing) in cases {
        let req = format!(
            "POST /cl-{name} HTTP/1.1\r\nHost: x\r\nx-request-id: cl-{name}\r\n{framing}\r\nhelloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        let r = RawConn::exchange(proxy.listener("in"), req.as_bytes()).await;
        assert_eq!(r.statuses(), vec![400], "{name}: {}", r.text());
        assert!(r.closed, "{name}: the connection must close");
        // Refused before routing, and still logged under the client's request id.
        let log = proxy.log_for_request_id(&format!("cl-{name}")).await;
        assert_eq!(log["status"], 400, "{name}: {log}");
        assert_eq!(log["response_flags"], "DPE", "{name}: {log}");
    }
    let req = b"POST /http10-chunked HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.0\r\nHost: x\r\n\r\n";
    let r = RawConn::exchange(proxy.listener("in"), req).await;
    assert_eq!(r.statuses(), vec![400], "{}", r.text());
    assert!(r.closed);
    assert_eq!(up.request_count(), 0, "{:?}", up.requests());

    // Whitespace around a valid length is allowed (RFC 9110 §5.5), and so is the same
    // length repeated or listed (§8.6): the upstream gets it once.
    for (name, framing) in [
        ("ows", "Content-Length:  5 \r\n"),
        ("repeated", "Content-Length: 5\r\nContent-Length: 5\r\n"),
        ("listed", "Content-Length: 5, 5\r\n"),
    ] {
        let req = format!(
            "POST /cl-ok-{name} HTTP/1.1\r\nHost: x\r\n{framing}Connection: close\r\n\r\nhello"
        );
        let r = RawConn::exchange(proxy.listener("in"), req.as_bytes()).await;
        assert_eq!(r.status(), Some(200), "{name}: {}", r.text());
        assert!(r.text().ends_with("hello"), "{name}: {}", r.text());
        let q = up.last();
        assert_eq!(q.path, format!("/cl-ok-{name}"));
        assert_eq!(q.header_all("content-length"), ["5"], "{name}: {q:?}");
    }
}

#[tokio::test]
async fn invalid_chunked_encoding_smuggles_nothing() {
    let (up, proxy) = setup().await;
    for (i, body) in [
        "zz\r\nhello\r\n0\r\n\r\n",             // not a hex size
        "5\r\nhelloXX0\r\n\r\n",                // missing CRLF after data
        "ffffffffffffffffff\r\nx\r\n0\r\n\r\n", // size overflow
    ]
    .iter()
    .enumerate()
    {
        let req = format!(
            "POST /chunked-{i} HTTP/1.1\r\nHost: x\r\nx-request-id: chunked-{i}\r\nTransfer-Encoding: chunked\r\n\r\n{body}GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        let r = RawConn::exchange(proxy.listener("in"), req.as_bytes()).await;
        assert!(r.closed, "case {i}: the connection must close");
        // The client's body is at fault: 400, not a 503 blaming the upstream.
        assert_eq!(r.statuses(), vec![400], "case {i}: {}", r.text());
        // Whatever the proxy forwarded of the broken request, no second request came out of it.
        assert!(
            up.requests().iter().all(|q| q.path != "/smuggled"),
            "case {i}: smuggled: {:?}",
            up.requests()
        );
        for q in up
            .requests()
            .iter()
            .filter(|q| q.path == format!("/chunked-{i}"))
        {
            assert!(
                q.body_error.is_some() || q.body.is_empty(),
                "case {i}: a broken body must not arrive whole: {q:?}"
            );
        }
        let log = proxy.log_for_request_id(&format!("chunked-{i}")).await;
        assert_eq!(log["response_flags"], "DPE", "case {i}: {log}");
    }
}

#[tokio::test]
async fn obsolete_line_folding_is_400() {
    let (up, proxy) = setup().await;
    let req = b"GET / HTTP/1.1\r\nHost: x\r\nx-folded: a\r\n b\r\n\r\n";
    let r = RawConn::exchange(proxy.listener("in"), req).await;
    assert_eq!(r.status(), Some(400), "{}", r.text());
    assert_eq!(up.request_count(), 0);
}

/// A request smuggled in an HTTP/2 body, for an HTTP/1.1 upstream to find.
const SMUGGLED_H1: &[u8] = b"GET /smuggled HTTP/1.1\r\nhost: x\r\nx-smuggled: 1\r\n\r\n";

/// One HTTP/2 request written frame by frame: its header fields in order (pseudo-headers
/// included) and its DATA frames (`true`: END_STREAM).
struct H2Case {
    name: &'static str,
    fields: Vec<(Vec<u8>, Vec<u8>)>,
    data: Vec<(&'static [u8], bool)>,
}

impl H2Case {
    /// `:method`, `:scheme`, `:authority`, `:path`, then `extra`.
    fn new(name: &'static str, method: &str, path: &str, extra: &[(&str, &str)]) -> H2Case {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = [
            (":method", method),
            (":scheme", "http"),
            (":authority", "x"),
            (":path", path),
        ]
        .iter()
        .chain(extra)
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
        fields.shrink_to_fit();
        H2Case {
            name,
            fields,
            data: Vec::new(),
        }
    }

    fn raw_fields(name: &'static str, fields: &[(&[u8], &[u8])]) -> H2Case {
        H2Case {
            name,
            fields: fields
                .iter()
                .map(|(n, v)| (n.to_vec(), v.to_vec()))
                .collect(),
            data: Vec::new(),
        }
    }

    fn data(mut self, frames: &[(&'static [u8], bool)]) -> H2Case {
        self.data = frames.to_vec();
        self
    }

    /// Send on a connection of its own; how the proxy ended the stream.
    async fn run(&self, addr: std::net::SocketAddr) -> H2Outcome {
        let mut c = RawH2::connect(addr).await;
        let fields: Vec<(&[u8], &[u8])> = self
            .fields
            .iter()
            .map(|(n, v)| (n.as_slice(), v.as_slice()))
            .collect();
        c.headers(1, &fields, self.data.is_empty()).await;
        for (bytes, end) in &self.data {
            c.data(1, bytes, *end).await;
        }
        c.outcome(1, Duration::from_secs(5)).await
    }
}

/// HTTP/2 to an HTTP/1.1 upstream is where request smuggling lives on (H2.TE, H2.CL, CR/LF
/// injection into the request line or a header): what HTTP/2 calls malformed must be
/// refused (RFC 9113 §8.1.1, §8.2), and a body that contradicts its content-length must not
/// leave bytes on an upstream connection that is used again.
#[tokio::test]
async fn http2_requests_that_would_smuggle_into_http1_are_refused() {
    let up = Upstream::start().await;
    up.set_default(Behavior::Echo);
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"path": "/teapot"}, "direct_response": {"status": 418, "body": "tea\n"}},
            {"cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let l = proxy.listener("in");

    let refused = [
        H2Case::new(
            "te-chunked",
            "POST",
            "/h2-te",
            &[("transfer-encoding", "chunked")],
        )
        .data(&[(b"0\r\n\r\n", false), (SMUGGLED_H1, true)]),
        H2Case::new(
            "connection",
            "GET",
            "/h2-conn",
            &[("connection", "keep-alive")],
        ),
        H2Case::new(
            "keep-alive",
            "GET",
            "/h2-ka",
            &[("keep-alive", "timeout=5")],
        ),
        H2Case::new(
            "proxy-connection",
            "GET",
            "/h2-pc",
            &[("proxy-connection", "keep-alive")],
        ),
        H2Case::new("upgrade", "GET", "/h2-up", &[("upgrade", "websocket")]),
        H2Case::new("te-gzip", "GET", "/h2-teg", &[("te", "gzip")]),
        H2Case::new("upper-case-name", "GET", "/h2-upper", &[("X-Upper", "1")]),
        H2Case::new(
            "crlf-in-value",
            "GET",
            "/h2-crlf",
            &[("x-a", "1\r\nx-smuggled: 1")],
        ),
        H2Case::new("nul-in-value", "GET", "/h2-nul", &[("x-a", "1\0")]),
        H2Case::new("space-in-name", "GET", "/h2-space", &[("x bad", "1")]),
        H2Case::new("colon-in-name", "GET", "/h2-colon", &[("x:bad", "1")]),
        H2Case::new(
            "request-line-in-path",
            "GET",
            "/h2-path HTTP/1.1\r\nhost: x\r\n\r\nGET /smuggled",
            &[],
        ),
        H2Case::new("space-in-path", "GET", "/h2 path", &[]),
        H2Case::new(
            "request-line-in-method",
            "GET /smuggled HTTP/1.1\r\nx:",
            "/h2-m",
            &[],
        ),
        H2Case::new(
            "crlf-in-authority",
            "GET",
            "/h2-auth",
            &[(":authority", "x\r\nx-smuggled: 1")],
        ),
        H2Case::new("unknown-pseudo", "GET", "/h2-pseudo", &[(":foo", "bar")]),
        H2Case::new(
            "status-in-request",
            "GET",
            "/h2-status",
            &[(":status", "200")],
        ),
        H2Case::raw_fields(
            "pseudo-after-regular",
            &[
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b"x-a", b"1"),
                (b":path", b"/h2-order"),
            ],
        ),
        H2Case::raw_fields(
            "two-paths",
            &[
                (b":method", b"GET"),
                (b":scheme", b"http"),
                (b":path", b"/h2-two"),
                (b":path", b"/smuggled"),
            ],
        ),
        H2Case::raw_fields("no-path", &[(b":method", b"GET"), (b":scheme", b"http")]),
        H2Case::new(
            "content-length-0-with-data",
            "POST",
            "/h2-cl0",
            &[("content-length", "0")],
        )
        .data(&[(SMUGGLED_H1, true)]),
        H2Case::new(
            "two-content-lengths",
            "POST",
            "/h2-cl2",
            &[("content-length", "1"), ("content-length", "2")],
        )
        .data(&[(b"ab", true)]),
        H2Case::new(
            "content-length-not-a-number",
            "POST",
            "/h2-clx",
            &[("content-length", "5x")],
        )
        .data(&[(b"hello", true)]),
    ];
    // Refused once the body contradicts the length; the upstream may have its head by then.
    let broken_bodies = [
        H2Case::new(
            "content-length-short",
            "POST",
            "/h2-cl-short",
            &[("content-length", "5")],
        )
        .data(&[(b"hello", false), (SMUGGLED_H1, true)]),
        H2Case::new(
            "content-length-long",
            "POST",
            "/h2-cl-long",
            &[("content-length", "50")],
        )
        .data(&[(b"hello", true)]),
    ];

    for case in &refused {
        let outcome = case.run(l).await;
        assert!(outcome.refused(), "{}: not refused: {outcome:?}", case.name);
    }
    for case in &broken_bodies {
        let outcome = case.run(l).await;
        let answered_ok = matches!(outcome, H2Outcome::Response { status: Some(s), .. } if s < 400);
        assert!(
            !answered_ok && outcome != H2Outcome::TimedOut,
            "{}: {outcome:?}",
            case.name
        );
    }

    // CONNECT asks for a tunnel, which wasmesh does not make: 501 over both protocols, and
    // over HTTP/1.1 the connection closes (the client may already be sending tunnel bytes).
    let connect = H2Case::raw_fields(
        "connect",
        &[(b":method", b"CONNECT"), (b":authority", b"127.0.0.1:9")],
    );
    let outcome = connect.run(l).await;
    assert!(
        matches!(
            outcome,
            H2Outcome::Response {
                status: Some(501),
                ..
            }
        ),
        "{outcome:?}"
    );
    // Nor does it offer extended CONNECT (RFC 8441): SETTINGS_ENABLE_CONNECT_PROTOCOL is
    // not sent, so `:protocol` is malformed and browsers keep WebSockets on HTTP/1.1.
    let mut c = RawH2::connect(l).await;
    let settings = c.server_settings(Duration::from_secs(5)).await;
    assert!(!settings.contains(&(0x8, 1)), "{settings:?}");
    let websocket = H2Case::raw_fields(
        "extended-connect",
        &[
            (b":method", b"CONNECT"),
            (b":protocol", b"websocket"),
            (b":scheme", b"http"),
            (b":authority", b"x"),
            (b":path", b"/h2-ws"),
        ],
    );
    let outcome = websocket.run(l).await;
    assert!(outcome.refused(), "{outcome:?}");
    let r = RawConn::exchange(
        l,
        b"CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), Some(501), "{}", r.text());
    assert!(r.closed, "{}", r.text());
    // The authority form belongs to CONNECT alone (RFC 9112 §3.2.3).
    let r = RawConn::exchange(l, b"GET 127.0.0.1:9 HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status(), Some(400), "{}", r.text());

    // The same connection-level path works for requests that are fine.
    let fine = [
        (
            H2Case::new("te-trailers", "GET", "/h2-ok-te", &[("te", "trailers")]),
            200,
            &b""[..],
        ),
        (
            H2Case::new(
                "exact-length",
                "POST",
                "/h2-ok-post",
                &[("content-length", "5")],
            )
            .data(&[(b"hello", true)]),
            200,
            b"hello",
        ),
        (H2Case::new("direct", "GET", "/teapot", &[]), 418, b"tea\n"),
    ];
    for (case, status, body) in &fine {
        let outcome = case.run(l).await;
        assert_eq!(
            outcome,
            H2Outcome::Response {
                status: Some(*status),
                body: body.to_vec()
            },
            "{}",
            case.name
        );
    }

    // Upstream connections that carried a broken body are not used again: requests after
    // them arrive whole, each as itself.
    let mut c = Conn::h1(l).await;
    for i in 0..20 {
        let r = c
            .send(Req::post(&format!("/after-{i}")).body(format!("body-{i}")))
            .await;
        assert_eq!(
            (r.status, r.text()),
            (200, format!("body-{i}")),
            "after-{i}"
        );
    }
    let seen = up.requests();
    let reached: Vec<&str> = seen.iter().map(|q| q.path.as_str()).collect();
    for q in &seen {
        assert!(
            q.path.starts_with("/after-")
                || q.path.starts_with("/h2-ok-")
                || q.path.starts_with("/h2-cl-"),
            "reached the upstream: {} {} (all: {reached:?})",
            q.method,
            q.uri
        );
        assert!(q.header("x-smuggled").is_none(), "{q:?}");
        if q.path.starts_with("/h2-cl-") {
            assert!(
                q.body_error.is_some() || q.body.len() <= 5,
                "a body that broke its length must not arrive as more: {q:?}"
            );
        }
    }
    assert_eq!(
        seen.iter()
            .filter(|q| q.path.starts_with("/after-"))
            .count(),
        20,
        "{reached:?}"
    );
    assert!(proxy.admin_get("/live").await.status == 200);
}

#[tokio::test]
async fn max_connections_holds_new_connections_in_the_backlog() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "limits": {"max_connections": 1},
                       "routes": [{"cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let l = proxy.listener("in");
    let mut first = Conn::h1(l).await;
    assert_eq!(first.send(Req::get("/1")).await.status, 200);

    // A second connection is accepted by the kernel but not served while the first lives.
    let second = tokio::spawn(async move { Req::get("/2").send(l).await });
    tokio::time::sleep(Duration::from_millis(500)).await; // a negative check needs a wait
    assert!(!second.is_finished(), "served past max_connections");
    assert_eq!(up.request_count(), 1);

    drop(first);
    let r = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("served once a slot frees")
        .expect("task");
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn http2_rapid_reset_is_cut_off_and_the_proxy_keeps_serving() {
    let up = Upstream::start().await;
    up.set_default(Behavior::Delay(Duration::from_millis(200)));
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let addr = proxy.listener("in");

    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    let conn_task = tokio::spawn(conn);
    let mut client = client;
    let mut opened = 0;
    let mut refused = None;
    for _ in 0..2_000 {
        match client.clone().ready().await {
            Ok(mut c) => {
                let req = http::Request::get(format!("http://{addr}/r"))
                    .body(())
                    .expect("req");
                match c.send_request(req, false) {
                    Ok((_resp, mut stream)) => {
                        stream.send_reset(h2::Reason::CANCEL);
                        opened += 1;
                    }
                    Err(e) => {
                        refused = Some(e.to_string());
                        break;
                    }
                }
                client = c;
            }
            Err(e) => {
                refused = Some(e.to_string());
                break;
            }
        }
    }
    // The proxy ends the abusive connection: GOAWAY(ENHANCE_YOUR_CALM) and close. The client
    // sees the GOAWAY, or, if it was still writing, the closed socket.
    let ended = tokio::time::timeout(Duration::from_secs(10), conn_task).await;
    let end = match ended {
        Ok(Ok(r)) => format!("{r:?}"),
        other => panic!(
            "after {opened} open+reset streams the connection is still up ({other:?}, {refused:?})"
        ),
    };
    assert!(
        [
            "GoAway",
            "ENHANCE_YOUR_CALM",
            "BrokenPipe",
            "ConnectionReset"
        ]
        .iter()
        .any(|s| end.contains(s)),
        "the proxy must cut the connection off: it ended with {end}; send error {refused:?}"
    );
    assert!(
        up.request_count() < opened / 2,
        "most reset streams never reached the upstream"
    );

    // Everyone else is still served.
    up.set_default(Behavior::Status(200));
    let r = Req::get("/after").send_h2(addr).await;
    assert_eq!(r.status, 200);
    assert!(proxy.admin_get("/live").await.status == 200);
}

#[tokio::test]
async fn idle_downstream_connections_are_closed() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "limits": {"idle_timeout": "1s"},
                       "routes": [{"cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let mut c = Conn::h1(proxy.listener("in")).await;
    assert_eq!(c.send(Req::get("/x")).await.status, 200);
    let start = Instant::now();
    wasmesh_e2e::eventually(
        Duration::from_secs(5),
        "the idle connection to close",
        || async { c.is_closed().then_some(()) },
    )
    .await;
    assert!(
        start.elapsed() >= Duration::from_millis(800),
        "closed after {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn idle_http2_connections_are_closed_by_requests_not_bytes() {
    let up = Upstream::start().await;
    up.set_default(Behavior::Delay(Duration::from_millis(1500)));
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "limits": {"idle_timeout": "1s"},
                       "routes": [{"cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    let block = header_block_of(&[
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":path", b"/slow"),
        (b":authority", b"x"),
    ]);
    let flags = raw_h2::END_HEADERS | raw_h2::END_STREAM;
    let mut c = RawH2::connect(proxy.listener("in")).await;

    // Requests in progress longer than the idle timeout keep the connection: both are
    // answered, the second sent after the first's 1.5 s (no GOAWAY in between).
    for stream in [1, 3] {
        c.send_frame(raw_h2::HEADERS, flags, stream, &block).await;
        match c.outcome(stream, Duration::from_secs(5)).await {
            H2Outcome::Response { status, .. } => assert_eq!(status, Some(200)),
            other => panic!("stream {stream}: {other:?}"),
        }
    }

    // With none in progress it is closed after the idle timeout, although PINGs keep
    // bytes moving (hyper's own keep-alive pings would too, every 60 s).
    let start = Instant::now();
    let ended = loop {
        c.send_frame(raw_h2::PING, 0, 0, &[7; 8]).await;
        match c.outcome(5, Duration::from_millis(200)).await {
            H2Outcome::TimedOut if start.elapsed() < Duration::from_secs(5) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(ended, H2Outcome::GoAway(0) | H2Outcome::Closed),
        "{ended:?}"
    );
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(800) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
    assert_eq!(up.request_count(), 2);
}

/// A proxy whose routes use what the request path decides on (matchers, rewrites,
/// hashing, retries, region selection, redirects, direct answers), for the random-request
/// tests below.
async fn logic_setup() -> (Upstream, Proxy) {
    let up = Upstream::start().await;
    up.set_default(Behavior::Echo);
    let proxy = Proxy::start(json!({
        "node": {"locality": {"region": "eu", "zone": "eu-1"}},
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "xff_num_trusted_hops": 2,
            "limits": {"max_request_headers_kb": 8, "max_headers_count": 30},
            "routes": [
                {"match": {"path": "/direct"}, "direct_response": {"status": 204}},
                {"match": {"prefix": "/old/"}, "redirect": {"path": "/new/", "status": 308}},
                {"match": {"regex": "/re/[a-z]+", "headers": [{"name": "x-a", "regex": "v.*"}]},
                 "cluster": "app"},
                {"match": {"prefix": "/q", "query": [{"name": "k", "present": true}]},
                 "cluster": "app", "prefix_rewrite": "/", "host_rewrite": "rewritten.local"},
                {"match": {"prefix": "/hash"}, "cluster": "ring",
                 "hash_policy": [{"cookie": {"name": "sid"}}, {"header": {"header_name": "x-user"}},
                                 {"connection_properties": {"source_ip": true}}]},
                {"match": {"prefix": "/region"}, "cluster": "app",
                 "locality_routing": {"header": "x-region"}},
                {"match": {"prefix": "/"}, "cluster": "app", "timeout": "2s",
                 "retry_policy": {"retry_on": "5xx", "num_retries": 1},
                 "request_headers": {"set": {"x-set": "1"}, "remove": ["x-drop"]},
                 "response_headers": {"add": {"x-added": "1"}}}
            ]}],
        "clusters": [
            cluster("app", up.addr()),
            {"name": "ring", "lb_policy": "ring_hash", "endpoints": [{"address": up.addr().to_string()}]}
        ],
    }))
    .await;
    (up, proxy)
}

const METHODS: &[&str] = &[
    "GET", "POST", "HEAD", "DELETE", "OPTIONS", "PROPFIND", "X-ODD",
];
const PATHS: &[&str] = &[
    "/",
    "/direct",
    "/old/a",
    "/re/abc",
    "/q?k",
    "/q?k=1&k=2",
    "/hash/x",
    "/region",
    "/a/../b",
    "/%2e%2e/%2E",
    "//x//y",
    "/a%2Fb",
    "/a%5Cb",
    "/%41%7e",
    "/%",
    "/%zz",
    "/a?",
    "/?#",
    "/.",
    "/..",
    "/a/./b/../../..",
    "*",
    "http://other/x",
];
const HEADERS: &[(&str, &[&str])] = &[
    (
        "x-forwarded-for",
        &[
            "1.2.3.4",
            "garbage, ::1",
            " , ,",
            "[::1]:80, 10.0.0.1",
            "999.1.1.1, 1.1.1.1, 2.2.2.2",
            "",
        ],
    ),
    (
        "x-request-id",
        &[
            "",
            "abc",
            "\u{7f}",
            "a b c",
            "0123456789abcdef0123456789abcdef0123456789",
        ],
    ),
    (
        "traceparent",
        &[
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "ff-x-y-z",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "",
            "00--",
        ],
    ),
    ("tracestate", &["a=b", ",,,", "=x"]),
    (
        "grpc-timeout",
        &["99999999H", "1n", "0m", "x", "12345678901S", "1"],
    ),
    (
        "host",
        &[
            ":",
            "[::1",
            "a:99999",
            "",
            "*",
            "a..b",
            "UPPER.Local:80",
            "rewritten.local",
        ],
    ),
    ("cookie", &["sid=1", "sid=", "; ;", "sid=a; sid=b", "=; x"]),
    ("x-user", &["alice", ""]),
    ("x-region", &["eu", "us", "", "nowhere"]),
    ("x-a", &["v1", "w"]),
    ("x-drop", &["1"]),
    ("te", &["trailers", "gzip", "trailers, deflate"]),
    (
        "connection",
        &["keep-alive, x-a", "upgrade", "close, close"],
    ),
    ("upgrade", &["websocket", "h2c"]),
    ("expect", &["100-continue", "200-ok"]),
    ("x-wasmesh-route", &["forged"]),
    ("accept-encoding", &["gzip", "*"]),
];
/// A request built from the tables above: method, path, headers, and the body (`None`,
/// or its framing: `true` chunked).
struct RandomRequest {
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, &'static str)>,
    body: Option<bool>,
}

fn random_requests(seed: u64) -> impl Iterator<Item = RandomRequest> {
    let mut rng = wasmesh_e2e::generate::Rng(seed);
    std::iter::repeat_with(move || {
        let method = *rng.pick(METHODS);
        let path = *rng.pick(PATHS);
        let headers = (0..rng.below(6))
            .map(|_| {
                let (name, values) = *rng.pick(HEADERS);
                (name, *rng.pick(values))
            })
            .collect();
        let body = match rng.below(4) {
            0 => Some(false),
            1 => Some(true),
            _ => None,
        };
        RandomRequest {
            method,
            path,
            headers,
            body,
        }
    })
}

/// What the random-request tests check at the end: the mix reached the upstream and the
/// proxy's own answers alike (`want` among the statuses), every access-log line is JSON,
/// nothing panicked and the proxy is still ready.
async fn after_random_requests(
    up: &Upstream,
    proxy: &Proxy,
    statuses: &std::collections::BTreeMap<u16, u32>,
    want: &[u16],
) {
    for s in want {
        assert!(statuses.contains_key(s), "no {s} among {statuses:?}");
    }
    assert!(up.request_count() > 50, "{statuses:?}");
    assert_access_log_is_json(proxy).await;
    assert_eq!(proxy.admin_get("/ready").await.status, 200);
    let stderr = proxy.stderr();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Every access-log line so far is one JSON object, whatever bytes the requests carried
/// (a marker request, logged last, shows the writer has caught up).
async fn assert_access_log_is_json(proxy: &Proxy) {
    Req::get("/direct")
        .header("x-request-id", "log-marker")
        .send(proxy.listener("in"))
        .await;
    proxy.log_for_request_id("log-marker").await;
    let text = proxy.stdout_text();
    let mut lines = 0;
    for line in text.lines().filter(|l| l.starts_with('{')) {
        lines += 1;
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("access log line is not JSON ({e}): {line}"));
        assert!(v.is_object(), "{line}");
    }
    assert!(lines > 100, "{lines} access log lines");
}

/// Requests built from the parts that reach the request path's logic (paths with dot
/// segments and escapes, forwarding headers, trace context, gRPC timeouts, hosts,
/// cookies, odd methods, framing), over HTTP/1.1: every request gets an answer with a
/// status line, nothing panics, and the proxy stays ready. The tests run the debug build,
/// where arithmetic overflow panics too.
#[tokio::test]
async fn random_requests_always_get_an_answer() {
    let (up, proxy) = logic_setup().await;
    let l = proxy.listener("in");
    let mut statuses = std::collections::BTreeMap::new();
    for (i, r) in random_requests(0x51ed_270b_2e48_9f03)
        .take(1500)
        .enumerate()
    {
        let mut req = format!("{} {} HTTP/1.1\r\n", r.method, r.path);
        for (name, value) in &r.headers {
            req.push_str(&format!("{name}: {value}\r\n"));
        }
        if !r.headers.iter().any(|(n, _)| *n == "host") && i % 4 != 0 {
            req.push_str("Host: app.local\r\n");
        }
        match r.body {
            Some(false) => req.push_str("Content-Length: 3\r\nConnection: close\r\n\r\nabc"),
            Some(true) => req.push_str(
                "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            ),
            None => req.push_str("Connection: close\r\n\r\n"),
        }
        let r = RawConn::exchange(l, req.as_bytes()).await;
        // The final answer (after any `100 Continue`).
        let status = r.statuses().into_iter().find(|s| *s >= 200);
        assert!(
            status.is_some() && r.closed,
            "request {i} got no answer (closed: {}): {req:?} -> {:?}",
            r.closed,
            r.text()
        );
        *statuses.entry(status.unwrap_or(0)).or_insert(0u32) += 1;
    }
    after_random_requests(&up, &proxy, &statuses, &[200, 204, 308, 400, 504]).await;
}

/// The same over HTTP/2, all on one connection: every request legal in HTTP/2 (no
/// connection-specific headers, a parseable URI) gets a response, and the connection
/// survives them all.
#[tokio::test]
async fn random_h2_requests_always_get_an_answer() {
    let (up, proxy) = logic_setup().await;
    let l = proxy.listener("in");
    let mut conn = Conn::h2(l).await;
    let mut statuses = std::collections::BTreeMap::new();
    for (i, r) in random_requests(0x3c6e_f372_fe94_f82b)
        .take(1500)
        .enumerate()
    {
        let host = r
            .headers
            .iter()
            .find(|(n, _)| *n == "host")
            .map_or("app.local", |(_, v)| *v);
        if format!("http://{host}{}", r.path)
            .parse::<http::Uri>()
            .is_err()
        {
            continue;
        }
        let mut req = Req::new(r.method, r.path).host(host);
        for (name, value) in &r.headers {
            let h2_illegal = matches!(*name, "connection" | "upgrade" | "host" | "keep-alive")
                || (*name == "te" && *value != "trailers");
            if h2_illegal || http::HeaderValue::from_str(value).is_err() {
                continue;
            }
            req = req.header(name, value);
        }
        if r.body.is_some() {
            req = req.body("abc");
        }
        let resp = match conn.try_send(req).await {
            Ok(resp) => resp,
            Err(e) => panic!(
                "request {i} ({} {} {:?}) failed: {e}",
                r.method, r.path, r.headers
            ),
        };
        *statuses.entry(resp.status).or_insert(0u32) += 1;
    }
    after_random_requests(&up, &proxy, &statuses, &[200, 204, 308]).await;
}
