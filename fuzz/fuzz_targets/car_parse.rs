//! CAR parsing (with block re-hashing) and signed-commit decoding must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use murmur_sync::{CarSlice, SignedCommit};

fuzz_target!(|data: &[u8]| {
    if let Ok(car) = CarSlice::parse(data) {
        for (_, block) in car.blocks() {
            let _ = SignedCommit::decode(block);
        }
    }
    let _ = SignedCommit::decode(data);
});
