//! Prefill side: dial a decode agent, handshake, keep its session open,
//! and execute the write orders that arrive on it (plan, put, flush, then
//! report completion). Re-handshakes when the session ends; a decode agent
//! that said goodbye is re-dialled quietly.
//!
//! Its sessions live in the same kind of table as the decode side's
//! (`session`), keyed by decode agent id, with the orders in execution as
//! the requests pending on them: one entry today, many when a prefill
//! agent serves several decode agents.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvrail_proto::v1 as pb;
use kvrail_transfer::plan::TransferPlan;
use kvrail_transfer::{BlockLayout, Direction, PeerId};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use super::effects::{carry_out, RequestWaiter, SessionIo};
use super::error::{AgentError, ErrorKind, Failure};
use super::session::{Cancel, CloseReason, Completion, Effect, Epoch, Moved, RequestKind, SessionTable};
use super::{convert, validate, Agent};

/// How this side names its peers.
pub const PEER_KIND: &str = "decode agent";

/// Longest a stopping agent waits for a decode agent to end its side of
/// the session after the goodbye.
const GOODBYE_WAIT: Duration = Duration::from_secs(2);

/// The prefill side's handle of one decode agent's session.
#[derive(Debug)]
pub struct Link {
    pub decode_agent: String,
    pub engine_peer: PeerId,
    up: Mutex<Option<mpsc::Sender<pb::SessionUp>>>,
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
        let effects = self.links.lock().expect("lock").close_all("the prefill agent is shutting down", Instant::now());
        let links: Vec<Arc<Link>> = effects
            .iter()
            .filter_map(|e| match e {
                Effect::Drop { io, .. } => Some(io.clone()),
                _ => None,
            })
            .collect();
        carry_out(agent, PEER_KIND, effects).await;
        for link in links {
            let mut finished = link.finished.subscribe();
            let _ = tokio::time::timeout(GOODBYE_WAIT, finished.wait_for(|f| *f)).await;
        }
    }
}

fn side(agent: &Agent) -> &PrefillSide {
    agent.prefill().expect("a prefill agent's task")
}

/// Handshakes with the decode agent at `addr` and serves its orders until
/// this agent stops: an ended session is re-established. `ready` fires
/// after the first session is open, with the handshake time.
pub async fn run(agent: Arc<Agent>, addr: String, ready: tokio::sync::oneshot::Sender<anyhow::Result<f64>>) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(50);
    // Since when a decode agent that said goodbye is unreachable, and
    // whether that was worth its one warning.
    let mut gone: Option<(Instant, bool)> = None;
    while !agent.is_stopping() {
        match session_once(&agent, &addr, &mut ready).await {
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

/// One session: handshake, open, serve orders until it ends; returns why.
async fn session_once(
    agent: &Arc<Agent>,
    addr: &str,
    ready: &mut Option<tokio::sync::oneshot::Sender<anyhow::Result<f64>>>,
) -> anyhow::Result<CloseReason> {
    let t0 = Instant::now();
    let channel = crate::tls::endpoint(addr, agent.cfg.tls.as_ref())?.connect_timeout(Duration::from_secs(2)).connect().await?;
    let mut client = pb::peer_client::PeerClient::new(channel);
    let nonce = client.challenge(pb::ChallengeRequest { agent_id: agent.cfg.agent_id.clone() }).await?.into_inner().nonce;
    let info = agent.info();
    let auth_proof = agent.cfg.secret.as_ref().map(|s| s.prove("prefill", &nonce, &info)).unwrap_or_default();
    let resp = client
        .handshake(pb::HandshakeRequest {
            protocol_version: kvrail_proto::PROTOCOL_VERSION,
            agent: Some(info),
            nonce: nonce.clone(),
            auth_proof,
        })
        .await?
        .into_inner();
    let decode = resp.agent.ok_or_else(|| anyhow::anyhow!("decode agent answered the handshake without its AgentInfo"))?;
    if let Some(secret) = &agent.cfg.secret {
        if !secret.check("decode", &nonce, &decode, &resp.auth_proof) {
            return Err(AgentError::Unauthenticated(
                "the decode agent did not prove the cluster secret; refusing to write into its region".into(),
            )
            .into());
        }
    }
    let layout = convert::layout_from_pb(decode.layout.as_ref())?;
    agent.layout.check_compatible(&layout)?;
    validate::memory_pairing(&agent.memory_side(), &convert::memory_side(&decode)?)?;
    let spec = convert::peer_spec(&decode, &layout)?;
    let engine_peer = agent.engine.connect(spec).await?;
    let handshake_ms = t0.elapsed().as_secs_f64() * 1e3;
    let opened = open_stream(agent, &mut client, engine_peer, &resp.session_id).await;
    let (up, mut down) = match opened {
        Ok(pair) => pair,
        Err(e) => {
            let _ = agent.engine.disconnect(engine_peer).await;
            return Err(e);
        }
    };
    let (closed, mut on_close) = watch::channel(None);
    let link = Arc::new(Link {
        decode_agent: decode.agent_id.clone(),
        engine_peer,
        up: Mutex::new(Some(up)),
        closed,
        finished: watch::channel(false).0,
    });
    let _finished = Finished(link.clone());
    let p = side(agent);
    let (epoch, replaced) = {
        let mut t = p.links.lock().expect("lock");
        let now = Instant::now();
        let (epoch, replaced) = t.admit(&decode.agent_id, resp.session_id.clone(), layout, link.clone(), now);
        t.open(&resp.session_id, now).expect("a session admitted just now opens");
        (epoch, replaced)
    };
    carry_out(agent, PEER_KIND, replaced).await;
    tracing::info!(decode = %decode.agent_id, %epoch, handshake_ms, decode_ucx = %decode.ucx_version, "session with decode agent open");
    if let Some(tx) = ready.take() {
        let _ = tx.send(Ok(handshake_ms));
    }
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
                return Ok(reason);
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
            Some(pb::session_down::Msg::Write(order)) => start_order(agent, &link, &decode.agent_id, epoch, layout, order),
            Some(pb::session_down::Msg::Cancel(c)) => {
                if let Some(Cancel::Stop(flag)) = p.links.lock().expect("lock").cancel(&c.request_id) {
                    flag.stop();
                }
            }
            Some(pb::session_down::Msg::ReadDone(done)) => {
                tracing::debug!(request_id = %done.request_id, ok = done.ok, "decode agent finished reading; blocks may be freed");
            }
            Some(pb::session_down::Msg::Goodbye(g)) => break CloseReason::Goodbye(g.reason),
            Some(pb::session_down::Msg::Heartbeat(_)) | None => {}
        }
    };
    let effects = p.links.lock().expect("lock").close(epoch, reason.clone(), Instant::now());
    carry_out(agent, PEER_KIND, effects).await;
    Ok(reason)
}

/// Faults in our view of the decode region, then opens the session stream.
async fn open_stream(
    agent: &Agent,
    client: &mut pb::peer_client::PeerClient<tonic::transport::Channel>,
    engine_peer: PeerId,
    session_id: &str,
) -> anyhow::Result<(mpsc::Sender<pb::SessionUp>, tonic::Streaming<pb::SessionDown>)> {
    // Handshake over: now fault in our view of the decode region (sm).
    agent.engine.prefault(engine_peer).await?;
    let (up, up_rx) = mpsc::channel(4096);
    up.send(pb::SessionUp { msg: Some(pb::session_up::Msg::Open(pb::SessionOpen { session_id: session_id.to_string() })) }).await?;
    let down = client.session(ReceiverStream::new(up_rx)).await?.into_inner();
    Ok((up, down))
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
            tokio::spawn(async move { execute(&agent, link, seq, layout, order, flag).await });
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
async fn execute(agent: &Agent, link: Arc<Link>, seq: u64, decode_layout: BlockLayout, order: pb::WriteOrder, flag: Arc<AtomicBool>) {
    let result = match TransferPlan::build(&agent.layout, &order.src_blocks, &decode_layout, &order.dst_blocks, 0) {
        Ok(plan) => agent
            .engine
            .transfer_cancellable(link.engine_peer, direction(order.delivery_tag), plan.into_ops(), flag)
            .await
            .map(|d| Moved { bytes: d.bytes, ops: d.ops })
            .map_err(|e| AgentError::from(e).failure()),
        Err(e) => Err(AgentError::Invalid(e.to_string()).failure()),
    };
    let end = side(agent).links.lock().expect("lock").local_done(&order.request_id, seq, result);
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
