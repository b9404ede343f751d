//! The agent's one registered region, as the rest of the program sees it:
//! a length and bounds-checked copies in and out. No slice into the region
//! is ever handed out, since UCX (another thread or process) writes it.

use std::sync::Arc;

use crate::error::TransferError;
use crate::ffi::ucp::Registration;

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

    /// Copies `dst.len()` bytes at `offset` out of the region.
    pub fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), TransferError> {
        self.reg.read(offset, dst).map_err(TransferError::OutOfBounds)
    }

    /// Copies `src` into the region at `offset`.
    pub fn write(&self, offset: u64, src: &[u8]) -> Result<(), TransferError> {
        self.reg.write(offset, src).map_err(TransferError::OutOfBounds)
    }
}
