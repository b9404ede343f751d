//! kvrail GPU memory: probing the CUDA driver, one big device allocation per
//! [`GpuRegion`], and CUDA IPC export/import so another process on the same
//! host can map that allocation.
//!
//! This file owns the public, entirely safe API. The driver is reached only
//! through the private `ffi` module (the one place with `unsafe`), which is
//! compiled with the `cuda` feature; without it the private `stub` module
//! answers every call with [`CudaError::NotBuilt`] and no CUDA bindings are
//! linked at all.
//!
//! The driver is loaded lazily, at run time, on the first call that needs it.
//! On a machine without an NVIDIA driver that call returns
//! [`CudaError::NoDriver`]; nothing in this crate panics.
//!
//! IPC follows CUDA's rules: [`GpuRegion::export_ipc`] gives 64 opaque bytes
//! that another *process* passes to [`GpuRegion::import_ipc`]. Opening a
//! handle in the process that exported it is refused by the driver.

// `unsafe` is refused everywhere except in `ffi`, which opts back in.
#![deny(unsafe_code)]

mod error;

#[cfg(feature = "cuda")]
mod ffi;
#[cfg(feature = "cuda")]
use ffi as backend;

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
use stub as backend;

pub use error::CudaError;

/// Size in bytes of a CUDA IPC memory handle (`CUipcMemHandle`).
pub const IPC_HANDLE_LEN: usize = 64;

/// The opaque bytes of a CUDA IPC memory handle, as produced by
/// [`GpuRegion::export_ipc`] and consumed by [`GpuRegion::import_ipc`].
pub type IpcHandle = [u8; IPC_HANDLE_LEN];

/// What [`probe`] found: the driver's version and the visible devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    /// The driver's CUDA version as `cuDriverGetVersion` reports it,
    /// `1000 * major + 10 * minor` (12080 is CUDA 12.8).
    pub driver_version: i32,
    /// Devices visible to this process (after `CUDA_VISIBLE_DEVICES`), by ordinal.
    /// Empty when the driver is installed but finds no GPU.
    pub devices: Vec<DeviceInfo>,
}

impl GpuInfo {
    /// The driver version as `(major, minor)`, e.g. `(12, 8)`.
    pub fn driver_version_major_minor(&self) -> (i32, i32) {
        (self.driver_version / 1000, (self.driver_version % 1000) / 10)
    }
}

/// One CUDA device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// The ordinal to pass to [`GpuRegion::alloc`] / [`GpuRegion::import_ipc`].
    pub ordinal: usize,
    /// The device's marketing name, e.g. `"NVIDIA H100 80GB HBM3"`.
    pub name: String,
    /// The device's UUID as `nvidia-smi -L` prints it (`GPU-xxxxxxxx-...`).
    pub uuid: String,
    /// PCI bus id, `domain:bus:device.function` (`0000:17:00.0`).
    pub pci_bus_id: String,
    /// Total device memory in bytes.
    pub total_mem: u64,
    /// Device memory in use by every process, bytes (`cuMemGetInfo` in the
    /// device's primary context); `None` if the driver would not say.
    pub used_mem: Option<u64>,
}

/// What the driver says of a device's memory (`cuMemGetInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes free on the device.
    pub free: u64,
    /// Bytes the device has.
    pub total: u64,
}

impl DeviceMemory {
    /// Bytes in use on the device, by any process.
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.free)
    }
}

/// The text form of an IPC handle: 128 lowercase hex digits.
pub fn ipc_handle_to_hex(handle: &IpcHandle) -> String {
    handle.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses the text form of an IPC handle ([`ipc_handle_to_hex`]; upper
/// case accepted, surrounding whitespace ignored). Refuses a wrong length,
/// a non-hex digit and the all-zero handle with [`CudaError::BadHandle`].
pub fn ipc_handle_from_hex(text: &str) -> Result<IpcHandle, CudaError> {
    let text = text.trim();
    let bad = |reason: String| CudaError::BadHandle { reason };
    if text.len() != 2 * IPC_HANDLE_LEN {
        return Err(bad(format!("expected {} hex digits ({IPC_HANDLE_LEN} bytes), got {} characters", 2 * IPC_HANDLE_LEN, text.len())));
    }
    if let Some((i, c)) = text.char_indices().find(|(_, c)| !c.is_ascii_hexdigit()) {
        return Err(bad(format!("character {c:?} at position {i} is not a hex digit")));
    }
    let mut out = [0u8; IPC_HANDLE_LEN];
    for (i, byte) in out.iter_mut().enumerate() {
        // Every character is an ASCII hex digit (checked above), so the
        // two-character slice is on char boundaries and parses.
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|e| bad(e.to_string()))?;
    }
    ipc_handle_from_bytes(&out)
}

/// An IPC handle from raw bytes (as a wire message carries it): exactly
/// [`IPC_HANDLE_LEN`] bytes, not all zero.
pub fn ipc_handle_from_bytes(bytes: &[u8]) -> Result<IpcHandle, CudaError> {
    let handle: IpcHandle = bytes
        .try_into()
        .map_err(|_| CudaError::BadHandle { reason: format!("a CUDA IPC handle is {IPC_HANDLE_LEN} bytes, got {}", bytes.len()) })?;
    if handle.iter().all(|&b| b == 0) {
        return Err(CudaError::BadHandle { reason: "the handle is all zero bytes, so it never came from cuIpcGetMemHandle".into() });
    }
    Ok(handle)
}

/// Loads the CUDA driver (once per process) and lists the devices it sees.
///
/// Returns [`CudaError::NotBuilt`] without the `cuda` feature and
/// [`CudaError::NoDriver`] when `libcuda.so` cannot be loaded. A driver that
/// loads but finds no GPU gives `Ok` with an empty device list.
pub fn probe() -> Result<GpuInfo, CudaError> {
    backend::probe()
}

/// One device allocation (or one IPC mapping of another process's
/// allocation), addressed as raw bytes.
///
/// The region keeps the CUDA context it lives in alive for as long as it
/// exists, so dropping regions and contexts in any order is fine. Dropping an
/// allocated region frees the device memory (`cuMemFree`); dropping an
/// imported one unmaps it (`cuIpcCloseMemHandle`) and leaves the exporter's
/// memory alone.
///
/// Anything else that uses [`GpuRegion::device_ptr`] (a UCX memory
/// registration, a kernel) must be finished before the region is dropped.
#[derive(Debug)]
pub struct GpuRegion {
    mem: backend::Mem,
}

impl GpuRegion {
    /// Allocates `bytes` bytes of device memory on device `ordinal` with
    /// `cuMemAlloc`. The contents are uninitialised (arbitrary bytes).
    pub fn alloc(ordinal: usize, bytes: usize) -> Result<GpuRegion, CudaError> {
        backend::Mem::alloc(ordinal, bytes).map(|mem| GpuRegion { mem })
    }

    /// Maps another process's allocation, exported with
    /// [`GpuRegion::export_ipc`], into this process on device `ordinal`
    /// (`cuIpcOpenMemHandle`). `len` is the length the exporter announced; it is
    /// checked against the real size of the exported allocation and the
    /// handle is rejected with [`CudaError::BadHandle`] if it is larger.
    pub fn import_ipc(ordinal: usize, handle: &IpcHandle, len: usize) -> Result<GpuRegion, CudaError> {
        backend::Mem::import_ipc(ordinal, handle, len).map(|mem| GpuRegion { mem })
    }

    /// Returns an IPC handle for this region (`cuIpcGetMemHandle`) that
    /// another process can pass to [`GpuRegion::import_ipc`]. For an imported
    /// region this is the handle it was imported from, which names the same
    /// memory.
    pub fn export_ipc(&self) -> Result<IpcHandle, CudaError> {
        self.mem.export_ipc()
    }

    /// The device address of the first byte, as a plain integer (`CUdeviceptr`),
    /// for registering the region with UCX or handing it to kernels.
    pub fn device_ptr(&self) -> u64 {
        self.mem.device_ptr()
    }

    /// Length of the region in bytes (never zero).
    pub fn len(&self) -> usize {
        self.mem.len()
    }

    /// Always `false`: zero-length regions are refused at creation.
    pub fn is_empty(&self) -> bool {
        self.mem.len() == 0
    }

    /// The ordinal of the device the region lives on.
    pub fn ordinal(&self) -> usize {
        self.mem.ordinal()
    }

    /// Whether the region is an IPC mapping of another process's memory.
    pub fn is_imported(&self) -> bool {
        self.mem.is_imported()
    }

    /// The memory figures of the region's device, read now (`cuMemGetInfo`
    /// in the region's context). Device memory does not show in the
    /// process's RSS; this is where a GPU region's footprint is seen.
    pub fn device_memory(&self) -> Result<DeviceMemory, CudaError> {
        self.mem.device_memory()
    }

    /// Copies `src` into the region starting at byte `offset`. Returns
    /// [`CudaError::OutOfBounds`] if the range does not fit. The copy has
    /// finished with `src` when this returns.
    ///
    /// Takes `&self`: device memory is not Rust memory, and the same bytes may
    /// be written by other processes or by the network at any time anyway.
    /// Ordering overlapping writes is the caller's job.
    pub fn copy_from_host(&self, offset: usize, src: &[u8]) -> Result<(), CudaError> {
        self.mem.copy_from_host(offset, src)
    }

    /// Copies `dst.len()` bytes starting at byte `offset` of the region into
    /// `dst`. Returns [`CudaError::OutOfBounds`] if the range does not fit.
    /// The copy is complete when this returns.
    pub fn copy_to_host(&self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
        self.mem.copy_to_host(offset, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<GpuRegion>();
        assert_send_sync::<CudaError>();
    }

    #[test]
    fn ipc_handles_round_trip_through_hex() {
        let handle: IpcHandle = std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(1));
        let text = ipc_handle_to_hex(&handle);
        assert_eq!(text.len(), 128);
        assert!(text.chars().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()), "{text}");
        assert_eq!(ipc_handle_from_hex(&text), Ok(handle));
        assert_eq!(ipc_handle_from_hex(&format!("  {}\n", text.to_uppercase())), Ok(handle));
    }

    #[test]
    fn malformed_ipc_handles_are_refused_with_the_reason() {
        let reason = |r: Result<IpcHandle, CudaError>| match r {
            Err(CudaError::BadHandle { reason }) => reason,
            other => panic!("expected BadHandle, got {other:?}"),
        };
        let good = ipc_handle_to_hex(&[0xab; IPC_HANDLE_LEN]);
        assert!(reason(ipc_handle_from_hex(&good[..126])).contains("expected 128 hex digits (64 bytes), got 126"));
        assert!(reason(ipc_handle_from_hex(&format!("{good}00"))).contains("got 130"));
        let mut bad = good.clone();
        bad.replace_range(10..11, "g");
        assert!(reason(ipc_handle_from_hex(&bad)).contains("'g' at position 10"));
        let mut wide = good[..125].to_string();
        wide.push_str("é0");
        assert!(reason(ipc_handle_from_hex(&wide)).contains("not a hex digit"));
        assert!(reason(ipc_handle_from_hex(&"0".repeat(128))).contains("all zero"));
        assert!(reason(ipc_handle_from_bytes(&[1; 63])).contains("64 bytes, got 63"));
        assert_eq!(ipc_handle_from_bytes(&[9; 64]), Ok([9; 64]));
    }

    #[test]
    fn device_memory_used_is_total_minus_free() {
        assert_eq!(DeviceMemory { free: 30, total: 100 }.used(), 70);
        assert_eq!(DeviceMemory { free: 200, total: 100 }.used(), 0);
    }

    #[test]
    fn driver_version_splits_into_major_minor() {
        let info = GpuInfo { driver_version: 12080, devices: Vec::new() };
        assert_eq!(info.driver_version_major_minor(), (12, 8));
    }

    #[test]
    fn error_messages_carry_their_details() {
        let e = CudaError::Driver { call: "cuMemAlloc", code: 2, message: "CUDA_ERROR_OUT_OF_MEMORY: out of memory".into() };
        let text = e.to_string();
        assert!(text.contains("cuMemAlloc") && text.contains("CUresult 2"), "{text}");

        let e = CudaError::NoDriver { detail: "nothing found".into() };
        assert_eq!(e.to_string(), "no CUDA driver (libcuda.so.1 not found): use --memory host");

        assert_eq!(CudaError::NotBuilt.to_string(), "kvrail was built without the `cuda` feature; rebuild with --features cuda");
    }
}
