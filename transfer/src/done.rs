//! What a finished transfer reports: its bytes, RMA operations or messages,
//! and time. Its own room, below both the engine that hands it out and the
//! inbox that completes deliveries with it.

use std::time::Duration;

/// A completed transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransferDone {
    pub bytes: u64,
    pub ops: u64,
    pub elapsed: Duration,
}
