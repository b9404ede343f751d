//! kvrail launched by Slurm: a real single-node Slurm (munged, slurmctld,
//! slurmd as root, configured by the test) runs deploy/slurm/kvrail-soak.sbatch
//! with 2 prefill and 2 decode tasks that rendezvous through a real etcd, and
//! the job's exit code, report and logs are what the script promises; an
//! agent killed mid-soak, or a registry where nothing listens, fails the job
//! with one line saying so.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kvrail_integration::etcd::{free_port, EtcdServer};
use kvrail_integration::kvrail_bin;
use kvrail_integration::slurm::Slurm;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/slurm/kvrail-soak.sbatch")
}

/// Submits the script with 4 tasks on the one node (2 CPUs: overcommitted);
/// `env` on top of what every run gets.
fn submit(slurm: &Slurm, name: &str, env: &[(&str, &str)]) -> (u32, PathBuf, PathBuf) {
    let report = slurm.dir().join(name);
    let output = slurm.dir().join(format!("{name}.out"));
    let bin = kvrail_bin();
    let mut all: Vec<(&str, &str)> =
        vec![("KVRAIL_BIN", bin.to_str().unwrap()), ("KVRAIL_LISTEN_HOST", "127.0.0.1"), ("KVRAIL_REPORT_DIR", report.to_str().unwrap())];
    all.extend_from_slice(env);
    let out = format!("--output={}", output.display());
    let job = slurm.sbatch(&script(), &["--nodes=1", "--ntasks=4", "--overcommit", "--time=5", &out], &all);
    (job, report, output)
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| format!("({}: {e})", p.display()))
}

#[test]
fn the_sbatch_script_soaks_two_prefill_and_two_decode_tasks_all_to_all() {
    let t0 = Instant::now();
    let etcd = EtcdServer::start("slurm-soak");
    let slurm = Slurm::start("soak");
    let url = etcd.url("slurm-it");
    let (job, report, output) =
        submit(&slurm, "soak", &[("KVRAIL_REGISTRY", &url), ("KVRAIL_DURATION", "30s"), ("KVRAIL_CHURN", "5"), AGENT_ARGS, SOAK_ARGS]);
    let end = slurm.wait_job(job, Duration::from_secs(150));
    let out = read(&output);
    let logs = |n: usize| (0..n).map(|r| format!("agent-{r}.log:\n{}", read(&report.join(format!("agent-{r}.log"))))).collect::<String>();
    assert_eq!((end.state.as_str(), end.exit_code), ("COMPLETED", 0), "job {job}: {end:?}\noutput:\n{out}\n{}", logs(4));
    assert!(out.contains("all 4 agents are listed"), "{out}");

    let r: serde_json::Value =
        serde_json::from_str(&read(&report.join("report.json"))).unwrap_or_else(|e| panic!("report.json: {e}\n{out}"));
    assert_eq!(r["ok"], true, "{r:#}");
    let agents = r["agents"].as_array().expect("agents");
    assert_eq!(agents.len(), 4, "{r:#}");
    let mut roles: Vec<&str> = agents.iter().map(|a| a["role"].as_str().unwrap()).collect();
    roles.sort();
    assert_eq!(roles, ["decode", "decode", "prefill", "prefill"], "{r:#}");
    for a in agents {
        assert_eq!(a["verdict"], "ok", "{a:#}");
        assert!(a["rss_slope_mib_per_min"].is_number(), "{a:#}");
        let id = a["agent_id"].as_str().unwrap();
        assert!(id.starts_with(&format!("{}-{}-", a["role"].as_str().unwrap(), slurm.node)), "agent id {id}: ROLE-NODE-LOCALID");
        assert_eq!(a["open_sessions"].as_u64(), Some(2), "{id} holds a session with each of its 2 peers: {a:#}");
        assert_eq!(a["detail"]["ucx_intercepted_munmaps"].as_u64(), Some(0), "{a:#}");
        assert!(a["detail"]["churn_munmaps"].as_u64().unwrap_or(0) > 0, "{id} churned its allocator: {a:#}");
    }
    let pairs = r["pairs"].as_array().expect("pairs");
    assert_eq!(pairs.len(), 4, "2 decode x 2 prefill: {r:#}");
    for p in pairs {
        let blocks = p["blocks"].as_u64().unwrap();
        assert!(blocks > 0, "{p:#}");
        assert_eq!(p["verified_blocks"].as_u64(), Some(blocks), "{p:#}");
        assert_eq!(p["failed_requests"].as_u64(), Some(0), "{p:#}");
    }
    let svg = read(&report.join("memory.svg"));
    assert!(svg.trim_start().starts_with("<svg"), "memory.svg: {}", &svg[..svg.len().min(200)]);
    for rank in 0..4 {
        let log = read(&report.join(format!("agent-{rank}.log")));
        assert!(log.contains("agent stopped"), "rank {rank} did not stop gracefully:\n{log}");
    }
    assert!(!report.join("agent-4.log").exists(), "one log per rank");
    eprintln!(
        "slurm soak job {job}: {:.1} s in all, {} blocks verified, {:.2} GB/s in all; RSS slopes {:?} MiB/min",
        t0.elapsed().as_secs_f64(),
        r["verified_blocks"],
        r["aggregate_gbps"].as_f64().unwrap_or(0.0),
        agents.iter().map(|a| a["rss_slope_mib_per_min"].as_f64().unwrap_or(f64::NAN)).collect::<Vec<_>>()
    );
}

/// The small agents and the short passes of these tests. A 30 s soak fits
/// its RSS over 20 s after a 10 s warm-up, still inside the first rise of
/// new sessions (the 4 x 4 soak in tests/cluster.rs holds agents to 0.5
/// MiB/min over minutes): the threshold here only has to catch a real leak.
const AGENT_ARGS: (&str, &str) = (
    "KVRAIL_AGENT_ARGS",
    "--region-bytes 32MiB --block-bytes 64KiB --memwatch-warmup-secs 10 --memwatch-window-secs 20 --memwatch-threshold-mib-per-min 4",
);
const SOAK_ARGS: (&str, &str) = ("KVRAIL_SOAK_ARGS", "--pass-blocks 128 --request-blocks 16 --concurrency 4");

#[test]
fn an_agent_killed_mid_soak_fails_the_job_with_one_line_naming_it() {
    let etcd = EtcdServer::start("slurm-kill");
    let slurm = Slurm::start("kill");
    let url = etcd.url("slurm-kill");
    let (job, report, output) = submit(&slurm, "kill", &[("KVRAIL_REGISTRY", &url), ("KVRAIL_DURATION", "120s"), AGENT_ARGS, SOAK_ARGS]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read(&output).contains("all 4 agents are listed") {
        assert!(Instant::now() < deadline, "the agents were not listed within 60 s:\n{}", read(&output));
        if let Some(end) = slurm.job_ended(job) {
            panic!("job {job} ended ({end:?}) before its agents were listed:\n{}", read(&output));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    // Rank 3's agent, by the pid its ready line gives.
    let log = read(&report.join("agent-3.log"));
    let ready: serde_json::Value = log
        .lines()
        .find_map(|l| serde_json::from_str(l).ok().filter(|v: &serde_json::Value| v["pid"].is_u64()))
        .expect("rank 3's ready line");
    let pid = ready["pid"].as_u64().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-KILL", &pid]).status().unwrap().success(), "kill rank 3 (pid {pid})");
    let t0 = Instant::now();
    let end = slurm.wait_job(job, Duration::from_secs(90));
    let out = read(&output);
    assert_eq!((end.state.as_str(), end.exit_code), ("FAILED", 1), "{end:?}\n{out}");
    assert!(t0.elapsed() < Duration::from_secs(45), "{:?} from the kill to the job's end:\n{out}", t0.elapsed());
    let failed: Vec<&str> = out.lines().filter(|l| l.starts_with("kvrail-soak: FAILED")).collect();
    assert_eq!(failed.len(), 1, "one line says what failed:\n{out}");
    let dead = format!("agent rank 3 (decode-{}-3 on {}) was killed by signal 9 (SIGKILL)", slurm.node, slurm.node);
    assert!(failed[0].contains(&dead), "{}", failed[0]);
    eprintln!("{}", failed[0]);
    let r: serde_json::Value = serde_json::from_str(&read(&report.join("report.json"))).expect("the soak still wrote its report");
    assert_eq!(r["ok"], false, "{r:#}");
    assert!(r["failure"].to_string().contains(&format!("decode-{}-3", slurm.node)), "the report names the dead agent: {:#}", r["failure"]);
    for rank in 0..3 {
        let log = read(&report.join(format!("agent-{rank}.log")));
        assert!(log.contains("agent stopped"), "rank {rank} still stopped gracefully:\n{log}");
    }
}

#[test]
fn a_registry_where_nothing_listens_fails_the_job_at_once_in_one_line() {
    let slurm = Slurm::start("noreg");
    let url = format!("etcd://127.0.0.1:{}/nobody", free_port());
    let t0 = Instant::now();
    let (job, report, output) = submit(&slurm, "noreg", &[("KVRAIL_REGISTRY", &url)]);
    let end = slurm.wait_job(job, Duration::from_secs(60));
    let took = t0.elapsed();
    let out = read(&output);
    assert_eq!((end.state.as_str(), end.exit_code), ("FAILED", 1), "{end:?}\n{out}");
    assert!(took < Duration::from_secs(20), "took {took:?} to fail:\n{out}");
    let failed: Vec<&str> = out.lines().filter(|l| l.contains("FAILED")).collect();
    assert_eq!(failed.len(), 1, "one line says what failed:\n{out}");
    assert!(failed[0].contains(&url) && failed[0].contains("cannot be reached"), "{}", failed[0]);
    assert!(!report.join("agent-0.log").exists(), "no agent starts without its registry");
}
