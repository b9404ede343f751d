//! Thread placement: `--progress-cpu` binds the UCX progress thread,
//! `--runtime-cpus` every other thread of the agent; a CPU the process may
//! not use is refused at start with a clear message. Read back from
//! /proc/<pid>/task/*/status, then a verified transfer through the bound
//! agent.

use std::time::Duration;

use kvrail_integration::{kvrail_bin, run_kvrail, verified_transfer, AgentProcess};

/// (thread name, Cpus_allowed_list) of every thread of `pid`.
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("task dir").flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name)).map(|v| v.trim().to_string()).unwrap_or_default();
        out.push((field("Name:"), field("Cpus_allowed_list:")));
    }
    out
}

#[tokio::test]
async fn progress_and_runtime_threads_run_where_they_are_told() {
    let cpus = kvrail_transfer::cpu::allowed_cpus().expect("allowed cpus");
    // Two distinct CPUs where the machine has them (CI has 2).
    let (progress, runtime) = (cpus[0], *cpus.get(1).unwrap_or(&cpus[0]));
    let bin = kvrail_bin();
    let args = |role: &str, extra: &[String]| -> Vec<String> {
        let mut v: Vec<String> =
            [role, "--agent-id", &format!("it-{role}"), "--transport", "sm", "--region-bytes", "64MiB", "--test-patterns"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        v.extend_from_slice(extra);
        v
    };
    let placed = ["--progress-cpu".to_string(), progress.to_string(), "--runtime-cpus".to_string(), runtime.to_string()];
    let limit = Duration::from_secs(60);
    let mut decode = AgentProcess::spawn_exe(&bin, &args("decode", &placed), false, limit).await.expect("decode agent");
    let pid = decode.pid().expect("decode pid");
    let t = threads(pid);
    let progress_threads: Vec<_> = t.iter().filter(|(name, _)| name == "kvrail-ucx").collect();
    assert_eq!(progress_threads.len(), 1, "{t:?}");
    assert_eq!(progress_threads[0].1, progress.to_string(), "progress thread: {t:?}");
    // The main thread and the async runtime's workers on the runtime CPUs;
    // threads the progress thread starts (UCX's own, pre-faulting) share
    // its CPU.
    let runtime_threads: Vec<_> = t.iter().filter(|(name, _)| name == "kvrail" || name.starts_with("tokio-rt-worker")).collect();
    assert!(runtime_threads.len() >= 3, "main and two runtime workers: {t:?}");
    for (name, allowed) in &runtime_threads {
        assert_eq!(allowed, &runtime.to_string(), "thread {name}: {t:?}");
    }
    for (name, allowed) in &t {
        assert!([progress.to_string(), runtime.to_string()].contains(allowed), "thread {name} runs elsewhere: {t:?}");
    }
    // Bound, it still serves: a prefill agent connects and blocks arrive intact.
    let mut p = args("prefill", &[]);
    p.extend(["--peer".to_string(), decode.listen.clone()]);
    let mut prefill = AgentProcess::spawn_exe(&bin, &p, false, limit).await.expect("prefill agent");
    verified_transfer(&mut decode, &mut prefill, "placed").await;
    prefill.stop().await;
    decode.stop().await;
}

#[test]
fn a_cpu_the_agent_may_not_use_is_refused_at_start() {
    let beyond = kvrail_transfer::cpu::allowed_cpus().expect("allowed cpus").iter().max().copied().unwrap_or(0) + 1;
    for (flag, message) in
        [("--runtime-cpus", "cannot bind the agent's threads to CPUs"), ("--progress-cpu", "cannot bind the progress thread to CPU")]
    {
        let out =
            run_kvrail(&["decode", "--insecure-no-auth", "--region-bytes", "16MiB", flag, &beyond.to_string()], Duration::from_secs(60));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {beyond} was accepted: {stderr}");
        assert!(stderr.contains(message), "{flag}: {stderr}");
    }
}
