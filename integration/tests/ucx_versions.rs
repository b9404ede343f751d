//! kvrail on the UCX releases that leak (UCX 1.18.1 and 1.22.0 from PyPI's
//! libucx-cu12 wheels, fetched by scripts/ucx-wheels): it runs and verifies
//! on each, its guard keeps memory flat with UCX intercepting nothing, and
//! with UCX's hooks deliberately on (demonstration) the self-check catches
//! the incident's leak and says it is outside the heap.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use kvrail_integration::kvrail_bin;

/// Version -> lib dir, fetching the wheels on first use.
fn wheels() -> Vec<(String, PathBuf)> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/ucx-wheels");
    let out = Command::new(&script).output().expect("run scripts/ucx-wheels");
    assert!(out.status.success(), "scripts/ucx-wheels failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_once(' ').map(|(v, d)| (v.to_string(), PathBuf::from(d)))).collect()
}

fn lib(v: &str) -> PathBuf {
    wheels().into_iter().find(|(x, _)| x == v).map(|(_, d)| d).unwrap_or_else(|| panic!("no UCX {v} wheel"))
}

fn kvrail(lib: &PathBuf, args: &[&str], env: &[(&str, &str)], limit: Duration) -> (i32, serde_json::Value, String) {
    let mut cmd = Command::new(kvrail_bin());
    cmd.args(args).env("KVRAIL_UCX_LIB", lib).env_remove("KVRAIL_GUARDED");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = std::time::Instant::now();
    // output() drains stdout and stderr while the process runs.
    let out = cmd.output().unwrap();
    assert!(start.elapsed() < limit, "kvrail {args:?} took {:?}", start.elapsed());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("kvrail {args:?}: no JSON ({e}); stderr:\n{err}"));
    (out.status.code().unwrap_or(-1), v, err)
}

#[test]
fn runs_and_verifies_on_each_wheel_ucx() {
    for (v, dir) in wheels() {
        let (code, info, err) = kvrail(&dir, &["info", "--json"], &[], Duration::from_secs(60));
        assert_eq!(code, 0, "{v}: {err}");
        assert_eq!(info["ucx_version"], v.as_str());
        assert!(info["ucx_library"].as_str().unwrap().starts_with(dir.to_str().unwrap()), "{v}: {info:#}");
        assert_eq!(info["mmap_hook_mode"], "none");
        assert_eq!(info["ucx_assertions"], kvrail_integration::ucx_info_says_assertions(Some(&dir.join("../bin"))), "{v}: {info:#}");
        for t in ["tcp", "sm"] {
            let (code, d, err) = kvrail(
                &dir,
                &["demo", "--transport", t, "--bytes", "64MiB", "--region-bytes", "32MiB", "--json"],
                &[],
                Duration::from_secs(180),
            );
            assert_eq!(code, 0, "{v} {t}: {d:#}\n{err}");
            assert_eq!(d["verified"], true);
            assert_eq!(d["ucx_version"], v.as_str());
            assert_eq!(d["mmap_hook_mode"], "none");
        }
    }
}

fn soak(lib: &PathBuf, name: &str, extra: &[&str]) -> (i32, serde_json::Value) {
    let dir = std::env::temp_dir().join(format!("kvrail-it-{name}-{}", std::process::id()));
    let knobs = [
        ("--duration", "120s"),
        ("--transport", "tcp"),
        ("--churn-rounds-per-sec", "50"),
        ("--churn-unmaps-per-round", "200"),
        ("--memwatch-warmup-secs", "15"),
        ("--memwatch-window-secs", "60"),
    ];
    let owned = kvrail_integration::soak_args(&dir, &knobs);
    let mut args: Vec<&str> = owned.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    let (code, v, _) = kvrail(lib, &args, &[], Duration::from_secs(400));
    (code, v)
}

#[test]
fn guard_holds_on_leaking_ucx_and_the_detector_catches_hooks_on() {
    let l118 = lib("1.18.1");
    let l122 = lib("1.22.0");
    let (a, b, c) = (l118.clone(), l118.clone(), l118.clone());
    let guard118 = std::thread::spawn(move || soak(&a, "g118", &[]));
    let hooks118 = std::thread::spawn(move || soak(&b, "h118", &["--demo-allow-ucx-mmap-hooks"]));
    let bounded118 = std::thread::spawn(move || soak(&c, "b118", &["--demo-allow-ucx-mmap-hooks", "--demo-rcache-max-unreleased", "1024"]));
    let guard122 = std::thread::spawn(move || soak(&l122, "g122", &[]));

    for (name, h) in [("1.18.1", guard118), ("1.22.0", guard122)] {
        let (code, r) = h.join().unwrap();
        assert_eq!(code, 0, "guard-on soak on UCX {name} failed: {r:#}");
        for agent in ["decode", "prefill"] {
            assert_eq!(r[agent]["verdict"], "ok", "{name} {agent}: {r:#}");
            assert_eq!(r[agent]["mmap_hook_mode"], "none");
            assert_eq!(r[agent]["ucx_intercepted_munmaps"].as_u64(), Some(0));
            assert!(r[agent]["churn_munmaps"].as_u64().unwrap() > 10_000);
            assert_eq!(r[agent]["ucx_version"], name);
        }
    }
    let (code, r) = hooks118.join().unwrap();
    assert_eq!(code, 1, "the hooks-on demonstration must fail: {r:#}");
    assert_eq!(r["demo_ucx_mmap_hooks_on"], true);
    assert_eq!(r["verified"], true, "transfers still verify: {r:#}");
    for agent in ["decode", "prefill"] {
        let a = &r[agent];
        assert_ne!(a["mmap_hook_mode"], "none", "{agent}: {a:#}");
        assert!(a["ucx_intercepted_munmaps"].as_u64().unwrap() > 10_000, "{agent}: {a:#}");
        assert_eq!(a["verdict"], "leak", "{agent}: {a:#}");
        let f = a["forensics"].as_str().expect("forensics");
        assert!(f.contains("RSS grows but the heap does not"), "{f}");
    }
    // The second mitigation, measured (its verdict is reported, not assumed).
    let (_, r) = bounded118.join().unwrap();
    assert_eq!(r["demo_rcache_max_unreleased"], "1024");
    for agent in ["decode", "prefill"] {
        let a = &r[agent];
        assert!(a["ucx_intercepted_munmaps"].as_u64().unwrap() > 10_000, "{agent}: {a:#}");
        eprintln!(
            "UCX 1.18.1, hooks on, UCX_RCACHE_MAX_UNRELEASED=1024: {agent} {} at {:.2} MiB/min",
            a["verdict"],
            a["rss_slope_mib_per_min"].as_f64().unwrap()
        );
    }
}
