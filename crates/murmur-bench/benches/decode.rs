//! Decode + CID re-hash throughput on realistic traffic (murmur-sync's
//! tests/fixtures/corpus-realistic:
//! commits on repos of ~5,000 records), murmur beside jacquard 0.12 doing the same work, in
//! interleaved rounds on the calling thread (one core). Each figure is printed beside its
//! goal; rates are frames per second of this thread's CPU time (wall-clock beside them).
//!
//! The work per frame: decode the `subscribeRepos` frame into a typed event and check every
//! block of its CAR slice against its CID (sha2-256). The ceiling is sha2-256 alone over the
//! same blocks, measured in the same rounds.
//!
//! `cargo bench -p murmur-bench --bench decode`

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use murmur_sync::{CarSlice, Frame};
use sha2::{Digest, Sha256};

/// Rounds per contender; contenders take turns within each round.
const ROUNDS: usize = 9;
/// How long one contender runs in one round.
const ROUND: Duration = Duration::from_millis(600);
/// Goal: frames decoded and re-hashed per second on one core.
const GOAL_RATE: f64 = 250_000.0;
/// Goal: murmur's rate as a share of sha2-256 alone over the same blocks (the 250k
/// frames/s was this share of the hashing limit on ~5 KB frames).
const GOAL_SHARE_OF_CEILING: f64 = 0.75;
/// Goal: murmur's rate over jacquard's on the same frames.
const GOAL_VS_JACQUARD: f64 = 2.0;

fn corpus_dir() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../murmur-sync/tests/fixtures/corpus-realistic"
    )
    .to_string()
}

/// The recorded frames, each in a buffer of its own (as a WebSocket client hands them over).
fn frames() -> Vec<Bytes> {
    let path = format!("{}/frames.bin", corpus_dir());
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 4 {
        let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        out.push(Bytes::copy_from_slice(&rest[4..4 + n]));
        rest = &rest[4 + n..];
    }
    out
}

/// Nanoseconds this thread has run (from /proc; None elsewhere).
fn thread_cpu() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = stat.split_whitespace().next()?.parse().ok()?;
    Some(Duration::from_nanos(ns))
}

/// One measurement: frames per CPU second (per wall second when CPU time is unavailable)
/// and per wall second.
#[derive(Clone, Copy)]
struct Sample {
    cpu: f64,
    wall: f64,
}

/// Runs `pass` (one pass over the corpus, returning frames done) for about `ROUND`.
fn sample(pass: &mut dyn FnMut() -> u64) -> Sample {
    let cpu0 = thread_cpu();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < ROUND {
        n += pass();
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = match (cpu0, thread_cpu()) {
        (Some(a), Some(b)) if b > a => (b - a).as_secs_f64(),
        _ => wall,
    };
    Sample {
        cpu: n as f64 / cpu,
        wall: n as f64 / wall,
    }
}

fn min_median(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[0], v[v.len() / 2])
}

/// murmur: the frame as the socket hands it over (a `Bytes`: the CAR slice is a view of it).
fn murmur_shared(frame: &Bytes) -> usize {
    match Frame::decode(frame).expect("a corpus frame decodes") {
        Frame::Commit(c) => black_box(CarSlice::parse(&c.blocks).expect("hashes match")).len(),
        _ => 0,
    }
}

/// murmur: the frame as a plain slice (the CAR slice is copied out once).
fn murmur_slice(frame: &[u8]) -> usize {
    match Frame::decode(frame).expect("a corpus frame decodes") {
        Frame::Commit(c) => black_box(CarSlice::parse(&c.blocks).expect("hashes match")).len(),
        _ => 0,
    }
}

/// jacquard 0.12: its subscribeRepos message decoder, its CAR reader, and each block's
/// sha2-256 compared with the digest in its CID.
mod jacquard {
    use std::hint::black_box;
    use std::task::{Context, Poll, Waker};

    use jacquard_api::com_atproto::sync::subscribe_repos::SubscribeReposMessage;
    use sha2::{Digest, Sha256};

    /// Polls a future that never waits (the CAR reader reads from memory) to completion.
    fn ready<T>(fut: impl Future<Output = T>) -> T {
        let mut fut = std::pin::pin!(fut);
        let mut cx = Context::from_waker(Waker::noop());
        loop {
            if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
                return v;
            }
        }
    }

    /// Decodes with strings borrowed from the frame (jacquard's zero-copy mode).
    pub fn decode_and_hash(frame: &[u8]) -> usize {
        let message = SubscribeReposMessage::<&str>::decode_framed(frame)
            .expect("jacquard decodes the frame");
        let SubscribeReposMessage::Commit(commit) = message else {
            return 0;
        };
        let car = ready(jacquard_repo::car::parse_car_bytes(&commit.blocks))
            .expect("jacquard parses the CAR slice");
        for (cid, data) in &car.blocks {
            let digest = Sha256::digest(data);
            assert_eq!(cid.hash().digest(), digest.as_slice(), "block {cid}");
        }
        black_box(&commit);
        car.blocks.len()
    }
}

struct Stats {
    frames: usize,
    commits: usize,
    bytes: usize,
    blocks: usize,
    nodes: usize,
    single_op: usize,
    ops: usize,
    /// Every block's bytes: what the re-hash reads.
    block_data: Vec<(usize, std::ops::Range<usize>)>,
}

fn stats(frames: &[Bytes]) -> Stats {
    let mut s = Stats {
        frames: frames.len(),
        commits: 0,
        bytes: 0,
        blocks: 0,
        nodes: 0,
        single_op: 0,
        ops: 0,
        block_data: Vec::new(),
    };
    for (i, f) in frames.iter().enumerate() {
        s.bytes += f.len();
        let Ok(Frame::Commit(c)) = Frame::decode(f) else {
            continue;
        };
        let car = CarSlice::parse(&c.blocks).expect("hashes match");
        let records = c
            .ops
            .iter()
            .filter(|op| op.cid.is_some_and(|cid| car.get(&cid).is_some()))
            .count();
        s.commits += 1;
        s.blocks += car.len();
        s.nodes += car.len() - 1 - records;
        s.ops += c.ops.len();
        s.single_op += usize::from(c.ops.len() == 1);
        let first = s.block_data.len();
        for (_, data) in car.blocks() {
            let start = data.as_ptr() as usize - f.as_ptr() as usize;
            s.block_data.push((i, start..start + data.len()));
        }
        // In the frame's order, as the decoder reads them (`blocks()` lists them by CID).
        s.block_data[first..].sort_by_key(|(_, range)| range.start);
    }
    s
}

fn main() {
    let frames = frames();
    let s = stats(&frames);
    let per = |n: usize| n as f64 / s.commits.max(1) as f64;
    println!(
        "corpus-realistic: {} frames, {} commits ({} single-op, {} batches); per commit: {:.0} bytes, {:.1} blocks, {:.1} MST nodes, {:.2} ops",
        s.frames,
        s.commits,
        s.single_op,
        s.commits - s.single_op,
        per(s.bytes),
        per(s.blocks),
        per(s.nodes),
        per(s.ops),
    );
    let hashed: usize = s.block_data.iter().map(|(_, r)| r.len()).sum();
    println!(
        "re-hash reads {:.0} bytes per frame ({:.1}% of the frame)",
        hashed as f64 / s.frames as f64,
        100.0 * hashed as f64 / s.bytes as f64
    );

    // Every contender does the same work: same frames, same blocks.
    let blocks_of = |f: &dyn Fn(&Bytes) -> usize| frames.iter().map(f).sum::<usize>();
    let want = blocks_of(&murmur_shared);
    assert_eq!(blocks_of(&|f| murmur_slice(f)), want);
    assert_eq!(blocks_of(&|f| jacquard::decode_and_hash(f)), want);
    assert_eq!(s.block_data.len(), want);

    let n = frames.len() as u64;
    let mut shared = || {
        for f in &frames {
            murmur_shared(f);
        }
        n
    };
    let mut slice = || {
        for f in &frames {
            murmur_slice(f);
        }
        n
    };
    let mut jacq = || {
        for f in &frames {
            jacquard::decode_and_hash(f);
        }
        n
    };
    let mut sha_only = || {
        for (i, range) in &s.block_data {
            black_box(Sha256::digest(&frames[*i][range.clone()]));
        }
        n
    };
    let mut contenders: Vec<(&str, &mut dyn FnMut() -> u64)> = vec![
        ("murmur, frame as Bytes (zero-copy)", &mut shared),
        ("murmur, frame as &[u8] (CAR copied)", &mut slice),
        ("jacquard 0.12", &mut jacq),
        ("sha2-256 alone (the ceiling)", &mut sha_only),
    ];
    for (_, pass) in contenders.iter_mut() {
        pass(); // warm up
    }
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); contenders.len()];
    for round in 0..ROUNDS {
        // Rotate who goes first, so drift on a shared machine falls on everyone alike.
        for k in 0..contenders.len() {
            let i = (round + k) % contenders.len();
            samples[i].push(sample(&mut *contenders[i].1));
        }
    }

    println!(
        "\ndecode + CID re-hash, {ROUNDS} interleaved rounds of {ROUND:?} each (frames/s of CPU; wall in brackets):"
    );
    let cpu = |i: usize| samples[i].iter().map(|s| s.cpu).collect::<Vec<_>>();
    let wall = |i: usize| samples[i].iter().map(|s| s.wall).collect::<Vec<_>>();
    for (i, (name, _)) in contenders.iter().enumerate() {
        let (min, median) = min_median(cpu(i));
        let (wmin, wmedian) = min_median(wall(i));
        println!(
            "  {name:<38} min {min:>9.0}  median {median:>9.0}   [wall: min {wmin:>9.0}  median {wmedian:>9.0}]"
        );
    }
    let (min, median) = min_median(cpu(0));
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    println!(
        "\nmurmur (zero-copy): median {median:.0} frames/s, min {min:.0} — goal >= {GOAL_RATE:.0}: {}",
        verdict(median >= GOAL_RATE)
    );
    // Each round's ratio, murmur over jacquard in the same round.
    let ratios: Vec<f64> = samples[0]
        .iter()
        .zip(&samples[2])
        .map(|(m, j)| m.cpu / j.cpu)
        .collect();
    let (rmin, rmedian) = min_median(ratios);
    println!(
        "murmur / jacquard 0.12: median {rmedian:.2}x, min {rmin:.2}x — goal >= {GOAL_VS_JACQUARD:.1}x: {}",
        verdict(rmedian >= GOAL_VS_JACQUARD)
    );
    // The 250k goal was set as about 75% of the hashing limit for ~5 KB frames; this corpus
    // re-hashes more bytes per frame, so the share of the limit measured in the same rounds is
    // the goal that carries over.
    let shares: Vec<f64> = samples[0]
        .iter()
        .zip(&samples[3])
        .map(|(m, h)| m.cpu / h.cpu)
        .collect();
    let (smin, smedian) = min_median(shares);
    println!(
        "murmur / sha2-256 alone over the same blocks (the ceiling): median {:.0}%, min {:.0}% — goal >= {:.0}%: {}",
        100.0 * smedian,
        100.0 * smin,
        100.0 * GOAL_SHARE_OF_CEILING,
        verdict(smedian >= GOAL_SHARE_OF_CEILING)
    );
}
