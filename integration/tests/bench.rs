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
