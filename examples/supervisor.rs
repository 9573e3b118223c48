//! A supervisor: three workers and a standby publish their presence every second, valid for
//! three (`agent.comms.presence`). The supervisor gives each worker a role (a task only that
//! worker may claim) and watches the presence of the role holders. One worker is killed in
//! the middle of its role: it writes nothing more, its presence lapses, the supervisor
//! notices and gives the role to the standby, and the run finishes.
//!
//! ```sh
//! cargo run --example supervisor                           # starts a local network
//! cargo run --example supervisor -- PDS_A PDS_B PLC_URL    # existing hosts (sign-ups open)
//! ```

use std::collections::{BTreeMap, HashMap};
use std::error::Error;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use murmur::comms::Presence;
use murmur::{
    Agent, AgentError, Author, HandlerError, Job, Record, State, TaskResult, TaskSpec, Worker,
    handler,
};
use serde_json::json;
use tokio::sync::mpsc;

mod support;
use support::Network;

const NAMES: [&str; 4] = ["worker0", "worker1", "worker2", "standby"];
const ROLES: [&str; 3] = ["ingest", "index", "report"];
const STEPS: u64 = 8;
/// Presence is rewritten this often and stays valid three times as long.
const PRESENCE: Duration = Duration::from_secs(1);

type Done = mpsc::Sender<(&'static str, Result<TaskResult, AgentError>)>;

fn main() -> ExitCode {
    support::run(2, supervise)
}

async fn supervise(net: &Network) -> Result<(), Box<dyn Error>> {
    let supervisor_w = net.account(0, "supervisor").await?;
    let mut writers = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        writers.push(net.account(i, name).await?);
    }
    let dids: Vec<String> = writers.iter().map(|w| w.did().to_string()).collect();
    let mut peers = dids.clone();
    peers.push(supervisor_w.did().to_string());

    // Each worker plays whatever role it is given, step by step.
    let progress: Arc<Mutex<HashMap<&str, u64>>> = Arc::default();
    let mut agents = Vec::new();
    for (writer, name) in writers.into_iter().zip(NAMES) {
        let progress = progress.clone();
        let play = Worker::new(move |job: Job| {
            let progress = progress.clone();
            async move {
                let role = job.payload_json()["role"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string();
                for step in 1..=STEPS {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    println!("{name}: {role} step {step}/{STEPS}");
                    lock(&progress).insert(name, step);
                }
                Ok(json!({ "role": role, "steps": STEPS }))
            }
        });
        let agent = net
            .agent(writer, &peers)
            .requester(false)
            .presence_every(PRESENCE);
        agents.push(agent.worker(play.capabilities(["role"])).start().await?);
    }
    let names: HashMap<String, &str> = dids.iter().cloned().zip(NAMES).collect();
    let seen = Presences {
        names: Arc::new(names.clone()),
        last: Arc::default(),
    };
    let supervisor = net
        .agent(supervisor_w, &peers)
        .state(seen)
        .handler(on_presence)
        .start()
        .await?;
    let everyone = async {
        while supervisor.registry().live().len() < NAMES.len() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), everyone).await?;

    let (done_tx, mut done) = mpsc::channel(8);
    let mut holders: BTreeMap<&str, String> = BTreeMap::new();
    for (role, did) in ROLES.into_iter().zip(&dids) {
        assign(&supervisor, role, did, &names, &done_tx).await?;
        holders.insert(role, did.clone());
    }

    // Kill worker1 in the middle of its role: from now on it writes nothing, presence included.
    let mid_role = async {
        while lock(&progress).get("worker1").copied().unwrap_or(0) < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), mid_role).await?;
    agents[1].kill();
    let killed = Instant::now();
    println!("** killed worker1 mid-role");

    let standby = &dids[3];
    let (mut finished, mut noticed) = (BTreeMap::new(), None);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let give_up = tokio::time::sleep(Duration::from_secs(60));
    tokio::pin!(give_up);
    while finished.len() < ROLES.len() {
        tokio::select! {
            Some((role, result)) = done.recv() => match result {
                Ok(r) if holders[role] == r.worker => {
                    println!("supervisor: {role} done by {}", names[&r.worker]);
                    finished.insert(role, names[&r.worker]);
                }
                _ => {} // the attempt of a holder that was replaced
            },
            _ = tick.tick() => {
                for (role, holder) in holders.iter_mut() {
                    let info = supervisor.registry().get(holder);
                    let live = info.is_some_and(|a| a.is_live_at(SystemTime::now()));
                    if !live && !finished.contains_key(role) && holder != standby {
                        noticed = Some(killed.elapsed());
                        let name = names[holder.as_str()];
                        println!("supervisor: {name}'s presence lapsed; {role} to the standby");
                        assign(&supervisor, role, standby, &names, &done_tx).await?;
                        holder.clone_from(standby);
                    }
                }
            },
            () = &mut give_up => return Err("the run did not finish within 60 s".into()),
        }
    }

    println!("\nsummary: every role done: {finished:?}");
    let noticed = noticed.ok_or("worker1's lapse was never noticed")?;
    println!(
        "worker1's lapse noticed {:.1} s after the kill (presence valid {} s)",
        noticed.as_secs_f64(),
        (PRESENCE * 3).as_secs()
    );
    if finished.get("index") != Some(&"standby") || noticed > PRESENCE * 3 + Duration::from_secs(3)
    {
        return Err("expected the standby to finish worker1's role, after a prompt notice".into());
    }
    Ok(())
}

/// Gives `role` to `worker`: a task only it may claim. Its lease is long (a role is long
/// work): presence, not the lease, tells the supervisor that the holder is gone.
async fn assign(
    supervisor: &Agent,
    role: &'static str,
    worker: &str,
    names: &HashMap<String, &str>,
    done: &Done,
) -> Result<(), AgentError> {
    let spec = TaskSpec::new("role")
        .assignee(worker)
        .payload(json!({ "role": role }))
        .lease(Duration::from_secs(60))
        .max_attempts(1);
    let handle = supervisor.request(spec).await?;
    println!(
        "supervisor: {role} -> {}",
        names.get(worker).copied().unwrap_or(worker)
    );
    let done = done.clone();
    tokio::spawn(async move {
        let _ = done
            .send((role, handle.await_result(Duration::from_secs(90)).await))
            .await;
    });
    Ok(())
}

/// The supervisor's presence handler state: agent names, and each agent's last state.
#[derive(Clone)]
struct Presences {
    names: Arc<HashMap<String, &'static str>>,
    last: Arc<Mutex<HashMap<String, String>>>,
}

/// Prints an agent's presence when its state changes (the agent's registry keeps the rest).
#[handler]
async fn on_presence(
    presence: Record<Presence>,
    from: Author,
    State(seen): State<Presences>,
) -> Result<(), HandlerError> {
    let before = lock(&seen.last).insert(from.0.clone(), presence.state.clone());
    if before.as_deref() != Some(presence.state.as_str()) {
        let name = seen.names.get(&from.0).copied().unwrap_or("?");
        println!(
            "presence: {name} {} (valid {} s)",
            presence.state, presence.ttl_seconds
        );
    }
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
