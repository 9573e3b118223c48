//! `murmur watch`: tail verified record ops from PDS hosts or a relay, one line each.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use murmur_firehose::{
    Action, Backfill, BackfillProgress, BoxFuture, CallError, Handler, Metrics, OpEvent, Rejection,
    Route, WatchError, Watcher, WatcherBuilder,
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
    /// First copy the repos (com.atproto.sync.getRepo, verified: hashes, signed commit,
    /// complete MST) and print every record the filters admit once, marked `backfill`, then
    /// go on with the stream (ops already in the copy are not printed again). The repos are
    /// those given with --did, or else every repo the --pds hosts (or the --relay) list. With
    /// --state a restart does not copy finished repos again. Progress goes to stderr.
    #[arg(long)]
    backfill: bool,
    /// Repos copied at once during --backfill [default: 4].
    #[arg(long, value_name = "N", requires = "backfill")]
    backfill_concurrency: Option<usize>,
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
    if args.backfill {
        let mut backfill = if args.dids.is_empty() {
            Backfill::listed()
        } else {
            Backfill::dids(args.dids.iter().cloned())
        };
        if let Some(n) = args.backfill_concurrency {
            backfill = backfill.concurrency(n);
        }
        b = b.backfill(backfill);
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
    let progress_on_tty = std::io::stderr().is_terminal();
    let watcher = builder(&args)
        .tail(Printer {
            json: args.json,
            // Ops go below a progress line only when both share the terminal.
            under_status: progress_on_tty && std::io::stdout().is_terminal(),
        })
        .on_gap(|gap| {
            status::eprint(&format!(
                "gap on {}: {:?} ({})",
                gap.source, gap.kind, gap.detail
            ))
        })
        .on_rejected(move |what, why| {
            let hint = match why {
                Rejection::Verification(cause) => plc_hint(default_plc, what.did(), cause),
                _ => None,
            };
            status::eprint(&format!(
                "rejected {}: {why}{}",
                what.uri(),
                hint.unwrap_or_default()
            ));
        })
        .on_error(move |e| {
            // The library logs the error itself; the CLI adds what to do about it, once.
            if let WatchError::VerificationStalled { did, error, .. } = e
                && let Some(hint) = plc_hint(default_plc, did, error)
                && !hinted.swap(true, Ordering::Relaxed)
            {
                status::eprint(&format!("waiting to verify {did}:{hint}"));
            }
        })
        .build()?;
    let stop = watcher.shutdown_handle();
    tokio::spawn(async move {
        crate::signal::interrupted().await;
        stop.shutdown();
    });
    let progress = args.backfill.then(|| {
        tokio::spawn(report_progress(
            watcher.metrics(),
            progress_on_tty,
            Duration::from_secs(2),
        ))
    });
    let result = watcher.run().await;
    if let Some(progress) = progress {
        progress.abort();
        let _ = progress.await;
        status::finish();
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

/// Shows how far the backfill has got on stderr until it is finished: a line redrawn in
/// place on a terminal, otherwise a line every `every` and one when it is finished.
async fn report_progress(metrics: Arc<Metrics>, tty: bool, every: Duration) {
    let started = Instant::now();
    let mut last_line = started;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let p = metrics.backfill();
        let elapsed = started.elapsed();
        if tty {
            status::show(progress_bar(&p, elapsed));
            if p.finished {
                status::finish();
                return;
            }
        } else if p.finished {
            status::eprint(&progress_line(&p, elapsed));
            return;
        } else if last_line.elapsed() >= every {
            last_line = Instant::now();
            status::eprint(&progress_line(&p, elapsed));
        }
    }
}

/// `backfill: 3/10 repos, 1234 records (5.0 s)`, or `backfill finished: ...` at the end.
fn progress_line(p: &BackfillProgress, elapsed: Duration) -> String {
    let failed = if p.repos_failed > 0 {
        format!(", {} failed", p.repos_failed)
    } else {
        String::new()
    };
    let state = if p.finished {
        "backfill finished"
    } else if p.repos_total == 0 {
        return format!("backfill: listing repos ({:.1} s)", elapsed.as_secs_f64());
    } else {
        "backfill"
    };
    format!(
        "{state}: {}/{} repos{failed}, {} records ({:.1} s)",
        p.repos_done + p.repos_failed,
        p.repos_total,
        p.records,
        elapsed.as_secs_f64()
    )
}

/// The terminal form: `backfill [#######.............] 3/10 repos, 1234 records (5.0 s)`.
fn progress_bar(p: &BackfillProgress, elapsed: Duration) -> String {
    const WIDTH: u64 = 24;
    let over = p.repos_done + p.repos_failed;
    let filled = if p.finished {
        WIDTH
    } else {
        (over * WIDTH)
            .checked_div(p.repos_total)
            .map_or(0, |n| n.min(WIDTH))
    };
    let line = progress_line(p, elapsed);
    let rest = line.split_once(": ").map_or(line.as_str(), |(_, r)| r);
    format!(
        "backfill [{}{}] {rest}",
        "#".repeat(filled as usize),
        ".".repeat((WIDTH - filled) as usize)
    )
}

/// A status line at the bottom of a terminal's stderr: whatever else is written to stderr
/// (logs, gaps, rejections) or to stdout on the same terminal goes through [`above`], which
/// clears the line first and draws it again after.
pub(crate) mod status {
    use std::io::Write;
    use std::sync::{Mutex, MutexGuard};

    /// The line shown, if any.
    static LINE: Mutex<Option<String>> = Mutex::new(None);

    fn line() -> MutexGuard<'static, Option<String>> {
        LINE.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Draws `text` as the status line (replacing the one shown).
    pub(crate) fn show(text: String) {
        let mut line = line();
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{text}");
        let _ = err.flush();
        *line = Some(text);
    }

    /// Leaves the status line as it is, ended by a newline: it is no longer redrawn.
    pub(crate) fn finish() {
        if line().take().is_some() {
            let _ = writeln!(std::io::stderr());
        }
    }

    /// Runs `write` (which must not log) with the status line cleared, then draws it again.
    pub(crate) fn above<T>(write: impl FnOnce() -> T) -> T {
        let line = line();
        let mut err = std::io::stderr().lock();
        if line.is_some() {
            let _ = write!(err, "\r\x1b[2K");
            let _ = err.flush();
        }
        let out = write();
        if let Some(text) = &*line {
            let _ = write!(err, "{text}");
            let _ = err.flush();
        }
        out
    }

    /// `eprintln!` above the status line.
    pub(crate) fn eprint(message: &str) {
        above(|| {
            let _ = writeln!(std::io::stderr(), "{message}");
        });
    }

    /// Stderr for the log: each write goes above the status line.
    pub(crate) struct Stderr;

    impl Write for Stderr {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            above(|| std::io::stderr().write_all(buf))?;
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            std::io::stderr().flush()
        }
    }
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
    /// Whether ops are written above the progress line (stdout and stderr on one terminal).
    under_status: bool,
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
                "origin": op.origin().as_str(),
            })
            .to_string()
        } else {
            format!(
                "{} {} {} {} {} {}",
                d.seq,
                d.did,
                d.action.as_str(),
                d.path,
                d.cid.map_or_else(|| "-".to_string(), |c| c.to_string()),
                op.origin().as_str()
            )
        };
        let print = || {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        };
        if self.under_status {
            status::above(print);
        } else {
            print();
        }
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
    fn backfill_progress_lines() {
        let second = Duration::from_millis(1500);
        let mut p = BackfillProgress::default();
        assert_eq!(progress_line(&p, second), "backfill: listing repos (1.5 s)");
        p.repos_total = 4;
        p.repos_done = 1;
        p.records = 120;
        assert_eq!(
            progress_line(&p, second),
            "backfill: 1/4 repos, 120 records (1.5 s)"
        );
        assert_eq!(
            progress_bar(&p, second),
            "backfill [######..................] 1/4 repos, 120 records (1.5 s)"
        );
        p.repos_done = 3;
        p.repos_failed = 1;
        p.finished = true;
        assert_eq!(
            progress_line(&p, second),
            "backfill finished: 4/4 repos, 1 failed, 120 records (1.5 s)"
        );
        assert!(progress_bar(&p, second).starts_with("backfill [########################] 4/4"));
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
