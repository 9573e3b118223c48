//! murmur-sync against the real local network (official PLC + PDS): every kind of event the
//! PDS emits decodes, and every commit verifies under `VerifyLevel::Full` with keys resolved
//! from the local PLC.
//!
//! With `MURMUR_SYNC_RECORD=1` the frames and the DIDs' signing keys are also written to
//! `tests/fixtures/corpus/` (the offline corpus used by tests/corpus.rs, the bench and fuzzing).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use murmur_devnet::{Account, Devnet};
use murmur_sync::{Frame, IdentityResolver, Verifier, VerifyLevel};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn shared() -> &'static Devnet {
    Devnet::shared().unwrap_or_else(|e| panic!("{e}"))
}

async fn xrpc(pds: &str, account: &Account, method: &str, body: Value) -> Value {
    let mut request = reqwest::Client::new()
        .post(format!("{pds}/xrpc/{method}"))
        .bearer_auth(&account.access_jwt);
    if !body.is_null() {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "{method}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn task(n: usize) -> Value {
    json!({
        "$type": "agent.comms.task",
        "title": format!("summarise document {n}"),
        "input": {"uri": format!("at://did:plc:example/doc/{n}"), "bytes": 1234 + n},
        "priority": n % 3,
        "createdAt": "2026-11-23T12:00:00.000Z",
    })
}

/// Writes every kind of change through plain XRPC and returns the accounts used.
async fn make_history(net: &Devnet) -> Vec<Account> {
    let pds = net.pds(0).unwrap().url().to_string();
    let alice = net
        .create_account(0, &net.unique_handle("alice"), "alice-pass")
        .await
        .unwrap();
    let bob = net
        .create_account(0, &net.unique_handle("bob"), "bob-pass")
        .await
        .unwrap();
    let coll = "agent.comms.task";
    let mut rkeys = Vec::new();
    for (i, who) in [&alice, &bob, &alice, &alice, &bob, &alice]
        .iter()
        .enumerate()
    {
        let r = xrpc(
            &pds,
            who,
            "com.atproto.repo.createRecord",
            json!({"repo": who.did, "collection": coll, "record": task(i)}),
        )
        .await;
        rkeys.push((
            who.did.clone(),
            r["uri"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_string(),
        ));
    }
    // Update (putRecord on an existing key) and create through putRecord.
    xrpc(
        &pds,
        &alice,
        "com.atproto.repo.putRecord",
        json!({"repo": alice.did, "collection": coll, "rkey": rkeys[0].1, "record": task(100)}),
    )
    .await;
    xrpc(
        &pds,
        &alice,
        "com.atproto.repo.putRecord",
        json!({"repo": alice.did, "collection": "agent.comms.message", "rkey": "self", "record": {"$type": "agent.comms.message", "text": "hi", "createdAt": "2026-11-23T12:00:00.000Z"}}),
    )
    .await;
    // Delete.
    xrpc(
        &pds,
        &alice,
        "com.atproto.repo.deleteRecord",
        json!({"repo": alice.did, "collection": coll, "rkey": rkeys[2].1}),
    )
    .await;
    // A multi-op batch: three creates, one update, one delete.
    xrpc(
        &pds,
        &alice,
        "com.atproto.repo.applyWrites",
        json!({"repo": alice.did, "writes": [
            {"$type": "com.atproto.repo.applyWrites#create", "collection": coll, "value": task(200)},
            {"$type": "com.atproto.repo.applyWrites#create", "collection": coll, "value": task(201)},
            {"$type": "com.atproto.repo.applyWrites#create", "collection": "agent.comms.result", "rkey": "r1", "value": {"$type": "agent.comms.result", "outcome": "success"}},
            {"$type": "com.atproto.repo.applyWrites#update", "collection": coll, "rkey": rkeys[3].1, "value": task(300)},
            {"$type": "com.atproto.repo.applyWrites#delete", "collection": coll, "rkey": rkeys[5].1},
        ]}),
    )
    .await;
    // A bigger repo so the MST has several layers, then a few writes into it.
    let writes: Vec<Value> = (0..60)
        .map(|i| json!({"$type": "com.atproto.repo.applyWrites#create", "collection": coll, "value": task(1000 + i)}))
        .collect();
    xrpc(
        &pds,
        &bob,
        "com.atproto.repo.applyWrites",
        json!({"repo": bob.did, "writes": writes}),
    )
    .await;
    for i in 0..8 {
        xrpc(
            &pds,
            &bob,
            "com.atproto.repo.createRecord",
            json!({"repo": bob.did, "collection": coll, "record": task(2000 + i)}),
        )
        .await;
    }
    xrpc(
        &pds,
        &bob,
        "com.atproto.repo.deleteRecord",
        json!({"repo": bob.did, "collection": coll, "rkey": rkeys[1].1}),
    )
    .await;
    // Identity and account events.
    let new_handle = net.unique_handle("alice2");
    xrpc(
        &pds,
        &alice,
        "com.atproto.identity.updateHandle",
        json!({"handle": new_handle}),
    )
    .await;
    xrpc(
        &pds,
        &bob,
        "com.atproto.server.deactivateAccount",
        json!({}),
    )
    .await;
    xrpc(
        &pds,
        &bob,
        "com.atproto.server.activateAccount",
        Value::Null,
    )
    .await;
    xrpc(
        &pds,
        &bob,
        "com.atproto.repo.createRecord",
        json!({"repo": bob.did, "collection": coll, "record": task(3000)}),
    )
    .await;
    vec![alice, bob]
}

/// Reads the PDS's stream from cursor 0 until it is quiet.
async fn replay(pds: &str) -> Vec<Vec<u8>> {
    let url = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos?cursor=0",
        pds.replacen("http", "ws", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut frames = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_millis(1500), socket.next()).await
    {
        if let Message::Binary(bytes) = msg.unwrap() {
            frames.push(bytes.to_vec());
        }
    }
    frames
}

#[tokio::test]
async fn every_event_from_the_local_pds_decodes_and_verifies_under_full() {
    let net = tokio::task::spawn_blocking(shared).await.unwrap();
    let accounts = make_history(net).await;
    let frames = replay(net.pds(0).unwrap().url()).await;

    let resolver = Arc::new(IdentityResolver::new().with_plc_url(net.plc_url()));
    let verifier = Verifier::new(resolver.clone()).with_level(VerifyLevel::Full);
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut actions: BTreeMap<&str, usize> = BTreeMap::new();
    let mut max_ops = 0;
    for bytes in &frames {
        let frame = Frame::decode(bytes).unwrap_or_else(|e| panic!("decode: {e}"));
        match &frame {
            Frame::Commit(c) => {
                *counts.entry("commit").or_default() += 1;
                let v = verifier.verify_commit(c).await.unwrap_or_else(|e| {
                    panic!("commit {} rev {} of {}: {e}", c.seq, c.rev, c.repo)
                });
                max_ops = max_ops.max(v.ops.len());
                for op in &v.ops {
                    *actions.entry(op.action.as_str()).or_default() += 1;
                    if let Some(record) = op.decode::<Value>().unwrap() {
                        assert!(record["$type"].is_string(), "{record}");
                    }
                }
            }
            Frame::Sync(s) => {
                *counts.entry("sync").or_default() += 1;
                verifier.verify_sync(s).await.unwrap();
            }
            Frame::Identity(i) => {
                *counts.entry("identity").or_default() += 1;
                verifier.on_identity(&i.did);
            }
            Frame::Account(_) => *counts.entry("account").or_default() += 1,
            Frame::Info(_) => *counts.entry("info").or_default() += 1,
            Frame::Unknown { .. } => *counts.entry("unknown").or_default() += 1,
        }
    }
    eprintln!(
        "{} frames: {counts:?}, ops: {actions:?}, max ops in one commit: {max_ops}",
        frames.len()
    );
    for kind in ["commit", "sync", "identity", "account"] {
        assert!(
            counts.get(kind).copied().unwrap_or(0) > 0,
            "no #{kind} frames"
        );
    }
    for action in ["create", "update", "delete"] {
        assert!(
            actions.get(action).copied().unwrap_or(0) > 0,
            "no {action} ops"
        );
    }
    assert!(max_ops >= 5, "no multi-op batch seen");
    for a in &accounts {
        assert!(
            verifier.chain_head(&a.did).is_some(),
            "no chain for {}",
            a.did
        );
    }

    if std::env::var_os("MURMUR_SYNC_RECORD").is_some() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpus");
        std::fs::create_dir_all(&dir).unwrap();
        let mut out = Vec::new();
        for f in &frames {
            out.extend_from_slice(&(f.len() as u32).to_be_bytes());
            out.extend_from_slice(f);
        }
        std::fs::write(dir.join("frames.bin"), out).unwrap();
        let mut keys = BTreeMap::new();
        for f in &frames {
            if let Some(did) = Frame::decode(f).ok().as_ref().and_then(Frame::did) {
                let id = resolver.resolve(did).await.unwrap();
                keys.insert(did.to_string(), id.signing_key.to_did_key());
            }
        }
        std::fs::write(
            dir.join("keys.json"),
            serde_json::to_string_pretty(&keys).unwrap(),
        )
        .unwrap();
        eprintln!("recorded {} frames to {}", frames.len(), dir.display());
    }
}

#[tokio::test]
async fn identity_resolves_through_the_local_plc_and_bad_dids_are_typed_errors() {
    let net = tokio::task::spawn_blocking(shared).await.unwrap();
    let carol = net
        .create_account(1, &net.unique_handle("carol"), "carol-pass")
        .await
        .unwrap();
    let resolver = IdentityResolver::new().with_plc_url(net.plc_url());
    let id = resolver.resolve(&carol.did).await.unwrap();
    assert_eq!(id.did, carol.did);
    assert_eq!(id.pds.as_deref(), Some(net.pds(1).unwrap().url()));
    assert_eq!(id.handle.as_deref(), Some(carol.handle.as_str()));
    let err = resolver
        .resolve("did:plc:aaaaaaaaaaaaaaaaaaaaaaaa")
        .await
        .unwrap_err();
    assert!(
        matches!(err, murmur_sync::SyncError::Resolve { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn stale_cached_key_is_refreshed_once_from_the_plc() {
    let net = tokio::task::spawn_blocking(shared).await.unwrap();
    let pds = net.pds(1).unwrap().url().to_string();
    let dave = net
        .create_account(1, &net.unique_handle("dave"), "dave-pass")
        .await
        .unwrap();
    xrpc(
        &pds,
        &dave,
        "com.atproto.repo.createRecord",
        json!({"repo": dave.did, "collection": "agent.comms.task", "record": task(1)}),
    )
    .await;
    let commit = replay(&pds)
        .await
        .iter()
        .filter_map(|f| match Frame::decode(f) {
            Ok(Frame::Commit(c)) if c.repo == dave.did && !c.ops.is_empty() => Some(c),
            _ => None,
        })
        .next_back()
        .unwrap();

    // The cache holds a key the DID no longer uses (as after a rotation nobody announced).
    let resolver = Arc::new(IdentityResolver::new().with_plc_url(net.plc_url()));
    let old = murmur_sync::PublicKey::from_did_key(
        "did:key:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc",
    )
    .unwrap();
    resolver.insert(murmur_sync::Identity {
        did: dave.did.clone(),
        signing_key: old,
        handle: None,
        pds: None,
    });
    let verifier = Verifier::new(resolver.clone());
    let verified = verifier.verify_commit(&commit).await.unwrap();
    assert_eq!(verified.ops.len(), 1);
    let current = resolver.resolve(&dave.did).await.unwrap();
    assert_ne!(
        current.signing_key.to_did_key(),
        "did:key:zQ3shqwJEJyMBsBXCWyCBpUBMqxcon9oHB7mCvx4sSpMdLJwc"
    );
}

#[tokio::test]
async fn records_and_whole_repos_are_fetched_with_proofs_and_verified() {
    let net = tokio::task::spawn_blocking(shared).await.unwrap();
    let pds = net.pds(1).unwrap().url().to_string();
    let dave = net
        .create_account(1, &net.unique_handle("dave"), "dave-pass")
        .await
        .unwrap();
    let mut written = Vec::new();
    for n in 0..3 {
        let out = xrpc(
            &pds,
            &dave,
            "com.atproto.repo.createRecord",
            json!({"repo": dave.did, "collection": "agent.comms.task", "record": task(n)}),
        )
        .await;
        let uri = out["uri"].as_str().unwrap().to_string();
        let rkey = uri.rsplit('/').next().unwrap().to_string();
        written.push((rkey, out["cid"].as_str().unwrap().to_string()));
    }
    let resolver = Arc::new(IdentityResolver::new().with_plc_url(net.plc_url()));
    let verifier = Verifier::new(Arc::clone(&resolver)).with_level(VerifyLevel::Full);

    // One record with its proof: signed commit + MST path, checked against the PLC key.
    let (rkey, cid) = &written[1];
    let record = verifier
        .fetch_record(&dave.did, "agent.comms.task", rkey)
        .await
        .unwrap()
        .expect("the record is in the repo");
    assert_eq!(record.path, format!("agent.comms.task/{rkey}"));
    assert_eq!(record.cid.to_string(), *cid);
    let decoded: Value = serde_ipld_dagcbor::from_slice(&record.record).unwrap();
    assert_eq!(decoded["title"], "summarise document 1");

    // An absent key is proven absent (or not found), not an error.
    let absent = verifier
        .fetch_record(&dave.did, "agent.comms.task", "2222222222222")
        .await
        .unwrap();
    assert!(absent.is_none());

    // A proof checked against the wrong DID fails: the commit names its own repo.
    let carol = net
        .create_account(1, &net.unique_handle("carol"), "carol-pass")
        .await
        .unwrap();
    let proof = reqwest::get(format!(
        "{pds}/xrpc/com.atproto.sync.getRecord?did={}&collection=agent.comms.task&rkey={rkey}",
        dave.did
    ))
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();
    let err = verifier
        .verify_record_proof(&carol.did, &format!("agent.comms.task/{rkey}"), &proof)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            murmur_sync::SyncError::CommitMismatch { field: "did", .. }
        ),
        "{err}"
    );

    // The whole repo: every record, each hash-checked, under the signed commit.
    let repo = verifier.fetch_repo(&dave.did).await.unwrap();
    let mut paths: Vec<String> = repo.records.iter().map(|r| r.path.clone()).collect();
    paths.retain(|p| p.starts_with("agent.comms.task/"));
    let mut want: Vec<String> = written
        .iter()
        .map(|(rkey, _)| format!("agent.comms.task/{rkey}"))
        .collect();
    want.sort();
    assert_eq!(paths, want);
}
