//! The one error type of `kvrail-transfer`.

use crate::layout::LayoutError;
use crate::plan::PlanError;

/// Everything that can go wrong in the data plane. UCX failures carry the
/// failing call and its raw status code.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{call} failed: {message} (UCX status {code})")]
    Ucx { call: &'static str, code: i8, message: String },
    #[error("UCX memory hooks are not off; refusing to run: {0}")]
    HooksOn(String),
    #[error("region: {0}")]
    Region(String),
    /// A GPU region could not be made (no driver, no device, bad handle):
    /// the CUDA error's own one line.
    #[error(transparent)]
    Gpu(#[from] kvrail_cuda::CudaError),
    #[error("peer {0} is not connected")]
    UnknownPeer(u64),
    #[error("peer failed: {0}")]
    PeerFailed(String),
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    #[error("transfer stalled: {0}")]
    Stalled(String),
    #[error("transfer cancelled")]
    Cancelled,
    #[error("transfer engine has stopped")]
    EngineStopped,
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("cannot bind the progress thread to CPU {cpu}: {source}")]
    Pin { cpu: usize, source: std::io::Error },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl From<crate::ffi::ucp::UcxFailure> for TransferError {
    fn from(f: crate::ffi::ucp::UcxFailure) -> Self {
        TransferError::Ucx { call: f.call, code: f.status.0, message: f.status.message() }
    }
}

impl From<crate::ffi::ucp::RmaError> for TransferError {
    fn from(e: crate::ffi::ucp::RmaError) -> Self {
        match e {
            crate::ffi::ucp::RmaError::OutOfBounds(m) => TransferError::OutOfBounds(m),
            crate::ffi::ucp::RmaError::Ucx(f) => f.into(),
        }
    }
}
