//! The kvrail agent: prefill and decode agents with their gRPC services, the
//! memory self-check, and the demo / bench / soak drivers behind the
//! `kvrail` binary.
#![forbid(unsafe_code)]

pub mod agent;
pub mod churn;
pub mod cli;
pub mod cmd;
pub mod diagnose;
pub mod drive;
pub mod guard;
pub mod memory;
pub mod memwatch;
pub mod metrics;
pub mod pattern;
pub mod registry;
pub mod sidecar;
pub mod tls;
pub mod units;
