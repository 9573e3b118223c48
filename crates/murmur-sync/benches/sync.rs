//! Throughput on frames recorded from the local PDS (tests/fixtures/corpus): decode + CID
//! hash checks, Full verification, op proofs (built and verified; their sizes), and the raw
//! k256 verify rate measured in the same run.
//!
//! `cargo bench -p murmur-sync` (one core: everything runs on the calling thread).

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use murmur_sync::{
    Action, CarSlice, CommitEvent, Frame, Identity, IdentityResolver, PublicKey, SignedCommit,
    Verifier, VerifyLevel, op_proof, op_proofs,
};

const RUN: Duration = Duration::from_secs(3);

fn corpus_dir() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/corpus").to_string()
}

fn frames() -> Vec<Vec<u8>> {
    let bytes = std::fs::read(format!("{}/frames.bin", corpus_dir())).expect("recorded corpus");
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 4 {
        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        out.push(rest[4..4 + n].to_vec());
        rest = &rest[4 + n..];
    }
    out
}

/// CPU time used by the calling thread (user + system), from /proc: on a shared machine this
/// is what "one core" means; wall-clock rates are printed beside it.
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10)) // CLK_TCK is 100 on Linux
}

/// Items per second over about `RUN`: (per wall-clock second, per CPU second of this thread).
struct Rate {
    wall: f64,
    cpu: Option<f64>,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.cpu {
            Some(cpu) => write!(f, "{cpu:>10.0} /s of CPU ({:>10.0} /s wall)", self.wall),
            None => write!(f, "{:>10.0} /s wall", self.wall),
        }
    }
}

fn measure(mut pass: impl FnMut() -> u64) -> Rate {
    pass(); // warm up
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < RUN {
        n += pass();
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = match (cpu0, thread_cpu()) {
        (Some(a), Some(b)) if b > a => Some(n as f64 / (b - a).as_secs_f64()),
        _ => None,
    };
    Rate {
        wall: n as f64 / wall,
        cpu,
    }
}

fn rate<T>(items: &[T], mut f: impl FnMut(&T)) -> Rate {
    measure(|| {
        for item in items {
            f(item);
        }
        items.len() as u64
    })
}

fn main() {
    let all = frames();
    let agent_sized: Vec<Vec<u8>> = all
        .iter()
        .filter(|f| matches!(Frame::decode(f), Ok(Frame::Commit(c)) if c.ops.len() == 1))
        .cloned()
        .collect();
    let avg = agent_sized.iter().map(Vec::len).sum::<usize>() / agent_sized.len().max(1);
    println!(
        "corpus: {} frames; {} agent-sized commits (1 op, {avg} bytes on average)",
        all.len(),
        agent_sized.len()
    );

    let decode_and_hash = |f: &Vec<u8>| {
        if let Frame::Commit(c) = Frame::decode(f).unwrap() {
            black_box(CarSlice::parse(&c.blocks).unwrap());
        }
    };
    let r = rate(&agent_sized, decode_and_hash);
    println!("decode + CID hash checks, agent-sized commits: {r} frames");
    let only_decode = rate(&agent_sized, |f| {
        black_box(Frame::decode(f).unwrap());
    });
    println!("  of which frame decode alone:                 {only_decode} frames");
    let cars: Vec<Vec<u8>> = agent_sized
        .iter()
        .map(|f| match Frame::decode(f).unwrap() {
            Frame::Commit(c) => c.blocks.to_vec(),
            _ => unreachable!(),
        })
        .collect();
    let only_car = rate(&cars, |c| {
        black_box(CarSlice::parse(c).unwrap());
    });
    println!("  of which CAR parse + re-hash alone:          {only_car} slices");
    let r_all = rate(&all, decode_and_hash);
    println!("decode + CID hash checks, whole corpus mix:    {r_all} frames");

    let keys: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{}/keys.json", corpus_dir())).unwrap(),
    )
    .unwrap();
    let resolver = IdentityResolver::new();
    for (did, key) in keys.as_object().unwrap() {
        resolver.pin(Identity {
            did: did.clone(),
            signing_key: PublicKey::from_did_key(key.as_str().unwrap()).unwrap(),
            handle: None,
            pds: None,
        });
    }
    let resolver = Arc::new(resolver);

    // The raw signature check alone, on the same commits.
    let signed: Vec<(PublicKey, SignedCommit)> = agent_sized
        .iter()
        .map(|f| {
            let Frame::Commit(c) = Frame::decode(f).unwrap() else {
                unreachable!()
            };
            let car = CarSlice::parse(&c.blocks).unwrap();
            let commit = SignedCommit::decode(car.get(&c.commit).unwrap()).unwrap();
            let key = PublicKey::from_did_key(keys[&c.repo].as_str().unwrap()).unwrap();
            (key, commit)
        })
        .collect();
    let raw = rate(&signed, |(key, commit)| {
        key.verify(&commit.unsigned, &commit.sig).unwrap();
    });
    println!("raw k256 verify:                               {raw} signatures");

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let verifier = Verifier::new(resolver).with_level(VerifyLevel::Full);
    let commits: Vec<Vec<u8>> = agent_sized.clone();
    // Each commit is checked as if it were the DID's first one seen, so the same commits can be
    // replayed; the rev-chain lookups still run.
    let full = measure(|| {
        runtime.block_on(async {
            for f in &commits {
                let Frame::Commit(c) = Frame::decode(f).unwrap() else {
                    unreachable!()
                };
                let c: &CommitEvent = &c;
                verifier.forget(&c.repo);
                black_box(verifier.verify_commit(c).await.unwrap());
            }
        });
        commits.len() as u64
    });
    println!("Full verification (decode, hashes, signature, MST inversion, chain): {full} commits");

    // Op proofs: one per op of every commit, built from the commit's slice and verified on
    // their own (signature included), as a bus consumer does.
    let all_commits: Vec<CommitEvent> = all
        .iter()
        .filter_map(|f| match Frame::decode(f) {
            Ok(Frame::Commit(c)) => Some(*c),
            _ => None,
        })
        .collect();
    let ops: Vec<(&CommitEvent, usize)> = all_commits
        .iter()
        .flat_map(|c| (0..c.ops.len()).map(move |i| (c, i)))
        .collect();
    let built = measure(|| {
        for c in &all_commits {
            let paths = c.ops.iter().map(|op| op.path.as_str());
            for proof in op_proofs(&c.blocks, paths).unwrap() {
                black_box(proof.unwrap());
            }
        }
        ops.len() as u64
    });
    println!("op_proofs (cut from the commit slices):        {built} proofs");
    let proofs: Vec<(&CommitEvent, usize, Vec<u8>)> = ops
        .iter()
        .map(|(c, i)| (*c, *i, op_proof(&c.blocks, &c.ops[*i].path).unwrap()))
        .collect();
    let mut sizes: Vec<usize> = proofs.iter().map(|p| p.2.len()).collect();
    sizes.sort_unstable();
    println!(
        "op proof sizes over {} ops: min {} / median {} / max {} bytes",
        sizes.len(),
        sizes[0],
        sizes[sizes.len() / 2],
        sizes[sizes.len() - 1]
    );
    let checked = measure(|| {
        runtime.block_on(async {
            for (c, i, proof) in &proofs {
                let op = &c.ops[*i];
                let expected = if op.action == Action::Delete {
                    None
                } else {
                    op.cid
                };
                black_box(
                    verifier
                        .verify_op_proof(&c.repo, &c.rev, &op.path, expected, proof)
                        .await
                        .unwrap(),
                );
            }
        });
        proofs.len() as u64
    });
    println!("verify_op_proof (hashes, signature, MST path): {checked} proofs");

    let ratio = |a: f64, b: f64| 100.0 * a / b;
    match (full.cpu, raw.cpu) {
        (Some(f), Some(r)) => println!(
            "Full verification = {:.1}% of the raw k256 verify rate (CPU time; {:.1}% wall)",
            ratio(f, r),
            ratio(full.wall, raw.wall)
        ),
        _ => println!(
            "Full verification = {:.1}% of the raw k256 verify rate (wall)",
            ratio(full.wall, raw.wall)
        ),
    }
}
