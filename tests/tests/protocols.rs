//! Protocols: HTTP/1.1 and HTTP/2 (h2c prior knowledge) downstream × HTTP/1.1 and HTTP/2
//! upstream, keep-alive reuse on both sides, WebSocket upgrades, gRPC-style trailers both
//! ways, and raw TCP listeners.

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::Version;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use wasmesh_e2e::client::{Conn, Req};
use wasmesh_e2e::upstream::TcpEcho;
use wasmesh_e2e::{cluster, h1_and_h2_manifest, h2_cluster, Behavior, Proxy, Upstream};

#[tokio::test]
async fn every_downstream_and_upstream_protocol_pair() {
    let h1 = Upstream::named("h1").await;
    let h2 = Upstream::named("h2").await;
    h1.set_default(Behavior::Echo);
    h2.set_default(Behavior::Echo);
    let proxy = Proxy::start(h1_and_h2_manifest("/to-", h1.addr(), h2.addr())).await;
    let l = proxy.listener("in");

    for (down, up_path, up, up_version) in [
        (Version::HTTP_11, "/to-h1", &h1, Version::HTTP_11),
        (Version::HTTP_11, "/to-h2", &h2, Version::HTTP_2),
        (Version::HTTP_2, "/to-h1", &h1, Version::HTTP_11),
        (Version::HTTP_2, "/to-h2", &h2, Version::HTTP_2),
    ] {
        let body = format!("{down:?} via {up_path}");
        let req = Req::post(up_path).host("svc.local").body(body.clone());
        let r = if down == Version::HTTP_2 {
            req.send_h2(l).await
        } else {
            req.send(l).await
        };
        assert_eq!(r.status, 200, "{down:?} {up_path}");
        assert_eq!(r.version, down, "answered in the client's protocol");
        assert_eq!(r.text(), body, "body round trip {down:?} {up_path}");
        let seen = up.last();
        assert_eq!(seen.version, up_version, "{down:?} {up_path}");
        assert_eq!(seen.body, body.as_bytes());
        // HTTP/2 clients send :authority only; an HTTP/1.1 upstream still gets a Host.
        assert_eq!(seen.header("host"), Some("svc.local"), "{down:?} {up_path}");
        let protocol = if down == Version::HTTP_2 {
            "HTTP/2"
        } else {
            "HTTP/1.1"
        };
        let log = proxy
            .log_entry("the exchange's log line", |l| {
                l["path"] == up_path && l["protocol"] == protocol
            })
            .await;
        assert_eq!(log["status"], 200);
    }
}

#[tokio::test]
async fn http2_upstream_gets_the_client_authority() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "h2"}]}],
        "clusters": [h2_cluster("h2", up.addr())],
    }))
    .await;
    let r = Req::get("/grpc.Service/Method")
        .host("svc.local")
        .send_h2(proxy.listener("in"))
        .await;
    assert_eq!(r.status, 200);
    let seen = up.last();
    assert_eq!(seen.authority.as_deref(), Some("svc.local"), "{seen:?}");
    assert!(
        seen.header("host").is_none_or(|h| h == "svc.local"),
        "{seen:?}"
    );
}

#[tokio::test]
async fn keep_alive_reuses_connections_on_both_sides() {
    let up = Upstream::start().await;
    let up2 = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [
            {"match": {"prefix": "/h2up"}, "cluster": "app2"},
            {"cluster": "app"},
        ]}],
        "clusters": [cluster("app", up.addr()), h2_cluster("app2", up2.addr())],
    }))
    .await;
    let l = proxy.listener("in");

    // Five requests on one HTTP/1.1 connection.
    let mut c = Conn::h1(l).await;
    for i in 0..5 {
        let r = c.send(Req::get(&format!("/ka/{i}"))).await;
        assert_eq!(r.status, 200);
    }
    assert!(!c.is_closed());
    assert_eq!(
        proxy
            .metric("wasmesh_downstream_cx_total", &[("listener", "in")])
            .await,
        1.0
    );
    assert_eq!(
        up.connections(),
        1,
        "the upstream connection is pooled and reused"
    );

    // Ten concurrent streams on one HTTP/2 connection, to both kinds of upstream.
    let c2 = std::sync::Arc::new(tokio::sync::Mutex::new(Conn::h2(l).await));
    let mut tasks = Vec::new();
    for i in 0u32..10 {
        let path = if i.is_multiple_of(2) {
            format!("/h2up/{i}")
        } else {
            format!("/mux/{i}")
        };
        let mut head = {
            let mut c = c2.lock().await;
            c.send_head(Req::get(&path)).await.expect("h2 stream")
        };
        tasks.push(tokio::spawn(async move {
            let status = head.status().as_u16();
            let _ = http_body_util::BodyExt::collect(head.body_mut()).await;
            status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.expect("task"), 200);
    }
    assert_eq!(
        proxy
            .metric("wasmesh_downstream_cx_total", &[("listener", "in")])
            .await,
        2.0
    );
    assert_eq!(
        up2.connections(),
        1,
        "one multiplexed HTTP/2 upstream connection"
    );
}

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A WebSocket through the proxy at `addr` (the handshake must get 101).
async fn ws_connect(addr: std::net::SocketAddr) -> Ws {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (ws, resp) = tokio_tungstenite::client_async(format!("ws://{addr}/chat"), tcp)
        .await
        .expect("websocket handshake through the proxy");
    assert_eq!(resp.status(), 101);
    ws
}

/// Send `text` and expect it back from the echo upstream.
async fn echo(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.expect("send");
    let got = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("echo in time")
        .expect("a message")
        .expect("the tunnel is open");
    assert_eq!(got, Message::text(text));
}

#[tokio::test]
async fn websocket_upgrade_round_trip() {
    let up = Upstream::start().await;
    up.set_default(Behavior::WebSocketEcho);
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "ws"}]}],
        "clusters": [cluster("ws", up.addr())],
    }))
    .await;
    let mut ws = ws_connect(proxy.listener("in")).await;
    for i in 0..3 {
        echo(&mut ws, &format!("hello {i}")).await;
    }
    let big = vec![7u8; 200_000];
    ws.send(Message::binary(big.clone())).await.expect("send");
    let got = ws.next().await.expect("a message").expect("no error");
    assert_eq!(got.into_data(), Bytes::from(big));
    ws.close(None).await.expect("close");

    let seen = up.last();
    assert_eq!(seen.header("upgrade"), Some("websocket"));
    assert!(seen
        .header("connection")
        .is_some_and(|c| c.eq_ignore_ascii_case("upgrade")));
    assert!(seen.header("sec-websocket-key").is_some());
}

#[tokio::test]
async fn an_idle_websocket_is_closed_after_the_stream_idle_timeout() {
    let up = Upstream::start().await;
    up.set_default(Behavior::WebSocketEcho);
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0",
            "limits": {"stream_idle_timeout": "1s"}, "routes": [{"cluster": "ws"}]}],
        "clusters": [cluster("ws", up.addr())],
    }))
    .await;
    let mut ws = ws_connect(proxy.listener("in")).await;
    // Messages a tenth of the timeout apart, for longer than the timeout: a tunnel that
    // moves bytes stays open.
    let start = std::time::Instant::now();
    for i in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        echo(&mut ws, &format!("tick {i}")).await;
    }
    assert!(start.elapsed() > Duration::from_secs(1));
    // Then silence: the proxy closes both sides.
    let end = tokio::time::timeout(Duration::from_secs(15), ws.next())
        .await
        .expect("the proxy closes an idle tunnel");
    assert!(
        matches!(end, None | Some(Err(_))),
        "the connection must end, not carry a message: {end:?}"
    );
}

#[tokio::test]
async fn grpc_style_trailers_pass_both_ways() {
    let up = Upstream::start().await;
    up.set_default(Behavior::GrpcEcho);
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "grpc"}]}],
        "clusters": [h2_cluster("grpc", up.addr())],
    }))
    .await;
    let addr = proxy.listener("in");

    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (client, conn) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut client = client.ready().await.expect("ready");
    let req = http::Request::post(format!("http://{addr}/echo.Echo/Say"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .expect("request");
    let (resp, mut stream) = client.send_request(req, false).expect("send");
    let message = Bytes::from_static(b"\x00\x00\x00\x00\x05hello");
    stream.send_data(message.clone(), false).expect("data");
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-client-trailer", "from-client".parse().expect("value"));
    stream.send_trailers(trailers).expect("trailers");

    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("in time")
        .expect("response");
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("content-type").map(|v| v.as_bytes()),
        Some(&b"application/grpc"[..])
    );
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("data");
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, message);
    let trailers = body
        .trailers()
        .await
        .expect("trailers")
        .expect("response trailers arrive");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"0"[..])
    );
    assert_eq!(
        trailers.get("grpc-message").map(|v| v.as_bytes()),
        Some(&b"ok"[..])
    );

    let seen = up.last();
    assert_eq!(seen.version, Version::HTTP_2);
    assert_eq!(seen.header("te"), Some("trailers"));
    assert_eq!(seen.body, message);
    let up_trailers = seen.trailers.expect("request trailers reach the upstream");
    assert_eq!(
        up_trailers.get("x-client-trailer").map(|v| v.as_bytes()),
        Some(&b"from-client"[..])
    );
}

#[tokio::test]
async fn tcp_listener_forwards_bytes_both_ways() {
    let echo = TcpEcho::start().await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "tcp", "address": "127.0.0.1:0", "protocol": "tcp", "cluster": "echo"}],
        "clusters": [cluster("echo", echo.addr())],
    }))
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.listener("tcp"))
        .await
        .expect("connect");
    for msg in [
        &b"ping\n"[..],
        &[0u8, 255, 1, 254, 13, 10][..],
        &vec![42u8; 300_000][..],
    ] {
        s.write_all(msg).await.expect("write");
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
            .await
            .expect("echo in time")
            .expect("read");
        assert_eq!(back, msg);
    }
    drop(s);
    assert_eq!(echo.connections(), 1);
    assert_eq!(
        proxy
            .metric("wasmesh_tcp_cx_total", &[("listener", "tcp")])
            .await,
        1.0
    );
}

#[tokio::test]
async fn tcp_listener_with_a_dead_upstream_closes_the_connection() {
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "tcp", "address": "127.0.0.1:0", "protocol": "tcp", "cluster": "down"}],
        "clusters": [cluster("down", wasmesh_e2e::upstream::refused_addr())],
    }))
    .await;
    let mut s = tokio::net::TcpStream::connect(proxy.listener("tcp"))
        .await
        .expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed promptly");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    assert_eq!(
        proxy
            .metric(
                "wasmesh_upstream_cx_connect_fail_total",
                &[("cluster", "down")]
            )
            .await,
        1.0
    );
}
