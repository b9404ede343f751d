//! `kvrail soak`: sustained, verified transfers between a decode and a
//! prefill agent (two processes) while both churn their allocators the way a
//! serving process does. At the end it gathers both agents' MemWatch series
//! and verdicts, writes a JSON report and an SVG chart per agent to
//! `--report DIR`, and exits 0 only if both agents are `ok`, every transfer
//! verified, and UCX intercepted no munmap.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use kvrail_proto::v1 as pb;
use rand::SeedableRng;
use serde::Serialize;

use super::children::{control_at, AgentProcess};
use super::workload::{Control, Outcome, Workload};
use crate::cli::{Side, SoakArgs};
use crate::drive::chart::{self, Chart, Series, Trend};
use crate::memwatch::MemReport;

#[derive(Debug, Serialize)]
struct AgentResult {
    agent_id: String,
    verdict: String,
    rss_slope_mib_per_min: f64,
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
    memwatch: MemReport,
}

#[derive(Debug, Serialize)]
struct SoakReport {
    ok: bool,
    /// The run was the hooks-on demonstration (never a pass).
    demo_ucx_mmap_hooks_on: bool,
    demo_rcache_max_unreleased: Option<String>,
    duration_secs: f64,
    transport: String,
    mode: String,
    passes: u64,
    blocks: u64,
    bytes: u64,
    requests: u64,
    failed_requests: u64,
    verified: bool,
    verified_blocks: u64,
    bad_blocks: u64,
    first_error: String,
    gbps_while_moving: f64,
    decode: AgentResult,
    prefill: AgentResult,
}

fn agent_args(role: &str, a: &SoakArgs, leak: bool) -> Vec<String> {
    let mut v: Vec<String> = vec![
        role.into(),
        "--agent-id".into(),
        format!("soak-{role}"),
        "--transport".into(),
        a.transport.to_string(),
        "--region-bytes".into(),
        a.region_bytes.to_string(),
        "--block-bytes".into(),
        a.block_bytes.to_string(),
        "--test-patterns".into(),
        "--churn-rounds-per-sec".into(),
        a.churn_rounds_per_sec.to_string(),
        "--churn-unmaps-per-round".into(),
        a.churn_unmaps_per_round.to_string(),
        "--memwatch-warmup-secs".into(),
        a.memwatch.memwatch_warmup_secs.to_string(),
        "--memwatch-window-secs".into(),
        a.memwatch.memwatch_window_secs.to_string(),
        "--memwatch-threshold-mib-per-min".into(),
        a.memwatch.memwatch_threshold_mib_per_min.to_string(),
    ];
    if leak {
        if let Some(r) = a.test_inject_leak_mib_per_min {
            v.extend(["--test-inject-leak-mib-per-min".into(), r.to_string()]);
        }
    }
    v
}

pub async fn run(a: &SoakArgs) -> anyhow::Result<i32> {
    if a.test_inject_leak_mib_per_min.is_some() {
        anyhow::ensure!(
            std::env::var(crate::churn::ENABLE_TEST_FAULTS).as_deref() == Ok("1"),
            "--test-inject-leak-mib-per-min is a test-only fault; set {}=1 to allow it",
            crate::churn::ENABLE_TEST_FAULTS
        );
    }
    std::fs::create_dir_all(&a.report).with_context(|| format!("creating report dir {}", a.report.display()))?;
    let limit = Duration::from_secs(120);
    let mut env = Vec::new();
    if a.demo_allow_ucx_mmap_hooks {
        tracing::warn!("DEMONSTRATION: both agents run with UCX's memory hooks ON");
        env = crate::guard::hooks_on_child_env();
        if let Some(v) = &a.demo_rcache_max_unreleased {
            env.push(("UCX_RCACHE_MAX_UNRELEASED".into(), Some(v.clone())));
        }
    }
    let report = if let (Some(d), Some(p)) = (&a.decode, &a.prefill) {
        // Cluster mode: agents an operator started (with --test-patterns).
        let tls = a.tls.load()?;
        let mut decode = control_at(d, tls.as_ref()).await.with_context(|| format!("connecting to the decode agent at {d}"))?;
        let mut prefill = control_at(p, tls.as_ref()).await.with_context(|| format!("connecting to the prefill agent at {p}"))?;
        drive(a, &mut decode, &mut prefill).await?
    } else {
        let exe = std::env::current_exe()?;
        let mut decode =
            AgentProcess::spawn_env(&exe, &agent_args("decode", a, a.test_inject_into == Side::Decode), &env, a.out.verbose, limit).await?;
        let mut p = agent_args("prefill", a, a.test_inject_into == Side::Prefill);
        p.extend(["--peer".into(), decode.listen.clone()]);
        let mut prefill = AgentProcess::spawn_env(&exe, &p, &env, a.out.verbose, limit).await?;
        let result = drive(a, &mut decode.control, &mut prefill.control).await;
        decode.stop().await;
        prefill.stop().await;
        result?
    };
    let path = a.report.join("report.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&report)?)?;
    if a.out.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report, &path);
    }
    Ok(if report.ok { 0 } else { 1 })
}

async fn drive(a: &SoakArgs, decode: &mut Control, prefill: &mut Control) -> anyhow::Result<SoakReport> {
    // What the decode agent serves, not this command's flags: in cluster
    // mode the operator started the agents with their own.
    let info = decode.info(pb::InfoRequest {}).await?.into_inner().agent.context("decode agent reported no AgentInfo")?;
    let layout = info.layout.context("decode agent reported no layout")?;
    let (num_blocks, block_bytes) = (layout.num_blocks, layout.block_bytes);
    prefill.fill_pattern(pb::FillPatternRequest { seed: a.out.seed }).await?;
    let work = Workload {
        seed: a.out.seed,
        mode: a.mode.to_pb(),
        request_blocks: a.request_blocks.max(1),
        concurrency: a.concurrency.max(1),
        ..Default::default()
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.out.seed);
    let start = Instant::now();
    let mut total = Outcome::default();
    let mut passes = 0u64;
    let n = a.pass_blocks.clamp(1, num_blocks as usize);
    while start.elapsed() < a.duration {
        total.absorb(work.pass(decode, num_blocks, n, &format!("soak-{passes}"), &mut rng).await?);
        passes += 1;
        if a.pause_ms > 0 {
            tokio::time::sleep(Duration::from_millis(a.pause_ms)).await;
        }
    }
    let duration_secs = start.elapsed().as_secs_f64();
    let d = agent_result("decode", a, decode).await?;
    let p = agent_result("prefill", a, prefill).await?;
    let verified = total.verified();
    let ok = !a.demo_allow_ucx_mmap_hooks
        && verified
        && d.verdict == "ok"
        && p.verdict == "ok"
        && d.ucx_intercepted_munmaps == 0
        && p.ucx_intercepted_munmaps == 0;
    Ok(SoakReport {
        ok,
        demo_ucx_mmap_hooks_on: a.demo_allow_ucx_mmap_hooks,
        demo_rcache_max_unreleased: a.demo_rcache_max_unreleased.clone(),
        duration_secs,
        transport: info.transport,
        mode: a.mode.name().to_string(),
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
        decode: d,
        prefill: p,
    })
}

async fn agent_result(role: &str, a: &SoakArgs, p: &mut Control) -> anyhow::Result<AgentResult> {
    let s = p.stats(pb::StatsRequest {}).await?.into_inner();
    let mem = s.memory.clone().unwrap_or_default();
    let report: MemReport = serde_json::from_str(&mem.report_json).context("agent sent no MemWatch report")?;
    let svg = render_chart(role, &report);
    let chart_path = a.report.join(format!("{role}.svg"));
    std::fs::write(&chart_path, svg)?;
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
        memwatch: report,
    })
}

const MIB: f64 = (1u64 << 20) as f64;

fn render_chart(role: &str, r: &MemReport) -> String {
    let pts = |f: &dyn Fn(&crate::memwatch::sample::Sample) -> Option<u64>| -> Vec<(f64, f64)> {
        r.samples.iter().filter_map(|s| f(s).map(|v| (s.t_secs, v as f64 / MIB))).collect()
    };
    let rss = pts(&|s| Some(s.vm_rss));
    let a = &r.assessment;
    let mut trends = Vec::new();
    // The fitted RSS slope over the last window, anchored at the mean.
    if let (Some(last), true) = (rss.last(), a.samples_in_window > 1) {
        let t1 = last.0;
        let t0 = (t1 - a.window_secs).max(0.0);
        let inwin: Vec<&(f64, f64)> = rss.iter().filter(|p| p.0 >= t0).collect();
        if !inwin.is_empty() {
            let (mt, my) = inwin.iter().fold((0.0, 0.0), |acc, p| (acc.0 + p.0, acc.1 + p.1));
            let (mt, my) = (mt / inwin.len() as f64, my / inwin.len() as f64);
            let k = a.rss_slope_mib_per_min / 60.0;
            trends.push(Trend { label: "RSS fit", color: "#d62728", t0, y0: my + k * (t0 - mt), t1, y1: my + k * (t1 - mt) });
        }
    }
    let subtitle = format!(
        "verdict {} — RSS slope {:.3} MiB/min over {:.0} s (threshold {:.2}), heap slope {}",
        a.verdict.as_str(),
        a.rss_slope_mib_per_min,
        a.window_secs,
        a.threshold_mib_per_min,
        a.heap_slope_mib_per_min.map_or("n/a".into(), |h| format!("{h:.3} MiB/min"))
    );
    let title = format!("kvrail soak — {role} agent memory");
    chart::render(&Chart {
        title: &title,
        subtitle: &subtitle,
        series: vec![
            Series { name: "RSS", color: "#1f77b4", points: rss },
            Series { name: "RssAnon", color: "#ff7f0e", points: pts(&|s| Some(s.rss_anon)) },
            Series { name: "heap", color: "#2ca02c", points: pts(&|s| s.heap) },
        ],
        trends,
        shade_until: Some(r.config.trend.warmup_secs),
    })
}

fn print_human(r: &SoakReport, path: &std::path::Path) {
    println!(
        "kvrail soak: {:.0} s, {} passes, {} requests ({} failed), {:.2} GB/s while moving, {} over {}",
        r.duration_secs, r.passes, r.requests, r.failed_requests, r.gbps_while_moving, r.mode, r.transport
    );
    println!("  verify     {}: {} of {} blocks", if r.verified { "VERIFIED" } else { "NOT VERIFIED" }, r.verified_blocks, r.blocks);
    for (name, x) in [("decode", &r.decode), ("prefill", &r.prefill)] {
        println!(
            "  {name:<8}   {} — RSS {:+.3} MiB/min (threshold {:.2}, {:.0} s window), hooks {}, churn munmaps {}, UCX intercepted {}",
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
    println!("  report     {} (charts beside it)", path.display());
    println!("  result     {}", if r.ok { "OK" } else { "FAILED" });
}
