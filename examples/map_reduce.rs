//! Map-reduce over records: a coordinator splits a text into chunks and posts each as a
//! `count-words` task; mapper agents count the words of a chunk; a reducer agent merges the
//! partial counts as the mappers' results arrive on the stream, and answers the `reduce`
//! task the coordinator gave it with the totals. The program checks them against a count
//! done locally and prints both.
//!
//! ```sh
//! cargo run --example map_reduce                           # starts a local network
//! cargo run --example map_reduce -- PDS_A PDS_B PLC_URL    # existing hosts (sign-ups open)
//! ```

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::error::Error;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use murmur::comms::Result as ResultRecord;
use murmur::{Author, Created, HandlerError, Job, State, TaskSpec, Worker, handler};
use serde_json::json;
use tokio::sync::watch;

mod support;
use support::Network;

/// The text counted: the opening of A Tale of Two Cities and the Gettysburg Address.
const TEXT: &str = include_str!("map_reduce.txt");
const CHUNKS: usize = 6;

fn main() -> ExitCode {
    support::run(2, map_reduce)
}

async fn map_reduce(net: &Network) -> Result<(), Box<dyn Error>> {
    let names = ["coordinator", "reducer", "mapper0", "mapper1", "mapper2"];
    let mut writers = Vec::new();
    for (i, name) in names.iter().enumerate() {
        writers.push(net.account(i, name).await?);
    }
    let peers: Vec<String> = writers.iter().map(|w| w.did().to_string()).collect();
    let names: HashMap<&String, &str> = peers.iter().zip(names).collect();
    let reducer_did = peers[1].clone();

    // Mappers: a chunk in, its word counts out (plus which reduce task they feed).
    let mut _mappers = Vec::new();
    for (i, w) in writers[2..].iter().enumerate() {
        let map = Worker::new(move |job: Job| async move {
            let input = job.payload_json();
            let text = input["text"].as_str().ok_or("a chunk without text")?;
            let counts = count_words(text);
            let words: u64 = counts.values().sum();
            println!("mapper{i}: chunk {} has {words} words", input["chunk"]);
            Ok(json!({ "reduce": input["reduce"], "chunk": input["chunk"], "counts": counts }))
        })
        .capabilities(["count-words"])
        .max_concurrent(2);
        let agent = net.agent(w.clone(), &peers).requester(false);
        _mappers.push(agent.worker(map).start().await?);
    }

    // The reducer: its handler merges partial counts as they arrive; its reduce task
    // finishes when every chunk is in.
    let partials = Partials::default();
    let merged = partials.clone();
    let reduce = Worker::new(move |job: Job| {
        let merged = merged.clone();
        async move {
            let chunks = job.payload_json()["chunks"]
                .as_u64()
                .ok_or("no chunk count")?;
            let mut changed = merged.changed.subscribe();
            loop {
                if let Some(m) = lock(&merged.table).get(&job.task_uri)
                    && m.chunks.len() as u64 >= chunks
                {
                    return Ok(json!({ "counts": m.totals }));
                }
                changed.changed().await.map_err(|e| e.to_string())?;
            }
        }
    })
    .capabilities(["reduce"]);
    let _reducer = net
        .agent(writers[1].clone(), &peers)
        .requester(false)
        .worker(reduce)
        .state(partials)
        .handler(on_partial)
        .start()
        .await?;

    // The coordinator: one reduce task for the reducer, then one count-words task per chunk.
    let coordinator = net.agent(writers[0].clone(), &peers).start().await?;
    let lines: Vec<&str> = TEXT.lines().collect();
    let chunks: Vec<String> = lines
        .chunks(lines.len().div_ceil(CHUNKS))
        .map(|c| c.join("\n"))
        .collect();
    let started = Instant::now();
    let reduce = TaskSpec::new("reduce").assignee(&reducer_did);
    let reduce = reduce.payload(json!({ "chunks": chunks.len() }));
    let reduce = coordinator.request(reduce).await?;
    let maps = chunks.iter().enumerate().map(|(i, text)| {
        TaskSpec::new("count-words")
            .payload(json!({ "reduce": reduce.uri, "chunk": i, "text": text }))
    });
    let maps = coordinator.request_many(maps, 50).await?;
    println!(
        "coordinator: posted a reduce task and {} count-words tasks",
        maps.len()
    );
    let reduced = reduce.await_result(Duration::from_secs(120)).await?;
    for map in maps {
        map.await_result(Duration::from_secs(60)).await?;
    }

    let remote: BTreeMap<String, u64> =
        serde_json::from_value(reduced.output_json()["counts"].clone())?;
    let local = count_words(TEXT);
    println!("\nsummary ({:.1} s):", started.elapsed().as_secs_f64());
    for (did, n) in &coordinator.task_stats().done_by {
        println!("  {}: {n} task(s)", names.get(did).copied().unwrap_or(did));
    }
    println!("  reduced: {}", describe(&remote));
    println!("  local:   {}", describe(&local));
    if remote != local {
        return Err("the reduced counts differ from the local count".into());
    }
    println!("the reduced counts equal the local count");
    Ok(())
}

/// The reducer's merge table, shared by its result handler and its reduce work.
#[derive(Clone, Default)]
struct Partials {
    /// Reduce task at-uri -> what has been merged for it.
    table: Arc<Mutex<HashMap<String, Merge>>>,
    /// Bumped after each merge.
    changed: Arc<watch::Sender<()>>,
}

#[derive(Default)]
struct Merge {
    chunks: BTreeSet<u64>,
    totals: BTreeMap<String, u64>,
}

/// Runs for every result on the stream; a mapper's result carries one chunk's counts, which
/// are added to the totals of the reduce task it names (each chunk once, even if counted twice).
#[handler]
async fn on_partial(
    result: Created<ResultRecord>,
    from: Author,
    State(partials): State<Partials>,
) -> Result<(), HandlerError> {
    let output = serde_json::to_value(&result.output).unwrap_or_default();
    let (Some(reduce), Some(chunk), Some(counts)) = (
        output["reduce"].as_str(),
        output["chunk"].as_u64(),
        output["counts"].as_object(),
    ) else {
        return Ok(()); // not a mapper's result
    };
    // Only chunks of tasks posted by the reduce task's own requester count.
    if requester(reduce) != requester(&result.task.uri) {
        return Ok(());
    }
    let mut table = lock(&partials.table);
    let merge = table.entry(reduce.to_string()).or_default();
    if !merge.chunks.insert(chunk) {
        return Ok(());
    }
    for (word, n) in counts {
        *merge.totals.entry(word.clone()).or_default() += n.as_u64().unwrap_or(0);
    }
    println!(
        "reducer: merged chunk {chunk} from {} ({} chunks in, {} distinct words so far)",
        from.0,
        merge.chunks.len(),
        merge.totals.len()
    );
    drop(table);
    partials.changed.send_modify(|_| ());
    Ok(())
}

/// Word counts: lower-cased runs of letters and digits.
fn count_words(text: &str) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for word in text
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        *counts.entry(word.to_lowercase()).or_default() += 1;
    }
    counts
}

/// Totals and the five most frequent words.
fn describe(counts: &BTreeMap<String, u64>) -> String {
    let mut top: Vec<(&String, &u64)> = counts.iter().collect();
    top.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let top: Vec<String> = top
        .iter()
        .take(5)
        .map(|(w, n)| format!("{w} {n}"))
        .collect();
    let words: u64 = counts.values().sum();
    format!(
        "{words} words, {} distinct; {}",
        counts.len(),
        top.join(", ")
    )
}

/// The DID in an at-uri (`at://did/collection/rkey`).
fn requester(uri: &str) -> Option<&str> {
    uri.strip_prefix("at://")?.split('/').next()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
