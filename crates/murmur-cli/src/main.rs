//! The `murmur` command-line tool.

mod devnet;
mod hub;
mod lex;
mod send;
mod signal;
mod swarm;
mod watch;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// murmur: AI agents that coordinate over the AT Protocol.
#[derive(Parser)]
#[command(name = "murmur", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a local AT Protocol network (official PLC + PDS) on loopback.
    Devnet {
        #[command(subcommand)]
        command: devnet::DevnetCommand,
    },
    /// Verify once, fan out: publish every verified op (with its proof) to NATS JetStream.
    #[command(after_help = hub::AFTER_HELP)]
    Hub(hub::HubArgs),
    /// Validate a JSON record against its lexicon and write it; prints its at-uri and cid.
    Send(send::SendArgs),
    /// The main demo: 1 coordinator and N workers on 2 PDS hosts run tasks through records.
    Swarm(swarm::SwarmArgs),
    /// One agent of `murmur swarm --bus`, in its own process (started by the launcher).
    #[command(hide = true)]
    SwarmAgent(swarm::agent::AgentArgs),
    /// Tail verified record ops from PDS hosts or a relay, one line each (resumable with --state).
    Watch(watch::WatchArgs),
    /// Lexicon tools: lint, generate Rust, validate records, check breaking changes.
    Lex {
        #[command(subcommand)]
        command: lex::LexCommand,
    },
}

/// Log filter when `RUST_LOG` is unset: murmur's own crates (`murmur`, `murmur_firehose`, ...)
/// at info, everything else at warn.
const DEFAULT_LOG: &str = "warn,murmur=info";

/// Logs go to stderr (stdout carries data, e.g. `murmur watch --json`), filtered by `RUST_LOG`,
/// above `murmur watch --backfill`'s progress line when one is shown.
fn init_logging() {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            eprintln!("warning: ignoring RUST_LOG={spec:?} ({e}); using {DEFAULT_LOG:?}");
            EnvFilter::new(DEFAULT_LOG)
        }),
        _ => EnvFilter::new(DEFAULT_LOG),
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| watch::status::Stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Devnet { command } => devnet::run(command),
        Command::Hub(args) => hub::run(args),
        Command::Send(args) => send::run(args),
        Command::Swarm(args) => swarm::run(args),
        Command::SwarmAgent(args) => swarm::agent::run(args),
        Command::Watch(args) => watch::run(args),
        Command::Lex { command } => lex::run(command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
