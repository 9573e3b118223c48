//! `murmur watch`: tail verified record ops from PDS hosts or a relay, one line each.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Args, ValueEnum};
use murmur_firehose::{
    Action, BoxFuture, CallError, Handler, OpEvent, Rejection, Route, WatchError, Watcher,
    WatcherBuilder,
};
use murmur_sync::{DEFAULT_PLC_URL, SyncError, VerifyLevel};

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
    /// The PLC directory for did:plc resolution (default: the public one; a local network
    /// needs its own, e.g. the URL `murmur devnet up` prints).
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
    let default_plc = args.plc.is_none();
    let hinted = Arc::new(AtomicBool::new(false));
    let watcher = builder(&args)
        .tail(Printer { json: args.json })
        .on_gap(|gap| eprintln!("gap on {}: {:?} ({})", gap.source, gap.kind, gap.detail))
        .on_rejected(move |what, why| {
            let hint = match why {
                Rejection::Verification(cause) => plc_hint(default_plc, what.did(), cause),
                _ => None,
            };
            eprintln!("rejected {}: {why}{}", what.uri(), hint.unwrap_or_default());
        })
        .on_error(move |e| {
            // The library logs the error itself; the CLI adds what to do about it, once.
            if let WatchError::VerificationStalled { did, error, .. } = e
                && let Some(hint) = plc_hint(default_plc, did, error)
                && !hinted.swap(true, Ordering::Relaxed)
            {
                eprintln!("waiting to verify {did}:{hint}");
            }
        })
        .build()?;
    let stop = watcher.shutdown_handle();
    tokio::spawn(async move {
        crate::signal::interrupted().await;
        stop.shutdown();
    });
    watcher.run().await?;
    Ok(ExitCode::SUCCESS)
}

/// What to add when a did:plc could not be resolved against the public PLC directory (not
/// found there, or the directory unreachable): the repos of a local network are only known
/// to its own PLC, so without `--plc` none of their ops can be verified.
fn plc_hint(default_plc: bool, did: &str, cause: &SyncError) -> Option<String> {
    let unresolved = match cause {
        SyncError::Resolve { did: d, .. } => d == did,
        SyncError::Unavailable { did: d, url, .. } => d == did && url.starts_with(DEFAULT_PLC_URL),
        _ => false,
    };
    (default_plc && did.starts_with("did:plc:") && unresolved).then(|| {
        format!(
            " (hint: {did} was looked up in the public PLC directory {DEFAULT_PLC_URL}; \
             for a local network pass its PLC with --plc URL)"
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    const DID: &str = "did:plc:ewvi7nxzyoun6zhxrhs64oiz";

    fn unresolved(did: &str) -> SyncError {
        SyncError::Resolve {
            did: did.into(),
            reason: format!("GET {DEFAULT_PLC_URL}/{did}: HTTP 404 Not Found"),
        }
    }

    fn unreachable(did: &str, url: &str) -> SyncError {
        SyncError::Unavailable {
            did: did.into(),
            url: format!("{url}/{did}"),
            reason: "connection failed".into(),
        }
    }

    #[test]
    fn an_unresolved_did_plc_with_the_public_plc_suggests_plc() {
        for cause in [unresolved(DID), unreachable(DID, DEFAULT_PLC_URL)] {
            let hint = plc_hint(true, DID, &cause).expect("a hint");
            assert!(hint.contains("--plc URL"), "{hint}");
            assert!(hint.contains(DEFAULT_PLC_URL), "{hint}");
        }
    }

    #[test]
    fn no_hint_with_an_explicit_plc_other_dids_or_other_failures() {
        assert_eq!(plc_hint(false, DID, &unresolved(DID)), None);
        let web = "did:web:example.com";
        assert_eq!(plc_hint(true, web, &unresolved(web)), None);
        let bad_sig = SyncError::BadSignature {
            did: DID.into(),
            commit: "x".into(),
            reason: "does not verify",
        };
        assert_eq!(plc_hint(true, DID, &bad_sig), None);
        let local = unreachable(DID, "http://localhost:2582");
        assert_eq!(plc_hint(true, DID, &local), None);
    }
}
