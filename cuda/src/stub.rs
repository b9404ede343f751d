//! The backend used when the `cuda` feature is off: owns nothing, links no
//! driver bindings, and answers every request with [`CudaError::NotBuilt`].

use crate::{CudaError, DeviceMemory, GpuInfo, IpcHandle};

/// Reports that the crate was built without CUDA support.
pub(crate) fn probe() -> Result<GpuInfo, CudaError> {
    Err(CudaError::NotBuilt)
}

/// Stand-in for device memory. It has no values, so a [`crate::GpuRegion`]
/// can never exist in a build without the `cuda` feature.
#[derive(Debug)]
pub(crate) enum Mem {}

impl Mem {
    pub(crate) fn alloc(_ordinal: usize, _bytes: usize) -> Result<Mem, CudaError> {
        Err(CudaError::NotBuilt)
    }

    pub(crate) fn import_ipc(_ordinal: usize, _handle: &IpcHandle, _len: usize) -> Result<Mem, CudaError> {
        Err(CudaError::NotBuilt)
    }

    pub(crate) fn export_ipc(&self) -> Result<IpcHandle, CudaError> {
        match *self {}
    }

    pub(crate) fn device_ptr(&self) -> u64 {
        match *self {}
    }

    pub(crate) fn len(&self) -> usize {
        match *self {}
    }

    pub(crate) fn ordinal(&self) -> usize {
        match *self {}
    }

    pub(crate) fn is_imported(&self) -> bool {
        match *self {}
    }

    pub(crate) fn device_memory(&self) -> Result<DeviceMemory, CudaError> {
        match *self {}
    }

    pub(crate) fn copy_from_host(&self, _offset: usize, _src: &[u8]) -> Result<(), CudaError> {
        match *self {}
    }

    pub(crate) fn copy_to_host(&self, _offset: usize, _dst: &mut [u8]) -> Result<(), CudaError> {
        match *self {}
    }
}
