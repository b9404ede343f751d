//! `kvrail bench`: kvrail's throughput as a ratio to the raw-UCX ceiling,
//! measured side by side in the same run. For every transport, block size
//! and mode it runs `--repeat` times, each time with fresh processes:
//! - kvrail: a decode and a prefill agent (two processes) moving
//!   `--total-bytes` of scattered blocks, every block verified after its
//!   pass;
//! - the raw-UCX loop (`kvrail raw-ucx`, two processes): the same UCX calls
//!   over the same region size, transport and block pattern, grouped into
//!   the same requests (each planned on its own), nothing else;
//!
//! the two alive side by side and taking turns pass by pass (one region's
//! worth of blocks; which goes first alternates), so a drift of the machine
//! falls on both alike and each run gives a paired ratio. Besides them:
//! - the streaming memcpy limit (scattered block copies between two
//!   region-sized buffers in this process);
//! - `ucx_perftest` for reference (one reused buffer: cache-hot).
//!
//! With `--peer` (cluster mode) the decode agent and the raw loop's target
//! run on another host, started by the operator; each run starts a prefill
//! agent and a raw initiator here.

//!
//! With `--registry` (the cluster bench, [`registry`]) it measures the
//! agents a registry lists, every pair at once, against as many raw-UCX
//! pairs.
//!
//! If an agent ends (or, with `--peer`, stops answering) mid-run, the bench
//! stops at once, prints what it measured and the failure, and exits 1.

mod agents;
mod baselines;
mod cluster;
mod placement;
mod raw_loop;
mod registry;
mod stats;
mod table;

use anyhow::Context as _;
use kvrail_transfer::Transport;
use serde::Serialize;

use self::agents::Agents;
use self::baselines::perftest;
pub use self::baselines::{memcpy_gbps, parse_perftest};
pub use self::cluster::adopt_peer;
use self::cluster::Remote;
use self::placement::{bench_cpus, control_cpu, on_cpu};
use self::raw_loop::RawLoop;
pub use self::stats::{gbps, median, paired_ratio, passes, ratio};
use super::crew::{race, AgentName, Crew, Probe};
use super::progress::Progress;
use super::workload::Outcome;
use crate::cli::{BenchArgs, Mode};
use crate::units::format_bytes;

/// How long a remote decode agent may stay silent before the bench fails.
const REMOTE_LEASE: std::time::Duration = std::time::Duration::from_secs(5);

/// One measured point.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub transport: String,
    pub mode: String,
    pub block_bytes: u64,
    pub bytes: u64,
    pub gbps: f64,
    pub raw_ucx_gbps: f64,
    /// [`paired_ratio`] of `ratio_runs`.
    pub ratio: f64,
    pub memcpy_gbps: f64,
    pub ucx_perftest_gbps: Option<f64>,
    pub p50_us: f64,
    pub p99_us: f64,
    pub handshake_ms: f64,
    /// `None` with `--peer`: the decode agent runs on another host.
    pub cpu_s_per_gb_decode: Option<f64>,
    pub cpu_s_per_gb_prefill: f64,
    pub verified: bool,
    pub ucx_version: String,
    /// The loaded libuct was built with assertions: tcp then sends by copy,
    /// kvrail and the raw loop alike ([`Transport::ucx_settings`]).
    pub ucx_assertions: bool,
    /// Every kvrail run and every raw-UCX run of the point, in run order
    /// (the medians above come from these), and each run's kvrail / raw.
    pub gbps_runs: Vec<f64>,
    pub raw_ucx_gbps_runs: Vec<f64>,
    pub ratio_runs: Vec<f64>,
}

pub async fn run(a: &BenchArgs) -> anyhow::Result<i32> {
    if a.cluster.is_set() {
        return registry::run(a).await;
    }
    anyhow::ensure!(
        a.peer.is_some() || a.tls.tls_cert.is_none(),
        "--tls-* are for --peer: the agents a bench starts on its own talk over loopback"
    );
    let crew = Crew::new();
    let remote = match &a.peer {
        Some(addr) => Some(Remote::connect(a, addr).await?),
        None => None,
    };
    let adopted = match &remote {
        Some(r) => adopt_peer(a, &r.info)?,
        None => a.clone(),
    };
    let _probe: Option<Probe> = remote.as_ref().map(|r| {
        let name = AgentName { role: "decode".into(), agent_id: r.info.agent_id.clone(), pid: None, address: r.addr.clone() };
        crew.watch_remote(name, r.decode.clone(), REMOTE_LEASE)
    });
    let bench = Bench { a: adopted, remote, crew: crew.clone() };
    let a = &bench.a;
    anyhow::ensure!(!a.mode.is_empty(), "nothing to measure");
    // Read the CPUs while this process may still use all of them.
    bench_cpus(a);
    let mut points = Vec::new();
    let outcome = race(&crew, all_points(&bench, &mut points)).await;
    let failure = outcome.err();
    if a.out.json {
        // One JSON object per point was printed as it finished; the last
        // line says how the run ended.
        println!(
            "{}",
            serde_json::json!({ "ok": failure.is_none() && points.iter().all(|p| p.verified), "points": points.len(), "failure": failure })
        );
        if let Some(f) = &failure {
            eprintln!("kvrail bench: FAILED after {} point(s): {}", points.len(), f.human());
        }
    } else {
        table::print_table(&points);
        if let Some(f) = &failure {
            println!("bench FAILED after {} point(s): {}", points.len(), f.human());
        }
    }
    Ok(if failure.is_none() && points.iter().all(|p| p.verified) { 0 } else { 1 })
}

/// Every point, each pushed to `points` (and printed with `--json`) as it
/// is measured.
async fn all_points(bench: &Bench, points: &mut Vec<Point>) -> anyhow::Result<()> {
    let a = &bench.a;
    let mut memcpy = std::collections::HashMap::new();
    let (transports, blocks) = (a.transports(), a.blocks());
    let progress = Progress::new("bench", (transports.len() * blocks.len() * a.mode.len()) as u64, "points");
    for &t in &transports {
        for &b in &blocks {
            for &m in &a.mode {
                let name = format!("{t} {} {}", m.name(), format_bytes(b));
                if let std::collections::hash_map::Entry::Vacant(e) = memcpy.entry(b) {
                    progress.stage(&name, "memcpy limit");
                    let (region, total, seed) = (a.region(), a.total_bytes, a.out.seed);
                    e.insert(tokio::task::spawn_blocking(move || memcpy_gbps(region, b, total, seed)).await?);
                }
                let p = point(bench, t, b, m, memcpy[&b], |stage| progress.stage(&name, stage))
                    .await
                    .with_context(|| format!("point {name}"))?;
                if a.out.json {
                    println!("{}", serde_json::to_string(&p)?);
                }
                progress.done_one(format!(
                    "bench: {t} {} {}: kvrail {:.2} GB/s, raw UCX {:.2} GB/s, ratio {:.2}",
                    m.name(),
                    format_bytes(b),
                    p.gbps,
                    p.raw_ucx_gbps,
                    p.ratio
                ));
                points.push(p);
            }
        }
    }
    Ok(())
}

/// The arguments (with `--peer`, the decode agent's geometry adopted) and
/// the remote decode agent, if any.
struct Bench {
    a: BenchArgs,
    remote: Option<Remote>,
    /// The agents of the run in progress; a run races against it.
    crew: Crew,
}

async fn point(b: &Bench, t: Transport, block: u64, mode: Mode, memcpy: f64, stage: impl Fn(&str)) -> anyhow::Result<Point> {
    let a = &b.a;
    let n = a.repeat.max(1);
    let (mut outcome, mut ucx_version, mut warmups_verified) = (Outcome::default(), String::new(), true);
    let (mut runs, mut raws, mut ratios, mut handshakes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 1..=n {
        stage(&format!("run {i}/{n}: kvrail and the raw-UCX loop, pass by pass"));
        let r = match control_cpu(a, t, mode) {
            Some(cpu) => tokio::task::block_in_place(|| on_cpu(cpu, || watched_run(b, t, block, mode, i)))?,
            None => watched_run(b, t, block, mode, i).await?,
        };
        let (kvrail, raw) = (gbps(r.kvrail.blocks * block, r.kvrail.seconds), gbps(r.raw_bytes, r.raw_secs));
        runs.push(kvrail);
        raws.push(raw);
        ratios.push(ratio(kvrail, raw));
        handshakes.push(r.handshake_ms);
        ucx_version = r.ucx_version;
        warmups_verified &= r.warmup_verified;
        outcome.absorb(r.kvrail);
    }
    // ucx_perftest runs both its sides here: not across hosts.
    let perftest = if a.no_perftest || b.remote.is_some() {
        None
    } else {
        stage("ucx_perftest");
        perftest(t, block, mode).await.ok()
    };
    let (gbps_runs, raw_ucx_gbps_runs) = (runs.clone(), raws.clone());
    let gb = (outcome.blocks * block) as f64 / 1e9;
    Ok(Point {
        transport: t.to_string(),
        mode: mode.name().into(),
        block_bytes: block,
        bytes: outcome.blocks * block,
        gbps: median(&mut runs),
        raw_ucx_gbps: median(&mut raws),
        ratio: paired_ratio(&ratios),
        memcpy_gbps: memcpy,
        ucx_perftest_gbps: perftest,
        p50_us: outcome.latency_ms(0.5) * 1e3,
        p99_us: outcome.latency_ms(0.99) * 1e3,
        handshake_ms: median(&mut handshakes),
        cpu_s_per_gb_decode: b.remote.is_none().then(|| outcome.cpu_secs[0] / gb),
        cpu_s_per_gb_prefill: outcome.cpu_secs[1] / gb,
        verified: outcome.verified() && warmups_verified,
        ucx_version,
        ucx_assertions: kvrail_transfer::ucx_facts::uct_has_assertions(),
        gbps_runs,
        raw_ucx_gbps_runs,
        ratio_runs: ratios,
    })
}

/// What one run measured.
struct Run {
    /// The timed passes (the warm-up pass only counts as verified or not).
    kvrail: Outcome,
    warmup_verified: bool,
    handshake_ms: f64,
    ucx_version: String,
    raw_bytes: u64,
    raw_secs: f64,
}

/// The flags kvrail's agents and the raw loop share: the same transport,
/// region, block size ([`crate::cli::Geometry`]) and op window.
fn geometry_args(a: &BenchArgs, t: Transport, block: u64) -> Vec<String> {
    let mut v = crate::cli::Geometry { transport: t, region_bytes: a.region(), block_bytes: block, memory: a.memory }.to_args();
    v.extend(["--window".into(), a.window.to_string()]);
    v
}

/// [`one_run`] on its own runtime's terms: the failure is made here, on the
/// runtime the run's agents are watched from (with a CPU for the client,
/// that runtime ends with the run).
async fn watched_run(b: &Bench, t: Transport, block: u64, mode: Mode, i: usize) -> anyhow::Result<Run> {
    race(&b.crew, one_run(b, t, block, mode, i)).await.map_err(anyhow::Error::new)
}

/// One run (`i` counts from 1): fresh kvrail agents and raw-UCX processes,
/// both set up (connected, pattern filled, peer mappings pre-faulted)
/// before anything is timed, then taking turns pass by pass. The passes
/// race against the crew while both sides are still held, so an agent that
/// died is found and named before its survivors are let go.
async fn one_run(b: &Bench, t: Transport, block: u64, mode: Mode, i: usize) -> anyhow::Result<Run> {
    let a = &b.a;
    // Which pair starts (and so allocates its regions) first alternates
    // run by run: here the pair that allocates first copies 7-15% slower
    // on sm, whichever it is (likely the pages the last run freed, which
    // this VM hands back to its host); `paired_ratio` cancels it.
    let (mut kvrail, mut raw) = if i % 2 == 1 {
        let kvrail = Agents::start(b, t, block, mode, i).await?;
        (kvrail, RawLoop::start(a, t, block, mode).await?)
    } else {
        let raw = RawLoop::start(a, t, block, mode).await?;
        (Agents::start(b, t, block, mode, i).await?, raw)
    };
    let run = race(&b.crew, take_turns(a, &mut kvrail, &mut raw, block, i)).await.map_err(anyhow::Error::new)?;
    kvrail.stop().await;
    raw.stop().await;
    Ok(run)
}

/// The passes of run `i`: one untimed warm-up pass each, then kvrail's and
/// the raw loop's passes by turns.
async fn take_turns(a: &BenchArgs, kvrail: &mut Agents, raw: &mut RawLoop, block: u64, i: usize) -> anyhow::Result<Run> {
    let passes = passes((a.total_bytes / block) as usize, kvrail.num_blocks as usize);
    // One untimed pass each first: the first pass after the processes'
    // set-up runs up to twice as slow, for either side, and a long-running
    // agent is past it. kvrail's is verified like the rest.
    let &first = passes.first().with_context(|| format!("--total-bytes {} is less than one block", a.total_bytes))?;
    let warmup = kvrail.pass(first, usize::MAX).await?;
    raw.pass(first).await?;
    let mut run = Run {
        kvrail: Outcome::default(),
        warmup_verified: warmup.verified(),
        handshake_ms: kvrail.handshake_ms,
        ucx_version: kvrail.ucx_version.clone(),
        raw_bytes: 0,
        raw_secs: 0.0,
    };
    for (p, &n) in passes.iter().enumerate() {
        // Which side goes first alternates (kvrail, raw, raw, kvrail, ...,
        // shifted by one every run): neither always follows the other.
        let kvrail_first = (i + p) % 2 == 1;
        for kvrail_now in [kvrail_first, !kvrail_first] {
            let bytes = n as u64 * block;
            if kvrail_now {
                let o = kvrail.pass(n, p).await?;
                tracing::debug!(run = i, pass = p, gbps = gbps(bytes, o.seconds), "kvrail pass");
                run.kvrail.absorb(o);
            } else {
                let secs = raw.pass(n).await?;
                tracing::debug!(run = i, pass = p, gbps = gbps(bytes, secs), "raw-UCX pass");
                run.raw_secs += secs;
                run.raw_bytes += bytes;
            }
        }
    }
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_json_has_the_documented_fields() {
        let p = Point {
            transport: "sm".into(),
            mode: "write".into(),
            block_bytes: 65536,
            bytes: 1 << 20,
            gbps: 1.0,
            raw_ucx_gbps: 2.0,
            ratio: 0.5,
            memcpy_gbps: 10.0,
            ucx_perftest_gbps: None,
            p50_us: 1.0,
            p99_us: 2.0,
            handshake_ms: 3.0,
            cpu_s_per_gb_decode: Some(0.1),
            cpu_s_per_gb_prefill: 0.2,
            verified: true,
            ucx_version: "1.13.1".into(),
            ucx_assertions: true,
            gbps_runs: vec![0.9, 1.0, 1.1],
            raw_ucx_gbps_runs: vec![2.0, 1.9, 2.1],
            ratio_runs: vec![0.45, 0.53, 0.52],
        };
        let v = serde_json::to_value(&p).unwrap();
        for k in [
            "transport",
            "mode",
            "block_bytes",
            "gbps",
            "raw_ucx_gbps",
            "ratio",
            "memcpy_gbps",
            "ucx_perftest_gbps",
            "p50_us",
            "p99_us",
            "handshake_ms",
            "verified",
            "ucx_version",
            "ucx_assertions",
            "gbps_runs",
            "raw_ucx_gbps_runs",
            "ratio_runs",
        ] {
            assert!(v.get(k).is_some(), "missing {k}");
        }
    }
}
