//! Verified tokens, keyed by the SHA-256 of the token text, kept until they expire.
//!
//! Bounded: when full, expired entries go first, then the oldest insertions (FIFO). A hit
//! still re-checks the time window, so a cached token stops working when it expires. The
//! cache is per instance (one per worker thread) and cleared when the key set changes, so
//! a key removed from the JWKS stops accepting its tokens at the next refresh.

use crate::token::Window;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};

/// What a verified token gives a request: prepared once, applied on every hit.
#[derive(Debug, Clone)]
pub struct Verified {
    pub window: Window,
    /// Headers to set (claim values), in config order.
    pub headers: Vec<(String, String)>,
    /// Properties to put in the request's bag.
    pub properties: Vec<(String, String)>,
}

pub type TokenHash = [u8; 32];

pub fn hash(token: &str) -> TokenHash {
    Sha256::digest(token.as_bytes()).into()
}

pub struct TokenCache {
    cap: usize,
    map: HashMap<TokenHash, Verified>,
    order: VecDeque<TokenHash>,
}

impl TokenCache {
    pub fn new(cap: usize) -> Self {
        TokenCache {
            cap,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    pub fn get(&self, h: &TokenHash) -> Option<&Verified> {
        self.map.get(h)
    }

    pub fn remove(&mut self, h: &TokenHash) {
        // Its slot in `order` is dropped lazily when it reaches the front.
        self.map.remove(h);
    }

    pub fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Insert; `now` (unix seconds) decides what is expired when room is needed.
    pub fn insert(&mut self, h: TokenHash, v: Verified, now: i64) {
        if self.cap == 0 {
            return;
        }
        if self.map.len() >= self.cap {
            self.map
                .retain(|_, e| e.window.exp.is_none_or(|exp| exp > now));
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
        while self.map.len() >= self.cap {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        if self.map.insert(h, v).is_none() {
            self.order.push_back(h);
        }
        // Keep `order` from growing past the map by lazily removed entries.
        if self.order.len() > 2 * self.cap {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(exp: i64) -> Verified {
        Verified {
            window: Window {
                exp: Some(exp),
                nbf: None,
            },
            headers: vec![],
            properties: vec![],
        }
    }

    #[test]
    fn bounded_expired_first_then_fifo() {
        let mut c = TokenCache::new(3);
        c.insert(hash("a"), v(1000), 0);
        c.insert(hash("b"), v(10), 0);
        c.insert(hash("c"), v(1000), 0);
        c.insert(hash("d"), v(1000), 20); // b expired: it goes
        assert!(c.get(&hash("b")).is_none());
        assert!(c.get(&hash("a")).is_some());
        c.insert(hash("e"), v(1000), 20); // full, nothing expired: the oldest (a) goes
        assert!(c.get(&hash("a")).is_none());
        assert_eq!(c.len(), 3);
    }
}
