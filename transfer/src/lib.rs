//! kvrail data plane: a safe layer over UCX (context, worker, endpoint,
//! registered region, rkeys), the hooks-off guard, block layouts, transfer
//! plans, and the progress thread that executes transfers.
//!
//! All `unsafe` code lives in the private `ffi` module; everything public is
//! safe. This crate knows nothing of gRPC.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod ffi;

pub mod engine;
pub mod error;
pub mod hooks;
mod inbox;
pub mod layout;
pub mod plan;
mod proc_maps;
pub mod raw;
pub mod region;
pub mod runtime;
pub mod status;
pub mod transport;

pub use engine::{Direction, Engine, EngineConfig, Expected, LocalInfo, PeerId, PeerSpec, RegionAlloc, TransferDone};
pub use error::TransferError;
pub use layout::BlockLayout;
pub use plan::{RmaOp, TransferPlan};
pub use region::Region;
pub use transport::Transport;
