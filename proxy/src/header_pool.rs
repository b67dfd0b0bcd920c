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
    if cap == 0 || cap > MAX_KEPT_CAPACITY {
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
        let mut m = take(12);
        m.insert("x-a", http::HeaderValue::from_static("1"));
        let cap = m.capacity();
        give(m);
        let again = take(4);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), cap);
        let bigger = take(40);
        assert!(bigger.capacity() >= 40);
    }
}
