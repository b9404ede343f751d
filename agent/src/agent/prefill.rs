//! Prefill side: sessions with any number of decode agents, each with its
//! own engine peer (endpoint and rkey) over the one registered region, and
//! the write orders that arrive on them (plan, put, flush, then report
//! completion). A session comes about either way: this agent dials a
//! decode agent of its `--peer`s (re-handshaking when the session ends; a
//! decode agent that said goodbye is re-dialled quietly), or a decode agent
//! dials this one (`accept`, then its `Serve` stream). Once open, both are
//! served by the same loop.
//!
//! Its sessions live in the same kind of table as the decode side's
//! (`session`), keyed by decode agent id, with the orders in execution as
//! the requests pending on them. A pair of agents holds one session: while
//! a decode agent holds a session it dialled here, this agent's own dialler
//! for it stands down.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvrail_proto::v1 as pb;
use kvrail_transfer::plan::TransferPlan;
use kvrail_transfer::{BlockLayout, Direction, PeerId};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;

use super::effects::{carry_out, say_goodbye, RequestWaiter, SessionIo};
use super::error::{AgentError, ErrorKind, Failure};
use super::handshake::{self, Dial};
use super::session::{Cancel, CloseReason, Completion, Epoch, Moved, RequestKind, SessionTable, Target};
use super::{convert, Agent};

/// Longest a decode agent's push may wait here for its blocks to be
/// published (it asks for its lease, 30 s by default).
const MAX_PUSH_HOLD: Duration = Duration::from_secs(300);

/// How this side names its peers.
pub const PEER_KIND: &str = "decode agent";

/// Longest a stopping agent waits for a decode agent to end its side of
/// the session after the goodbye.
const GOODBYE_WAIT: Duration = Duration::from_secs(2);

/// Messages queued up one session's stream.
const SESSION_QUEUE: usize = 4096;

/// The prefill side's handle of one decode agent's session.
#[derive(Debug)]
pub struct Link {
    pub decode_agent: String,
    pub engine_peer: PeerId,
    up: Mutex<Option<mpsc::Sender<pb::SessionUp>>>,
    /// The receiving end of `up`, until the session's stream takes it.
    stream: Mutex<Option<mpsc::Receiver<pb::SessionUp>>>,
    /// Set when the table closes the session, with why.
    closed: watch::Sender<Option<CloseReason>>,
    /// Set once the session's task is done with its stream.
    finished: watch::Sender<bool>,
}

/// Marks a link's stream finished when its session's task lets go of it.
struct Finished(Arc<Link>);

impl Drop for Finished {
    fn drop(&mut self) {
        self.0.finished.send_replace(true);
    }
}

impl Link {
    fn new(decode_agent: String, engine_peer: PeerId) -> Link {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        Link {
            decode_agent,
            engine_peer,
            up: Mutex::new(Some(tx)),
            stream: Mutex::new(Some(rx)),
            closed: watch::channel(None).0,
            finished: watch::channel(false).0,
        }
    }

    fn take_stream(&self) -> Option<mpsc::Receiver<pb::SessionUp>> {
        self.stream.lock().expect("lock").take()
    }

    fn sender(&self) -> Option<mpsc::Sender<pb::SessionUp>> {
        self.up.lock().expect("lock").clone()
    }

    fn try_send(&self, msg: pb::session_up::Msg) {
        if let Some(up) = self.sender() {
            let _ = up.try_send(pb::SessionUp { msg: Some(msg) });
        }
    }
}

impl SessionIo for Arc<Link> {
    fn engine_peer(&self) -> PeerId {
        self.engine_peer
    }

    fn heartbeat(&self) {
        self.try_send(pb::session_up::Msg::Heartbeat(super::heartbeat()));
    }

    fn goodbye(&self, reason: &str) {
        self.try_send(pb::session_up::Msg::Goodbye(pb::Goodbye { reason: reason.to_string() }));
    }

    fn end(&self, reason: &CloseReason) {
        self.up.lock().expect("lock").take();
        self.stream.lock().expect("lock").take();
        self.closed.send_replace(Some(reason.clone()));
    }
}

/// A write order in execution stops when its flag is set.
impl RequestWaiter for Arc<AtomicBool> {
    fn end(self, _failure: Failure) {
        self.stop();
    }

    fn stop(&self) {
        self.store(true, Ordering::Relaxed);
    }
}

pub type Table = SessionTable<Arc<Link>, Arc<AtomicBool>>;

/// What only a prefill agent holds.
#[derive(Debug)]
pub struct PrefillSide {
    /// Sessions with decode agents, by decode agent id.
    pub links: Mutex<Table>,
}

impl PrefillSide {
    pub fn new(lease: Duration) -> PrefillSide {
        PrefillSide { links: Mutex::new(Table::new(PEER_KIND, lease)) }
    }

    /// Decode agents with an open session.
    pub fn open_peers(&self) -> Vec<String> {
        self.links.lock().expect("lock").open_sessions().into_iter().map(|(p, _)| p).collect()
    }

    /// This agent stops: every decode agent is told goodbye and its session
    /// closes; the dialer stops re-dialling. Returns once each decode agent
    /// has ended its side of the stream (so the goodbye reached it), or
    /// after a bound.
    pub async fn goodbye(&self, agent: &Agent) {
        let reason = "the prefill agent is shutting down";
        say_goodbye(agent, &self.links, reason, GOODBYE_WAIT, |link: &Arc<Link>| link.finished.subscribe()).await;
    }
}

fn side(agent: &Agent) -> &PrefillSide {
    agent.prefill().expect("a prefill agent's task")
}

/// Handshakes with the decode agent at `addr` and serves its orders until
/// this agent stops: an ended session is re-established, unless the decode
/// agent holds a session it dialled here (then this dialler waits until
/// that one ends). `ready` fires after the first session is open, with the
/// handshake time.
pub async fn run(agent: Arc<Agent>, addr: String, ready: tokio::sync::oneshot::Sender<anyhow::Result<f64>>) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(50);
    // Since when a decode agent that said goodbye is unreachable, and
    // whether that was worth its one warning.
    let mut gone: Option<(Instant, bool)> = None;
    // The decode agent's id, once a handshake has told it.
    let mut decode_id: Option<String> = None;
    while !agent.is_stopping() {
        if decode_id.as_ref().is_some_and(|id| served_here(&agent, id)) {
            tokio::time::sleep(agent.cfg.lease / 5).await;
            continue;
        }
        match session_once(&agent, &addr, &mut ready, &mut decode_id).await {
            Ok(reason) => {
                // How it ended is logged where the session dropped.
                gone = (!reason.is_failure()).then(|| (Instant::now(), false));
                tracing::debug!(decode = %addr, "re-dialling the decode agent");
                backoff = Duration::from_millis(50);
            }
            Err(e) => {
                tracing::debug!(decode = %addr, error = %e, "cannot reach decode agent yet");
                if let Some(tx) = ready.take_if(|_| is_permanent(&e)) {
                    let _ = tx.send(Err(e));
                    return;
                }
                if let Some((since, warned)) = &mut gone {
                    if !*warned && since.elapsed() >= agent.cfg.lease {
                        *warned = true;
                        tracing::warn!(decode = %addr, error = %e, "the decode agent said goodbye and is still unreachable after a lease; re-dialling");
                    }
                }
            }
        }
        if agent.is_stopping() {
            break;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Whether the decode agent `id` holds a live session it dialled here.
fn served_here(agent: &Agent, id: &str) -> bool {
    let t = side(agent).links.lock().expect("lock");
    t.is_live(id) && !t.is_dialled(id)
}

/// Refusals that retrying cannot fix (version, layout, hooks, bad input, a
/// TLS peer that does not accept our certificate or that we do not accept).
fn is_permanent(e: &anyhow::Error) -> bool {
    let permanent = |k: ErrorKind| matches!(k, ErrorKind::FailedPrecondition | ErrorKind::InvalidArgument | ErrorKind::Unauthenticated);
    // The decode agent's refusals arrive as statuses, this agent's own as
    // AgentError.
    e.downcast_ref::<tonic::Status>().is_some_and(|s| permanent(convert::kind_of_code(s.code() as i32)))
        || e.downcast_ref::<AgentError>().is_some_and(|e| permanent(e.kind()))
        || crate::tls::is_tls_refusal(e)
}

/// One dialled session: handshake, open, serve orders until it ends;
/// returns why.
async fn session_once(
    agent: &Arc<Agent>,
    addr: &str,
    ready: &mut Option<tokio::sync::oneshot::Sender<anyhow::Result<f64>>>,
    decode_id: &mut Option<String>,
) -> anyhow::Result<CloseReason> {
    let Dial::New(dialled) = handshake::dial(agent, addr, |_| false).await? else {
        anyhow::bail!("the dial stopped before its handshake");
    };
    let handshake::Dialled { mut client, admitted, session_id, handshake_ms } = *dialled;
    let decode = admitted.peer;
    *decode_id = Some(decode.agent_id.clone());
    let engine_peer = agent.engine.connect(admitted.spec).await?;
    let link = Arc::new(Link::new(decode.agent_id.clone(), engine_peer));
    let opened = open_stream(agent, &mut client, &link, &session_id).await;
    let down = match opened {
        Ok(down) => down,
        Err(e) => {
            let _ = agent.engine.disconnect(engine_peer).await;
            return Err(e);
        }
    };
    let p = side(agent);
    let (epoch, replaced) = {
        let mut t = p.links.lock().expect("lock");
        let now = Instant::now();
        let (epoch, replaced) = t.admit(&decode.agent_id, session_id.clone(), admitted.layout, link.clone(), now);
        t.mark_dialled(epoch, addr);
        t.open(&session_id, now).expect("a session admitted just now opens");
        (epoch, replaced)
    };
    carry_out(agent, PEER_KIND, replaced).await;
    tracing::info!(decode = %decode.agent_id, %epoch, handshake_ms, decode_ucx = %decode.ucx_version, "session with decode agent open");
    if let Some(tx) = ready.take() {
        let _ = tx.send(Ok(handshake_ms));
    }
    let target = Target { peer: decode.agent_id.clone(), epoch, layout: admitted.layout, io: link };
    Ok(serve_orders(agent, target, down).await)
}

/// Serves the orders of an open session until it ends, then closes it in
/// the table (unless the table closed it); returns why it ended.
async fn serve_orders(agent: &Arc<Agent>, target: Target<Arc<Link>>, mut down: tonic::Streaming<pb::SessionDown>) -> CloseReason {
    let Target { peer: decode, epoch, layout, io: link } = target;
    let _finished = Finished(link.clone());
    let p = side(agent);
    let mut on_close = link.closed.subscribe();
    let reason = loop {
        let msg = tokio::select! {
            r = on_close.wait_for(|r| r.is_some()) => Err(r.ok().and_then(|r| r.clone()).unwrap_or(CloseReason::StreamEnded)),
            m = down.message() => Ok(m),
        };
        let msg = match msg {
            Ok(m) => m,
            Err(reason) => {
                // The table closed it (lease, shutdown); its effects ran there.
                if !reason.is_failure() {
                    // Our goodbye is on its way up: the decode agent ends its
                    // side once it has it. Dropping the stream before would
                    // reset it, goodbye and all.
                    let drained = async { while let Ok(Some(_)) = down.message().await {} };
                    let _ = tokio::time::timeout(GOODBYE_WAIT, drained).await;
                }
                return reason;
            }
        };
        let msg = match msg {
            Ok(Some(pb::SessionDown { msg })) => msg,
            Ok(None) => break CloseReason::StreamEnded,
            Err(e) => break CloseReason::Broken(e.message().to_string()),
        };
        if !p.links.lock().expect("lock").heard(epoch, Instant::now()) {
            continue;
        }
        match msg {
            Some(pb::session_down::Msg::Write(order)) => start_order(agent, &link, &decode, epoch, layout, order),
            Some(pb::session_down::Msg::Cancel(c)) => {
                if let Some(Cancel::Stop(flag)) = p.links.lock().expect("lock").cancel(&c.request_id) {
                    flag.stop();
                }
            }
            Some(pb::session_down::Msg::ReadDone(done)) => {
                tracing::debug!(request_id = %done.request_id, ok = done.ok, "decode agent finished reading; blocks may be freed");
            }
            Some(pb::session_down::Msg::Leases(u)) => agent.sidecar.lease_update(&decode, u),
            Some(pb::session_down::Msg::Claim(c)) => link.try_send(pb::session_up::Msg::Claimed(agent.sidecar.claim(&decode, c))),
            Some(pb::session_down::Msg::Goodbye(g)) => break CloseReason::Goodbye(g.reason),
            Some(pb::session_down::Msg::Heartbeat(_) | pb::session_down::Msg::Open(_)) | None => {}
        }
    };
    let effects = p.links.lock().expect("lock").close(epoch, reason.clone(), Instant::now());
    carry_out(agent, PEER_KIND, effects).await;
    reason
}

/// Faults in our view of the decode region, then opens the session stream.
async fn open_stream(
    agent: &Agent,
    client: &mut pb::peer_client::PeerClient<tonic::transport::Channel>,
    link: &Link,
    session_id: &str,
) -> anyhow::Result<tonic::Streaming<pb::SessionDown>> {
    // Handshake over: now fault in our view of the decode region (sm).
    agent.engine.prefault(link.engine_peer).await?;
    let up = link.sender().ok_or_else(|| anyhow::anyhow!("the session closed before its stream opened"))?;
    let rx = link.take_stream().ok_or_else(|| anyhow::anyhow!("the session's stream is open already"))?;
    up.send(pb::SessionUp { msg: Some(pb::session_up::Msg::Open(pb::SessionOpen { session_id: session_id.to_string() })) }).await?;
    Ok(client.session(ReceiverStream::new(rx)).await?.into_inner())
}

/// Admits a decode agent that dialled this one: its handshake is checked
/// (version, proof, layout, hooks), its engine peer made, and its session
/// waits for its `Serve` stream. A live session with the same decode agent
/// closes first (the decode agent restarted, or it replaces the session
/// this agent dialled; the dialler then stands down).
pub async fn accept(agent: &Arc<Agent>, req: pb::HandshakeRequest) -> Result<pb::HandshakeResponse, AgentError> {
    let admitted = handshake::check_incoming(agent, &req)?;
    let p = side(agent);
    let peer = admitted.peer;
    let replaced = p.links.lock().expect("lock").close_peer(&peer.agent_id, CloseReason::Replaced, Instant::now());
    carry_out(agent, PEER_KIND, replaced).await;
    let engine_peer = agent.engine.connect(admitted.spec).await?;
    let id = handshake::session_id();
    let link = Arc::new(Link::new(peer.agent_id.clone(), engine_peer));
    // A decode agent that never opens its Serve stream is dropped after
    // one lease by the lease tick.
    let (epoch, raced) = p.links.lock().expect("lock").admit(&peer.agent_id, id.clone(), admitted.layout, link, Instant::now());
    carry_out(agent, PEER_KIND, raced).await;
    tracing::info!(decode = %peer.agent_id, session = %id, %epoch, decode_ucx = %peer.ucx_version, "decode agent dialled in; admitted");
    Ok(handshake::answer(agent, &req.nonce, id))
}

/// Opens the session of a decode agent that dialled this one (`accept`):
/// what goes up it comes out of the returned stream, and its orders are
/// served by a task until the session ends.
pub async fn serve(
    agent: &Arc<Agent>,
    session_id: &str,
    down: tonic::Streaming<pb::SessionDown>,
) -> Result<impl tokio_stream::Stream<Item = Result<pb::SessionUp, tonic::Status>>, AgentError> {
    let p = agent.prefill()?;
    let target = p.links.lock().expect("lock").find(session_id)?;
    // Handshake over: now fault in our view of the decode region (sm).
    agent.engine.prefault(target.io.engine_peer).await?;
    p.links.lock().expect("lock").open(session_id, Instant::now())?;
    let rx = target.io.take_stream().ok_or_else(|| AgentError::AlreadyOpen(session_id.into()))?;
    tracing::info!(decode = %target.peer, epoch = %target.epoch, "session with decode agent open (it dialled)");
    let agent = agent.clone();
    tokio::spawn(async move { serve_orders(&agent, target, down).await });
    Ok(ReceiverStream::new(rx).map(Ok))
}

/// How a write order asks for its blocks to be sent.
fn direction(delivery_tag: u64) -> Direction {
    match delivery_tag {
        0 => Direction::Write,
        tag => Direction::Deliver { tag },
    }
}

/// Registers a write order with its session and spawns its execution; an
/// order the table refuses (its request id still executing) is answered
/// with that failure at once.
fn start_order(agent: &Arc<Agent>, link: &Arc<Link>, decode: &str, epoch: Epoch, layout: BlockLayout, order: pb::WriteOrder) {
    let flag = Arc::new(AtomicBool::new(false));
    let kind = RequestKind::Local;
    let started = side(agent).links.lock().expect("lock").start(&order.request_id, decode, epoch, kind, flag.clone());
    match started {
        Ok(seq) => {
            let (agent, link) = (agent.clone(), link.clone());
            tokio::spawn(async move { execute(&agent, link, (epoch, seq), layout, order, flag).await });
        }
        Err(e) => {
            let c = Completion { request_id: order.request_id, order: order.order, result: Err(e.failure()) };
            link.try_send(pb::session_up::Msg::Completion(convert::completion_to_pb(c)));
        }
    }
}

/// Executes one write order and answers with its completion, only after
/// the flush completed, if its session is still open. A delivery is
/// answered only if it failed: the decode agent sees it complete as its
/// bytes land.
async fn execute(
    agent: &Agent,
    link: Arc<Link>,
    (epoch, seq): (Epoch, u64),
    decode_layout: BlockLayout,
    order: pb::WriteOrder,
    flag: Arc<AtomicBool>,
) {
    // An order of published blocks (push mode) writes only once they are
    // held under their id, and ends that published request when it succeeded.
    let claimed = match !order.published_id.is_empty() {
        true => {
            // A peer's hold, bounded: a push waits for its publish at most this long.
            let hold = Duration::from_millis(u64::from(order.hold_ms)).min(MAX_PUSH_HOLD);
            let write_for = agent.cfg.request_timeout;
            agent
                .sidecar
                .claim_for_write(&link.decode_agent, &order.published_id, &order.src_blocks, hold, write_for, &flag)
                .await
                .map(Some)
        }
        false => Ok(None),
    };
    let lease_end = claimed.as_ref().ok().copied().flatten();
    let result = match (claimed, TransferPlan::build(&agent.layout, &order.src_blocks, &decode_layout, &order.dst_blocks, 0)) {
        (Err(f), _) => Err(f),
        (Ok(_), Ok(plan)) => agent
            .engine
            .transfer_cancellable(link.engine_peer, direction(order.delivery_tag), plan.into_ops(), flag)
            .await
            .map(|d| Moved { bytes: d.bytes, ops: d.ops })
            .map_err(|e| AgentError::from(e).failure()),
        (Ok(_), Err(e)) => Err(AgentError::Invalid(e.to_string()).failure()),
    };
    if let Some(lease_end) = lease_end {
        agent.sidecar.push_ended(&link.decode_agent, &order.published_id, result.is_ok(), lease_end);
    }
    let end = {
        let mut t = side(agent).links.lock().expect("lock");
        let end = t.local_done(&order.request_id, seq, result);
        t.record(&link.decode_agent, epoch, &end.outcome, Instant::now());
        end
    };
    let Some(io) = end.notify else {
        // The session ended meanwhile; there is no one to answer.
        tracing::debug!(request_id = %order.request_id, outcome = ?end.outcome, "write order ended after its session");
        return;
    };
    match &end.outcome {
        Ok(_) if order.delivery_tag != 0 => return,
        Ok(_) => {}
        Err(f) if f.kind == ErrorKind::Cancelled => tracing::debug!(request_id = %order.request_id, "write order cancelled"),
        Err(f) => tracing::warn!(request_id = %order.request_id, blocks = order.src_blocks.len(), error = %f.message, "write order failed"),
    }
    let c = Completion { request_id: order.request_id, order: order.order, result: end.outcome };
    if let Some(up) = io.sender() {
        let _ = up.send(pb::SessionUp { msg: Some(pb::session_up::Msg::Completion(convert::completion_to_pb(c))) }).await;
    }
}
