//! Streaming: 1 GiB up and 1 GiB down through the proxy, over HTTP/1.1 and HTTP/2, with a
//! slow reader on the far side. Bodies stream: the proxy's peak memory (`VmHWM`) may rise
//! by less than 32 MiB, and every byte arrives, in order (checked against a pattern).
//!
//! These are the suite's heavy tests: they take [`heavy_lock`] so they run one at a time.

use http_body_util::BodyExt;
use serde_json::json;
use std::time::{Duration, Instant};
use wasmesh_e2e::client::{Conn, Req};
use wasmesh_e2e::upstream::{pattern_body, SLOW_EVERY, SLOW_PAUSE};
use wasmesh_e2e::{cluster, h2_cluster, heavy_lock, pattern_matches, Behavior, Proxy, Upstream};

const GIB: u64 = 1024 * 1024 * 1024;
const MAX_HWM_RISE_KIB: u64 = 32 * 1024;

#[derive(Clone, Copy, Debug, PartialEq)]
enum Proto {
    H1,
    H2,
}

/// A proxy in front of `up`, speaking `proto` on both sides, warmed up; and its VmHWM.
async fn proxy_for(up: &Upstream, proto: Proto) -> (Proxy, u64) {
    let c = match proto {
        Proto::H1 => cluster("app", up.addr()),
        Proto::H2 => h2_cluster("app", up.addr()),
    };
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app", "timeout": "0s"}]}],
        "clusters": [c],
    }))
    .await;
    // Warm up: first connections, pools, lazily allocated buffers.
    up.push(Behavior::Stream {
        len: 4 * 1024 * 1024,
    });
    let r = send(&proxy, proto, Req::get("/warmup")).await;
    assert_eq!(r.status, 200);
    let hwm = proxy.vm_hwm_kib();
    (proxy, hwm)
}

async fn connect(proxy: &Proxy, proto: Proto) -> Conn {
    match proto {
        Proto::H1 => Conn::h1(proxy.listener("in")).await,
        Proto::H2 => Conn::h2(proxy.listener("in")).await,
    }
}

async fn send(proxy: &Proxy, proto: Proto, req: Req) -> wasmesh_e2e::Resp {
    connect(proxy, proto).await.send(req).await
}

fn check_memory(proxy: &Proxy, before_kib: u64, what: &str) {
    let after = proxy.vm_hwm_kib();
    let rise = after.saturating_sub(before_kib);
    eprintln!("{what}: VmHWM {before_kib} KiB -> {after} KiB (+{rise} KiB)");
    assert!(
        rise < MAX_HWM_RISE_KIB,
        "{what}: the proxy's peak memory rose by {rise} KiB (limit {MAX_HWM_RISE_KIB} KiB)"
    );
}

async fn download(proto: Proto) {
    let up = Upstream::start().await;
    let (proxy, hwm) = proxy_for(&up, proto).await;
    up.push(Behavior::Stream { len: GIB });
    let start = Instant::now();
    let mut c = connect(&proxy, proto).await;
    let mut resp = c
        .send_head(Req::get("/download"))
        .await
        .expect("response head");
    assert_eq!(resp.status(), 200);
    // A slow reader: a pause after every 64 MiB lets the proxy's buffers fill if they would.
    let body = resp.body_mut();
    let mut n = 0u64;
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(30), body.frame())
        .await
        .expect("the download stalled")
    {
        let frame = frame.unwrap_or_else(|e| panic!("download broke off after {n} bytes: {e}"));
        if let Some(d) = frame.data_ref() {
            assert!(pattern_matches(d, n), "corrupt data at offset {n}");
            if (n + d.len() as u64) / SLOW_EVERY != n / SLOW_EVERY {
                tokio::time::sleep(SLOW_PAUSE).await;
            }
            n += d.len() as u64;
        }
    }
    assert_eq!(n, GIB, "every byte arrives");
    eprintln!("{proto:?} download: 1 GiB in {:?}", start.elapsed());
    check_memory(&proxy, hwm, &format!("{proto:?} download"));
    let log = proxy
        .log_entry("the download's log line", |l| l["path"] == "/download")
        .await;
    assert_eq!(log["bytes_sent"], GIB);
}

async fn upload(proto: Proto) {
    let up = Upstream::start().await;
    let (proxy, hwm) = proxy_for(&up, proto).await;
    up.push(Behavior::CountBodySlowly);
    let start = Instant::now();
    let mut req = Req::post("/upload").stream_body(pattern_body(GIB));
    if proto == Proto::H1 {
        req = req.header("content-length", &GIB.to_string());
    }
    let r = tokio::time::timeout(Duration::from_secs(120), send(&proxy, proto, req))
        .await
        .expect("the upload finishes");
    assert_eq!(r.status, 200, "{}", r.text());
    let got = r.json();
    assert_eq!(got["bytes"], GIB, "every byte arrives: {got}");
    assert_eq!(got["pattern_ok"], true, "in order, uncorrupted");
    eprintln!("{proto:?} upload: 1 GiB in {:?}", start.elapsed());
    check_memory(&proxy, hwm, &format!("{proto:?} upload"));
    let log = proxy
        .log_entry("the upload's log line", |l| l["path"] == "/upload")
        .await;
    assert_eq!(log["bytes_received"], GIB);
}

#[tokio::test]
async fn download_1gib_http1_slow_reader() {
    let _heavy = heavy_lock().await;
    download(Proto::H1).await;
}

#[tokio::test]
async fn download_1gib_http2_slow_reader() {
    let _heavy = heavy_lock().await;
    download(Proto::H2).await;
}

#[tokio::test]
async fn upload_1gib_http1_slow_reader() {
    let _heavy = heavy_lock().await;
    upload(Proto::H1).await;
}

#[tokio::test]
async fn upload_1gib_http2_slow_reader() {
    let _heavy = heavy_lock().await;
    upload(Proto::H2).await;
}

/// An HTTP/2 client's upload to an HTTP/1.1 upstream: the client's DATA frames (up to
/// 16 KiB) often arrive several at a time, so the proxy's upstream encoder meets a large
/// frame followed by a small one, both ready. They must reach the upstream in order.
#[tokio::test]
async fn upload_from_http2_to_http1_keeps_the_byte_order() {
    let up = Upstream::start().await;
    let proxy = Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [cluster("app", up.addr())],
    }))
    .await;
    const LEN: u64 = 8 * 1024 * 1024;
    for _ in 0..4 {
        up.push(Behavior::CountBody);
        let req = Req::post("/upload").stream_body(pattern_body(LEN));
        let r = send(&proxy, Proto::H2, req).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let got = r.json();
        assert_eq!(got["bytes"], LEN, "every byte arrives: {got}");
        assert_eq!(got["pattern_ok"], true, "in order, uncorrupted: {got}");
    }
}
