//! `kvrail bench --registry`: the cluster bench. It finds the agents a
//! registry lists (as the cluster soak does, waiting for `--expect-agents`),
//! pairs them (`--pairs`), and measures the aggregate throughput of every
//! pair moving blocks at once against as many raw-UCX pairs doing the same:
//! - kvrail's round: every pair draws a pass (a full window of the decode
//!   region, from the prefill agent's blocks) and poisons its destination;
//!   then all pairs send their requests at once, and the round's time runs
//!   from that start to the last pair's end; then every block is verified
//!   against its prefill agent's pattern, outside the timing;
//! - the raw round: one raw-UCX pair (`kvrail raw-ucx`, two processes) per
//!   agent pair, over a region of the pair's window, all putting the same
//!   number of blocks at once in the same requests through the same op
//!   window;
//!
//! rounds alternating (kvrail, raw, raw, kvrail, ...) after one untimed
//! round each, so each round pair gives a ratio and a drift of the machine
//! falls on both. The raw pairs run on this host, so they need every agent
//! here (`--no-raw` measures kvrail's pairs alone anywhere).

use std::time::Instant;

use anyhow::Context as _;
use kvrail_transfer::Transport;
use rand::SeedableRng;
use serde::Serialize;

use super::raw_loop::RawLoop;
use super::{gbps, median, paired_ratio, ratio};
use crate::cli::{BenchArgs, Mode};
use crate::drive::cluster::{reach, Member, Pair};
use crate::drive::crew::{race, AtAgent, Crew, Failure};
use crate::drive::workload::{Control, Outcome, Workload};
use crate::registry::Registry;

/// One pair's side of kvrail's rounds: its stream of passes.
struct Lane {
    work: Workload,
    control: Control,
    at: AtAgent,
    rng: rand::rngs::StdRng,
    src_blocks: u32,
    /// Blocks per round.
    n: usize,
}

#[derive(Debug, Default, Serialize)]
struct PairResult {
    decode: String,
    prefill: String,
    blocks_per_round: usize,
    /// The pair's bytes over its own time sending, over kvrail's timed
    /// rounds.
    gbps: f64,
    verified_blocks: u64,
    bad_blocks: u64,
    failed_requests: u64,
    first_error: String,
}

#[derive(Debug, Default, Serialize)]
struct Report {
    ok: bool,
    registry: String,
    pairing: String,
    prefill_agents: usize,
    decode_agents: usize,
    pairs: usize,
    transport: String,
    mode: String,
    block_bytes: u64,
    /// Bytes every round moves, all pairs together.
    round_bytes: u64,
    /// Medians over the timed rounds of each side: the round's bytes over
    /// its wall time.
    kvrail_gbps: f64,
    raw_ucx_gbps: Option<f64>,
    /// [`paired_ratio`] of `ratio_rounds`.
    ratio: Option<f64>,
    kvrail_gbps_rounds: Vec<f64>,
    raw_ucx_gbps_rounds: Vec<f64>,
    ratio_rounds: Vec<f64>,
    verified: bool,
    verified_blocks: u64,
    bad_blocks: u64,
    failed_requests: u64,
    p50_us: f64,
    p99_us: f64,
    per_pair: Vec<PairResult>,
    failure: Option<Failure>,
}

pub(super) async fn run(a: &BenchArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        a.peer.is_none(),
        "--peer and --registry are two ways to name the agents: give one (--registry finds every agent it lists)"
    );
    let mode = match a.mode[..] {
        [m] => m,
        _ => anyhow::bail!("a cluster bench measures one --mode at a time"),
    };
    let Some(reg) = Registry::open(a.cluster.reg.registry.as_ref(), a.cluster.reg.peers.as_deref()).await? else {
        unreachable!("cluster mode has a registry or a peers file");
    };
    let crew = Crew::new();
    let mut r = Report { registry: reg.describe(), pairing: a.cluster.pairs.name().into(), mode: mode.name().into(), ..Default::default() };
    if let Err(f) = race(&crew, measure(a, mode, &reg, &crew, &mut r)).await {
        r.failure = Some(f);
    }
    r.verified = r.verified_blocks > 0 && r.bad_blocks == 0 && r.failed_requests == 0;
    r.ok = r.failure.is_none() && r.verified;
    if a.out.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        print_human(&r);
    }
    if let Some(f) = &r.failure {
        eprintln!("kvrail bench: FAILED: {}", f.human());
    }
    Ok(if r.ok { 0 } else { 1 })
}

/// Finds and checks the agents, starts the raw pairs, runs the rounds;
/// fills `r` as it goes, so a run that fails still reports what it did.
async fn measure(a: &BenchArgs, mode: Mode, reg: &Registry, crew: &Crew, r: &mut Report) -> anyhow::Result<()> {
    let (members, pairs, _probes) = reach(&a.cluster, &a.tls, a.out.seed, reg, crew, "bench").await?;
    let t = transport_of(&members)?;
    if !a.no_raw {
        local_only(&members)?;
    }
    let block = members[0].layout.block_bytes;
    r.prefill_agents = members.iter().filter(|m| m.entry.role == "prefill").count();
    r.decode_agents = members.len() - r.prefill_agents;
    r.pairs = pairs.len();
    (r.transport, r.block_bytes) = (t.to_string(), block);
    let mut lanes: Vec<Lane> = pairs.iter().enumerate().map(|(k, p)| lane(a, mode, &members, p, k)).collect();
    r.per_pair = pairs
        .iter()
        .zip(&lanes)
        .map(|(p, l)| PairResult {
            decode: members[p.decode].entry.agent_id.clone(),
            prefill: members[p.prefill].entry.agent_id.clone(),
            blocks_per_round: l.n,
            ..Default::default()
        })
        .collect();
    r.round_bytes = lanes.iter().map(|l| l.n as u64 * block).sum();
    let mut raws = Vec::new();
    if !a.no_raw {
        for (p, l) in pairs.iter().zip(&lanes) {
            // The raw pair's region: the pair's window of the decode region.
            let region = u64::from(p.window.end - p.window.start) * block;
            let ra = BenchArgs { region_bytes: Some(region), no_pin: true, ..a.clone() };
            let raw = RawLoop::start(&ra, t, block, mode).await.with_context(|| format!("a raw-UCX pair for {}", l.at))?;
            raws.push(raw);
        }
    }
    // One untimed round each, then the timed rounds by turns.
    let mut pair_out: Vec<Outcome> = (0..lanes.len()).map(|_| Outcome::default()).collect();
    let warm = kvrail_round(&mut lanes, "warm-up").await?;
    for (o, w) in pair_out.iter_mut().zip(warm.1) {
        // The warm-up's blocks count as verified (or not), not as timed.
        o.verified_blocks += w.verified_blocks;
        o.bad_blocks += w.bad_blocks;
        o.failed_requests += w.failed_requests;
        o.first_error.clone_from(&w.first_error);
    }
    if !raws.is_empty() {
        raw_round(&mut raws, &lanes).await?;
    }
    let rounds = a.repeat.max(1);
    for i in 0..rounds {
        let kvrail_first = i % 2 == 0;
        for kvrail_now in [kvrail_first, !kvrail_first] {
            if kvrail_now {
                let (secs, outs) = kvrail_round(&mut lanes, &format!("round-{i}")).await?;
                r.kvrail_gbps_rounds.push(gbps(r.round_bytes, secs));
                for (o, x) in pair_out.iter_mut().zip(outs) {
                    o.absorb(x);
                }
            } else if !raws.is_empty() {
                let secs = raw_round(&mut raws, &lanes).await?;
                r.raw_ucx_gbps_rounds.push(gbps(r.round_bytes, secs));
            }
        }
        tracing::info!(round = i, of = rounds, "cluster bench round");
        tally(r, &pair_out, block);
    }
    for raw in raws {
        raw.stop().await;
    }
    Ok(())
}

/// Every figure of `r` from the pairs' outcomes and the rounds so far.
fn tally(r: &mut Report, pair_out: &[Outcome], block: u64) {
    let mut all = Outcome::default();
    for (p, o) in r.per_pair.iter_mut().zip(pair_out) {
        p.gbps = gbps(o.blocks * block, o.seconds);
        (p.verified_blocks, p.bad_blocks, p.failed_requests) = (o.verified_blocks, o.bad_blocks, o.failed_requests);
        p.first_error.clone_from(&o.first_error);
        all.absorb(o.clone());
    }
    (r.verified_blocks, r.bad_blocks, r.failed_requests) = (all.verified_blocks, all.bad_blocks, all.failed_requests);
    (r.p50_us, r.p99_us) = (all.latency_ms(0.5) * 1e3, all.latency_ms(0.99) * 1e3);
    r.kvrail_gbps = median(&mut r.kvrail_gbps_rounds.clone());
    r.ratio_rounds = r.kvrail_gbps_rounds.iter().zip(&r.raw_ucx_gbps_rounds).map(|(k, w)| ratio(*k, *w)).collect();
    if !r.raw_ucx_gbps_rounds.is_empty() {
        r.raw_ucx_gbps = Some(median(&mut r.raw_ucx_gbps_rounds.clone()));
        r.ratio = Some(paired_ratio(&r.ratio_rounds));
    }
}

/// The pair's stream: requests name the prefill agent, blocks land in the
/// pair's window, a full window per round (at most the prefill agent's
/// blocks).
fn lane(a: &BenchArgs, mode: Mode, members: &[Member], p: &Pair, k: usize) -> Lane {
    let (d, pre) = (&members[p.decode], &members[p.prefill]);
    let request_blocks = (a.request_bytes / d.layout.block_bytes) as usize;
    let work = p.workload(members, mode.to_pb(), request_blocks, a.concurrency);
    let src_blocks = pre.layout.num_blocks;
    let n = (p.window.end - p.window.start).min(src_blocks).max(1) as usize;
    let rng = rand::rngs::StdRng::seed_from_u64(a.out.seed ^ (k as u64) << 20);
    Lane { work, control: d.control.clone(), at: AtAgent(d.name.clone()), rng, src_blocks, n }
}

/// One kvrail round: every lane draws (and poisons), then all send at
/// once (timed: the first start to the last end), then all verify.
/// Returns the round's seconds and each lane's outcome.
async fn kvrail_round(lanes: &mut [Lane], tag: &str) -> anyhow::Result<(f64, Vec<Outcome>)> {
    let mut drawn = Vec::with_capacity(lanes.len());
    for l in lanes.iter_mut() {
        drawn.push(l.work.draw(&mut l.control, l.src_blocks, l.n, &mut l.rng).await.context(l.at.clone())?);
    }
    let t0 = Instant::now();
    let moved = all(lanes.iter().zip(&drawn).enumerate().map(|(k, (l, d))| {
        let (work, mut control, at, tag) = (l.work.clone(), l.control.clone(), l.at.clone(), format!("bench-{tag}-{k}"));
        let d = d.clone();
        async move { work.send(&mut control, &d, &tag).await.context(at) }
    }))
    .await?;
    let secs = t0.elapsed().as_secs_f64();
    let mut outs = Vec::with_capacity(lanes.len());
    for ((l, d), m) in lanes.iter_mut().zip(&drawn).zip(moved) {
        outs.push(l.work.verify(&mut l.control, d, m).await.context(l.at.clone())?);
    }
    Ok((secs, outs))
}

/// One raw round: every raw pair puts its lane's block count at once.
/// Returns the round's seconds.
async fn raw_round(raws: &mut Vec<RawLoop>, lanes: &[Lane]) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let taken = std::mem::take(raws);
    let back = all(taken.into_iter().zip(lanes.iter().map(|l| l.n)).map(|(mut raw, n)| async move {
        raw.pass(n).await?;
        anyhow::Ok(raw)
    }))
    .await?;
    let secs = t0.elapsed().as_secs_f64();
    *raws = back;
    Ok(secs)
}

/// Runs `tasks` at once; their results in order, or the first error.
async fn all<T: Send + 'static>(
    tasks: impl IntoIterator<Item = impl std::future::Future<Output = anyhow::Result<T>> + Send + 'static>,
) -> anyhow::Result<Vec<T>> {
    let mut set = tokio::task::JoinSet::new();
    for (i, t) in tasks.into_iter().enumerate() {
        set.spawn(async move { (i, t.await) });
    }
    let mut out: Vec<Option<T>> = (0..set.len()).map(|_| None).collect();
    while let Some(done) = set.join_next().await {
        let (i, r) = done.context("a pair's task ended abnormally")?;
        out[i] = Some(r?);
    }
    Ok(out.into_iter().map(|x| x.expect("every task answered")).collect())
}

/// The one transport every agent serves.
fn transport_of(members: &[Member]) -> anyhow::Result<Transport> {
    let first = &members[0];
    if let Some(m) = members.iter().find(|m| m.transport != first.transport) {
        anyhow::bail!(
            "{} serves {} and {} serves {}: a cluster bench compares one transport with its raw-UCX pairs; start every agent with the same --transport",
            first.name.describe(),
            first.transport,
            m.name.describe(),
            m.transport
        );
    }
    first.transport.parse().map_err(|e| anyhow::anyhow!("{} reports transport {:?}: {e}", first.name.describe(), first.transport))
}

/// The raw pairs run here: every agent must be on this host.
fn local_only(members: &[Member]) -> anyhow::Result<()> {
    let here = crate::registry::hostname();
    match members.iter().find(|m| m.entry.host != here) {
        None => Ok(()),
        Some(m) => Err(anyhow::anyhow!(
            "{} is on host {}, and the raw-UCX pairs run on this host ({here}): run the bench on the agents' host, or pass --no-raw to measure kvrail's pairs alone",
            m.name.describe(),
            m.entry.host
        )),
    }
}

fn print_human(r: &Report) {
    println!(
        "cluster bench: {} prefill x {} decode agents, {} pairs ({}), {} {} {} B blocks, {} B a round",
        r.prefill_agents, r.decode_agents, r.pairs, r.pairing, r.transport, r.mode, r.block_bytes, r.round_bytes
    );
    let raw = match (r.raw_ucx_gbps, r.ratio) {
        (Some(g), Some(x)) => format!(", raw-UCX pairs {g:.2} GB/s, ratio {x:.2}"),
        _ => String::new(),
    };
    println!("  aggregate  kvrail {:.2} GB/s{raw}; p50 {:.0} us, p99 {:.0} us per request", r.kvrail_gbps, r.p50_us, r.p99_us);
    for p in &r.per_pair {
        let err = if p.first_error.is_empty() { String::new() } else { format!(" — {}", p.first_error) };
        println!(
            "  pair       {} <- {}: {:.2} GB/s while sending, {} blocks verified, {} bad, {} requests failed{err}",
            p.decode, p.prefill, p.gbps, p.verified_blocks, p.bad_blocks, p.failed_requests
        );
    }
    println!("  verdict    {}", if r.ok { "ok" } else { "FAILED" });
}
