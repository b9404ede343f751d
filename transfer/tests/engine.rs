//! Two engines in one process over real UCX transports: puts and gets land
//! byte for byte, flush precedes "done", bad ranges are refused, and the
//! hooks guard is in force. Run through scripts/ucx-guard (cargo's runner).

use kvrail_transfer::plan::TransferPlan;
use kvrail_transfer::{BlockLayout, Direction, Engine, EngineConfig, RegionAlloc, RmaOp, TransferError, Transport};

const REGION: u64 = 8 << 20;
const BLOCK: u64 = 64 << 10;

fn engine(transport: Transport, alloc: RegionAlloc) -> Engine {
    Engine::start(EngineConfig { transport, region_bytes: REGION, region_alloc: alloc, ..EngineConfig::default() }).expect("engine starts")
}

fn spec(e: &Engine) -> kvrail_transfer::PeerSpec {
    e.local_info().into()
}

fn fill(e: &Engine, block: u32, byte: u8) {
    e.region().write(block as u64 * BLOCK, &vec![byte; BLOCK as usize]).unwrap();
}

fn block_of(e: &Engine, block: u32) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    e.region().read(block as u64 * BLOCK, &mut b).unwrap();
    b
}

async fn roundtrip(transport: Transport, alloc: RegionAlloc) {
    let a = engine(transport, alloc.clone());
    let b = engine(transport, alloc.clone());
    assert!(a.hook_report().is_off(), "{}", a.hook_report().summary());
    let layout = BlockLayout::contiguous(BLOCK, (REGION / BLOCK) as u32).unwrap();
    let b_on_a = a.connect(spec(&b)).await.expect("connect a->b");
    let a_on_b = b.connect(spec(&a)).await.expect("connect b->a");
    // Pre-faulting the peer mapping happens where UCX maps the peer's region
    // into this process (sm, UCX-allocated region), never on tcp, and once.
    let started = a.prefault(b_on_a).await.expect("prefault");
    match (transport, &alloc) {
        (Transport::Sm, RegionAlloc::Ucx) => assert!(started, "sm peer region not mapped into this process"),
        (Transport::Tcp, _) => assert!(!started, "nothing to pre-fault over tcp"),
        _ => {}
    }
    assert!(!a.prefault(b_on_a).await.expect("prefault"), "pre-faulting starts once per peer");
    // The gauge of running populators returns to 0 once the mapping is done.
    let t0 = std::time::Instant::now();
    while a.counters().prefaulting.load(std::sync::atomic::Ordering::Relaxed) != 0 {
        assert!(t0.elapsed() < std::time::Duration::from_secs(30), "pre-faulting never reported done");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    for blk in 0..8u32 {
        fill(&a, blk, 0x10 + blk as u8);
    }
    // Write a's blocks 0..8 into b's blocks scattered backwards.
    let src: Vec<u32> = (0..8).collect();
    let dst: Vec<u32> = (0..8).map(|i| 100 - i * 3).collect();
    let plan = TransferPlan::build(&layout, &src, &layout, &dst, 0).unwrap();
    let done = a.transfer(b_on_a, Direction::Write, plan.into_ops()).await.expect("write");
    assert_eq!(done.bytes, 8 * BLOCK);
    for (s, d) in src.iter().zip(&dst) {
        assert_eq!(block_of(&b, *d), vec![0x10 + *s as u8; BLOCK as usize], "block {s} -> {d}");
    }
    // b reads a's block 3 into its block 7.
    let plan = TransferPlan::build(&layout, &[3], &layout, &[7], 0).unwrap();
    b.transfer(a_on_b, Direction::Read, plan.into_ops()).await.expect("read");
    assert_eq!(block_of(&b, 7), vec![0x13; BLOCK as usize]);
    // Ranges outside either region are refused before anything moves.
    let bad = vec![RmaOp { src_offset: 0, dst_offset: REGION - 10, len: 64 }];
    match a.transfer(b_on_a, Direction::Write, bad).await {
        Err(TransferError::OutOfBounds(m)) => assert!(m.contains("remote range"), "{m}"),
        other => panic!("expected OutOfBounds, got {other:?}"),
    }
    assert_eq!(a.counters().transfers_ok.load(std::sync::atomic::Ordering::Relaxed), 1);
    a.disconnect(b_on_a).await.unwrap();
    assert!(matches!(a.transfer(b_on_a, Direction::Write, vec![]).await, Err(TransferError::UnknownPeer(_))));
    assert!(matches!(a.prefault(b_on_a).await, Err(TransferError::UnknownPeer(_))));
}

#[tokio::test]
async fn sm_put_get_mapped() {
    roundtrip(Transport::Sm, RegionAlloc::Mapped { populate: true }).await;
}

#[tokio::test]
async fn tcp_put_get_mapped() {
    roundtrip(Transport::Tcp, RegionAlloc::Mapped { populate: false }).await;
}

#[tokio::test]
async fn sm_put_get_ucx_allocated() {
    roundtrip(Transport::Sm, RegionAlloc::Ucx).await;
}

/// A region that is another process's shared file: the engine maps the
/// file's own pages (at an offset), so bytes written through the file are
/// what a peer reads, and a peer's writes are in the file, with no copy.
#[tokio::test]
async fn a_shared_file_region_is_the_files_own_pages() {
    use rustix::fs::{ftruncate, memfd_create, MemfdFlags};
    use rustix::io::{pread, pwrite};
    const OFFSET: u64 = 2 * 4096;
    let fd = std::sync::Arc::new(memfd_create("kvrail-region", MemfdFlags::CLOEXEC).unwrap());
    ftruncate(&*fd, OFFSET + REGION).unwrap();
    pwrite(&*fd, &[0x5a; BLOCK as usize], OFFSET + 3 * BLOCK).unwrap();
    let a = engine(Transport::Tcp, RegionAlloc::SharedFile { fd: fd.clone(), offset: OFFSET });
    let b = engine(Transport::Tcp, RegionAlloc::Mapped { populate: false });
    assert!(a.hook_report().is_off(), "{}", a.hook_report().summary());
    assert_eq!(block_of(&a, 3), vec![0x5a; BLOCK as usize], "the region starts at the file's offset");
    let layout = BlockLayout::contiguous(BLOCK, (REGION / BLOCK) as u32).unwrap();
    let a_on_b = b.connect(spec(&a)).await.expect("connect b->a");
    let plan = TransferPlan::build(&layout, &[3], &layout, &[0], 0).unwrap();
    b.transfer(a_on_b, Direction::Read, plan.into_ops()).await.expect("read");
    assert_eq!(block_of(&b, 0), vec![0x5a; BLOCK as usize], "the peer read the file's bytes");
    fill(&b, 1, 0xc3);
    let plan = TransferPlan::build(&layout, &[1], &layout, &[5], 0).unwrap();
    b.transfer(a_on_b, Direction::Write, plan.into_ops()).await.expect("write");
    let mut got = vec![0u8; BLOCK as usize];
    pread(&*fd, &mut got, OFFSET + 5 * BLOCK).unwrap();
    assert_eq!(got, vec![0xc3; BLOCK as usize], "the peer's write is in the file");

    // A file that does not hold the region, or an offset off a page, is
    // refused before anything is registered.
    for (len, offset, text) in [(REGION, OFFSET, "fewer than the region's"), (OFFSET + REGION, 100, "not a multiple")] {
        let small = std::sync::Arc::new(memfd_create("kvrail-small", MemfdFlags::CLOEXEC).unwrap());
        ftruncate(&*small, len).unwrap();
        let cfg =
            EngineConfig { region_bytes: REGION, region_alloc: RegionAlloc::SharedFile { fd: small, offset }, ..EngineConfig::default() };
        let err = Engine::start(cfg).expect_err("refused").to_string();
        assert!(err.contains(text), "{err}");
    }
}

#[test]
fn runtime_reports_loaded_ucx() {
    let rt = kvrail_transfer::ucx_facts::ucx_runtime();
    assert!(rt.supported, "{rt:?}");
    assert!(rt.library.contains("libucp"), "{rt:?}");
    let t = kvrail_transfer::ucx_facts::transports();
    assert!(t.iter().any(|x| x.starts_with("tcp/")), "{t:?}");
}

/// Deliveries over tcp (active messages): land only for an open tag, only
/// up to the bytes it expects, and never after it closed.
#[tokio::test]
async fn tcp_deliveries_land_only_while_their_tag_is_open() {
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;
    let a = engine(Transport::Tcp, RegionAlloc::Mapped { populate: false });
    let b = engine(Transport::Tcp, RegionAlloc::Mapped { populate: false });
    let layout = BlockLayout::contiguous(BLOCK, (REGION / BLOCK) as u32).unwrap();
    let b_on_a = a.connect(spec(&b)).await.expect("connect a->b");
    for blk in 0..8u32 {
        fill(&a, blk, 0x40 + blk as u8);
    }
    let ops = |src: &[u32], dst: &[u32]| TransferPlan::build(&layout, src, &layout, dst, 0).unwrap().into_ops();
    let rejected = || b.counters().deliveries_rejected.load(Relaxed);

    let into = |dst: &[u32]| dst.iter().map(|&d| d as u64 * BLOCK..(d as u64 + 1) * BLOCK).collect::<Vec<_>>();

    // An open tag: every block lands, then the tag closes by itself.
    let mut exp = b.expect(into(&[40, 30, 20, 10])).unwrap();
    assert!(b.expect(into(&[1, 1])).is_err(), "a tag's blocks are disjoint");
    let tag = exp.tag();
    let done = a.transfer(b_on_a, Direction::Deliver { tag }, ops(&[0, 1, 2, 3], &[40, 30, 20, 10])).await.expect("deliver");
    assert_eq!(done.bytes, 4 * BLOCK);
    let got = exp.arrived(Duration::from_secs(10)).await.unwrap_or_else(|e| panic!("{e}; rejected {}", rejected()));
    assert_eq!(got.bytes, 4 * BLOCK);
    for (s, d) in [(0u32, 40u32), (1, 30), (2, 20), (3, 10)] {
        assert_eq!(block_of(&b, d), vec![0x40 + s as u8; BLOCK as usize], "block {s} -> {d}");
    }
    assert_eq!(rejected(), 0);

    // Blocks the tag was not opened for (here another open tag's) are
    // dropped, not written; the tag's own block still lands.
    let mut exp = b.expect(into(&[50])).unwrap();
    let other = b.expect(into(&[51])).unwrap();
    assert_ne!(exp.tag(), other.tag(), "every tag is new");
    a.transfer(b_on_a, Direction::Deliver { tag: exp.tag() }, ops(&[4, 5], &[50, 51])).await.expect("deliver");
    assert_eq!(exp.arrived(Duration::from_secs(10)).await.expect("one block arrived").bytes, BLOCK);
    other.close().await;
    // Unknown and closed tags take nothing; a tag closed before any byte
    // came (its opening may not even have reached the thread) among them.
    let closed = b.expect(into(&[60])).unwrap();
    let closed_tag = closed.tag();
    closed.close().await;
    a.transfer(b_on_a, Direction::Deliver { tag: closed_tag }, ops(&[6], &[60])).await.expect("sent");
    a.transfer(b_on_a, Direction::Deliver { tag: u64::MAX }, ops(&[7], &[61])).await.expect("sent");
    let t0 = std::time::Instant::now();
    while rejected() < 3 && t0.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(rejected() >= 3, "misdirected, closed and unknown deliveries must be counted as dropped: {}", rejected());
    assert_eq!(block_of(&b, 50), vec![0x44; BLOCK as usize]);
    for d in [51, 60, 61] {
        assert_eq!(block_of(&b, d), vec![0; BLOCK as usize], "block {d} was written by a rejected delivery");
    }
}

/// The progress thread sleeps once idle (on UCX's event fd and its own wake
/// fd, for at most a second) and every command must end that sleep: a lost
/// wake-up shows as a command waiting out the sleep. The first commands are
/// sent after the thread has had 20 ms to fall asleep, the rest 0-390 us
/// after the one before, around the moment it does.
#[tokio::test]
async fn an_idle_progress_thread_wakes_for_every_command() {
    use std::time::{Duration, Instant};
    let a = engine(Transport::Tcp, RegionAlloc::Mapped { populate: false });
    let b = engine(Transport::Tcp, RegionAlloc::Mapped { populate: false });
    let b_on_a = a.connect(spec(&b)).await.expect("connect a->b");
    let op = vec![RmaOp { src_offset: 0, dst_offset: 0, len: 4096 }];
    // Callers write the wake fd only while the thread sleeps: commands sent
    // just as it goes to sleep (it spins 200 us after its last event) must
    // not be missed either.
    let asleep = (0..20).map(|_| Duration::from_millis(20));
    let falling_asleep = (0..400u64).map(|i| Duration::from_micros(i % 40 * 10));
    for (i, pause) in asleep.chain(falling_asleep).enumerate() {
        std::thread::sleep(pause);
        let t0 = Instant::now();
        a.transfer(b_on_a, Direction::Write, op.clone()).await.expect("write");
        let took = t0.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "command {i}, sent {pause:?} after the last, took {took:?}: the thread missed its wake-up"
        );
    }
}
