//! The integration tests, one binary (tests/memory holds those that need a counting
//! allocator). Each module was a test binary of its own; a module that needs cargo features
//! (or a platform) has them on its `mod` line. Run one module's tests with a filter:
//! `cargo test --test integration -- fixtures:: api::`.

#[path = "../common/mod.rs"]
mod common;
mod holes;
mod info_cases;

#[cfg(feature = "cli")]
mod amend;
#[cfg(all(feature = "cli", feature = "encryption"))]
mod amend_luks;
mod api;
mod api_style;
mod bitmap;
#[cfg(feature = "cli")]
mod bitmap_ops;
mod bitmap_write;
mod chain_reads;
mod check;
mod check_bound;
#[cfg(feature = "cli")]
mod check_cli;
mod check_repair;
#[cfg(feature = "cli")]
mod cli_bench;
#[cfg(all(feature = "cli", feature = "zlib", feature = "zstd"))]
mod cli_convert;
#[cfg(all(feature = "cli", feature = "zlib", feature = "zstd"))]
mod cli_convert_qcow2;
#[cfg(feature = "cli")]
mod cli_info;
#[cfg(feature = "cli")]
mod cli_io;
#[cfg(feature = "cli")]
mod cli_manners;
#[cfg(feature = "cli")]
mod cli_map;
#[cfg(all(feature = "cli", feature = "encryption"))]
mod cli_secret;
#[cfg(all(feature = "cli", feature = "encryption", feature = "zlib"))]
mod commit;
#[cfg(feature = "cli")]
mod compare_strict;
#[cfg(any(feature = "zlib", feature = "zstd"))]
mod compressed_reads;
#[cfg(all(feature = "zlib", feature = "zstd"))]
mod compressed_streams;
mod conformance;
#[cfg(all(feature = "zlib", feature = "zstd"))]
mod convert;
#[cfg(all(feature = "zlib", feature = "zstd"))]
mod convert_qcow2;
#[cfg(unix)]
mod crash;
mod crash_data_file;
#[cfg(feature = "cli")]
mod create;
mod differential;
#[cfg(feature = "encryption")]
mod encryption;
mod fixtures;
mod hostile;
#[cfg(feature = "serde")]
mod info_json;
#[cfg(unix)]
mod info_names;
#[cfg(feature = "cli")]
mod io_scripts;
mod luks_create;
#[cfg(feature = "encryption")]
mod luks_realistic;
mod map;
mod map_errors;
#[cfg(target_os = "linux")]
mod open_safety;
mod owned_reader;
mod parallel;
mod partitions;
mod qemu_refusals;
#[cfg(all(feature = "cli", feature = "encryption", feature = "zlib"))]
mod rebase;
#[cfg(feature = "cli")]
mod resize;
#[cfg(all(
    feature = "cli",
    feature = "encryption",
    feature = "zlib",
    feature = "zstd"
))]
mod snapshot_jobs;
mod threads;
mod write;
mod zero_walks;
