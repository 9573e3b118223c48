//! `murmur devnet`: the local network in the foreground.

use std::process::ExitCode;

use clap::Subcommand;
use murmur_devnet::{Devnet, DevnetConfig};

/// Subcommands of `murmur devnet`.
#[derive(Subcommand)]
pub enum DevnetCommand {
    /// Start one PLC and N PDS hosts, print their URLs, and run until Ctrl-C.
    Up {
        /// Number of PDS hosts.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=16))]
        pds: u16,
        /// Print the URLs as one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(command: DevnetCommand) -> Result<ExitCode, Box<dyn std::error::Error>> {
    match command {
        DevnetCommand::Up { pds, json } => up(pds.into(), json),
    }
}

fn up(pds: usize, json: bool) -> Result<ExitCode, Box<dyn std::error::Error>> {
    let net = Devnet::start(DevnetConfig {
        pds,
        ..Default::default()
    })?;
    let pds_urls: Vec<&str> = net.pds_hosts().iter().map(|h| h.url()).collect();
    if json {
        let out = serde_json::json!({ "plc": net.plc_url(), "pds": pds_urls });
        println!("{out}");
    } else {
        println!("PLC  {}", net.plc_url());
        for (i, url) in pds_urls.iter().enumerate() {
            println!("PDS {i} {url}");
        }
        println!("data and logs in {}", net.run_dir().display());
        println!("press Ctrl-C to stop");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(shutdown_signal())?;
    eprintln!("stopping the local network");
    drop(net);
    Ok(ExitCode::SUCCESS)
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c().await
}
