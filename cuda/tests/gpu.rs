//! GPU tests: allocation, host copy round trips, bounds errors, and IPC
//! export/import across two processes. They run wherever a CUDA driver and a
//! device exist. Elsewhere each test prints a loud SKIPPED line and passes,
//! unless `KVRAIL_REQUIRE_GPU=1` is set, which turns the skip into a failure.
//!
//! The IPC test re-runs this test binary as a child process (CUDA refuses to
//! open an IPC handle in the process that exported it); the child runs only
//! the `ipc_child` test, which does nothing unless its environment says so.
#![cfg(feature = "cuda")]

use std::process::Command;

use kvrail_cuda::{probe, CudaError, GpuRegion, IpcHandle, IPC_HANDLE_LEN};

const CHILD_HANDLE_VAR: &str = "KVRAIL_CUDA_TEST_IPC_HANDLE";
const CHILD_LEN_VAR: &str = "KVRAIL_CUDA_TEST_IPC_LEN";

/// Returns `true` if a GPU is usable. Otherwise skips loudly, or fails when
/// `KVRAIL_REQUIRE_GPU=1`.
fn gpu_or_skip(test: &str) -> bool {
    let required = std::env::var("KVRAIL_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let why = match probe() {
        Ok(info) if !info.devices.is_empty() => return true,
        Ok(info) => format!("the CUDA driver ({}) sees no devices", info.driver_version),
        Err(e) => e.to_string(),
    };
    assert!(!required, "KVRAIL_REQUIRE_GPU=1 but no usable GPU: {why}");
    eprintln!("!!! SKIPPED GPU test {test}: {why} (set KVRAIL_REQUIRE_GPU=1 to make this a failure)");
    false
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> IpcHandle {
    let mut out = [0u8; IPC_HANDLE_LEN];
    assert_eq!(text.len(), 2 * IPC_HANDLE_LEN, "bad handle text {text}");
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex handle");
    }
    out
}

#[test]
fn alloc_reports_pointer_length_and_device() {
    if !gpu_or_skip("alloc_reports_pointer_length_and_device") {
        return;
    }
    let region = GpuRegion::alloc(0, 3 << 20).expect("alloc");
    assert_eq!(region.len(), 3 << 20);
    assert!(!region.is_empty());
    assert_ne!(region.device_ptr(), 0);
    assert_eq!(region.ordinal(), 0);
    assert!(!region.is_imported());
}

#[test]
fn copy_round_trip_and_bounds() {
    if !gpu_or_skip("copy_round_trip_and_bounds") {
        return;
    }
    let len = 1 << 20;
    let region = GpuRegion::alloc(0, len).expect("alloc");
    let data = pattern(len, 3);
    region.copy_from_host(0, &data).expect("copy in");
    let mut back = vec![0u8; len];
    region.copy_to_host(0, &mut back).expect("copy out");
    assert!(back == data, "round trip changed the bytes");

    // A window in the middle.
    let window = pattern(4096, 99);
    region.copy_from_host(8192, &window).expect("copy window in");
    let mut got = vec![0u8; 4096];
    region.copy_to_host(8192, &mut got).expect("copy window out");
    assert_eq!(got, window);
    region.copy_to_host(8192 - 16, &mut got[..16]).expect("neighbour");
    assert_eq!(&got[..16], &data[8192 - 16..8192]);

    // Out of range: errors, not panics, and nothing is written.
    let r = region.copy_from_host(len - 10, &[0u8; 11]);
    assert!(matches!(r, Err(CudaError::OutOfBounds { .. })), "{r:?}");
    let r = region.copy_to_host(usize::MAX, &mut [0u8; 2]);
    assert!(matches!(r, Err(CudaError::OutOfBounds { .. })), "{r:?}");
    region.copy_from_host(len, &[]).expect("empty copy at the end");
}

#[test]
fn missing_device_is_reported() {
    if !gpu_or_skip("missing_device_is_reported") {
        return;
    }
    let count = probe().expect("probe").devices.len();
    match GpuRegion::alloc(count, 4096) {
        Err(CudaError::NoDevice { ordinal, count: c }) => {
            assert_eq!((ordinal, c), (count, count));
        }
        other => panic!("expected NoDevice, got {other:?}"),
    }
}

#[test]
fn bogus_ipc_handle_is_an_error() {
    if !gpu_or_skip("bogus_ipc_handle_is_an_error") {
        return;
    }
    let r = GpuRegion::import_ipc(0, &[0x5a; IPC_HANDLE_LEN], 4096);
    assert!(r.is_err(), "a made-up handle was accepted");
}

#[test]
fn ipc_export_import_across_processes() {
    if !gpu_or_skip("ipc_export_import_across_processes") {
        return;
    }
    let len = 1 << 20;
    let half = len / 2;
    let region = GpuRegion::alloc(0, len).expect("alloc");
    region.copy_from_host(0, &pattern(len, 7)).expect("fill region");
    let handle = region.export_ipc().expect("export");
    assert_ne!(handle, [0u8; IPC_HANDLE_LEN]);

    let exe = std::env::current_exe().expect("test binary path");
    let output = Command::new(exe)
        .args(["ipc_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_HANDLE_VAR, to_hex(&handle))
        .env(CHILD_LEN_VAR, len.to_string())
        .output()
        .expect("spawn child");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "child failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("1 passed"), "the child did not run ipc_child\nstdout:\n{stdout}\nstderr:\n{stderr}");

    // The child wrote its own pattern into the second half.
    let mut back = vec![0u8; len];
    region.copy_to_host(0, &mut back).expect("copy out");
    assert!(back[..half] == pattern(len, 7)[..half], "first half changed");
    assert!(back[half..] == pattern(half, 200)[..], "child's write not visible");
}

/// The child half of `ipc_export_import_across_processes`; a no-op unless run
/// by it.
#[test]
fn ipc_child() {
    let Ok(hex) = std::env::var(CHILD_HANDLE_VAR) else {
        return;
    };
    let len: usize = std::env::var(CHILD_LEN_VAR).expect("length").parse().expect("numeric length");
    let handle = from_hex(&hex);
    let half = len / 2;

    // Announcing more than was exported is refused, and the mapping closed.
    match GpuRegion::import_ipc(0, &handle, len + (64 << 20)) {
        Err(CudaError::BadHandle { reason }) => assert!(reason.contains("exceeds"), "{reason}"),
        other => panic!("expected BadHandle for an oversized import, got {other:?}"),
    }

    let region = GpuRegion::import_ipc(0, &handle, len).expect("import");
    assert!(region.is_imported());
    assert_eq!(region.len(), len);
    assert_eq!(region.export_ipc().expect("re-export"), handle);

    let mut seen = vec![0u8; len];
    region.copy_to_host(0, &mut seen).expect("read exported bytes");
    assert!(seen == pattern(len, 7), "imported bytes differ from the exporter's");
    region.copy_from_host(half, &pattern(half, 200)).expect("write second half");
    let r = region.copy_from_host(len, &[1]);
    assert!(matches!(r, Err(CudaError::OutOfBounds { .. })), "{r:?}");
    drop(region);
}
