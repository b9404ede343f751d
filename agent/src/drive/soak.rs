//! `kvrail soak`: sustained, verified transfers between a decode and a
//! prefill agent (two processes) while both churn their allocators the way a
//! serving process does. At the end it gathers both agents' MemWatch series
//! and verdicts, writes a JSON report and an SVG chart per agent to
//! `--report DIR`, and exits 0 only if both agents are `ok`, every transfer
//! verified, and UCX intercepted no munmap.
//!
//! If an agent ends (or, in cluster mode, stops answering) mid-run, the
//! soak stops at once and still writes its report and charts, with what was
//! measured up to then and the failure: which agent, how it ended, the end
//! of its log.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use kvrail_proto::v1 as pb;
use rand::SeedableRng;
use serde::Serialize;

use super::chart;
use super::children::{control_at, AgentProcess, Launch};
use super::crew::{AgentName, AtAgent, Crew, Failure, Probe};
use super::progress::Progress;
use super::workload::{Control, Outcome, Workload};
use crate::cli::{Side, SoakArgs};
use crate::memwatch::MemReport;

/// How often the soak keeps a copy of both agents' Stats (their MemWatch
/// series): what a failed agent's chart is drawn from.
pub(super) const KEEP_STATS_EVERY: Duration = Duration::from_secs(5);
/// How long an agent may take to answer the soak's Stats call at the end.
pub(super) const STATS_LIMIT: Duration = Duration::from_secs(2);
/// How long a remote agent may stay silent before the soak fails on it.
pub const REMOTE_LEASE: Duration = Duration::from_secs(5);

/// An agent's MemWatch report, from its Stats.
pub(super) fn mem_report(s: &pb::StatsResponse) -> anyhow::Result<MemReport> {
    let mem = s.memory.clone().unwrap_or_default();
    serde_json::from_str(&mem.report_json).context("agent sent no MemWatch report")
}

#[derive(Debug, Serialize)]
pub(super) struct AgentResult {
    agent_id: String,
    pub verdict: String,
    pub rss_slope_mib_per_min: f64,
    heap_slope_mib_per_min: Option<f64>,
    threshold_mib_per_min: f64,
    window_secs: f64,
    samples_in_window: usize,
    forensics: Option<String>,
    ucx_version: String,
    ucx_library: String,
    mmap_hook_mode: String,
    ucx_intercepted_munmaps: u64,
    churn_munmaps: u64,
    injected_leak_bytes: u64,
    bytes_moved: u64,
    chart: String,
    /// Seconds between these figures and the end of the run: 0 when read
    /// at the end, more for an agent that failed (its last kept Stats).
    stats_age_secs: f64,
    pub memwatch: MemReport,
}

#[derive(Debug, Serialize)]
struct SoakReport {
    #[serde(flatten)]
    totals: Totals,
    /// The run was the hooks-on demonstration (never a pass).
    demo_ucx_mmap_hooks_on: bool,
    demo_rcache_max_unreleased: Option<String>,
    /// `None` when nothing of it could be read.
    decode: Option<AgentResult>,
    prefill: Option<AgentResult>,
}

/// What every soak report opens with: the verdict, and the blocks moved.
#[derive(Debug, Serialize)]
pub(super) struct Totals {
    pub ok: bool,
    /// Why the run stopped early, if it did.
    pub failure: Option<Failure>,
    pub duration_secs: f64,
    pub transport: String,
    pub mode: String,
    pub passes: u64,
    pub blocks: u64,
    pub bytes: u64,
    pub requests: u64,
    pub failed_requests: u64,
    pub verified: bool,
    pub verified_blocks: u64,
    pub bad_blocks: u64,
    pub first_error: String,
    pub gbps_while_moving: f64,
}

impl Totals {
    /// `ok` is whether every block verified with no failure; the caller
    /// ands in its agents' verdicts.
    pub fn new(total: &Outcome, passes: u64, block_bytes: u64, failure: Option<Failure>, started: Option<Instant>) -> Totals {
        let verified = total.verified() && failure.is_none();
        Totals {
            ok: verified,
            failure,
            duration_secs: started.map_or(0.0, |s| s.elapsed().as_secs_f64()),
            transport: String::new(),
            mode: String::new(),
            passes,
            blocks: total.blocks,
            bytes: total.blocks * block_bytes,
            requests: total.requests,
            failed_requests: total.failed_requests,
            verified,
            verified_blocks: total.verified_blocks,
            bad_blocks: total.bad_blocks,
            first_error: total.first_error.clone(),
            gbps_while_moving: if total.seconds > 0.0 { (total.blocks * block_bytes) as f64 / total.seconds / 1e9 } else { 0.0 },
        }
    }
}

/// What a soak has measured so far. It lives outside the run, so a run
/// that fails still reports it.
#[derive(Debug, Default)]
struct Measured {
    /// What the decode agent serves.
    info: Option<pb::AgentInfo>,
    total: Outcome,
    passes: u64,
    started: Option<Instant>,
    /// The latest Stats of the decode and the prefill agent, and when.
    kept: [Option<(Instant, pb::StatsResponse)>; 2],
}

fn agent_args(role: &str, a: &SoakArgs, leak: bool) -> Vec<String> {
    let mut v: Vec<String> = vec![role.into(), "--agent-id".into(), format!("soak-{role}"), "--test-patterns".into()];
    v.extend(a.geometry.on_one_host().to_args());
    v.extend([
        "--churn-rounds-per-sec".into(),
        a.churn_rounds_per_sec.to_string(),
        "--churn-unmaps-per-round".into(),
        a.churn_unmaps_per_round.to_string(),
    ]);
    v.extend(a.memwatch.to_args());
    if leak {
        if let Some(r) = a.test_inject_leak_mib_per_min {
            v.extend(["--test-inject-leak-mib-per-min".into(), r.to_string()]);
        }
    }
    v
}

/// The two agents a soak drives: started here, or running elsewhere.
struct Agents {
    /// The decode and the prefill agent's Control clients, and their names.
    controls: [Control; 2],
    names: [AgentName; 2],
    /// The processes, when this soak started them.
    procs: Vec<AgentProcess>,
    /// Liveness probes of remote agents.
    _probes: Vec<Probe>,
}

impl Agents {
    async fn start(a: &SoakArgs, crew: &Crew) -> anyhow::Result<Agents> {
        if let (Some(d), Some(p)) = (&a.decode, &a.prefill) {
            // Cluster mode: agents an operator started (with --test-patterns).
            let tls = a.tls.load()?;
            let decode = control_at(d, tls.as_ref()).await.with_context(|| format!("cannot reach the decode agent at {d}"))?;
            let prefill = control_at(p, tls.as_ref()).await.with_context(|| format!("cannot reach the prefill agent at {p}"))?;
            let name = |role: &str, addr: &str| AgentName { role: role.into(), address: addr.into(), ..Default::default() };
            let names = [name("decode", d), name("prefill", p)];
            let probes = vec![
                crew.watch_remote(names[0].clone(), decode.clone(), REMOTE_LEASE),
                crew.watch_remote(names[1].clone(), prefill.clone(), REMOTE_LEASE),
            ];
            return Ok(Agents { controls: [decode, prefill], names, procs: Vec::new(), _probes: probes });
        }
        let mut env = Vec::new();
        if a.demo_allow_ucx_mmap_hooks {
            tracing::warn!("DEMONSTRATION: both agents run with UCX's memory hooks ON");
            env = crate::guard::hooks_on_child_env();
            if let Some(v) = &a.demo_rcache_max_unreleased {
                env.push(("UCX_RCACHE_MAX_UNRELEASED".into(), Some(v.clone())));
            }
        }
        let (exe, limit, verbose) = (std::env::current_exe()?, Duration::from_secs(120), a.out.verbose);
        let launch = |args: Vec<String>| Launch { args, env: env.clone(), verbose };
        let decode_args = agent_args("decode", a, a.test_inject_into == Side::Decode);
        let decode = AgentProcess::launch(&exe, &launch(decode_args), Some(crew), limit).await?;
        let mut p = agent_args("prefill", a, a.test_inject_into == Side::Prefill);
        p.extend(["--peer".into(), decode.listen.clone()]);
        let prefill = AgentProcess::launch(&exe, &launch(p), Some(crew), limit).await?;
        Ok(Agents {
            controls: [decode.control.clone(), prefill.control.clone()],
            names: [decode.name.clone(), prefill.name.clone()],
            procs: vec![decode, prefill],
            _probes: Vec::new(),
        })
    }

    /// Stops the agents this soak started, within `grace` each.
    async fn stop(self, grace: Duration) {
        let stops: Vec<_> = self.procs.into_iter().rev().map(|p| p.stop_within(grace)).collect();
        for s in stops {
            s.await;
        }
    }
}

pub async fn run(a: &SoakArgs) -> anyhow::Result<i32> {
    if a.cluster.is_set() {
        return super::cluster::run(a).await;
    }
    if a.test_inject_leak_mib_per_min.is_some() {
        anyhow::ensure!(
            std::env::var(crate::churn::ENABLE_TEST_FAULTS).as_deref() == Ok("1"),
            "--test-inject-leak-mib-per-min is a test-only fault; set {}=1 to allow it",
            crate::churn::ENABLE_TEST_FAULTS
        );
    }
    std::fs::create_dir_all(&a.report).with_context(|| format!("creating report dir {}", a.report.display()))?;
    let crew = Crew::new();
    let mut m = Measured::default();
    let mut failure = None;
    let mut agents = match super::crew::race(&crew, Agents::start(a, &crew)).await {
        Ok(agents) => Some(agents),
        Err(f) => {
            failure = Some(f);
            None
        }
    };
    if let Some(agents) = agents.as_mut() {
        let [decode, prefill] = &mut agents.controls;
        let progress = Progress::new("soak", a.duration.as_secs(), "s");
        if let Err(f) = super::crew::race(&crew, drive(a, [decode, prefill], &agents.names, &mut m, &progress)).await {
            failure = Some(f);
        }
    }
    let failed_role = failure.as_ref().and_then(|f| f.agent.as_ref()).map(|n| n.role.clone());
    let mut results = [None, None];
    if let Some(agents) = agents.as_mut() {
        for (i, (role, control)) in ["decode", "prefill"].into_iter().zip(agents.controls.iter_mut()).enumerate() {
            let fresh = match failed_role.as_deref() == Some(role) {
                true => None,
                false => tokio::time::timeout(STATS_LIMIT, control.stats(pb::StatsRequest {})).await.ok().and_then(|r| r.ok()),
            };
            let stats = match fresh {
                Some(s) => Some((0.0, s.into_inner())),
                None => m.kept[i].take().map(|(t, s)| (t.elapsed().as_secs_f64(), s)),
            };
            if let Some((age, s)) = stats {
                match agent_result(role, a, &s, age) {
                    Ok(r) => results[i] = Some(r),
                    Err(e) => tracing::warn!(role, "no memory report from the {role} agent: {}", crate::diagnose::one_line(&e)),
                }
            }
        }
    }
    let [decode, prefill] = results;
    let report = report(a, &m, failure, decode, prefill);
    let code = write_and_print(a, &report, &report.totals, |path| print_human(&report, path))?;
    if let Some(agents) = agents {
        // Quickly after a failure: the report is written, the run is over.
        agents.stop(if report.totals.failure.is_some() { Duration::from_secs(1) } else { Duration::from_secs(5) }).await;
    }
    Ok(code)
}

/// Writes `report` to `report.json` in the report directory, prints it
/// (JSON, or `human`'s summary given that path), and gives the exit code.
pub(super) fn write_and_print<R: Serialize>(
    a: &SoakArgs,
    report: &R,
    totals: &Totals,
    human: impl FnOnce(&std::path::Path),
) -> anyhow::Result<i32> {
    let path = a.report.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(report)?).with_context(|| format!("writing {}", path.display()))?;
    if a.out.json {
        println!("{}", serde_json::to_string_pretty(report)?);
        if let Some(f) = &totals.failure {
            eprintln!("kvrail soak: FAILED: {}", f.human());
        }
    } else {
        human(&path);
    }
    Ok(if totals.ok { 0 } else { 1 })
}

async fn drive(
    a: &SoakArgs,
    [decode, prefill]: [&mut Control; 2],
    names: &[AgentName; 2],
    m: &mut Measured,
    progress: &Progress,
) -> anyhow::Result<()> {
    let at = |i: usize| AtAgent(names[i].clone());
    // What the decode agent serves, not this command's flags: in cluster
    // mode the operator started the agents with their own.
    let info = decode.info(pb::InfoRequest {}).await.context(at(0))?.into_inner().agent.context("decode agent reported no AgentInfo")?;
    let layout = info.layout.context("decode agent reported no layout")?;
    m.info = Some(info);
    prefill.fill_pattern(pb::FillPatternRequest { seed: a.out.seed }).await.context(at(1))?;
    let work = Workload {
        seed: a.out.seed,
        mode: a.mode.to_pb(),
        request_blocks: a.request_blocks.max(1),
        concurrency: a.concurrency.max(1),
        ..Default::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.out.seed);
    let start = Instant::now();
    m.started = Some(start);
    let n = a.pass_blocks.clamp(1, layout.num_blocks as usize);
    let mut kept_at: Option<Instant> = None;
    while start.elapsed() < a.duration {
        if kept_at.is_none_or(|t| t.elapsed() >= KEEP_STATS_EVERY) {
            for (i, c) in [&mut *decode, &mut *prefill].into_iter().enumerate() {
                m.kept[i] = Some((Instant::now(), c.stats(pb::StatsRequest {}).await.context(at(i))?.into_inner()));
            }
            kept_at = Some(Instant::now());
        }
        let o = work.pass(decode, layout.num_blocks, n, &format!("soak-{}", m.passes), &mut rng).await.context(at(0))?;
        m.total.absorb(o);
        m.passes += 1;
        let t = &m.total;
        let gbps = if t.seconds > 0.0 { (t.blocks * layout.block_bytes) as f64 / t.seconds / 1e9 } else { 0.0 };
        progress.tick(
            start.elapsed().as_secs(),
            format!(
                "{:.0} s of {:.0} s, {} passes, {:.2} GB/s, {} of {} blocks verified, {} requests failed",
                start.elapsed().as_secs_f64(),
                a.duration.as_secs_f64(),
                m.passes,
                gbps,
                t.verified_blocks,
                t.blocks,
                t.failed_requests
            ),
        );
        if a.pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(a.pause_ms)).await;
        }
    }
    Ok(())
}

fn report(a: &SoakArgs, m: &Measured, failure: Option<Failure>, decode: Option<AgentResult>, prefill: Option<AgentResult>) -> SoakReport {
    let block_bytes = m.info.as_ref().and_then(|i| i.layout.as_ref()).map_or(a.geometry.block_bytes, |l| l.block_bytes);
    let mut totals = Totals::new(&m.total, m.passes, block_bytes, failure, m.started);
    totals.ok &= !a.demo_allow_ucx_mmap_hooks && [&decode, &prefill].into_iter().all(|r| r.as_ref().is_some_and(AgentResult::ok));
    // What the decode agent serves; before it was read, what it would be.
    totals.transport = match (&m.info, &a.decode) {
        (Some(i), _) => i.transport.clone(),
        (None, Some(_)) => a.geometry.transport.to_string(),
        (None, None) => a.geometry.on_one_host().transport.to_string(),
    };
    totals.mode = a.mode.name().to_string();
    SoakReport {
        totals,
        demo_ucx_mmap_hooks_on: a.demo_allow_ucx_mmap_hooks,
        demo_rcache_max_unreleased: a.demo_rcache_max_unreleased.clone(),
        decode,
        prefill,
    }
}

impl AgentResult {
    /// Its memory verdict is `ok` and UCX intercepted no munmap.
    pub fn ok(&self) -> bool {
        self.verdict == "ok" && self.ucx_intercepted_munmaps == 0
    }
}

/// What agent `name` (its role, or in a cluster its id) reported, with
/// its memory chart written to `name.svg` in the report directory.
pub(super) fn agent_result(name: &str, a: &SoakArgs, s: &pb::StatsResponse, stats_age_secs: f64) -> anyhow::Result<AgentResult> {
    let report = mem_report(s)?;
    let svg = chart::memory_chart(&format!("kvrail soak — {name} agent memory"), &[(name, &report)]);
    let chart_path = a.report.join(format!("{name}.svg"));
    std::fs::write(&chart_path, svg).with_context(|| format!("writing {}", chart_path.display()))?;
    let asm = &report.assessment;
    Ok(AgentResult {
        agent_id: s.agent_id.clone(),
        verdict: asm.verdict.as_str().to_string(),
        rss_slope_mib_per_min: asm.rss_slope_mib_per_min,
        heap_slope_mib_per_min: asm.heap_slope_mib_per_min,
        threshold_mib_per_min: asm.threshold_mib_per_min,
        window_secs: asm.window_secs,
        samples_in_window: asm.samples_in_window,
        forensics: report.forensics.as_ref().map(|f| f.summary.clone()),
        ucx_version: s.ucx_version.clone(),
        ucx_library: s.ucx_library.clone(),
        mmap_hook_mode: crate::agent::convert::hook_mode_name(s.hook_mode),
        ucx_intercepted_munmaps: s.ucx_intercepted_munmaps,
        churn_munmaps: s.churn_munmaps,
        injected_leak_bytes: s.injected_leak_bytes,
        bytes_moved: s.bytes_moved,
        chart: chart_path.display().to_string(),
        stats_age_secs,
        memwatch: report,
    })
}

fn print_human(report: &SoakReport, path: &std::path::Path) {
    print_head(&report.totals);
    for (name, x) in [("decode", &report.decode), ("prefill", &report.prefill)] {
        match x {
            Some(x) => print_agent(name, x),
            None => println!("  {name:<8}   no memory report (the agent could not be read)"),
        }
    }
    print_end(&report.totals, path);
}

/// The first lines of a soak's summary: what moved, and whether it verified.
pub(super) fn print_head(r: &Totals) {
    println!(
        "kvrail soak: {:.0} s, {} passes, {} requests ({} failed), {:.2} GB/s while moving, {} over {}",
        r.duration_secs, r.passes, r.requests, r.failed_requests, r.gbps_while_moving, r.mode, r.transport
    );
    println!("  verify     {}: {} of {} blocks", if r.verified { "VERIFIED" } else { "NOT VERIFIED" }, r.verified_blocks, r.blocks);
}

/// One agent's line (and its forensics) of a soak's summary.
pub(super) fn print_agent(name: &str, x: &AgentResult) {
    let age = if x.stats_age_secs > 0.0 { format!(", figures from {:.0} s before the end", x.stats_age_secs) } else { String::new() };
    println!(
        "  {name:<8}   {} — RSS {:+.3} MiB/min (threshold {:.2}, {:.0} s window), hooks {}, churn munmaps {}, UCX intercepted {}{age}",
        x.verdict.to_uppercase(),
        x.rss_slope_mib_per_min,
        x.threshold_mib_per_min,
        x.window_secs,
        x.mmap_hook_mode,
        x.churn_munmaps,
        x.ucx_intercepted_munmaps
    );
    if let Some(f) = &x.forensics {
        println!("             {f}");
    }
}

/// The last lines of a soak's summary: where the report is, the failure,
/// the result.
pub(super) fn print_end(r: &Totals, path: &std::path::Path) {
    println!("  report     {} (charts beside it)", path.display());
    if let Some(f) = &r.failure {
        println!("  failure    {}", f.human());
    }
    println!("  result     {}", if r.ok { "OK" } else { "FAILED" });
}
