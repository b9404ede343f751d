//! GPU regions through the real binary.
//!
//! Everywhere: `--memory cuda:0` (and `cuda-ipc`) on a machine without a
//! CUDA driver fails at once, before any agent, UCX context or port exists,
//! with one line and a non-zero exit, for every command that starts or is
//! an agent.
//!
//! With `KVRAIL_GPU_TESTS=1` (what `scripts/gpu-check` sets, beside
//! `KVRAIL_UCX_LIB` at a CUDA-enabled UCX): `kvrail info` lists the GPUs
//! and UCX's CUDA transports, a demo with both regions on GPU 0 verifies
//! every byte, and a GPU agent refuses a peer whose UCX has no CUDA
//! support. Without the variable they print why they skip; with it and no
//! working GPU they fail.

use std::time::{Duration, Instant};

use kvrail_cuda::CudaError;
use kvrail_integration::{run_json, run_kvrail};

const NO_DRIVER: &str = "kvrail: no CUDA driver (libcuda.so.1 not found): use --memory host\n";

/// Every command that starts or is an agent, with `--memory <m>`.
fn agent_commands(m: &str) -> Vec<Vec<String>> {
    let cmds: [&[&str]; 6] = [
        &["decode", "--insecure-no-auth"],
        &["prefill", "--insecure-no-auth", "--peer", "127.0.0.1:9"],
        &["demo", "--bytes", "64MiB"],
        &["soak", "--duration", "5s"],
        &["bench", "--repeat", "1"],
        &["raw-ucx", "--role", "target"],
    ];
    cmds.iter().map(|c| c.iter().map(|s| s.to_string()).chain(["--memory".into(), m.into()]).collect()).collect()
}

#[test]
fn gpu_memory_without_a_driver_fails_at_once_in_one_line() {
    match kvrail_cuda::probe() {
        Err(CudaError::NoDriver { .. }) => {}
        other => {
            eprintln!("!!! SKIPPED gpu_memory_without_a_driver_fails_at_once_in_one_line: a CUDA driver is here ({other:?})");
            return;
        }
    }
    for m in ["cuda:0", "cuda:3", "cuda-ipc"] {
        for args in agent_commands(m) {
            let argv: Vec<&str> = args.iter().map(String::as_str).collect();
            let t0 = Instant::now();
            let out = run_kvrail(&argv, Duration::from_secs(20));
            let took = t0.elapsed();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "kvrail {argv:?}: exit {:?}, stderr:\n{stderr}", out.status);
            assert_eq!(stderr, NO_DRIVER, "kvrail {argv:?}");
            assert!(out.stdout.is_empty(), "kvrail {argv:?} printed {:?}", String::from_utf8_lossy(&out.stdout));
            // Nothing was started: no agent (its UCX context alone takes
            // longer), no driver run.
            assert!(took < Duration::from_secs(3), "kvrail {argv:?} took {took:?}");
        }
    }
}

#[test]
fn host_memory_is_the_default_and_bad_memory_is_a_usage_error() {
    let out = run_kvrail(&["decode", "--memory", "cuda"], Duration::from_secs(20));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("say which CUDA device: cuda:0"), "{stderr}");
    let out = run_kvrail(&["demo", "--memory", "vram"], Duration::from_secs(20));
    assert!(String::from_utf8_lossy(&out.stderr).contains("expected host, cuda:N or cuda-ipc"));
}

#[test]
fn info_says_what_the_gpus_and_ucx_can_do() {
    let (_, v) = run_json(&["info", "--json"], Duration::from_secs(60));
    let gpus = &v["gpus"];
    let modules = v["ucx_cuda_modules"].as_array().expect("ucx_cuda_modules");
    let cuda = &v["ucx_cuda_transports"];
    for t in ["cuda_copy", "cuda_ipc", "gdr_copy"] {
        assert!(cuda[t].is_boolean(), "{t}: {v}");
    }
    // A transport comes up only from a module that is there.
    if modules.is_empty() {
        assert_eq!(cuda["cuda_copy"], false, "{v}");
        assert_eq!(cuda["cuda_ipc"], false, "{v}");
    }
    match kvrail_cuda::probe() {
        Err(e) => {
            assert_eq!(gpus["error"], e.to_string(), "{v}");
            assert!(gpus["devices"].as_array().is_some_and(|d| d.is_empty()), "{v}");
        }
        Ok(info) => {
            let devices = gpus["devices"].as_array().expect("devices");
            assert_eq!(devices.len(), info.devices.len(), "{v}");
            for (d, want) in devices.iter().zip(&info.devices) {
                assert_eq!(d["uuid"], want.uuid.as_str());
                assert!(d["uuid"].as_str().is_some_and(|u| u.starts_with("GPU-") && u.len() == 40), "{d}");
                assert!(d["pci_bus_id"].as_str().is_some_and(|p| p.contains(':')), "{d}");
                assert!(d["total_bytes"].as_u64().is_some_and(|t| t > 0), "{d}");
            }
        }
    }
}

/// Whether the GPU tests run: `KVRAIL_GPU_TESTS=1` and a GPU. Without the
/// variable they skip, saying why; with it and no GPU they fail.
fn gpu_tests(test: &str) -> bool {
    let wanted = std::env::var("KVRAIL_GPU_TESTS").is_ok_and(|v| v == "1");
    let found = match kvrail_cuda::probe() {
        Ok(info) if !info.devices.is_empty() => Ok(info.devices.len()),
        Ok(info) => Err(format!("the CUDA driver ({}) sees no GPU", info.driver_version)),
        Err(e) => Err(e.to_string()),
    };
    match (wanted, found) {
        (true, Ok(_)) => true,
        (true, Err(why)) => panic!("KVRAIL_GPU_TESTS=1 but no GPU works here: {why}"),
        (false, Ok(n)) => {
            eprintln!("!!! SKIPPED {test}: {n} GPU(s) here, but KVRAIL_GPU_TESTS=1 is not set (scripts/gpu-check sets it, with a CUDA-enabled UCX)");
            false
        }
        (false, Err(why)) => {
            eprintln!("!!! SKIPPED {test}: {why}");
            false
        }
    }
}

#[test]
fn gpu_info_lists_devices_and_cuda_transports() {
    if !gpu_tests("gpu_info_lists_devices_and_cuda_transports") {
        return;
    }
    let (_, v) = run_json(&["info", "--json"], Duration::from_secs(60));
    assert!(v["gpus"]["driver_version"].is_string(), "{v}");
    let devices = v["gpus"]["devices"].as_array().expect("devices");
    assert!(!devices.is_empty(), "{v}");
    assert!(devices[0]["used_bytes"].as_u64().is_some_and(|u| u > 0), "{v}");
    assert_eq!(v["ucx_cuda_transports"]["cuda_copy"], true, "the UCX loaded (KVRAIL_UCX_LIB) has no cuda_copy: {v}");
}

#[test]
fn gpu_demo_verifies_every_byte_on_gpu_0() {
    if !gpu_tests("gpu_demo_verifies_every_byte_on_gpu_0") {
        return;
    }
    for transport in ["sm", "tcp"] {
        let args = ["demo", "--memory", "cuda:0", "--transport", transport, "--bytes", "512MiB", "--region-bytes", "128MiB", "--json"];
        let (code, v) = run_json(&args, Duration::from_secs(120));
        assert_eq!(code, 0, "{transport}: {v}");
        assert_eq!(v["verified"], true, "{transport}: {v}");
        assert_eq!(v["bad_blocks"], 0, "{transport}: {v}");
        for side in ["decode", "prefill"] {
            assert_eq!(v[side]["region_memory"], "cuda:0", "{transport} {side}: {v}");
            assert!(v[side]["gpu_used_mib"].as_f64().is_some_and(|m| m >= 128.0), "{transport} {side}: {v}");
        }
    }
}

/// `kvrail <args>` on the system's UCX (no `KVRAIL_UCX_LIB`).
fn on_system_ucx(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(kvrail_integration::kvrail_bin());
    cmd.args(args).env_remove("KVRAIL_UCX_LIB");
    cmd
}

#[test]
fn gpu_peer_of_a_ucx_without_cuda_is_refused_at_handshake() {
    use std::io::BufRead as _;
    if !gpu_tests("gpu_peer_of_a_ucx_without_cuda_is_refused_at_handshake") {
        return;
    }
    // The system's UCX, when it lacks CUDA (Debian's): a host agent on it
    // must refuse a GPU peer at handshake, and a GPU agent on it must not
    // start; both say how to fix it.
    let out = on_system_ucx(&["info", "--json"]).output().expect("kvrail info");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("info --json");
    if !v["ucx_cuda_modules"].as_array().is_some_and(|m| m.is_empty()) {
        eprintln!(
            "!!! SKIPPED gpu_peer_of_a_ucx_without_cuda_is_refused_at_handshake: the system UCX ({}) has CUDA support",
            v["ucx_library"]
        );
        return;
    }
    let fix = "point KVRAIL_UCX_LIB at a CUDA-enabled UCX such as the libucx-cu12 wheels'";
    let out = on_system_ucx(&["decode", "--insecure-no-auth", "--memory", "cuda:0"]).output().expect("kvrail decode");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(fix), "{stderr}");

    let mut decode = on_system_ucx(&["decode", "--insecure-no-auth", "--agent-id", "host-decode", "--region-bytes", "64MiB"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn decode");
    let mut line = String::new();
    std::io::BufReader::new(decode.stdout.take().expect("stdout")).read_line(&mut line).expect("ready line");
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("ready line {line:?}: {e}"));
    let listen = ready["listen"].as_str().expect("listen").to_string();
    let args =
        ["prefill", "--insecure-no-auth", "--agent-id", "gpu-prefill", "--region-bytes", "64MiB", "--memory", "cuda:0", "--peer", &listen];
    let out = run_kvrail(&args, Duration::from_secs(60));
    let _ = decode.kill();
    let _ = decode.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("refused the handshake"), "{stderr}");
    assert!(stderr.contains("gpu-prefill's region is GPU memory") && stderr.contains("host-decode's UCX"), "{stderr}");
    assert!(stderr.contains(fix), "{stderr}");
}
