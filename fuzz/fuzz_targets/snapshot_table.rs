//! The snapshot table walk. Input: `[count u8]` then the table (offset 0 is its first entry).
//! See `qcow2::fuzzing::snapshot_table`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some((&count, table)) = data.split_first() {
        let _ = qcow2::fuzzing::snapshot_table(table, u32::from(count));
    }
});
