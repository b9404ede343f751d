//! The memory self-check proves itself: a soak with allocator churn ends
//! `ok` for both agents with zero munmaps intercepted by UCX, and the same
//! soak with a test-only 5 MiB/min anonymous leak in the decode agent ends
//! `leak` within three minutes, with forensics that point outside the heap.

use std::time::Duration;

use kvrail_integration::{kvrail_bin, run_json};

fn soak_args(report: &std::path::Path) -> Vec<String> {
    kvrail_integration::soak_args(
        report,
        &[
            ("--duration", "150s"),
            ("--transport", "sm"),
            ("--churn-rounds-per-sec", "10"),
            ("--memwatch-warmup-secs", "30"),
            ("--memwatch-window-secs", "90"),
        ],
    )
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("kvrail-it-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn soak_is_ok_without_leak_and_catches_an_injected_leak() {
    let clean_dir = tmpdir("soak-clean");
    let leak_dir = tmpdir("soak-leak");
    let clean_args = soak_args(&clean_dir);
    let mut leak_args = soak_args(&leak_dir);
    leak_args.extend(["--test-inject-leak-mib-per-min", "5", "--test-inject-into", "decode"].map(String::from));
    let leaky = std::thread::spawn(move || {
        let out =
            std::process::Command::new(kvrail_bin()).args(&leak_args).env("KVRAIL_ENABLE_TEST_FAULTS", "1").output().expect("run soak");
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
        (out.status.code(), v)
    });
    let args: Vec<&str> = clean_args.iter().map(String::as_str).collect();
    let (code, clean) = run_json(&args, Duration::from_secs(400));
    assert_eq!(code, 0, "clean soak failed: {clean:#}");
    assert_eq!(clean["ok"], true);
    assert_eq!(clean["verified"], true);
    for agent in ["decode", "prefill"] {
        let a = &clean[agent];
        assert_eq!(a["verdict"], "ok", "{agent}: {a:#}");
        assert!(a["rss_slope_mib_per_min"].as_f64().unwrap() < 1.0, "{agent}: {a:#}");
        assert_eq!(a["mmap_hook_mode"], "none");
        assert_eq!(a["ucx_intercepted_munmaps"].as_u64(), Some(0), "{agent}");
        assert!(a["churn_munmaps"].as_u64().unwrap() > 100, "{agent}: churn made too few munmaps: {a:#}");
        let svg = std::fs::read_to_string(a["chart"].as_str().unwrap()).unwrap();
        assert!(svg.trim_start().starts_with("<svg") && svg.contains("polyline"));
    }
    assert!(clean_dir.join("report.json").exists());

    let (code, leak) = leaky.join().unwrap();
    assert_eq!(code, Some(1), "a leaking soak must fail: {leak:#}");
    assert_eq!(leak["ok"], false);
    assert_eq!(leak["verified"], true, "transfers still verify: {leak:#}");
    let d = &leak["decode"];
    assert_eq!(d["verdict"], "leak", "{d:#}");
    assert!(d["rss_slope_mib_per_min"].as_f64().unwrap() > 2.5, "{d:#}");
    assert!(d["injected_leak_bytes"].as_u64().unwrap() >= 8 << 20, "{d:#}");
    let f = d["forensics"].as_str().expect("forensics on a leak");
    // Either diagnosis names growth outside the heap (the heap may grow a
    // little too on a loaded machine).
    assert!(f.contains("RSS grows but the heap does not") || f.contains("RSS grows faster than the heap"), "{f}");
    assert!(f.contains("anonymous"), "{f}");
    assert_eq!(leak["prefill"]["verdict"], "ok", "{leak:#}");
    let _ = std::fs::remove_dir_all(clean_dir);
    let _ = std::fs::remove_dir_all(leak_dir);
}

#[test]
fn leak_injection_is_refused_unless_enabled() {
    let out = std::process::Command::new(kvrail_bin())
        .args(["soak", "--duration", "1s", "--test-inject-leak-mib-per-min", "5"])
        .env_remove("KVRAIL_ENABLE_TEST_FAULTS")
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("KVRAIL_ENABLE_TEST_FAULTS=1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_soaks_running_agents() {
    // Not soak's defaults (sm, 64 KiB): the report takes the agents' own.
    let (decode, prefill) = kvrail_integration::agent_pair("tcp", "32MiB", "128KiB").await;
    let dir = tmpdir("soak-cluster");
    let args = [
        "soak",
        "--decode",
        &decode.listen,
        "--prefill",
        &prefill.listen,
        "--duration",
        "10s",
        "--pass-blocks",
        "256",
        "--json",
        "--report",
        dir.to_str().unwrap(),
    ];
    let out = tokio::task::spawn_blocking({
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        move || run_json(&args.iter().map(String::as_str).collect::<Vec<_>>(), Duration::from_secs(120))
    })
    .await
    .unwrap();
    let (code, r) = out;
    assert_eq!(r["verified"], true, "{r:#}");
    assert!(r["passes"].as_u64().unwrap() > 0);
    assert_eq!(r["transport"], "tcp", "{r:#}");
    assert_eq!(r["bytes"].as_u64(), r["blocks"].as_u64().map(|b| b * (128 << 10)), "{r:#}");
    assert_eq!(r["decode"]["agent_id"], "it-decode");
    assert_eq!(r["prefill"]["agent_id"], "it-prefill");
    // Ten seconds is inside the agents' warm-up: no verdict yet, so no pass.
    assert_eq!(r["decode"]["verdict"], "warming_up", "{r:#}");
    assert_eq!(code, 1);
    let _ = std::fs::remove_dir_all(dir);
    decode.stop().await;
    prefill.stop().await;
}
