//! One small bench point runs end to end: kvrail, the raw-UCX loop, memcpy
//! and ucx_perftest are all measured, and every block verifies. (Speed
//! targets are checked by running the bench, not here.)

use std::time::Duration;

use kvrail_integration::run_kvrail;

#[test]
fn small_bench_point_is_measured_and_verified() {
    let out = run_kvrail(
        &["bench", "--transport", "sm", "--block-bytes", "64KiB", "--total-bytes", "64MiB", "--region-bytes", "64MiB", "--json"],
        Duration::from_secs(300),
    );
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let points = kvrail_integration::bench_points(&out.stdout);
    assert_eq!(points.len(), 1, "{points:?}");
    let p = &points[0];
    assert_eq!(p["verified"], true, "{p:#}");
    assert_eq!(p["transport"], "sm");
    assert_eq!(p["mode"], "write");
    assert_eq!(p["block_bytes"].as_u64(), Some(65536));
    for k in ["gbps", "raw_ucx_gbps", "ratio", "memcpy_gbps", "ucx_perftest_gbps", "handshake_ms", "p50_us", "p99_us"] {
        assert!(p[k].as_f64().is_some_and(|v| v > 0.0), "{k} missing or not positive: {p:#}");
    }
    // Every run is reported (six by default), the throughputs are their
    // medians, each run's ratio pairs its own kvrail and raw runs, and the
    // point's ratio is the median over run pairs of their geometric means.
    let runs = |k: &str| -> Vec<f64> {
        let v: Vec<f64> = p[k].as_array().unwrap_or_else(|| panic!("{k} missing: {p:#}")).iter().filter_map(|x| x.as_f64()).collect();
        assert_eq!(v.len(), 6, "{k}: {p:#}");
        assert!(v.iter().all(|&x| x > 0.0), "{k}: {p:#}");
        v
    };
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    };
    let (kvrail, raw, ratios) = (runs("gbps_runs"), runs("raw_ucx_gbps_runs"), runs("ratio_runs"));
    for i in 0..6 {
        assert!((ratios[i] - kvrail[i] / raw[i]).abs() < 1e-9, "run {i}: {p:#}");
    }
    let close = |a: f64, b: f64| (a - b).abs() < 1e-9 * b.abs().max(1.0);
    assert!(close(median(kvrail), p["gbps"].as_f64().unwrap()), "gbps is the median of gbps_runs: {p:#}");
    assert!(close(median(raw), p["raw_ucx_gbps"].as_f64().unwrap()), "raw_ucx_gbps is the median of raw_ucx_gbps_runs: {p:#}");
    let pairs = ratios.chunks(2).map(|c| (c[0] * c[1]).sqrt()).collect();
    assert!(close(median(pairs), p["ratio"].as_f64().unwrap()), "ratio is the median of the run pairs: {p:#}");
    assert!(!p["ucx_version"].as_str().unwrap().is_empty());
}

/// `kvrail raw-ucx --role target --listen`, as an operator starts it beside
/// a decode agent on another host; returns it and the address it serves.
fn raw_target(args: &[&str]) -> (std::process::Child, String) {
    use std::io::BufRead as _;
    let mut child = std::process::Command::new(kvrail_integration::kvrail_bin())
        .args(["--log-level", "warn", "raw-ucx", "--role", "target", "--listen", "127.0.0.1:0"])
        .args(args)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the raw-UCX target");
    let stdout = child.stdout.take().expect("stdout");
    let line = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok().filter(|v| v.get("listen").is_some()))
        .expect("the raw-UCX target's ready line");
    (child, line["listen"].as_str().unwrap().to_string())
}

/// Cluster mode: a decode agent and a raw-UCX target that are already
/// running (here on loopback, over tcp) are measured by a bench that starts
/// only the prefill side; what the agent does not serve, or a missing or
/// wrong secret, is refused with a message that says what to do, and
/// leaves the agent serving the next bench.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_mode_measures_a_running_decode_agent() {
    use kvrail_agent::agent::auth::{driver_secret, SECRET_VAR};
    let geometry = ["--transport", "tcp", "--region-bytes", "32MiB", "--block-bytes", "64KiB"];
    let mut args: Vec<String> = ["decode", "--agent-id", "it-remote-decode", "--test-patterns"].iter().map(|s| s.to_string()).collect();
    args.extend(geometry.iter().map(|s| s.to_string()));
    let decode = kvrail_integration::AgentProcess::spawn_exe(&kvrail_integration::kvrail_bin(), &args, false, Duration::from_secs(60))
        .await
        .expect("decode agent");
    let (mut target, raw_addr) = raw_target(&geometry);
    let bench = |extra: &[&str], secret: Option<String>| {
        let mut args: Vec<String> =
            ["bench", "--peer", &decode.listen, "--raw-peer", &raw_addr, "--total-bytes", "64MiB", "--repeat", "2", "--json"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut cmd = std::process::Command::new(kvrail_integration::kvrail_bin());
            cmd.args(&args).env_remove(SECRET_VAR);
            if let Some(s) = &secret {
                cmd.env(SECRET_VAR, s);
            }
            cmd.output().expect("run kvrail bench")
        })
    };
    let fails_with = |out: std::process::Output, words: &[&str]| {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success(), "should have failed: {err}");
        assert!(words.iter().all(|w| err.contains(w)), "expected {words:?} in: {err}");
    };

    let out = bench(&["--block-bytes", "1MiB"], Some(driver_secret())).await.unwrap();
    fails_with(out, &["--block-bytes 1048576", "(65536)", "leave --block-bytes out"]);
    let out = bench(&[], None).await.unwrap();
    fails_with(out, &[SECRET_VAR, "--cluster-secret-file"]);
    let out = bench(&[], Some("a-different-secret-entirely".into())).await.unwrap();
    fails_with(out, &["do not share the cluster secret", "exited with code", "before it was ready"]);

    let out = bench(&["--mode", "write,read"], Some(driver_secret())).await.unwrap();
    assert!(out.status.success(), "bench --peer failed: {}", String::from_utf8_lossy(&out.stderr));
    let points = kvrail_integration::bench_points(&out.stdout);
    assert_eq!(points.len(), 2, "{points:?}");
    for (p, mode) in points.iter().zip(["write", "read"]) {
        assert_eq!(p["mode"], mode);
        assert_eq!(p["transport"], "tcp", "the decode agent's transport: {p:#}");
        assert_eq!(p["block_bytes"].as_u64(), Some(65536), "the decode agent's block size: {p:#}");
        assert_eq!(p["verified"], true, "{p:#}");
        for k in ["gbps", "raw_ucx_gbps", "ratio", "handshake_ms", "p50_us"] {
            assert!(p[k].as_f64().is_some_and(|v| v > 0.0), "{k} missing or not positive: {p:#}");
        }
        assert_eq!(p["gbps_runs"].as_array().map(Vec::len), Some(2), "{p:#}");
        // Not measurable from here: ucx_perftest runs both its sides on one
        // host, and the decode agent's CPU time is another host's.
        assert!(p["ucx_perftest_gbps"].is_null() && p["cpu_s_per_gb_decode"].is_null(), "{p:#}");
    }
    let _ = target.kill();
    let _ = target.wait();
    decode.stop().await;
}

#[test]
fn only_the_raw_target_listens() {
    let out = run_kvrail(&["raw-ucx", "--role", "initiator", "--listen", "127.0.0.1:0"], Duration::from_secs(60));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--listen is for the target"), "{err}");
}
