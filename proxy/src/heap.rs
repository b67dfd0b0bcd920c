//! Futures moved to the heap without being copied there.
//!
//! `Box::pin(fut)` builds the future on the stack and then copies it into its
//! allocation: the whole of it, whatever state it starts in. The request path's futures
//! are kilobytes (the upstream exchange's 2, the request's 5), so that copy cost a few
//! hundred instructions per request each. Allocating first and building the future in
//! the allocation (`Box::write`, which the optimizer turns into a construction in place)
//! avoids it.

use std::pin::Pin;

/// `Box::pin(make())`, with `make`'s result built in the allocation rather than copied
/// into it.
#[inline(always)]
pub fn pin_in_place<T>(make: impl FnOnce() -> T) -> Pin<Box<T>> {
    let slot = Box::new_uninit();
    Box::into_pin(Box::write(slot, make()))
}
