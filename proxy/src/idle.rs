//! The stream idle timeout (Envoy's `stream_idle_timeout`): a body that waits longer than
//! the timeout for its next frame fails with [`StreamIdle`].
//!
//! The timer runs only while the body's source has nothing to give (its poll returned
//! `Pending`): a slow reader on the other side is not idleness of this stream (it is
//! bounded by the connection's idle timeout), and a body that is always ready, such as a
//! small response that came with its head, never arms it. The timer is allocated on the
//! first wait, so requests that never wait pay nothing.
//!
//! Upgraded connections (WebSocket) have no bodies: `tunnel` ends them when no byte has
//! moved either way for the timeout.
//!
//! [`AtomicInstant`] is the time stamp the connections' idle and header clocks keep.

use crate::cluster::BoxError;
use crate::error::StreamIdle;
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// An `Option<Instant>` in an atomic, to the millisecond: written from a connection's
/// I/O (which hyper needs to be `Send`) and read by its serving loop. Stored as
/// milliseconds since the process's first use of one, plus one; 0 is `None`.
pub struct AtomicInstant(AtomicU64);

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

impl AtomicInstant {
    pub const fn none() -> Self {
        AtomicInstant(AtomicU64::new(0))
    }

    pub fn now() -> Self {
        let t = AtomicInstant::none();
        t.set_now();
        t
    }

    pub fn set_now(&self) {
        let ms = u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.0.store(ms + 1, Ordering::Release);
    }

    pub fn clear(&self) {
        self.0.store(0, Ordering::Release);
    }

    pub fn get(&self) -> Option<Instant> {
        match self.0.load(Ordering::Acquire) {
            0 => None,
            ms => Some(epoch() + Duration::from_millis(ms - 1)),
        }
    }
}

/// The idle clock of one body.
struct IdleTimer {
    /// `None`: no timeout.
    timeout: Option<Duration>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The sleep runs from the first wait after the last frame.
    armed: bool,
}

impl IdleTimer {
    /// `timeout` zero disables it.
    fn new(timeout: Duration) -> Self {
        Self {
            timeout: (!timeout.is_zero()).then_some(timeout),
            sleep: None,
            armed: false,
        }
    }

    /// The body made progress (a frame, its end, an error): the next wait starts afresh.
    #[inline]
    fn progress(&mut self) {
        self.armed = false;
    }

    /// The body's source is waiting: whether it has now waited too long.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(timeout) = self.timeout else {
            return false;
        };
        if !self.armed {
            let deadline = Instant::now() + timeout;
            match self.sleep.as_mut() {
                Some(s) => s.as_mut().reset(deadline),
                None => self.sleep = Some(Box::pin(tokio::time::sleep_until(deadline))),
            }
            self.armed = true;
        }
        self.sleep
            .as_mut()
            .is_some_and(|s| s.as_mut().poll(cx).is_ready())
    }

    /// Poll `inner` under the idle clock.
    #[inline]
    fn poll_frame<B>(
        &mut self,
        inner: Pin<&mut B>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>>
    where
        B: http_body::Body<Data = Bytes, Error = BoxError>,
    {
        match inner.poll_frame(cx) {
            Poll::Pending => {
                if self.poll_expired(cx) {
                    // Fail once; the next poll starts a new wait (callers stop at an error).
                    self.progress();
                    Poll::Ready(Some(Err(Box::new(StreamIdle))))
                } else {
                    Poll::Pending
                }
            }
            ready => {
                self.progress();
                ready
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// A body under a stream idle timeout.
    pub(crate) struct IdleBody<B> {
        #[pin]
        inner: B,
        timer: IdleTimer,
    }
}

impl<B> IdleBody<B> {
    pub(crate) fn new(inner: B, timeout: Duration) -> Self {
        Self {
            inner,
            timer: IdleTimer::new(timeout),
        }
    }
}

impl<B> http_body::Body for IdleBody<B>
where
    B: http_body::Body<Data = Bytes, Error = BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    #[inline]
    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        this.timer.poll_frame(this.inner, cx)
    }

    #[inline]
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    #[inline]
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Copy both ways between the two sides of an upgraded connection (WebSocket) until
/// either closes, or until no byte has moved either way for `idle` (zero: no limit), as
/// Envoy's stream idle timeout ends idle upgraded streams. Dropping the two sides, which
/// the caller does next, closes both connections.
pub(crate) async fn tunnel<A, B>(a: A, b: B, idle: Duration)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use crate::listener::{Activity, IdleIo};
    let activity = std::sync::Arc::new(Activity::new());
    let mut a = IdleIo::new(a, activity.clone());
    let mut b = IdleIo::new(b, activity.clone());
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    if idle.is_zero() {
        let _ = copy.await;
        return;
    }
    let mut copy = std::pin::pin!(copy);
    loop {
        let idle_at = activity.last() + idle;
        tokio::select! {
            _ = copy.as_mut() => return,
            () = tokio::time::sleep_until(idle_at) => {
                if activity.last() + idle <= Instant::now() {
                    tracing::debug!(?idle, "upgraded connection idle: closed");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body_util::BodyExt;

    fn data(b: &'static [u8]) -> Result<Frame<Bytes>, BoxError> {
        Ok(Frame::data(Bytes::from_static(b)))
    }

    /// A body that yields one frame, then waits forever.
    fn stalls_after_one_frame() -> crate::cluster::Body {
        let frames =
            futures_util::stream::iter([data(b"first")]).chain(futures_util::stream::pending());
        http_body_util::StreamBody::new(frames).boxed_unsync()
    }

    // Real time, kept short; the assertions hold however slow the machine is.
    #[tokio::test]
    async fn a_stalled_body_fails_after_the_timeout() {
        let timeout = Duration::from_millis(200);
        let mut body = IdleBody::new(stalls_after_one_frame(), timeout);
        let first = body.frame().await.expect("a frame").expect("data");
        assert_eq!(first.into_data().ok(), Some(Bytes::from_static(b"first")));
        let before = Instant::now();
        let err = body.frame().await.expect("an error").expect_err("idle");
        assert!(err.is::<StreamIdle>());
        assert!(before.elapsed() >= timeout);
    }

    #[tokio::test]
    async fn zero_disables_the_timeout() {
        let mut body = IdleBody::new(stalls_after_one_frame(), Duration::ZERO);
        body.frame().await.expect("a frame").expect("data");
        let waited = tokio::time::timeout(Duration::from_millis(300), body.frame()).await;
        assert!(waited.is_err(), "the body must still be waiting");
    }

    #[tokio::test]
    async fn each_frame_restarts_the_clock() {
        let frames = futures_util::stream::unfold(0, |n| async move {
            if n == 6 {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            Some((data(b"x"), n + 1))
        });
        let body = http_body_util::StreamBody::new(frames);
        // Six 100 ms gaps add up to more than the 400 ms timeout, but the clock starts
        // again at each frame.
        let mut body = IdleBody::new(body.boxed_unsync(), Duration::from_millis(400));
        let mut frames = 0;
        while let Some(f) = body.frame().await {
            f.expect("gaps are under the timeout");
            frames += 1;
        }
        assert_eq!(frames, 6);
    }
}
