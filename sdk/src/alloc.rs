//! The filter's memory allocator (wasm32 only, feature `fast-alloc`, on by default).
//!
//! A hook allocates a few dozen small, short-lived blocks (strings handed over by the
//! host, keys, values, the effects buffer) and frees them before it returns. wasi-libc's
//! allocator (dlmalloc) spends a few hundred instructions on each malloc/free pair: a
//! large share of a small filter's time. Here blocks up to 512 bytes come in six size
//! classes, each with a free list: taking or returning a block is a few instructions.
//! Blocks of a class are never given back to the system allocator, so the memory kept is
//! the peak of live small blocks, which hooks keep small. Larger blocks go to the system
//! allocator as before.
//!
//! A filter instance runs one thread (wasm32-wasip2 has no threads), which is what makes
//! the unsynchronized free lists sound; the allocator is not compiled for other targets
//! (filters' unit tests on the host keep the system allocator). A filter that needs its
//! own global allocator turns the feature off (`default-features = false`).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;
use std::ptr;

/// Block sizes: 16, 32, 64, 128, 256 and 512 bytes.
const CLASSES: usize = 6;
const MIN_SMALL: usize = 16;
const MAX_SMALL: usize = MIN_SMALL << (CLASSES - 1);
/// Every small block is aligned to this (enough for any type a filter allocates small).
const ALIGN: usize = 16;

/// The free-list allocator (see the module docs).
pub struct FreeListAlloc {
    heads: UnsafeCell<[*mut u8; CLASSES]>,
}

// SAFETY: installed only on wasm32, where a filter instance has a single thread: the free
// lists are never touched concurrently.
unsafe impl Sync for FreeListAlloc {}

impl FreeListAlloc {
    /// An allocator with empty free lists.
    pub const fn new() -> Self {
        FreeListAlloc {
            heads: UnsafeCell::new([ptr::null_mut(); CLASSES]),
        }
    }
}

impl Default for FreeListAlloc {
    fn default() -> Self {
        Self::new()
    }
}

/// The size class of `layout`, if it is small.
fn class(layout: Layout) -> Option<usize> {
    if layout.size() > MAX_SMALL || layout.align() > ALIGN {
        return None;
    }
    let size = layout.size().max(MIN_SMALL).next_power_of_two();
    Some((size / MIN_SMALL).trailing_zeros() as usize)
}

fn class_layout(c: usize) -> Layout {
    // MIN_SMALL << c is a power of two no larger than MAX_SMALL, ALIGN a power of two.
    Layout::from_size_align(MIN_SMALL << c, ALIGN).unwrap_or(Layout::new::<[u8; MAX_SMALL]>())
}

unsafe impl GlobalAlloc for FreeListAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some(c) = class(layout) else {
            // SAFETY: the caller's layout contract is passed on unchanged.
            return unsafe { System.alloc(layout) };
        };
        // SAFETY: single-threaded (see `Sync`), and a free block's first word holds the
        // next free block of its class (written by `dealloc`).
        unsafe {
            let heads = &mut *self.heads.get();
            if let Some(head) = heads.get_mut(c) {
                if !head.is_null() {
                    let block = *head;
                    *head = block.cast::<*mut u8>().read();
                    return block;
                }
            }
            System.alloc(class_layout(c))
        }
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        let Some(c) = class(layout) else {
            // SAFETY: a large block came from `System.alloc` with this layout.
            return unsafe { System.dealloc(p, layout) };
        };
        // SAFETY: `p` is a block of class `c` (at least 16 bytes, 16-aligned) no longer in
        // use; its first word becomes the free-list link.
        unsafe {
            let heads = &mut *self.heads.get();
            if let Some(head) = heads.get_mut(c) {
                p.cast::<*mut u8>().write(*head);
                *head = p;
            }
        }
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = class(layout);
        // SAFETY: `layout.align()` is valid, and the caller guarantees `new_size` does not
        // overflow when rounded up to it.
        let new_layout = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        let new = class(new_layout);
        match (old, new) {
            // Still fits the block it has.
            (Some(a), Some(b)) if a == b => p,
            // Both large: the system allocator may grow in place.
            // SAFETY: `p` came from `System.alloc(layout)`.
            (None, None) => unsafe { System.realloc(p, layout, new_size) },
            _ => {
                // SAFETY: allocate, copy what both blocks hold, free the old one.
                unsafe {
                    let q = self.alloc(new_layout);
                    if !q.is_null() {
                        ptr::copy_nonoverlapping(p, q, layout.size().min(new_size));
                        self.dealloc(p, layout);
                    }
                    q
                }
            }
        }
    }
}
