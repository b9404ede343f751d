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
    let points: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    assert_eq!(points.len(), 1, "{points:?}");
    let p = &points[0];
    assert_eq!(p["verified"], true, "{p:#}");
    assert_eq!(p["transport"], "sm");
    assert_eq!(p["mode"], "write");
    assert_eq!(p["block_bytes"].as_u64(), Some(65536));
    for k in ["gbps", "raw_ucx_gbps", "ratio", "memcpy_gbps", "ucx_perftest_gbps", "handshake_ms", "p50_us", "p99_us"] {
        assert!(p[k].as_f64().is_some_and(|v| v > 0.0), "{k} missing or not positive: {p:#}");
    }
    // Every run is reported (five by default), and the headline figures
    // are their medians.
    for (runs, median) in [("gbps_runs", "gbps"), ("raw_ucx_gbps_runs", "raw_ucx_gbps")] {
        let mut v: Vec<f64> =
            p[runs].as_array().unwrap_or_else(|| panic!("{runs} missing: {p:#}")).iter().filter_map(|x| x.as_f64()).collect();
        assert_eq!(v.len(), 5, "{runs}: {p:#}");
        assert!(v.iter().all(|&x| x > 0.0), "{runs}: {p:#}");
        v.sort_by(f64::total_cmp);
        assert_eq!(v[2], p[median].as_f64().unwrap(), "{median} is the median of {runs}");
    }
    let r = p["ratio"].as_f64().unwrap();
    assert!((r - p["gbps"].as_f64().unwrap() / p["raw_ucx_gbps"].as_f64().unwrap()).abs() < 1e-9);
    assert!(!p["ucx_version"].as_str().unwrap().is_empty());
}
