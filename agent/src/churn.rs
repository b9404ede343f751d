//! Allocator churn the way a serving process makes it: many short-lived
//! buffers of mixed sizes, some large enough that glibc serves them with
//! mmap/munmap, plus direct page-sized mmap/munmap pairs (the pattern that
//! made UCX's registration cache grow without bound). Used by `kvrail soak`
//! to prove RSS stays flat and UCX intercepts none of it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng, SeedableRng};

/// Above glibc's largest dynamic mmap threshold (32 MiB on 64-bit): such a
/// `malloc` is always served by mmap and its `free` by munmap.
const ALWAYS_MMAP: usize = 33 << 20;

/// Counters of a running churn.
#[derive(Debug, Default)]
pub struct ChurnStats {
    pub allocations: AtomicU64,
    pub bytes: AtomicU64,
    /// munmap calls the churn made (large frees plus direct unmaps).
    pub munmaps: AtomicU64,
}

/// A background churn thread; stops when dropped.
#[derive(Debug)]
pub struct Churn {
    stop: Arc<AtomicBool>,
    pub stats: Arc<ChurnStats>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Churn {
    /// `rounds_per_sec` rounds, each: 64 buffers of 16 B..1 MiB, one buffer
    /// over the mmap threshold, and `unmaps_per_round` direct 4 KiB
    /// map/unmap pairs.
    pub fn start(rounds_per_sec: u32, unmaps_per_round: usize) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(ChurnStats::default());
        let period = Duration::from_secs_f64(1.0 / rounds_per_sec.max(1) as f64);
        let thread = {
            let (stop, stats) = (stop.clone(), stats.clone());
            std::thread::Builder::new()
                .name("kvrail-churn".into())
                .spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
                    while !stop.load(Ordering::Relaxed) {
                        round(&mut rng, &stats, unmaps_per_round);
                        std::thread::sleep(period);
                    }
                })
                .expect("spawn churn thread")
        };
        Churn { stop, stats, thread: Some(thread) }
    }
}

fn round(rng: &mut impl Rng, stats: &ChurnStats, unmaps: usize) {
    let mut held: Vec<Vec<u8>> = Vec::with_capacity(65);
    for _ in 0..64 {
        let len = 1usize << rng.gen_range(4..=20);
        let len = len + rng.gen_range(0..len);
        let mut v = vec![0u8; len];
        v[len / 2] = 1;
        stats.bytes.fetch_add(len as u64, Ordering::Relaxed);
        held.push(v);
    }
    // calloc: fresh mmap'd pages are zero already; touch only one.
    let mut big = vec![0u8; ALWAYS_MMAP];
    big[ALWAYS_MMAP / 2] = 1;
    held.push(big);
    let n = held.len() as u64;
    drop(held);
    stats.allocations.fetch_add(n, Ordering::Relaxed);
    stats.munmaps.fetch_add(1, Ordering::Relaxed);
    let unmapped = kvrail_transfer::memory::map_unmap(unmaps, 4096);
    stats.munmaps.fetch_add(unmapped, Ordering::Relaxed);
}

impl Drop for Churn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A deliberate leak of anonymous memory outside the heap at a steady rate
/// (test-only: proves the memory self-check catches the incident's shape).
#[derive(Debug)]
pub struct LeakInjector {
    stop: Arc<AtomicBool>,
    pub leaked: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Environment variable that must be `1` for leak injection to be accepted.
pub const ENABLE_TEST_FAULTS: &str = "KVRAIL_ENABLE_TEST_FAULTS";

impl LeakInjector {
    /// Leaks `mib_per_min` MiB per minute in 256 KiB mappings (new mappings,
    /// never freed while the process lives).
    pub fn start(mib_per_min: f64) -> anyhow::Result<LeakInjector> {
        anyhow::ensure!(
            std::env::var(ENABLE_TEST_FAULTS).as_deref() == Ok("1"),
            "--test-inject-leak-mib-per-min makes the agent leak memory on purpose; it is refused unless {ENABLE_TEST_FAULTS}=1"
        );
        anyhow::ensure!(mib_per_min > 0.0 && mib_per_min.is_finite(), "leak rate must be positive");
        const CHUNK: usize = 256 << 10;
        let period = Duration::from_secs_f64(60.0 * CHUNK as f64 / (mib_per_min * (1 << 20) as f64));
        let stop = Arc::new(AtomicBool::new(false));
        let leaked = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, leaked) = (stop.clone(), leaked.clone());
            std::thread::Builder::new().name("kvrail-test-leak".into()).spawn(move || {
                let mut kept = Vec::new();
                let start = std::time::Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(m) = kvrail_transfer::memory::AnonMemory::touched(CHUNK) {
                        kept.push(m);
                        leaked.fetch_add(CHUNK as u64, Ordering::Relaxed);
                    }
                    while start.elapsed() < period * kept.len() as u32 && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
                drop(kept);
            })?
        };
        tracing::warn!(mib_per_min, "TEST ONLY: injecting an anonymous-memory leak");
        Ok(LeakInjector { stop, leaked, thread: Some(thread) })
    }
}

impl Drop for LeakInjector {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
