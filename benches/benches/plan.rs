//! Plan building and coalescing for 1M block pairs.

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use kvrail_transfer::{BlockLayout, TransferPlan};
use rand::seq::SliceRandom;
use rand::SeedableRng;

fn plan_1m(c: &mut Criterion) {
    const N: u32 = 1 << 20;
    let layout = BlockLayout::contiguous(16 << 10, N).expect("layout");
    let src: Vec<u32> = (0..N).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut scattered = src.clone();
    scattered.shuffle(&mut rng);
    let mut g = c.benchmark_group("plan");
    g.throughput(Throughput::Elements(N as u64));
    g.sample_size(10);
    g.bench_function("1M pairs contiguous (one op)", |b| {
        b.iter_batched(|| (), |_| TransferPlan::build(&layout, &src, &layout, &src, 0).expect("plan"), BatchSize::SmallInput)
    });
    g.bench_function("1M pairs scattered", |b| {
        b.iter_batched(|| (), |_| TransferPlan::build(&layout, &src, &layout, &scattered, 0).expect("plan"), BatchSize::SmallInput)
    });
    g.finish();
}

criterion_group!(benches, plan_1m);
criterion_main!(benches);
