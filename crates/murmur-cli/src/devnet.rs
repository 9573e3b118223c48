//! `murmur devnet`: the local network in the foreground.

use std::process::ExitCode;
use std::time::Duration;

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
        let pds_pids: Vec<Option<u32>> = net.pds_hosts().iter().map(|h| h.pid()).collect();
        let out = serde_json::json!({
            "plc": net.plc_url(),
            "pds": pds_urls,
            "pids": { "plc": net.plc_pid(), "pds": pds_pids },
            "run_dir": net.run_dir(),
        });
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
    runtime.block_on(async {
        let shutdown = crate::signal::interrupted();
        tokio::pin!(shutdown);
        let mut check = tokio::time::interval(EXIT_CHECK);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = check.tick() => report_exits(&net),
            }
        }
    });
    eprintln!("stopping the local network");
    drop(net);
    Ok(ExitCode::SUCCESS)
}

/// How often the node processes are checked for an unexpected exit.
const EXIT_CHECK: Duration = Duration::from_millis(500);

/// Says on stderr which node process died, how, and what it logged last.
fn report_exits(net: &Devnet) {
    for exit in net.check_exits() {
        eprintln!("error: {exit}");
        eprintln!(
            "{} is down; the rest of the local network keeps running (Ctrl-C stops it)",
            exit.service
        );
    }
}
