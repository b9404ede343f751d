//! The transfer engine: one progress thread that owns a UCX context, worker
//! and the agent's one registered region, and executes RMA transfers for
//! async callers.
//!
//! Callers send commands over a channel; results come back on oneshot
//! channels. When no transfer is active the thread arms the worker and
//! sleeps on its event fd (and a wake eventfd) instead of spinning; callers
//! write the wake fd only while it sleeps (`Wake`), so a busy thread
//! makes no system call for them. Transfers issue their coalesced
//! operations in arrival order through one bounded window of outstanding
//! requests: the oldest transfer goes first and the next one fills the
//! window as the oldest runs out of operations, so requests finish one
//! after another (a caller with more requests to send can refill the queue
//! while the rest run) and the wire stays busy across their boundaries.
//! With transfers to several peers active, each peer's transfers hold at
//! most a fair share of the window ([`fair_share`]): a peer that stops
//! answering (dead, or slow) keeps its share until its transfers fail,
//! and the others keep the rest.
//! A put transfer then flushes the endpoint and reports success only after
//! the flush completed: the target's bytes are in place when the caller
//! hears "done". A get is done when its bytes are here.
//!
//! Deliveries ([`Direction::Deliver`], used over tcp) are the exception:
//! they are active messages the receiving engine copies into its region
//! for a tag it opened ([`Engine::expect`]), and there "done" on the
//! sending side means sent, with no flush; the receiver's [`Expected`] says
//! when landed. Opening a tag is no command: the caller queues it where the
//! thread (and its active-message handler) takes it, so it costs no round
//! trip through the thread.
//!
//! Cancel safety: dropping a caller's future only stops new operations from
//! being issued. Requests already in flight keep their completion counter
//! alive (an `Rc` owned by the request), and the memory they touch is the
//! region, which lives as long as the worker.

use std::collections::{HashMap, VecDeque};
use std::ops::Range;
use std::os::fd::{AsFd, OwnedFd};
use std::rc::Rc;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TryRecvError};
use tokio::sync::oneshot;

use crate::error::TransferError;
use crate::ffi::status::Status;
use crate::ffi::sys::{EventFd, Poller};
use crate::ffi::ucp::{Context, Endpoint, OpCounter, Registration, RemoteRegion, Rma, Worker};
use crate::hooks;
use crate::inbox::{self, Inbox};
use crate::plan::RmaOp;
use crate::region::{MemoryKind, Region};
use crate::transport::Transport;

/// How the region's memory is obtained.
#[derive(Debug, Clone)]
pub enum RegionAlloc {
    /// kvrail maps anonymous memory and registers it (`populate` faults it in).
    Mapped { populate: bool },
    /// UCX allocates and registers the memory itself (`UCP_MEM_MAP_ALLOCATE`),
    /// which some UCX releases serve with one-sided shared-memory puts.
    Ucx,
    /// A file another process shares (a memfd or a /dev/shm file, its
    /// descriptor passed over a Unix socket): kvrail maps it `MAP_SHARED`
    /// and registers that mapping, so the engine process and the network
    /// use the same pages with no copy. The region starts `offset` bytes
    /// into the file (a whole number of pages), which must hold it.
    SharedFile { fd: Arc<OwnedFd>, offset: u64 },
    /// One `cuMemAlloc` of the region's size on CUDA device `device`,
    /// registered with UCX as CUDA memory.
    Cuda { device: usize },
    /// An engine's `cuMemAlloc` allocation on CUDA device `device`, mapped
    /// from its IPC `handle` (`cuIpcOpenMemHandle`); the region's size must
    /// not exceed the allocation's. Registered as for [`RegionAlloc::Cuda`].
    CudaIpc { device: usize, handle: kvrail_cuda::IpcHandle },
}

impl RegionAlloc {
    /// Where a region made this way lives.
    pub fn memory_kind(&self) -> MemoryKind {
        match self {
            RegionAlloc::Mapped { .. } | RegionAlloc::Ucx | RegionAlloc::SharedFile { .. } => MemoryKind::Host,
            RegionAlloc::Cuda { .. } | RegionAlloc::CudaIpc { .. } => MemoryKind::Cuda,
        }
    }

    /// The UCX configuration for `transport` with a region made this way.
    pub fn ucx_settings(&self, transport: Transport) -> Vec<(&'static str, &'static str)> {
        let assertions = crate::ucx_facts::uct_has_assertions();
        match self.memory_kind() {
            MemoryKind::Host => transport.ucx_settings(assertions),
            MemoryKind::Cuda => transport.ucx_settings_for_gpu(assertions),
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub transport: Transport,
    pub region_bytes: u64,
    pub region_alloc: RegionAlloc,
    /// Outstanding RMA requests, shared by the active transfers in order.
    pub window: usize,
    /// Transfers executed at once; more wait in a queue.
    pub max_active: usize,
    /// Ask UCX to report peer failures (fails requests instead of hanging).
    pub peer_errors: bool,
    /// Demonstration only: run even though UCX's memory hooks are on.
    pub allow_hooks: bool,
    /// A transfer whose requests make no progress for this long fails.
    pub stall_timeout: Duration,
    /// Largest active message a delivery ([`Direction::Deliver`]) sends;
    /// longer operations are split.
    pub am_chunk: u64,
    /// Bind the progress thread (and so the region's first touch) to this
    /// CPU; `None` leaves placement to the scheduler.
    pub progress_cpu: Option<usize>,
}

/// Default of [`EngineConfig::am_chunk`]: on tcp here 32 KiB messages beat
/// 8 KiB (one TCP segment) and 128 KiB.
pub const DEFAULT_AM_CHUNK: u64 = 32 << 10;

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            transport: Transport::Auto,
            region_bytes: 1 << 30,
            region_alloc: RegionAlloc::Mapped { populate: true },
            window: 64,
            max_active: 32,
            peer_errors: true,
            allow_hooks: false,
            stall_timeout: Duration::from_secs(5),
            am_chunk: DEFAULT_AM_CHUNK,
            progress_cpu: None,
        }
    }
}

/// What a peer needs to reach this engine (sent in the handshake).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalInfo {
    pub worker_address: Vec<u8>,
    pub region_base: u64,
    pub region_len: u64,
    pub rkey: Vec<u8>,
}

/// A peer's reachability, as received in its handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSpec {
    pub worker_address: Vec<u8>,
    pub region_base: u64,
    pub region_len: u64,
    pub rkey: Vec<u8>,
}

impl From<&LocalInfo> for PeerSpec {
    /// What a peer of this engine receives (the engines of one process,
    /// in tests and the raw loop, hand it over directly).
    fn from(l: &LocalInfo) -> PeerSpec {
        PeerSpec { worker_address: l.worker_address.clone(), region_base: l.region_base, region_len: l.region_len, rkey: l.rkey.clone() }
    }
}

/// Handle of a connected peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerId(pub u64);

/// Direction of a transfer, from this engine's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `src` offsets are local, `dst` offsets remote (RMA put).
    Write,
    /// `src` offsets are remote, `dst` offsets local (RMA get).
    Read,
    /// As `Write`, sent as active messages that the peer's engine copies
    /// into its region, accepted only while the peer holds `tag` open
    /// ([`Engine::expect`]). The peer never answers through UCX, so the
    /// death of either side cannot abort the other inside UCX; "done" means
    /// every message left this side, and the peer's [`Expected`] tells when
    /// they all landed.
    Deliver { tag: u64 },
}

pub use crate::done::TransferDone;

/// Counters the engine keeps (read at any time).
#[derive(Debug, Default)]
pub struct EngineCounters {
    pub bytes: AtomicU64,
    pub ops: AtomicU64,
    pub transfers_ok: AtomicU64,
    pub transfers_failed: AtomicU64,
    pub peers: AtomicU64,
    /// Active-message deliveries dropped (unknown or closed tag, outside
    /// the region, more than expected).
    pub deliveries_rejected: AtomicU64,
    /// Peer mappings still being pre-faulted in the background (shared
    /// memory): until 0, transfers into them share the CPU with that work.
    pub prefaulting: Arc<AtomicU64>,
}

type Reply<T> = oneshot::Sender<Result<T, TransferError>>;

enum Command {
    Close(u64, Option<oneshot::Sender<()>>),
    Connect(PeerSpec, Reply<PeerId>),
    Prefault(PeerId, Reply<bool>),
    Disconnect(PeerId, Reply<()>),
    Transfer { peer: PeerId, dir: Direction, ops: Vec<RmaOp>, cancel: Option<Arc<AtomicBool>>, reply: Reply<TransferDone> },
}

/// Handle to a running engine. Dropping it stops the progress thread after
/// its in-flight requests are accounted for.
#[derive(Debug)]
pub struct Engine {
    tx: Option<Sender<Command>>,
    wake: Arc<Wake>,
    /// Tells the thread to finish (handles such as [`Expected`] keep the
    /// command channel open, so its closing alone cannot).
    stopping: Arc<AtomicBool>,
    /// Delivery tags opened ([`Engine::expect`]) for the thread to take.
    openings: Arc<inbox::Openings>,
    /// The next delivery tag (0 is none).
    next_tag: AtomicU64,
    local: LocalInfo,
    region: Region,
    counters: Arc<EngineCounters>,
    hooks: hooks::HookReport,
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    /// Verifies UCX's hooks are off, then starts the progress thread, which
    /// creates the context, registers the region once and the worker.
    /// Blocking (mapping a large region takes a moment).
    pub fn start(cfg: EngineConfig) -> Result<Engine, TransferError> {
        let report = hooks::verify();
        if !report.is_off() && !cfg.allow_hooks {
            return Err(TransferError::HooksOn(report.summary()));
        }
        let region_len = usize::try_from(cfg.region_bytes).map_err(|_| TransferError::Region("region size overflows usize".into()))?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let wake = Arc::new(Wake { fd: EventFd::new()?, asleep: AtomicBool::new(false) });
        let counters = Arc::new(EngineCounters::default());
        let stopping = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let thread = {
            let (wake, counters, cfg, stop) = (wake.clone(), counters.clone(), cfg.clone(), stopping.clone());
            std::thread::Builder::new().name("kvrail-ucx".into()).spawn(move || {
                match pin(cfg.progress_cpu).and_then(|()| Progress::new(&cfg, region_len, wake, counters)) {
                    Ok((progress, info, region)) => {
                        let _ = ready_tx.send(Ok((info, region, progress.inbox.openings().clone())));
                        progress.run(rx, &stop);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })?
        };
        let (local, region, openings) = ready_rx.recv().map_err(|_| TransferError::EngineStopped)??;
        Ok(Engine {
            tx: Some(tx),
            wake,
            stopping,
            openings,
            next_tag: AtomicU64::new(1),
            local,
            region,
            counters,
            hooks: report,
            thread: Some(thread),
        })
    }

    pub fn local_info(&self) -> &LocalInfo {
        &self.local
    }

    /// The registered region (for copies in and out, e.g. test patterns).
    pub fn region(&self) -> &Region {
        &self.region
    }

    pub fn counters(&self) -> &EngineCounters {
        &self.counters
    }

    /// The hook verification done at start.
    pub fn hook_report(&self) -> &hooks::HookReport {
        &self.hooks
    }

    fn send(&self, cmd: Command) -> Result<(), TransferError> {
        self.tx.as_ref().ok_or(TransferError::EngineStopped)?.send(cmd).map_err(|_| TransferError::EngineStopped)?;
        self.wake.notify();
        Ok(())
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, TransferError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply))?;
        rx.await.map_err(|_| TransferError::EngineStopped)?
    }

    /// Opens a new delivery tag ([`Expected::tag`]) for deliveries that
    /// fill exactly the byte ranges `into` of this engine's region
    /// (disjoint; a request's destination blocks), nothing else. A peer may
    /// be told to send as soon as this returns; the [`Expected`] resolves
    /// when every byte landed.
    pub fn expect(&self, into: Vec<Range<u64>>) -> Result<Expected, TransferError> {
        let (into, expected) = inbox::into_ranges(into).map_err(TransferError::Region)?;
        let tx = self.tx.clone().ok_or(TransferError::EngineStopped)?;
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let (waiter, rx) = oneshot::channel();
        self.openings.push(inbox::Opening { tag, into, expected, waiter, started: Instant::now() });
        // The thread takes it when its bytes come; an idle thread wakes now
        // (a tag that expects nothing is answered at once).
        self.wake.notify();
        Ok(Expected { tag, rx: Some(rx), tx, wake: self.wake.clone() })
    }

    /// Creates an endpoint to the peer and unpacks its rkey.
    pub async fn connect(&self, spec: PeerSpec) -> Result<PeerId, TransferError> {
        self.call(|r| Command::Connect(spec, r)).await
    }

    /// Starts pre-faulting, in the background, this process's mapping of
    /// the peer's region where the transport reaches it through shared
    /// memory (`sm`): without it, the first touch of every 4 KiB page of it
    /// faults (~0.35 s per GiB here). Returns whether it started (`false`
    /// on other transports, or when already started). Call it once the
    /// handshake is over: faulting a GiB-sized mapping while the handshake
    /// still runs slows the handshake (sm, 1 GiB regions: 1.5-3.8 ms
    /// without, up to 14 ms with). Transfers may run meanwhile.
    pub async fn prefault(&self, peer: PeerId) -> Result<bool, TransferError> {
        self.call(|r| Command::Prefault(peer, r)).await
    }

    /// Releases the peer's rkey and endpoint. Transfers still running on it fail.
    pub async fn disconnect(&self, peer: PeerId) -> Result<(), TransferError> {
        self.call(|r| Command::Disconnect(peer, r)).await
    }

    /// Runs one transfer: every op, then (for puts) a flush. Resolves only
    /// when the bytes are at the target (a delivery: when they are sent).
    /// Dropping the future stops issuing.
    pub async fn transfer(&self, peer: PeerId, dir: Direction, ops: Vec<RmaOp>) -> Result<TransferDone, TransferError> {
        self.call(|reply| Command::Transfer { peer, dir, ops, cancel: None, reply }).await
    }

    /// As [`Engine::transfer`], cancellable: once `cancel` is set, no new
    /// operation is issued, a put's endpoint is flushed, and the result is
    /// `Cancelled` only when nothing of this transfer is in flight any more,
    /// so the target's blocks can be reused safely.
    pub async fn transfer_cancellable(
        &self,
        peer: PeerId,
        dir: Direction,
        ops: Vec<RmaOp>,
        cancel: Arc<AtomicBool>,
    ) -> Result<TransferDone, TransferError> {
        self.call(|reply| Command::Transfer { peer, dir, ops, cancel: Some(cancel), reply }).await
    }
}

/// How callers wake the progress thread. Its loop reads no fd while it
/// runs (over tcp a `read(2)` per turn was ~4% of a sending thread); only
/// around a sleep does it raise `asleep`, and a caller writes the eventfd
/// only then.
#[derive(Debug)]
struct Wake {
    fd: EventFd,
    asleep: AtomicBool,
}

impl Wake {
    /// Caller side: call after queueing a command or an opening.
    fn notify(&self) {
        // Pairs with the fence in `sleep_unless`.
        fence(Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst) {
            self.fd.notify();
        }
    }

    /// Thread side: runs `sleep` unless `busy()` finds work, with `asleep`
    /// raised meanwhile, then resets the fd.
    fn sleep_unless(&self, busy: impl FnOnce() -> bool, sleep: impl FnOnce()) {
        self.asleep.store(true, Ordering::SeqCst);
        // Pairs with the fence in `notify`: either the caller sees `asleep`
        // and writes the fd, or `busy` sees its command.
        fence(Ordering::SeqCst);
        if !busy() {
            sleep();
        }
        self.asleep.store(false, Ordering::SeqCst);
        self.fd.drain();
    }
}

/// Deliveries this engine accepts for one tag ([`Engine::expect`]). While
/// it exists the tag is open; [`Expected::close`] (or dropping it) closes
/// the tag, after which late bytes for it are dropped, never written.
#[derive(Debug)]
pub struct Expected {
    tag: u64,
    rx: Option<oneshot::Receiver<Result<TransferDone, TransferError>>>,
    tx: Sender<Command>,
    wake: Arc<Wake>,
}

impl Expected {
    pub fn tag(&self) -> u64 {
        self.tag
    }

    /// Waits up to `limit` until every expected byte landed (the tag then
    /// closes by itself).
    pub async fn arrived(&mut self, limit: Duration) -> Result<TransferDone, TransferError> {
        let rx = self.rx.as_mut().ok_or(TransferError::EngineStopped)?;
        match tokio::time::timeout(limit, rx).await {
            Ok(r) => {
                self.rx = None;
                r.map_err(|_| TransferError::EngineStopped)?
            }
            Err(_) => Err(TransferError::Stalled(format!("not every block of delivery {} arrived within {limit:?}", self.tag))),
        }
    }

    /// Closes the tag and returns once the engine dropped it: no byte for
    /// it is written after this. After [`Expected::arrived`] succeeded the
    /// engine has closed it already, and this returns at once.
    pub async fn close(mut self) {
        if self.rx.is_none() {
            return;
        }
        let (done, rx) = oneshot::channel();
        if self.send_close(Some(done)) {
            let _ = rx.await;
        }
        self.rx = None;
    }

    fn send_close(&self, done: Option<oneshot::Sender<()>>) -> bool {
        let sent = self.tx.send(Command::Close(self.tag, done)).is_ok();
        self.wake.notify();
        sent
    }
}

impl Drop for Expected {
    fn drop(&mut self) {
        if self.rx.is_some() {
            self.send_close(None);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.tx.take();
        self.wake.fd.notify();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Peer {
    remote: Rc<RemoteRegion>,
}

struct Job {
    peer: PeerId,
    remote: Rc<RemoteRegion>,
    dir: Rma,
    ops: Vec<RmaOp>,
    next: usize,
    counter: Rc<OpCounter>,
    flushed: bool,
    bytes: u64,
    started: Instant,
    /// Last time an op was issued or a request completed.
    progressed: Instant,
    last_pending: u32,
    cancel: Option<Arc<AtomicBool>>,
    cancelled: bool,
    reply: Reply<TransferDone>,
}

enum JobState {
    Running,
    Done(Result<TransferDone, TransferError>),
}

impl Job {
    /// Checks the job's health and issues operations while `budget` (free
    /// slots of the shared window) lasts; an operation that completes at
    /// once takes no slot.
    fn drive(&mut self, budget: &mut usize, stall: Duration) -> JobState {
        let pending = self.counter.pending();
        if pending < self.last_pending {
            self.progressed = Instant::now();
        }
        self.last_pending = pending;
        if pending > 0 && self.progressed.elapsed() > stall {
            return JobState::Done(Err(TransferError::Stalled(format!(
                "{pending} RMA requests made no progress for {stall:?}; the peer or the link may be down"
            ))));
        }
        if let Some(st) = self.remote.endpoint().failure() {
            return JobState::Done(Err(TransferError::PeerFailed(format!("endpoint error: {st}"))));
        }
        if let Some(st) = self.counter.error() {
            return JobState::Done(Err(TransferError::PeerFailed(format!("RMA request failed: {st}"))));
        }
        if self.reply.is_closed() {
            return JobState::Done(Err(TransferError::Cancelled));
        }
        if !self.cancelled && self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            // Issue nothing more; flush a put's requests in flight, then
            // report once nothing of the job is pending.
            self.cancelled = true;
            if self.needs_flush() {
                if let Err(e) = self.remote.flush(&self.counter) {
                    return JobState::Done(Err(e.into()));
                }
                self.flushed = true;
            }
        }
        if self.cancelled {
            return if self.counter.pending() == 0 { JobState::Done(Err(TransferError::Cancelled)) } else { JobState::Running };
        }
        let first = self.next;
        while self.next < self.ops.len() && *budget > 0 {
            let op = self.ops[self.next];
            let before = self.counter.pending();
            let (local, remote) = match self.dir {
                Rma::Put | Rma::Deliver => (op.src_offset, op.dst_offset),
                Rma::Get => (op.dst_offset, op.src_offset),
            };
            if let Err(e) = self.remote.start(self.dir, local, remote, op.len, &self.counter) {
                return JobState::Done(Err(e.into()));
            }
            if self.counter.pending() > before {
                *budget -= 1;
            }
            self.bytes += op.len;
            self.next += 1;
        }
        if self.next > first {
            // Once per batch: reading the clock per operation cost ~1% at 16 KiB.
            self.progressed = Instant::now();
        }
        self.last_pending = self.counter.pending();
        if self.next == self.ops.len() && self.needs_flush() {
            if let Err(e) = self.remote.flush(&self.counter) {
                return JobState::Done(Err(e.into()));
            }
            self.flushed = true;
        }
        if self.next == self.ops.len() && self.counter.pending() == 0 && !self.needs_flush() {
            return JobState::Done(Ok(TransferDone { bytes: self.bytes, ops: self.ops.len() as u64, elapsed: self.started.elapsed() }));
        }
        JobState::Running
    }

    /// Whether the job still has to flush its endpoint before it is done.
    /// A put completes at this side before it lands, so only a flush says
    /// landed. A get completes once its bytes are here. A delivery is done
    /// when sent (the receiver counts what arrives), and a flush there did
    /// harm: over a busy tcp socket it completed only when the wire went
    /// idle, so every delivery in flight reported done at once (eight
    /// 16 MiB requests within 0.3 ms, every ~45 ms), the caller refilled its
    /// queue in bursts, and the engine ran dry ~2 ms each time.
    fn needs_flush(&self) -> bool {
        self.dir == Rma::Put && !self.flushed
    }
}

/// The messages of a delivery of `ops` under `tag` (operations split into
/// `chunk`-sized messages) and the counter holding their headers.
pub(crate) fn delivery(ops: Vec<RmaOp>, tag: u64, chunk: u64) -> (Vec<RmaOp>, OpCounter) {
    let ops = chunked(ops, chunk);
    let headers = ops.iter().map(|op| inbox::header(tag, op.dst_offset)).collect();
    (ops, OpCounter::with_headers(headers))
}

/// `ops` with every operation longer than `chunk` split into pieces of at
/// most `chunk` bytes, in order.
fn chunked(ops: Vec<RmaOp>, chunk: u64) -> Vec<RmaOp> {
    if ops.iter().all(|op| op.len <= chunk) {
        return ops;
    }
    let mut out = Vec::with_capacity(ops.iter().map(|op| op.len.div_ceil(chunk) as usize).sum());
    for op in ops {
        let mut done = 0;
        while done < op.len {
            let len = chunk.min(op.len - done);
            out.push(RmaOp { src_offset: op.src_offset + done, dst_offset: op.dst_offset + done, len });
            done += len;
        }
    }
    out
}

/// The window slots the transfers of one peer may hold when `peers` peers
/// have transfers active: an equal part of the window (rounded up, at
/// least one); all of it for a single peer.
pub(crate) fn fair_share(window: usize, peers: usize) -> usize {
    window.div_ceil(peers.max(1)).max(1)
}

/// Binds the calling thread to `cpu`, if one is given.
pub(crate) fn pin(cpu: Option<usize>) -> Result<(), TransferError> {
    match cpu {
        Some(cpu) => crate::cpu::bind_this_thread(&[cpu]).map_err(|source| TransferError::Pin { cpu, source }),
        None => Ok(()),
    }
}

/// An endpoint to the worker at `address`, with UCX's peer-failure reporting
/// when asked for and the transport supports it. Some transports (UCX 1.13's
/// shared memory) cannot report peer failures; the endpoint is then created
/// without, and failures surface through the control plane's deadlines and
/// leases. UCX's description of the endpoint (its lanes, and which message sizes go
/// short, by copy, zero-copy or by rendezvous) is logged at debug level.
pub(crate) fn connect_endpoint(worker: &Rc<Worker>, address: &[u8], peer_errors: bool) -> Result<Endpoint, TransferError> {
    let ep = match Endpoint::connect(worker, address, peer_errors) {
        Ok(ep) => ep,
        Err(e) if peer_errors && e.status == Status::ERR_UNREACHABLE => {
            tracing::info!("transport has no peer-failure reporting; endpoint created without it");
            Endpoint::connect(worker, address, false)?
        }
        Err(e) => return Err(e.into()),
    };
    tracing::debug!(description = %ep.describe(), "UCX endpoint");
    Ok(ep)
}

/// A worker [`open_worker`] created, with what the caller keeps beside it.
pub(crate) struct OpenWorker {
    pub worker: Rc<Worker>,
    /// Where the worker's deliveries land (the worker holds it too).
    pub inbox: Rc<Inbox>,
    pub region: Arc<Registration>,
    pub local: LocalInfo,
}

/// Creates a UCP context for `transport`, registers one region of
/// `region_len` bytes and creates a worker on it whose deliveries land in
/// a fresh inbox, in the calling thread (which then owns the worker).
/// Shared by the engine and the raw loop.
pub(crate) fn open_worker(transport: Transport, region_len: usize, alloc: RegionAlloc) -> Result<OpenWorker, TransferError> {
    let ctx = Context::new(&alloc.ucx_settings(transport))?;
    let reg = match alloc {
        RegionAlloc::Mapped { populate } => Registration::map_anonymous(&ctx, region_len, populate),
        RegionAlloc::Ucx => Registration::allocate(&ctx, region_len),
        RegionAlloc::SharedFile { fd, offset } => Registration::map_shared(&ctx, fd.as_fd(), offset, region_len),
        // The allocation (or mapping) is made here, on the thread that
        // owns the worker: the device's primary context is then current on
        // the thread UCX progresses the region's transfers on.
        RegionAlloc::Cuda { device } => Registration::register_gpu(&ctx, kvrail_cuda::GpuRegion::alloc(device, region_len)?),
        RegionAlloc::CudaIpc { device, handle } => {
            Registration::register_gpu(&ctx, kvrail_cuda::GpuRegion::import_ipc(device, &handle, region_len)?)
        }
    }
    .map_err(TransferError::Region)?;
    let reg = Arc::new(reg);
    let inbox = Rc::new(Inbox::new(reg.clone()));
    let worker = Worker::new(&ctx, reg.clone(), inbox.clone())?;
    let local = LocalInfo {
        worker_address: worker.address()?,
        region_base: reg.base() as u64,
        region_len: reg.len() as u64,
        rkey: reg.pack_rkey()?,
    };
    Ok(OpenWorker { worker, inbox, region: reg, local })
}

/// State owned by the progress thread. Field order is drop order: jobs and
/// peers (rkeys, endpoints) before the worker, the worker before the region
/// it holds.
struct Progress {
    active: VecDeque<Job>,
    queued: VecDeque<Job>,
    /// Finished transfers whose requests are still in flight: their rkey
    /// and endpoint stay alive until UCX completes (or fails) every one.
    draining: Vec<(Rc<RemoteRegion>, Rc<OpCounter>)>,
    peers: HashMap<PeerId, Peer>,
    next_peer: u64,
    /// Scratch of `drive`: window slots each active peer holds.
    shares: Vec<(PeerId, usize)>,
    poller: Poller,
    worker: Rc<Worker>,
    /// Where the worker's deliveries land (the worker holds it too).
    inbox: Rc<Inbox>,
    wake: Arc<Wake>,
    counters: Arc<EngineCounters>,
    window: usize,
    max_active: usize,
    peer_errors: bool,
    stall: Duration,
    am_chunk: u64,
}

impl Progress {
    fn new(
        cfg: &EngineConfig,
        region_len: usize,
        wake: Arc<Wake>,
        counters: Arc<EngineCounters>,
    ) -> Result<(Progress, LocalInfo, Region), TransferError> {
        let OpenWorker { worker, inbox, region: reg, local } = open_worker(cfg.transport, region_len, cfg.region_alloc.clone())?;
        let poller = Poller::new(&[worker.event_fd(), wake.fd.raw()])?;
        tracing::info!(transport = %cfg.transport, region_bytes = reg.len(), base = format_args!("{:#x}", reg.base()), "UCX engine ready");
        let progress = Progress {
            active: VecDeque::new(),
            queued: VecDeque::new(),
            draining: Vec::new(),
            peers: HashMap::new(),
            next_peer: 1,
            shares: Vec::new(),
            poller,
            worker,
            inbox,
            wake,
            counters,
            window: cfg.window.max(1),
            max_active: cfg.max_active.max(1),
            peer_errors: cfg.peer_errors,
            stall: cfg.stall_timeout,
            am_chunk: cfg.am_chunk.max(1),
        };
        Ok((progress, local, Region::new(reg)))
    }

    /// How long the thread polls after the last worker event before it
    /// sleeps on the event fd.
    const SPIN: Duration = Duration::from_micros(200);

    fn run(mut self, rx: Receiver<Command>, stopping: &AtomicBool) {
        let mut open = true;
        let mut closing: Option<Instant> = None;
        let mut last_event = Instant::now();
        loop {
            while open {
                match rx.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            if stopping.load(Ordering::Relaxed) {
                open = false;
            }
            if self.worker.progress() > 0 {
                last_event = Instant::now();
            }
            self.drive();
            self.draining.retain(|(_, c)| c.pending() > 0);
            if !open && self.active.is_empty() && self.queued.is_empty() {
                // Give in-flight requests a bounded time to finish.
                let since = *closing.get_or_insert_with(Instant::now);
                if self.draining.is_empty() || since.elapsed() > Duration::from_secs(5) {
                    break;
                }
            }
            // Keep polling briefly after the last event: a peer streaming
            // into this worker (software RMA over tcp) sends the next message
            // within microseconds, and a sleep/wake per message costs more.
            if self.active.is_empty() && rx.is_empty() && last_event.elapsed() > Self::SPIN {
                let (worker, poller) = (&self.worker, &self.poller);
                let openings = self.inbox.openings();
                self.wake.sleep_unless(
                    || !rx.is_empty() || openings.any() || stopping.load(Ordering::Relaxed),
                    || match worker.arm() {
                        Ok(true) => poller.wait(1000),
                        Ok(false) => {}
                        Err(e) => {
                            tracing::error!(call = e.call, status = %e.status, "ucp_worker_arm failed; polling instead");
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    },
                );
            }
        }
        tracing::debug!("UCX progress thread stopped");
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Close(tag, done) => {
                self.inbox.close(tag);
                if let Some(d) = done {
                    let _ = d.send(());
                }
            }
            Command::Connect(spec, reply) => {
                let _ = reply.send(self.connect(spec));
            }
            Command::Prefault(id, reply) => {
                let _ = reply.send(
                    self.peers.get(&id).map(|p| p.remote.prefault(&self.counters.prefaulting)).ok_or(TransferError::UnknownPeer(id.0)),
                );
            }
            Command::Disconnect(id, reply) => {
                if self.peers.remove(&id).is_some() {
                    self.counters.peers.fetch_sub(1, Ordering::Relaxed);
                }
                let (gone, keep): (Vec<Job>, Vec<Job>) = self.active.drain(..).chain(self.queued.drain(..)).partition(|j| j.peer == id);
                self.active.extend(keep);
                for job in gone {
                    self.finish(job, Err(TransferError::PeerFailed("peer was disconnected".into())));
                }
                let _ = reply.send(Ok(()));
            }
            Command::Transfer { peer, dir, ops, cancel, reply } => {
                let Some(p) = self.peers.get(&peer) else {
                    let _ = reply.send(Err(TransferError::UnknownPeer(peer.0)));
                    return;
                };
                let (rma, ops, counter) = match dir {
                    Direction::Write => (Rma::Put, ops, OpCounter::default()),
                    Direction::Read => (Rma::Get, ops, OpCounter::default()),
                    Direction::Deliver { tag } => {
                        let (ops, counter) = delivery(ops, tag, self.am_chunk);
                        (Rma::Deliver, ops, counter)
                    }
                };
                let job = Job {
                    peer,
                    remote: p.remote.clone(),
                    dir: rma,
                    ops,
                    next: 0,
                    counter: Rc::new(counter),
                    flushed: false,
                    bytes: 0,
                    started: Instant::now(),
                    progressed: Instant::now(),
                    last_pending: 0,
                    cancel,
                    cancelled: false,
                    reply,
                };
                self.queued.push_back(job);
            }
        }
    }

    fn connect(&mut self, spec: PeerSpec) -> Result<PeerId, TransferError> {
        let ep = Rc::new(connect_endpoint(&self.worker, &spec.worker_address, self.peer_errors)?);
        let remote = Rc::new(RemoteRegion::unpack(&ep, &spec.rkey, spec.region_base, spec.region_len)?);
        let id = PeerId(self.next_peer);
        self.next_peer += 1;
        self.peers.insert(id, Peer { remote });
        self.counters.peers.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    fn drive(&mut self) {
        let inbox = &self.inbox;
        self.counters.deliveries_rejected.store(inbox.rejected(), Ordering::Relaxed);
        inbox.adopt();
        // A dropped or closed Expected closes its tag by Command::Close.
        while let Some((_, a, waiter)) = inbox.pop_complete() {
            let Some((reply, started)) = waiter else { continue };
            self.counters.bytes.fetch_add(a.arrived, Ordering::Relaxed);
            let _ = reply.send(Ok(TransferDone { bytes: a.arrived, ops: a.messages, elapsed: started.elapsed() }));
        }
        while self.active.len() < self.max_active {
            match self.queued.pop_front() {
                Some(job) => self.active.push_back(job),
                None => break,
            }
        }
        // One window for all active jobs, oldest first (order is kept),
        // each peer's jobs within their fair share of it.
        self.shares.clear();
        for j in &self.active {
            let pending = j.counter.pending() as usize;
            match self.shares.iter_mut().find(|(p, _)| *p == j.peer) {
                Some((_, held)) => *held += pending,
                None => self.shares.push((j.peer, pending)),
            }
        }
        let in_flight: usize = self.shares.iter().map(|(_, held)| held).sum();
        let share = fair_share(self.window, self.shares.len());
        let mut budget = self.window.saturating_sub(in_flight);
        let mut i = 0;
        while i < self.active.len() {
            let peer = self.active[i].peer;
            let held = self.shares.iter_mut().find(|(p, _)| *p == peer).map(|(_, held)| held).expect("every active peer counted");
            let mut mine = budget.min(share.saturating_sub(*held));
            let offered = mine;
            let state = self.active[i].drive(&mut mine, self.stall);
            let used = offered - mine;
            *held += used;
            budget -= used;
            match state {
                JobState::Running => i += 1,
                JobState::Done(result) => {
                    let job = self.active.remove(i).expect("index in range");
                    self.finish(job, result);
                }
            }
        }
    }

    fn finish(&mut self, job: Job, result: Result<TransferDone, TransferError>) {
        match &result {
            Ok(done) => {
                self.counters.bytes.fetch_add(done.bytes, Ordering::Relaxed);
                self.counters.ops.fetch_add(done.ops, Ordering::Relaxed);
                self.counters.transfers_ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.counters.transfers_failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(peer = job.peer.0, error = %e, "transfer failed");
            }
        }
        // Requests still in flight keep the rkey and endpoint they use.
        if job.counter.pending() > 0 {
            self.draining.push((job.remote.clone(), job.counter.clone()));
        }
        let _ = job.reply.send(result);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_a_thread_to_an_allowed_cpu_and_refuses_others() {
        let cpus = crate::cpu::allowed_cpus().expect("sched_getaffinity");
        assert!(!cpus.is_empty());
        // In a thread of its own, so the test thread keeps its placement.
        std::thread::spawn(move || {
            pin(Some(cpus[0])).expect("an allowed CPU");
            assert_eq!(crate::cpu::allowed_cpus().unwrap(), vec![cpus[0]]);
            let not_allowed = cpus.iter().max().unwrap() + 1;
            let e = pin(Some(not_allowed)).unwrap_err();
            assert!(matches!(e, TransferError::Pin { cpu, .. } if cpu == not_allowed), "{e}");
            assert!(matches!(pin(Some(1 << 20)), Err(TransferError::Pin { .. })), "beyond CPU_SETSIZE");
            assert_eq!(crate::cpu::allowed_cpus().unwrap(), vec![cpus[0]], "a refused pin changes nothing");
        })
        .join()
        .unwrap();
        assert!(pin(None).is_ok());
        let e = Engine::start(EngineConfig { progress_cpu: Some(1 << 20), ..EngineConfig::default() }).unwrap_err();
        assert!(e.to_string().contains("cannot bind the progress thread to CPU"), "{e}");
    }

    #[test]
    fn tcp_by_copy_sends_a_delivery_as_one_message_and_never_zero_copy() {
        // UCX's description of a tcp endpoint: where each eager protocol
        // starts, e.g. "am_send: 0..<egr/short>..8185..<egr/zcopy>..8192..<rndv>..(inf)".
        let am_send = |by_copy: bool| {
            let ctx = Context::new(&Transport::Tcp.ucx_settings(by_copy)).expect("UCX context");
            let region = Arc::new(Registration::map_anonymous(&ctx, 1 << 20, false).expect("region"));
            let worker = || Worker::new(&ctx, region.clone(), Rc::new(Inbox::new(region.clone()))).expect("worker");
            let (a, b) = (worker(), worker());
            let text = Endpoint::connect(&a, &b.address().expect("address"), false).expect("endpoint").describe();
            text.lines()
                .find(|l| l.trim_start_matches(['#', ' ']).starts_with("am_send:"))
                .unwrap_or_else(|| panic!("no am_send in:\n{text}"))
                .to_string()
        };
        let zero_copy = am_send(false);
        assert!(zero_copy.contains("<egr/zcopy>"), "{zero_copy}");
        let by_copy = am_send(true);
        assert!(!by_copy.contains("zcopy"), "{by_copy}");
        let short_up_to: u64 = by_copy
            .split("<egr/short>..")
            .nth(1)
            .and_then(|rest| rest.split("..").next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no short range in {by_copy}"));
        assert!(
            short_up_to >= DEFAULT_AM_CHUNK + crate::ffi::am::HEADER_LEN as u64,
            "a delivery chunk must fit one send buffer: {by_copy}"
        );
    }

    #[test]
    fn each_peer_gets_an_equal_part_of_the_window() {
        assert_eq!(fair_share(64, 1), 64, "one peer: the whole window, as before");
        assert_eq!(fair_share(64, 4), 16);
        assert_eq!(fair_share(64, 3), 22, "rounded up: the window is used in full");
        assert_eq!(fair_share(2, 5), 1, "every peer can issue");
        assert_eq!(fair_share(64, 0), 64);
    }

    #[test]
    fn deliveries_split_long_operations_in_order_with_one_header_each() {
        let ops = vec![RmaOp { src_offset: 0, dst_offset: 1000, len: 70 }, RmaOp { src_offset: 500, dst_offset: 0, len: 30 }];
        let (split, counter) = delivery(ops, 7, 32);
        let got: Vec<(u64, u64, u64)> = split.iter().map(|o| (o.src_offset, o.dst_offset, o.len)).collect();
        assert_eq!(got, vec![(0, 1000, 32), (32, 1032, 32), (64, 1064, 6), (500, 0, 30)]);
        assert_eq!(counter.headers(), &split.iter().map(|o| inbox::header(7, o.dst_offset)).collect::<Vec<_>>()[..]);
        let short = vec![RmaOp { src_offset: 0, dst_offset: 0, len: 32 }];
        assert_eq!(chunked(short.clone(), 32), short);
    }
}
