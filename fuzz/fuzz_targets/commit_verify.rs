//! Full verification of arbitrary `#commit` frames must never panic. Keys of the recorded
//! corpus are pinned, so mutations of the unsigned parts of real frames (ops, prevData, since,
//! and the CAR slice's MST nodes and records) reach the MST inversion.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use murmur_sync::{Frame, Identity, IdentityResolver, PublicKey, Verifier};

const KEYS: &str = include_str!("../../crates/murmur-sync/tests/fixtures/corpus/keys.json");

fn verifier() -> &'static (Verifier, tokio::runtime::Runtime) {
    static V: OnceLock<(Verifier, tokio::runtime::Runtime)> = OnceLock::new();
    V.get_or_init(|| {
        let resolver = IdentityResolver::new().with_plc_url("http://127.0.0.1:9");
        let keys: serde_json::Value = serde_json::from_str(KEYS).unwrap();
        for (did, key) in keys.as_object().unwrap() {
            resolver.pin(Identity {
                did: did.clone(),
                signing_key: PublicKey::from_did_key(key.as_str().unwrap()).unwrap(),
                handle: None,
                pds: None,
            });
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        (Verifier::new(Arc::new(resolver)), runtime)
    })
}

fuzz_target!(|data: &[u8]| {
    let (v, runtime) = verifier();
    if let Ok(Frame::Commit(c)) = Frame::decode(data) {
        // Forget the chain so every input is checked as a DID's first commit.
        v.forget(&c.repo);
        let _ = runtime.block_on(v.verify_commit(&c));
    }
});
