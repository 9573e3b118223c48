//! The examples' network: the PDS hosts and PLC directory named on the command line, or a
//! local network (murmur-devnet: the official PLC + PDS on loopback) started for the run;
//! fresh accounts on its hosts, agents that watch all of it, and verified reads of any repo
//! on it. Each example uses part of it.
#![allow(dead_code)]

use std::error::Error;
use std::process::ExitCode;
use std::sync::Arc;

use murmur::comms::Validate;
use murmur::pds::{Cid, Collection, Writer};
use murmur::sync::{IdentityResolver, Limits, Verifier, VerifyLevel, decode_record};
use murmur::{Agent, AgentBuilder};
use murmur_devnet::{Devnet, DevnetConfig};

/// Where an example runs: PDS hosts sharing one PLC directory.
pub struct Network {
    /// The PDS hosts' base URLs.
    pub hosts: Vec<String>,
    /// The PLC directory's URL (identities resolve there).
    pub plc: String,
    /// Checks records read back from repos (signature, MST proof, hashes).
    verifier: Verifier,
    /// The local network, when the example started one: stopped when dropped.
    _local: Option<Devnet>,
}

/// Runs `example` on `pds` hosts: those given as `PDS_URL... PLC_URL` (at least `pds` of
/// them), or a local network of `pds` hosts started when no arguments are given. Prints the
/// example's error, if any, and exits non-zero with it.
pub fn run(
    pds: usize,
    example: impl AsyncFnOnce(&Network) -> Result<(), Box<dyn Error>>,
) -> ExitCode {
    let outcome = Network::from_args(pds).and_then(|net| {
        let runtime = tokio::runtime::Runtime::new()?;
        let done = runtime.block_on(example(&net));
        drop(runtime); // the agents stop before the network does
        done
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

impl Network {
    fn from_args(pds: usize) -> Result<Network, Box<dyn Error>> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        if args.is_empty() {
            eprintln!("starting a local network (PLC + {pds} PDS hosts)...");
            let net = Devnet::start(DevnetConfig {
                pds,
                ..Default::default()
            })?;
            let hosts = net.pds_hosts().iter().map(|h| h.url().to_string());
            let plc = net.plc_url().to_string();
            return Ok(Network::new(hosts.collect(), plc, Some(net)));
        }
        let usage = format!(
            "usage: {} [PDS_URL... PLC_URL] with at least {pds} PDS hosts whose sign-ups are \
             open; with no arguments a local network is started",
            std::env::args().next().unwrap_or_default()
        );
        if let Some(bad) = args
            .iter()
            .find(|a| !a.starts_with("http://") && !a.starts_with("https://"))
        {
            return Err(format!("{bad:?} is not an http(s) URL; {usage}").into());
        }
        let Some((plc, hosts)) = args.split_last().filter(|(_, h)| h.len() >= pds) else {
            return Err(format!("{} URL(s) given; {usage}", args.len()).into());
        };
        let hosts = hosts.iter().map(|h| h.trim_end_matches('/').to_string());
        Ok(Network::new(
            hosts.collect(),
            plc.trim_end_matches('/').into(),
            None,
        ))
    }

    fn new(hosts: Vec<String>, plc: String, local: Option<Devnet>) -> Network {
        let resolver = IdentityResolver::new().with_plc_url(&plc);
        let verifier = Verifier::new(Arc::new(resolver)).with_level(VerifyLevel::Full);
        Network {
            hosts,
            plc,
            verifier,
            _local: local,
        }
    }

    /// Creates a fresh account named after `name` on host `host` (modulo the number of
    /// hosts) and logs in as it. Local and test PDS hosts accept sign-ups without an invite.
    pub async fn account(&self, host: usize, name: &str) -> Result<Writer, Box<dyn Error>> {
        let pds = &self.hosts[host % self.hosts.len()];
        let account = murmur_devnet::sign_up(pds, name).await?;
        Ok(Writer::login(pds, &account.did, &account.password).await?)
    }

    /// An agent acting as `writer` that hears `peers` on every host of the network. It
    /// replays the hosts' streams from the start, so it also hears what its peers wrote
    /// before it started.
    pub fn agent(&self, writer: Writer, peers: &[String]) -> AgentBuilder {
        Agent::builder(writer)
            .watch_all(self.hosts.iter().cloned())
            .plc_url(&self.plc)
            .start_cursor(0)
            .peers(peers.iter().cloned())
    }

    /// The record of `C` at `rkey` in `did`'s repo, read from the PDS that the DID document
    /// names together with its proof (`com.atproto.sync.getRecord`: the signed commit and
    /// the MST path to the record), so it is the repo owner's record whoever served it;
    /// decoded and validated against its lexicon. `None` if the repo has no record there.
    pub async fn read<C: Collection>(
        &self,
        did: &str,
        rkey: &str,
    ) -> Result<Option<Proven<C::Record>>, Box<dyn Error>>
    where
        C::Record: Validate,
    {
        let Some(found) = self.verifier.fetch_record(did, C::NSID, rkey).await? else {
            return Ok(None);
        };
        let record: C::Record = decode_record(&found.record, &Limits::default())?;
        record.validate()?;
        let identity = self.verifier.resolver().resolve(did).await?;
        let pds = identity.pds.clone().unwrap_or_default();
        Ok(Some(Proven {
            record,
            cid: found.cid,
            pds,
        }))
    }
}

/// A record read back from its author's repo with its proof ([`Network::read`]).
pub struct Proven<R> {
    /// The record.
    pub record: R,
    /// Its CID, checked against its bytes.
    pub cid: Cid,
    /// The PDS it was read from.
    pub pds: String,
}
