//! The crate's one error type, [`CudaError`]: every failure of the public API,
//! from "built without CUDA" through "no driver on this machine" to a failing
//! driver call with its raw `CUresult` code.

/// Everything that can go wrong in `kvrail-cuda`. No public function panics;
/// each failure ends up as one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// The crate was compiled without the `cuda` feature, so no driver code exists.
    #[error("kvrail was built without the `cuda` feature; rebuild with --features cuda")]
    NotBuilt,

    /// The CUDA driver library (`libcuda.so.1`) could not be loaded. The
    /// message is one line that names the way out; what was searched is in
    /// `detail` (logged at debug level where it is found).
    #[error("no CUDA driver (libcuda.so.1 not found): use --memory host")]
    NoDriver {
        /// What was tried, for the operator.
        detail: String,
    },

    /// A CUDA driver call returned an error code.
    #[error("CUDA driver call {call} failed: {message} (CUresult {code})")]
    Driver {
        /// The driver entry point that failed, e.g. `"cuMemAlloc"`.
        call: &'static str,
        /// The raw `CUresult` value.
        code: i32,
        /// The driver's name and description of the code.
        message: String,
    },

    /// The driver library loaded, but a call into it could not be made at all
    /// (typically a symbol the bindings expect is missing from an old driver).
    #[error(
        "CUDA driver call {call} could not be made: {detail}; the installed NVIDIA driver \
         may be older than the CUDA 12.8 API kvrail is built against"
    )]
    DriverUnusable {
        /// The driver entry point (or step) that was being attempted.
        call: &'static str,
        /// What went wrong.
        detail: String,
    },

    /// The requested device ordinal does not exist.
    #[error(
        "CUDA device {ordinal} does not exist: the driver sees {count} device(s) \
         (check CUDA_VISIBLE_DEVICES)"
    )]
    NoDevice {
        /// The ordinal that was asked for.
        ordinal: usize,
        /// How many devices the driver reports.
        count: usize,
    },

    /// An IPC handle was rejected, either by this crate's checks or by the driver.
    #[error("invalid CUDA IPC handle: {reason}")]
    BadHandle {
        /// Why the handle was rejected.
        reason: String,
    },

    /// A host copy would reach outside the GPU region.
    #[error("copy of {len} bytes at offset {offset} does not fit in a {region_len}-byte GPU region")]
    OutOfBounds {
        /// Start of the requested range inside the region.
        offset: usize,
        /// Length of the requested range.
        len: usize,
        /// Length of the region.
        region_len: usize,
    },

    /// A zero-length region was requested; the driver cannot allocate or map one.
    #[error("a GPU region must be at least one byte long")]
    EmptyRegion,
}
