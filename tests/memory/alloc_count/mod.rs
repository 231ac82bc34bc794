//! A counting allocator for the tests that bound memory (the modules of
//! `tests/memory`: mutation, check_memory, dump_memory): `tests/memory/main.rs` declares
//! `#[global_allocator] static ALLOCATOR: Counting`, the one allocator of that binary.
//! Counts are per thread (libtest runs tests on several threads at once, and one case runs on
//! one thread), so a case's peak is not polluted by other tests. What the crate allocates on
//! its pool's threads is not counted: the mutation harness opens images with one thread (no
//! pool), and a check runs on the calling thread.

#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

pub struct Counting;

thread_local! {
    static CURRENT: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note_alloc(bytes: usize) {
    let _ = CURRENT.try_with(|c| {
        let now = c.get().saturating_add(bytes as isize);
        c.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
}

fn note_free(bytes: usize) {
    let _ = CURRENT.try_with(|c| c.set(c.get().saturating_sub(bytes as isize)));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the
// bookkeeping touches only const-initialized thread-locals without destructors (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note_alloc(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        note_free(layout.size());
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note_free(layout.size());
            note_alloc(new_size);
        }
        p
    }
}

/// Run `f` and return the most bytes it had allocated at once on this thread (above what was
/// allocated when it started).
pub fn peak_during<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = CURRENT.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let peak = PEAK.with(Cell::get).saturating_sub(base);
    (r, peak.max(0) as usize)
}
