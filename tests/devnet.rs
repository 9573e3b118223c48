//! The local network itself and a walking skeleton through it: a record written with plain
//! createRecord arrives as a `#commit` frame on the PDS's subscribeRepos stream.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use murmur_devnet::{Devnet, DevnetConfig};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

fn shared() -> &'static Devnet {
    Devnet::shared().unwrap_or_else(|e| panic!("{e}"))
}

async fn health(url: &str) -> bool {
    reqwest::get(format!("{url}/xrpc/_health"))
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// Splits an event-stream frame into its header and body (two DAG-CBOR values back to back).
fn decode_frame(bytes: &[u8]) -> (Value, ipld_core::ipld::Ipld) {
    let mut rest = bytes;
    let header: ipld_core::ipld::Ipld =
        serde_ipld_dagcbor::de::from_reader_once(&mut rest).expect("frame header");
    let body: ipld_core::ipld::Ipld = serde_ipld_dagcbor::from_slice(rest).expect("frame body");
    let header = match header {
        ipld_core::ipld::Ipld::Map(m) => json!({
            "op": match m.get("op") { Some(ipld_core::ipld::Ipld::Integer(i)) => *i as i64, _ => 0 },
            "t": match m.get("t") { Some(ipld_core::ipld::Ipld::String(s)) => s.clone(), _ => String::new() },
        }),
        other => panic!("header is not a map: {other:?}"),
    };
    (header, body)
}

fn op_paths(body: &ipld_core::ipld::Ipld) -> Vec<String> {
    let ipld_core::ipld::Ipld::Map(m) = body else {
        return vec![];
    };
    let Some(ipld_core::ipld::Ipld::List(ops)) = m.get("ops") else {
        return vec![];
    };
    ops.iter()
        .filter_map(|op| match op {
            ipld_core::ipld::Ipld::Map(op) => match op.get("path") {
                Some(ipld_core::ipld::Ipld::String(p)) => Some(p.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn created_record_arrives_on_subscribe_repos_within_2s() {
    let net = shared();
    let pds = net.pds(0).unwrap();
    let alice = net
        .create_account(0, &net.unique_handle("alice"), "alice-pass")
        .await
        .unwrap();

    let ws_url = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos",
        pds.url().replacen("http", "ws", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(ws_url).await.unwrap();

    let started = Instant::now();
    let response: Value = reqwest::Client::new()
        .post(format!("{}/xrpc/com.atproto.repo.createRecord", pds.url()))
        .bearer_auth(&alice.access_jwt)
        .json(&json!({
            "repo": alice.did,
            "collection": "agent.comms.message",
            "record": {
                "$type": "agent.comms.message",
                "text": "hello from the walking skeleton",
                "createdAt": "2026-11-23T12:00:00.000Z",
            },
        }))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    let uri = response["uri"].as_str().unwrap();
    let rkey = uri.rsplit('/').next().unwrap();
    let path = format!("agent.comms.message/{rkey}");

    let seen = tokio::time::timeout(Duration::from_secs(2), async {
        while let Some(msg) = socket.next().await {
            let Message::Binary(bytes) = msg.unwrap() else {
                continue;
            };
            let (header, body) = decode_frame(&bytes);
            if header["t"] == "#commit" && op_paths(&body).contains(&path) {
                return started.elapsed();
            }
        }
        panic!("stream closed before the commit arrived");
    })
    .await
    .unwrap_or_else(|_| panic!("no #commit frame with {path} within 2 s"));
    eprintln!("commit frame for {path} arrived {seen:?} after createRecord started");
}

#[tokio::test]
async fn account_on_second_pds_resolves_through_plc_to_that_pds() {
    let net = shared();
    let bob = net
        .create_account(1, &net.unique_handle("bob"), "bob-pass")
        .await
        .unwrap();
    assert_eq!(bob.pds_url, net.pds(1).unwrap().url());

    let doc: Value = reqwest::get(format!("{}/{}", net.plc_url(), bob.did))
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(doc["id"], bob.did.as_str());
    let endpoint = doc["service"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "#atproto_pds")
        .map(|s| s["serviceEndpoint"].as_str().unwrap().to_string());
    assert_eq!(endpoint.as_deref(), Some(net.pds(1).unwrap().url()));
    assert_ne!(net.pds(0).unwrap().url(), net.pds(1).unwrap().url());
}

#[tokio::test]
async fn unknown_pds_index_is_a_typed_error() {
    let net = shared();
    let err = net.create_account(7, "x.test", "pw").await.unwrap_err();
    assert!(
        matches!(
            err,
            murmur_devnet::DevnetError::NoSuchPds { index: 7, count: 2 }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn pds_stops_and_starts_again_on_same_data_and_port() {
    let net = tokio::task::spawn_blocking(|| Devnet::start(DevnetConfig::default()))
        .await
        .unwrap()
        .unwrap();
    let carol = net
        .create_account(0, &net.unique_handle("carol"), "carol-pass")
        .await
        .unwrap();
    let url = net.pds(0).unwrap().url().to_string();
    assert!(health(&url).await);

    let net = tokio::task::spawn_blocking(move || {
        net.pds(0).unwrap().stop();
        net
    })
    .await
    .unwrap();
    assert!(!net.pds(0).unwrap().is_running());
    assert!(!health(&url).await, "PDS still answers after stop");

    let net = tokio::task::spawn_blocking(move || net.pds(0).unwrap().start().map(|()| net))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(net.pds(0).unwrap().url(), url);
    assert!(health(&url).await);

    // The account survived the restart: its password still opens a session.
    let session: Value = reqwest::Client::new()
        .post(format!("{url}/xrpc/com.atproto.server.createSession"))
        .json(&json!({ "identifier": carol.handle, "password": "carol-pass" }))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(session["did"], carol.did.as_str());

    let plc = net.plc_url().to_string();
    tokio::task::spawn_blocking(move || drop(net))
        .await
        .unwrap();
    assert!(
        !health(&url).await,
        "PDS still answers after the network was dropped"
    );
    assert!(
        reqwest::get(&plc).await.is_err(),
        "PLC still answers after drop"
    );
}
