//! Jetstream decoding on one core: events read as the watcher reads them (zstd with
//! Jetstream's dictionary when compressed, the JSON event parsed, the record converted to
//! DAG-CBOR and its CID checked), from memory (prints figures; not a timed test).
//!
//! `cargo bench -p murmur-firehose --bench jetstream` (`MURMUR_BENCH_EVENTS`, default
//! 200,000; `MURMUR_BENCH_ROUNDS`, default 3)
//!
//! The events are Jetstream's shapes: half likes (the README's), four in ten posts (a
//! sentence of text, languages, a reply), one in ten deletes; each with its own DID, rkey
//! and CID computed from its record, so every CID check passes. Each row prints min /
//! median over the rounds.

use std::sync::Arc;
use std::time::Instant;

use murmur_firehose::JetstreamOp;
use murmur_jetstream::{Compressor, Decompressor, Event};
use serde_json::{Value, json};

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Event `i` of the corpus, as Jetstream sends it.
fn event(i: usize) -> String {
    let did = format!("did:plc:{:024x}", i as u128 * 7919);
    let rkey = format!("3l3qo2vu{:05}", i % 100_000);
    let time_us = 1_725_911_162_329_308 + i as i64;
    let (operation, collection, record): (&str, &str, Option<Value>) = match i % 10 {
        0 => ("delete", "app.bsky.feed.like", None),
        1..=5 => (
            "create",
            "app.bsky.feed.like",
            Some(json!({
                "$type": "app.bsky.feed.like",
                "createdAt": "2024-09-09T19:46:02.102Z",
                "subject": {
                    "cid": "bafyreidc6sydkkbchcyg62v77wbhzvb2mvytlmsychqgwf2xojjtirmzj4",
                    "uri": format!("at://did:plc:wa7b35aakoll7hugkrjtf3xf/app.bsky.feed.post/3l3pte3p{i:05}")
                }
            })),
        ),
        _ => (
            "create",
            "app.bsky.feed.post",
            Some(json!({
                "$type": "app.bsky.feed.post",
                "createdAt": "2024-09-09T19:46:02.102Z",
                "langs": ["en"],
                "text": format!("Post number {i}: a sentence or two of text, about as long as most posts are on the network."),
                "reply": {
                    "parent": {"cid": "bafyreidc6sydkkbchcyg62v77wbhzvb2mvytlmsychqgwf2xojjtirmzj4", "uri": "at://did:plc:wa7b35aakoll7hugkrjtf3xf/app.bsky.feed.post/3l3pte3p2e325"},
                    "root": {"cid": "bafyreidc6sydkkbchcyg62v77wbhzvb2mvytlmsychqgwf2xojjtirmzj4", "uri": "at://did:plc:wa7b35aakoll7hugkrjtf3xf/app.bsky.feed.post/3l3pte3p2e325"}
                }
            })),
        ),
    };
    let mut commit = json!({
        "rev": "3l3qo2vutsw2b", "operation": operation, "collection": collection, "rkey": rkey,
    });
    if let Some(record) = record {
        let bytes = murmur_lexicon::data::to_dag_cbor(
            &murmur_lexicon::data::json_to_data(&record).expect("data-model JSON"),
        )
        .expect("encodes");
        commit["cid"] = json!(murmur_sync::cid_for(0x71, &bytes).to_string());
        commit["record"] = record;
    }
    json!({"did": did, "time_us": time_us, "kind": "commit", "commit": commit}).to_string()
}

/// Decodes every message as the Jetstream source does; returns the ops delivered.
fn decode_all(messages: &[Vec<u8>], compressed: bool, source: &Arc<str>) -> usize {
    let decompressor = Decompressor::new();
    let mut ops = 0;
    for message in messages {
        let json;
        let bytes = if compressed {
            json = decompressor.decompress(message).expect("decompresses");
            &json[..]
        } else {
            &message[..]
        };
        let event = Event::from_json(bytes).expect("a Jetstream event");
        match JetstreamOp::decode(source, &event) {
            JetstreamOp::Op(_) => ops += 1,
            other => panic!("event not delivered: {other:?}"),
        }
    }
    ops
}

fn main() {
    let events = env_or("MURMUR_BENCH_EVENTS", 200_000);
    let rounds = env_or("MURMUR_BENCH_ROUNDS", 3).max(1);
    let plain: Vec<Vec<u8>> = (0..events).map(|i| event(i).into_bytes()).collect();
    let mut compressor = Compressor::new();
    let compressed: Vec<Vec<u8>> = plain.iter().map(|m| compressor.compress(m)).collect();
    let plain_bytes: usize = plain.iter().map(Vec::len).sum();
    let compressed_bytes: usize = compressed.iter().map(Vec::len).sum();
    println!(
        "corpus: {events} events (5/10 likes, 4/10 posts, 1/10 deletes), {:.0} bytes/event plain, {:.0} compressed ({:.0}%)",
        plain_bytes as f64 / events as f64,
        compressed_bytes as f64 / events as f64,
        100.0 * compressed_bytes as f64 / plain_bytes as f64
    );
    let source: Arc<str> = Arc::from("ws://bench/subscribe");
    for (name, messages, is_compressed, bytes) in [
        ("plain", &plain, false, plain_bytes),
        ("compressed", &compressed, true, compressed_bytes),
    ] {
        let mut rates = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            let ops = decode_all(messages, is_compressed, &source);
            let secs = t.elapsed().as_secs_f64();
            assert_eq!(ops, events);
            rates.push(events as f64 / secs);
        }
        rates.sort_by(f64::total_cmp);
        let median = rates[rates.len() / 2];
        println!(
            "{name:>10}: {:>9.0} events/s min, {:>9.0} median, one core ({:.1} MB/s off the wire at the median)",
            rates[0],
            median,
            median * bytes as f64 / events as f64 / 1e6
        );
    }
}
