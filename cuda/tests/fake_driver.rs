//! The driver-facing paths, exercised without a GPU: the test compiles two
//! stand-in `libcuda.so.1` files with the system C compiler and re-runs this
//! binary with `LD_LIBRARY_PATH` pointing at each (the loader reads it only
//! at process start, hence the child process).
//!
//! * a library with no CUDA symbols at all: cudarc's bindings panic on the
//!   first call, which must come back as `CudaError::DriverUnusable`;
//! * a library whose `cuInit` says `CUDA_ERROR_NO_DEVICE`: `probe()` must
//!   succeed with no devices and `alloc` must say `NoDevice`.
//!
//! Skipped (loudly) where no C compiler is installed, or where a real driver
//! is present and would be found first.
#![cfg(all(feature = "cuda", target_os = "linux"))]

use std::path::{Path, PathBuf};
use std::process::Command;

use kvrail_cuda::{probe, CudaError, GpuRegion};

const MODE_VAR: &str = "KVRAIL_CUDA_TEST_FAKE_DRIVER";

const NO_DEVICE_C: &str = r#"
int cuInit(unsigned flags) { (void)flags; return 100; }
int cuDriverGetVersion(int *v) { *v = 12080; return 0; }
int cuGetErrorName(int e, const char **s) { (void)e; *s = "CUDA_ERROR_NO_DEVICE"; return 0; }
int cuGetErrorString(int e, const char **s) { (void)e; *s = "no CUDA-capable device is detected"; return 0; }
"#;

const NO_SYMBOLS_C: &str = "int kvrail_fake_cuda_marker(void) { return 0; }\n";

/// Builds `dir/libcuda.so.1` from `source`; `None` if there is no C compiler.
fn build_fake(dir: &Path, source: &str) -> Option<PathBuf> {
    std::fs::create_dir_all(dir).expect("temp dir");
    let c = dir.join("fake.c");
    std::fs::write(&c, source).expect("write C source");
    let status = Command::new("cc").args(["-shared", "-fPIC", "-o"]).arg(dir.join("libcuda.so.1")).arg(&c).status().ok()?;
    status.success().then(|| dir.to_path_buf())
}

fn run_child(lib_dir: &Path, mode: &str) {
    let exe = std::env::current_exe().expect("test binary path");
    let output = Command::new(exe)
        .args(["fake_driver_child", "--exact", "--nocapture", "--test-threads=1"])
        .env("LD_LIBRARY_PATH", lib_dir)
        .env(MODE_VAR, mode)
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success() && stdout.contains("1 passed"), "child ({mode}) failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
}

#[test]
fn fake_drivers_give_errors_not_panics() {
    if !matches!(probe(), Err(CudaError::NoDriver { .. })) {
        eprintln!("!!! SKIPPED fake_drivers_give_errors_not_panics: a real CUDA driver is present");
        return;
    }
    let root = std::env::temp_dir().join(format!("kvrail-cuda-fake-{}", std::process::id()));
    let built = build_fake(&root.join("nodev"), NO_DEVICE_C).zip(build_fake(&root.join("nosym"), NO_SYMBOLS_C));
    let Some((nodev, nosym)) = built else {
        eprintln!("!!! SKIPPED fake_drivers_give_errors_not_panics: no working C compiler (cc)");
        let _ = std::fs::remove_dir_all(&root);
        return;
    };
    run_child(&nodev, "nodev");
    run_child(&nosym, "nosym");
    let _ = std::fs::remove_dir_all(&root);
}

/// The child half of `fake_drivers_give_errors_not_panics`; a no-op unless
/// run by it.
#[test]
fn fake_driver_child() {
    let Ok(mode) = std::env::var(MODE_VAR) else {
        return;
    };
    let probed = std::panic::catch_unwind(probe).expect("probe() panicked");
    let alloc = std::panic::catch_unwind(|| GpuRegion::alloc(0, 4096).map(|_| ())).expect("alloc panicked");
    match mode.as_str() {
        "nodev" => {
            let info = probed.expect("probe with a driver but no device");
            assert_eq!(info.driver_version, 12080);
            assert_eq!(info.driver_version_major_minor(), (12, 8));
            assert!(info.devices.is_empty(), "{info:?}");
            assert_eq!(alloc, Err(CudaError::NoDevice { ordinal: 0, count: 0 }));
        }
        "nosym" => {
            match &probed {
                Err(CudaError::DriverUnusable { call, detail }) => {
                    assert_eq!(*call, "cuInit");
                    assert!(detail.contains("cuInit"), "{detail}");
                }
                other => panic!("expected DriverUnusable, got {other:?}"),
            }
            assert_eq!(alloc, probed.map(|_| ()));
        }
        other => panic!("unknown mode {other}"),
    }
}
