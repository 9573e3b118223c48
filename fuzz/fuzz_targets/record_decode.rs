//! Record decoding (size and nesting limits, then DAG-CBOR into a generic value) must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use murmur_sync::{Limits, decode_record};

fuzz_target!(|data: &[u8]| {
    let _ = decode_record::<ipld_core::ipld::Ipld>(data, &Limits::default());
    let _ = decode_record::<serde_json::Value>(data, &Limits::default());
});
