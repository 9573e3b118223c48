//! `murmur watch`: tail verified record ops from PDS hosts or a relay, one line each.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use murmur_firehose::{
    Action, BoxFuture, CallError, Handler, OpEvent, Route, Watcher, WatcherBuilder,
};
use murmur_sync::VerifyLevel;

/// Arguments of `murmur watch`.
#[derive(Args, Debug)]
pub struct WatchArgs {
    /// A PDS to watch (repeat for several hosts; each keeps its own cursor).
    #[arg(long = "pds", value_name = "URL", required_unless_present = "relay")]
    pds: Vec<String>,
    /// A relay to watch instead of PDS hosts.
    #[arg(long, value_name = "URL", conflicts_with = "pds")]
    relay: Option<String>,
    /// Only these repos (repeatable).
    #[arg(long = "did", value_name = "DID")]
    dids: Vec<String>,
    /// Only these collections: an NSID or a prefix like `agent.comms.*` (repeatable).
    #[arg(long = "collection", value_name = "NSID")]
    collections: Vec<String>,
    /// Only these actions (repeatable).
    #[arg(long = "action", value_enum)]
    actions: Vec<ActionArg>,
    /// Keep the cursor (and dedup log) here, so a restart resumes where it stopped.
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Start from this seq when no cursor is stored (0 = the start of the replay window).
    #[arg(long, value_name = "SEQ")]
    cursor: Option<i64>,
    /// The PLC directory for did:plc resolution (default: the public one).
    #[arg(long, value_name = "URL")]
    plc: Option<String>,
    /// How much of each commit to verify.
    #[arg(long, value_enum, default_value_t = VerifyArg::Full)]
    verify: VerifyArg,
    /// Print JSON lines (with the record) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ActionArg {
    Create,
    Update,
    Delete,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum VerifyArg {
    Full,
    Signature,
    None,
}

pub fn run(args: WatchArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(watch(args))
}

fn builder(args: &WatchArgs) -> WatcherBuilder {
    let mut b = Watcher::builder();
    for url in &args.pds {
        b = b.pds(url);
    }
    if let Some(relay) = &args.relay {
        b = b.relay(relay);
    }
    if !args.dids.is_empty() {
        b = b.dids(args.dids.iter().cloned());
    }
    b = b
        .collections(&args.collections)
        .actions(args.actions.iter().map(|a| match a {
            ActionArg::Create => Action::Create,
            ActionArg::Update => Action::Update,
            ActionArg::Delete => Action::Delete,
        }));
    if let Some(dir) = &args.state {
        b = b.state_dir(dir);
    }
    if let Some(seq) = args.cursor {
        b = b.start_cursor(seq);
    }
    if let Some(plc) = &args.plc {
        b = b.plc_url(plc);
    }
    b.verification(match args.verify {
        VerifyArg::Full => VerifyLevel::Full,
        VerifyArg::Signature => VerifyLevel::SignatureOnly,
        VerifyArg::None => VerifyLevel::None,
    })
}

async fn watch(args: WatchArgs) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let watcher = builder(&args)
        .tail(Printer { json: args.json })
        .on_gap(|gap| eprintln!("gap on {}: {:?} ({})", gap.source, gap.kind, gap.detail))
        .on_rejected(|op, why| eprintln!("rejected {}: {why}", op.uri()))
        .build()?;
    let stop = watcher.shutdown_handle();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        stop.shutdown();
    });
    watcher.run().await?;
    Ok(ExitCode::SUCCESS)
}

/// Prints every op that passes the filters.
struct Printer {
    json: bool,
}

impl Handler for Printer {
    fn name(&self) -> &'static str {
        "murmur watch"
    }

    fn route(&self) -> Route {
        Route {
            collection: "*",
            actions: &[Action::Create, Action::Update, Action::Delete],
        }
    }

    fn call(&self, op: OpEvent) -> BoxFuture<Result<(), CallError>> {
        let d = op.data();
        let line = if self.json {
            let record = d
                .record
                .as_deref()
                .and_then(|bytes| murmur_lexicon::data::dag_cbor_to_data(bytes).ok())
                .map(|data| murmur_lexicon::data::data_to_json(&data));
            serde_json::json!({
                "seq": d.seq,
                "time": d.time,
                "did": d.did,
                "rev": d.rev,
                "action": d.action.as_str(),
                "path": d.path,
                "uri": op.uri(),
                "cid": d.cid.map(|c| c.to_string()),
                "record": record,
            })
            .to_string()
        } else {
            format!(
                "{} {} {} {} {}",
                d.seq,
                d.did,
                d.action.as_str(),
                d.path,
                d.cid.map_or_else(|| "-".to_string(), |c| c.to_string())
            )
        };
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
        Box::pin(async { Ok(()) })
    }
}
