//! A cluster's circuit breakers (Envoy's thresholds): limits on requests in flight, on
//! requests waiting for a connection, and on retries in flight. Past a limit the request
//! fails at once with 503 `UO` (or, for retries, the retry is skipped) instead of queueing
//! without bound behind a struggling upstream. The connection limit is the connector's
//! semaphore (`cluster.rs`).

use crate::config::CircuitBreakersSpec;
use crate::retry::RetryLimiter;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A counter with a ceiling: entering past the ceiling fails.
#[derive(Debug)]
pub struct Gate {
    active: AtomicUsize,
    max: usize,
}

impl Gate {
    pub fn new(max: usize) -> Self {
        Self {
            active: AtomicUsize::new(0),
            max,
        }
    }

    /// Enter if below the ceiling; the guard leaves on drop (it owns a handle to the gate,
    /// so it can live as long as the request, response body included).
    pub fn try_enter(self: &Arc<Self>) -> Option<GateGuard> {
        // fetch_add then undo keeps the success path to one atomic operation.
        if self.active.fetch_add(1, Ordering::AcqRel) >= self.max {
            self.active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(GateGuard(self.clone()))
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

pub struct GateGuard(Arc<Gate>);

impl Drop for GateGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The breakers of one cluster, shared by all workers.
#[derive(Debug)]
pub struct Breakers {
    /// Requests in flight (`max_requests`).
    pub requests: Arc<Gate>,
    /// Requests waiting for a new upstream connection (`max_pending_requests`).
    pub pending: Arc<Gate>,
    /// Retries in flight (`max_retries` or the retry budget).
    pub retries: RetryLimiter,
}

impl Breakers {
    pub fn new(spec: &CircuitBreakersSpec) -> Self {
        Self {
            requests: Arc::new(Gate::new(spec.max_requests)),
            pending: Arc::new(Gate::new(spec.max_pending_requests)),
            retries: RetryLimiter::new(spec.max_retries, spec.retry_budget.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_holds_its_ceiling() {
        let g = Arc::new(Gate::new(2));
        let a = g.try_enter();
        let b = g.try_enter();
        assert!(a.is_some() && b.is_some());
        assert!(g.try_enter().is_none());
        assert_eq!(g.active(), 2);
        drop(a);
        assert!(g.try_enter().is_some());
    }
}
