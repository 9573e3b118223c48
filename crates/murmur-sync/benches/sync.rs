//! Benchmark placeholder: replaced by the recorded-corpus benchmark.

fn main() {}
