//! `murmur hub` as an OS process against the real local network and a real nats-server:
//! killed with SIGKILL mid-run while records are written and started again, it leaves every
//! op in the stream exactly once, and a bus consumer handles each once; its `--metrics`
//! endpoint serves the hub's metrics per source, with real values.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Lines, Reaper, create_record};
use murmur::comms::Message;
use murmur_bus::{BusMessage, BusSource, StartAt, StreamSettings};
use murmur_devnet::nats::NatsServer;
use murmur_devnet::{Account, Devnet};
use murmur_firehose::{Author, HandlerError, Record, Source, SubscribeRepos, Watcher};

const COLLECTION: &str = "agent.comms.message";
/// Messages each of the two accounts writes.
const MESSAGES: u64 = 30;

/// A free loopback address for `--metrics`.
fn free_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

struct HubProcess {
    child: Reaper,
    stderr: Lines,
    metrics: String,
}

fn start_hub(net: &Devnet, nats: &str, settings: &StreamSettings) -> HubProcess {
    let metrics = free_addr();
    let mut command = Command::new(env!("CARGO_BIN_EXE_murmur"));
    command.args(["hub", "--nats", nats, "--plc", net.plc_url()]);
    for host in net.pds_hosts() {
        command.args(["--pds", host.url()]);
    }
    let partitions = settings.partitions.to_string();
    command
        .args(["--stream", &settings.name, "--prefix", &settings.prefix])
        .args(["--partitions", &partitions, "--metrics", &metrics])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start murmur hub");
    let stderr = Lines::new(child.stderr.take().unwrap());
    HubProcess {
        child: Reaper(child),
        stderr,
        metrics,
    }
}

/// The hub's metrics page, or `None` while it does not answer.
async fn scrape(addr: &str) -> Option<String> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    response.text().await.ok()
}

/// The value of `name` for each `source` label in a Prometheus text page.
fn per_source(page: &str, name: &str) -> BTreeMap<String, f64> {
    let mut values = BTreeMap::new();
    for line in page.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let Some(labels) = rest.strip_prefix('{') else {
            continue;
        };
        let Some((labels, value)) = labels.split_once("} ") else {
            continue;
        };
        let Some(source) = labels
            .split(',')
            .find_map(|l| l.strip_prefix("source=\""))
            .and_then(|l| l.strip_suffix('"'))
        else {
            continue;
        };
        if let Ok(value) = value.trim().parse::<f64>() {
            values.insert(source.to_string(), value);
        }
    }
    values
}

/// The value of the unlabelled `name`.
fn plain(page: &str, name: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Polls the hub's metrics until `done` holds for the page; fails naming `what`.
async fn wait_metrics(hub: &mut HubProcess, what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(page) = scrape(&hub.metrics).await
            && done(&page)
        {
            return page;
        }
        if Instant::now() > deadline {
            let page = scrape(&hub.metrics).await.unwrap_or_default();
            hub.stderr.wait_until(Duration::from_millis(200), |_| false);
            panic!(
                "timed out waiting for {what}; metrics:\n{page}\nhub stderr:\n{}",
                hub.stderr.dump()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

type Seen = Arc<Mutex<Vec<(String, String)>>>;

fn counts(seen: &[(String, String)], did: &str) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for (d, text) in seen {
        if d == did {
            *counts.entry(text.clone()).or_default() += 1;
        }
    }
    counts
}

fn once_each(range: std::ops::Range<u64>) -> BTreeMap<String, usize> {
    range.map(|n| (format!("n {n}"), 1)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_killed_with_sigkill_and_restarted_publishes_each_op_once_and_serves_metrics() {
    let net = tokio::task::spawn_blocking(|| Devnet::shared().map_err(|e| e.to_string()))
        .await
        .unwrap()
        .unwrap();
    let server = tokio::task::spawn_blocking(|| NatsServer::start(Default::default()))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    let nats = server.url().to_string();
    let id = fastrand::u32(..);
    let settings = StreamSettings {
        name: format!("T_HUBCLI_{id:08x}"),
        prefix: format!("t{id:08x}"),
        partitions: 4,
        ..Default::default()
    };
    let sources: Vec<String> = net
        .pds_hosts()
        .iter()
        .map(|h| SubscribeRepos::new(h.url()).url().to_string())
        .collect();
    let alice = net
        .create_account(0, &net.unique_handle("hubclia"), "pw-1")
        .await
        .unwrap();
    let bob = net
        .create_account(1, &net.unique_handle("hubclib"), "pw-1")
        .await
        .unwrap();

    let mut first = start_hub(net, &nats, &settings);
    wait_metrics(
        &mut first,
        "the first hub to connect to both hosts",
        |page| plain(page, "murmur_hub_sources_connected") == Some(sources.len() as f64),
    )
    .await;

    // A bus consumer, in this process.
    let seen: Seen = Arc::default();
    let handled = Arc::clone(&seen);
    let watcher = Watcher::builder()
        .feed(
            BusSource::new(nats.clone(), "hubcli")
                .stream(settings.clone())
                .start_at(StartAt::All),
        )
        .plc_url(net.plc_url())
        .collections([COLLECTION])
        .handler(move |message: Record<Message>, from: Author| {
            let handled = Arc::clone(&handled);
            async move {
                let text = message.text.clone().unwrap_or_default();
                handled.lock().unwrap().push((from.0, text));
                Ok::<_, HandlerError>(())
            }
        })
        .build()
        .unwrap();
    let stop = watcher.shutdown_handle();
    let consumer = tokio::spawn(watcher.run());

    // Writes go on while the hub is killed and started again.
    let started = Instant::now();
    let write = |account: Account, first: u64| async move {
        for n in first..first + MESSAGES {
            create_record(&account, COLLECTION, &format!("n {n}")).await;
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    };
    let fault = async {
        // Killed once writes of both hosts went through it (so it is mid-run on both: a hub
        // started for the first time has no cursor of a host until the host's first event).
        let deadline = Instant::now() + Duration::from_secs(30);
        let through_both = || {
            let seen = seen.lock().unwrap();
            counts(&seen, &alice.did).len() >= 3 && counts(&seen, &bob.did).len() >= 3
        };
        while !through_both() {
            assert!(
                Instant::now() < deadline,
                "nothing came through the first hub; its stderr:\n{}",
                first.stderr.dump()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        first.child.0.kill().unwrap(); // SIGKILL
        first.child.0.wait().unwrap();
        eprintln!("hub killed after {:?}", started.elapsed());
        tokio::time::sleep(Duration::from_millis(500)).await;
        start_hub(net, &nats, &settings)
    };
    let (_, _, mut second) = tokio::join!(write(alice.clone(), 0), write(bob.clone(), 100), fault);
    eprintln!("writes done after {:?}", started.elapsed());

    let expected = 2 * MESSAGES as usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    let handled = |seen: &Seen| {
        let seen = seen.lock().unwrap();
        counts(&seen, &alice.did).len() + counts(&seen, &bob.did).len()
    };
    while handled(&seen) < expected {
        if Instant::now() > deadline {
            first
                .stderr
                .wait_until(Duration::from_millis(200), |_| false);
            second
                .stderr
                .wait_until(Duration::from_millis(200), |_| false);
            panic!(
                "not every message handled: {:?}\nfirst hub:\n{}\nrestarted hub:\n{}",
                seen.lock().unwrap(),
                first.stderr.dump(),
                second.stderr.dump()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("every message handled after {:?}", started.elapsed());
    // Time for a repeat to show (a republish, a redelivery).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen_now = seen.lock().unwrap().clone();
    assert_eq!(counts(&seen_now, &alice.did), once_each(0..MESSAGES));
    assert_eq!(counts(&seen_now, &bob.did), once_each(100..100 + MESSAGES));

    // In the stream: each op once, by message id and by record.
    let client = async_nats::connect(nats.as_str()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(&settings.name).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut ids = HashSet::new();
    let mut records: Vec<(String, String)> = Vec::new();
    for seq in 1..=last {
        let raw = stream.get_raw_message(seq).await.unwrap();
        let message = BusMessage::decode(&raw.payload).unwrap();
        assert!(
            ids.insert(message.msg_id()),
            "message id {} twice in the stream",
            message.msg_id()
        );
        if message
            .path
            .as_deref()
            .is_some_and(|p| p.starts_with(COLLECTION))
        {
            let record: serde_json::Value =
                serde_ipld_dagcbor::from_slice(message.record.as_deref().unwrap()).unwrap();
            records.push((message.did.clone(), record["text"].as_str().unwrap().into()));
        }
    }
    assert_eq!(counts(&records, &alice.did), once_each(0..MESSAGES));
    assert_eq!(counts(&records, &bob.did), once_each(100..100 + MESSAGES));

    // The restarted hub's metrics: per source, real values.
    let page = wait_metrics(
        &mut second,
        "the restarted hub's metrics of both sources",
        |page| {
            let published = per_source(page, "murmur_hub_published_total");
            let lag = per_source(page, "murmur_hub_seq_lag");
            sources
                .iter()
                .all(|s| published.get(s).is_some_and(|v| *v > 0.0) && lag.get(s) == Some(&0.0))
        },
    )
    .await;
    for source in &sources {
        let value = |name: &str| {
            per_source(&page, name)
                .get(source)
                .copied()
                .unwrap_or_else(|| panic!("no {name} for {source}:\n{page}"))
        };
        assert_eq!(value("murmur_hub_source_connected"), 1.0);
        assert!(value("murmur_hub_events_total") > 0.0);
        assert!(value("murmur_hub_cursor") > 0.0);
        assert_eq!(value("murmur_hub_rejected_total"), 0.0);
        let time_lag = value("murmur_hub_time_lag_seconds");
        assert!(
            (0.0..60.0).contains(&time_lag),
            "time lag {time_lag} s for {source}"
        );
    }
    assert_eq!(
        plain(&page, "murmur_hub_sources_connected"),
        Some(sources.len() as f64)
    );
    // The restarted hub found what the first had published already: duplicates, not copies.
    eprintln!(
        "restarted hub: published {:?}, duplicates {:?}",
        per_source(&page, "murmur_hub_published_total"),
        per_source(&page, "murmur_hub_duplicates_total")
    );

    stop.shutdown();
    tokio::time::timeout(Duration::from_secs(30), consumer)
        .await
        .expect("the consumer stops")
        .unwrap()
        .unwrap();
    // A graceful stop (SIGINT) ends the hub with success.
    let pid = second.child.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = second.child.0.wait().unwrap();
    assert!(
        status.success(),
        "hub exit {status}: {}",
        second.stderr.dump()
    );
}

/// `murmur hub --relay-addr ADDR` serves `subscribeRepos` at ADDR: a client replaying from
/// cursor 0 gets the PDS's signed commits of the records written, numbered by the hub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn murmur_hub_relay_addr_serves_subscribe_repos() {
    use futures_util::StreamExt;

    let net = tokio::task::spawn_blocking(|| Devnet::shared().map_err(|e| e.to_string()))
        .await
        .unwrap()
        .unwrap();
    let server = tokio::task::spawn_blocking(|| NatsServer::start(Default::default()))
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}"));
    let id = fastrand::u32(..);
    let relay = free_addr();
    let mut command = Command::new(env!("CARGO_BIN_EXE_murmur"));
    command
        .args(["hub", "--nats", server.url(), "--plc", net.plc_url()])
        .args(["--pds", net.pds(0).unwrap().url()])
        .args(["--stream", &format!("T_RELAYCLI_{id:08x}")])
        .args(["--prefix", &format!("t{id:08x}"), "--relay-addr", &relay])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command.spawn().expect("start murmur hub");
    let stderr = Lines::new(child.stderr.take().unwrap());
    let _child = Reaper(child);
    // Ready when it answers listHosts (and it is connected to its host).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hosts = reqwest::get(format!("http://{relay}/xrpc/com.atproto.sync.listHosts")).await;
        if let Ok(response) = hosts
            && let Ok(body) = response.text().await
            && body.contains("\"seq\"")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the relay did not come up: {}",
            stderr.dump()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let alice = net
        .create_account(0, &net.unique_handle("relaycli"), "pw-1")
        .await
        .unwrap();
    for n in 0..3 {
        create_record(&alice, COLLECTION, &format!("relay {n}")).await;
    }
    let url = format!("ws://{relay}/xrpc/com.atproto.sync.subscribeRepos?cursor=0");
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut commits = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // The account's first commit (no ops), then the three records.
    while commits.len() < 4 {
        let next = tokio::time::timeout_at(deadline, socket.next()).await;
        let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(bytes)))) = next else {
            panic!(
                "{} of 4 commits: {next:?}; hub: {}",
                commits.len(),
                stderr.dump()
            );
        };
        if let murmur_sync::Frame::Commit(commit) = murmur_sync::Frame::decode(&bytes).unwrap()
            && commit.repo == alice.did
        {
            commits.push(commit);
        }
    }
    assert!(commits[0].ops.is_empty(), "{:?}", commits[0].ops);
    assert!(
        commits[1..]
            .iter()
            .all(|c| c.ops.len() == 1 && c.ops[0].path.starts_with(COLLECTION))
    );
    assert!(
        commits
            .windows(2)
            .all(|w| w[0].seq < w[1].seq && w[1].since.as_deref() == Some(w[0].rev.as_str()))
    );
}

#[test]
fn hub_help_lists_its_metrics() {
    let out = Command::new(env!("CARGO_BIN_EXE_murmur"))
        .args(["hub", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for name in [
        "murmur_hub_published_total",
        "murmur_hub_seq_lag",
        "murmur_hub_time_lag_seconds",
        "murmur_hub_rejected_total",
        "source=",
    ] {
        assert!(help.contains(name), "{name} not in:\n{help}");
    }
}
