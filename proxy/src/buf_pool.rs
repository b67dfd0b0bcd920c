//! I/O buffers lent to connections while they read or write, within a worker thread.
//!
//! An idle keep-alive connection, a client's between requests or an upstream's in its
//! pool, holds no buffer: its read buffer comes back here whenever a read finds nothing
//! to read and nothing is buffered, and its write buffer once a response is written.
//! The next read or write borrows one again. Without this, each idle connection kept a
//! few KiB of buffers (13 KiB of RSS per idle client connection in all, against under
//! 1.2 KiB for nginx and HAProxy), so a sidecar's memory grew with the connections its
//! clients keep open rather than with the requests they send. Borrowing costs a
//! thread-local push and pop, no allocation; a buffer's memory is usually still in cache
//! when the next connection borrows it.
//!
//! A buffer comes back empty but may still share its allocation with a message parsed
//! out of it (heads are split off without a copy): `BytesMut::reserve` then reclaims the
//! allocation once that message is dropped, or allocates anew, as it would have for the
//! connection that owned it.

use bytes::BytesMut;
use std::cell::RefCell;
use std::mem::ManuallyDrop;

/// Buffers kept per thread; past it, returned buffers are freed.
const KEEP: usize = 32;
/// A buffer grown past this (by a large body or head) is freed, not kept.
const MAX_KEPT_CAPACITY: usize = 64 * 1024;

thread_local! {
    // Without a destructor, so that each access is a plain thread-local load (a type that
    // needs dropping costs a registration check per access, on every read of every
    // request). The buffers kept when a thread ends are not freed: workers end with the
    // process.
    static POOL: RefCell<ManuallyDrop<Vec<BytesMut>>> =
        const { RefCell::new(ManuallyDrop::new(Vec::new())) };
}

/// An empty buffer: a kept one, or one without an allocation yet.
#[inline]
pub fn take() -> BytesMut {
    POOL.with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()))
        .unwrap_or_default()
}

/// Give back an empty buffer's memory. A buffer that still holds bytes is dropped (a
/// caller's mistake, not data to hand to another connection).
#[inline]
pub fn give(buf: BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 || buf.capacity() > MAX_KEPT_CAPACITY {
        return;
    }
    POOL.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if p.len() < KEEP {
                p.push(buf);
            }
        }
    });
}

/// Hand `buf` back to the pool if it holds nothing: what a connection does before it
/// waits. Cheap when there is nothing to give.
#[inline]
pub fn release(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        give(std::mem::take(buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_lent_and_come_back_with_their_memory() {
        let mut b = take();
        b.reserve(4096);
        let cap = b.capacity();
        release(&mut b);
        assert_eq!(b.capacity(), 0, "a released buffer holds no memory");
        let again = take();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), cap);
    }

    #[test]
    fn buffers_with_bytes_or_grown_large_are_not_kept() {
        let mut full = BytesMut::with_capacity(64);
        full.extend_from_slice(b"pipelined");
        release(&mut full);
        assert_eq!(
            &full[..],
            b"pipelined",
            "bytes still to be read stay where they are"
        );
        give(full);
        give(BytesMut::with_capacity(MAX_KEPT_CAPACITY + 1));
        // Neither was kept: the pool (per thread, this test's own) has nothing to lend.
        assert_eq!(take().capacity(), 0);
    }
}
