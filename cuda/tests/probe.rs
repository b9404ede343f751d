//! Driver probing on any machine, GPU or not: `probe()` and the region
//! constructors must answer with an error that says what is missing, and must
//! not panic, not even internally behind a `catch_unwind`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use kvrail_cuda::{probe, CudaError, GpuRegion};

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts every panic in this test binary, caught or not, so a test can show
/// that the crate did not merely catch one of its own.
fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

fn gpu_required() -> bool {
    std::env::var("KVRAIL_REQUIRE_GPU").is_ok_and(|v| v == "1")
}

#[test]
fn probe_explains_a_missing_driver_without_panicking() {
    count_panics();
    let first = std::panic::catch_unwind(probe).expect("probe() panicked");
    let second = std::panic::catch_unwind(probe).expect("probe() panicked the second time");
    assert_eq!(first, second, "probe() must give the same answer every time");

    let built_with_cuda = cfg!(feature = "cuda");
    match (built_with_cuda, first) {
        (false, Err(e @ CudaError::NotBuilt)) => {
            let text = e.to_string();
            assert!(text.contains("without the `cuda` feature"), "{text}");
            assert!(text.contains("--features cuda"), "{text}");
            assert!(!gpu_required(), "KVRAIL_REQUIRE_GPU=1 but {text}");
        }
        (true, Err(e @ CudaError::NoDriver { .. })) => {
            let text = e.to_string();
            assert_eq!(text, "no CUDA driver (libcuda.so.1 not found): use --memory host");
            assert!(!gpu_required(), "KVRAIL_REQUIRE_GPU=1 but {text}");
        }
        (true, Ok(info)) => {
            assert!(info.driver_version > 0, "{info:?}");
            if gpu_required() {
                assert!(!info.devices.is_empty(), "KVRAIL_REQUIRE_GPU=1 but no devices: {info:?}");
            }
        }
        (_, other) => {
            panic!("unexpected probe() answer with cuda feature {built_with_cuda}: {other:?}")
        }
    }
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "something panicked inside probe()");
}

#[test]
fn regions_fail_cleanly_without_a_driver() {
    let Err(CudaError::NotBuilt | CudaError::NoDriver { .. }) = probe() else {
        eprintln!("a CUDA driver is present; tests/gpu.rs covers regions on this machine");
        return;
    };
    let alloc = std::panic::catch_unwind(|| GpuRegion::alloc(0, 1 << 20).map(|_| ())).expect("alloc panicked");
    assert_eq!(alloc.map_err(|e| e.to_string()), probe().map(|_| ()).map_err(|e| e.to_string()));

    let handle = [7u8; kvrail_cuda::IPC_HANDLE_LEN];
    let import = std::panic::catch_unwind(|| GpuRegion::import_ipc(0, &handle, 1 << 20).map(|_| ())).expect("import_ipc panicked");
    assert!(matches!(import, Err(CudaError::NotBuilt | CudaError::NoDriver { .. })), "{import:?}");
}

#[test]
fn degenerate_arguments_are_errors() {
    let zero_handle = [0u8; kvrail_cuda::IPC_HANDLE_LEN];
    let r = GpuRegion::import_ipc(0, &zero_handle, 4096).map(|_| ());
    if cfg!(feature = "cuda") {
        assert!(matches!(r, Err(CudaError::BadHandle { .. })), "{r:?}");
        let r = GpuRegion::alloc(0, 0).map(|_| ());
        assert_eq!(r, Err(CudaError::EmptyRegion));
    } else {
        assert_eq!(r, Err(CudaError::NotBuilt));
    }
}
