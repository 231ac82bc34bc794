//! The tests that bound memory with a counting allocator: one `#[global_allocator]` per
//! binary, so they share this one, apart from tests/integration. The counts are per thread
//! (tests/memory/alloc_count), so the tests may run side by side.

mod alloc_count;
#[path = "../common/mod.rs"]
mod common;

mod check_memory;
mod convert_memory;
mod dump_memory;
mod mutation;
mod write_memory;

#[global_allocator]
static ALLOCATOR: alloc_count::Counting = alloc_count::Counting;
