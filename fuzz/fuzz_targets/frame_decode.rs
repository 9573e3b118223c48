//! Frame decoding must never panic, whatever the bytes; a commit's CAR slice and signed commit
//! are parsed too, as the verifier would.
#![no_main]

use libfuzzer_sys::fuzz_target;
use murmur_sync::{CarSlice, Frame, SignedCommit};

fuzz_target!(|data: &[u8]| {
    if let Ok(Frame::Commit(c)) = Frame::decode(data) {
        let _ = c.ops.iter().map(|op| (op.collection(), op.rkey())).count();
        if let Ok(car) = CarSlice::parse(&c.blocks)
            && let Some(block) = car.get(&c.commit)
        {
            let _ = SignedCommit::decode(block);
        }
    }
});
