//! The bench's table for a terminal.

use super::Point;
use crate::units::format_bytes;

pub(super) fn print_table(points: &[Point]) {
    println!(
        "{:<5} {:<6} {:>8} {:>9} {:>9} {:>6} {:>9} {:>10} {:>8} {:>8} {:>8} {:>9}",
        "tl", "mode", "block", "kvrail", "raw UCX", "ratio", "memcpy", "perftest", "p50 us", "p99 us", "hs ms", "verified"
    );
    for p in points {
        println!(
            "{:<5} {:<6} {:>8} {:>9.2} {:>9.2} {:>6.2} {:>9.2} {:>10} {:>8.0} {:>8.0} {:>8.1} {:>9}",
            p.transport,
            p.mode,
            format_bytes(p.block_bytes),
            p.gbps,
            p.raw_ucx_gbps,
            p.ratio,
            p.memcpy_gbps,
            p.ucx_perftest_gbps.map_or("-".into(), |g| format!("{g:.2}")),
            p.p50_us,
            p.p99_us,
            p.handshake_ms,
            p.verified
        );
    }
    println!("(GB/s = 1e9 bytes/s; ratio = kvrail / raw UCX, same transport, block size, region and pattern)");
    if points.iter().any(|p| p.transport == "tcp" && p.ucx_assertions) {
        println!("(this UCX was built with assertions: tcp sends by copy, kvrail and raw UCX alike; see README, Benchmarks)");
    }
}
