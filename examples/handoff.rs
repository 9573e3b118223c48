//! A handoff: a drafter takes a task, does half of it, and hands it to a reviewer with its
//! state (`agent.comms.handoff`); the reviewer continues from that state and writes the
//! result. The requester sees the lease move to the reviewer and gets the reviewer's result.
//!
//! ```sh
//! cargo run --example handoff                           # starts a local network
//! cargo run --example handoff -- PDS_A PDS_B PLC_URL    # existing hosts (sign-ups open)
//! ```

use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use murmur::{Job, TaskSpec, Worker};

mod support;
use support::Network;

fn main() -> ExitCode {
    support::run(2, handoff)
}

async fn handoff(net: &Network) -> Result<(), Box<dyn Error>> {
    let requester_w = net.account(0, "requester").await?;
    let drafter_w = net.account(0, "drafter").await?;
    let reviewer_w = net.account(1, "reviewer").await?;
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

    let start = |w, worker| net.agent(w, &peers).requester(false).worker(worker).start();
    let _drafter = start(drafter_w, drafter).await?;
    let _reviewer = start(reviewer_w, reviewer).await?;
    let requester = net.agent(requester_w, &peers).start().await?;

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
        "requester: result {} from {}",
        result.output_json(),
        result.worker
    );
    if result.worker != reviewer_did || result.output_json()["reviewed"] != true {
        return Err(format!("expected the reviewer's ({reviewer_did}) reviewed result").into());
    }
    println!("the reviewer answered the task the drafter was assigned");
    Ok(())
}
