//! A handoff: a drafter takes a task, does half of it, and hands it to a reviewer with its
//! state (`agent.comms.handoff`); the reviewer continues from that state and writes the
//! result. The requester sees the lease move to the reviewer and gets the reviewer's result.
//!
//! ```sh
//! cargo run --example handoff                           # starts a local network
//! cargo run --example handoff -- PDS_A PDS_B PLC_URL    # existing hosts (sign-ups open)
//! ```

use std::time::Duration;

use murmur::{Agent, Job, TaskSpec, Worker};
use murmur_devnet::{Devnet, DevnetConfig};

#[path = "support/account.rs"]
mod account;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (_net, hosts, plc) = if let [a, b, plc] = args.as_slice() {
        (None, vec![a.clone(), b.clone()], plc.clone())
    } else {
        eprintln!("starting a local network (PLC + 2 PDS hosts)...");
        let net = Devnet::start(DevnetConfig {
            pds: 2,
            ..Default::default()
        })?;
        let hosts = net
            .pds_hosts()
            .iter()
            .map(|h| h.url().to_string())
            .collect();
        let plc = net.plc_url().to_string();
        (Some(net), hosts, plc)
    };
    tokio::runtime::Runtime::new()?.block_on(run(&hosts, &plc))
}

async fn run(hosts: &[String], plc: &str) -> Result<(), Box<dyn std::error::Error>> {
    let requester_w = account::account(&hosts[0], "requester").await?;
    let drafter_w = account::account(&hosts[0], "drafter").await?;
    let reviewer_w = account::account(&hosts[1], "reviewer").await?;
    let reviewer_did = reviewer_w.did().to_string();
    let peers = [&requester_w, &drafter_w, &reviewer_w].map(|w| w.did().to_string());

    // The drafter takes "translate" tasks, drafts, and hands the rest to the reviewer.
    let to = reviewer_did.clone();
    let drafter = Worker::new(move |job: Job| {
        let to = to.clone();
        async move {
            let text = job.payload_json()["text"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            let draft = format!("[fr] {text}");
            println!("drafter: drafted {draft:?}; handing off to {to}");
            job.hand_off(&to, "needs a review", serde_json::json!({ "draft": draft }))
                .await
                .map_err(|e| e.to_string())?;
            Ok(serde_json::Value::Null)
        }
    })
    .capabilities(["translate"]);
    // The reviewer claims nothing itself; it continues tasks handed to it.
    let reviewer = Worker::new(|job: Job| async move {
        let draft = job
            .context
            .as_ref()
            .and_then(|c| c["draft"].as_str())
            .unwrap_or_default()
            .to_string();
        println!("reviewer: continuing {} from {draft:?}", job.task_uri);
        tokio::time::sleep(Duration::from_millis(200)).await;
        Ok(serde_json::json!({ "text": draft.replace("[fr] hello", "bonjour"), "reviewed": true }))
    })
    .capabilities(["review"]);

    let start = |w, worker| {
        Agent::builder(w)
            .watch_all(hosts.iter().cloned())
            .plc_url(plc)
            .start_cursor(0)
            .peers(peers.clone())
            .requester(false)
            .worker(worker)
            .start()
    };
    let _drafter = start(drafter_w, drafter).await?;
    let _reviewer = start(reviewer_w, reviewer).await?;
    let requester = Agent::builder(requester_w)
        .watch_all(hosts.iter().cloned())
        .plc_url(plc)
        .start_cursor(0)
        .peers(peers.clone())
        .start()
        .await?;

    let result = requester
        .request(
            TaskSpec::new("translate")
                .payload(serde_json::json!({ "text": "hello world" }))
                .lease(Duration::from_secs(10)),
        )
        .await?
        .await_result(Duration::from_secs(60))
        .await?;
    println!(
        "requester: result {} from {}{}",
        result.output_json(),
        result.worker,
        if result.worker == reviewer_did {
            " (the reviewer)"
        } else {
            ""
        }
    );
    Ok(())
}
