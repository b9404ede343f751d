//! Decode side: its prefill agents (a session table of them, `session`),
//! those that dialled it (admitted at handshake) and those it dialled on
//! demand (`dial`), and the requests submitted through the local API
//! (push: order the prefill agent to write; pull: read, then tell it).
//!
//! `submit` is three steps: validate (pure, `validate`), attach the
//! request to its session (pure, the table), then spawn the I/O of the
//! chosen path. Nothing is awaited between a request's insertion and its
//! task's spawn, so a caller that goes away mid-call leaves no request
//! without a task to finish it.

pub mod dial;
pub mod requests;
pub mod stream;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvrail_proto::v1 as pb;
use kvrail_transfer::{Direction, PeerId, RmaOp};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use requests::Running;
pub use requests::{Answer, RequestState, Requests};

use super::effects::{carry_out, say_goodbye, RequestWaiter, SessionIo};
use super::error::{AgentError, ErrorKind, Failure};
use super::handshake::{self, Admitted};
use super::session::{Cancel, CloseReason, Moved, Outcome, RequestKind, SessionTable, Target};
use super::validate::{self, TransferPath};
use super::{convert, Agent};

/// How this side names its peers.
pub const PEER_KIND: &str = "prefill agent";

/// Orders queued for one prefill agent before back-pressure refuses more.
const SESSION_QUEUE: usize = 4096;

/// Longest a stopping agent waits for a prefill agent it dialled to end
/// its side of the session after the goodbye.
const GOODBYE_WAIT: Duration = Duration::from_secs(2);

/// What goes down a session stream (its item type is the gRPC edge's).
pub type DownItem = Result<pb::SessionDown, Status>;

/// The decode side's handle of one prefill agent's session: its engine
/// peer, the stream orders go down, and the signal that stops its reader.
#[derive(Debug)]
pub struct PeerLink {
    pub peer_agent: String,
    pub engine_peer: PeerId,
    down: Mutex<Option<mpsc::Sender<DownItem>>>,
    /// The receiving end of `down`, until the session's stream takes it.
    stream: Mutex<Option<mpsc::Receiver<DownItem>>>,
    closed: watch::Sender<bool>,
    /// Set once the session's reader is done with its stream.
    finished: watch::Sender<bool>,
}

pub type Link = Arc<PeerLink>;

/// Marks a link's reader finished when it lets go of the stream.
struct Finished(Link);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.finished.send_replace(true);
    }
}

impl PeerLink {
    fn new(peer_agent: String, engine_peer: PeerId) -> PeerLink {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        PeerLink {
            peer_agent,
            engine_peer,
            down: Mutex::new(Some(tx)),
            stream: Mutex::new(Some(rx)),
            closed: watch::channel(false).0,
            finished: watch::channel(false).0,
        }
    }

    /// Queues `msg` down the session stream.
    pub fn send(&self, msg: pb::session_down::Msg) -> Result<(), AgentError> {
        let full = || AgentError::StreamFull { peer_kind: PEER_KIND, peer: self.peer_agent.clone() };
        let tx = self.down.lock().expect("lock").clone().ok_or_else(full)?;
        tx.try_send(Ok(pb::SessionDown { msg: Some(msg) })).map_err(|_| full())
    }
}

impl SessionIo for Link {
    fn engine_peer(&self) -> PeerId {
        self.engine_peer
    }

    fn heartbeat(&self) {
        let _ = self.send(pb::session_down::Msg::Heartbeat(super::heartbeat()));
    }

    fn goodbye(&self, reason: &str) {
        let _ = self.send(pb::session_down::Msg::Goodbye(pb::Goodbye { reason: reason.to_string() }));
    }

    fn end(&self, _reason: &CloseReason) {
        // The stream ends once what is queued (a goodbye) has gone.
        self.down.lock().expect("lock").take();
        self.stream.lock().expect("lock").take();
        self.closed.send_replace(true);
    }
}

/// How the decode side reaches one request's task.
#[derive(Debug, Clone)]
pub enum Waiter {
    /// A push: its task waits for how it ended.
    Push(mpsc::Sender<Outcome>),
    /// A read: its task's transfer stops when this is set.
    Read(Arc<AtomicBool>),
}

impl Waiter {
    /// A push's completion arrived.
    fn complete(&self, outcome: Outcome) {
        if let Waiter::Push(tx) = self {
            let _ = tx.try_send(outcome);
        }
    }
}

impl RequestWaiter for Waiter {
    fn end(self, failure: Failure) {
        match &self {
            Waiter::Push(_) => self.complete(Err(failure)),
            Waiter::Read(_) => self.stop(),
        }
    }

    fn stop(&self) {
        if let Waiter::Read(flag) = self {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

pub type Table = SessionTable<Link, Waiter>;

/// What only a decode agent holds.
#[derive(Debug)]
pub struct DecodeSide {
    /// Sessions with prefill agents, by prefill agent id.
    pub sessions: Mutex<Table>,
    /// Requests by id.
    pub requests: Requests,
    /// Dials prefill agents that requests name.
    pub dialer: Box<dial::Dialer>,
}

impl DecodeSide {
    pub fn new(lease: Duration, idle: Duration) -> DecodeSide {
        DecodeSide {
            sessions: Mutex::new(Table::new(PEER_KIND, lease).with_idle_timeout(Some(idle))),
            requests: Requests::default(),
            dialer: Box::default(),
        }
    }

    /// Prefill agents that can take orders: handshaken, with their stream open.
    pub fn open_peers(&self) -> Vec<String> {
        self.sessions.lock().expect("lock").open_sessions().into_iter().map(|(p, _)| p).collect()
    }

    /// This agent stops: every prefill agent is told goodbye and its
    /// session closes (its pending requests fail, UNAVAILABLE). Returns once
    /// the readers of the sessions it dialled are done (the prefill agent
    /// ended its side, so the goodbye reached it), or after a bound.
    pub async fn goodbye(&self, agent: &Agent) {
        let reason = "the decode agent is shutting down";
        say_goodbye(agent, &self.sessions, reason, GOODBYE_WAIT, |link: &Link| link.finished.subscribe()).await;
    }
}

/// The decode side of a decode agent (its tasks run only there).
fn side(agent: &Agent) -> &DecodeSide {
    agent.decode().expect("a decode agent's task")
}

/// Admits a prefill agent that dialled this one: versions, proof, role,
/// layout and hook mode must fit.
pub async fn handshake(agent: &Arc<Agent>, req: pb::HandshakeRequest) -> Result<pb::HandshakeResponse, AgentError> {
    let d = agent.decode()?;
    let Admitted { peer, layout, spec } = handshake::check_incoming(agent, &req)?;
    // A restarted peer's old session closes (its requests fail) before its
    // new endpoint is made.
    let replaced = d.sessions.lock().expect("lock").close_peer(&peer.agent_id, CloseReason::Replaced, Instant::now());
    carry_out(agent, PEER_KIND, replaced).await;
    let engine_peer = agent.engine.connect(spec).await?;
    let id = handshake::session_id();
    let link = Arc::new(PeerLink::new(peer.agent_id.clone(), engine_peer));
    // A prefill agent that never opens its session stream (it died right
    // after its handshake) is dropped after one lease by the lease tick.
    let (epoch, raced) = d.sessions.lock().expect("lock").admit(&peer.agent_id, id.clone(), layout, link, Instant::now());
    carry_out(agent, PEER_KIND, raced).await;
    tracing::info!(peer = %peer.agent_id, session = %id, %epoch, peer_ucx = %peer.ucx_version, peer_hooks = %convert::hook_mode_name(peer.hook_mode), "prefill agent admitted");
    Ok(handshake::answer(agent, &req.nonce, id))
}

/// Closes the session with prefill agent `peer` (if any), failing its
/// pending requests with `why`: its registry entry went away.
pub async fn peer_left(agent: &Agent, peer: &str, why: String) {
    let Ok(d) = agent.decode() else { return };
    let effects = d.sessions.lock().expect("lock").close_peer(peer, CloseReason::LeftRegistry(why), Instant::now());
    carry_out(agent, PEER_KIND, effects).await;
}

/// The prefill agents this agent holds an open session with.
pub fn open_peers(agent: &Agent) -> Vec<String> {
    agent.decode().map_or_else(|_| Vec::new(), |d| d.sessions.lock().expect("lock").open_sessions().into_iter().map(|(p, _)| p).collect())
}

/// Validates and starts a transfer. Nothing is written before every field
/// has been checked. With an `answer`, the final state goes there (exactly
/// once if this returns `Ok`, never if it fails).
pub async fn submit(agent: &Arc<Agent>, req: pb::SubmitRequest, answer: Option<Answer>) -> Result<pb::SubmitResponse, AgentError> {
    let d = agent.decode().map_err(|_| AgentError::WrongRole { actual: "prefill", hint: "submit transfers on the decode agent" })?;
    let mode = validate::submit_header(&req)?;
    let target = dial::target(agent, &req.peer, &req.peer_address).await?;
    let path = validate::transfer_path(&req, mode, agent.cfg.transport.writes_as_messages(), &target.layout, &agent.layout)?;
    let run = d.requests.insert(&req.request_id, answer)?;
    let started = Instant::now();
    let id = req.request_id.clone();
    match path {
        TransferPath::Write => push(agent, target, req, None, run, started).await?,
        TransferPath::Delivery(into) => match agent.engine.expect(into) {
            Ok(delivery) => push(agent, target, req, Some(delivery), run, started).await?,
            Err(e) => return Err(refuse(d, &id, run, started, e.into())),
        },
        TransferPath::Read(ops) => pull(agent, target, &id, ops, run, started)?,
    }
    Ok(pb::SubmitResponse { request_id: id })
}

/// A request `submit` fails after its insertion: its caller gets the error,
/// and `Wait` sees the failure.
fn refuse(d: &DecodeSide, id: &str, run: Running, started: Instant, e: AgentError) -> AgentError {
    d.requests.refuse(id, run, RequestState::failed(e.failure(), started.elapsed()));
    e
}

/// A push: order the prefill agent to write (by puts, or as a delivery
/// into `delivery`'s tag), and spawn the task that waits for its end.
async fn push(
    agent: &Arc<Agent>,
    target: Target<Link>,
    req: pb::SubmitRequest,
    delivery: Option<kvrail_transfer::Expected>,
    run: Running,
    started: Instant,
) -> Result<(), AgentError> {
    let d = side(agent);
    let id = req.request_id;
    let (tx, rx) = mpsc::channel(1);
    let kind = if delivery.is_some() { RequestKind::PeerDelivers } else { RequestKind::PeerWrites };
    let started_order = d.sessions.lock().expect("lock").start(&id, &target.peer, target.epoch, kind, Waiter::Push(tx));
    let sent = started_order.and_then(|order| {
        let msg = pb::WriteOrder {
            request_id: id.clone(),
            src_blocks: req.src_blocks,
            dst_blocks: req.dst_blocks,
            delivery_tag: delivery.as_ref().map_or(0, |d| d.tag()),
            order,
        };
        target.io.send(pb::session_down::Msg::Write(msg)).inspect_err(|_| {
            d.sessions.lock().expect("lock").finish(&id, order);
        })?;
        Ok(order)
    });
    let order = match sent {
        Ok(order) => order,
        Err(e) => {
            if let Some(delivery) = delivery {
                delivery.close().await;
            }
            return Err(refuse(d, &id, run, started, e));
        }
    };
    let (agent, timeout) = (agent.clone(), agent.cfg.request_timeout);
    let (peer, epoch) = (target.peer, target.epoch);
    tokio::spawn(async move {
        let outcome = match delivery {
            Some(delivery) => delivered(delivery, rx, timeout).await,
            None => written(rx, timeout).await,
        };
        // A completion that never came (the deadline passed) must not stay
        // routed; after a delivery it was never sent.
        let d = side(&agent);
        {
            let mut t = d.sessions.lock().expect("lock");
            t.finish(&id, order);
            t.record(&peer, epoch, &outcome, Instant::now());
        }
        d.requests.finish(&id, run, RequestState::ended(outcome, started.elapsed()));
    });
    Ok(())
}

/// A pull: read with `ops`, then tell the prefill agent.
fn pull(agent: &Arc<Agent>, target: Target<Link>, id: &str, ops: Vec<RmaOp>, run: Running, started: Instant) -> Result<(), AgentError> {
    let d = side(agent);
    let flag = Arc::new(AtomicBool::new(false));
    let order = match d.sessions.lock().expect("lock").start(id, &target.peer, target.epoch, RequestKind::Local, Waiter::Read(flag.clone()))
    {
        Ok(order) => order,
        Err(e) => return Err(refuse(d, id, run, started, e)),
    };
    let (agent, id) = (agent.clone(), id.to_string());
    tokio::spawn(async move {
        let timeout = agent.cfg.request_timeout;
        let read = agent.engine.transfer_cancellable(target.io.engine_peer, Direction::Read, ops, flag);
        let outcome = match tokio::time::timeout(timeout, read).await {
            Ok(Ok(done)) => Ok(Moved { bytes: done.bytes, ops: done.ops }),
            Ok(Err(e)) => Err(AgentError::from(e).failure()),
            Err(_) => Err(Failure::new(ErrorKind::DeadlineExceeded, format!("read not finished within {timeout:?}"))),
        };
        let d = side(&agent);
        let end = {
            let mut t = d.sessions.lock().expect("lock");
            let end = t.local_done(&id, order, outcome);
            t.record(&target.peer, target.epoch, &end.outcome, Instant::now());
            end
        };
        if let Some(io) = end.notify {
            let (ok, error) = match &end.outcome {
                Ok(_) => (true, String::new()),
                Err(f) => (false, f.message.clone()),
            };
            let _ = io.send(pb::session_down::Msg::ReadDone(pb::ReadDone { request_id: id.clone(), ok, error }));
        }
        d.requests.finish(&id, run, RequestState::ended(end.outcome, started.elapsed()));
    });
    Ok(())
}

/// Asks a pending request to stop; returns its state now. A push is
/// stopped by its prefill agent, a read by this agent; either reports
/// CANCELLED only once nothing of it is in flight any more.
pub fn cancel(agent: &Agent, id: &str) -> Result<RequestState, AgentError> {
    let d = agent.decode().map_err(|_| AgentError::WrongRole { actual: "prefill", hint: "cancel requests on the decode agent" })?;
    let state = d.requests.state(id)?;
    let action = d.sessions.lock().expect("lock").cancel(id);
    match action {
        Some(Cancel::Order { io, .. }) => io.send(pb::session_down::Msg::Cancel(pb::CancelOrder { request_id: id.to_string() }))?,
        Some(Cancel::Stop(waiter)) => waiter.stop(),
        None => {}
    }
    Ok(state)
}

/// A push by RMA puts: done when the prefill agent's completion says so.
async fn written(mut done: mpsc::Receiver<Outcome>, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, done.recv()).await {
        Ok(Some(outcome)) => outcome,
        Ok(None) => Err(session_ended()),
        Err(_) => Err(Failure::new(ErrorKind::DeadlineExceeded, format!("no completion within {timeout:?}"))),
    }
}

/// A push by delivery (tcp): done when every byte landed in its tag, which
/// this agent's engine counts; the prefill agent answers only a failure.
/// The tag closes before the request's state is set: nothing lands in its
/// blocks after a failure is reported.
async fn delivered(mut d: kvrail_transfer::Expected, mut done: mpsc::Receiver<Outcome>, timeout: Duration) -> Outcome {
    let outcome = tokio::select! {
        r = d.arrived(timeout) => match r {
            Ok(a) => Ok(Moved { bytes: a.bytes, ops: a.ops }),
            Err(e) => Err(AgentError::from(e).failure()),
        },
        c = done.recv() => c.unwrap_or_else(|| Err(session_ended())),
    };
    d.close().await;
    outcome
}

fn session_ended() -> Failure {
    Failure::new(ErrorKind::Unavailable, "the session ended before the request completed")
}
