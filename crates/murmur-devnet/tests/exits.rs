//! A node process that dies on its own is reported once by `Devnet::check_exits`, and the PDS
//! can be started again.
#![cfg(unix)]

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::{Duration, Instant};

use murmur_devnet::{Devnet, DevnetConfig, ServiceExit};

fn kill(pid: u32) {
    let status = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -KILL {pid} failed");
}

fn wait_for_exit(net: &Devnet) -> Vec<ServiceExit> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let exits = net.check_exits();
        if !exits.is_empty() {
            return exits;
        }
        assert!(Instant::now() < deadline, "no exit reported within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_killed_pds_is_reported_once_and_can_start_again() {
    let net = Devnet::start(DevnetConfig::default()).unwrap();
    assert!(net.check_exits().is_empty(), "nothing died yet");
    let host = net.pds(0).unwrap();
    let pid = host.pid().expect("a running PDS has a pid");
    assert_ne!(pid, net.plc_pid());

    kill(pid);
    let exits = wait_for_exit(&net);
    assert_eq!(exits.len(), 1, "{exits:?}");
    let exit = &exits[0];
    assert_eq!(exit.service, "pds 0");
    assert_eq!(exit.pid, pid);
    assert_eq!(exit.status.signal(), Some(9), "{}", exit.status);
    assert!(exit.log.ends_with("pds0.log"), "{}", exit.log.display());
    let report = exit.to_string();
    assert!(
        report.starts_with(&format!("pds 0 (pid {pid}) exited unexpectedly")),
        "{report}"
    );
    assert!(!host.is_running());
    assert_eq!(host.pid(), None);
    assert!(net.check_exits().is_empty(), "reported once");

    host.start().unwrap();
    let again = host.pid().expect("restarted");
    assert_ne!(again, pid);
    // A stop through the API is not an unexpected exit.
    host.stop();
    assert!(net.check_exits().is_empty());

    kill(net.plc_pid());
    let exits = wait_for_exit(&net);
    assert_eq!(exits.len(), 1, "{exits:?}");
    assert_eq!(exits[0].service, "plc");
    assert!(net.check_exits().is_empty(), "reported once");
}
