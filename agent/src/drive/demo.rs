//! `kvrail demo`: the main job. Starts a decode and a prefill agent as two
//! processes on loopback, handshakes, streams `--bytes` of KV blocks with a
//! scattered block mapping, verifies every block on the decode side, and
//! reports throughput and both agents' memory.
//!
//! Each pass over the region: the decode side poisons the destination
//! blocks, the requests run (timed), then every destination block is checked
//! against the pattern of the source block mapped to it.

use std::time::Duration;

use anyhow::Context as _;
use kvrail_proto::v1 as pb;
use rand::SeedableRng;
use serde::Serialize;

use super::children::{prefaulted, AgentProcess};
use super::workload::{Outcome, Workload};
use crate::cli::DemoArgs;
use crate::units::format_bytes;

#[derive(Debug, Serialize)]
struct AgentSummary {
    agent_id: String,
    ucx_version: String,
    ucx_library: String,
    mmap_hook_mode: String,
    rss_start_mib: f64,
    rss_end_mib: f64,
    /// Private memory (RssAnon): where a leak shows. The rest of RSS is the
    /// shared region and, on sm, the peer's mapped segment.
    private_start_mib: f64,
    private_end_mib: f64,
    shared_end_mib: f64,
    /// MemWatch's verdict at the end.
    memory_verdict: String,
    bytes_moved: u64,
    ucx_intercepted_munmaps: u64,
}

#[derive(Debug, Serialize)]
struct DemoReport {
    bytes: u64,
    blocks: u64,
    block_bytes: u64,
    requests: u64,
    seconds: f64,
    gbps: f64,
    verified: bool,
    verified_blocks: u64,
    bad_blocks: u64,
    first_error: String,
    failed_requests: u64,
    transport: String,
    mode: String,
    ucx_version: String,
    ucx_library: String,
    mmap_hook_mode: String,
    handshake_ms: f64,
    p50_request_ms: f64,
    p99_request_ms: f64,
    decode: AgentSummary,
    prefill: AgentSummary,
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

async fn stats(p: &mut AgentProcess) -> anyhow::Result<pb::StatsResponse> {
    Ok(p.control.stats(pb::StatsRequest {}).await?.into_inner())
}

fn hook_name(raw: i32) -> String {
    crate::agent::convert::hook_mode_name(raw)
}

pub async fn run(args: &DemoArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(args.block_bytes > 0 && args.bytes >= args.block_bytes, "--bytes must hold at least one --block-bytes block");
    anyhow::ensure!(args.request_blocks > 0 && args.concurrency > 0, "--request-blocks and --concurrency must be positive");
    let common = vec![
        "--transport".to_string(),
        args.transport.to_string(),
        "--region-bytes".into(),
        args.region_bytes.to_string(),
        "--block-bytes".into(),
        args.block_bytes.to_string(),
        "--test-patterns".into(),
    ];
    let timeout = Duration::from_secs(120);
    let mut decode_args = vec!["decode".to_string(), "--agent-id".into(), "demo-decode".into()];
    decode_args.extend(common.clone());
    let mut decode = AgentProcess::spawn(&decode_args, args.out.verbose, timeout).await.context("starting the decode agent")?;
    let mut prefill_args = vec!["prefill".to_string(), "--agent-id".into(), "demo-prefill".into(), "--peer".into(), decode.listen.clone()];
    prefill_args.extend(common);
    let mut prefill = AgentProcess::spawn(&prefill_args, args.out.verbose, timeout).await.context("starting the prefill agent")?;
    let handshake_ms = prefill.ready["handshake_ms"].as_f64().unwrap_or(f64::NAN);

    let report = drive(args, &mut decode, &mut prefill, handshake_ms).await;
    decode.stop().await;
    prefill.stop().await;
    let report = report?;
    if args.out.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_human(&report);
    }
    Ok(if report.verified && report.failed_requests == 0 { 0 } else { 1 })
}

async fn drive(args: &DemoArgs, decode: &mut AgentProcess, prefill: &mut AgentProcess, handshake_ms: f64) -> anyhow::Result<DemoReport> {
    let d_start = stats(decode).await?;
    let p_start = stats(prefill).await?;
    let info = decode.control.info(pb::InfoRequest {}).await?.into_inner();
    let num_blocks = info.agent.and_then(|a| a.layout).map(|l| l.num_blocks).context("decode agent reported no layout")? as usize;
    prefill.control.fill_pattern(pb::FillPatternRequest { seed: args.out.seed }).await?;
    for agent in [&mut *decode, &mut *prefill] {
        prefaulted(&mut agent.control, Duration::from_secs(60)).await?;
    }

    let total_blocks = (args.bytes / args.block_bytes) as usize;
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.out.seed);
    let work = Workload {
        seed: args.out.seed,
        mode: args.mode.to_pb(),
        request_blocks: args.request_blocks,
        concurrency: args.concurrency,
        ..Default::default()
    };
    let mut total = Outcome::default();
    let mut pass = 0u64;
    while (total.blocks as usize) < total_blocks {
        let n = (total_blocks - total.blocks as usize).min(num_blocks);
        total.absorb(work.pass(&mut decode.control, num_blocks as u32, n, &format!("demo-{pass}"), &mut rng).await?);
        pass += 1;
    }
    let d_end = stats(decode).await?;
    let p_end = stats(prefill).await?;
    let bytes = total_blocks as u64 * args.block_bytes;
    let summary = |start: &pb::StatsResponse, end: &pb::StatsResponse| AgentSummary {
        agent_id: end.agent_id.clone(),
        ucx_version: end.ucx_version.clone(),
        ucx_library: end.ucx_library.clone(),
        mmap_hook_mode: hook_name(end.hook_mode),
        rss_start_mib: mib(start.memory.as_ref().map_or(0, |m| m.vm_rss)),
        rss_end_mib: mib(end.memory.as_ref().map_or(0, |m| m.vm_rss)),
        private_start_mib: mib(start.memory.as_ref().map_or(0, |m| m.rss_anon)),
        private_end_mib: mib(end.memory.as_ref().map_or(0, |m| m.rss_anon)),
        shared_end_mib: mib(end.memory.as_ref().map_or(0, |m| m.rss_shmem)),
        memory_verdict: end.memory.as_ref().map_or_else(String::new, |m| m.verdict.clone()),
        bytes_moved: end.bytes_moved,
        ucx_intercepted_munmaps: end.ucx_intercepted_munmaps,
    };
    let decode_summary = summary(&d_start, &d_end);
    let prefill_summary = summary(&p_start, &p_end);
    let hooks_both = if decode_summary.mmap_hook_mode == prefill_summary.mmap_hook_mode {
        decode_summary.mmap_hook_mode.clone()
    } else {
        format!("decode {}, prefill {}", decode_summary.mmap_hook_mode, prefill_summary.mmap_hook_mode)
    };
    Ok(DemoReport {
        bytes,
        blocks: total_blocks as u64,
        block_bytes: args.block_bytes,
        requests: total.requests,
        seconds: total.seconds,
        gbps: if total.seconds > 0.0 { bytes as f64 / total.seconds / 1e9 } else { 0.0 },
        verified: total.verified(),
        verified_blocks: total.verified_blocks,
        bad_blocks: total.bad_blocks,
        first_error: total.first_error.clone(),
        failed_requests: total.failed_requests,
        transport: args.transport.to_string(),
        mode: args.mode.name().to_string(),
        ucx_version: decode_summary.ucx_version.clone(),
        ucx_library: decode_summary.ucx_library.clone(),
        mmap_hook_mode: hooks_both,
        handshake_ms,
        p50_request_ms: total.latency_ms(0.50),
        p99_request_ms: total.latency_ms(0.99),
        decode: decode_summary,
        prefill: prefill_summary,
    })
}

fn print_human(r: &DemoReport) {
    let verdict = if r.verified { "VERIFIED" } else { "NOT VERIFIED" };
    println!(
        "kvrail demo: {} {} of {} blocks over {} ({}), {} requests",
        r.mode,
        format_bytes(r.bytes),
        format_bytes(r.block_bytes),
        r.transport,
        r.ucx_version,
        r.requests
    );
    println!("  throughput   {:.2} GB/s ({:.3} s moving data)", r.gbps, r.seconds);
    println!("  requests     p50 {:.2} ms, p99 {:.2} ms, {} failed", r.p50_request_ms, r.p99_request_ms, r.failed_requests);
    println!("  handshake    {:.1} ms", r.handshake_ms);
    println!(
        "  verify       {verdict}: {} of {} blocks match their source pattern{}",
        r.verified_blocks,
        r.blocks,
        if r.first_error.is_empty() { String::new() } else { format!(" — {}", r.first_error) }
    );
    println!("  mmap hooks   {} (UCX {})", r.mmap_hook_mode, r.ucx_library);
    for (name, a) in [("decode", &r.decode), ("prefill", &r.prefill)] {
        println!(
            "  {name:<8}     RSS {:.1} -> {:.1} MiB (private {:.1} -> {:.1} MiB, shared {:.1} MiB), MemWatch {}, {} munmaps intercepted by UCX",
            a.rss_start_mib,
            a.rss_end_mib,
            a.private_start_mib,
            a.private_end_mib,
            a.shared_end_mib,
            if a.memory_verdict.is_empty() { "-" } else { &a.memory_verdict },
            a.ucx_intercepted_munmaps
        );
    }
}
