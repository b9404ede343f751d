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

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kvrail_proto::v1 as pb;
use kvrail_transfer::Transport;
use rand::SeedableRng;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::children::{control_at, drain, next_json, prefaulted, AgentProcess};
use super::workload::{scattered, Control, Outcome, Workload};
use crate::cli::{BenchArgs, Mode};
use crate::units::format_bytes;

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

/// The median of `v` (the mean of the middle two for an even count; NaN
/// when empty).
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// GB/s (1e9 bytes per second), 0 when nothing was timed.
pub fn gbps(bytes: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        bytes as f64 / secs / 1e9
    } else {
        0.0
    }
}

/// The passes of one run: `total` blocks, at most `per_pass` (a region's
/// worth) at a time.
pub fn passes(total: usize, per_pass: usize) -> Vec<usize> {
    let per_pass = per_pass.max(1);
    (0..total.div_ceil(per_pass)).map(|i| (total - i * per_pass).min(per_pass)).collect()
}

/// The point's ratio from its runs' ratios (in run order): runs pair up
/// (1-2, 3-4, ...; one pair with kvrail's processes started first, one
/// with the raw loop's), each pair gives the geometric mean of its two,
/// which cancels what the start order does to both, and the median of the
/// pairs is the ratio. A last run without a partner stands alone.
pub fn paired_ratio(runs: &[f64]) -> f64 {
    let mut pairs: Vec<f64> = runs.chunks(2).map(|c| c.iter().product::<f64>().powf(1.0 / c.len() as f64)).collect();
    median(&mut pairs)
}

/// kvrail / raw, 0 when the baseline is missing.
pub fn ratio(kvrail: f64, raw: f64) -> f64 {
    if raw > 0.0 && kvrail.is_finite() {
        kvrail / raw
    } else {
        0.0
    }
}

/// Cluster mode (`--peer`): the running decode agent and what it serves.
struct Remote {
    addr: String,
    decode: Control,
    info: pb::AgentInfo,
}

impl Remote {
    async fn connect(a: &BenchArgs, addr: &str) -> anyhow::Result<Remote> {
        anyhow::ensure!(
            crate::agent::auth::ClusterSecret::load(a.cluster_secret_file.as_deref())?.is_some(),
            "--peer: the prefill agents this bench starts need the cluster's secret: set {} or pass --cluster-secret-file",
            crate::agent::auth::SECRET_VAR
        );
        let tls = a.tls.load()?;
        let mut decode = control_at(addr, tls.as_ref()).await.with_context(|| format!("connecting to the decode agent at {addr}"))?;
        let info =
            decode.info(pb::InfoRequest {}).await?.into_inner().agent.with_context(|| format!("the agent at {addr} sent no AgentInfo"))?;
        Ok(Remote { addr: addr.to_string(), decode, info })
    }
}

/// With `--peer`: the bench's arguments with the transport, block size and
/// region of the decode agent (`info`) in place. The command line may name
/// them, but nothing else.
pub fn adopt_peer(a: &BenchArgs, info: &pb::AgentInfo) -> anyhow::Result<BenchArgs> {
    let peer = a.peer.as_deref().unwrap_or_default();
    anyhow::ensure!(
        info.role == pb::Role::Decode as i32,
        "the agent at {peer} is not a decode agent: --peer names the decode agent to measure against"
    );
    let layout = info.layout.as_ref().with_context(|| format!("the agent at {peer} reported no block layout"))?;
    anyhow::ensure!(
        layout.num_layers <= 1,
        "the decode agent at {peer} has a layer-major layout ({} layers), and the bench compares whole blocks with the raw-UCX loop: measure against an agent started without --layers",
        layout.num_layers
    );
    let t: Transport =
        info.transport.parse().map_err(|e| anyhow::anyhow!("the decode agent at {peer} reports transport {:?}: {e}", info.transport))?;
    let region = u64::from(layout.num_blocks) * layout.block_bytes;
    agree("--transport", &a.transport, &t, peer)?;
    agree("--block-bytes", &a.block_bytes, &layout.block_bytes, peer)?;
    agree("--region-bytes", a.region_bytes.as_slice(), &region, peer)?;
    Ok(BenchArgs { transport: vec![t], block_bytes: vec![layout.block_bytes], region_bytes: Some(region), ..a.clone() })
}

/// Every value `given` for `flag` is the decode agent's own.
fn agree<T: PartialEq + std::fmt::Display>(flag: &str, given: &[T], theirs: &T, peer: &str) -> anyhow::Result<()> {
    match given.iter().find(|g| *g != theirs) {
        None => Ok(()),
        Some(g) => Err(anyhow::anyhow!(
            "{flag} {g} is not what the decode agent at {peer} serves ({theirs}): leave {flag} out to measure the agent's, or start the agent with {flag} {g}"
        )),
    }
}

pub async fn run(a: &BenchArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(
        a.peer.is_some() || a.tls.tls_cert.is_none(),
        "--tls-* are for --peer: the agents a bench starts on its own talk over loopback"
    );
    let remote = match &a.peer {
        Some(addr) => Some(Remote::connect(a, addr).await?),
        None => None,
    };
    let adopted = match &remote {
        Some(r) => adopt_peer(a, &r.info)?,
        None => a.clone(),
    };
    let bench = Bench { a: adopted, remote };
    let a = &bench.a;
    anyhow::ensure!(!a.mode.is_empty(), "nothing to measure");
    // Read the CPUs while this process may still use all of them.
    bench_cpus(a);
    let mut points = Vec::new();
    let mut memcpy = std::collections::HashMap::new();
    let (transports, blocks) = (a.transports(), a.blocks());
    let progress = Progress::new((transports.len() * blocks.len() * a.mode.len()) as u64);
    for &t in &transports {
        for &b in &blocks {
            for &m in &a.mode {
                let name = format!("{t} {} {}", m.name(), format_bytes(b));
                if let std::collections::hash_map::Entry::Vacant(e) = memcpy.entry(b) {
                    progress.stage(&name, "memcpy limit");
                    let (region, total, seed) = (a.region(), a.total_bytes, a.out.seed);
                    e.insert(tokio::task::spawn_blocking(move || memcpy_gbps(region, b, total, seed)).await?);
                }
                let p = point(&bench, t, b, m, memcpy[&b], |stage| progress.stage(&name, stage))
                    .await
                    .with_context(|| format!("point {name}"))?;
                if a.out.json {
                    println!("{}", serde_json::to_string(&p)?);
                }
                progress.point_done(format!(
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
    progress.finish();
    if !a.out.json {
        print_table(&points);
    }
    Ok(if points.iter().all(|p| p.verified) { 0 } else { 1 })
}

/// A progress bar on a terminal; plain lines on stderr otherwise (logs, CI).
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(points: u64) -> Progress {
        use std::io::IsTerminal as _;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(points);
            let style = indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} points  {msg}")
                .expect("static template");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress { bar }
    }

    fn stage(&self, point: &str, stage: &str) {
        match &self.bar {
            Some(bar) => bar.set_message(format!("{point}: {stage}")),
            None => eprintln!("bench: {point}: {stage} ..."),
        }
    }

    fn point_done(&self, line: String) {
        match &self.bar {
            Some(bar) => {
                bar.println(line);
                bar.inc(1);
            }
            None => eprintln!("{line}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// The arguments (with `--peer`, the decode agent's geometry adopted) and
/// the remote decode agent, if any.
struct Bench {
    a: BenchArgs,
    remote: Option<Remote>,
}

async fn point(b: &Bench, t: Transport, block: u64, mode: Mode, memcpy: f64, stage: impl Fn(&str)) -> anyhow::Result<Point> {
    let a = &b.a;
    let n = a.repeat.max(1);
    let (mut outcome, mut ucx_version, mut warmups_verified) = (Outcome::default(), String::new(), true);
    let (mut runs, mut raws, mut ratios, mut handshakes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 1..=n {
        stage(&format!("run {i}/{n}: kvrail and the raw-UCX loop, pass by pass"));
        let r = match control_cpu(a, t, mode) {
            Some(cpu) => tokio::task::block_in_place(|| on_cpu(cpu, || one_run(b, t, block, mode, i)))?,
            None => one_run(b, t, block, mode, i).await?,
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

/// Runs a future to completion on a thread of its own bound to `cpu`, with
/// a single-threaded runtime of its own (processes it starts inherit the
/// binding until they bind their threads themselves).
fn on_cpu<F: std::future::Future<Output = anyhow::Result<T>>, T: Send>(cpu: usize, f: impl FnOnce() -> F + Send) -> anyhow::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            kvrail_transfer::cpu::bind_this_thread(&[cpu]).with_context(|| format!("binding the bench client to CPU {cpu}"))?;
            tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the bench client thread panicked"))?
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

/// One run (`i` counts from 1): fresh kvrail agents and raw-UCX processes,
/// both set up (connected, pattern filled, peer mappings pre-faulted)
/// before anything is timed, then taking turns pass by pass.
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
    kvrail.stop().await;
    raw.stop().await;
    Ok(run)
}

/// A decode and a prefill agent, handshaked, the prefill region filled with
/// the test pattern and both peer mappings pre-faulted.
struct Agents {
    decode: Control,
    /// The agents this bench started (decode and prefill; with `--peer`,
    /// prefill only).
    procs: Vec<AgentProcess>,
    work: Workload,
    rng: rand::rngs::StdRng,
    num_blocks: u32,
    handshake_ms: f64,
    ucx_version: String,
}

impl Agents {
    async fn start(b: &Bench, t: Transport, block: u64, mode: Mode, run: usize) -> anyhow::Result<Agents> {
        let a = &b.a;
        let common = |role: &str, id: &str| -> Vec<String> {
            let mut v = vec![role.to_string(), "--agent-id".into(), id.into(), "--test-patterns".into()];
            v.extend(geometry_args(a, t, block));
            v.extend(pin_args(a, usize::from(role == "prefill")));
            v.extend(control_cpu(a, t, mode).map(|cpu| ["--runtime-cpus".to_string(), cpu.to_string()]).into_iter().flatten());
            v
        };
        let limit = Duration::from_secs(120);
        // The decode agent's Control client and process id (with --peer it
        // runs elsewhere), the agents started here, and the name requests
        // give the prefill agent.
        let (mut decode, decode_pid, mut procs, prefill_id) = match &b.remote {
            Some(r) => {
                // A running decode agent may still hold an earlier run's
                // prefill agent for a lease: each run's has a name of its own.
                let id = format!("bench-prefill-{}-{run}", std::process::id());
                let mut p = common("prefill", &id);
                p.extend(["--peer".into(), r.addr.clone()]);
                p.extend(a.cluster_secret_file.iter().flat_map(|f| ["--cluster-secret-file".into(), f.display().to_string()]));
                p.extend(a.tls.to_args());
                let prefill = AgentProcess::spawn(&p, a.out.verbose, limit).await?;
                let mut decode = r.decode.clone();
                session_open(&mut decode, &id, &r.addr, Duration::from_secs(30)).await?;
                (decode, None, vec![prefill], id)
            }
            None => {
                let decode = AgentProcess::spawn(&common("decode", "bench-decode"), a.out.verbose, limit).await?;
                let mut p = common("prefill", "bench-prefill");
                p.extend(["--peer".into(), decode.listen.clone()]);
                let prefill = AgentProcess::spawn(&p, a.out.verbose, limit).await?;
                (decode.control.clone(), decode.child.id(), vec![decode, prefill], String::new())
            }
        };
        let prefill = procs.last_mut().context("no prefill agent")?;
        let handshake_ms = prefill.ready["handshake_ms"].as_f64().unwrap_or(f64::NAN);
        let ucx_version = prefill.ready["ucx_version"].as_str().unwrap_or("").to_string();
        prefill.control.fill_pattern(pb::FillPatternRequest { seed: a.out.seed }).await?;
        // The raw loop times nothing before its peer mapping is pre-faulted.
        prefaulted(&mut decode, Duration::from_secs(60)).await?;
        prefaulted(&mut prefill.control, Duration::from_secs(60)).await?;
        let prefill_pid = prefill.child.id();
        let work = Workload {
            seed: a.out.seed,
            mode: mode.to_pb(),
            request_blocks: (a.request_bytes / block).max(1) as usize,
            concurrency: a.concurrency.max(1),
            cpu_of: [decode_pid, prefill_pid],
            peer: prefill_id,
        };
        let rng = rand::rngs::StdRng::seed_from_u64(a.out.seed);
        Ok(Agents { decode, procs, work, rng, num_blocks: (a.region() / block) as u32, handshake_ms, ucx_version })
    }

    /// Pass `p` of `n` blocks (`p` names its requests): poisoned, moved
    /// (timed), verified.
    async fn pass(&mut self, n: usize, p: usize) -> anyhow::Result<Outcome> {
        self.work.pass(&mut self.decode, self.num_blocks, n, &format!("bench-{p}"), &mut self.rng).await
    }

    async fn stop(self) {
        for p in self.procs {
            p.stop().await;
        }
    }
}

/// Waits until the decode agent behind `decode` lists prefill agent `id`
/// among its peers (handshaked, session stream open).
async fn session_open(decode: &mut Control, id: &str, peer: &str, limit: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    while !decode.info(pb::InfoRequest {}).await?.into_inner().peers.iter().any(|p| p == id) {
        anyhow::ensure!(start.elapsed() < limit, "prefill agent {id} has no open session with the decode agent at {peer} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The flags kvrail's agents and the raw loop share: same transport, region,
/// block size and op window.
fn geometry_args(a: &BenchArgs, t: Transport, block: u64) -> Vec<String> {
    [
        ("--transport", t.to_string()),
        ("--region-bytes", a.region().to_string()),
        ("--block-bytes", block.to_string()),
        ("--window", a.window.to_string()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_string(), v])
    .collect()
}

/// The first two CPUs this process may use, read once (the bench's client
/// later runs bound to one of them), or none when pinning is off or there
/// are fewer than two.
fn bench_cpus(a: &BenchArgs) -> &'static [usize] {
    static CPUS: std::sync::OnceLock<Vec<usize>> = std::sync::OnceLock::new();
    let cpus = CPUS.get_or_init(|| {
        let c = kvrail_transfer::cpu::allowed_cpus().unwrap_or_default();
        if c.len() >= 2 {
            c[..2].to_vec()
        } else {
            Vec::new()
        }
    });
    // With --peer the other side runs elsewhere: nothing to keep apart.
    if a.no_pin || a.peer.is_some() {
        &[]
    } else {
        cpus
    }
}

/// `--progress-cpu` for the side blocks flow into (0: the decode agent, the
/// raw process in its place) or out of (1: the prefill agent, or its raw
/// stand-in): the first and second of [`bench_cpus`].
fn pin_args(a: &BenchArgs, side: usize) -> Vec<String> {
    bench_cpus(a).get(side).map(|cpu| vec!["--progress-cpu".into(), cpu.to_string()]).unwrap_or_default()
}

/// The CPU for everything of a kvrail run besides the two progress threads
/// (the agents' gRPC and async runtimes, and this process's client driving
/// them): the one the limiting progress thread does not use, so the
/// control plane does not preempt it. On `sm` one progress thread does all
/// the copying (prefill's on writes, decode's on reads) and the other side
/// sleeps. On tcp both are busy, and the sender's (prefill's in both modes:
/// over tcp a read is delivered by the prefill agent too) is the limit,
/// copying into socket buffers, while the receiver's (decode's) polls with
/// time to spare; so the control plane goes with the decode agent.
/// Measured on tcp 1 MiB writes (`/proc/<tid>/status` and `schedstat`
/// during the passes): left unbound, the prefill's progress thread was
/// preempted ~130 times a second and waited 1.7% of its time for its CPU;
/// bound this way, ~30 times and 1.2%, like the raw loop's sender (45-52
/// times, 1.0-2.7%). The raw loop has no such threads.
fn control_cpu(a: &BenchArgs, t: Transport, mode: Mode) -> Option<usize> {
    // The decode agent's progress thread has the first CPU, the prefill's
    // the second: see `pin_args`.
    let decode_side = t.writes_as_messages() || matches!(mode, Mode::Write);
    bench_cpus(a).get(usize::from(!decode_side)).copied()
}

/// The two raw-UCX processes, connected (the initiator's view of the
/// target's region pre-faulted), the target resting between passes.
struct RawLoop {
    /// `None` with `--raw-peer`: the target runs elsewhere, and `target_in`
    /// is the connection to it.
    target: Option<tokio::process::Child>,
    target_in: Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
    /// Whether the target progresses during a pass: only where it takes
    /// part (tcp deliveries). A one-sided put or get on `sm` needs nothing
    /// of it, and kvrail's passive agent sleeps through one too, so the
    /// two sides differ only in the engine (see the README).
    serves: bool,
    init: tokio::process::Child,
    init_in: tokio::process::ChildStdin,
    init_out: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl RawLoop {
    async fn start(a: &BenchArgs, t: Transport, block: u64, mode: Mode) -> anyhow::Result<RawLoop> {
        let exe = std::env::current_exe()?;
        let spawn = |role: &str| -> anyhow::Result<(tokio::process::Child, tokio::process::ChildStdin, _)> {
            let mut v = vec!["--log-level".into(), "warn".into(), "raw-ucx".into(), "--role".into(), role.into()];
            v.extend(geometry_args(a, t, block));
            v.extend(["--mode".into(), mode.name().into(), "--request-bytes".into(), a.request_bytes.to_string()]);
            // Blocks flow into the target on writes and deliveries (tcp,
            // both modes) and into the initiator on reads; the receiving
            // side takes the decode agent's CPU.
            let into_target = matches!(mode, Mode::Write) || t.writes_as_messages();
            let receives = (role == "target") == into_target;
            v.extend(pin_args(a, usize::from(!receives)));
            v.extend(["--seed".into(), a.out.seed.to_string()]);
            let mut child =
                tokio::process::Command::new(&exe).args(v).stdin(Stdio::piped()).stdout(Stdio::piped()).kill_on_drop(true).spawn()?;
            let stdin = child.stdin.take().context("raw-UCX stdin")?;
            let lines = BufReader::new(child.stdout.take().context("raw-UCX stdout")?).lines();
            Ok((child, stdin, lines))
        };
        let limit = Duration::from_secs(60);
        let (target, mut target_in, ready): (_, Box<dyn tokio::io::AsyncWrite + Unpin + Send>, _) = match &a.raw_peer {
            Some(addr) => {
                let conn = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("connecting to the raw-UCX target at {addr} (`kvrail raw-ucx --role target --listen`)"))?;
                let (rd, wr) = conn.into_split();
                let ready =
                    read_json(&mut BufReader::new(rd).lines(), "rkey", limit).await.with_context(|| format!("raw-UCX target at {addr}"))?;
                (None, Box::new(wr), ready)
            }
            None => {
                let (target, target_in, mut target_out) = spawn("target")?;
                let ready = read_json(&mut target_out, "rkey", limit).await.context("raw-UCX target")?;
                // UCX may log to its stdout.
                drain(target_out);
                (Some(target), Box::new(target_in), ready)
            }
        };
        let (init, mut init_in, mut init_out) = spawn("initiator")?;
        // Connecting (wire-up, warm-up operation) needs the target's
        // progress.
        target_in.write_all(b"serve\n").await?;
        init_in.write_all(format!("{ready}\n").as_bytes()).await?;
        read_json(&mut init_out, "event", limit).await.context("raw-UCX initiator")?;
        target_in.write_all(b"rest\n").await?;
        Ok(RawLoop { target, target_in, serves: t.writes_as_messages(), init, init_in, init_out })
    }

    /// One pass of `n` blocks; returns its seconds.
    async fn pass(&mut self, n: usize) -> anyhow::Result<f64> {
        if self.serves {
            self.target_in.write_all(b"serve\n").await?;
        }
        self.init_in.write_all(format!("{n}\n").as_bytes()).await?;
        let done = read_json(&mut self.init_out, "seconds", Duration::from_secs(600)).await.context("raw-UCX pass")?;
        if self.serves {
            self.target_in.write_all(b"rest\n").await?;
        }
        done["seconds"].as_f64().context("raw-UCX pass without seconds")
    }

    async fn stop(self) {
        let RawLoop { target, target_in, init, init_in, .. } = self;
        drop((init_in, target_in));
        for mut child in std::iter::once(init).chain(target) {
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }
}

/// The next JSON object with `key` on `lines`, within `limit`; other lines
/// (UCX may log to stdout too) are skipped.
async fn read_json(
    lines: &mut tokio::io::Lines<BufReader<impl tokio::io::AsyncRead + Unpin>>,
    key: &str,
    limit: Duration,
) -> anyhow::Result<serde_json::Value> {
    tokio::time::timeout(limit, next_json(lines, |v| v.get(key).is_some()))
        .await
        .map_err(|_| anyhow::anyhow!("no line holding `{key}` within {limit:?}"))??
        .with_context(|| format!("exited without a line holding `{key}`"))
}

/// Scattered block copies between two region-sized buffers: the streaming
/// memcpy limit for this block size on this machine.
pub fn memcpy_gbps(region: u64, block: u64, total: u64, seed: u64) -> f64 {
    let (region, block) = (region as usize, block as usize);
    let n_blocks = (region / block).max(1);
    let src = vec![1u8; n_blocks * block];
    let mut dst = vec![0u8; n_blocks * block];
    // Fault the destination in first, as the regions of both processes are.
    for b in dst.iter_mut().step_by(4096) {
        *b = 2;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut moved = 0u64;
    let mut secs = 0.0;
    while moved < total {
        let n = (((total - moved) / block as u64) as usize).clamp(1, n_blocks);
        let (s, d) = scattered(&mut rng, n_blocks as u32, n);
        let t0 = Instant::now();
        for (&s, &d) in s.iter().zip(&d) {
            let (s, d) = (s as usize * block, d as usize * block);
            dst[d..d + block].copy_from_slice(&src[s..s + block]);
        }
        secs += t0.elapsed().as_secs_f64();
        moved += (n * block) as u64;
    }
    std::hint::black_box(&dst);
    moved as f64 / secs / 1e9
}

/// Parses ucx_perftest's `Final:` line; returns GB/s (its MB/s are MiB/s).
pub fn parse_perftest(out: &str) -> Option<f64> {
    let line = out.lines().rev().find(|l| l.trim_start().starts_with("Final:"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let mib_s: f64 = f.get(6)?.parse().ok()?;
    Some(mib_s * 1_048_576.0 / 1e9)
}

async fn perftest(t: Transport, block: u64, mode: Mode) -> anyhow::Result<f64> {
    let bin = match std::env::var_os(crate::guard::UCX_LIB_VAR) {
        Some(lib) => std::path::PathBuf::from(lib).join("../bin/ucx_perftest"),
        None => "ucx_perftest".into(),
    };
    let port = 20000 + (std::process::id() % 20000) as u16;
    let test = if mode == Mode::Write { "ucp_put_bw" } else { "ucp_get" };
    let iters = ((1u64 << 30) / block).clamp(1000, 100_000).to_string();
    let tls = t.ucx_tls().unwrap_or("all");
    let mut server = tokio::process::Command::new(&bin)
        .args(["-p", &port.to_string()])
        .env("UCX_TLS", tls)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&bin)
            .args(["127.0.0.1", "-p", &port.to_string(), "-t", test, "-s", &block.to_string(), "-n", &iters])
            .env("UCX_TLS", tls)
            .output(),
    )
    .await??;
    let _ = server.kill().await;
    parse_perftest(&String::from_utf8_lossy(&out.stdout)).context("ucx_perftest printed no Final line")
}

fn print_table(points: &[Point]) {
    println!(
        "{:<5} {:<6} {:>8} {:>9} {:>9} {:>6} {:>9} {:>10} {:>8} {:>8} {:>8} {:>9}",
        "tl", "mode", "block", "kvrail", "raw UCX", "ratio", "memcpy", "perftest", "p50 us", "p99 us", "hs ms", "verified"
    );
    for p in points {
        println!(
            "{:<5} {:<6} {:>8} {:>9.2} {:>9.2} {:>6.2} {:>9.2} {:>10} {:>8.0} {:>8.0} {:>8.1} {:>9}",
            p.transport,
            p.mode,
            format_bytes(p.block_bytes),
            p.gbps,
            p.raw_ucx_gbps,
            p.ratio,
            p.memcpy_gbps,
            p.ucx_perftest_gbps.map_or("-".into(), |g| format!("{g:.2}")),
            p.p50_us,
            p.p99_us,
            p.handshake_ms,
            p.verified
        );
    }
    println!("(GB/s = 1e9 bytes/s; ratio = kvrail / raw UCX, same transport, block size, region and pattern)");
    if points.iter().any(|p| p.transport == "tcp" && p.ucx_assertions) {
        println!("(this UCX was built with assertions: tcp sends by copy, kvrail and raw UCX alike; see README, Benchmarks)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_json_skips_to_the_key_and_reports_an_early_exit() {
        let log = "[1795460185.286911] [vm:1:0] select.c:549 UCX ERROR no active messages transport";
        let text = format!("{log}\n{{\"event\":\"ready\"}}\n{{\"bytes\":1,\"seconds\":0.5}}\n{{\"seconds\":2}}\n");
        let mut lines = BufReader::new(text.as_bytes()).lines();
        // A UCX log line and a JSON line without the key are skipped.
        assert_eq!(read_json(&mut lines, "seconds", Duration::from_secs(1)).await.unwrap()["seconds"], 0.5);
        assert_eq!(read_json(&mut lines, "seconds", Duration::from_secs(1)).await.unwrap()["seconds"], 2);
        let e = read_json(&mut lines, "seconds", Duration::from_secs(1)).await.unwrap_err();
        assert!(e.to_string().contains("exited without a line holding `seconds`"), "{e}");
        let mut lines = BufReader::new(text.as_bytes()).lines();
        assert_eq!(read_json(&mut lines, "event", Duration::from_secs(1)).await.unwrap()["event"], "ready");
    }

    #[test]
    fn a_run_is_whole_regions_then_the_rest() {
        assert_eq!(passes(10, 4), [4, 4, 2]);
        assert_eq!(passes(8, 4), [4, 4]);
        assert_eq!(passes(3, 4), [3]);
        assert!(passes(0, 4).is_empty());
        assert_eq!(passes(2, 0), [1, 1], "a pass moves at least one block");
    }

    #[test]
    fn gbps_is_bytes_over_seconds() {
        assert_eq!(gbps(3_000_000_000, 1.5), 2.0);
        assert_eq!(gbps(1, 0.0), 0.0);
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&mut []).is_nan());
    }

    #[test]
    fn paired_ratio_cancels_the_start_order_and_drops_an_odd_pair() {
        // A true ratio of 0.95, the start order worth x1.1 one way and
        // x1/1.1 the other: every pair gives 0.95.
        let runs = [0.95 * 1.1, 0.95 / 1.1, 0.95 * 1.1, 0.95 / 1.1, 0.95 * 1.1, 0.95 / 1.1];
        assert!((paired_ratio(&runs) - 0.95).abs() < 1e-12);
        // One disturbed pair out of three does not move it.
        let r = paired_ratio(&[1.0, 0.9, 0.5, 0.6, 1.0, 1.0]);
        assert!((r - 0.9f64.sqrt()).abs() < 1e-12, "{r}");
        assert_eq!(paired_ratio(&[0.8]), 0.8, "a lone run stands alone");
        assert_eq!(paired_ratio(&[0.5, 2.0, 0.9]), 0.95, "two pairs: the mean of 1.0 and 0.9");
        assert!(paired_ratio(&[]).is_nan());
    }

    fn bench_args(extra: &[&str]) -> BenchArgs {
        use clap::Parser as _;
        let argv = ["kvrail", "bench"].into_iter().chain(extra.iter().copied());
        match crate::cli::Cli::try_parse_from(argv).unwrap().cmd {
            crate::cli::Command::Bench(a) => a,
            c => panic!("not bench: {c:?}"),
        }
    }

    fn decode_info(transport: &str, block: u64, blocks: u32, layers: u32) -> pb::AgentInfo {
        pb::AgentInfo {
            role: pb::Role::Decode as i32,
            transport: transport.into(),
            layout: Some(pb::BlockLayout { block_bytes: block, num_blocks: blocks, num_layers: layers, ..Default::default() }),
            ..Default::default()
        }
    }

    #[test]
    fn without_peer_the_lists_default_and_with_peer_the_agent_decides() {
        let local = bench_args(&[]);
        assert_eq!(local.transports(), [Transport::Sm, Transport::Tcp]);
        assert_eq!(local.blocks(), [16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20]);
        assert_eq!(local.region(), 1 << 30);

        let peer = ["--peer", "10.0.0.2:7000", "--raw-peer", "10.0.0.2:7001"];
        let info = decode_info("tcp", 64 << 10, 4096, 1);
        let a = adopt_peer(&bench_args(&peer), &info).unwrap();
        assert_eq!((a.transports(), a.blocks(), a.region()), (vec![Transport::Tcp], vec![64 << 10], 256 << 20));
        // Naming the agent's own values is fine.
        let same = [&peer[..], &["--transport", "tcp", "--block-bytes", "64KiB", "--region-bytes", "256MiB"]].concat();
        assert_eq!(adopt_peer(&bench_args(&same), &info).unwrap().blocks(), [64 << 10]);
    }

    #[test]
    fn peer_mode_refuses_what_the_decode_agent_does_not_serve() {
        let peer = ["--peer", "10.0.0.2:7000", "--raw-peer", "10.0.0.2:7001"];
        let info = decode_info("tcp", 64 << 10, 4096, 1);
        let err =
            |extra: &[&str], info: &pb::AgentInfo| adopt_peer(&bench_args(&[&peer[..], extra].concat()), info).unwrap_err().to_string();
        let e = err(&["--block-bytes", "64KiB,1MiB"], &info);
        assert!(e.contains("--block-bytes 1048576") && e.contains("(65536)") && e.contains("10.0.0.2:7000"), "{e}");
        let e = err(&["--transport", "sm"], &info);
        assert!(e.contains("--transport sm") && e.contains("(tcp)"), "{e}");
        let e = err(&["--region-bytes", "1GiB"], &info);
        assert!(e.contains("--region-bytes") && e.contains("268435456"), "{e}");
        let e = err(&[], &decode_info("tcp", 64 << 10, 4096, 4));
        assert!(e.contains("4 layers"), "{e}");
        let e = err(&[], &pb::AgentInfo { role: pb::Role::Prefill as i32, ..info.clone() });
        assert!(e.contains("not a decode agent"), "{e}");
        let e = err(&[], &decode_info("rdma?", 64 << 10, 4096, 1));
        assert!(e.contains("reports transport"), "{e}");
        // clap: the two addresses go together.
        use clap::Parser as _;
        assert!(crate::cli::Cli::try_parse_from(["kvrail", "bench", "--peer", "h:1"]).is_err());
        assert!(crate::cli::Cli::try_parse_from(["kvrail", "bench", "--raw-peer", "h:1"]).is_err());
    }

    #[test]
    fn ratio_is_kvrail_over_raw() {
        assert_eq!(ratio(9.0, 10.0), 0.9);
        assert_eq!(ratio(1.0, 0.0), 0.0);
    }

    #[test]
    fn parses_perftest_final_line() {
        let out = "+----+\nFinal:                  2000     10.533   133.204   133.204      469.21     469.21        7507        7507\n";
        let g = parse_perftest(out).unwrap();
        assert!((g - 469.21 * 1_048_576.0 / 1e9).abs() < 1e-9);
        assert_eq!(parse_perftest("no final here"), None);
    }

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

    #[test]
    fn memcpy_limit_is_positive() {
        assert!(memcpy_gbps(4 << 20, 64 << 10, 8 << 20, 1) > 0.0);
    }
}
