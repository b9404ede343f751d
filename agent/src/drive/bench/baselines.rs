//! The references besides the raw loop: the streaming memcpy limit and
//! `ucx_perftest` (cache-hot: one reused buffer).

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use kvrail_transfer::Transport;
use rand::SeedableRng;

use crate::cli::Mode;
use crate::drive::workload::scattered;

/// The longest the memcpy limit copies for.
const MEMCPY_SECS: f64 = 2.0;

/// Scattered block copies between two region-sized buffers: the streaming
/// memcpy limit for this block size on this machine. It copies `total`
/// bytes, or for [`MEMCPY_SECS`] if that ends first: a rate settles within
/// a few GB, and a run's total may be far more than that.
pub fn memcpy_gbps(region: u64, block: u64, total: u64, seed: u64) -> f64 {
    let (region, block) = (region as usize, block as usize);
    let n_blocks = (region / block).max(1);
    let src = vec![1u8; n_blocks * block];
    let mut dst = vec![0u8; n_blocks * block];
    // Fault the destination in first, as the regions of both processes are.
    for b in dst.iter_mut().step_by(4096) {
        *b = 2;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut moved = 0u64;
    let mut secs = 0.0;
    while moved < total && secs < MEMCPY_SECS {
        let n = (((total - moved) / block as u64) as usize).clamp(1, n_blocks);
        let (s, d) = scattered(&mut rng, n_blocks as u32, n);
        let t0 = Instant::now();
        for (&s, &d) in s.iter().zip(&d) {
            let (s, d) = (s as usize * block, d as usize * block);
            dst[d..d + block].copy_from_slice(&src[s..s + block]);
        }
        secs += t0.elapsed().as_secs_f64();
        moved += (n * block) as u64;
    }
    std::hint::black_box(&dst);
    moved as f64 / secs / 1e9
}

/// Parses ucx_perftest's `Final:` line; returns GB/s (its MB/s are MiB/s).
pub fn parse_perftest(out: &str) -> Option<f64> {
    let line = out.lines().rev().find(|l| l.trim_start().starts_with("Final:"))?;
    let f: Vec<&str> = line.split_whitespace().collect();
    let mib_s: f64 = f.get(6)?.parse().ok()?;
    Some(mib_s * 1_048_576.0 / 1e9)
}

pub(super) async fn perftest(t: Transport, block: u64, mode: Mode) -> anyhow::Result<f64> {
    let bin = match std::env::var_os(crate::guard::UCX_LIB_VAR) {
        Some(lib) => std::path::PathBuf::from(lib).join("../bin/ucx_perftest"),
        None => "ucx_perftest".into(),
    };
    let port = 20000 + (std::process::id() % 20000) as u16;
    let test = if mode == Mode::Write { "ucp_put_bw" } else { "ucp_get" };
    let iters = ((1u64 << 30) / block).clamp(1000, 100_000).to_string();
    let tls = t.ucx_tls().unwrap_or("all");
    let mut server = tokio::process::Command::new(&bin)
        .args(["-p", &port.to_string()])
        .env("UCX_TLS", tls)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new(&bin)
            .args(["127.0.0.1", "-p", &port.to_string(), "-t", test, "-s", &block.to_string(), "-n", &iters])
            .env("UCX_TLS", tls)
            .output(),
    )
    .await??;
    let _ = server.kill().await;
    parse_perftest(&String::from_utf8_lossy(&out.stdout)).context("ucx_perftest printed no Final line")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_perftest_final_line() {
        let out = "+----+\nFinal:                  2000     10.533   133.204   133.204      469.21     469.21        7507        7507\n";
        let g = parse_perftest(out).unwrap();
        assert!((g - 469.21 * 1_048_576.0 / 1e9).abs() < 1e-9);
        assert_eq!(parse_perftest("no final here"), None);
    }

    #[test]
    fn memcpy_limit_is_positive() {
        assert!(memcpy_gbps(4 << 20, 64 << 10, 8 << 20, 1) > 0.0);
    }
}
