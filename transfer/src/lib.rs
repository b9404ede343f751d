//! kvrail data plane: a safe layer over UCX (context, worker, endpoint,
//! registered region, rkeys), the hooks-off guard, block layouts, transfer
//! plans, and the progress thread that executes transfers.
//!
//! All `unsafe` code lives in the private `ffi` module, a leaf that imports
//! nothing from the modules above it; everything public is safe. This crate
//! knows nothing of gRPC.
//!
//! Beside the engine, process facts have rooms of their own: [`ucx_facts`]
//! (the UCX loaded), [`hooks`] (UCX's memory hooks: off, and proven off),
//! [`cpu`] (affinity), [`memory`] (heap bytes, anonymous mappings) and
//! [`umask`].
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod ffi;

pub mod cpu;
mod done;
pub mod engine;
pub mod error;
pub mod hooks;
mod inbox;
pub mod layout;
pub mod memory;
pub mod plan;
mod proc_maps;
pub mod raw;
pub mod region;
pub mod status;
pub mod transport;
pub mod ucx_facts;
pub mod umask;

pub use engine::{Direction, Engine, EngineConfig, Expected, LocalInfo, PeerId, PeerSpec, RegionAlloc, TransferDone};
pub use error::TransferError;
pub use layout::BlockLayout;
pub use plan::{RmaOp, TransferPlan};
pub use region::{MemoryKind, Region};
pub use transport::Transport;
