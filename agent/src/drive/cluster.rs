//! `kvrail soak --registry`: the cluster soak. It finds the agents a
//! registry lists (waiting for `--expect-agents` of them), then drives
//! every decode x prefill pair at once for `--duration`: each pair is its
//! own stream of verified passes whose requests name the prefill agent by
//! id and address, so each decode agent dials its peers on demand and
//! holds a session with every one of them, over its one region (each pair
//! of a decode agent writes into its own window of that region). Each
//! prefill agent fills its blocks with a pattern of its own seed: a block
//! that came from the wrong peer does not verify.
//!
//! It writes one report: per agent its memory verdict and RSS slope (and
//! its own chart), per pair its throughput, latency and failures, and one
//! SVG with every agent's RSS. It exits 0 only if every agent is `ok`,
//! every block verified and no request failed. Like the two-agent soak it
//! stops at once when an agent stops answering for its lease, and still
//! writes the report.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kvrail_proto::v1 as pb;
use rand::SeedableRng;
use serde::Serialize;

use super::children::control_at;
use super::crew::{race, AgentName, AtAgent, Crew, Failure, Probe};
use super::progress::Progress;
use super::soak::{
    agent_result, print_agent, print_end, print_head, write_and_print, AgentResult, Totals, KEEP_STATS_EVERY, REMOTE_LEASE, STATS_LIMIT,
};
use super::workload::{Control, Outcome, Workload};
use crate::cli::{ClusterArgs, Pairs, SoakArgs};
use crate::registry::{Entry, Registry};
use crate::tls::TlsArgs;

/// How often the registry is listed while waiting for `--expect-agents`.
const RENDEZVOUS_POLL: Duration = Duration::from_millis(500);

/// One agent of the cluster, as found and reached.
pub(super) struct Member {
    pub(super) entry: Entry,
    pub(super) name: AgentName,
    pub(super) control: Control,
    pub(super) layout: pb::BlockLayout,
    pub(super) transport: String,
}

/// One decode x prefill pair: indices into the members, the seed of the
/// prefill agent's pattern, and the decode agent's blocks it writes into.
#[derive(Debug, Clone)]
pub(super) struct Pair {
    pub(super) decode: usize,
    pub(super) prefill: usize,
    pub(super) seed: u64,
    pub(super) window: std::ops::Range<u32>,
}

#[derive(Debug, Serialize)]
struct ClusterAgent {
    agent_id: String,
    role: String,
    address: String,
    host: String,
    rank: Option<u32>,
    /// Its memory verdict (`ok`, `leak`, ...), or `unknown` if its Stats
    /// could not be read.
    verdict: String,
    rss_slope_mib_per_min: Option<f64>,
    /// Peer sessions it held open at the end.
    open_sessions: usize,
    /// The rest of what it reported.
    detail: Option<AgentResult>,
}

#[derive(Debug, Serialize)]
struct PairResult {
    decode: String,
    prefill: String,
    passes: u64,
    blocks: u64,
    bytes: u64,
    requests: u64,
    failed_requests: u64,
    verified: bool,
    verified_blocks: u64,
    bad_blocks: u64,
    gbps_while_moving: f64,
    p50_ms: f64,
    p99_ms: f64,
    first_error: String,
}

#[derive(Debug, Serialize)]
struct ClusterReport {
    #[serde(flatten)]
    totals: Totals,
    registry: String,
    pairing: String,
    /// Every pair's bytes over the run's wall time (passes overlap, and
    /// include poisoning and verifying).
    aggregate_gbps: f64,
    agents: Vec<ClusterAgent>,
    pairs: Vec<PairResult>,
    /// The SVG with every agent's RSS.
    chart: String,
}

/// What the run has measured so far; shared with the pairs' tasks and kept
/// outside the run, so a run that fails still reports it.
#[derive(Debug, Default)]
struct Measured {
    started: Option<Instant>,
    /// Per pair: what its passes did, and how many there were.
    pairs: Vec<(Outcome, u64)>,
    /// Per member: its latest Stats, and when.
    kept: Vec<Option<(Instant, pb::StatsResponse)>>,
}

pub async fn run(a: &SoakArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        a.decode.is_none() && a.test_inject_leak_mib_per_min.is_none() && !a.demo_allow_ucx_mmap_hooks,
        "a cluster soak (--registry/--peers) drives the agents it finds: it takes no --decode/--prefill, no leak injection and no hooks demonstration"
    );
    let Some(reg) = Registry::open(a.cluster.reg.registry.as_ref(), a.cluster.reg.peers.as_deref()).await? else {
        unreachable!("cluster mode has a registry or a peers file");
    };
    std::fs::create_dir_all(&a.report).with_context(|| format!("creating report dir {}", a.report.display()))?;
    let crew = Crew::new();
    let m = Arc::new(Mutex::new(Measured::default()));
    let mut failure = None;
    let found = race(&crew, reach(&a.cluster, &a.tls, a.out.seed, &reg, &crew, "soak")).await;
    let (members, pairs, _probes) = match found {
        Ok(f) => f,
        Err(f) => {
            failure = Some(f);
            Default::default()
        }
    };
    if failure.is_none() {
        {
            let mut g = m.lock().expect("lock");
            g.pairs = vec![(Outcome::default(), 0); pairs.len()];
            g.kept = vec![None; members.len()];
        }
        let progress = Progress::new("soak", a.duration.as_secs(), "s");
        if let Err(f) = race(&crew, drive(a, &members, &pairs, m.clone(), &progress)).await {
            failure = Some(f);
        }
    }
    let report = report(a, &reg, &members, &pairs, &m, failure).await;
    write_and_print(a, &report, &report.totals, |path| print_human(&report, path))
}

/// The registry's agents (after the rendezvous), reached and checked, the
/// pairs they make (`seed` the first prefill agent's pattern), and a
/// liveness probe of each. `what` names the run (`soak`, `bench`).
pub(super) async fn reach(
    c: &ClusterArgs,
    tls: &TlsArgs,
    seed: u64,
    reg: &Registry,
    crew: &Crew,
    what: &str,
) -> anyhow::Result<(Vec<Member>, Vec<Pair>, Vec<Probe>)> {
    let entries = rendezvous(c, reg, what).await?;
    let tls = tls.load()?;
    let mut members = Vec::with_capacity(entries.len());
    for entry in entries {
        let name = AgentName { role: entry.role.clone(), agent_id: entry.agent_id.clone(), pid: None, address: entry.address.clone() };
        let at = AtAgent(name.clone());
        let mut control = control_at(&entry.address, tls.as_ref()).await.context(at.clone())?;
        let info = control.info(pb::InfoRequest {}).await.context(at.clone())?.into_inner().agent.context("it reported no AgentInfo")?;
        let layout = info.layout.with_context(|| format!("{}: it reported no layout", name.describe()))?;
        members.push(Member { entry, name, control, layout, transport: info.transport });
    }
    if let Some((x, y)) = members.iter().zip(members.iter().skip(1)).find(|(x, y)| x.layout.block_bytes != y.layout.block_bytes) {
        anyhow::bail!(
            "{} has {} B blocks and {} has {} B: agents that move blocks between them need one block size (--block-bytes)",
            x.name.describe(),
            x.layout.block_bytes,
            y.name.describe(),
            y.layout.block_bytes
        );
    }
    let shape: Vec<(&str, u32)> = members.iter().map(|m| (m.entry.role.as_str(), m.layout.num_blocks)).collect();
    let pairs = pairs(c.pairs, seed, &shape);
    // Each prefill agent's pattern, of its own seed.
    for (i, p) in members.iter_mut().enumerate().filter(|(_, m)| m.entry.role == "prefill") {
        let Some(seed) = pairs.iter().find(|x| x.prefill == i).map(|x| x.seed) else { continue };
        let at = AtAgent(p.name.clone());
        p.control.fill_pattern(pb::FillPatternRequest { seed }).await.context(at)?;
    }
    let probes = members.iter().map(|m| crew.watch_remote(m.name.clone(), m.control.clone(), REMOTE_LEASE)).collect();
    Ok((members, pairs, probes))
}

/// Lists the registry until it holds `--expect-agents` agents, at least
/// one of each role (at most `--rendezvous`).
async fn rendezvous(a: &ClusterArgs, reg: &Registry, what: &str) -> anyhow::Result<Vec<Entry>> {
    let t0 = Instant::now();
    let mut warned = std::collections::HashSet::new();
    loop {
        let (why, waiting) = match reg.list(None).await {
            Ok(l) => {
                for (key, why) in &l.skipped {
                    if warned.insert(key.clone()) {
                        tracing::warn!("skipped registry entry {key}: {why}");
                    }
                }
                let prefill = l.entries.iter().filter(|e| e.role == "prefill").count();
                let decode = l.entries.len() - prefill;
                let want = a.expect_agents.unwrap_or(0);
                if l.entries.len() >= want && prefill > 0 && decode > 0 {
                    return Ok(l.entries);
                }
                let of = a.expect_agents.map_or(String::new(), |n| format!(" of the {n} expected"));
                let skipped = if l.skipped.is_empty() { String::new() } else { format!(", {} entry(ies) skipped", l.skipped.len()) };
                let why = format!("{} lists {prefill} prefill and {decode} decode agent(s){of}{skipped}", reg.describe());
                (why, a.expect_agents.is_some())
            }
            Err(e) => (e.to_string(), true),
        };
        if !waiting || t0.elapsed() >= a.rendezvous {
            let waited = if waiting { format!(" after {:.0} s", t0.elapsed().as_secs_f64()) } else { String::new() };
            anyhow::bail!(
                "{why}{waited}: a cluster {what} needs at least one agent of each role, started with --registry and --test-patterns"
            );
        }
        tokio::time::sleep(RENDEZVOUS_POLL).await;
    }
}

/// The pairs `pairing` makes of agents of these (role, block count),
/// each prefill agent's seed (`seed` plus its place among them), and each
/// decode agent's region split into one window per pair it is in.
fn pairs(pairing: Pairs, seed: u64, agents: &[(&str, u32)]) -> Vec<Pair> {
    let of = |role: &str| agents.iter().enumerate().filter(|(_, m)| m.0 == role).map(|(i, _)| i).collect::<Vec<_>>();
    let (decode, prefill) = (of("decode"), of("prefill"));
    if decode.is_empty() || prefill.is_empty() {
        return Vec::new();
    }
    let seed_of = |p: usize| seed.wrapping_add(prefill.iter().position(|&x| x == p).expect("a prefill agent") as u64);
    let v: Vec<(usize, usize)> = match pairing {
        Pairs::All => decode.iter().flat_map(|&d| prefill.iter().map(move |&p| (d, p))).collect(),
        Pairs::OneToOne => (0..decode.len().max(prefill.len())).map(|i| (decode[i % decode.len()], prefill[i % prefill.len()])).collect(),
    };
    let mut out = Vec::with_capacity(v.len());
    for &d in &decode {
        let mut mine: Vec<usize> = v.iter().filter(|x| x.0 == d).map(|x| x.1).collect();
        mine.sort_unstable();
        mine.dedup();
        let w = agents[d].1 / mine.len().max(1) as u32;
        for (j, p) in mine.into_iter().enumerate() {
            let j = j as u32;
            out.push(Pair { decode: d, prefill: p, seed: seed_of(p), window: j * w..(j + 1) * w });
        }
    }
    out
}

impl Pair {
    /// The pair's stream: requests name the prefill agent by id and
    /// address, and land in the pair's window of the decode region.
    pub(super) fn workload(&self, members: &[Member], mode: pb::TransferMode, request_blocks: usize, concurrency: usize) -> Workload {
        let p = &members[self.prefill];
        Workload {
            seed: self.seed,
            mode,
            request_blocks: request_blocks.max(1),
            concurrency: concurrency.max(1),
            peer: p.entry.agent_id.clone(),
            peer_address: p.entry.address.clone(),
            dst_window: Some(self.window.clone()),
            ..Default::default()
        }
    }
}

/// Every pair's passes at once until `--duration`; meanwhile every
/// agent's Stats are kept every few seconds and progress is shown.
async fn drive(a: &SoakArgs, members: &[Member], pairs: &[Pair], m: Arc<Mutex<Measured>>, progress: &Progress) -> anyhow::Result<()> {
    let start = Instant::now();
    m.lock().expect("lock").started = Some(start);
    let mut set = tokio::task::JoinSet::new();
    for (k, pair) in pairs.iter().enumerate() {
        let (d, p) = (&members[pair.decode], &members[pair.prefill]);
        let work = pair.workload(members, a.mode.to_pb(), a.request_blocks, a.concurrency);
        let src_blocks = p.layout.num_blocks;
        let n = a.pass_blocks.clamp(1, (src_blocks.min(pair.window.len() as u32) as usize).max(1));
        let (mut control, at, m) = (d.control.clone(), AtAgent(d.name.clone()), m.clone());
        let (duration, pause) = (a.duration, Duration::from_millis(a.pause_ms));
        let mut rng = rand::rngs::StdRng::seed_from_u64(a.out.seed ^ (k as u64) << 20);
        set.spawn(async move {
            let mut passes = 0u64;
            while start.elapsed() < duration {
                let tag = format!("soak-{k}-{passes}");
                let o = work.pass(&mut control, src_blocks, n, &tag, &mut rng).await.context(at.clone())?;
                {
                    let mut g = m.lock().expect("lock");
                    g.pairs[k].0.absorb(o);
                    g.pairs[k].1 += 1;
                }
                passes += 1;
                tokio::time::sleep(pause).await;
            }
            anyhow::Ok(())
        });
    }
    let all = async {
        while let Some(r) = set.join_next().await {
            r.context("a pair's task ended abnormally")??;
        }
        anyhow::Ok(())
    };
    let watch = async {
        let mut kept_at: Option<Instant> = None;
        loop {
            if kept_at.is_none_or(|t| t.elapsed() >= KEEP_STATS_EVERY) {
                for (i, x) in members.iter().enumerate() {
                    let mut c = x.control.clone();
                    if let Ok(Ok(s)) = tokio::time::timeout(STATS_LIMIT, c.stats(pb::StatsRequest {})).await {
                        m.lock().expect("lock").kept[i] = Some((Instant::now(), s.into_inner()));
                    }
                }
                kept_at = Some(Instant::now());
            }
            let (total, _) = sum(&m.lock().expect("lock"));
            let bytes = total.blocks * members[0].layout.block_bytes;
            progress.tick(
                start.elapsed().as_secs(),
                format!(
                    "{:.0} s of {:.0} s, {} pairs, {:.2} GB/s, {} of {} blocks verified, {} requests failed",
                    start.elapsed().as_secs_f64(),
                    a.duration.as_secs_f64(),
                    pairs.len(),
                    bytes as f64 / start.elapsed().as_secs_f64().max(1e-3) / 1e9,
                    total.verified_blocks,
                    total.blocks,
                    total.failed_requests
                ),
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    };
    tokio::select! {
        r = all => r,
        never = watch => never,
    }
}

/// Every pair's outcome together, and the passes.
fn sum(m: &Measured) -> (Outcome, u64) {
    let mut total = Outcome::default();
    let mut passes = 0;
    for (o, p) in &m.pairs {
        let mut o = o.clone();
        o.latencies_us.clear();
        total.absorb(o);
        passes += p;
    }
    (total, passes)
}

async fn report(
    a: &SoakArgs,
    reg: &Registry,
    members: &[Member],
    pairs: &[Pair],
    m: &Mutex<Measured>,
    failure: Option<Failure>,
) -> ClusterReport {
    let failed = failure.as_ref().and_then(|f| f.agent.clone());
    let mut agents = Vec::with_capacity(members.len());
    let mut reports = Vec::new();
    for (i, x) in members.iter().enumerate() {
        let fresh = match failed.as_ref() == Some(&x.name) {
            true => None,
            false => {
                let mut c = x.control.clone();
                tokio::time::timeout(STATS_LIMIT, c.stats(pb::StatsRequest {}))
                    .await
                    .ok()
                    .and_then(|r| r.ok())
                    .map(|r| (0.0, r.into_inner()))
            }
        };
        let kept = || m.lock().expect("lock").kept.get_mut(i).and_then(Option::take).map(|(t, s)| (t.elapsed().as_secs_f64(), s));
        let stats = fresh.or_else(kept);
        let open_sessions = stats.as_ref().map_or(0, |(_, s)| s.peer_stats.iter().filter(|p| !p.state.starts_with("closed")).count());
        let detail = stats.and_then(|(age, s)| match agent_result(&x.entry.agent_id, a, &s, age) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!("no memory report from {}: {}", x.name.describe(), crate::diagnose::one_line(&e));
                None
            }
        });
        if let Some(d) = &detail {
            reports.push((x.entry.agent_id.clone(), d.memwatch.clone()));
        }
        agents.push(ClusterAgent {
            agent_id: x.entry.agent_id.clone(),
            role: x.entry.role.clone(),
            address: x.entry.address.clone(),
            host: x.entry.host.clone(),
            rank: x.entry.rank,
            verdict: detail.as_ref().map_or_else(|| "unknown".into(), |d| d.verdict.clone()),
            rss_slope_mib_per_min: detail.as_ref().map(|d| d.rss_slope_mib_per_min),
            open_sessions,
            detail,
        });
    }
    let chart = a.report.join("memory.svg");
    let named: Vec<(&str, &crate::memwatch::MemReport)> = reports.iter().map(|(n, r)| (n.as_str(), r)).collect();
    let title = format!("kvrail cluster soak — RSS of {} agents", members.len());
    if let Err(e) = std::fs::write(&chart, super::chart::memory_chart(&title, &named)) {
        tracing::warn!("cannot write {}: {e}", chart.display());
    }
    let g = m.lock().expect("lock");
    let block_bytes = members.first().map_or(a.geometry.block_bytes, |x| x.layout.block_bytes);
    let pair_results: Vec<PairResult> = pairs
        .iter()
        .zip(g.pairs.iter())
        .map(|(p, (o, passes))| PairResult {
            decode: members[p.decode].entry.agent_id.clone(),
            prefill: members[p.prefill].entry.agent_id.clone(),
            passes: *passes,
            blocks: o.blocks,
            bytes: o.blocks * block_bytes,
            requests: o.requests,
            failed_requests: o.failed_requests,
            verified: o.verified() && o.blocks > 0,
            verified_blocks: o.verified_blocks,
            bad_blocks: o.bad_blocks,
            gbps_while_moving: if o.seconds > 0.0 { (o.blocks * block_bytes) as f64 / o.seconds / 1e9 } else { 0.0 },
            p50_ms: o.latency_ms(0.5),
            p99_ms: o.latency_ms(0.99),
            first_error: o.first_error.clone(),
        })
        .collect();
    let (total, passes) = sum(&g);
    let mut totals = Totals::new(&total, passes, block_bytes, failure, g.started);
    totals.ok &= !members.is_empty()
        && agents.iter().all(|x| x.detail.as_ref().is_some_and(AgentResult::ok))
        && pair_results.iter().all(|p| p.verified);
    let mut transports: Vec<&str> = members.iter().map(|x| x.transport.as_str()).collect();
    transports.dedup();
    totals.transport = transports.join(",");
    totals.mode = a.mode.name().to_string();
    let aggregate_gbps = if totals.duration_secs > 0.0 { totals.bytes as f64 / totals.duration_secs / 1e9 } else { 0.0 };
    ClusterReport {
        totals,
        registry: reg.describe(),
        pairing: a.cluster.pairs.name().into(),
        aggregate_gbps,
        agents,
        pairs: pair_results,
        chart: chart.display().to_string(),
    }
}

fn print_human(r: &ClusterReport, path: &std::path::Path) {
    print_head(&r.totals);
    println!(
        "  cluster    {} agents, {} pairs, {:.2} GB/s in all (wall time), registry {}",
        r.agents.len(),
        r.pairs.len(),
        r.aggregate_gbps,
        r.registry
    );
    for x in &r.agents {
        match &x.detail {
            Some(d) => print_agent(&x.agent_id, d),
            None => println!("  {:<8}   no memory report (the agent could not be read)", x.agent_id),
        }
    }
    for p in &r.pairs {
        let err = if p.first_error.is_empty() { String::new() } else { format!(" — {}", p.first_error) };
        println!(
            "  pair       {} <- {}: {:.2} GB/s, p50 {:.2} ms, p99 {:.2} ms, {} of {} blocks verified, {} of {} requests failed{err}",
            p.decode, p.prefill, p.gbps_while_moving, p.p50_ms, p.p99_ms, p.verified_blocks, p.blocks, p.failed_requests, p.requests
        );
    }
    print_end(&r.totals, path);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(p: usize, d: usize, blocks: u32) -> Vec<(&'static str, u32)> {
        let mut v = vec![("prefill", blocks); p];
        v.extend(vec![("decode", blocks); d]);
        v
    }

    #[test]
    fn all_to_all_gives_every_pair_its_own_window_and_every_prefill_agent_its_own_seed() {
        let p = pairs(Pairs::All, 7, &shape(4, 4, 512));
        assert_eq!(p.len(), 16);
        for d in 4..8 {
            let mut w: Vec<_> = p.iter().filter(|x| x.decode == d).map(|x| x.window.clone()).collect();
            w.sort_by_key(|r| r.start);
            assert_eq!(w, vec![0..128, 128..256, 256..384, 384..512], "decode {d}: disjoint windows over its region");
        }
        for x in &p {
            assert_eq!(x.seed, 7 + x.prefill as u64, "the seed follows the prefill agent, not the pair");
        }
    }

    #[test]
    fn one_to_one_pairs_each_agent_once_and_wraps_the_smaller_side() {
        let p = pairs(Pairs::OneToOne, 0, &shape(2, 4, 100));
        let got: Vec<(usize, usize)> = p.iter().map(|x| (x.decode, x.prefill)).collect();
        assert_eq!(got, vec![(2, 0), (3, 1), (4, 0), (5, 1)]);
        assert!(p.iter().all(|x| x.window == (0..100)), "one pair per decode agent: its whole region");
        let p = pairs(Pairs::OneToOne, 0, &shape(3, 1, 99));
        let got: Vec<(usize, usize, std::ops::Range<u32>)> = p.iter().map(|x| (x.decode, x.prefill, x.window.clone())).collect();
        assert_eq!(got, vec![(3, 0, 0..33), (3, 1, 33..66), (3, 2, 66..99)]);
    }

    #[test]
    fn no_pairs_without_both_roles() {
        assert!(pairs(Pairs::All, 0, &shape(3, 0, 10)).is_empty());
        assert!(pairs(Pairs::All, 0, &shape(0, 2, 10)).is_empty());
    }
}
