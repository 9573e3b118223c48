//! Real nats-server processes with JetStream: a standalone server killed with SIGKILL and
//! restarted keeps its streams; a 3-node cluster keeps an R3 stream writable while a node is
//! down; servers die with the process that started them. Nothing is mocked: every test
//! talks to its own server through the official client (async-nats).

use std::future::Future;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use futures_util::StreamExt;
use murmur_devnet::DevnetError;
use murmur_devnet::nats::{
    MIN_NATS_SERVER, NatsBinary, NatsCluster, NatsConfig, NatsOrigin, NatsServer,
    PINNED_NATS_SERVER,
};

/// Fails the test instead of hanging when a server stops answering.
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 20 s"))
}

async fn connect(urls: Vec<String>) -> jetstream::Context {
    let client = within("connect", async_nats::connect(urls))
        .await
        .expect("connect to the local nats-server");
    jetstream::new(client)
}

/// Publishes through JetStream and waits for the stream's ack; returns the sequence.
async fn publish(js: &jetstream::Context, subject: &str, payload: &'static str) -> u64 {
    let ack = within("publish", async {
        js.publish(subject.to_string(), payload.into())
            .await
            .expect("send")
            .await
            .expect("ack")
    })
    .await;
    ack.sequence
}

/// Publishes with a message id until the stream stores it (a cluster electing a stream leader
/// refuses publishes for a moment); fails the test after 20 s. Returns (sequence, attempts).
async fn publish_until_stored(
    js: &jetstream::Context,
    subject: &str,
    payload: &'static str,
    id: &str,
) -> (u64, u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let message = PublishMessage::build()
            .payload(payload.into())
            .message_id(id);
        let sent = tokio::time::timeout(Duration::from_secs(2), async {
            js.send_publish(subject.to_string(), message).await?.await
        })
        .await;
        match sent {
            Ok(Ok(ack)) => return (ack.sequence, attempts),
            Ok(Err(e)) => assert!(Instant::now() < deadline, "publish failed: {e}"),
            Err(_) => assert!(Instant::now() < deadline, "publish timed out"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads up to `n` messages from the start of the stream with a new durable pull consumer.
async fn read_all(stream: &stream::Stream, durable: &str, n: usize) -> Vec<String> {
    let consumer = within(
        "create consumer",
        stream.create_consumer(consumer::pull::Config {
            durable_name: Some(durable.into()),
            ..Default::default()
        }),
    )
    .await
    .expect("create consumer");
    let mut batch = within(
        "fetch",
        consumer
            .fetch()
            .max_messages(n)
            .expires(Duration::from_secs(2))
            .messages(),
    )
    .await
    .expect("fetch");
    let mut got = Vec::new();
    while let Some(message) = within("next message", batch.next()).await {
        let message = message.expect("message");
        got.push(String::from_utf8_lossy(&message.payload).into_owned());
        within("ack", message.double_ack()).await.expect("ack");
    }
    got
}

fn port_is_closed(port: u16) -> bool {
    TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_err()
}

#[test]
fn the_default_server_is_new_enough_and_reports_its_version() {
    let binary = NatsBinary::find().unwrap();
    // $MURMUR_NATS_SERVER may name any version on purpose; otherwise find() settles for
    // nothing older than MIN_NATS_SERVER.
    assert!(
        binary.origin == NatsOrigin::Env || binary.version >= MIN_NATS_SERVER,
        "{} is {}, older than {MIN_NATS_SERVER}",
        binary.path.display(),
        binary.version
    );
    if binary.origin == NatsOrigin::Pinned {
        assert_eq!(binary.version.to_string(), PINNED_NATS_SERVER);
    }
    // The pinned release is there (installed on first use), whatever find() chose.
    let pinned = NatsBinary::pinned().unwrap();
    assert_eq!(pinned.origin, NatsOrigin::Pinned);
    assert_eq!(pinned.version.to_string(), PINNED_NATS_SERVER);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_with_sigkill_restarts_with_its_streams() {
    // Started from a thread that ends at once: the server must outlive it (it is tied to the
    // life of the process, not of the thread that started it).
    let server = std::thread::spawn(|| NatsServer::start(NatsConfig::default()))
        .join()
        .expect("start thread")
        .expect("start a nats-server");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        server.is_running(),
        "the server died with its starting thread"
    );
    let port = server.port();
    assert_eq!(server.url(), format!("nats://127.0.0.1:{port}"));

    let js = connect(vec![server.url().to_string()]).await;
    let stream = within(
        "create stream",
        js.create_stream(stream::Config {
            name: "EVENTS".into(),
            subjects: vec!["events.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        }),
    )
    .await
    .expect("create stream");
    assert_eq!(publish(&js, "events.a", "hello").await, 1);
    assert_eq!(read_all(&stream, "before", 1).await, ["hello"]);
    assert_eq!(publish(&js, "events.b", "world").await, 2);

    let pid = server.pid().expect("running");
    server.kill();
    assert!(!server.is_running());
    assert_eq!(server.pid(), None);
    assert!(port_is_closed(port), "port {port} still open after kill");
    assert!(
        server.check_exit().is_none(),
        "a kill through the API is not a crash"
    );
    drop(js);

    let restarted = Instant::now();
    server.restart().expect("restart");
    eprintln!("restarted in {:?}", restarted.elapsed());
    assert_ne!(server.pid(), Some(pid));
    assert_eq!(server.port(), port);

    let js = connect(vec![server.url().to_string()]).await;
    let mut stream = within("get stream", js.get_stream("EVENTS"))
        .await
        .expect("the stream survived the kill");
    let info = within("stream info", stream.info()).await.expect("info");
    assert_eq!(info.state.messages, 2);
    assert_eq!(info.state.last_sequence, 2);
    assert_eq!(read_all(&stream, "after", 2).await, ["hello", "world"]);
    // JetStream works on after the restart.
    assert_eq!(publish(&js, "events.c", "again").await, 3);

    // A graceful stop and a restart keep it all too.
    server.stop();
    assert!(!server.is_running());
    assert!(port_is_closed(port), "port {port} still open after stop");
    assert!(
        server.check_exit().is_none(),
        "a stop through the API is not a crash"
    );
    server.restart().expect("restart after stop");
    let js = connect(vec![server.url().to_string()]).await;
    let mut stream = within("get stream", js.get_stream("EVENTS"))
        .await
        .expect("the stream survived the stop");
    let info = within("stream info", stream.info()).await.expect("info");
    assert_eq!(info.state.messages, 3);
}

#[cfg(unix)]
#[test]
fn a_server_killed_from_outside_is_reported_once_and_restarts() {
    use std::os::unix::process::ExitStatusExt;

    let server = NatsServer::start(NatsConfig::default()).expect("start a nats-server");
    let pid = server.pid().expect("running");
    assert!(server.check_exit().is_none(), "nothing happened yet");
    let status = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let exit = loop {
        if let Some(exit) = server.check_exit() {
            break exit;
        }
        assert!(Instant::now() < deadline, "no exit reported within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(exit.service, "nats");
    assert_eq!(exit.pid, pid);
    assert_eq!(exit.status.signal(), Some(9), "{}", exit.status);
    assert_eq!(exit.log, server.log_path());
    assert!(
        exit.log_tail.contains("Server is ready"),
        "{}",
        exit.log_tail
    );
    assert!(server.check_exit().is_none(), "reported once");
    assert!(!server.is_running());

    server.restart().expect("restart");
    assert!(server.is_running());
    assert_ne!(server.pid(), Some(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_keeps_an_r3_stream_writable_while_a_node_is_down() {
    let started = Instant::now();
    let cluster = NatsCluster::start(3).expect("start a 3-node cluster");
    eprintln!("cluster up in {:?}", started.elapsed());
    let urls = cluster.urls();
    assert_eq!(urls.len(), 3);
    let names: Vec<&str> = cluster.nodes().iter().map(|n| n.server_name()).collect();
    assert_eq!(names, ["n0", "n1", "n2"]);

    let js = connect(urls).await;
    // A cluster just up may not have elected its JetStream meta leader yet: the create
    // request then times out, and is sent again (creating the same stream is idempotent).
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        let created = within(
            "create R3 stream",
            js.get_or_create_stream(stream::Config {
                name: "TASKS".into(),
                subjects: vec!["tasks.>".into()],
                num_replicas: 3,
                ..Default::default()
            }),
        )
        .await;
        match created {
            Ok(stream) => break stream,
            Err(e) => assert!(Instant::now() < deadline, "create an R3 stream: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // A new R3 stream answers only once its replicas have elected a leader; until then a
    // publish is refused (StreamNotFound / no responders), so the first one retries too.
    let first = publish_until_stored(&js, "tasks.1", "one", "tasks-1").await;
    assert_eq!(first.0, 1);

    // Kill the stream's leader: the hardest node to lose.
    let info = within("stream info", stream.info()).await.expect("info");
    let leader = info
        .cluster
        .as_ref()
        .and_then(|c| c.leader.clone())
        .expect("an R3 stream has a leader");
    let victim = cluster
        .node_named(&leader)
        .expect("the leader is one of ours");
    victim.kill();
    assert!(!victim.is_running());
    let killed = Instant::now();

    // Publishing goes on with 2 of 3 replicas once a new leader is elected. Retries carry the
    // same message id, so a retried publish that was stored already is not stored twice.
    let (sequence, attempts) = publish_until_stored(&js, "tasks.2", "two", "tasks-2").await;
    eprintln!(
        "published after losing the leader in {:?} ({attempts} attempts)",
        killed.elapsed()
    );
    assert_eq!(sequence, 2);
    let info = within("stream info", stream.info()).await.expect("info");
    let new_leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
    assert!(
        new_leader.as_deref().is_some_and(|l| l != leader),
        "leader {new_leader:?}"
    );

    victim.restart().expect("restart the killed node");
    assert!(victim.is_running());
    // The restarted node catches up: every replica current, both messages in the stream.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let info = within("stream info", stream.info()).await.expect("info");
        let cluster_info = info.cluster.clone().expect("cluster info");
        let caught_up = cluster_info.replicas.len() == 2
            && cluster_info
                .replicas
                .iter()
                .all(|r| r.current && !r.offline);
        if caught_up && info.state.messages == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted node did not catch up: {cluster_info:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(cluster.check_exits().is_empty(), "no node crashed");
    eprintln!("whole cluster test in {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_payload_is_applied() {
    let server = NatsServer::start(NatsConfig {
        max_payload: Some(4 << 20),
        ..Default::default()
    })
    .expect("start a nats-server");
    let client = within("connect", async_nats::connect(server.url()))
        .await
        .expect("connect");
    assert_eq!(client.server_info().max_payload, 4 << 20);
    let js = jetstream::new(client);
    within(
        "create stream",
        js.create_stream(stream::Config {
            name: "BIG".into(),
            subjects: vec!["big".into()],
            ..Default::default()
        }),
    )
    .await
    .expect("create stream");
    // 3 MiB: over nats-server's default 1 MiB, under ours.
    let ack = within("publish 3 MiB", async {
        js.publish("big", vec![7u8; 3 << 20].into())
            .await
            .expect("send")
            .await
    })
    .await
    .expect("a 3 MiB message fits");
    assert_eq!(ack.sequence, 1);
}

/// The client works against the Debian package's server too (2.9.10 on this machine kind),
/// the one every machine of this kind runs on 127.0.0.1:4222; ours runs on its own port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_works_against_the_system_server() {
    let system = NatsBinary::system().expect("Debian's nats-server (apt-get install nats-server)");
    assert_eq!(system.origin, NatsOrigin::System);
    eprintln!("system nats-server {}", system.version);
    let server = NatsServer::start(NatsConfig {
        binary: Some(system.clone()),
        ..Default::default()
    })
    .expect("start the system nats-server");
    assert_eq!(server.binary().version, system.version);
    let js = connect(vec![server.url().to_string()]).await;
    let stream = within(
        "create stream",
        js.create_stream(stream::Config {
            name: "OLD".into(),
            subjects: vec!["old.>".into()],
            ..Default::default()
        }),
    )
    .await
    .expect("create stream");
    assert_eq!(publish(&js, "old.a", "still works").await, 1);
    assert_eq!(read_all(&stream, "reader", 1).await, ["still works"]);
}

#[test]
fn bad_input_gives_typed_errors() {
    assert!(matches!(
        NatsCluster::start(0),
        Err(DevnetError::InvalidConfig(_))
    ));
    for max_payload in [0, (64 << 20) + 1] {
        let result = NatsServer::start(NatsConfig {
            max_payload: Some(max_payload),
            ..Default::default()
        });
        assert!(
            matches!(result, Err(DevnetError::InvalidConfig(ref m)) if m.contains("max_payload")),
            "{result:?}"
        );
    }
    let missing = NatsBinary::at("/nonexistent/nats-server").unwrap_err();
    assert!(
        matches!(missing, DevnetError::NatsBinary { ref path, .. } if path.ends_with("nats-server")),
        "{missing}"
    );
    // Runs, but is no nats-server.
    let not_nats = NatsBinary::at("/bin/true").unwrap_err();
    assert!(
        not_nats.to_string().contains("printed no version"),
        "{not_nats}"
    );
}

#[test]
fn a_cluster_node_index_out_of_range_is_an_error() {
    let cluster = NatsCluster::start(1).expect("start a 1-node cluster");
    assert!(cluster.node(0).is_ok());
    let err = cluster.node(1).unwrap_err();
    assert!(
        matches!(err, DevnetError::NoSuchNode { index: 1, count: 1 }),
        "{err}"
    );
}

/// Set in the helper process of `servers_die_with_the_process_that_started_them`.
const HELPER_ENV: &str = "MURMUR_NATS_TEST_HELPER";

#[test]
#[ignore = "helper process for servers_die_with_the_process_that_started_them"]
fn helper_start_a_server_and_wait() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let server = NatsServer::start(NatsConfig::default()).expect("start");
    println!("nats-pid {}", server.pid().expect("running"));
    // Killed by the parent long before this ends.
    std::thread::sleep(Duration::from_secs(60));
}

#[cfg(target_os = "linux")]
#[test]
fn servers_die_with_the_process_that_started_them() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let mut helper = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_start_a_server_and_wait",
            "--ignored",
            "--nocapture",
        ])
        .env(HELPER_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = helper.stdout.take().unwrap();
    let pid: u32 = BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|line| line.strip_prefix("nats-pid ")?.trim().parse().ok())
        .expect("the helper printed its server's pid");
    assert!(is_alive(pid), "the helper's server runs");

    // SIGKILL: no destructor runs in the helper.
    helper.kill().unwrap();
    helper.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while is_alive(pid) {
        assert!(
            Instant::now() < deadline,
            "nats-server {pid} outlived the process that started it"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether the process exists and is not a zombie.
#[cfg(target_os = "linux")]
fn is_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    !matches!(state.and_then(|s| s.chars().next()), Some('Z' | 'X') | None)
}
