//! CAR parsing (with block re-hashing) and signed-commit decoding must never panic; a parsed
//! slice lists each block once, in strictly increasing CID order, and finds each by its CID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use murmur_sync::{CarSlice, SignedCommit};

fuzz_target!(|data: &[u8]| {
    if let Ok(car) = CarSlice::parse(data) {
        let mut last = None;
        for (cid, block) in car.blocks() {
            assert_eq!(car.get(&cid), Some(block), "{cid} is listed but not found");
            assert!(last < Some(cid), "blocks are not in strictly increasing CID order");
            last = Some(cid);
            let _ = SignedCommit::decode(block);
        }
        assert_eq!(car.blocks().count(), car.len());
    }
    let _ = SignedCommit::decode(data);
});
