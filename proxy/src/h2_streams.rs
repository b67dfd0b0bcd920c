//! An HTTP/2 connection's idle timeout: no request in progress for `idle_timeout`.
//!
//! "No byte moved" is not a usable definition over HTTP/2: hyper's server pings an idle
//! connection every 60 s (its keep-alive, which finds dead peers), a live client answers,
//! and the connection never looks idle; clients' own keep-alive PINGs do the same. So, as
//! in Envoy (`idle_timeout`: "the time at which a downstream or upstream connection will
//! be terminated if there are no active streams"), a connection is idle when it has no
//! request in progress: from when its last response ended (or it opened), whatever control
//! frames move meanwhile. A request is in progress from when hyper hands it to the service
//! until its response body is dropped (sent whole, or the stream reset).

use crate::idle::AtomicInstant;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::time::Instant;

/// Requests in progress on one connection, and since when there have been none.
pub struct Streams {
    active: AtomicU32,
    /// When `active` last fell to zero (or the connection opened).
    idle_since: AtomicInstant,
}

impl Streams {
    /// A new connection: idle from now.
    pub fn new() -> Arc<Self> {
        Arc::new(Streams {
            active: AtomicU32::new(0),
            idle_since: AtomicInstant::now(),
        })
    }

    /// Since when the connection has had no request in progress; `None` while it has one.
    pub fn idle_since(&self) -> Option<Instant> {
        if self.active.load(Ordering::Acquire) > 0 {
            return None;
        }
        self.idle_since.get()
    }

    /// A request starts; it is in progress until the guard is dropped.
    pub fn enter(self: &Arc<Self>) -> StreamGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        StreamGuard(self.clone())
    }
}

/// One request in progress (see [`Streams::enter`]).
pub struct StreamGuard(Arc<Streams>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let s = &self.0;
        // The time first, so a reader that sees no request in progress sees when the
        // last one ended, not an older time.
        if s.active.load(Ordering::Acquire) == 1 {
            s.idle_since.set_now();
        }
        s.active.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request in progress until it is dropped.
    pub struct Tracked<B> {
        #[pin]
        body: B,
        guard: StreamGuard,
    }
}

impl<B> Tracked<B> {
    pub fn new(body: B, guard: StreamGuard) -> Self {
        Tracked { body, guard }
    }
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn idle_from_the_start_and_from_the_last_request_s_end() {
        let s = Streams::new();
        assert!(s.idle_since().is_some_and(|t| t <= Instant::now()));

        let a = s.enter();
        let b = s.enter();
        assert_eq!(s.idle_since(), None);
        drop(a);
        assert_eq!(s.idle_since(), None, "one request is still in progress");
        let body = Tracked::new(http_body_util::Empty::<bytes::Bytes>::new(), b);
        assert_eq!(s.idle_since(), None, "the response body holds it");
        std::thread::sleep(Duration::from_millis(20));
        let before_end = Instant::now();
        drop(body);
        // Recorded in whole milliseconds from the connection's start.
        let since = s.idle_since().expect("idle");
        assert!(
            since + Duration::from_millis(1) >= before_end,
            "{since:?} {before_end:?}"
        );
        assert!(since <= Instant::now());
    }
}
