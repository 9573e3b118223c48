//! The public MST against a real repo on the local network (official PLC + PDS): the tree
//! rebuilt from the repo's records (`listRecords`) has the signed commit's `data` root and
//! exactly the MST node blocks `getRepo` returns, and the last commit's ops are proven by the
//! blocks `Mst::proof_blocks` picks.

use std::collections::BTreeMap;

use murmur_devnet::{Account, Devnet};
use murmur_sync::{Action, CarSlice, Cid, Mst, PartialTree, SignedCommit};
use serde_json::{Value, json};

const COLLECTIONS: [&str; 3] = [
    "agent.comms.task",
    "agent.comms.result",
    "agent.comms.message",
];

fn shared() -> &'static Devnet {
    Devnet::shared().unwrap_or_else(|e| panic!("{e}"))
}

async fn xrpc(pds: &str, account: &Account, method: &str, body: Value) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{pds}/xrpc/{method}"))
        .bearer_auth(&account.access_jwt)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let text = response.text().await.unwrap();
    assert!(status.is_success(), "{method}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

fn record(collection: &str, n: usize) -> Value {
    json!({
        "$type": collection,
        "title": format!("record {n}"),
        "n": n,
        "createdAt": "2026-12-07T12:00:00.000Z",
    })
}

/// Every record of the repo as `(collection/rkey, CID)`, through `listRecords`.
async fn list_records(pds: &str, did: &str) -> Vec<(String, Cid)> {
    let mut out = Vec::new();
    for collection in COLLECTIONS {
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!(
                "{pds}/xrpc/com.atproto.repo.listRecords?repo={did}&collection={collection}&limit=100"
            );
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let page: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
            let records = page["records"].as_array().unwrap();
            for r in records {
                let uri = r["uri"].as_str().unwrap();
                let rkey = uri.rsplit('/').next().unwrap();
                let cid: Cid = r["cid"].as_str().unwrap().parse().unwrap();
                out.push((format!("{collection}/{rkey}"), cid));
            }
            match page["cursor"].as_str() {
                Some(c) if !records.is_empty() => cursor = Some(c.to_string()),
                _ => break,
            }
        }
    }
    out
}

async fn get_repo(pds: &str, did: &str) -> Vec<u8> {
    let response = reqwest::get(format!("{pds}/xrpc/com.atproto.sync.getRepo?did={did}"))
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    response.bytes().await.unwrap().to_vec()
}

#[tokio::test]
async fn a_real_repo_rebuilds_to_its_data_root_and_node_blocks() {
    let net = tokio::task::spawn_blocking(shared).await.unwrap();
    let pds = net.pds(0).unwrap().url().to_string();
    let account = net
        .create_account(0, &net.unique_handle("mst"), "mst-pass")
        .await
        .unwrap();
    // 300 records across three collections, in applyWrites batches of 100.
    for batch in 0..3 {
        let writes: Vec<Value> = (0..100)
            .map(|i| {
                let n = batch * 100 + i;
                let collection = COLLECTIONS[n % 3];
                json!({
                    "$type": "com.atproto.repo.applyWrites#create",
                    "collection": collection,
                    "value": record(collection, n),
                })
            })
            .collect();
        xrpc(
            &pds,
            &account,
            "com.atproto.repo.applyWrites",
            json!({"repo": account.did, "writes": writes}),
        )
        .await;
    }
    let before = Mst::from_entries(list_records(&pds, &account.did).await).unwrap();
    assert_eq!(before.len(), 300);
    // One more commit with each kind of op: its proof is checked below.
    let keys: Vec<String> = before.entries().map(|(k, _)| k.to_string()).collect();
    let (update, delete) = (&keys[17], &keys[250]);
    let split = |k: &str| {
        let (c, r) = k.split_once('/').unwrap();
        (c.to_string(), r.to_string())
    };
    let ((uc, ur), (dc, dr)) = (split(update), split(delete));
    xrpc(
        &pds,
        &account,
        "com.atproto.repo.applyWrites",
        json!({"repo": account.did, "writes": [
            {"$type": "com.atproto.repo.applyWrites#create", "collection": COLLECTIONS[0], "rkey": "zzz-last", "value": record(COLLECTIONS[0], 1000)},
            {"$type": "com.atproto.repo.applyWrites#update", "collection": uc, "rkey": ur, "value": record(&uc, 1001)},
            {"$type": "com.atproto.repo.applyWrites#delete", "collection": dc, "rkey": dr},
        ]}),
    )
    .await;

    let records = list_records(&pds, &account.did).await;
    assert_eq!(records.len(), 300);
    let mst = Mst::from_entries(records.iter().cloned()).unwrap();
    let car = get_repo(&pds, &account.did).await;
    let slice = CarSlice::parse(&car).unwrap();
    let commit_cid = slice.roots()[0];
    let commit = SignedCommit::decode(slice.get(&commit_cid).unwrap()).unwrap();
    assert_eq!(commit.did, account.did);
    assert_eq!(
        mst.root(),
        commit.data,
        "the rebuilt root is the commit's data"
    );
    // The CAR's blocks other than the commit and the records are exactly the tree's nodes.
    let record_cids: Vec<Cid> = records.iter().map(|(_, c)| *c).collect();
    let car_nodes: BTreeMap<Cid, Vec<u8>> = slice
        .blocks()
        .filter(|(c, _)| *c != commit_cid && !record_cids.contains(c))
        .map(|(c, b)| (c, b.to_vec()))
        .collect();
    let nodes: BTreeMap<Cid, Vec<u8>> = mst.blocks().into_iter().collect();
    assert_eq!(nodes.len(), mst.blocks().len(), "no node twice");
    assert_eq!(
        nodes.keys().collect::<Vec<_>>(),
        car_nodes.keys().collect::<Vec<_>>()
    );
    assert_eq!(nodes, car_nodes);
    // Loading the tree from the CAR gives the same entries, and the diff is the last commit.
    assert_eq!(Mst::load(&slice, commit.data).unwrap(), mst);
    let diff = before.diff(&mst);
    assert_eq!(diff.created.len(), 1);
    assert_eq!(diff.created[0].0, format!("{}/zzz-last", COLLECTIONS[0]));
    assert_eq!(
        diff.updated
            .iter()
            .map(|u| u.0.as_str())
            .collect::<Vec<_>>(),
        [update.as_str()]
    );
    assert_eq!(
        diff.deleted
            .iter()
            .map(|d| d.0.as_str())
            .collect::<Vec<_>>(),
        [delete.as_str()]
    );
    // The last commit's proof blocks, alone, undo it to the tree before.
    let ops = [
        (diff.created[0].0.as_str(), Action::Create),
        (update.as_str(), Action::Update),
        (delete.as_str(), Action::Delete),
    ];
    let proof = mst.proof_blocks(ops).unwrap();
    assert!(proof.len() < nodes.len());
    let proof_car = murmur_sync::write_car(mst.root(), proof.iter().map(|(c, b)| (*c, b)));
    let mut partial = PartialTree::load(&CarSlice::parse(&proof_car).unwrap(), mst.root()).unwrap();
    assert_eq!(partial.root().unwrap(), mst.root());
    partial.set(delete.as_bytes(), diff.deleted[0].1).unwrap();
    partial.set(update.as_bytes(), diff.updated[0].1).unwrap();
    partial.remove(diff.created[0].0.as_bytes()).unwrap();
    assert_eq!(partial.root().unwrap(), before.root());
}
