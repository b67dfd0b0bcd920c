//! Header maps recycled within a worker thread.
//!
//! Every HTTP/1.1 exchange builds two header maps (the client's request, the upstream's
//! response) and drops both once they have been written out. A map with room for a
//! dozen or two headers is one to three KiB, above what glibc serves from its per-thread
//! cache, so each map cost two trips through the general allocator (about 500
//! instructions per request together). Maps come back here once written, are cleared
//! (which keeps their memory) and serve the next request, usually while still in cache.

use http::HeaderMap;
use std::cell::RefCell;

/// Maps kept per thread: enough for the requests a worker has in flight at once in
/// common loads; past it, returned maps are freed.
const KEEP: usize = 64;
/// A map that grew beyond this many entries (an unusual message) is freed, not kept.
const MAX_KEPT_CAPACITY: usize = 96;
/// A map with less room than this is freed, not kept: `take` would have to grow it
/// (a new table, every entry rehashed: dearer than a fresh map). The takers ask for a
/// message's header count plus 8 or 16 spare, so their maps have room for 24 or more;
/// the small ones are maps built by others (the HTTP/2 decoder starts from an empty
/// map and grows it to 6, then 12).
const MIN_KEPT_CAPACITY: usize = 24;

thread_local! {
    static POOL: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map with room for at least `capacity` headers.
pub fn take(capacity: usize) -> HeaderMap {
    let reused = POOL.with(|p| p.try_borrow_mut().ok().and_then(|mut p| p.pop()));
    match reused {
        Some(mut map) => {
            map.reserve(capacity);
            map
        }
        None => HeaderMap::with_capacity(capacity),
    }
}

/// Give back a map whose message is done with.
pub fn give(mut map: HeaderMap) {
    let cap = map.capacity();
    if !(MIN_KEPT_CAPACITY..=MAX_KEPT_CAPACITY).contains(&cap) {
        return;
    }
    map.clear();
    POOL.with(|p| {
        if let Ok(mut p) = p.try_borrow_mut() {
            if p.len() < KEEP {
                p.push(map);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_come_back_empty_with_their_room() {
        // A taker's size: a message's five headers plus 16 spare.
        let mut m = take(21);
        m.insert("x-a", http::HeaderValue::from_static("1"));
        let cap = m.capacity();
        give(m);
        let again = take(4);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), cap);
        let bigger = take(40);
        assert!(bigger.capacity() >= 40);
    }

    #[test]
    fn small_maps_are_not_kept() {
        // An HTTP/2 request's map: grown from empty, too small for a taker.
        let mut small = HeaderMap::new();
        small.insert("x-a", http::HeaderValue::from_static("1"));
        assert!(small.capacity() < MIN_KEPT_CAPACITY);
        give(small);
        // Not kept: the pool (per thread, this test's own) hands out a fresh map.
        assert_eq!(take(0).capacity(), 0);
    }
}
