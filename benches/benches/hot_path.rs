//! The per-operation hot path: classifying the status a non-blocking UCX
//! call returns, and a command's round trip through the progress thread
//! (submit -> eventfd wake-up -> RMA -> flush -> completion back to async
//! code) between two engines over shared memory.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kvrail_transfer::status::{classify_status_ptr, StatusPtrKind};
use kvrail_transfer::{BlockLayout, Direction, Engine, EngineConfig, PeerSpec, RegionAlloc, TransferPlan, Transport};

fn status_decoding(c: &mut Criterion) {
    // The mix a busy window sees: mostly handles, some in-place completions,
    // the odd error.
    let values: Vec<usize> = (0..4096usize)
        .map(|i| {
            if i % 7 == 0 {
                0
            } else if i % 101 == 0 {
                -3isize as usize
            } else {
                0x7f00_0000_0000 + i * 64
            }
        })
        .collect();
    let mut g = c.benchmark_group("status");
    g.throughput(Throughput::Elements(values.len() as u64));
    g.bench_function("classify 4096 status pointers", |b| {
        b.iter(|| {
            let mut pending = 0u32;
            for &v in std::hint::black_box(&values) {
                if classify_status_ptr(v) == StatusPtrKind::Pending {
                    pending += 1;
                }
            }
            pending
        })
    });
    g.finish();
}

fn engine() -> Engine {
    Engine::start(EngineConfig {
        transport: Transport::Sm,
        region_bytes: 16 << 20,
        region_alloc: RegionAlloc::Ucx,
        ..EngineConfig::default()
    })
    .expect("engine over shared memory")
}

fn spec(e: &Engine) -> PeerSpec {
    let l = e.local_info();
    PeerSpec { worker_address: l.worker_address.clone(), region_base: l.region_base, region_len: l.region_len, rkey: l.rkey.clone() }
}

fn command_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let (a, b) = (engine(), engine());
    let peer = rt.block_on(a.connect(spec(&b))).expect("connect");
    let block = 4096u64;
    let layout = BlockLayout::contiguous(block, ((16 << 20) / block) as u32).expect("layout");
    let mut g = c.benchmark_group("command");
    for n in [1u32, 64] {
        let src: Vec<u32> = (0..n).collect();
        let dst: Vec<u32> = (0..n).map(|i| 4095 - 2 * i).collect();
        let ops = TransferPlan::build(&layout, &src, &layout, &dst, 0).expect("plan").into_ops();
        g.throughput(Throughput::Elements(n as u64));
        g.bench_function(format!("write {n} x 4 KiB, submit to completion"), |bch| {
            bch.iter_batched(
                || ops.clone(),
                |ops| rt.block_on(a.transfer(peer, Direction::Write, ops)).expect("transfer"),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
    rt.block_on(a.disconnect(peer)).expect("disconnect");
}

criterion_group!(benches, status_decoding, command_path);
criterion_main!(benches);
