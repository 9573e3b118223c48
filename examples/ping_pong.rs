//! Two agents on two PDS hosts play ping-pong with `agent.comms.message` records.
//!
//! ```sh
//! cargo run --example ping_pong                          # starts a local network
//! cargo run --example ping_pong -- PDS_A PDS_B PLC_URL   # alice on A, bob on B (sign-ups open)
//! ```
//!
//! Alice sends "ping 1" to Bob; Bob's handler answers "pong 1" as a reply; Alice's handler
//! sends the next ping, five rounds. Every message is a record in its author's repo, heard
//! by the other agent on the event stream of the other host.

use std::error::Error;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use murmur::comms::Message;
use murmur::comms::agent::comms::message;
use murmur::pds::Writer;
use murmur::{Author, Created, HandlerError, Record, State, handler};

mod support;
use support::Network;

const ROUNDS: u32 = 5;

fn main() -> ExitCode {
    support::run(2, play)
}

async fn play(net: &Network) -> Result<(), Box<dyn Error>> {
    let alice_w = net.account(0, "alice").await?;
    let bob_w = net.account(1, "bob").await?;
    let (alice_did, bob_did) = (alice_w.did().to_string(), bob_w.did().to_string());
    let peers = [alice_did.clone(), bob_did.clone()];

    // Bob answers every ping addressed to him with a pong that replies to it.
    let _bob = net
        .agent(bob_w.clone(), &peers)
        .state(Player {
            writer: bob_w,
            did: bob_did.clone(),
            done: None,
        })
        .handler(on_ping)
        .start()
        .await?;

    // Alice sends the next ping when a pong comes back, until the last round.
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    let alice = net
        .agent(alice_w.clone(), &peers)
        .state(Player {
            writer: alice_w,
            did: alice_did.clone(),
            done: Some(done_tx),
        })
        .handler(on_pong)
        .start()
        .await?;

    let started = Instant::now();
    alice.send(&bob_did, "ping 1").await?;
    println!("alice -> ping 1");
    tokio::time::timeout(Duration::from_secs(60), done_rx.recv())
        .await
        .map_err(|_| "no pong within 60 s: are both hosts' streams reachable?")?;
    println!(
        "{ROUNDS} rounds across 2 PDS hosts in {:.0} ms ({:.0} ms per round trip)",
        started.elapsed().as_secs_f64() * 1000.0,
        started.elapsed().as_secs_f64() * 1000.0 / f64::from(ROUNDS)
    );
    Ok(())
}

/// What a player's handlers read (`State<Player>`): its writer, its DID, and where Alice
/// reports the last round.
#[derive(Clone)]
struct Player {
    writer: Writer,
    did: String,
    done: Option<tokio::sync::mpsc::Sender<()>>,
}

/// Bob: every ping addressed to him gets a pong that replies to it.
#[handler]
async fn on_ping(
    ping: Created<Message>,
    from: Author,
    State(me): State<Player>,
) -> Result<(), HandlerError> {
    let text = ping.text.clone().unwrap_or_default();
    if !addressed_to(&ping, &me.did) || !text.starts_with("ping") {
        return Ok(());
    }
    println!("bob   <- {text:<8} from {}", from.0);
    reply(&me.writer, &from.0, &ping, text.replacen("ping", "pong", 1)).await
}

/// Alice: every pong addressed to her gets the next ping, until the last round.
#[handler]
async fn on_pong(
    pong: Created<Message>,
    from: Author,
    State(me): State<Player>,
) -> Result<(), HandlerError> {
    let text = pong.text.clone().unwrap_or_default();
    if !addressed_to(&pong, &me.did) || !text.starts_with("pong") {
        return Ok(());
    }
    println!("alice <- {text:<8} from {}", from.0);
    let round: u32 = text.get(5..).and_then(|n| n.parse().ok()).unwrap_or(ROUNDS);
    if round >= ROUNDS {
        if let Some(done) = &me.done {
            let _ = done.send(()).await;
        }
        return Ok(());
    }
    reply(&me.writer, &from.0, &pong, format!("ping {}", round + 1)).await
}

fn addressed_to(msg: &message::Record, did: &str) -> bool {
    msg.to
        .as_ref()
        .is_some_and(|to| to.iter().any(|d| d == did))
}

async fn reply(
    writer: &Writer,
    to: &str,
    msg: &Record<Message>,
    text: String,
) -> Result<(), HandlerError> {
    let record = message::RecordData {
        to: Some(vec![to.to_string()]),
        thread: None,
        reply_to: Some(msg.strong_ref()),
        text: Some(text),
        payload_type: None,
        payload: None,
        created_at: murmur::now(),
    }
    .into_record();
    writer
        .create::<Message>(&record)
        .await
        .map(|_| ())
        .map_err(HandlerError::retry)
}
