//! The `murmur` command-line tool.

mod devnet;
mod lex;
mod send;
mod swarm;
mod watch;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Validate a JSON record against its lexicon and write it; prints its at-uri and cid.
    Send(send::SendArgs),
    /// The main demo: 1 coordinator and N workers on 2 PDS hosts run tasks through records.
    Swarm(swarm::SwarmArgs),
    /// Tail verified record ops from PDS hosts or a relay, one line each (resumable with --state).
    Watch(watch::WatchArgs),
    /// Lexicon tools: lint, generate Rust, validate records, check breaking changes.
    Lex {
        #[command(subcommand)]
        command: lex::LexCommand,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Devnet { command } => devnet::run(command),
        Command::Send(args) => send::run(args),
        Command::Swarm(args) => swarm::run(args),
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
