//! A fast per-thread random generator (xoshiro, seeded from the OS once per thread) for
//! values that must be unique and evenly spread but need not be secret: request ids,
//! trace and span ids (the OpenTelemetry SDK makes those the same way). A request id
//! from the thread-local ChaCha generator cost 10× more, and a worker makes one per
//! request. Keys and anything else secret come from `rand::rng()` or the TLS stack.

use rand::distr::{Distribution, StandardUniform};
use rand::{Rng, SeedableRng};
use std::cell::RefCell;

thread_local! {
    static RNG: RefCell<rand::rngs::SmallRng> = RefCell::new(rand::rngs::SmallRng::from_rng(&mut rand::rng()));
}

/// A random value from this thread's generator.
pub fn random<T>() -> T
where
    StandardUniform: Distribution<T>,
{
    RNG.with(|r| r.borrow_mut().random())
}

/// A random value that is not zero (W3C Trace Context: an all-zero id is invalid).
pub fn nonzero<T>() -> T
where
    StandardUniform: Distribution<T>,
    T: Default + PartialEq,
{
    RNG.with(|r| {
        let mut r = r.borrow_mut();
        loop {
            let v: T = r.random();
            if v != T::default() {
                return v;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn values_differ_and_are_not_zero() {
        let a: u128 = super::nonzero();
        let b: u128 = super::nonzero();
        assert_ne!(a, 0);
        assert_ne!(a, b);
        let c: [u8; 16] = super::random();
        let d: [u8; 16] = super::random();
        assert_ne!(c, d);
    }
}
