//! Relay benchmarks (murmur-bus's `subscribeRepos` served from the frame stream) on a real
//! nats-server with JetStream and a real `#commit` frame of the local network (prints
//! figures; not a timed test).
//!
//! `cargo bench -p murmur-e2e --bench relay`
//!
//! 1. **Frames served per second** to 1, 8 and 32 consumers at once, each replaying
//!    `MURMUR_BENCH_FRAMES` frames (default 20,000) from cursor 0: the relay reads the frame
//!    stream with one ordered consumer per connection, renumbers each frame and writes it.
//!    The consumers (plain WebSocket clients counting frames) run in the same process, on the
//!    same 2 worker threads, so the figure is a floor.
//! 2. **Memory per consumer**: the process's resident memory with 32 consumers connected,
//!    live and idle, and with 32 consumers that stopped reading in the middle of a replay,
//!    against none (consumers' own client buffers included).
//! 3. **Jetstream events served per second** (the hub's `/subscribe` on the same frames) to 1,
//!    8 and 32 subscribers replaying every event, plain JSON and zstd-compressed with
//!    Jetstream's dictionary: each subscriber's connection decodes each frame, turns its op
//!    into JSON (the record from DAG-CBOR) and, compressed, runs zstd.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use murmur_bus::{JetstreamConfig, JetstreamServer, Relay, RelayConfig, StreamSettings};
use murmur_devnet::nats::NatsServer;
use murmur_devnet::{Devnet, DevnetConfig};
use murmur_e2e::bench::env_or;
use murmur_e2e::{Note, note};
use tokio_tungstenite::tungstenite::Message;

/// Resident memory of this process, in bytes (from /proc/self/statm).
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// One real `#commit` frame with an op, read from the PDS's stream.
async fn real_commit_frame(net: &Devnet) -> Vec<u8> {
    let account = net
        .create_account(0, &net.unique_handle("relaybench"), "bench-pass")
        .await
        .expect("account");
    let writer = murmur_pds::Writer::login(&account.pds_url, &account.did, "bench-pass")
        .await
        .expect("login");
    writer.create::<Note>(&note(1)).await.expect("write");
    let url = format!(
        "{}/xrpc/com.atproto.sync.subscribeRepos?cursor=0",
        account.pds_url.replacen("http", "ws", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("PDS stream");
    while let Some(Ok(message)) = socket.next().await {
        if let Message::Binary(bytes) = message
            && let Ok(murmur_sync::Frame::Commit(commit)) = murmur_sync::Frame::decode(&bytes)
            && commit.repo == account.did
            && !commit.ops.is_empty()
        {
            return bytes.to_vec();
        }
    }
    panic!("no #commit with an op on the PDS's stream");
}

/// A consumer replaying from cursor 0 until it has `n` frames; returns when done.
async fn consume(addr: SocketAddr, n: u64) -> u64 {
    let url = format!("ws://{addr}/xrpc/com.atproto.sync.subscribeRepos?cursor=0");
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.expect("relay");
    let mut got = 0;
    while got < n {
        match socket.next().await {
            Some(Ok(Message::Binary(_))) => got += 1,
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    got
}

/// A Jetstream subscriber replaying every event until it has `n`; returns when done.
async fn subscribe(addr: SocketAddr, n: u64, compress: bool) -> u64 {
    let url = format!("ws://{addr}/subscribe?cursor=1&compress={compress}");
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("jetstream");
    let mut got = 0;
    while got < n {
        match socket.next().await {
            Some(Ok(Message::Binary(_) | Message::Text(_))) => got += 1,
            Some(Ok(_)) => {}
            _ => break,
        }
    }
    got
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let frames: u64 = env_or("MURMUR_BENCH_FRAMES", 20_000);
    let (net, nats) = tokio::task::spawn_blocking(|| {
        let net = Devnet::start(DevnetConfig::default()).expect("local network");
        let nats = NatsServer::start(Default::default()).expect("nats-server");
        (net, nats)
    })
    .await
    .unwrap();
    let frame = real_commit_frame(&net).await;

    let id = fastrand::u32(..);
    let settings = StreamSettings {
        name: format!("BENCH_RELAY_{id:08x}"),
        prefix: format!("b{id:08x}"),
        ..Default::default()
    };
    let client = async_nats::connect(nats.url()).await.unwrap();
    let max_payload = client.server_info().max_payload;
    let js = jetstream::new(client);
    let subjects = murmur_bus::ensure_streams(&js, &settings, max_payload)
        .await
        .unwrap();
    murmur_bus::ensure_frame_stream(&js, &settings, &subjects, max_payload)
        .await
        .unwrap();
    let subject = subjects.frame("did:plc:bench").unwrap();
    let started = Instant::now();
    let mut acks = Vec::new();
    for _ in 0..frames {
        acks.push(
            js.publish(subject.clone(), frame.clone().into())
                .await
                .unwrap(),
        );
        if acks.len() >= 1024 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    println!(
        "relay benchmarks: nats-server {} at {}; {frames} real #commit frames of {} bytes stored in {:.1} s",
        nats.binary().version,
        nats.url(),
        frame.len(),
        started.elapsed().as_secs_f64()
    );

    let relay = Relay::bind(
        "127.0.0.1:0".parse().unwrap(),
        js.clone(),
        &settings,
        RelayConfig::default(),
    )
    .await
    .unwrap();
    let addr = relay.local_addr();
    let stats = relay.stats();
    let server = tokio::spawn(relay.run());

    for consumers in [1u64, 8, 32] {
        let started = Instant::now();
        let tasks: Vec<_> = (0..consumers)
            .map(|_| tokio::spawn(consume(addr, frames)))
            .collect();
        let mut total = 0;
        for task in tasks {
            total += task.await.unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(total, consumers * frames, "every consumer got every frame");
        println!(
            "frames served, {consumers:>2} consumer(s) replaying {frames} frames each: {:>9.0} frames/s in all, {:>8.0} per consumer ({secs:.2} s)",
            total as f64 / secs,
            frames as f64 / secs
        );
    }

    // Memory: 32 idle live consumers, then 32 stalled mid-replay.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss();
    let mut live = Vec::new();
    for _ in 0..32 {
        let url = format!("ws://{addr}/xrpc/com.atproto.sync.subscribeRepos");
        live.push(tokio_tungstenite::connect_async(url).await.unwrap().0);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let with_live = rss();
    drop(live);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_stalled = rss();
    let mut stalled = Vec::new();
    for _ in 0..32 {
        let url = format!("ws://{addr}/xrpc/com.atproto.sync.subscribeRepos?cursor=0");
        let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
        // Read a little, then stop: the relay blocks on this socket.
        for _ in 0..10 {
            let _ = socket.next().await;
        }
        stalled.push(socket);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with_stalled = rss();
    let per = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / 32.0 / 1024.0;
    println!(
        "memory per consumer: {:.0} KiB live and idle, {:.0} KiB stalled mid-replay ({} frames behind each), resident {:.1} MiB with none",
        per(with_live, before),
        per(with_stalled, before_stalled),
        frames - 10,
        before as f64 / 1024.0 / 1024.0
    );
    println!(
        "relay: {} frames sent in all, {} consumers dropped as too slow",
        stats.frames_sent.load(std::sync::atomic::Ordering::Relaxed),
        stats.too_slow.load(std::sync::atomic::Ordering::Relaxed)
    );
    drop(stalled);
    server.abort();

    let jetstream = JetstreamServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        js.clone(),
        &settings,
        JetstreamConfig::default(),
    )
    .await
    .unwrap();
    let addr = jetstream.local_addr();
    let server = tokio::spawn(jetstream.run());
    for compress in [false, true] {
        for subscribers in [1u64, 8, 32] {
            let started = Instant::now();
            let tasks: Vec<_> = (0..subscribers)
                .map(|_| tokio::spawn(subscribe(addr, frames, compress)))
                .collect();
            let mut total = 0;
            for task in tasks {
                total += task.await.unwrap();
            }
            let secs = started.elapsed().as_secs_f64();
            assert_eq!(
                total,
                subscribers * frames,
                "every subscriber got every event"
            );
            println!(
                "jetstream events served ({}), {subscribers:>2} subscriber(s) replaying {frames} each: {:>9.0} events/s in all, {:>8.0} per subscriber ({secs:.2} s)",
                if compress { "zstd" } else { "plain" },
                total as f64 / secs,
                frames as f64 / secs
            );
        }
    }
    server.abort();
    let _ = murmur_bus::delete_streams(&js, &settings).await;
    tokio::task::spawn_blocking(move || drop((net, nats)))
        .await
        .unwrap();
}
