//! A pipeline across three PDS hosts: drafter (host A) -> reviewer (host B) -> publisher
//! (host C). An editor posts an `article` task; the drafter takes it, writes a draft (an
//! `agent.comms.message`) and hands the task to the reviewer (`agent.comms.handoff`). The
//! reviewer answers every draft with an `agent.comms.ack`: the first is rejected and the task
//! handed back, the drafter's revision replies to the rejection, the second is accepted and
//! the task handed to the publisher, whose result cites the approval. Every record cites the
//! one before it by strongRef; the program walks that chain back from the result, reading
//! each record with its proof from its author's repo, and prints it as a tree.
//!
//! ```sh
//! cargo run --example pipeline                                 # starts a local network
//! cargo run --example pipeline -- PDS_A PDS_B PDS_C PLC_URL    # existing hosts (sign-ups open)
//! ```

use std::collections::{BTreeSet, HashMap};
use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use murmur::comms::agent::comms::{ack, message};
use murmur::comms::{Ack, Message, Result as ResultRecord, Task, Validate};
use murmur::pds::{Cid, Collection, Writer};
use murmur::{Job, StrongRef, TaskSpec, Worker};
use serde_json::{Value, json};

mod support;
use support::Network;

fn main() -> ExitCode {
    support::run(3, pipeline)
}

async fn pipeline(net: &Network) -> Result<(), Box<dyn Error>> {
    let editor_w = net.account(0, "editor").await?;
    let drafter_w = net.account(0, "drafter").await?;
    let reviewer_w = net.account(1, "reviewer").await?;
    let publisher_w = net.account(2, "publisher").await?;
    let [editor, drafter, reviewer, publisher] =
        [&editor_w, &drafter_w, &reviewer_w, &publisher_w].map(|w| w.did().to_string());
    let peers = [&editor, &drafter, &reviewer, &publisher].map(|d| d.to_string());

    let (w, to) = (drafter_w.clone(), reviewer.clone());
    let drafts = Worker::new(move |job| write_draft(job, w.clone(), to.clone()));
    let (w, back, on) = (reviewer_w.clone(), drafter.clone(), publisher.clone());
    let reviews = Worker::new(move |job| review(job, w.clone(), back.clone(), on.clone()));
    let publishes = Worker::new(|job: Job| async move {
        let context = job.context.unwrap_or_default();
        println!("publisher: published {}", context["text"]);
        Ok(json!({ "text": context["text"], "approval": context["approval"] }))
    });
    let mut _agents = Vec::new();
    for (w, worker, does) in [
        (drafter_w, drafts, "article"),
        (reviewer_w, reviews, "review"),
        (publisher_w, publishes, "publish"),
    ] {
        let agent = net.agent(w, &peers).requester(false);
        _agents.push(agent.worker(worker.capabilities([does])).start().await?);
    }
    let editor_agent = net.agent(editor_w, &peers).start().await?;
    let task = TaskSpec::new("article").title("Agents that talk through their repos");
    let task = task.lease(Duration::from_secs(30));
    let result = editor_agent.request(task).await?;
    let result = result.await_result(Duration::from_secs(120)).await?;

    // Walk the chain back from the result, each record read from its author's repo.
    let names = [editor, drafter, reviewer, publisher.clone()];
    let names = names
        .into_iter()
        .zip(["editor", "drafter", "reviewer", "publisher"]);
    let mut chain = Chain {
        net,
        names: names.collect(),
        hosts: BTreeSet::new(),
        records: 0,
    };
    println!("\nthe chain, read back from the repos:");
    let done = chain
        .follow::<ResultRecord>((&result.uri, None), "")
        .await?;
    chain.follow::<Task>(cite(&done.task), "├─ ").await?;
    let approval = strong_ref(&serde_json::to_value(&done.output)?["approval"])?;
    let approval = chain.follow::<Ack>(cite(&approval), "└─ ").await?;
    let draft2 = chain
        .follow::<Message>(cite(&approval.subject), "   └─ ")
        .await?;
    let rejected = draft2
        .reply_to
        .as_ref()
        .ok_or("draft 2 replies to nothing")?;
    let rejection = chain.follow::<Ack>(cite(rejected), "      └─ ").await?;
    chain
        .follow::<Message>(cite(&rejection.subject), "         └─ ")
        .await?;

    let (records, hosts) = (chain.records, chain.hosts.len());
    println!("\n{records} records, all verified, on {hosts} PDS hosts");
    let states = (rejection.state.as_str(), approval.state.as_str());
    if result.worker != publisher || states != ("rejected", "accepted") || hosts < 3 {
        return Err("expected a rejection, an approval and a publication, on 3 hosts".into());
    }
    Ok(())
}

/// The records of the chain read so far: who wrote them, and on which hosts.
struct Chain<'a> {
    net: &'a Network,
    names: HashMap<String, &'static str>,
    hosts: BTreeSet<String>,
    records: usize,
}

impl Chain<'_> {
    /// Reads the record at `uri` from its author's repo, with its proof; checks that it is
    /// the version cited (`cid`), and prints it as a line of the tree after `indent`.
    async fn follow<C: Collection>(
        &mut self,
        (uri, cid): (&str, Option<&Cid>),
        indent: &str,
    ) -> Result<C::Record, Box<dyn Error>>
    where
        C::Record: Validate,
    {
        let path = uri.strip_prefix("at://").and_then(|p| p.split_once('/'));
        let (did, rkey) = path
            .and_then(|(did, p)| Some((did, p.strip_prefix(C::NSID)?.strip_prefix('/')?)))
            .ok_or_else(|| format!("{uri} is not the at-uri of a {}", C::NSID))?;
        let read = self.net.read::<C>(did, rkey).await?;
        let read = read.ok_or_else(|| format!("{uri} is not in its repo"))?;
        if cid.is_some_and(|cid| *cid != read.cid) {
            return Err(format!("{uri} changed since it was cited").into());
        }
        let value = serde_json::to_value(&read.record)?;
        let mut said: Vec<String> = ["taskType", "outcome", "state", "reason"]
            .iter()
            .filter_map(|k| Some(format!("{k} {:?}", value[k].as_str()?)))
            .collect();
        if let Some(text) = value["text"].as_str() {
            said.push(format!("text of {} words", text.split_whitespace().count()));
        }
        let host = self.net.hosts.iter().position(|h| *h == read.pds);
        let host = host.map_or(read.pds.clone(), |i| i.to_string());
        let who = self.names.get(did).copied().unwrap_or(did);
        println!(
            "{indent}{}/{rkey} by {who} (host {host}): {}",
            C::NSID,
            said.join(", ")
        );
        self.hosts.insert(read.pds);
        self.records += 1;
        Ok(read.record)
    }
}

fn cite(cited: &StrongRef) -> (&str, Option<&Cid>) {
    (&cited.uri, Some(cited.cid.as_ref()))
}

/// The drafter: writes a draft addressed to the reviewer (a revision replies to the review
/// that rejected the last one) and hands the task to the reviewer.
async fn write_draft(job: Job, me: Writer, reviewer: String) -> Result<Value, String> {
    let context = job.context.as_ref();
    let review = context.map(|c| strong_ref(&c["review"])).transpose()?;
    let (round, text) = if review.is_none() {
        (1, DRAFT_1)
    } else {
        (2, DRAFT_2)
    };
    let draft = message::RecordData {
        to: Some(vec![reviewer.clone()]),
        thread: None,
        reply_to: review,
        text: Some(text.into()),
        payload_type: None,
        payload: None,
        created_at: murmur::now(),
    }
    .into_record();
    let draft = me
        .create::<Message>(&draft)
        .await
        .map_err(|e| e.to_string())?;
    println!("drafter: draft {round} written, handed to the reviewer");
    let context = json!({ "round": round, "draft": draft.strong_ref(), "text": text });
    let handed = job
        .hand_off(&reviewer, format!("draft {round}"), context)
        .await;
    handed.map_err(|e| e.to_string())?;
    Ok(Value::Null)
}

const DRAFT_1: &str = "Agents write records to their own repos.";
const DRAFT_2: &str = "Agents write records to their own repos. Others hear them on the \
    event stream and check every commit. Nothing is lost: the repo is the source of truth.";

/// The reviewer: accepts a draft of three sentences or more, else rejects it (once) and
/// hands the task back to the drafter; an accepted draft goes on to the publisher.
async fn review(job: Job, me: Writer, drafter: String, publisher: String) -> Result<Value, String> {
    let context = job.context.clone().unwrap_or_default();
    let (draft, round) = (strong_ref(&context["draft"])?, context["round"].as_u64());
    let sentences = context["text"]
        .as_str()
        .unwrap_or_default()
        .split(". ")
        .count();
    let notes = (sentences < 3).then(|| format!("{sentences} sentence(s); say how others hear it"));
    if notes.is_some() && round != Some(1) {
        return Err("draft rejected a second time".into());
    }
    let verdict = ack::RecordData {
        subject: draft,
        state: if notes.is_some() {
            "rejected"
        } else {
            "accepted"
        }
        .into(),
        reason: Some(notes.clone().unwrap_or_else(|| "ready to publish".into())),
        created_at: murmur::now(),
    }
    .into_record();
    let verdict = me
        .create::<Ack>(&verdict)
        .await
        .map_err(|e| e.to_string())?;
    let handed = match notes {
        Some(notes) => {
            println!("reviewer: draft 1 rejected ({notes}), handed back");
            let context = json!({ "review": verdict.strong_ref() });
            job.hand_off(&drafter, "rejected", context).await
        }
        None => {
            println!(
                "reviewer: draft {} accepted, handed to the publisher",
                context["round"]
            );
            let context = json!({ "approval": verdict.strong_ref(), "text": context["text"] });
            job.hand_off(&publisher, "approved", context).await
        }
    };
    handed.map_err(|e| e.to_string())?;
    Ok(Value::Null)
}

fn strong_ref(value: &Value) -> Result<StrongRef, String> {
    serde_json::from_value(value.clone()).map_err(|e| format!("not a strongRef: {e}"))
}
