//! A minimal raw-UCX put/get loop, the baseline `kvrail bench` measures the
//! engine against: the same UCX calls on the same kind of region, with no
//! engine around them (no transfer plan, no gRPC, no progress thread, no
//! channels). One process is the target (it only progresses its worker), the
//! other issues the operations with a bounded window, then flushes.

use std::borrow::Cow;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::engine::{Direction, LocalInfo, PeerSpec, RegionAlloc};
use crate::error::TransferError;
use crate::ffi::ucp::{OpCounter, RemoteRegion, Rma, Worker};
use crate::inbox::Inbox;
use crate::plan::RmaOp;
use crate::region::Region;
use crate::transport::Transport;

/// The initiator's connection to the target: endpoint, unpacked rkey and
/// the operation it runs. Lives on the initiator's thread.
#[derive(Debug)]
pub struct RawPeer {
    remote: RemoteRegion,
    rma: Rma,
    tag: u64,
}

impl RawPeer {
    /// The operations as issued (deliveries split as the engine splits
    /// them) and their counter (with the deliveries' headers).
    fn prepare<'a>(&self, ops: &'a [RmaOp]) -> (Cow<'a, [RmaOp]>, Rc<OpCounter>) {
        match self.rma {
            Rma::Deliver => {
                let (ops, counter) = crate::engine::delivery(ops.to_vec(), self.tag, crate::engine::DEFAULT_AM_CHUNK);
                (Cow::Owned(ops), Rc::new(counter))
            }
            Rma::Put | Rma::Get => (Cow::Borrowed(ops), Rc::new(OpCounter::default())),
        }
    }
}

/// The tag a raw target accepts deliveries under.
pub const RAW_TAG: u64 = 1;

/// One side of the raw loop: context, worker and the registered region.
#[derive(Debug)]
pub struct RawSide {
    // Drop order: worker (and everything on it) before the region handle.
    worker: Rc<Worker>,
    /// Where the worker's deliveries land.
    inbox: Rc<Inbox>,
    region: Region,
    local: LocalInfo,
}

impl RawSide {
    /// Creates the context, registers one region and creates a worker, in
    /// the calling thread (which then owns the worker), first bound to
    /// `cpu` if one is given (as the engine binds its progress thread).
    pub fn new(transport: Transport, region_bytes: u64, alloc: RegionAlloc, cpu: Option<usize>) -> Result<RawSide, TransferError> {
        crate::engine::pin(cpu)?;
        let report = crate::hooks::verify();
        if !report.is_off() {
            return Err(TransferError::HooksOn(report.summary()));
        }
        let len = usize::try_from(region_bytes).map_err(|_| TransferError::Region("region too large".into()))?;
        let crate::engine::OpenWorker { worker, inbox, region: reg, local } = crate::engine::open_worker(transport, len, alloc)?;
        Ok(RawSide { worker, inbox, region: Region::new(reg), local })
    }

    pub fn local_info(&self) -> &LocalInfo {
        &self.local
    }

    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Target role: progress the worker (busy, as ucx_perftest does) while
    /// `serving` is set, accepting deliveries under [`RAW_TAG`].
    pub fn serve(&self, serving: &AtomicBool) {
        // The raw loop counts nothing: the whole region, without end (the
        // tag opens on the first call; later calls find it open).
        let whole = std::iter::once(0..self.worker.region().len() as u64).collect();
        self.inbox.open(RAW_TAG, whole, u64::MAX);
        while serving.load(Ordering::Relaxed) {
            if self.worker.progress() == 0 {
                std::hint::spin_loop();
            }
        }
    }

    /// Initiator role: connects to the peer once (endpoint, rkey, and the
    /// peer mapping pre-faulted, as a long-running agent sees it) and runs
    /// one warm-up operation. `peer_errors` asks for UCX's peer-failure
    /// reporting on the endpoint, as the engine does by default (it costs
    /// throughput on some transports, e.g. tcp in 1.18).
    pub fn connect(&self, peer: &PeerSpec, dir: Direction, warmup: Option<&RmaOp>, peer_errors: bool) -> Result<RawPeer, TransferError> {
        let ep = Rc::new(crate::engine::connect_endpoint(&self.worker, &peer.worker_address, peer_errors)?);
        let remote = RemoteRegion::unpack(&ep, &peer.rkey, peer.region_base, peer.region_len)?;
        remote.prefault(&Default::default());
        remote.wait_populated();
        let rma = match dir {
            Direction::Write => Rma::Put,
            Direction::Read => Rma::Get,
            Direction::Deliver { .. } => Rma::Deliver,
        };
        let peer = RawPeer { remote, rma, tag: if let Direction::Deliver { tag } = dir { tag } else { 0 } };
        if let Some(op) = warmup {
            let (ops, counter) = peer.prepare(std::slice::from_ref(op));
            for op in ops.iter() {
                self.issue(&peer, op, &counter)?;
            }
            self.drain(&peer, &counter)?;
        }
        Ok(peer)
    }

    /// Runs `ops` against the connected peer with at most `window` requests
    /// outstanding, then (for writes and deliveries) flushes. Returns the
    /// time from the first issue to the last completion. A delivery is
    /// complete when its last message left (the target does not answer),
    /// so up to a socket buffer's worth may still be in flight: the figure
    /// errs on the fast side, never in kvrail's favour.
    pub fn run(&self, peer: &RawPeer, ops: &[RmaOp], window: usize) -> Result<Duration, TransferError> {
        let (ops, counter) = peer.prepare(ops);
        let window = window.max(1) as u32;
        let start = Instant::now();
        for op in ops.iter() {
            while counter.pending() >= window {
                self.worker.progress();
            }
            self.issue(peer, op, &counter)?;
        }
        self.drain(peer, &counter)?;
        Ok(start.elapsed())
    }

    fn issue(&self, peer: &RawPeer, op: &RmaOp, counter: &Rc<OpCounter>) -> Result<(), TransferError> {
        let (local, far) = match peer.rma {
            Rma::Get => (op.dst_offset, op.src_offset),
            Rma::Put | Rma::Deliver => (op.src_offset, op.dst_offset),
        };
        peer.remote.start(peer.rma, local, far, op.len, counter)?;
        Ok(())
    }

    fn drain(&self, peer: &RawPeer, counter: &Rc<OpCounter>) -> Result<(), TransferError> {
        if peer.rma != Rma::Get {
            peer.remote.flush(counter)?;
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
