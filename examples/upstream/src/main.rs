//! `demo-upstream`: a small, fast upstream HTTP server for wasmesh demos and benchmarks.
//!
//! One port serves HTTP/1.1 (with keep-alive) and HTTP/2 with prior knowledge (h2c),
//! detected per connection by hyper-util's `auto` builder.
//!
//! Two modes:
//!
//! * **demo** (default): every request gets a `200 application/json` reply describing it:
//!   `{"upstream", "method", "path", "headers", "body_bytes"}`. The request body is read
//!   and counted, never buffered. Two special paths help with demos:
//!   `/status/NNN` replies with status `NNN`, and `/delay/MS` waits `MS` milliseconds
//!   (at most [`MAX_DELAY_MS`]) before replying.
//! * **bench** (`--body-size N`): every request gets `200` with `N` bytes of `x`, built once
//!   at start, so the server does as little work as possible per request.
//!
//! On start it prints exactly one line, `demo-upstream NAME listening on ADDR`, to stdout.
//! SIGTERM or ctrl-c makes it exit with status 0.

use std::convert::Infallible;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// Longest wait `/delay/MS` accepts, so a client cannot park a request for ever.
const MAX_DELAY_MS: u64 = 60_000;

/// Command-line flags.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Demo/bench upstream server: HTTP/1.1 and h2c on one port"
)]
struct Args {
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,

    /// Name reported in replies and in the start-up line.
    #[arg(long, default_value = "demo")]
    name: String,

    /// Bench mode: reply to every request with this many bytes of 'x'.
    #[arg(long, value_name = "N")]
    body_size: Option<usize>,

    /// Number of tokio worker threads.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    threads: u16,

    /// Answer this percentage of requests, chosen at random, with `503`: a misbehaving
    /// endpoint for resilience demos and benchmarks.
    #[arg(long, value_name = "PERCENT", default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    fail_percent: u8,
}

/// What every connection shares.
struct State {
    name: String,
    /// `Some` in bench mode: the fixed reply body.
    bench_body: Option<Bytes>,
    fail_percent: u64,
    /// Requests seen: the failure draw is a hash of this count (reproducible, no RNG state).
    seen: std::sync::atomic::AtomicU64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(args.threads))
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    let state = Arc::new(State {
        bench_body: args.body_size.map(|n| Bytes::from(vec![b'x'; n])),
        name: args.name,
        fail_percent: u64::from(args.fail_percent),
        seen: std::sync::atomic::AtomicU64::new(0),
    });

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "demo-upstream {} listening on {addr}", state.name)?;
        out.flush()?;
    }

    let builder = auto::Builder::new(TokioExecutor::new());
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);

    loop {
        let stream = tokio::select! {
            () = &mut shutdown => return Ok(()),
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(_) => {
                    // Out of file descriptors or similar: back off rather than spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        // Latency matters more than packet count here; a failure only costs speed.
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| handle(Arc::clone(&state), req));
            // A connection error (client reset, bad request line, ...) concerns that client only.
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Resolves on ctrl-c or (on Unix) SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if state.fail_percent > 0 {
        let n = state
            .seen
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if splitmix64(n) % 100 < state.fail_percent {
            let _ = count_body(req.into_body()).await;
            return Ok(plain(StatusCode::SERVICE_UNAVAILABLE, "injected failure\n"));
        }
    }
    if let Some(body) = &state.bench_body {
        // Drain the request body so HTTP/1.1 connections stay reusable.
        if count_body(req.into_body()).await.is_err() {
            return Ok(plain(StatusCode::BAD_REQUEST, "bad request body\n"));
        }
        let mut resp = Response::new(Full::new(body.clone()));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        return Ok(resp);
    }

    let path = req.uri().path().to_owned();
    let path_and_query = req
        .uri()
        .path_and_query()
        .map_or_else(|| path.clone(), |pq| pq.as_str().to_owned());
    let method = req.method().as_str().to_owned();

    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes());
        match headers.get_mut(name.as_str()) {
            // Repeated header: join the values as a list would be on one line.
            Some(serde_json::Value::String(prev)) => {
                prev.push_str(", ");
                prev.push_str(&value);
            }
            _ => {
                headers.insert(name.as_str().to_owned(), value.into_owned().into());
            }
        }
    }

    let status = if let Some(code) = path.strip_prefix("/status/") {
        match code
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(status) => status,
            None => return Ok(plain(StatusCode::BAD_REQUEST, "bad status code\n")),
        }
    } else if let Some(ms) = path.strip_prefix("/delay/") {
        match ms.parse::<u64>() {
            Ok(ms) if ms <= MAX_DELAY_MS => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                StatusCode::OK
            }
            _ => {
                return Ok(plain(
                    StatusCode::BAD_REQUEST,
                    "bad delay: want /delay/MS with MS <= 60000\n",
                ))
            }
        }
    } else {
        StatusCode::OK
    };

    let Ok(body_bytes) = count_body(req.into_body()).await else {
        return Ok(plain(StatusCode::BAD_REQUEST, "bad request body\n"));
    };

    let description = serde_json::json!({
        "upstream": state.name,
        "method": method,
        "path": path_and_query,
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let mut json = description.to_string();
    json.push('\n');

    let mut resp = Response::new(Full::new(Bytes::from(json)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(name) = HeaderValue::from_str(&state.name) {
        h.insert("x-upstream", name);
    }
    Ok(resp)
}

/// Reads the whole body, counting its bytes without keeping them.
async fn count_body(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut n = 0u64;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            n += data.len() as u64;
        }
    }
    Ok(n)
}

/// SplitMix64: a well-spread 64-bit hash of a counter.
fn splitmix64(n: u64) -> u64 {
    let mut z = n.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn plain(status: StatusCode, msg: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(msg.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    resp
}
