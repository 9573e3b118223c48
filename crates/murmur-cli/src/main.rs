//! The `murmur` command-line tool.

mod devnet;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Devnet { command } => devnet::run(command),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
