//! Nothing: this package only holds benchmarks (see Cargo.toml).
