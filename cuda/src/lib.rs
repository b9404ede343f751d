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
    /// Total device memory in bytes.
    pub total_mem: u64,
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
        let text = e.to_string();
        assert!(text.starts_with("no CUDA driver found (libcuda.so could not be loaded): nothing found. GPU regions need an NVIDIA driver; use a host region instead"), "{text}");

        assert_eq!(CudaError::NotBuilt.to_string(), "kvrail was built without the `cuda` feature; rebuild with --features cuda");
    }
}
