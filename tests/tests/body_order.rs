//! Bodies arrive whole and in order whatever their framing and frame sizes: uploads and
//! downloads through the proxy, with every pairing of client and upstream protocol
//! (HTTP/1.1 with a Content-Length, HTTP/1.1 chunked, HTTP/2), in frames of random sizes
//! (1 byte to 40 KiB), some ready at once and some after a pause, so that the proxy's
//! buffers, coalescing and queues meet large and small pieces back to back.
//!
//! The sizes come from a seeded generator: a failure names its seed and case, and the
//! same seed gives the same frames.

use serde_json::json;
use wasmesh_e2e::client::{Conn, Req};
use wasmesh_e2e::upstream::pattern_frames;
use wasmesh_e2e::{cluster, h2_cluster, pattern_matches, Behavior, Proxy, Upstream};

/// Seeds per case.
const SEEDS: u64 = 4;
/// Frames per body.
const FRAMES: usize = 48;

#[derive(Clone, Copy, Debug)]
enum Client {
    H1Length,
    H1Chunked,
    H2,
}

/// xorshift64*: small, and the same sequence on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Frame sizes and pauses: mostly small or large, now and then a single byte.
fn frames(seed: u64) -> Vec<(usize, bool)> {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    (0..FRAMES)
        .map(|_| {
            let len = match rng.next() % 4 {
                0 => 1 + (rng.next() % 16) as usize,
                1 => 1 + (rng.next() % 4096) as usize,
                _ => 8 * 1024 + (rng.next() % (32 * 1024)) as usize,
            };
            (len, rng.next().is_multiple_of(3))
        })
        .collect()
}

async fn connect(proxy: &Proxy, client: Client) -> Conn {
    match client {
        Client::H1Length | Client::H1Chunked => Conn::h1(proxy.listener("in")).await,
        Client::H2 => Conn::h2(proxy.listener("in")).await,
    }
}

async fn proxy(up: &Upstream, h2_upstream: bool) -> Proxy {
    let c = if h2_upstream {
        h2_cluster("app", up.addr())
    } else {
        cluster("app", up.addr())
    };
    Proxy::start(json!({
        "listeners": [{"name": "in", "address": "127.0.0.1:0", "routes": [{"cluster": "app"}]}],
        "clusters": [c],
    }))
    .await
}

#[tokio::test]
async fn uploads_arrive_whole_and_in_order_whatever_the_framing() {
    let up = Upstream::start().await;
    for h2_upstream in [false, true] {
        let proxy = proxy(&up, h2_upstream).await;
        for client in [Client::H1Length, Client::H1Chunked, Client::H2] {
            for seed in 0..SEEDS {
                let frames = frames(seed);
                let len: usize = frames.iter().map(|f| f.0).sum();
                let case = format!("{client:?} client, h2 upstream {h2_upstream}, seed {seed}");
                up.push(Behavior::CountBody);
                let mut req = Req::post("/upload").stream_body(pattern_frames(frames));
                if let Client::H1Length = client {
                    req = req.header("content-length", &len.to_string());
                }
                let r = connect(&proxy, client).await.send(req).await;
                assert_eq!(r.status, 200, "{case}: {}", r.text());
                let got = r.json();
                assert_eq!(got["bytes"], len, "{case}: every byte arrives: {got}");
                assert_eq!(got["pattern_ok"], true, "{case}: in order, uncorrupted");
            }
        }
    }
}

#[tokio::test]
async fn downloads_arrive_whole_and_in_order_whatever_the_framing() {
    let up = Upstream::start().await;
    for h2_upstream in [false, true] {
        let proxy = proxy(&up, h2_upstream).await;
        for client in [Client::H1Chunked, Client::H2] {
            for seed in 0..SEEDS {
                let frames = frames(seed + 100);
                let len: usize = frames.iter().map(|f| f.0).sum();
                let case = format!(
                    "{client:?} client, h2 upstream {h2_upstream}, seed {}",
                    seed + 100
                );
                up.push(Behavior::StreamFrames(frames));
                let r = connect(&proxy, client)
                    .await
                    .send(Req::get("/download"))
                    .await;
                assert_eq!(r.status, 200, "{case}");
                assert!(r.body_error.is_none(), "{case}: {:?}", r.body_error);
                assert_eq!(r.body.len(), len, "{case}: every byte arrives");
                assert!(pattern_matches(&r.body, 0), "{case}: in order, uncorrupted");
            }
        }
    }
}
