//! A minimal raw-UCX put/get loop, the baseline `kvrail bench` measures the
//! engine against: the same UCX calls on the same kind of region, with no
//! engine around them (no transfer plan, no gRPC, no progress thread, no
//! channels). One process is the target (it only progresses its worker), the
//! other issues the operations with a bounded window, then flushes.

use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::engine::{Direction, LocalInfo, PeerSpec, RegionAlloc};
use crate::error::TransferError;
use crate::ffi::ucp::{OpCounter, RemoteRegion, Rma, Worker};
use crate::plan::RmaOp;
use crate::region::Region;
use crate::transport::Transport;

/// One side of the raw loop: context, worker and the registered region.
#[derive(Debug)]
pub struct RawSide {
    // Drop order: worker (and everything on it) before the region handle.
    worker: Rc<Worker>,
    region: Region,
    local: LocalInfo,
}

impl RawSide {
    /// Creates the context, registers one region and creates a worker, in
    /// the calling thread (which then owns the worker).
    pub fn new(transport: Transport, region_bytes: u64, alloc: RegionAlloc) -> Result<RawSide, TransferError> {
        let report = crate::hooks::verify();
        if !report.is_off() {
            return Err(TransferError::HooksOn(report.summary()));
        }
        let len = usize::try_from(region_bytes).map_err(|_| TransferError::Region("region too large".into()))?;
        let (worker, reg, local) = crate::engine::open_worker(transport, len, alloc)?;
        Ok(RawSide { worker, region: Region::new(reg), local })
    }

    pub fn local_info(&self) -> &LocalInfo {
        &self.local
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Target role: progress the worker (busy, as ucx_perftest does) until
    /// `stop` is set.
    pub fn serve(&self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            if self.worker.progress() == 0 {
                std::hint::spin_loop();
            }
        }
    }

    /// Initiator role: runs `ops` against the peer with at most `window`
    /// requests outstanding, then (for writes) flushes. Returns the time
    /// from the first issue to the last completion. `peer_errors` asks for
    /// UCX's peer-failure reporting on the endpoint, as the engine does by
    /// default (it costs throughput on some transports, e.g. tcp in 1.18).
    pub fn run(&self, peer: &PeerSpec, dir: Direction, ops: &[RmaOp], window: usize, peer_errors: bool) -> Result<Duration, TransferError> {
        let ep = Rc::new(crate::engine::connect_endpoint(&self.worker, &peer.worker_address, peer_errors)?);
        let mut remote = RemoteRegion::unpack(&ep, &peer.rkey, peer.region_base, peer.region_len)?;
        // Steady state, as a long-running agent sees it: the peer mapping is
        // pre-faulted before the clock starts.
        remote.wait_populated();
        let rma = match dir {
            Direction::Write => Rma::Put,
            Direction::Read => Rma::Get,
        };
        // One warm-up op establishes the connection outside the timing.
        let counter = Rc::new(OpCounter::default());
        if let Some(op) = ops.first() {
            self.issue(&remote, rma, op, &counter)?;
            self.drain(&remote, rma, &counter)?;
        }
        let window = window.max(1) as u32;
        let start = Instant::now();
        for op in ops {
            while counter.pending() >= window {
                self.worker.progress();
            }
            self.issue(&remote, rma, op, &counter)?;
        }
        self.drain(&remote, rma, &counter)?;
        Ok(start.elapsed())
    }

    fn issue(&self, remote: &RemoteRegion, rma: Rma, op: &RmaOp, counter: &Rc<OpCounter>) -> Result<(), TransferError> {
        let (local, far) = match rma {
            Rma::Put => (op.src_offset, op.dst_offset),
            Rma::Get => (op.dst_offset, op.src_offset),
        };
        remote.start(rma, local, far, op.len, counter)?;
        Ok(())
    }

    fn drain(&self, remote: &RemoteRegion, rma: Rma, counter: &Rc<OpCounter>) -> Result<(), TransferError> {
        if rma == Rma::Put {
            remote.flush(counter)?;
        }
        while counter.pending() > 0 {
            self.worker.progress();
        }
        match counter.error() {
            Some(st) => Err(TransferError::PeerFailed(format!("raw RMA failed: {st}"))),
            None => Ok(()),
        }
    }
}
