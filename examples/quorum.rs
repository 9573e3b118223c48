//! A quorum vote: a proposer puts questions (`agent.comms.proposal`) to five agents; each
//! answers with an `agent.comms.vote` at the proposal's record key. The proposer closes a
//! vote with an `agent.comms.tally` as soon as the quorum is in, or at the deadline with the
//! votes cast by then. Two voters think slowly: the first question is decided by quorum
//! without them, the second fails for want of a quorum at its deadline. Then the program
//! recounts both from the repos alone (proposal, tally and each voter's vote, read with
//! their proofs) and compares.
//!
//! ```sh
//! cargo run --example quorum                           # starts a local network
//! cargo run --example quorum -- PDS_A PDS_B PLC_URL    # existing hosts (sign-ups open)
//! ```

use std::collections::BTreeSet;
use std::error::Error;
use std::process::ExitCode;
use std::time::Duration;

use chrono::SecondsFormat::Millis;

use murmur::comms::agent::comms::{proposal, tally, vote};
use murmur::comms::{Proposal, Tally, Vote};
use murmur::pds::{Cid, Collection, Writer};
use murmur::{Author, Created, HandlerError, Record, RecordRef, State, handler};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// How long the slow voters (the last two of five) think before each vote.
const SLOW: Duration = Duration::from_secs(4);
/// How long after a deadline the proposer waits for votes cast in time but still in flight.
const GRACE: Duration = Duration::from_secs(1);

mod support;
use support::Network;

fn main() -> ExitCode {
    support::run(2, quorum)
}

async fn quorum(net: &Network) -> Result<(), Box<dyn Error>> {
    let proposer = net.account(0, "proposer").await?;
    let mut voters = Vec::new();
    for i in 0..5 {
        voters.push(net.account(i + 1, &format!("voter{i}")).await?);
    }
    let dids: Vec<String> = voters.iter().map(|w| w.did().to_string()).collect();
    let peers = [&dids[..], &[proposer.did().to_string()]].concat();
    let mut _agents = Vec::new();
    for (index, writer) in voters.into_iter().enumerate() {
        let voter = net.agent(writer.clone(), &peers);
        let voter = voter.state(Voter { writer, index }).handler(on_proposal);
        _agents.push(voter.start().await?);
    }
    let (ballot_box, mut votes) = unbounded_channel();
    let agent = net.agent(proposer.clone(), &peers).state(ballot_box);
    _agents.push(agent.handler(on_vote).start().await?);

    let question = ("Adopt the v2 task lexicon?", &["yes", "no"][..], 3, 30);
    let adopt = put_to_vote(&proposer, &mut votes, &dids, question).await?;
    let question = ("Move the nightly batch?", &["yes", "no", "later"][..], 4, 3);
    let batch = put_to_vote(&proposer, &mut votes, &dids, question).await?;

    println!("\nrecount from the repos alone:");
    let adopt = recount(net, proposer.did(), &adopt).await?;
    let batch = recount(net, proposer.did(), &batch).await?;
    if (adopt.as_str(), batch.as_str()) != ("quorum: decided", "deadline: no-quorum") {
        return Err(format!("expected a decision by quorum, then none: {adopt}, {batch}").into());
    }
    println!("both tallies agree with the recount");
    Ok(())
}

/// A voter: it leans to option `index` (modulo the options); the last two think slowly.
#[derive(Clone)]
struct Voter {
    writer: Writer,
    index: usize,
}

/// Every voter hears every proposal; an entitled one votes once, at the proposal's key.
#[handler]
async fn on_proposal(
    proposal: Created<Proposal>,
    at: RecordRef,
    State(me): State<Voter>,
) -> Result<(), HandlerError> {
    let voted = me.writer.get::<Vote>(&at.rkey).await;
    if voted.map_err(HandlerError::retry)?.is_some()
        || !proposal.voters.iter().any(|v| v == me.writer.did())
    {
        return Ok(()); // voted already, or not entitled to
    }
    if me.index >= 3 {
        tokio::time::sleep(SLOW).await;
    }
    let choice = proposal.options[me.index % proposal.options.len()].clone();
    println!("voter{}: {choice} on {:?}", me.index, proposal.text);
    let vote = vote::RecordData {
        proposal: proposal.strong_ref(),
        choice,
        reason: None,
        created_at: murmur::now(),
    }
    .into_record();
    let written = me.writer.create_with_rkey::<Vote>(&at.rkey, &vote).await;
    written.map_err(HandlerError::retry)?;
    Ok(())
}

/// A vote heard by the proposer: the record key it sits at, its voter, the vote.
type Cast = (String, String, Record<Vote>);

/// The proposer's handler puts every vote it hears into the ballot box.
#[handler]
async fn on_vote(
    vote: Created<Vote>,
    voter: Author,
    at: RecordRef,
    State(ballot_box): State<UnboundedSender<Cast>>,
) -> Result<(), HandlerError> {
    let _ = ballot_box.send((at.rkey, voter.0, vote.into_record()));
    Ok(())
}

/// Puts a question (text, options, quorum, seconds to vote) to `voters` and counts each
/// voter's first valid vote as it arrives, until the quorum is in or the deadline passes
/// (plus a grace for votes cast in time but still in flight); then closes the vote with a
/// tally at the proposal's record key, which it returns.
async fn put_to_vote(
    me: &Writer,
    votes: &mut UnboundedReceiver<Cast>,
    voters: &[String],
    (text, options, quorum, secs): (&str, &[&str], i64, u64),
) -> Result<String, Box<dyn Error>> {
    let open_for = Duration::from_secs(secs);
    let proposal = proposal::RecordData {
        text: text.into(),
        options: options.iter().map(|o| o.to_string()).collect(),
        voters: voters.to_vec(),
        quorum,
        closes_at: (chrono::Utc::now() + open_for).to_rfc3339_opts(Millis, true),
        created_at: murmur::now(),
    }
    .into_record();
    let written = me.create::<Proposal>(&proposal).await?;
    println!(
        "proposer: {text:?} to {} voters, quorum {quorum}, {secs} s",
        voters.len()
    );
    let cited = written.strong_ref();
    let (mut counted, mut by) = (Vec::<(String, Record<Vote>)>::new(), "deadline");
    let deadline = tokio::time::Instant::now() + open_for + GRACE;
    while let Ok(Some((rkey, voter, vote))) = tokio::time::timeout_at(deadline, votes.recv()).await
    {
        let again = counted.iter().any(|(v, _)| *v == voter);
        let this = (cited.uri.as_str(), cited.cid.as_ref());
        if rkey != written.rkey || again || !valid(&proposal, this, &voter, &vote) {
            continue; // another vote, a second vote, or an invalid one
        }
        counted.push((voter, vote));
        println!("proposer: {} of {quorum} votes on {text:?}", counted.len());
        if counted.len() as i64 >= quorum {
            by = "quorum";
            break;
        }
    }
    let (counts, outcome, winner) = count(&proposal, counted.iter().map(|(_, v)| &*v.choice));
    let won = winner.as_deref().unwrap_or("-");
    println!("proposer: {text:?} closed by {by}: {outcome} {won}");
    let tally = tally::RecordData {
        proposal: cited,
        votes: counted.iter().map(|(_, vote)| vote.strong_ref()).collect(),
        counts,
        outcome,
        winner,
        closed_by: by.into(),
        created_at: murmur::now(),
    };
    me.create_with_rkey::<Tally>(&written.rkey, &tally.into_record())
        .await?;
    Ok(written.rkey)
}

/// Whether a vote counts: by an entitled voter, on this very version of the proposal, for
/// one of its options, cast by the deadline.
fn valid(p: &proposal::Record, (uri, cid): (&str, &Cid), voter: &str, v: &vote::Record) -> bool {
    let time = |t: &str| chrono::DateTime::parse_from_rfc3339(t).ok();
    let in_time = matches!((time(&v.created_at), time(&p.closes_at)), (Some(a), Some(b)) if a <= b);
    p.voters.iter().any(|d| d == voter)
        && (v.proposal.uri.as_str(), v.proposal.cid.as_ref()) == (uri, cid)
        && p.options.contains(&v.choice)
        && in_time
}

/// Votes per option, the outcome and the winner, from the choices counted.
fn count<'a>(
    p: &proposal::Record,
    choices: impl Iterator<Item = &'a str> + Clone,
) -> (Vec<tally::Count>, String, Option<String>) {
    let votes = |o: &String| choices.clone().filter(|c| c == o).count() as i64;
    let counts: Vec<(String, i64)> = p.options.iter().map(|o| (o.clone(), votes(o))).collect();
    let most = counts.iter().map(|c| c.1).max().unwrap_or(0);
    let mut leaders = counts.iter().filter(|c| c.1 == most);
    let (outcome, winner) = match (leaders.next(), leaders.next()) {
        _ if counts.iter().map(|c| c.1).sum::<i64>() < p.quorum => ("no-quorum", None),
        (Some(one), None) => ("decided", Some(one.0.clone())),
        _ => ("tie", None),
    };
    let counts = counts
        .into_iter()
        .map(|(option, votes)| tally::CountData { option, votes });
    (counts.map(Into::into).collect(), outcome.into(), winner)
}

/// Recounts a proposal from the repos: its tally and each entitled voter's vote, read with
/// their proofs. A deadline close must count every valid vote; a quorum close, the first
/// ones in. Returns how it closed (`quorum: decided`), or why the tally is wrong.
async fn recount(net: &Network, proposer: &str, rkey: &str) -> Result<String, Box<dyn Error>> {
    let proposal = net.read::<Proposal>(proposer, rkey).await?;
    let proposal = proposal.ok_or("no proposal")?;
    let tally = net.read::<Tally>(proposer, rkey).await?;
    let tally = tally.ok_or("the vote is still open")?.record;
    let (p, uri) = (
        proposal.record,
        format!("at://{proposer}/{}/{rkey}", Proposal::NSID),
    );
    let key = |uri: &str, cid: &Cid| format!("{uri} {cid}");
    let listed = tally.votes.iter().map(|v| key(&v.uri, v.cid.as_ref()));
    let listed: BTreeSet<String> = listed.collect();
    let (mut counted, mut choices, mut late) = (BTreeSet::new(), Vec::new(), 0);
    for voter in &p.voters {
        let Some(vote) = net.read::<Vote>(voter, rkey).await? else {
            continue;
        };
        let vote_key = key(&format!("at://{voter}/{}/{rkey}", Vote::NSID), &vote.cid);
        let first_in = listed.contains(&vote_key) || tally.closed_by == "deadline";
        if valid(&p, (&uri, &proposal.cid), voter, &vote.record) && first_in {
            counted.insert(vote_key);
            choices.push(vote.record.choice.clone());
        } else {
            late += 1;
        }
    }
    let (counts, outcome, winner) = count(&p, choices.iter().map(String::as_str));
    let shown = counts.iter().map(|c| format!("{} {}, ", c.option, c.votes));
    let (shown, won) = (shown.collect::<String>(), winner.as_deref().unwrap_or("-"));
    println!(
        "  {:?}: {shown}{late} not counted -> {outcome} {won}",
        p.text
    );
    let same = serde_json::to_value(&counts)? == serde_json::to_value(&tally.counts)?
        && (outcome, winner) == (tally.outcome.clone(), tally.winner.clone());
    if counted != listed || !same {
        return Err(format!("the tally of {:?} disagrees with the recount", p.text).into());
    }
    Ok(format!("{}: {}", tally.closed_by, tally.outcome))
}
