//! Request mirroring (shadow traffic): a copy of a share of a route's requests goes to
//! another cluster, its answer is read and thrown away.
//!
//! The copy must never slow the real request. A body the proxy already holds (buffered
//! for retries) is shared; a streaming body is teed frame by frame into a small bounded
//! channel: when the mirror does not keep up, or the body passes the policy's cap, the copy
//! is abandoned (its request is reset) and counted, and the real request goes on untouched.

use crate::cluster::{Body, BoxError, Cluster, PickContext};
use crate::telemetry::metrics::ClusterReasonLabel;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::Request;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// Frames of a streaming body the mirror may lag behind before its copy is dropped.
const TEE_FRAMES: usize = 16;

/// A route's `request_mirror_policies` entry, compiled.
pub struct MirrorPolicy {
    pub cluster: Arc<Cluster>,
    /// 0.0 to 1.0.
    pub fraction: f64,
    pub max_body: usize,
    pub timeout: Duration,
}

impl MirrorPolicy {
    /// Whether this request is in the mirrored share.
    pub fn sampled(&self) -> bool {
        self.fraction >= 1.0 || rand::random::<f64>() < self.fraction
    }

    fn dropped(&self, reason: &'static str) {
        self.cluster
            .metrics()
            .mirror_dropped
            .get_or_create(&ClusterReasonLabel {
                cluster: self.cluster.name.clone(),
                reason,
            })
            .inc();
    }

    /// Send a copy of the request (head `parts`, prepared for the upstream) in the
    /// background. `body`: the whole body when the proxy holds it; otherwise the real body is
    /// teed and the tee returned in its place.
    pub fn send(&self, parts: &http::request::Parts, body: MirrorBody<'_>) -> Option<Body> {
        let abort = Arc::new(AtomicU8::new(NOT_ABORTED));
        let (copy, passthrough) = match body {
            MirrorBody::Whole(b) => {
                if b.len() > self.max_body {
                    self.dropped("body_too_large");
                    return None;
                }
                (crate::proxy::full(b.clone()), None)
            }
            MirrorBody::Stream(real) => {
                if real.size_hint().lower() > self.max_body as u64 {
                    self.dropped("body_too_large");
                    return Some(real);
                }
                let (tee, copy) = tee(real, self.max_body, abort.clone());
                (copy, Some(tee))
            }
        };
        let mut head = parts.clone();
        // Envoy's convention: the mirror sees the host with `-shadow` appended, so a
        // shadow service (or its logs) can tell copies from real traffic.
        if let Some(host) = head.headers.get(header::HOST).and_then(|h| h.to_str().ok()) {
            let shadow = match host.rsplit_once(':') {
                Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => format!("{h}-shadow:{p}"),
                _ => format!("{host}-shadow"),
            };
            if let Ok(v) = HeaderValue::from_str(&shadow) {
                head.headers.insert(header::HOST, v);
            }
        }
        let cluster = self.cluster.clone();
        let timeout = self.timeout;
        let Some(endpoint) = cluster.pick(&PickContext::default()) else {
            self.dropped("no_healthy_upstream");
            return passthrough;
        };
        let Some(inflight) = cluster.breakers.requests.try_enter() else {
            self.dropped("overflow");
            return passthrough;
        };
        head.uri = mirror_uri(&head.uri, &cluster, &endpoint.authority);
        cluster
            .metrics()
            .mirror_requests
            .get_or_create(cluster.label())
            .inc();
        let req = Request::from_parts(head, copy);
        tokio::task::spawn_local(async move {
            let _inflight = inflight;
            let sent = cluster.pools().send(endpoint.addr, req);
            let reason = match tokio::time::timeout(timeout, async {
                let resp = sent.await.map_err(|_| ())?;
                // Read the answer to its end so the connection can be reused.
                resp.into_body().collect().await.map_err(|_| ())?;
                Ok::<(), ()>(())
            })
            .await
            {
                Ok(Ok(())) => return,
                Ok(Err(())) => match abort.load(Ordering::Acquire) {
                    TOO_LARGE => "body_too_large",
                    SLOW => "slow",
                    _ => "failed",
                },
                Err(_) => "timeout",
            };
            cluster
                .metrics()
                .mirror_dropped
                .get_or_create(&ClusterReasonLabel {
                    cluster: cluster.name.clone(),
                    reason,
                })
                .inc();
        });
        passthrough
    }
}

/// The request body as the mirror gets it.
pub enum MirrorBody<'a> {
    /// The proxy holds the whole body (buffered for retries, or empty).
    Whole(&'a Bytes),
    /// The real body, still streaming: it is teed.
    Stream(Body),
}

/// The mirror's URI: the cluster's protocol decides origin-form (HTTP/1.1) or an absolute
/// URI with the Host as :authority (HTTP/2), as for the real request.
fn mirror_uri(uri: &http::Uri, cluster: &Cluster, fallback: &http::uri::Authority) -> http::Uri {
    let pq = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_string();
    match cluster.spec.protocol {
        crate::config::UpstreamProtocol::Http1 => http::Uri::try_from(pq).unwrap_or_default(),
        crate::config::UpstreamProtocol::Http2 => http::Uri::builder()
            .scheme("http")
            .authority(uri.authority().cloned().unwrap_or_else(|| fallback.clone()))
            .path_and_query(pq)
            .build()
            .unwrap_or_default(),
    }
}

const NOT_ABORTED: u8 = 0;
const TOO_LARGE: u8 = 1;
const SLOW: u8 = 2;
const REAL_BODY_FAILED: u8 = 3;

/// Split `real` into the body the upstream gets (unchanged) and a copy for the mirror.
/// `aborted` says why the copy was given up, if it was.
fn tee(real: Body, max: usize, aborted: Arc<AtomicU8>) -> (Body, Body) {
    let (tx, rx) = mpsc::channel(TEE_FRAMES);
    let tee = Tee {
        inner: real,
        tx: Some(tx),
        sent: 0,
        max,
        aborted: aborted.clone(),
    };
    let copy = Copy { rx, aborted };
    (BodyExt::boxed_unsync(tee), BodyExt::boxed_unsync(copy))
}

/// The real body, copying each data frame to the mirror while it can.
struct Tee {
    inner: Body,
    tx: Option<mpsc::Sender<Bytes>>,
    sent: usize,
    max: usize,
    aborted: Arc<AtomicU8>,
}

impl Tee {
    fn abort(aborted: &AtomicU8, why: u8, tx: &mut Option<mpsc::Sender<Bytes>>) {
        aborted.store(why, Ordering::Release);
        *tx = None;
    }
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let (Some(data), Some(tx)) = (f.data_ref(), this.tx.as_ref()) {
                    this.sent += data.len();
                    // Too big, or the mirror is slow: give the copy up, never wait.
                    if this.sent > this.max {
                        Tee::abort(&this.aborted, TOO_LARGE, &mut this.tx);
                    } else if tx.try_send(data.clone()).is_err() {
                        Tee::abort(&this.aborted, SLOW, &mut this.tx);
                    }
                }
            }
            Poll::Ready(Some(Err(_))) => Tee::abort(&this.aborted, REAL_BODY_FAILED, &mut this.tx),
            // The end: dropping the sender ends the copy cleanly.
            Poll::Ready(None) => this.tx = None,
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tee {
    fn drop(&mut self) {
        // The real request ended before its body did (upstream failure, client gone).
        if self.tx.is_some() && !self.inner.is_end_stream() {
            self.aborted.store(REAL_BODY_FAILED, Ordering::Release);
        }
    }
}

/// The mirror's side of a tee.
struct Copy {
    rx: mpsc::Receiver<Bytes>,
    aborted: Arc<AtomicU8>,
}

/// The error a mirror's body ends with when its copy was given up.
#[derive(Debug, thiserror::Error)]
#[error("mirror copy abandoned")]
struct Abandoned;

impl http_body::Body for Copy {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(None) if self.aborted.load(Ordering::Acquire) != NOT_ABORTED => {
                Poll::Ready(Some(Err(Box::new(Abandoned))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
