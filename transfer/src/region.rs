//! The agent's one registered region, as the rest of the program sees it:
//! a length and bounds-checked copies in and out. No slice into the region
//! is ever handed out, since UCX (another thread or process) writes it.

use std::fmt;
use std::sync::Arc;

use crate::error::TransferError;
use crate::ffi::ucp::Registration;

/// Where a region's bytes live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MemoryKind {
    /// Host memory (kvrail's mmap or UCX's allocation).
    #[default]
    Host,
    /// GPU memory, registered with UCX as CUDA memory.
    Cuda,
}

impl MemoryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            MemoryKind::Host => "host",
            MemoryKind::Cuda => "cuda",
        }
    }
}

impl fmt::Display for MemoryKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Shared handle to the registered region. The registration (memory and
/// UCX mapping) lives until the engine and every handle are gone.
#[derive(Debug, Clone)]
pub struct Region {
    reg: Arc<Registration>,
}

impl Region {
    pub(crate) fn new(reg: Arc<Registration>) -> Region {
        Region { reg }
    }

    /// Bytes in the region.
    pub fn len(&self) -> u64 {
        self.reg.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.reg.len() == 0
    }

    /// Virtual base address (what peers use as the remote base).
    pub fn base(&self) -> u64 {
        self.reg.base() as u64
    }

    /// Where the region's bytes live.
    pub fn memory_kind(&self) -> MemoryKind {
        if self.reg.gpu().is_some() {
            MemoryKind::Cuda
        } else {
            MemoryKind::Host
        }
    }

    /// The CUDA device of a GPU region.
    pub fn gpu_device(&self) -> Option<usize> {
        self.reg.gpu().map(|g| g.ordinal())
    }

    /// A GPU region's device memory figures, read now from the driver
    /// (device memory is not in the process's RSS); `None` for host memory.
    pub fn device_memory(&self) -> Option<Result<kvrail_cuda::DeviceMemory, kvrail_cuda::CudaError>> {
        self.reg.gpu().map(|g| g.device_memory())
    }

    /// Copies `dst.len()` bytes at `offset` out of the region.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), TransferError> {
        self.reg.read(offset, dst).map_err(TransferError::OutOfBounds)
    }

    /// Copies `src` into the region at `offset`.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), TransferError> {
        self.reg.write(offset, src).map_err(TransferError::OutOfBounds)
    }
}
