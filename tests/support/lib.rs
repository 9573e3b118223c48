//! Shared support for the workspace end-to-end tests: the fixture collection
//! `test.murmur.note`, the shared local network, waiting on what a test can observe, and
//! the NATS server and streams of the bus and relay tests ([`nats`]).

use std::time::{Duration, Instant};

use atrium_api::types::Collection;
use murmur_devnet::{Account, Devnet};
use murmur_lexicon::{Validate, ValidationError};
use serde::{Deserialize, Serialize};

/// The fixture collection `test.murmur.note`: tests exercise the watcher alone with it.
#[derive(Debug)]
pub struct Note;

/// A `test.murmur.note` record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NoteRecord {
    /// Free text; `INVALID…` breaks the fixture lexicon.
    pub text: String,
    /// Its number in the test's sequence.
    pub n: u64,
    /// RFC 3339.
    pub created_at: String,
}

impl Collection for Note {
    const NSID: &'static str = "test.murmur.note";
    type Record = NoteRecord;
}

impl Validate for NoteRecord {
    fn validate(&self) -> Result<(), ValidationError> {
        if self.text.starts_with("INVALID") {
            return Err(ValidationError {
                path: "$.text".into(),
                message: "must not start with INVALID".into(),
            });
        }
        Ok(())
    }
}

/// Note number `n`.
pub fn note(n: u64) -> NoteRecord {
    NoteRecord {
        text: format!("note {n}"),
        n,
        created_at: "2026-11-23T12:00:00.000Z".into(),
    }
}

/// The test binary's shared 2-PDS network (started on first use).
pub async fn shared() -> &'static Devnet {
    tokio::task::spawn_blocking(|| Devnet::shared().unwrap_or_else(|e| panic!("{e}")))
        .await
        .expect("the devnet start-up task")
}

/// A new account on PDS `pds` of `net` (handle from `name`, password `password-1`) and a
/// writer logged in to it.
pub async fn account(net: &Devnet, pds: usize, name: &str) -> (Account, murmur_pds::Writer) {
    let account = net
        .create_account(pds, &net.unique_handle(name), "password-1")
        .await
        .unwrap();
    let writer = murmur_pds::Writer::login(&account.pds_url, &account.did, "password-1")
        .await
        .unwrap();
    (account, writer)
}

/// A writer logged in to a new account on PDS `pds` of `net` (see [`account`]).
pub async fn writer(net: &Devnet, pds: usize, name: &str) -> murmur_pds::Writer {
    account(net, pds, name).await.1
}

/// Every record of `C` in `writer`'s repo.
pub async fn list_all<C: murmur_pds::Collection>(
    writer: &murmur_pds::Writer,
) -> Vec<murmur_pds::Stored<C::Record>> {
    let mut out = Vec::new();
    let mut cursor = None;
    loop {
        let page = writer
            .list::<C>(100, cursor.as_deref(), false)
            .await
            .unwrap();
        out.extend(page.records);
        match page.cursor {
            Some(c) if !out.is_empty() => cursor = Some(c),
            _ => return out,
        }
    }
}

/// The base URLs of the network's two PDS hosts.
pub fn hosts(net: &Devnet) -> Vec<String> {
    (0..2)
        .map(|i| net.pds(i).unwrap().url().to_string())
        .collect()
}

/// Polls `done` until it holds; fails the test naming `what` after `timeout`.
pub async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls XRPC procedure `method` on the account's PDS with its access token (a JSON body, or
/// none), and fails the test unless the PDS answers with success.
pub async fn account_xrpc(account: &Account, method: &str, body: Option<serde_json::Value>) {
    let mut request = reqwest::Client::new()
        .post(format!("{}/xrpc/{method}", account.pds_url))
        .bearer_auth(&account.access_jwt);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    assert!(
        status.is_success(),
        "{method}: {status} {}",
        response.text().await.unwrap_or_default()
    );
}

/// Small helpers the benchmarks share: reading settings, summarising samples, CPU time.
pub mod bench {
    /// `$name` parsed, or `default` when it is unset or unparsable.
    pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    /// The `p` quantile (0..=1) of sorted samples, nearest rank; NaN when there are none.
    pub fn percentile(sorted: &[f64], p: f64) -> f64 {
        if sorted.is_empty() {
            return f64::NAN;
        }
        let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
        sorted[i.min(sorted.len() - 1)]
    }

    /// Prints `name`'s p50 and p99 in milliseconds and returns the p50.
    pub fn latency_line(name: &str, ms: &[f64]) -> f64 {
        let mut sorted = ms.to_vec();
        sorted.sort_by(f64::total_cmp);
        let p50 = percentile(&sorted, 0.5);
        println!(
            "  {name:<36} p50 {p50:>7.3} ms   p99 {:>7.3} ms   (n={})",
            percentile(&sorted, 0.99),
            sorted.len()
        );
        p50
    }

    /// The smallest and the median of several rounds' figures.
    pub fn min_median(values: &[f64]) -> (f64, f64) {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        (
            sorted.first().copied().unwrap_or(f64::NAN),
            percentile(&sorted, 0.5),
        )
    }
}

/// Runs an ES module `script` under the local network's Node install (in its directory, so
/// its pinned npm packages resolve), with `input` as JSON on stdin; panics with node's
/// stderr if it fails, and returns its stdout.
pub fn run_node_script(
    install: &murmur_devnet::NodeInstall,
    script: &str,
    input: &serde_json::Value,
) -> Vec<u8> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut child = Command::new(&install.node)
        .current_dir(&install.dir)
        .args(["--input-type=module", "-e", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start node");
    child
        .stdin
        .take()
        .expect("node's stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write node's input");
    let out = child.wait_with_output().expect("node's output");
    assert!(
        out.status.success(),
        "node failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// NATS for the bus and relay tests: one nats-server per test binary, and a stream of each
/// test's own.
pub mod nats {
    use murmur_bus::StreamSettings;

    /// The test binary's NATS server: `MURMUR_TEST_NATS`, or murmur-devnet's pinned
    /// nats-server on a free loopback port, started once and dying with the process.
    pub fn url() -> String {
        static SERVER: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        SERVER
            .get_or_init(|| {
                if let Ok(url) = std::env::var("MURMUR_TEST_NATS") {
                    return url;
                }
                let server = Box::leak(Box::new(
                    murmur_devnet::nats::NatsServer::start(Default::default())
                        .unwrap_or_else(|e| panic!("{e}")),
                ));
                server.url().to_string()
            })
            .clone()
    }

    /// A stream and subject prefix of the test's own (`tag` names it in the stream's name).
    pub fn settings(tag: &str) -> StreamSettings {
        let id = fastrand::u32(..);
        StreamSettings {
            name: format!("T_{}_{id:08x}", tag.to_uppercase()),
            prefix: format!("t{id:08x}"),
            partitions: 4,
            ..Default::default()
        }
    }

    /// Deletes a test's streams and bucket on the test binary's server (best effort: the
    /// server dies with the test binary anyway).
    pub async fn cleanup(settings: &StreamSettings) {
        let client = async_nats::connect(url()).await.unwrap();
        let _ = murmur_bus::delete_streams(&async_nats::jetstream::new(client), settings).await;
    }

    /// The URLs of a comma-separated server list, for `async_nats::connect`.
    pub fn servers(nats: &str) -> Vec<String> {
        nats.split(',').map(str::to_string).collect()
    }

    /// A hub running on a task ([`start_hub`]).
    pub struct RunningHub {
        /// Where its relay listens, when it serves one.
        pub relay: Option<std::net::SocketAddr>,
        /// The relay's counters, when it serves one.
        pub relay_stats: Option<std::sync::Arc<murmur_bus::RelayStats>>,
        /// Where its Jetstream listens, when it serves one.
        pub jetstream: Option<std::net::SocketAddr>,
        /// The task running it.
        pub task: tokio::task::JoinHandle<()>,
    }

    /// A hub over every PDS host of `net` on the test binary's NATS with the stream
    /// `settings`, further configured by `configure` (a relay, Jetstream), running once it is
    /// connected to every host.
    pub async fn start_hub(
        net: &murmur_devnet::Devnet,
        settings: &StreamSettings,
        configure: impl FnOnce(murmur_bus::HubBuilder) -> murmur_bus::HubBuilder,
    ) -> RunningHub {
        let mut builder = murmur_bus::Hub::builder()
            .nats(url())
            .plc_url(net.plc_url())
            .stream(settings.clone());
        for host in net.pds_hosts() {
            builder = builder.pds(host.url());
        }
        let hub = configure(builder).build().await.unwrap();
        let running = (hub.relay_addr(), hub.relay_stats(), hub.jetstream_addr());
        let metrics = hub.watcher_metrics();
        let task = tokio::spawn(async move { hub.run().await.unwrap() });
        let hosts = net.pds_hosts().len() as u64;
        crate::wait_for(
            "the hub to connect to every host",
            std::time::Duration::from_secs(30),
            || metrics.snapshot().sources_connected >= hosts,
        )
        .await;
        RunningHub {
            relay: running.0,
            relay_stats: running.1,
            jetstream: running.2,
            task,
        }
    }
}
