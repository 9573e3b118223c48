//! Walking skeleton: start the local network, write an `agent.comms.message` record with plain
//! createRecord, and watch its `#commit` frame arrive on the PDS's event stream.
//!
//! `cargo run --example skeleton`

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use murmur_devnet::{Devnet, DevnetConfig};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[derive(serde::Deserialize)]
struct Header {
    t: Option<String>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let net = tokio::task::spawn_blocking(|| Devnet::start(DevnetConfig::default())).await??;
    let pds = net.pds(0)?;
    println!("PLC {}  PDS {}", net.plc_url(), pds.url());
    let alice = net.create_account(0, "alice.test", "alice-pass").await?;
    println!("alice is {}", alice.did);

    let ws = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos",
        pds.url().replacen("http", "ws", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(ws).await?;

    let started = Instant::now();
    let created: Value = reqwest::Client::new()
        .post(format!("{}/xrpc/com.atproto.repo.createRecord", pds.url()))
        .bearer_auth(&alice.access_jwt)
        .json(&json!({
            "repo": alice.did,
            "collection": "agent.comms.message",
            "record": { "$type": "agent.comms.message", "text": "hello", "createdAt": "2026-11-23T12:00:00.000Z" },
        }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    println!("wrote {}", created["uri"]);

    let frame = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(msg) = socket.next().await {
            if let Message::Binary(bytes) = msg? {
                let mut rest: &[u8] = &bytes;
                let header: Header = serde_ipld_dagcbor::de::from_reader_once(&mut rest)?;
                if header.t.as_deref() == Some("#commit") {
                    return Ok::<_, Box<dyn std::error::Error>>(bytes.len());
                }
            }
        }
        Err("stream closed".into())
    })
    .await??;
    println!(
        "#commit frame ({frame} bytes) arrived {:?} after the write started",
        started.elapsed()
    );
    tokio::task::spawn_blocking(move || drop(net)).await?;
    Ok(())
}
