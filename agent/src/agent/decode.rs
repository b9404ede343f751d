//! Decode side: sessions with prefill agents, the handshake that admits
//! them, and the requests submitted through the local API (push: order the
//! prefill agent to write; pull: read, then tell the prefill agent).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvrail_proto::v1 as pb;
use kvrail_transfer::{BlockLayout, Direction, PeerId};
use tokio::sync::{mpsc, oneshot, watch};
use tonic::Status;

use super::Agent;
use super::{convert, validate};

/// Finished requests kept for a late `Wait` before the oldest are dropped.
const MAX_FINISHED: usize = 65_536;

/// One admitted prefill agent.
#[derive(Debug)]
pub struct Session {
    pub id: String,
    pub peer_agent: String,
    pub peer_layout: BlockLayout,
    pub engine_peer: PeerId,
    down: Mutex<Option<mpsc::Sender<Result<pb::SessionDown, Status>>>>,
    pending: Mutex<HashMap<String, oneshot::Sender<pb::Completion>>>,
}

impl Session {
    pub fn send(&self, msg: pb::session_down::Msg) -> Result<(), Status> {
        let tx = self.down.lock().expect("lock").clone();
        let tx = tx.ok_or_else(|| Status::unavailable(format!("prefill agent {} has no open session stream", self.peer_agent)))?;
        tx.try_send(Ok(pb::SessionDown { msg: Some(msg) }))
            .map_err(|_| Status::unavailable(format!("session stream to prefill agent {} is full or closed", self.peer_agent)))
    }

    /// Routes a completion to the request waiting for it.
    pub fn complete(&self, c: pb::Completion) {
        if let Some(tx) = self.pending.lock().expect("lock").remove(&c.request_id) {
            let _ = tx.send(c);
        } else {
            tracing::warn!(request_id = %c.request_id, peer = %self.peer_agent, "completion for an unknown request");
        }
    }

    /// Whether the prefill agent has opened its session stream: only then
    /// can it take orders, so only then is it a peer (`Info`, `Submit`).
    pub fn is_open(&self) -> bool {
        self.down.lock().expect("lock").is_some()
    }

    /// Attaches the stream orders go down.
    pub fn attach(&self, tx: mpsc::Sender<Result<pb::SessionDown, Status>>) {
        *self.down.lock().expect("lock") = Some(tx);
    }

    /// The prefill agent is gone: every pending request fails now.
    pub fn close(&self, why: &str) {
        self.down.lock().expect("lock").take();
        for (id, tx) in self.pending.lock().expect("lock").drain() {
            let _ = tx.send(pb::Completion {
                request_id: id,
                ok: false,
                code: tonic::Code::Unavailable as i32,
                error: why.to_string(),
                ..Default::default()
            });
        }
    }
}

/// Status of a request as `Wait` reports it.
#[derive(Debug, Clone, Default)]
pub struct ReqStatus {
    pub state: i32,
    pub bytes: u64,
    pub ops: u64,
    pub latency_us: u64,
    pub code: i32,
    pub error: String,
}

/// Requests by id, with a bounded memory of finished ones.
#[derive(Debug, Default)]
pub struct Requests {
    inner: Mutex<RequestsInner>,
}

#[derive(Debug, Default)]
struct RequestsInner {
    map: HashMap<String, watch::Sender<ReqStatus>>,
    finished: VecDeque<String>,
    /// How to stop each pending request.
    cancels: HashMap<String, Canceller>,
}

/// How a pending request is stopped.
#[derive(Debug, Clone)]
enum Canceller {
    /// Push: ask the prefill agent to stop writing.
    Write(Arc<Session>),
    /// Pull: stop this agent's own reads.
    Read(Arc<std::sync::atomic::AtomicBool>),
}

/// Where a request's final state goes when its submitter waits for it
/// (`Transfer`, `Transfers`): called once, as the request finishes, and the
/// state is then not kept for `Wait` (as after a `Wait` that returned it).
pub type Answer = Box<dyn FnOnce(ReqStatus) + Send>;

/// A running request, held by whatever finishes it.
struct Running {
    tx: watch::Sender<ReqStatus>,
    answer: Option<Answer>,
}

impl Requests {
    fn insert(&self, id: &str, answer: Option<Answer>) -> Result<Running, Status> {
        let mut g = self.inner.lock().expect("lock");
        if g.map.contains_key(id) {
            return Err(Status::already_exists(format!("request id {id:?} is already in use; wait for it or pick a new id")));
        }
        let (tx, _) = watch::channel(ReqStatus { state: pb::RequestState::Pending as i32, ..Default::default() });
        g.map.insert(id.to_string(), tx.clone());
        Ok(Running { tx, answer })
    }

    fn finish(&self, id: &str, run: Running, st: ReqStatus) {
        let Running { tx, answer } = run;
        // A concurrent `Wait` sees the final state either way.
        tx.send_replace(st.clone());
        let mut g = self.inner.lock().expect("lock");
        g.cancels.remove(id);
        match answer {
            Some(answer) => {
                g.map.remove(id);
                drop(g);
                answer(st);
            }
            None => {
                g.finished.push_back(id.to_string());
                while g.finished.len() > MAX_FINISHED {
                    if let Some(old) = g.finished.pop_front() {
                        g.map.remove(&old);
                    }
                }
            }
        }
    }

    /// Finishes a request that `submit` fails after all (its caller gets
    /// the error, not an answer): the state is kept for `Wait`.
    fn refuse(&self, id: &str, run: Running, st: ReqStatus) {
        self.finish(id, Running { answer: None, ..run }, st);
    }

    /// Waits up to `timeout` for the request to leave `Pending`. A final
    /// state is returned once and then forgotten.
    pub async fn wait(&self, id: &str, timeout: Duration) -> Result<ReqStatus, Status> {
        let mut rx = {
            let g = self.inner.lock().expect("lock");
            g.map.get(id).ok_or_else(|| Status::not_found(format!("no request with id {id:?}")))?.subscribe()
        };
        let pending = pb::RequestState::Pending as i32;
        let waited = match tokio::time::timeout(timeout, rx.wait_for(|s| s.state != pending)).await {
            Ok(Ok(s)) => Some(s.clone()),
            _ => None,
        };
        let st = waited.unwrap_or_else(|| rx.borrow().clone());
        if st.state != pending {
            let mut g = self.inner.lock().expect("lock");
            g.map.remove(id);
            g.finished.retain(|x| x != id);
        }
        Ok(st)
    }

    fn set_canceller(&self, id: &str, c: Canceller) {
        self.inner.lock().expect("lock").cancels.insert(id.to_string(), c);
    }

    /// Asks a pending request to stop; returns its state now.
    pub fn cancel(&self, id: &str) -> Result<i32, Status> {
        let (state, canceller) = {
            let g = self.inner.lock().expect("lock");
            let state = g.map.get(id).ok_or_else(|| Status::not_found(format!("no request with id {id:?}")))?.borrow().state;
            (state, g.cancels.get(id).cloned())
        };
        match canceller {
            Some(Canceller::Write(session)) => {
                session.send(pb::session_down::Msg::Cancel(pb::CancelOrder { request_id: id.to_string() }))?;
            }
            Some(Canceller::Read(flag)) => flag.store(true, std::sync::atomic::Ordering::Relaxed),
            None => {}
        }
        Ok(state)
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("lock").map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Admits a prefill agent: versions, role, layout and hook mode must fit.
pub async fn handshake(agent: &Arc<Agent>, req: pb::HandshakeRequest) -> Result<pb::HandshakeResponse, Status> {
    validate::protocol_version(req.protocol_version)?;
    if agent.cfg.role != super::Role::Decode {
        return Err(Status::failed_precondition("this is a prefill agent; prefill agents handshake with a decode agent"));
    }
    let peer = req.agent.ok_or_else(|| Status::invalid_argument("agent is missing"))?;
    // Nothing about this agent's region leaves before the peer has proven
    // it holds the cluster secret.
    if let Some(secret) = &agent.cfg.secret {
        if !agent.nonces.take(&req.nonce) {
            return Err(Status::unauthenticated("handshake nonce unknown or expired: call Challenge first, then Handshake within 30 s"));
        }
        if !secret.check("prefill", &req.nonce, &peer, &req.auth_proof) {
            tracing::warn!(peer = %peer.agent_id, "handshake refused: wrong cluster secret");
            return Err(Status::unauthenticated("handshake proof does not match: the agents do not share the cluster secret"));
        }
    }
    let (layout, spec) = validate::admit(&peer, &agent.layout, agent.cfg.allow_hooks)?;
    // A restarted peer replaces its old session.
    let old: Vec<Arc<Session>> = {
        let mut s = agent.sessions.lock().expect("lock");
        let ids: Vec<String> = s.values().filter(|x| x.peer_agent == peer.agent_id).map(|x| x.id.clone()).collect();
        ids.iter().filter_map(|id| s.remove(id)).collect()
    };
    for o in old {
        o.close("the prefill agent re-handshaked (restarted); its earlier requests are void");
        let _ = agent.engine.disconnect(o.engine_peer).await;
    }
    let engine_peer = agent.engine.connect(spec).await.map_err(|e| convert::status_of(&e))?;
    let id = format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>());
    let session = Arc::new(Session {
        id: id.clone(),
        peer_agent: peer.agent_id.clone(),
        peer_layout: layout,
        engine_peer,
        down: Mutex::new(None),
        pending: Mutex::new(HashMap::new()),
    });
    agent.sessions.lock().expect("lock").insert(id.clone(), session);
    // A prefill agent that never opens its session stream (it died right
    // after its handshake) is dropped after one lease, endpoint and all.
    // The timer holds the session's id only, not the session.
    let (a, lease, sid) = (agent.clone(), agent.cfg.lease, id.clone());
    tokio::spawn(async move {
        tokio::time::sleep(lease).await;
        let unopened = {
            let mut s = a.sessions.lock().expect("lock");
            let stale = s.get(&sid).is_some_and(|x| !x.is_open());
            stale.then(|| s.remove(&sid)).flatten()
        };
        if let Some(x) = unopened {
            tracing::warn!(peer = %x.peer_agent, session = %x.id, "prefill agent never opened its session stream within its lease; dropped");
            let _ = a.engine.disconnect(x.engine_peer).await;
        }
    });
    tracing::info!(peer = %peer.agent_id, session = %id, peer_ucx = %peer.ucx_version, peer_hooks = %convert::hook_mode_name(peer.hook_mode), "prefill agent admitted");
    let info = agent.info();
    let auth_proof = agent.cfg.secret.as_ref().map(|s| s.prove("decode", &req.nonce, &info)).unwrap_or_default();
    Ok(pb::HandshakeResponse { protocol_version: kvrail_proto::PROTOCOL_VERSION, agent: Some(info), session_id: id, auth_proof })
}

/// Picks the session a request names (or the only one). A prefill agent
/// that has handshaked but not yet opened its session stream cannot take
/// orders: it is not picked, and naming it is `Unavailable` (retry).
fn session_for(agent: &Agent, peer: &str) -> Result<Arc<Session>, Status> {
    let s = agent.sessions.lock().expect("lock");
    if peer.is_empty() {
        let mut open = s.values().filter(|x| x.is_open());
        return match (open.next(), open.next()) {
            (Some(one), None) => Ok(one.clone()),
            (None, _) if s.is_empty() => Err(Status::failed_precondition("no prefill agent is connected")),
            (None, _) => Err(Status::unavailable("a prefill agent has handshaked but not yet opened its session stream; retry")),
            _ => Err(Status::invalid_argument("several prefill agents are connected; name one in `peer`")),
        };
    }
    let named = s.values().find(|x| x.peer_agent == peer).cloned();
    match named {
        Some(x) if x.is_open() => Ok(x),
        Some(_) => Err(Status::unavailable(format!("prefill agent {peer:?} has handshaked but not yet opened its session stream; retry"))),
        None => Err(Status::not_found(format!("no connected prefill agent is named {peer:?}"))),
    }
}

/// Validates and starts a transfer. Nothing is written before every field
/// has been checked. With an `answer`, the final state goes there (exactly
/// once if this returns `Ok`, never if it fails).
pub async fn submit(agent: &Arc<Agent>, req: pb::SubmitRequest, answer: Option<Answer>) -> Result<pb::SubmitResponse, Status> {
    if agent.cfg.role != super::Role::Decode {
        return Err(Status::failed_precondition("submit transfers on the decode agent; this is a prefill agent"));
    }
    let mode = validate::submit_header(&req)?;
    let session = session_for(agent, &req.peer)?;
    // Where UCX emulates RMA in software (tcp), the target of an emulated
    // get is the prefill agent, and it can be aborted inside UCX if this
    // agent dies mid-read. There both modes are deliveries: the prefill
    // agent sends, this agent never answers in UCX, and accepts the bytes
    // only into this request's destination blocks (the byte ranges a read
    // plan would fill).
    let deliver = agent.cfg.transport.writes_as_messages();
    let plan_mode = if deliver { pb::TransferMode::Read } else { mode };
    let ops = validate::submit_blocks(&req, plan_mode, &session.peer_layout, &agent.layout)?;
    let (pull, into) =
        if deliver { (None, ops.map(|ops| ops.iter().map(|o| o.dst_offset..o.dst_offset + o.len).collect())) } else { (ops, None) };
    let run = agent.requests.insert(&req.request_id, answer)?;
    let started = Instant::now();
    let id = req.request_id.clone();
    match pull {
        None => {
            let delivery = match into {
                Some(into) => match agent.engine.expect(into) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        let s = convert::status_of(&e);
                        agent.requests.refuse(&id, run, failed(started, s.code() as i32, s.message().to_string()));
                        return Err(s);
                    }
                },
                None => None,
            };
            let (done_tx, done_rx) = oneshot::channel();
            session.pending.lock().expect("lock").insert(id.clone(), done_tx);
            agent.requests.set_canceller(&id, Canceller::Write(session.clone()));
            let order = pb::WriteOrder {
                request_id: id.clone(),
                src_blocks: req.src_blocks,
                dst_blocks: req.dst_blocks,
                delivery_tag: delivery.as_ref().map_or(0, |d| d.tag()),
            };
            if let Err(e) = session.send(pb::session_down::Msg::Write(order)) {
                session.pending.lock().expect("lock").remove(&id);
                if let Some(d) = delivery {
                    d.close().await;
                }
                agent.requests.refuse(&id, run, failed(started, e.code() as i32, e.message().to_string()));
                return Err(e);
            }
            let (agent, timeout) = (agent.clone(), agent.cfg.request_timeout);
            tokio::spawn(async move {
                let st = match delivery {
                    Some(d) => delivered(d, done_rx, timeout, started).await,
                    None => written(done_rx, timeout, started).await,
                };
                // A completion that never came (the deadline passed) must
                // not stay routed; after a delivery it was never sent.
                session.pending.lock().expect("lock").remove(&id);
                agent.requests.finish(&id, run, st);
            });
        }
        Some(ops) => {
            let agent = agent.clone();
            let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
            agent.requests.set_canceller(&id, Canceller::Read(flag.clone()));
            tokio::spawn(async move {
                let timeout = agent.cfg.request_timeout;
                let res =
                    tokio::time::timeout(timeout, agent.engine.transfer_cancellable(session.engine_peer, Direction::Read, ops, flag)).await;
                let st = match res {
                    Ok(Ok(d)) => ReqStatus {
                        state: pb::RequestState::Done as i32,
                        bytes: d.bytes,
                        ops: d.ops,
                        latency_us: started.elapsed().as_micros() as u64,
                        ..Default::default()
                    },
                    Ok(Err(e)) => {
                        let s = convert::status_of(&e);
                        failed(started, s.code() as i32, s.message().to_string())
                    }
                    Err(_) => failed(started, tonic::Code::DeadlineExceeded as i32, format!("read not finished within {timeout:?}")),
                };
                let ok = st.state == pb::RequestState::Done as i32;
                let _ = session.send(pb::session_down::Msg::ReadDone(pb::ReadDone { request_id: id.clone(), ok, error: st.error.clone() }));
                agent.requests.finish(&id, run, st);
            });
        }
    }
    Ok(pb::SubmitResponse { request_id: req.request_id })
}

/// A push by RMA puts: done when the prefill agent's Completion says so.
async fn written(done_rx: oneshot::Receiver<pb::Completion>, timeout: Duration, started: Instant) -> ReqStatus {
    match tokio::time::timeout(timeout, done_rx).await {
        Ok(Ok(c)) if c.ok => ReqStatus {
            state: pb::RequestState::Done as i32,
            bytes: c.bytes,
            ops: c.ops,
            latency_us: started.elapsed().as_micros() as u64,
            ..Default::default()
        },
        Ok(Ok(c)) => failed(started, c.code, c.error),
        Ok(Err(_)) => session_ended(started),
        Err(_) => failed(started, tonic::Code::DeadlineExceeded as i32, format!("no completion within {timeout:?}")),
    }
}

/// A push by delivery (tcp): done when every byte landed in its tag, which
/// this agent's engine counts; the prefill agent answers only a failure.
/// The tag closes before the request's state is set: nothing lands in its
/// blocks after a failure is reported.
async fn delivered(
    mut d: kvrail_transfer::Expected,
    done_rx: oneshot::Receiver<pb::Completion>,
    timeout: Duration,
    started: Instant,
) -> ReqStatus {
    let st = tokio::select! {
        r = d.arrived(timeout) => match r {
            Ok(a) => ReqStatus {
                state: pb::RequestState::Done as i32,
                bytes: a.bytes,
                ops: a.ops,
                latency_us: started.elapsed().as_micros() as u64,
                ..Default::default()
            },
            Err(e) => failed(started, convert::status_of(&e).code() as i32, e.to_string()),
        },
        c = done_rx => match c {
            Ok(c) if c.ok => failed(
                started,
                tonic::Code::Internal as i32,
                "the prefill agent reported a delivery done before every byte landed".into(),
            ),
            Ok(c) => failed(started, c.code, c.error),
            Err(_) => session_ended(started),
        },
    };
    d.close().await;
    st
}

fn session_ended(started: Instant) -> ReqStatus {
    failed(started, tonic::Code::Unavailable as i32, "the session ended before the request completed".into())
}

fn failed(started: Instant, code: i32, error: String) -> ReqStatus {
    ReqStatus {
        state: pb::RequestState::Failed as i32,
        latency_us: started.elapsed().as_micros() as u64,
        code,
        error,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(bytes: u64) -> ReqStatus {
        ReqStatus { state: pb::RequestState::Done as i32, bytes, ..Default::default() }
    }

    #[tokio::test]
    async fn an_answered_request_is_answered_once_and_then_forgotten() {
        let r = Requests::default();
        let short = Duration::from_millis(1);
        let (tx, rx) = std::sync::mpsc::channel();
        let answer: Answer = Box::new(move |st| tx.send(st).unwrap());
        let run = r.insert("a", Some(answer)).unwrap();
        assert_eq!(r.insert("a", None).err().map(|s| s.code()), Some(tonic::Code::AlreadyExists), "the id is in use while it runs");
        assert_eq!(r.wait("a", short).await.unwrap().state, pb::RequestState::Pending as i32);
        r.finish("a", run, done(7));
        assert_eq!(rx.try_recv().unwrap().bytes, 7);
        assert!(rx.try_recv().is_err(), "answered once");
        assert_eq!(r.wait("a", short).await.unwrap_err().code(), tonic::Code::NotFound, "its caller has it; not kept for Wait");

        // Without an answer the final state waits for a Wait, once.
        let run = r.insert("b", None).unwrap();
        r.finish("b", run, done(9));
        assert_eq!(r.wait("b", short).await.unwrap().bytes, 9);
        assert_eq!(r.wait("b", short).await.unwrap_err().code(), tonic::Code::NotFound);

        // A request submit fails after all: its caller gets the error, the
        // answer is never called, and Wait still sees the failure.
        let (tx, rx) = std::sync::mpsc::channel::<ReqStatus>();
        let run = r.insert("c", Some(Box::new(move |st| tx.send(st).unwrap()))).unwrap();
        r.refuse("c", run, failed(Instant::now(), tonic::Code::Unavailable as i32, "gone".into()));
        assert!(matches!(rx.try_recv(), Err(std::sync::mpsc::TryRecvError::Disconnected)), "dropped, not called");
        assert_eq!(r.wait("c", short).await.unwrap().code, tonic::Code::Unavailable as i32);
        assert!(r.is_empty());
    }
}
