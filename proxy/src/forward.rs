//! The upstream leg of a request, after routing and the request-side filters: the
//! cluster's circuit breakers, mirroring, then attempts retried per the route's policy.
//!
//! One attempt: send to an endpoint and wait for the response head (bounded by the
//! per-try timeout and what is left of the route's timeout). A failed attempt is retried
//! when the policy names its failure, the retry count and the cluster's retry limit allow
//! it, and the request body can be sent again; the retry prefers another endpoint and
//! waits a jittered back-off (or the upstream's `retry-after`) first. When no retry is
//! allowed, the last failure is what the client gets: the upstream's own answer, or the
//! proxy's (`UF`, `UR`, `UT`, `UO`).

use crate::cluster::{Body, BoxError, Cluster, Endpoint, PickContext, UpstreamOutcome};
use crate::error::ProxyError;
use crate::mirror::MirrorBody;
use crate::pool::{PoolError, UpBody};
use crate::proxy::Exchange;
use crate::retry::{grpc_timeout, retry_after, AttemptFailure};
use crate::routing::Route;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Request, Response};
use http_body::{Body as _, Frame};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The longest an upstream's `retry-after` is waited for before a retry; past it the
/// client gets the answer (with its `retry-after`) at once, even on a route without a
/// timeout. The header is the upstream's to set, so it must not be able to park a request
/// for a day.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(300);

/// Send the prepared upstream request (`parts` already carry the upstream's URI and
/// headers) to `cluster`, starting with `first`. `ctx` carries the request's affinity hash
/// and region for the load balancer.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn forward(
    route: &Route,
    cluster: &Arc<Cluster>,
    first: Arc<Endpoint>,
    ctx: PickContext<'_>,
    parts: http::request::Parts,
    body: Body,
    upgrade: bool,
    x: &mut Exchange,
) -> Result<Response<UpBody>, ProxyError> {
    // Circuit breaker on requests in flight, held until the response is done.
    let Some(inflight) = cluster.breakers.requests.try_enter() else {
        cluster
            .metrics()
            .upstream_rq_overflow
            .get_or_create(cluster.label())
            .inc();
        return Err(ProxyError::Overflow);
    };
    x.inflight = Some(inflight);

    // A gRPC client's deadline runs from when it sent the call.
    let grpc_deadline = grpc_timeout(&parts.headers).map(|t| Instant::now() + t);
    // An upgrade cannot be replayed: the upstream may have switched protocols.
    let policy = route.retry.as_ref().filter(|_| !upgrade);
    let mut body = match policy {
        Some(p) => ReqBody::prepare(body, p.buffer_limit).await?,
        None if body.is_end_stream() => ReqBody::Replay {
            data: Bytes::new(),
            trailers: None,
        },
        None => ReqBody::Once(Some(body)),
    };
    for m in &route.mirrors {
        if !m.sampled() {
            continue;
        }
        match &mut body {
            ReqBody::Replay { data, .. } => {
                m.send(&parts, MirrorBody::Whole(data));
            }
            ReqBody::Once(real) => {
                if let Some(b) = real.take() {
                    *real = m.send(&parts, MirrorBody::Stream(b));
                }
            }
        }
    }

    let deadline = Deadline::new(route.timeout, grpc_deadline, &mut body);

    let mut head = Some(parts);
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut endpoint = first;
    let mut retries = 0u32;
    let mut _retry_slot = None;
    loop {
        let more_possible = policy.is_some_and(|p| retries < p.num_retries) && body.replayable();
        let parts = if more_possible {
            head.clone()
        } else {
            head.take()
        };
        let Some(parts) = parts else {
            return Err(ProxyError::UpstreamReset);
        };
        let per_try = policy.and_then(|p| p.per_try_timeout);
        let mut parts = parts;
        // Each attempt is its own CLIENT span, and the upstream sees that span as parent.
        let span = x
            .trace
            .start_client(endpoint.addr, &cluster.name, &mut parts);
        let req = Request::from_parts(parts, body.take());
        let result = attempt(cluster, &endpoint, req, upgrade, per_try, &deadline).await;
        span.end(match &result {
            Ok(r) => Ok(r.status()),
            Err(Attempt::Failed(_, e) | Attempt::Fatal(e)) => Err(e),
        });
        x.endpoint = Some(endpoint.clone());
        match &result {
            Ok(resp) => {
                cluster.record_outcome(&endpoint, UpstreamOutcome::Response(resp.status().as_u16()))
            }
            Err(Attempt::Failed(f, _)) => cluster.record_outcome(&endpoint, f.outcome()),
            Err(Attempt::Fatal(_)) => {}
        }

        let failure = match (&result, policy) {
            (Ok(resp), Some(p)) => {
                Some(AttemptFailure::Status(resp.status().as_u16())).filter(|f| p.retries(*f))
            }
            (Err(Attempt::Failed(f, _)), Some(p)) => Some(*f).filter(|f| p.retries(*f)),
            _ => None,
        };
        let (Some(failure), Some(p)) = (failure, policy) else {
            if retries > 0 && result.is_ok() {
                cluster
                    .metrics()
                    .upstream_rq_retry_success
                    .get_or_create(cluster.label())
                    .inc();
            }
            return result.map_err(Attempt::into_error);
        };
        // The attempt failed in a way the policy retries: may we?
        let refused = if retries >= p.num_retries {
            x.flags.push("URX".into());
            Some(&cluster.metrics().upstream_rq_retry_limit_exceeded)
        } else if !body.replayable() {
            Some(&cluster.metrics().upstream_rq_retry_not_replayable)
        } else {
            None
        };
        if let Some(counter) = refused {
            counter.get_or_create(cluster.label()).inc();
            return result.map_err(Attempt::into_error);
        }
        // This request's previous retry slot is given back before asking again, so it
        // does not count against itself.
        _retry_slot = None;
        let Some(slot) = cluster
            .breakers
            .retries
            .try_acquire(cluster.breakers.requests.active())
        else {
            // Envoy's rule: past the retry limit, the client gets the upstream's answer.
            cluster
                .metrics()
                .upstream_rq_retry_overflow
                .get_or_create(cluster.label())
                .inc();
            return result.map_err(Attempt::into_error);
        };
        let wait = match &result {
            Ok(resp) => retry_after(resp.headers()).map(|ra| ra.max(p.back_off(retries + 1))),
            Err(_) => None,
        }
        .unwrap_or_else(|| p.back_off(retries + 1));
        // No time left for another attempt (or an upstream's `retry-after` past any
        // sensible wait): answer with this one.
        let retry_at = Instant::now().checked_add(wait);
        if wait > MAX_RETRY_WAIT || retry_at.is_none_or(|at| deadline.at.is_some_and(|d| at >= d)) {
            return result.map_err(Attempt::into_error);
        }
        drop(result);
        // One retry of this request in flight at a time: the slot is held until the next
        // decision (or the end of the request).
        _retry_slot = Some(slot);
        tokio::time::sleep(wait).await;
        retries += 1;
        cluster
            .metrics()
            .upstream_rq_retry
            .get_or_create(cluster.label())
            .inc();
        tracing::debug!(cluster = %cluster.name, upstream = %endpoint.addr, ?failure, retry = retries, "retrying");
        tried.push(endpoint.addr);
        endpoint = match cluster.pick(&PickContext {
            tried: &tried,
            ..ctx
        }) {
            Some(e) => e,
            None => return Err(ProxyError::NoHealthyUpstream),
        };
    }
}

/// When the attempts must have their answer (the response head). The route's timeout
/// starts once the whole request has been received, as in Envoy: a long upload is bounded
/// by the stream idle timeout, not by the route's. A body held for replay (and an empty
/// one) is whole before the first attempt; a streamed one says when its last frame has
/// passed. A gRPC client's `grpc-timeout` runs from the start, and the earlier of the two
/// wins.
struct Deadline {
    /// Known now: the gRPC deadline, or the route's for a request already whole.
    at: Option<Instant>,
    /// The route's timeout, from when a streamed body ends.
    after_body: Option<(Arc<Received>, Duration)>,
}

impl Deadline {
    fn new(route: Option<Duration>, grpc: Option<Instant>, body: &mut ReqBody) -> Deadline {
        let earliest = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match (route, body) {
            (Some(t), ReqBody::Once(Some(streamed))) if !streamed.is_end_stream() => Deadline {
                at: grpc,
                after_body: Some((watch_end(streamed), t)),
            },
            (route, _) => Deadline {
                at: earliest(grpc, route.and_then(|t| Instant::now().checked_add(t))),
                after_body: None,
            },
        }
    }
}

/// Wrap a streamed body so that it tells when it has ended. Out of line: few requests
/// stream a body, and every request's path is shorter without this.
#[inline(never)]
fn watch_end(streamed: &mut Body) -> Arc<Received> {
    let received = Arc::new(Received::default());
    let inner = std::mem::replace(streamed, crate::proxy::empty());
    *streamed = ReceivedBody {
        inner,
        received: received.clone(),
    }
    .boxed_unsync();
    received
}

/// Set once the client's streamed request body has ended.
#[derive(Default)]
struct Received {
    done: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl Received {
    fn set(&self) {
        if !self.done.swap(true, Ordering::AcqRel) {
            self.notify.notify_waiters();
        }
    }

    async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            let mut notified = std::pin::pin!(notified);
            // Registered before the check, so a `set` in between is not missed.
            notified.as_mut().enable();
            if self.done.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

pin_project_lite::pin_project! {
    /// The client's body on its way upstream, telling [`Received`] when it has ended.
    struct ReceivedBody {
        #[pin]
        inner: Body,
        received: Arc<Received>,
    }
}

impl http_body::Body for ReceivedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let r = this.inner.as_mut().poll_frame(cx);
        // A sender of known length stops polling after the last byte: its end is seen
        // through `is_end_stream`, not a final `None`.
        let ended = match &r {
            std::task::Poll::Ready(None) => true,
            std::task::Poll::Ready(Some(Ok(_))) => this.inner.is_end_stream(),
            _ => false,
        };
        if ended {
            this.received.set();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// How an attempt went wrong.
enum Attempt {
    /// A failure a retry policy may retry, and the answer if it is not retried.
    Failed(AttemptFailure, ProxyError),
    /// Not retried whatever the policy: the route's deadline passed, a breaker is open,
    /// the client's body broke.
    Fatal(ProxyError),
}

impl Attempt {
    fn into_error(self) -> ProxyError {
        match self {
            Attempt::Failed(_, e) | Attempt::Fatal(e) => e,
        }
    }
}

/// One try at one endpoint, until the response head.
async fn attempt(
    cluster: &Arc<Cluster>,
    endpoint: &Arc<Endpoint>,
    req: Request<Body>,
    upgrade: bool,
    per_try: Option<Duration>,
    deadline: &Deadline,
) -> Result<Response<UpBody>, Attempt> {
    let now = Instant::now();
    let left = deadline.at.map(|d| d.saturating_duration_since(now));
    if left.is_some_and(|l| l.is_zero()) {
        return Err(route_timeout(cluster));
    }
    // Whichever ends first: this try's own timeout or the route's.
    let (limit, is_per_try) = match (per_try, left) {
        (Some(p), Some(l)) if p < l => (Some(p), true),
        (Some(p), None) => (Some(p), true),
        (_, l) => (l, false),
    };

    endpoint.active.fetch_add(1, Ordering::Relaxed);
    endpoint.total.fetch_add(1, Ordering::Relaxed);
    let active = cluster.rq_active();
    active.inc();
    let pools = cluster.pools();
    // Boxed: the upstream exchange is a few KiB of state, and the request's future (which
    // hyper moves several times before polling it) would otherwise carry it inline.
    let sent: std::pin::Pin<Box<dyn std::future::Future<Output = _>>> = if upgrade {
        crate::heap::pin_in_place(|| pools.send_upgrade(endpoint.addr, req))
    } else {
        crate::heap::pin_in_place(|| pools.send(endpoint.addr, req))
    };
    // `Err(true)`: this try's timeout ended it; `Err(false)`: the route's.
    let result = match (&deadline.after_body, limit) {
        (None, Some(t)) => tokio::time::timeout(t, sent).await.map_err(|_| is_per_try),
        (None, None) => Ok(sent.await),
        (Some((received, route)), _) => {
            // The route's clock (and this try's) start once the client's body has ended;
            // a gRPC deadline (`limit`) runs already. Boxed: inline, its state would size
            // every request's future, bodiless ones included.
            let timer = Box::pin(async {
                received.wait().await;
                let start = Instant::now();
                let route_at = start + *route;
                let ends = [
                    (deadline.at, false),
                    (Some(route_at), false),
                    (per_try.map(|p| start + p), true),
                ];
                let (at, per_try) = ends
                    .into_iter()
                    .filter_map(|(at, p)| at.map(|at| (at, p)))
                    .min_by_key(|(at, _)| *at)
                    .unwrap_or((route_at, false));
                tokio::time::sleep_until(at).await;
                per_try
            });
            match futures_util::future::select(sent, timer).await {
                futures_util::future::Either::Left((r, _)) => Ok(r),
                futures_util::future::Either::Right((per_try, _)) => Err(per_try),
            }
        }
    };
    endpoint.active.fetch_sub(1, Ordering::Relaxed);
    active.dec();
    match result {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(classify(e)),
        Err(true) => {
            cluster
                .metrics()
                .upstream_rq_per_try_timeout
                .get_or_create(cluster.label())
                .inc();
            Err(Attempt::Failed(
                AttemptFailure::Timeout,
                ProxyError::UpstreamTimeout,
            ))
        }
        Err(false) => Err(route_timeout(cluster)),
    }
}

fn route_timeout(cluster: &Cluster) -> Attempt {
    cluster
        .metrics()
        .upstream_rq_timeout
        .get_or_create(cluster.label())
        .inc();
    Attempt::Fatal(ProxyError::UpstreamTimeout)
}

fn classify(e: PoolError) -> Attempt {
    use crate::cluster::ConnectError;
    match e {
        PoolError::Connect(ConnectError::Overflow | ConnectError::PendingOverflow) => {
            Attempt::Fatal(ProxyError::Overflow)
        }
        PoolError::Connect(_) | PoolError::Handshake(_) | PoolError::NotOnWorker => {
            Attempt::Failed(AttemptFailure::ConnectFailure, ProxyError::ConnectFailure)
        }
        PoolError::H1(e) => {
            if e.is_request_body() {
                return Attempt::Fatal(ProxyError::from_request_body(&e));
            }
            tracing::debug!(error = %e, "upstream request failed");
            Attempt::Failed(AttemptFailure::Reset, ProxyError::UpstreamReset)
        }
        PoolError::Send(e) => {
            if request_body_failed(&e) {
                // The client's body broke (bad chunked encoding, client gone): not the
                // upstream's fault, and nothing to retry.
                return Attempt::Fatal(ProxyError::from_request_body(&e));
            }
            tracing::debug!(error = %e, source = ?std::error::Error::source(&e), "upstream request failed");
            if refused_stream(&e) {
                Attempt::Failed(AttemptFailure::RefusedStream, ProxyError::UpstreamReset)
            } else {
                Attempt::Failed(AttemptFailure::Reset, ProxyError::UpstreamReset)
            }
        }
    }
}

/// Whether the upstream call failed because the request body we were streaming (the
/// downstream's) returned an error: hyper reports a failing user body as a "user" error
/// that carries the body's error as its source.
fn request_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_user() && std::error::Error::source(h).is_some() {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

/// An HTTP/2 REFUSED_STREAM: the upstream guarantees it did not process the request.
fn refused_stream(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        cur = err.source();
    }
    false
}

/// The request body across attempts.
enum ReqBody {
    /// Held whole: every attempt sends a copy.
    Replay {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Streamed once: only the first attempt has it.
    Once(Option<Body>),
}

impl ReqBody {
    /// Keep the body for replay if it fits in `limit` bytes; a larger one streams as it
    /// comes (what was read so far first) and cannot be retried.
    async fn prepare(mut body: Body, limit: usize) -> Result<Self, ProxyError> {
        if body.is_end_stream() {
            return Ok(ReqBody::Replay {
                data: Bytes::new(),
                trailers: None,
            });
        }
        if body.size_hint().lower() > limit as u64 {
            return Ok(ReqBody::Once(Some(body)));
        }
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut len = 0usize;
        let mut trailers = None;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ProxyError::from_request_body(&*e))?;
            match frame.into_data() {
                Ok(data) => {
                    len += data.len();
                    chunks.push(data);
                    if len > limit {
                        return Ok(ReqBody::Once(Some(prefixed(chunks, body))));
                    }
                }
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        trailers = Some(t);
                    }
                }
            }
        }
        let data = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.pop().unwrap_or_default(),
            _ => {
                let mut b = BytesMut::with_capacity(len);
                for c in chunks {
                    b.extend_from_slice(&c);
                }
                b.freeze()
            }
        };
        Ok(ReqBody::Replay { data, trailers })
    }

    fn replayable(&self) -> bool {
        matches!(self, ReqBody::Replay { .. })
    }

    /// The body for the next attempt.
    fn take(&mut self) -> Body {
        match self {
            ReqBody::Replay {
                data,
                trailers: None,
            } => crate::proxy::full(data.clone()),
            ReqBody::Replay {
                data,
                trailers: Some(t),
            } => {
                let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
                    Ok(Frame::data(data.clone())),
                    Ok(Frame::trailers(t.clone())),
                ];
                http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
            }
            ReqBody::Once(b) => b.take().unwrap_or_else(crate::proxy::empty),
        }
    }
}

/// What was read already, then the rest of the body as it streams.
fn prefixed(read: Vec<Bytes>, rest: Body) -> Body {
    use futures_util::StreamExt;
    let head = futures_util::stream::iter(read.into_iter().map(|b| Ok(Frame::data(b))));
    let tail = http_body_util::BodyStream::new(rest);
    http_body_util::StreamBody::new(head.chain(tail)).boxed_unsync()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked(parts: &[&'static str]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    #[tokio::test]
    async fn small_bodies_replay_large_ones_stream_once() {
        let mut small = ReqBody::prepare(chunked(&["ab", "cd"]), 8)
            .await
            .expect("prepare");
        assert!(small.replayable());
        for _ in 0..2 {
            let b = small.take().collect().await.expect("body").to_bytes();
            assert_eq!(&b[..], b"abcd");
        }
        let mut large = ReqBody::prepare(chunked(&["abcd", "efgh", "ij"]), 6)
            .await
            .expect("prepare");
        assert!(!large.replayable());
        let b = large.take().collect().await.expect("body").to_bytes();
        assert_eq!(
            &b[..],
            b"abcdefghij",
            "the prefix read for buffering is not lost"
        );
        assert!(large.take().is_end_stream());
    }
}
