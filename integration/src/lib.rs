//! Helpers for kvrail's integration tests: the built `kvrail` binary, running
//! it, and starting agent processes.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

use kvrail_proto::v1 as pb;

pub mod etcd;
pub mod nodes;
pub mod slurm;

pub use kvrail_agent::drive::children::AgentProcess;

/// The `kvrail` binary of this build (`cargo build --bins` puts it beside the
/// test executables' `deps/` folder).
pub fn kvrail_bin() -> PathBuf {
    let mut dir = std::env::current_exe().expect("test exe");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("kvrail");
    assert!(bin.exists(), "{} is missing: run `cargo build --bins` before the integration tests", bin.display());
    bin
}

/// Whether `ucx_info -b` says its UCX was built with assertions
/// (`ENABLE_ASSERT 1`): the build's own account, to hold kvrail's reading of
/// the library against. `bin_dir`: a UCX release's `bin` folder with its
/// libraries in `../lib`; `None` is the `ucx_info` on `PATH`.
pub fn ucx_info_says_assertions(bin_dir: Option<&std::path::Path>) -> bool {
    let mut cmd = match bin_dir {
        Some(dir) => {
            let mut c = std::process::Command::new(dir.join("ucx_info"));
            c.env("LD_LIBRARY_PATH", dir.join("../lib"));
            c
        }
        None => std::process::Command::new("ucx_info"),
    };
    let out = cmd.arg("-b").output().expect("run ucx_info -b");
    assert!(out.status.success(), "ucx_info -b: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["#define", "ENABLE_ASSERT", "1"])
}

/// Runs `kvrail <args>` to completion, with a time limit (its output is
/// drained while it runs, so large reports cannot block it).
pub fn run_kvrail(args: &[&str], limit: Duration) -> Output {
    run_kvrail_env(args, &[], limit)
}

/// As [`run_kvrail`], with extra environment variables.
pub fn run_kvrail_env(args: &[&str], env: &[(&str, &str)], limit: Duration) -> Output {
    let mut cmd = std::process::Command::new(kvrail_bin());
    cmd.args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("spawn kvrail");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("kvrail output"),
        Err(_) => {
            let _ = std::process::Command::new("kill").args(["-9", &pid.to_string()]).status();
            panic!("kvrail {args:?} did not finish within {limit:?}");
        }
    }
}

/// Runs `kvrail <args> --json` and parses stdout, failing with stderr shown.
pub fn run_json(args: &[&str], limit: Duration) -> (i32, serde_json::Value) {
    let out = run_kvrail(args, limit);
    let code = out.status.code().unwrap_or(-1);
    let v = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "kvrail {args:?} printed no JSON ({e}); exit {code}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, v)
}

/// The flags of an agent `role` with test patterns enabled: its id,
/// transport, region and block size.
pub fn test_agent_args(role: &str, id: &str, transport: &str, region: &str, block: &str) -> Vec<String> {
    [role, "--agent-id", id, "--transport", transport, "--region-bytes", region, "--block-bytes", block, "--test-patterns"]
        .map(String::from)
        .to_vec()
}

/// Starts a decode agent and a prefill agent dialling it, both with test
/// patterns enabled, on loopback.
pub async fn agent_pair(transport: &str, region: &str, block: &str) -> (AgentProcess, AgentProcess) {
    let bin = kvrail_bin();
    let common = |role: &str, id: &str| test_agent_args(role, id, transport, region, block);
    let limit = Duration::from_secs(60);
    let decode = AgentProcess::spawn_exe(&bin, &common("decode", "it-decode"), false, limit).await.expect("decode agent");
    let mut p = common("prefill", "it-prefill");
    p.extend(["--peer".to_string(), decode.listen.clone()]);
    let prefill = AgentProcess::spawn_exe(&bin, &p, false, limit).await.expect("prefill agent");
    (decode, prefill)
}

/// Fills the prefill agent's pattern, pushes 64 blocks into scattered
/// destination blocks of the decode agent (request id `tag`) and checks all
/// 64 arrive intact.
pub async fn verified_transfer(decode: &mut AgentProcess, prefill: &mut AgentProcess, tag: &str) {
    prefill.control.fill_pattern(pb::FillPatternRequest { seed: 5 }).await.unwrap();
    let src: Vec<u32> = (0..64).collect();
    let dst: Vec<u32> = (0..64).map(|b| 1023 - b).collect();
    decode.control.poison_blocks(pb::PoisonBlocksRequest { blocks: dst.clone() }).await.unwrap();
    let w = kvrail_agent::drive::workload::run_request(
        &mut decode.control,
        pb::SubmitRequest {
            request_id: tag.into(),
            mode: pb::TransferMode::Write as i32,
            src_blocks: src.clone(),
            dst_blocks: dst.clone(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(w.state, pb::RequestState::Done as i32, "{w:?}");
    let v =
        decode.control.verify_pattern(pb::VerifyPatternRequest { seed: 5, src_blocks: src, dst_blocks: dst }).await.unwrap().into_inner();
    assert_eq!(v.verified_blocks, 64, "{v:?}");
}

/// Arguments of a test soak: `kvrail soak` over 64 MiB regions, passes of
/// 512 blocks 100 ms apart, the JSON report in `report`; `knobs` are the
/// flag/value pairs a test sets (duration, transport, churn, MemWatch).
pub fn soak_args(report: &std::path::Path, knobs: &[(&str, &str)]) -> Vec<String> {
    let mut v: Vec<String> =
        ["soak", "--region-bytes", "64MiB", "--pass-blocks", "512", "--pause-ms", "100", "--json"].iter().map(|s| s.to_string()).collect();
    v.extend(["--report".to_string(), report.display().to_string()]);
    v.extend(knobs.iter().flat_map(|(k, val)| [k.to_string(), val.to_string()]));
    v
}

/// `kvrail bench --json` output: one object per point, then a closing
/// object (`ok`, `points`, `failure`); checks the closing one agrees.
pub fn bench_points(stdout: &[u8]) -> Vec<serde_json::Value> {
    let mut lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(stdout).lines().map(|l| serde_json::from_str(l).expect("one JSON object per line")).collect();
    let closing = lines.pop().expect("a closing line");
    assert_eq!(closing["points"].as_u64(), Some(lines.len() as u64), "{closing:#}");
    assert!(closing["failure"].is_null(), "{closing:#}");
    assert_eq!(closing["ok"].as_bool(), Some(lines.iter().all(|p| p["verified"] == true)), "{closing:#}");
    lines
}
