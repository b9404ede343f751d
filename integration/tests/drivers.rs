//! Drivers fail fast and still report: kill (SIGKILL, as an OOM kill or a
//! crash would) each agent of a running `kvrail soak` and of a running
//! `kvrail bench`, over shared memory and TCP. The driver must exit non-zero
//! within 5 s of the kill, name the agent it lost (role, id, pid), say how
//! it ended (the signal), keep the end of its log, and still write its
//! report with what it measured up to then: the soak its report.json and
//! charts, the bench its finished points and a closing failure line. In
//! cluster mode the soak fails on a remote agent that stops answering,
//! within its lease.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvrail_integration::kvrail_bin;

/// The time a driver has to exit after losing an agent.
const FAIL_FAST: Duration = Duration::from_secs(5);

/// Pids of `parent`'s children whose command line is `kvrail <role> ...`.
fn children_with_role(parent: u32, role: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let ppid = status.lines().find_map(|l| l.strip_prefix("PPid:")).map(|v| v.trim().parse::<u32>().unwrap_or(0));
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let argv: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
            ppid == Some(parent) && argv.get(1) == Some(&role.as_bytes())
        })
        .collect()
}

/// Waits up to `limit` for the driver to have a child agent `role`.
fn agent_of(driver: u32, role: &str, limit: Duration) -> u32 {
    let t0 = Instant::now();
    loop {
        if let [pid] = children_with_role(driver, role)[..] {
            return pid;
        }
        assert!(t0.elapsed() < limit, "no {role} agent under driver {driver} after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `kvrail <args>`, stdout to a pipe read on a thread (so a full
/// pipe never blocks it), stderr kept for the failure message.
fn start(args: &[String]) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = Command::new(kvrail_bin()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn kvrail");
    let (tx, rx) = std::sync::mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        let mut s = String::new();
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            s.push_str(&line);
            s.push('\n');
        }
        let _ = tx.send(s);
    });
    (child, rx)
}

/// Sends SIGKILL to `pid`; false if it is no longer there.
fn kill9(pid: u32) -> bool {
    Command::new("kill").args(["-9", &pid.to_string()]).stderr(Stdio::null()).status().unwrap().success()
}

/// Waits for `child` to exit; returns its exit code and how long after
/// `since` it exited (panics past `limit`, killing it).
fn exited(child: &mut Child, since: Instant, limit: Duration) -> (i32, Duration) {
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return (s.code().unwrap_or(-1), since.elapsed());
        }
        if since.elapsed() > limit {
            let _ = child.kill();
            panic!("the driver did not exit within {limit:?} of the kill");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut e, &mut s);
    }
    s
}

/// Checks a report's `failure` names the killed agent and how it ended.
fn check_failure(f: &serde_json::Value, role: &str, id: &str, pid: u32, context: &str) {
    assert_eq!(f["agent"]["role"], role, "{context}: {f:#}");
    assert_eq!(f["agent"]["agent_id"], id, "{context}: {f:#}");
    assert_eq!(f["agent"]["pid"].as_u64(), Some(u64::from(pid)), "{context}: {f:#}");
    assert_eq!(f["signal"].as_i64(), Some(9), "{context}: {f:#}");
    let msg = f["message"].as_str().unwrap();
    assert!(msg.contains(&format!("the {role} agent {id} (pid {pid}")) && msg.contains("SIGKILL"), "{context}: {msg}");
    assert!(!msg.contains('\n'), "{context}: one line: {msg}");
    // It logged its start and its session before it was killed.
    let tail = f["log_tail"].as_array().unwrap();
    assert!(tail.iter().any(|l| l.as_str().unwrap().contains("agent started")), "{context}: {tail:#?}");
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kvrail-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Runs the driver `args` until both its agents are up, waits `settle`,
/// kills its `role` agent and checks the driver exits 1 within
/// [`FAIL_FAST`]. Returns the victim's pid, the driver's stdout and stderr.
fn kill_mid_run(args: &[String], role: &str, settle: Duration, context: &str) -> (u32, String, String) {
    let (mut driver, stdout) = start(args);
    let victim = agent_of(driver.id(), role, Duration::from_secs(120));
    agent_of(driver.id(), if role == "decode" { "prefill" } else { "decode" }, Duration::from_secs(30));
    std::thread::sleep(settle);
    if !kill9(victim) {
        // The run ended before the kill: say how, from the driver itself.
        let (code, _) = exited(&mut driver, Instant::now(), Duration::from_secs(60));
        let out = stdout.recv_timeout(Duration::from_secs(5)).unwrap_or_default();
        panic!(
            "{context}: the {role} agent {victim} was gone before the kill; the driver exited {code}\n{out}\n{}",
            stderr_of(&mut driver)
        );
    }
    let killed = Instant::now();
    let (code, took) = exited(&mut driver, killed, Duration::from_secs(60));
    let err = stderr_of(&mut driver);
    assert!(took < FAIL_FAST, "{context}: exited {took:?} after the kill\n{err}");
    assert_eq!(code, 1, "{context}: {err}");
    let out = stdout.recv_timeout(Duration::from_secs(5)).unwrap();
    (victim, out, err)
}

/// Kills `role` of a 60 s soak a few seconds into its transfers.
fn soak_loses(transport: &str, role: &str) {
    let context = format!("soak over {transport}, {role} killed");
    let dir = tmpdir(&format!("soak-kill-{transport}-{role}"));
    let args = kvrail_integration::soak_args(&dir, &[("--duration", "60s"), ("--transport", transport), ("--churn-rounds-per-sec", "5")]);
    // Both agents up, the pattern filled, passes running.
    let (victim, out, err) = kill_mid_run(&args, role, Duration::from_secs(6), &context);
    let printed: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{context}: no JSON ({e}): {out}\n{err}"));
    let written: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap();
    assert_eq!(printed, written, "{context}: the printed report is the written one");
    let r = written;
    assert_eq!(r["ok"], false, "{context}");
    check_failure(&r["failure"], role, &format!("soak-{role}"), victim, &context);
    // What was measured up to the kill is there, and verified.
    assert!(r["passes"].as_u64().unwrap() > 0 && r["verified_blocks"].as_u64().unwrap() > 0, "{context}: {r:#}");
    assert_eq!(r["bad_blocks"].as_u64(), Some(0), "{context}");
    // Both agents' memory: the survivor's read at the end, the victim's
    // from its last kept figures; a chart for each.
    let other = if role == "decode" { "prefill" } else { "decode" };
    assert_eq!(r[other]["stats_age_secs"].as_f64(), Some(0.0), "{context}: {r:#}");
    assert!(r[role]["stats_age_secs"].as_f64().unwrap() > 0.0, "{context}: {r:#}");
    for a in [role, other] {
        let chart = std::fs::read_to_string(r[a]["chart"].as_str().unwrap()).unwrap();
        assert!(chart.contains("<svg"), "{context}: {a} chart");
    }
}

#[test]
fn a_soak_that_loses_an_agent_stops_at_once_and_reports() {
    for transport in ["sm", "tcp"] {
        for role in ["prefill", "decode"] {
            soak_loses(transport, role);
        }
    }
}

/// Kills `role` of a bench point once its first run is under way.
fn bench_loses(transport: &str, role: &str) {
    let context = format!("bench over {transport}, {role} killed");
    let args: Vec<String> = [
        "bench",
        "--transport",
        transport,
        "--block-bytes",
        "1MiB",
        "--region-bytes",
        "64MiB",
        // Far more than the seconds before the kill can move.
        "--total-bytes",
        "1TiB",
        "--repeat",
        "1",
        "--no-perftest",
        "--json",
    ]
    .map(String::from)
    .to_vec();
    let (victim, out, err) = kill_mid_run(&args, role, Duration::from_secs(4), &context);
    let last = out.lines().last().unwrap_or_else(|| panic!("{context}: no output\n{err}"));
    let v: serde_json::Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("{context}: last line not JSON ({e}): {out}\n{err}"));
    assert_eq!((v["ok"].as_bool(), v["points"].as_u64()), (Some(false), Some(0)), "{context}: {v:#}");
    check_failure(&v["failure"], role, &format!("bench-{role}"), victim, &context);
}

#[test]
fn a_bench_that_loses_an_agent_stops_at_once_and_reports() {
    for transport in ["sm", "tcp"] {
        for role in ["prefill", "decode"] {
            bench_loses(transport, role);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_soak_fails_on_a_silent_remote_agent_within_its_lease() {
    let (decode, mut prefill) = kvrail_integration::agent_pair("tcp", "64MiB", "64KiB").await;
    let dir = tmpdir("soak-remote");
    let mut args = kvrail_integration::soak_args(&dir, &[("--duration", "60s")]);
    args.extend(["--decode".into(), decode.listen.clone(), "--prefill".into(), prefill.listen.clone()]);
    let (mut soak, stdout) = start(&args);
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(soak.try_wait().unwrap().is_none(), "the soak is running");
    prefill.kill().await;
    let killed = Instant::now();
    // The lease (5 s), then the same 5 s as for a local agent.
    let (code, took) = tokio::task::block_in_place(|| exited(&mut soak, killed, Duration::from_secs(60)));
    let err = stderr_of(&mut soak);
    assert!(took < Duration::from_secs(5) + FAIL_FAST, "exited {took:?} after the kill\n{err}");
    assert_eq!(code, 1, "{err}");
    let r: serde_json::Value = serde_json::from_str(&stdout.recv_timeout(Duration::from_secs(5)).unwrap()).unwrap();
    let f = &r["failure"];
    assert_eq!((f["agent"]["role"].as_str(), f["agent"]["address"].as_str()), (Some("prefill"), Some(prefill.listen.as_str())), "{f:#}");
    // Its port refuses the next call, or it stays silent for its lease.
    let how = f["how"].as_str().unwrap();
    assert!(how == "could not be reached" || how.starts_with("stopped answering for"), "{f:#}");
    let msg = f["message"].as_str().unwrap();
    assert!(msg.starts_with(&format!("the prefill agent ({})", prefill.listen)), "{msg}");
    assert!(r["decode"]["stats_age_secs"].as_f64() == Some(0.0), "the live decode agent is read at the end: {r:#}");
    decode.stop().await;
}

#[test]
fn an_unreachable_agent_is_one_line_with_its_address() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let addr = format!("127.0.0.1:{port}");
    let dir = tmpdir("soak-unreachable");
    let mut args = kvrail_integration::soak_args(&dir, &[("--duration", "5s")]);
    args.extend(["--decode".into(), addr.clone(), "--prefill".into(), addr.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = kvrail_integration::run_kvrail(&args, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let msg = r["failure"]["message"].as_str().unwrap();
    assert_eq!(msg, format!("cannot reach the decode agent at {addr}: connection refused (is it running? did it exit? see its log)"));
}
