//! `kvrail raw-ucx` (hidden): the two processes of the raw-UCX baseline that
//! `kvrail bench` runs beside kvrail, pass by pass. The target registers its
//! region, prints its address and rkey, then progresses its worker while
//! told to (`serve` ... `rest` on stdin; it spins, so it rests while kvrail
//! runs) until its stdin closes. The initiator reads that line, connects,
//! prints `ready`, and then for every line of stdin holding a block count
//! puts (or gets) that many blocks in the scattered pattern the bench uses,
//! in the same requests (each planned on its own), and prints the time it
//! took as one JSON line. With `--listen ADDR` the target serves the
//! baseline to a bench on another host (`kvrail bench --raw-peer`): it
//! sends its line to each connection in turn and takes that connection's
//! `serve`/`rest` lines.

use std::io::{BufRead, Write as _};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use kvrail_transfer::raw::{RawSide, RAW_TAG};
use kvrail_transfer::{BlockLayout, Direction, PeerSpec, RmaOp, TransferPlan};
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

/// Obeys `serve` and `rest` lines (waking the serving loop on `serve`)
/// until they end, then rests.
fn obey(lines: impl Iterator<Item = std::io::Result<String>>, serving: &AtomicBool, wake: &std::sync::mpsc::Sender<()>) {
    for line in lines {
        let Ok(line) = line else { break };
        match line.trim() {
            "serve" => {
                serving.store(true, Ordering::Relaxed);
                let _ = wake.send(());
            }
            "rest" => serving.store(false, Ordering::Relaxed),
            _ => {}
        }
    }
    serving.store(false, Ordering::Relaxed);
}

pub fn run(a: &RawArgs) -> anyhow::Result<i32> {
    anyhow::ensure!(a.listen.is_none() || a.role == RawRole::Target, "--listen is for the target (--role target)");
    let alloc = a.geometry.memory.region_alloc(false).map_err(anyhow::Error::msg)?;
    let side = RawSide::new(a.geometry.transport, a.geometry.region_bytes, alloc, a.progress_cpu)?;
    match a.role {
        RawRole::Target => {
            let l = side.local_info();
            let info = serde_json::json!({"event": "ready", "worker_address": hex(&l.worker_address), "base": l.region_base, "len": l.region_len, "rkey": hex(&l.rkey)});
            let serving = Arc::new(AtomicBool::new(false));
            let (wake, woken) = std::sync::mpsc::channel();
            let s2 = serving.clone();
            match &a.listen {
                None => {
                    println!("{info}");
                    std::thread::spawn(move || obey(std::io::stdin().lines(), &s2, &wake));
                }
                Some(addr) => {
                    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
                    let mut ready = info.clone();
                    ready["listen"] = listener.local_addr()?.to_string().into();
                    println!("{ready}");
                    // One bench at a time: each connection gets the target's
                    // address and rkey, then its serve/rest lines are obeyed
                    // until it closes.
                    std::thread::spawn(move || {
                        for conn in listener.incoming() {
                            let Ok(mut conn) = conn else { continue };
                            let lines = match conn.try_clone() {
                                Ok(c) if writeln!(conn, "{info}").is_ok() => std::io::BufReader::new(c).lines(),
                                _ => continue,
                            };
                            obey(lines, &s2, &wake);
                        }
                    });
                }
            }
            // Blocked while resting; ends when stdin closes (with --listen:
            // when the process is stopped).
            while woken.recv().is_ok() {
                side.serve(&serving);
            }
            Ok(0)
        }
        RawRole::Initiator => {
            let mut lines = std::io::stdin().lock().lines();
            let line = lines.next().context("no target line on stdin")??;
            let v: serde_json::Value = serde_json::from_str(&line)?;
            let peer = PeerSpec {
                worker_address: unhex(v["worker_address"].as_str().unwrap_or_default())?,
                region_base: v["base"].as_u64().unwrap_or(0),
                region_len: v["len"].as_u64().unwrap_or(0),
                rkey: unhex(v["rkey"].as_str().unwrap_or_default())?,
            };
            let layout = BlockLayout::fit_region(a.geometry.region_bytes, a.geometry.block_bytes, 1)?;
            let needed = u64::from(layout.num_blocks()) * a.geometry.block_bytes;
            anyhow::ensure!(
                peer.region_len >= needed,
                "the raw-UCX target's region is {} bytes, less than the {needed} this initiator's blocks span: start it with --region-bytes {}",
                peer.region_len,
                a.geometry.region_bytes
            );
            let request_blocks = (a.request_bytes / a.geometry.block_bytes).max(1) as usize;
            let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed);
            // As the agents do: over tcp both modes are deliveries.
            let dir = match a.mode {
                _ if a.geometry.transport.writes_as_messages() => Direction::Deliver { tag: RAW_TAG },
                Mode::Write => Direction::Write,
                Mode::Read => Direction::Read,
            };
            let warmup = RmaOp { src_offset: 0, dst_offset: 0, len: a.geometry.block_bytes };
            let peer = side.connect(&peer, dir, Some(&warmup), !a.no_peer_errors)?;
            println!("{}", serde_json::json!({"event": "ready"}));
            for line in lines {
                let n: usize = line?.trim().parse().context("a pass is a block count")?;
                anyhow::ensure!(
                    n <= layout.num_blocks() as usize,
                    "a pass of {n} blocks is more than the region's {}",
                    layout.num_blocks()
                );
                let (src, dst) = scattered(&mut rng, layout.num_blocks(), n);
                // The agents' requests, planned one by one, then issued
                // back to back through one window.
                let mut ops = Vec::new();
                for (s, d) in src.chunks(request_blocks).zip(dst.chunks(request_blocks)) {
                    ops.extend_from_slice(TransferPlan::build(&layout, s, &layout, d, 0)?.ops());
                }
                let secs = side.run(&peer, &ops, a.window)?.as_secs_f64();
                let bytes = n as u64 * a.geometry.block_bytes;
                println!("{}", serde_json::json!({"bytes": bytes, "seconds": secs, "gbps": bytes as f64 / secs / 1e9}));
            }
            Ok(0)
        }
    }
}
