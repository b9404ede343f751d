//! `kvrail raw-ucx` (hidden): the two processes of the raw-UCX baseline that
//! `kvrail bench` runs beside kvrail. The target registers its region,
//! prints its address and rkey, and progresses until its stdin closes; the
//! initiator reads that line, puts (or gets) the same scattered block
//! pattern the bench uses, in the same requests (each planned on its own),
//! and prints the time it took.

use std::io::BufRead;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kvrail_transfer::raw::{RawSide, RAW_TAG};
use kvrail_transfer::{BlockLayout, Direction, PeerSpec, RegionAlloc, RmaOp, TransferPlan};
use rand::SeedableRng;

use super::workload::scattered;
use crate::cli::{Mode, RawArgs, RawRole};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> anyhow::Result<Vec<u8>> {
    anyhow::ensure!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len()).step_by(2).map(|i| Ok(u8::from_str_radix(&s[i..i + 2], 16)?)).collect()
}

pub fn run(a: &RawArgs) -> anyhow::Result<i32> {
    let side = RawSide::new(a.transport, a.region_bytes, RegionAlloc::Ucx, a.progress_cpu)?;
    match a.role {
        RawRole::Target => {
            let l = side.local_info();
            println!(
                "{}",
                serde_json::json!({"event": "ready", "worker_address": hex(&l.worker_address), "base": l.region_base, "len": l.region_len, "rkey": hex(&l.rkey)})
            );
            let stop = Arc::new(AtomicBool::new(false));
            let s2 = stop.clone();
            std::thread::spawn(move || {
                let mut sink = String::new();
                while std::io::stdin().read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                    sink.clear();
                }
                s2.store(true, Ordering::Relaxed);
            });
            side.serve(&stop);
            Ok(0)
        }
        RawRole::Initiator => {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line)?;
            let v: serde_json::Value = serde_json::from_str(&line)?;
            let peer = PeerSpec {
                worker_address: unhex(v["worker_address"].as_str().unwrap_or_default())?,
                region_base: v["base"].as_u64().unwrap_or(0),
                region_len: v["len"].as_u64().unwrap_or(0),
                rkey: unhex(v["rkey"].as_str().unwrap_or_default())?,
            };
            let layout = BlockLayout::fit_region(a.region_bytes, a.block_bytes, 1)?;
            let total = (a.total_bytes / a.block_bytes) as usize;
            let request_blocks = (a.request_bytes / a.block_bytes).max(1) as usize;
            let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
            // As the agents do: over tcp both modes are deliveries.
            let dir = match a.mode {
                _ if a.transport.writes_as_messages() => Direction::Deliver { tag: RAW_TAG },
                Mode::Write => Direction::Write,
                Mode::Read => Direction::Read,
            };
            let (mut done, mut secs) = (0usize, 0.0f64);
            let warmup = RmaOp { src_offset: 0, dst_offset: 0, len: a.block_bytes };
            let peer = side.connect(&peer, dir, Some(&warmup), !a.no_peer_errors)?;
            while done < total {
                let n = (total - done).min(layout.num_blocks() as usize);
                let (src, dst) = scattered(&mut rng, layout.num_blocks(), n);
                // The agents' requests, planned one by one, then issued
                // back to back through one window.
                let mut ops = Vec::new();
                for (s, d) in src.chunks(request_blocks).zip(dst.chunks(request_blocks)) {
                    ops.extend_from_slice(TransferPlan::build(&layout, s, &layout, d, 0)?.ops());
                }
                secs += side.run(&peer, &ops, a.window)?.as_secs_f64();
                done += n;
            }
            let bytes = total as u64 * a.block_bytes;
            println!("{}", serde_json::json!({"bytes": bytes, "seconds": secs, "gbps": bytes as f64 / secs / 1e9}));
            Ok(0)
        }
    }
}
