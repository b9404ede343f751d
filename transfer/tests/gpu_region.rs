//! Engines with their region in GPU memory (`RegionAlloc::Cuda`).
//!
//! Everywhere: without a CUDA driver the engine does not start, and says so
//! in the driver's one line; a host region says it is host memory and has
//! no device figures. With `KVRAIL_GPU_TESTS=1` (and a CUDA-enabled UCX,
//! `KVRAIL_UCX_LIB`): two engines on GPU 0 move blocks with puts and gets
//! over shared memory (cuda_ipc) and tcp, every byte checked through the
//! driver's copies. Without the variable that test says why it skips; with
//! it and no GPU it fails.

use kvrail_cuda::CudaError;
use kvrail_transfer::{Direction, Engine, EngineConfig, MemoryKind, RegionAlloc, RmaOp, TransferError, Transport};

const REGION: u64 = 8 << 20;
const BLOCK: u64 = 64 << 10;

fn start(transport: Transport, alloc: RegionAlloc) -> Result<Engine, TransferError> {
    Engine::start(EngineConfig { transport, region_bytes: REGION, region_alloc: alloc, ..EngineConfig::default() })
}

#[test]
fn a_gpu_region_without_a_driver_is_the_drivers_one_line() {
    if !matches!(kvrail_cuda::probe(), Err(CudaError::NoDriver { .. })) {
        eprintln!("!!! SKIPPED a_gpu_region_without_a_driver_is_the_drivers_one_line: a CUDA driver is here");
        return;
    }
    match start(Transport::Sm, RegionAlloc::Cuda { device: 0 }) {
        Err(e @ TransferError::Gpu(CudaError::NoDriver { .. })) => {
            assert_eq!(e.to_string(), "no CUDA driver (libcuda.so.1 not found): use --memory host");
        }
        other => panic!("expected the no-driver error, got {:?}", other.map(|_| ())),
    }
    let handle = [7u8; kvrail_cuda::IPC_HANDLE_LEN];
    let r = start(Transport::Tcp, RegionAlloc::CudaIpc { device: 0, handle });
    assert!(matches!(r, Err(TransferError::Gpu(CudaError::NoDriver { .. }))), "{:?}", r.map(|_| ()));
}

#[test]
fn a_host_region_is_host_memory() {
    let e = start(Transport::Tcp, RegionAlloc::Mapped { populate: false }).expect("engine");
    assert_eq!(e.region().memory_kind(), MemoryKind::Host);
    assert!(e.region().device_memory().is_none());
    assert_eq!(e.region().gpu_device(), None);
    assert_eq!(RegionAlloc::Cuda { device: 1 }.memory_kind(), MemoryKind::Cuda);
}

fn gpu_tests(test: &str) -> bool {
    let wanted = std::env::var("KVRAIL_GPU_TESTS").is_ok_and(|v| v == "1");
    let why = match kvrail_cuda::probe() {
        Ok(info) if !info.devices.is_empty() => None,
        Ok(_) => Some("the CUDA driver sees no GPU".to_string()),
        Err(e) => Some(e.to_string()),
    };
    match (wanted, why) {
        (true, None) => true,
        (true, Some(why)) => panic!("KVRAIL_GPU_TESTS=1 but no GPU works here: {why}"),
        (false, why) => {
            eprintln!("!!! SKIPPED {test}: {}", why.unwrap_or_else(|| "KVRAIL_GPU_TESTS=1 is not set".into()));
            false
        }
    }
}

#[tokio::test]
async fn gpu_regions_put_and_get_byte_for_byte() {
    if !gpu_tests("gpu_regions_put_and_get_byte_for_byte") {
        return;
    }
    for transport in [Transport::Sm, Transport::Tcp] {
        let a = start(transport, RegionAlloc::Cuda { device: 0 }).expect("engine a on GPU 0");
        let b = start(transport, RegionAlloc::Cuda { device: 0 }).expect("engine b on GPU 0");
        assert_eq!(a.region().memory_kind(), MemoryKind::Cuda);
        let used = a.region().device_memory().expect("a GPU region").expect("cuMemGetInfo");
        assert!(used.used() >= REGION, "{used:?}");
        let spec = |e: &Engine| kvrail_transfer::PeerSpec::from(e.local_info());
        let b_on_a = a.connect(spec(&b)).await.expect("connect");
        let a_on_b = b.connect(spec(&a)).await.expect("connect");
        let pattern: Vec<u8> = (0..BLOCK as usize).map(|i| (i as u8).wrapping_mul(7).wrapping_add(3)).collect();
        a.region().write(0, &pattern).expect("HtoD");
        let dir = if transport.writes_as_messages() { Direction::Deliver { tag: 0 } } else { Direction::Write };
        if let Direction::Deliver { .. } = dir {
            // Over tcp writes are deliveries into a tag the target opened.
            let into = std::iter::once(5 * BLOCK..6 * BLOCK).collect();
            let mut expected = b.expect(into).expect("open a tag");
            a.transfer(
                b_on_a,
                Direction::Deliver { tag: expected.tag() },
                vec![RmaOp { src_offset: 0, dst_offset: 5 * BLOCK, len: BLOCK }],
            )
            .await
            .expect("deliver");
            expected.arrived(std::time::Duration::from_secs(10)).await.expect("landed");
        } else {
            a.transfer(b_on_a, dir, vec![RmaOp { src_offset: 0, dst_offset: 5 * BLOCK, len: BLOCK }]).await.expect("put");
        }
        let mut got = vec![0u8; BLOCK as usize];
        b.region().read(5 * BLOCK, &mut got).expect("DtoH");
        assert!(got == pattern, "{transport}: the put changed bytes");
        b.transfer(a_on_b, Direction::Read, vec![RmaOp { src_offset: 0, dst_offset: 9 * BLOCK, len: BLOCK }]).await.expect("get");
        b.region().read(9 * BLOCK, &mut got).expect("DtoH");
        assert!(got == pattern, "{transport}: the get changed bytes");
    }
}
