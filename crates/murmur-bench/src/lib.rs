//! Benchmarks comparing murmur with other atproto implementations doing the same work on
//! the same recorded frames. The library is empty; the work is in `benches/`:
//!
//! - `decode`: `subscribeRepos` frame decode plus every block's CID re-hashed, on the
//!   realistic corpus (`crates/murmur-sync/tests/fixtures/corpus-realistic`), murmur beside
//!   jacquard 0.12, each figure printed beside its goal.
//!
//! ```text
//! cargo bench -p murmur-bench --bench decode
//! ```
//!
//! The crates compared against are dev-dependencies of this crate alone, so
//! `cargo test --workspace` never builds them.
