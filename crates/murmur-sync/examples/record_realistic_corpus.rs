//! Records the realistic corpus (`tests/fixtures/corpus-realistic/`, see its README.md):
//! starts the local atproto network (official PLC + PDS, `murmur-devnet`), grows a few repos
//! to thousands of records across several collections, then records the `subscribeRepos`
//! frames of a mixed workload on those grown repos (single-record creates, updates and
//! deletes, and `applyWrites` batches mixing them). Only the frames written after growth are
//! kept: the stream is read from the cursor the growth ended at.
//!
//! Every recorded commit is verified under `VerifyLevel::Full` with keys from the local PLC
//! before anything is written; the DIDs' signing keys go to `keys.json` beside the frames.
//!
//! ```text
//! cargo run --release -p murmur-sync --example record_realistic_corpus [-- OUT_DIR]
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use murmur_devnet::{Account, Devnet, DevnetConfig};
use murmur_sync::{CarSlice, Frame, IdentityResolver, Verifier, VerifyLevel};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Accounts whose repos are grown and then written to.
const ACCOUNTS: usize = 4;
/// Records each repo holds after growth.
const RECORDS_PER_REPO: usize = 5000;
/// Writes per `applyWrites` call while growing (the PDS's limit is 200).
const GROWTH_BATCH: usize = 200;
/// Commits of the recorded workload.
const WORKLOAD_COMMITS: usize = 700;

/// The collections records are spread over, with their share of the records.
const COLLECTIONS: [(&str, u32); 6] = [
    ("agent.comms.task", 30),
    ("agent.comms.message", 25),
    ("agent.comms.result", 15),
    ("agent.comms.claim", 10),
    ("app.bsky.feed.post", 12),
    ("app.bsky.graph.follow", 8),
];

/// A small deterministic generator (xorshift64*), so the content of a run is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn collection(&mut self) -> &'static str {
        let total: u32 = COLLECTIONS.iter().map(|c| c.1).sum();
        let mut pick = (self.next() % u64::from(total)) as u32;
        for (name, weight) in COLLECTIONS {
            if pick < weight {
                return name;
            }
            pick -= weight;
        }
        unreachable!("weights add up to the total")
    }

    /// `min` to `min + spread - 1` words.
    fn words(&mut self, min: usize, spread: usize) -> String {
        let n = min + self.below(spread);
        const WORDS: [&str; 24] = [
            "summarise",
            "the",
            "quarterly",
            "report",
            "agent",
            "retry",
            "with",
            "backoff",
            "index",
            "shard",
            "merge",
            "results",
            "from",
            "worker",
            "queue",
            "deadline",
            "verify",
            "signature",
            "fetch",
            "document",
            "translate",
            "into",
            "french",
            "draft",
        ];
        (0..n)
            .map(|_| WORDS[self.below(WORDS.len())])
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// A record of `collection` with realistic content (a few hundred bytes of DAG-CBOR).
fn record(rng: &mut Rng, collection: &str, n: usize, dids: &[String]) -> Value {
    let created_at = format!(
        "2026-12-0{}T{:02}:{:02}:{:02}.{:03}Z",
        1 + rng.below(7),
        rng.below(24),
        rng.below(60),
        rng.below(60),
        rng.below(1000)
    );
    match collection {
        "agent.comms.task" => json!({
            "$type": collection,
            "title": rng.words(6, 6),
            "input": {
                "uri": format!("at://{}/app.bsky.feed.post/{n}", dids[rng.below(dids.len())]),
                "bytes": rng.below(1 << 20),
                "mime": "text/plain",
            },
            "priority": rng.below(3),
            "deadline": created_at,
            "createdAt": created_at,
        }),
        "agent.comms.message" => json!({
            "$type": collection,
            "text": rng.words(10, 20),
            "thread": format!("thread-{}", rng.below(500)),
            "createdAt": created_at,
        }),
        "agent.comms.result" => json!({
            "$type": collection,
            "task": format!("at://{}/agent.comms.task/{n}", dids[rng.below(dids.len())]),
            "outcome": if rng.below(10) == 0 { "failure" } else { "success" },
            "summary": rng.words(8, 12),
            "metrics": {"tokens": rng.below(100_000), "millis": rng.below(60_000)},
            "createdAt": created_at,
        }),
        "agent.comms.claim" => json!({
            "$type": collection,
            "task": format!("at://{}/agent.comms.task/{n}", dids[rng.below(dids.len())]),
            "worker": dids[rng.below(dids.len())],
            "leaseSeconds": 30 + rng.below(600),
            "createdAt": created_at,
        }),
        "app.bsky.feed.post" => json!({
            "$type": collection,
            "text": rng.words(8, 25),
            "langs": ["en"],
            "createdAt": created_at,
        }),
        "app.bsky.graph.follow" => json!({
            "$type": collection,
            "subject": dids[rng.below(dids.len())],
            "createdAt": created_at,
        }),
        _ => unreachable!("only the collections above are written"),
    }
}

async fn xrpc(pds: &str, account: &Account, method: &str, body: Value) -> Result<Value, String> {
    let response = reqwest::Client::new()
        .post(format!("{pds}/xrpc/{method}"))
        .bearer_auth(&account.access_jwt)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("{method}: {e}"))?;
    let status = response.status();
    let text = response
        .text()
        .await
        .map_err(|e| format!("{method}: {e}"))?;
    if !status.is_success() {
        return Err(format!("{method}: HTTP {status}: {text}"));
    }
    serde_json::from_str(&text).map_err(|e| format!("{method}: {e}: {text}"))
}

/// The rkey at the end of an `at://` URI.
fn rkey_of(uri: &Value) -> Result<String, String> {
    uri.as_str()
        .and_then(|u| u.rsplit('/').next())
        .map(str::to_string)
        .ok_or_else(|| format!("not an at:// URI: {uri}"))
}

/// One account's repo as this program knows it: the rkeys it holds, per collection.
struct Repo {
    account: Account,
    rkeys: BTreeMap<&'static str, Vec<String>>,
}

impl Repo {
    /// A random existing (collection, rkey), removed from the list when `take`.
    fn pick(&mut self, rng: &mut Rng, take: bool) -> (&'static str, String) {
        loop {
            let collection = rng.collection();
            let list = self.rkeys.entry(collection).or_default();
            if list.is_empty() {
                continue;
            }
            let i = rng.below(list.len());
            let rkey = if take {
                list.swap_remove(i)
            } else {
                list[i].clone()
            };
            return (collection, rkey);
        }
    }
}

/// Writes `writes` in one `applyWrites` call and records the rkeys of its creates.
async fn apply(
    pds: &str,
    repo: &mut Repo,
    writes: Vec<(Value, Option<&'static str>)>,
) -> Result<(), String> {
    let body = json!({
        "repo": repo.account.did,
        "writes": writes.iter().map(|w| &w.0).collect::<Vec<_>>(),
    });
    let out = xrpc(pds, &repo.account, "com.atproto.repo.applyWrites", body).await?;
    let results = out["results"]
        .as_array()
        .ok_or_else(|| format!("applyWrites answered without results: {out}"))?;
    for ((_, created), result) in writes.iter().zip(results) {
        if let Some(collection) = created {
            let rkey = rkey_of(&result["uri"])?;
            repo.rkeys.entry(collection).or_default().push(rkey);
        }
    }
    Ok(())
}

fn create(rng: &mut Rng, n: usize, dids: &[String]) -> (Value, Option<&'static str>) {
    let collection = rng.collection();
    (
        json!({
            "$type": "com.atproto.repo.applyWrites#create",
            "collection": collection,
            "value": record(rng, collection, n, dids),
        }),
        Some(collection),
    )
}

/// Reads the PDS's stream from `cursor` until it has been quiet for two seconds.
async fn read_stream(pds: &str, cursor: i64) -> Result<Vec<Vec<u8>>, String> {
    let url = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos?cursor={cursor}",
        pds.replacen("http", "ws", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .map_err(|e| format!("subscribeRepos: {e}"))?;
    let mut frames = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), socket.next()).await {
        if let Message::Binary(bytes) = msg.map_err(|e| format!("subscribeRepos: {e}"))? {
            frames.push(bytes.to_vec());
        }
    }
    Ok(frames)
}

async fn run(net: &Devnet, out_dir: PathBuf) -> Result<(), String> {
    let pds = net.pds(0).map_err(|e| e.to_string())?.url().to_string();
    let mut rng = Rng(0x6d75_726d_7572_2121);
    let mut repos = Vec::new();
    for i in 0..ACCOUNTS {
        let handle = net.unique_handle(&format!("agent{i}"));
        let account = net
            .create_account(0, &handle, "corpus-pass")
            .await
            .map_err(|e| e.to_string())?;
        repos.push(Repo {
            account,
            rkeys: BTreeMap::new(),
        });
    }
    let dids: Vec<String> = repos.iter().map(|r| r.account.did.clone()).collect();

    let started = Instant::now();
    let mut n = 0;
    for repo in &mut repos {
        for _ in 0..RECORDS_PER_REPO / GROWTH_BATCH {
            let writes = (0..GROWTH_BATCH)
                .map(|_| {
                    n += 1;
                    create(&mut rng, n, &dids)
                })
                .collect();
            apply(&pds, repo, writes).await?;
        }
        eprintln!(
            "grew {} to {} records ({:.0?} so far)",
            repo.account.did,
            repo.rkeys.values().map(Vec::len).sum::<usize>(),
            started.elapsed()
        );
    }
    let grown = read_stream(&pds, 0).await?;
    let cursor = grown
        .iter()
        .filter_map(|f| Frame::decode(f).ok()?.seq())
        .max()
        .ok_or("the stream had no events after growth")?;
    eprintln!("growth ended at seq {cursor} ({} frames)", grown.len());

    // The workload: single-record commits (creates, updates, deletes through createRecord,
    // putRecord, deleteRecord) and applyWrites batches of 2 to 4 mixed writes.
    let (mut done, mut failed) = (0, 0);
    while done < WORKLOAD_COMMITS {
        let repo = &mut repos[rng.below(ACCOUNTS)];
        let wrote: Result<(), String> = async {
        let did = repo.account.did.clone();
        let roll = rng.below(100);
        if roll < 35 {
            let collection = rng.collection();
            n += 1;
            let value = record(&mut rng, collection, n, &dids);
            let out = xrpc(
                &pds,
                &repo.account,
                "com.atproto.repo.createRecord",
                json!({"repo": did, "collection": collection, "record": value}),
            )
            .await?;
            repo.rkeys
                .entry(collection)
                .or_default()
                .push(rkey_of(&out["uri"])?);
        } else if roll < 50 {
            let (collection, rkey) = repo.pick(&mut rng, false);
            n += 1;
            let value = record(&mut rng, collection, n, &dids);
            xrpc(
                &pds,
                &repo.account,
                "com.atproto.repo.putRecord",
                json!({"repo": did, "collection": collection, "rkey": rkey, "record": value}),
            )
            .await?;
        } else if roll < 60 {
            let (collection, rkey) = repo.pick(&mut rng, true);
            xrpc(
                &pds,
                &repo.account,
                "com.atproto.repo.deleteRecord",
                json!({"repo": did, "collection": collection, "rkey": rkey}),
            )
            .await?;
        } else {
            let size = 2 + rng.below(3);
            let mut writes = Vec::with_capacity(size);
            let mut touched = Vec::new();
            for _ in 0..size {
                let kind = rng.below(100);
                if kind < 55 {
                    n += 1;
                    writes.push(create(&mut rng, n, &dids));
                    continue;
                }
                // One write per key in a batch.
                let delete = kind >= 85;
                let (collection, rkey) = repo.pick(&mut rng, delete);
                if touched.contains(&(collection, rkey.clone())) {
                    continue;
                }
                touched.push((collection, rkey.clone()));
                n += 1;
                let write = if delete {
                    json!({"$type": "com.atproto.repo.applyWrites#delete", "collection": collection, "rkey": rkey})
                } else {
                    json!({"$type": "com.atproto.repo.applyWrites#update", "collection": collection, "rkey": rkey, "value": record(&mut rng, collection, n, &dids)})
                };
                writes.push((write, None));
            }
            apply(&pds, repo, writes).await?;
        }
        Ok(())
        }
        .await;
        match wrote {
            Ok(()) => {
                done += 1;
                if done % 100 == 0 {
                    eprintln!("workload: {done} commits");
                }
            }
            // The PDS under load sometimes fails a write (HTTP 500): no commit, nothing to
            // record; write something else instead.
            Err(e) if failed < 50 => {
                failed += 1;
                eprintln!("write failed, skipped: {e}");
            }
            Err(e) => return Err(format!("{failed} writes failed; the last: {e}")),
        }
    }

    let frames = read_stream(&pds, cursor).await?;
    let resolver = Arc::new(IdentityResolver::new().with_plc_url(net.plc_url()));
    let verifier = Verifier::new(resolver.clone()).with_level(VerifyLevel::Full);
    let (mut blocks, mut nodes, mut ops, mut bytes) = (0usize, 0usize, 0usize, 0usize);
    let mut keys = BTreeMap::new();
    for f in &frames {
        let Frame::Commit(c) = Frame::decode(f).map_err(|e| format!("decode: {e}"))? else {
            return Err("a frame after growth is not a #commit".into());
        };
        if c.seq <= cursor {
            return Err(format!("seq {} is not after the cursor {cursor}", c.seq));
        }
        let verified = verifier
            .verify_commit(&c)
            .await
            .map_err(|e| format!("commit {} of {}: {e}", c.seq, c.repo))?;
        if verified.chain_break.is_some() && keys.contains_key(&c.repo) {
            return Err(format!("commit {} of {} does not chain", c.seq, c.repo));
        }
        if !keys.contains_key(&c.repo) {
            let id = resolver
                .resolve(&c.repo)
                .await
                .map_err(|e| format!("resolve {}: {e}", c.repo))?;
            keys.insert(c.repo.clone(), id.signing_key.to_did_key());
        }
        let car = CarSlice::parse(&c.blocks).map_err(|e| e.to_string())?;
        let records = c
            .ops
            .iter()
            .filter(|op| op.cid.is_some_and(|cid| car.get(&cid).is_some()))
            .count();
        blocks += car.len();
        nodes += car.len() - 1 - records;
        ops += c.ops.len();
        bytes += f.len();
    }
    // A write the PDS reports as done may change nothing (a delete of a key a failed batch
    // already removed): a few commits fewer than writes is expected, many is not.
    if frames.len() < WORKLOAD_COMMITS * 9 / 10 {
        return Err(format!(
            "recorded {} frames for {WORKLOAD_COMMITS} writes",
            frames.len()
        ));
    }
    let count = frames.len() as f64;
    eprintln!(
        "{} commits verified under Full: {:.1} blocks, {:.1} MST nodes, {:.2} ops, {:.0} bytes per frame on average",
        frames.len(),
        blocks as f64 / count,
        nodes as f64 / count,
        ops as f64 / count,
        bytes as f64 / count
    );

    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let mut out = Vec::new();
    for f in &frames {
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(f);
    }
    let write = |name: &str, data: &[u8]| {
        std::fs::write(out_dir.join(name), data)
            .map_err(|e| format!("{}: {e}", out_dir.join(name).display()))
    };
    write("frames.bin", &out)?;
    let keys = serde_json::to_string_pretty(&keys).map_err(|e| e.to_string())?;
    write("keys.json", keys.as_bytes())?;
    eprintln!("wrote {} bytes to {}", out.len(), out_dir.display());
    Ok(())
}

fn main() {
    let out_dir = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/corpus-realistic")
        });
    let net = Devnet::start(DevnetConfig::default()).unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(1)
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(e) = runtime.block_on(run(&net, out_dir)) {
        eprintln!("recording the realistic corpus failed: {e}");
        std::process::exit(1);
    }
}
