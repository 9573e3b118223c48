//! `murmur hub`: verify once, fan out. Watches PDS hosts (or a relay) and publishes every
//! verified op, with its proof, to a NATS JetStream stream; with `--relay-addr`, also serves
//! `com.atproto.sync.subscribeRepos` from it, and with `--jetstream-addr` Jetstream's
//! `/subscribe`.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use murmur_bus::{Hub, StreamSettings};
use murmur_sync::DEFAULT_PLC_URL;

/// Shown after `murmur hub --help`'s options: the metrics `--metrics` serves.
pub const AFTER_HELP: &str = murmur_bus::METRICS_HELP;

/// Arguments of `murmur hub`.
#[derive(Args, Debug)]
pub struct HubArgs {
    /// The NATS server(s) with JetStream: `nats://host:port`, comma-separated for a cluster.
    #[arg(long, value_name = "URL", default_value = "nats://127.0.0.1:4222")]
    nats: String,
    /// A PDS to watch (repeat for several hosts; each keeps its own cursor, in NATS).
    #[arg(long = "pds", value_name = "URL", required_unless_present = "relay")]
    pds: Vec<String>,
    /// A relay to watch (repeatable).
    #[arg(long, value_name = "URL")]
    relay: Vec<String>,
    /// The PLC directory for did:plc keys.
    #[arg(long, value_name = "URL", default_value = DEFAULT_PLC_URL)]
    plc: String,
    /// The stream's name.
    #[arg(long, default_value = "MURMUR")]
    stream: String,
    /// The subject prefix.
    #[arg(long, default_value = "murmur")]
    prefix: String,
    /// Partitions (for consumer pools); fixed when the stream is created.
    #[arg(long, default_value_t = murmur_bus::subject::DEFAULT_PARTITIONS)]
    partitions: u16,
    /// Stream replicas (3 on a 3-node cluster).
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// How long the stream keeps messages (the replay window), in hours.
    #[arg(long, default_value_t = 24)]
    retention_hours: u64,
    /// Serve Prometheus metrics (text format) at http://ADDR/metrics, e.g. 127.0.0.1:9464
    /// (the metrics are listed below).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Also serve com.atproto.sync.subscribeRepos at ws://ADDR (a relay for private
    /// networks: one merged stream of the verified events of every watched host, numbered by
    /// the hub, e.g. 127.0.0.1:2470).
    #[arg(long, value_name = "ADDR")]
    relay_addr: Option<SocketAddr>,
    /// Also serve Jetstream's /subscribe at ws://ADDR (JSON events filtered by collection and
    /// DID in the server, cursors in unix microseconds, zstd with Jetstream's dictionary), for
    /// agents in other languages, e.g. 127.0.0.1:6008.
    #[arg(long, value_name = "ADDR")]
    jetstream_addr: Option<SocketAddr>,
    /// Let com.atproto.sync.requestCrawl on the relay add PDS hosts matching PATTERN at run
    /// time (repeatable): a host (pds.example.com), host:port (localhost:2583), subdomains
    /// (*.example.com), or * for any. Without it the relay refuses requestCrawl.
    #[arg(long, value_name = "PATTERN", requires = "relay_addr")]
    allow_crawl: Vec<String>,
}

/// Runs the hub until Ctrl-C or SIGTERM (then publishes in flight finish and cursors are
/// stored).
pub fn run(args: HubArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        if let Some(addr) = args.metrics {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .map_err(|e| format!("--metrics {addr}: {e}"))?;
            eprintln!("metrics: http://{addr}/metrics");
        }
        let settings = StreamSettings {
            name: args.stream,
            prefix: args.prefix,
            partitions: args.partitions,
            replicas: args.replicas,
            max_age: Duration::from_secs(args.retention_hours.max(1) * 3600),
            ..Default::default()
        };
        let mut builder = Hub::builder()
            .nats(&args.nats)
            .plc_url(&args.plc)
            .stream(settings);
        for url in &args.pds {
            builder = builder.pds(url);
        }
        for url in &args.relay {
            builder = builder.relay(url);
        }
        if let Some(addr) = args.relay_addr {
            builder = builder.serve_relay(addr, murmur_bus::RelayConfig::default());
        }
        if !args.allow_crawl.is_empty() {
            builder = builder.allow_crawl(murmur_bus::CrawlPolicy::allow(args.allow_crawl.clone()));
        }
        if let Some(addr) = args.jetstream_addr {
            builder = builder.serve_jetstream(addr, murmur_bus::JetstreamConfig::default());
        }
        let hub = builder.build().await?;
        if let Some(addr) = hub.relay_addr() {
            eprintln!("relay: ws://{addr}/xrpc/com.atproto.sync.subscribeRepos");
        }
        if let Some(addr) = hub.jetstream_addr() {
            eprintln!("jetstream: ws://{addr}/subscribe");
        }
        let stop = hub.shutdown_handle();
        tokio::spawn(async move {
            let signal = crate::signal::interrupted().await;
            eprintln!("{signal}: stopping, finishing publishes, storing cursors...");
            stop.shutdown();
        });
        eprintln!(
            "hub running: {} source(s) -> {}",
            args.pds.len() + args.relay.len(),
            args.nats
        );
        hub.run().await?;
        Ok(ExitCode::SUCCESS)
    })
}
