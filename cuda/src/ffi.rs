//! The CUDA driver backend and the only module of this crate with `unsafe`
//! code. It owns:
//!
//! * loading the driver lazily, once per process, and turning a missing
//!   `libcuda.so` into [`CudaError::NoDriver`] instead of cudarc's panic;
//! * the device memory behind a [`crate::GpuRegion`]: allocation
//!   (`cuMemAlloc`), IPC export/import (`cuIpcGetMemHandle` /
//!   `cuIpcOpenMemHandle`), bounds-checked synchronous copies to and from host
//!   memory, and release on drop (`cuMemFree` or `cuIpcCloseMemHandle`).
//!
//! Every driver call runs inside [`guarded`], which catches a panic from the
//! dynamic-loading bindings (a symbol missing from an old driver) and returns
//! it as an error, so no panic crosses the public API.

#![allow(unsafe_code)]

use std::any::Any;
use std::ffi::{c_char, c_int, c_uint};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, OnceLock};

use cudarc::driver::result::{self as cu, DriverError};
use cudarc::driver::sys::{self, CUresult};
use cudarc::driver::CudaContext;

use crate::{CudaError, DeviceInfo, DeviceMemory, GpuInfo, IpcHandle};

/// What `cuInit` said, cached for the life of the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DriverState {
    /// The driver is loaded and initialised.
    Ready,
    /// The driver is loaded, but `cuInit` reported `CUDA_ERROR_NO_DEVICE`.
    NoDevice,
}

static DRIVER: OnceLock<Result<DriverState, CudaError>> = OnceLock::new();

/// Loads and initialises the driver on first use; later calls return the
/// cached outcome.
fn driver() -> Result<DriverState, CudaError> {
    DRIVER.get_or_init(load_driver).clone()
}

fn load_driver() -> Result<DriverState, CudaError> {
    // cudarc's dynamic loading panics on the first driver call when no
    // candidate library can be opened, so look for the library first with
    // cudarc's own search (same names, same order), and only then call in.
    let present = catch_unwind(|| {
        // SAFETY: `is_culib_present` dlopen()s the candidate names of the
        // NVIDIA driver library and closes whatever it opened without using
        // any symbol. It is `unsafe` only because opening a shared library
        // runs its initialisers; the only libraries it can open are the CUDA
        // driver itself, which is built to be loaded into arbitrary processes
        // and which cudarc would load anyway on the first driver call.
        unsafe { sys::is_culib_present() }
    });
    match present {
        Ok(true) => {}
        Ok(false) => {
            let detail = missing_library_detail();
            tracing::debug!(%detail, "CUDA driver library not found");
            return Err(CudaError::NoDriver { detail });
        }
        Err(payload) => {
            return Err(CudaError::NoDriver { detail: format!("looking for the driver library failed: {}", panic_text(&*payload)) });
        }
    }
    let state = guarded("cuInit", || match cu::init() {
        Ok(()) => Ok(DriverState::Ready),
        Err(DriverError(CUresult::CUDA_ERROR_NO_DEVICE)) => Ok(DriverState::NoDevice),
        Err(e) => Err(driver_error("cuInit", e)),
    })?;
    tracing::debug!(?state, "CUDA driver loaded");
    Ok(state)
}

/// Explains which library names were searched.
fn missing_library_detail() -> String {
    let mut names = cudarc::get_lib_name_candidates("cuda");
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    let (main, other): (Vec<&str>, Vec<&str>) = names.iter().map(String::as_str).partition(|n| n.starts_with("libcuda.so"));
    let listed = if main.is_empty() { &other } else { &main };
    let rest = names.len() - listed.len();
    let rest = if rest == 0 { String::new() } else { format!(" and {rest} other variants") };
    format!("dlopen found none of {}{rest} in LD_LIBRARY_PATH or the system library paths", listed.join(", "))
}

/// Runs `f`, turning a panic inside the driver bindings into
/// [`CudaError::DriverUnusable`] for `call`.
fn guarded<T>(call: &'static str, f: impl FnOnce() -> Result<T, CudaError>) -> Result<T, CudaError> {
    // `AssertUnwindSafe`: the only panics possible here come from cudarc's
    // lazy symbol loading, before a driver call starts, so no state of ours
    // is left half-updated.
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| Err(CudaError::DriverUnusable { call, detail: panic_text(&*payload) }))
}

fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-text payload".to_owned()
    }
}

/// Converts a failed `CUresult` into [`CudaError::Driver`] with the driver's
/// own name and description of the code.
fn driver_error(call: &'static str, e: DriverError) -> CudaError {
    let name = e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| "no description".to_owned());
    CudaError::Driver { call, code: e.0 as i32, message: format!("{name}: {text}") }
}

pub(crate) fn probe() -> Result<GpuInfo, CudaError> {
    let state = driver()?;
    guarded("probe", || {
        let mut version: c_int = 0;
        // SAFETY: `cuDriverGetVersion` writes one `c_int` through the pointer,
        // which points at a live, aligned local; nothing else is touched.
        unsafe { sys::cuDriverGetVersion(&mut version) }.result().map_err(|e| driver_error("cuDriverGetVersion", e))?;
        let count = device_count(state)?;
        let devices = (0..count).map(device_info).collect::<Result<Vec<_>, _>>()?;
        Ok(GpuInfo { driver_version: version, devices })
    })
}

fn device_count(state: DriverState) -> Result<usize, CudaError> {
    match state {
        DriverState::NoDevice => Ok(0),
        DriverState::Ready => {
            cu::device::get_count().map(|n| usize::try_from(n).unwrap_or(0)).map_err(|e| driver_error("cuDeviceGetCount", e))
        }
    }
}

fn device_info(ordinal: usize) -> Result<DeviceInfo, CudaError> {
    let raw_ordinal = c_int::try_from(ordinal).map_err(|_| CudaError::NoDevice { ordinal, count: 0 })?;
    let dev = cu::device::get(raw_ordinal).map_err(|e| driver_error("cuDeviceGet", e))?;
    let name = cu::device::get_name(dev).map_err(|e| driver_error("cuDeviceGetName", e))?;
    // SAFETY: the contract is that `dev` came from `cuDeviceGet`, which it
    // did, one line up, after a successful `cuInit`.
    let total_mem = unsafe { cu::device::total_mem(dev) }.map_err(|e| driver_error("cuDeviceTotalMem", e))?;
    let uuid = cu::device::get_uuid(dev).map_err(|e| driver_error("cuDeviceGetUuid", e))?;
    let mut bus = [0 as c_char; 32];
    // SAFETY: the driver writes at most `len` bytes, NUL included, into the
    // live local buffer whose length is passed; `dev` came from cuDeviceGet.
    unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as c_int, dev) }
        .result()
        .map_err(|e| driver_error("cuDeviceGetPCIBusId", e))?;
    let bus: Vec<u8> = bus.iter().map(|c| c.to_ne_bytes()[0]).take_while(|&b| b != 0).collect();
    // Used memory needs a context: the device's primary one, retained for
    // the call only (it is the context a region on the device uses anyway).
    let used_mem = open_context(ordinal).ok().and_then(|ctx| context_memory(&ctx).ok()).map(|m| m.used());
    Ok(DeviceInfo {
        ordinal,
        name,
        uuid: uuid_text(&uuid.bytes.map(|c| c.to_ne_bytes()[0])),
        pci_bus_id: String::from_utf8_lossy(&bus).into_owned(),
        total_mem: total_mem as u64,
        used_mem,
    })
}

/// `GPU-` and the 16 bytes as 8-4-4-4-12 hex digits, as `nvidia-smi -L`
/// prints a device's UUID.
fn uuid_text(b: &[u8; 16]) -> String {
    let hex = |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
    format!("GPU-{}-{}-{}-{}-{}", hex(0..4), hex(4..6), hex(6..8), hex(8..10), hex(10..16))
}

/// `cuMemGetInfo` of the device of `ctx`, with `ctx` made current first.
fn context_memory(ctx: &CudaContext) -> Result<DeviceMemory, CudaError> {
    guarded("cuMemGetInfo", || {
        ctx.bind_to_thread().map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        let (free, total) = cu::mem_get_info().map_err(|e| driver_error("cuMemGetInfo", e))?;
        Ok(DeviceMemory { free: free as u64, total: total as u64 })
    })
}

/// Sets `CU_POINTER_ATTRIBUTE_SYNC_MEMOPS` on the allocation at `ptr`: a
/// synchronous copy into or out of it is then complete when it returns,
/// which is what a NIC or peer writing the same memory (RMA, GPUDirect)
/// relies on. The caller has made the allocation's context current.
fn sync_memops(ptr: sys::CUdeviceptr) -> Result<(), CudaError> {
    let one: c_uint = 1;
    // SAFETY: the attribute's value is an unsigned int, read through the
    // pointer to a live local during the call; `ptr` is a live allocation
    // (or IPC mapping) in the current context, which the driver checks.
    unsafe { sys::cuPointerSetAttribute((&one as *const c_uint).cast(), sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_SYNC_MEMOPS, ptr) }
        .result()
        .map_err(|e| driver_error("cuPointerSetAttribute", e))
}

/// Retains the primary context of device `ordinal` after checking that the
/// device exists.
fn open_context(ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
    let state = driver()?;
    guarded("cuDevicePrimaryCtxRetain", || {
        let count = device_count(state)?;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        CudaContext::new(ordinal).map_err(|e| driver_error("cuDevicePrimaryCtxRetain", e))
    })
}

/// Checks that `len` bytes at `offset` lie inside a region of `region_len`
/// bytes, without overflowing.
fn check_range(offset: usize, len: usize, region_len: usize) -> Result<(), CudaError> {
    match offset.checked_add(len) {
        Some(end) if end <= region_len => Ok(()),
        _ => Err(CudaError::OutOfBounds { offset, len, region_len }),
    }
}

/// Where a [`Mem`]'s device memory came from, which decides how it is released.
#[derive(Debug)]
enum Origin {
    /// `cuMemAlloc` in this process; released with `cuMemFree`.
    Allocated,
    /// `cuIpcOpenMemHandle` of this handle; released with `cuIpcCloseMemHandle`.
    Imported { handle: IpcHandle },
}

/// Device memory of one region.
///
/// Invariants, which the `unsafe` blocks below rely on:
/// * `ptr..ptr + len` is mapped device memory in `ctx` for as long as the
///   `Mem` exists: `len` is exactly what was allocated, or for an import was
///   checked against the size the driver reports for the mapping;
/// * `len > 0`;
/// * the memory is released exactly once, in `Drop`.
///
/// `ctx` is a field so the context outlives the memory: `Drop::drop` runs
/// first and releases the memory, then the fields drop and release the
/// context reference.
#[derive(Debug)]
pub(crate) struct Mem {
    ptr: sys::CUdeviceptr,
    len: usize,
    origin: Origin,
    ctx: Arc<CudaContext>,
}

impl Mem {
    pub(crate) fn alloc(ordinal: usize, bytes: usize) -> Result<Mem, CudaError> {
        if bytes == 0 {
            return Err(CudaError::EmptyRegion);
        }
        let ctx = open_context(ordinal)?;
        let mem = guarded("cuMemAlloc", || {
            ctx.bind_to_thread().map_err(|e| driver_error("cuCtxSetCurrent", e))?;
            // SAFETY: `malloc_sync` writes the new address into its own
            // out-slot and returns it; its stated caveat (the bytes are
            // uninitialised, maybe invalid for a `T`) does not apply because
            // this crate only ever moves device memory as raw bytes. The
            // context it allocates in was bound to this thread just above.
            let ptr = unsafe { cu::malloc_sync(bytes) }.map_err(|e| driver_error("cuMemAlloc", e))?;
            // From here on `Drop` frees the allocation, also if the
            // attribute cannot be set.
            let mem = Mem { ptr, len: bytes, origin: Origin::Allocated, ctx: Arc::clone(&ctx) };
            sync_memops(mem.ptr)?;
            Ok(mem)
        })?;
        tracing::debug!(ordinal, bytes, ptr = mem.ptr, "allocated GPU region");
        Ok(mem)
    }

    pub(crate) fn import_ipc(ordinal: usize, handle: &IpcHandle, len: usize) -> Result<Mem, CudaError> {
        if len == 0 {
            return Err(CudaError::EmptyRegion);
        }
        if handle.iter().all(|&b| b == 0) {
            return Err(CudaError::BadHandle {
                reason: "the handle is all zero bytes, so it never came from cuIpcGetMemHandle".to_owned(),
            });
        }
        let ctx = open_context(ordinal)?;
        let mem = guarded("cuIpcOpenMemHandle", || {
            ctx.bind_to_thread().map_err(|e| driver_error("cuCtxSetCurrent", e))?;
            let raw = sys::CUipcMemHandle { reserved: handle.map(|b| c_char::from_ne_bytes([b])) };
            let mut ptr: sys::CUdeviceptr = 0;
            // SAFETY: the driver writes one `CUdeviceptr` through the first
            // pointer, a live local. The handle is passed by value and is
            // validated by the driver, which answers a foreign or corrupt
            // handle with an error code and maps nothing. The context was
            // bound just above.
            let opened =
                unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, raw, sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as c_uint) };
            opened.result().map_err(|e| match e.0 {
                CUresult::CUDA_ERROR_INVALID_VALUE | CUresult::CUDA_ERROR_INVALID_HANDLE => {
                    CudaError::BadHandle { reason: format!("the driver rejected it: {}", driver_error("cuIpcOpenMemHandle", e)) }
                }
                _ => driver_error("cuIpcOpenMemHandle", e),
            })?;
            // From here on `Drop` closes the mapping, also on the error path
            // below. `len` is not trusted by anything until it is checked.
            let mem = Mem { ptr, len, origin: Origin::Imported { handle: *handle }, ctx: Arc::clone(&ctx) };
            // The exporter may have set the attribute already; the importer
            // sets it on its own mapping, which is what its copies use. A
            // driver that refuses it for a mapping leaves copies correct
            // for this process (they are synchronous) but not ordered
            // against other writers, so it is a warning, not a failure.
            if let Err(error) = sync_memops(mem.ptr) {
                tracing::warn!(%error, "CU_POINTER_ATTRIBUTE_SYNC_MEMOPS not set on the imported GPU region");
            }
            let mapped = mem.mapped_size()?;
            if len > mapped {
                return Err(CudaError::BadHandle {
                    reason: format!(
                        "the announced length of {len} bytes exceeds the {mapped} bytes \
                         the exporter allocated"
                    ),
                });
            }
            Ok(mem)
        })?;
        tracing::debug!(ordinal, len, ptr = mem.ptr, "imported GPU region over IPC");
        Ok(mem)
    }

    /// The size of the allocation that `self.ptr` starts, as the driver
    /// reports it (`cuMemGetAddressRange`).
    fn mapped_size(&self) -> Result<usize, CudaError> {
        let mut base: sys::CUdeviceptr = 0;
        let mut size: usize = 0;
        // SAFETY: the driver writes one address and one size through the two
        // pointers, both live locals, and only reads its own mapping table
        // for `self.ptr`; the caller bound `self.ctx` to this thread.
        unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, self.ptr) }
            .result()
            .map_err(|e| driver_error("cuMemGetAddressRange", e))?;
        // The allocation may start before `ptr` only if `ptr` is interior,
        // which a freshly opened mapping never is; count from `ptr` anyway.
        let skipped = usize::try_from(self.ptr.saturating_sub(base)).unwrap_or(usize::MAX);
        Ok(size.saturating_sub(skipped))
    }

    pub(crate) fn export_ipc(&self) -> Result<IpcHandle, CudaError> {
        if let Origin::Imported { handle } = &self.origin {
            return Ok(*handle);
        }
        guarded("cuIpcGetMemHandle", || {
            self.bind()?;
            let mut raw = sys::CUipcMemHandle { reserved: [0; crate::IPC_HANDLE_LEN] };
            // SAFETY: the driver fills the 64-byte handle behind the first
            // pointer, a live, correctly typed local. `self.ptr` is the base
            // of a live `cuMemAlloc` allocation (the `Mem` invariant) in the
            // context bound just above.
            unsafe { sys::cuIpcGetMemHandle(&mut raw, self.ptr) }.result().map_err(|e| driver_error("cuIpcGetMemHandle", e))?;
            Ok(raw.reserved.map(|c| c.to_ne_bytes()[0]))
        })
    }

    pub(crate) fn device_ptr(&self) -> u64 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn ordinal(&self) -> usize {
        self.ctx.ordinal()
    }

    pub(crate) fn is_imported(&self) -> bool {
        matches!(self.origin, Origin::Imported { .. })
    }

    pub(crate) fn device_memory(&self) -> Result<DeviceMemory, CudaError> {
        context_memory(&self.ctx)
    }

    pub(crate) fn copy_from_host(&self, offset: usize, src: &[u8]) -> Result<(), CudaError> {
        check_range(offset, src.len(), self.len)?;
        if src.is_empty() {
            return Ok(());
        }
        guarded("cuMemcpyHtoD", || {
            self.bind()?;
            // SAFETY: `check_range` proved `offset + src.len() <= self.len`,
            // and by the `Mem` invariant `ptr..ptr + len` stays mapped while
            // `self` is borrowed, so the destination is valid device memory.
            // The source is a live `&[u8]` of exactly `src.len()` bytes.
            // `cuMemcpyHtoD` (not the async variant) has finished reading the
            // source, into the device or a driver staging buffer, before it
            // returns, on success or failure, so the borrow outlives every
            // host access.
            unsafe { cu::memcpy_htod_sync(self.ptr + offset as u64, src) }.map_err(|e| driver_error("cuMemcpyHtoD", e))
        })
    }

    pub(crate) fn copy_to_host(&self, offset: usize, dst: &mut [u8]) -> Result<(), CudaError> {
        check_range(offset, dst.len(), self.len)?;
        if dst.is_empty() {
            return Ok(());
        }
        guarded("cuMemcpyDtoH", || {
            self.bind()?;
            // SAFETY: `check_range` proved `offset + dst.len() <= self.len`,
            // and by the `Mem` invariant that range is mapped device memory.
            // `dst` is an exclusive borrow of exactly `dst.len()` bytes, and
            // any byte pattern is a valid `u8`. A device-to-host `cuMemcpyDtoH`
            // returns only once the copy has completed, so the driver never
            // writes to `dst` after the borrow ends.
            unsafe { cu::memcpy_dtoh_sync(dst, self.ptr + offset as u64) }.map_err(|e| driver_error("cuMemcpyDtoH", e))
        })
    }

    /// Makes this region's context current on the calling thread, which every
    /// driver call about the region needs.
    fn bind(&self) -> Result<(), CudaError> {
        self.ctx.bind_to_thread().map_err(|e| driver_error("cuCtxSetCurrent", e))
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        let (call, result) = match self.origin {
            Origin::Allocated => (
                "cuMemFree",
                guarded("cuMemFree", || {
                    self.bind()?;
                    // SAFETY: `self.ptr` came from `cuMemAlloc` in `self.ctx`
                    // (bound just above) and is freed exactly once: here, in
                    // the one `drop` of a `Mem`, which is not `Clone`. No copy
                    // of ours can still be running: they are synchronous and
                    // borrow `self`, which `drop`'s `&mut self` excludes.
                    unsafe { cu::free_sync(self.ptr) }.map_err(|e| driver_error("cuMemFree", e))
                }),
            ),
            Origin::Imported { .. } => (
                "cuIpcCloseMemHandle",
                guarded("cuIpcCloseMemHandle", || {
                    self.bind()?;
                    // SAFETY: `self.ptr` is the base address returned by
                    // `cuIpcOpenMemHandle` in `self.ctx` (bound just above),
                    // closed exactly once, here; as for `cuMemFree`, no copy
                    // of ours can be in flight during `drop`.
                    unsafe { sys::cuIpcCloseMemHandle(self.ptr) }.result().map_err(|e| driver_error("cuIpcCloseMemHandle", e))
                }),
            ),
        };
        match result {
            Ok(()) => tracing::debug!(ptr = self.ptr, len = self.len, call, "released GPU region"),
            Err(error) => tracing::warn!(
                ptr = self.ptr,
                len = self.len,
                call,
                %error,
                "could not release GPU region"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_checked_without_overflow() {
        assert!(check_range(0, 10, 10).is_ok());
        assert!(check_range(10, 0, 10).is_ok());
        assert!(check_range(4, 6, 10).is_ok());
        assert_eq!(check_range(5, 6, 10), Err(CudaError::OutOfBounds { offset: 5, len: 6, region_len: 10 }));
        assert!(check_range(usize::MAX, 2, 10).is_err());
        assert!(check_range(11, 0, 10).is_err());
    }

    #[test]
    fn guarded_turns_a_panic_into_an_error() {
        let r: Result<(), CudaError> = guarded("cuTest", || panic!("Missing symbol cuTest"));
        match r {
            Err(CudaError::DriverUnusable { call, detail }) => {
                assert_eq!(call, "cuTest");
                assert!(detail.contains("Missing symbol cuTest"), "{detail}");
            }
            other => panic!("expected DriverUnusable, got {other:?}"),
        }
    }

    #[test]
    fn uuids_print_as_nvidia_smi_does() {
        let b: [u8; 16] = std::array::from_fn(|i| i as u8 * 17);
        assert_eq!(uuid_text(&b), "GPU-00112233-4455-6677-8899-aabbccddeeff");
    }

    #[test]
    fn missing_library_detail_names_libcuda() {
        let detail = missing_library_detail();
        assert!(detail.contains("libcuda.so"), "{detail}");
    }
}
