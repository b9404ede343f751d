//! The `kvrail.v1.Sidecar` service (`proto/kvrail/v1/sidecar.proto`): the
//! local API an inference engine's KV connector calls on its own agent, over
//! the agent's owner-only Unix socket (docs/design/vllm-sidecar.md).
//!
//! - AttachRegion hands the agent the engine's KV cache: a shared file sent
//!   over the side socket (`fdpass`), mapped `MAP_SHARED` and registered
//!   with UCX once. An agent started with `--region-from-client` waits for
//!   it before it starts its engine and its TCP port.
//! - A prefill agent holds Published requests under a lease (`published`)
//!   until the decode side has read them, released them, or the lease ran
//!   out; Poll reports each as `finished_sending` once.
//! - A decode agent Pulls a request's blocks from the prefill agent that
//!   holds them (a read over the session with that agent), then tells it
//!   they were read; Release and Heartbeat reach it the same way. Poll
//!   reports each pull once in `finished_recving`, and failed ones also in
//!   `failed_recving` with their local blocks as invalid.
//! - Push mode: a decode agent told to ExpectPush holds the local blocks
//!   for the request (`expected`, under a lease) and sends the prefill
//!   agent a write order naming the published request; the prefill agent
//!   writes once the request is published there (waiting for it within the
//!   order's hold) and then ends it as pushed. Poll reports the push like
//!   a pull; a lease that runs out stops the write first.

pub mod attach;
pub mod expected;
pub mod fdpass;
pub mod published;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvrail_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::agent::decode::{dial, Link, RequestState};
use crate::agent::error::{AgentError, ErrorKind, Failure};
use crate::agent::session::Target;
use crate::agent::{decode, Agent, Role};
use published::{Ended, Published};

/// Longest a decode agent waits for the prefill agent to answer a claim.
const CLAIM_TIMEOUT: Duration = Duration::from_secs(5);

/// What an agent keeps for its engine's connector.
#[derive(Debug, Default)]
pub struct SidecarState {
    /// The engine whose region this agent serves, when it attached one.
    pub attached: Option<attach::Wanted>,
    published: Mutex<Published>,
    /// Prefill side: woken by every Publish, for write orders that wait for theirs.
    publishes: tokio::sync::Notify,
    /// Decode side: the local blocks of pushes expected (push mode).
    expected: Mutex<expected::Expected>,
    pulls: Mutex<Pulls>,
    /// Decode side: claims sent, waiting for their answer, by claim id.
    claims: Mutex<HashMap<u64, oneshot::Sender<pb::Claimed>>>,
    next_claim: AtomicU64,
}

/// Pulls that ended since the last Poll.
#[derive(Debug, Default)]
struct Pulls {
    finished: Vec<String>,
    failed: Vec<pb::FailedRequest>,
    invalid: Vec<u32>,
}

impl SidecarState {
    pub fn new(attached: Option<attach::Wanted>) -> SidecarState {
        SidecarState { attached, ..SidecarState::default() }
    }

    /// A decode agent's word on requests this (prefill) agent published.
    pub fn lease_update(&self, from: &str, u: pb::LeaseUpdate) {
        let mut p = self.published.lock().expect("lock");
        let now = Instant::now();
        for (ids, how) in [(u.read, Ended::Read), (u.released, Ended::Released)] {
            for id in ids {
                if let Err(e) = p.end(&id, how) {
                    tracing::info!(decode_agent = from, error = %e, "a decode agent named a request that is not held");
                }
            }
        }
        for id in p.extend(&u.extend, now) {
            tracing::info!(decode_agent = from, request_id = %id, "heartbeat for a request that is not held");
        }
    }
}

impl SidecarState {
    /// Prefill side: a decode agent is about to read published blocks.
    pub fn claim(&self, from: &str, c: pb::Claim) -> pb::Claimed {
        let hold = Duration::from_millis(u64::from(c.hold_ms));
        let mut p = self.published.lock().expect("lock");
        p.expire(Instant::now());
        match p.claim(&c.published_id, &c.blocks, hold, Instant::now()) {
            Ok(_) => pb::Claimed { claim_id: c.claim_id, code: 0, error: String::new() },
            Err(e) => {
                tracing::info!(decode_agent = from, error = %e, "refused a claim");
                pb::Claimed { claim_id: c.claim_id, code: crate::agent::convert::code_of(e.kind()) as i32, error: e.to_string() }
            }
        }
    }

    /// Prefill side: a write order of published blocks (push mode) from
    /// decode agent `from`. Waits up to `hold` (while `stop` is unset) for
    /// every block of `blocks` to be held under `id`, then holds them for
    /// the write (`write_for`) and returns when its lease ended before.
    /// Refused, to be written nowhere: the request not published within
    /// `hold`, a block it did not publish, `stop` set.
    pub async fn claim_for_write(
        &self,
        from: &str,
        id: &str,
        blocks: &[u32],
        hold: Duration,
        write_for: Duration,
        stop: &AtomicBool,
    ) -> Result<Instant, Failure> {
        crate::agent::validate::check_id("published_id", id).map_err(|e| e.failure())?;
        let deadline = Instant::now() + hold;
        loop {
            // Armed before the check, so a publish in between is not missed.
            let published = self.publishes.notified();
            tokio::pin!(published);
            published.as_mut().enable();
            if stop.load(Ordering::Relaxed) {
                return Err(Failure::new(ErrorKind::Cancelled, format!("the push of {id:?} was stopped before it was written")));
            }
            let now = Instant::now();
            let claimed = {
                let mut p = self.published.lock().expect("lock");
                p.expire(now);
                p.claim(id, blocks, write_for, now)
            };
            match claimed {
                Ok(lease_end) => return Ok(lease_end),
                Err(e) if e.kind() == ErrorKind::NotFound && now < deadline => {}
                Err(e) => {
                    tracing::info!(decode_agent = from, error = %e, "refused a push");
                    let waited = if e.kind() == ErrorKind::NotFound {
                        format!(" (waited {} ms for its publish)", hold.as_millis())
                    } else {
                        String::new()
                    };
                    return Err(Failure::new(e.kind(), format!("prefill side: {e}{waited}")));
                }
            }
            // Bounded by the hold; wakes at least every 50 ms to see `stop`.
            let nap = deadline.saturating_duration_since(now).min(Duration::from_millis(50));
            let _ = tokio::time::timeout(nap, published).await;
        }
    }

    /// Prefill side: how the push of `id` claimed with
    /// [`SidecarState::claim_for_write`] ended: done if it succeeded, else
    /// held on to the end of its lease (`lease_end`) as if never claimed.
    pub fn push_ended(&self, from: &str, id: &str, ok: bool, lease_end: Instant) {
        let mut p = self.published.lock().expect("lock");
        if !ok {
            p.unclaim(id, lease_end);
            return;
        }
        if let Err(e) = p.end(id, Ended::Pushed) {
            tracing::info!(decode_agent = from, error = %e, "a pushed request was no longer held");
        }
    }

    /// Decode side: the answer to a claim this agent sent.
    pub fn claimed(&self, c: pb::Claimed) {
        if let Some(tx) = self.claims.lock().expect("lock").remove(&c.claim_id) {
            let _ = tx.send(c);
        }
    }

    /// Decode side: asks the prefill agent on `target` to hold `blocks` of
    /// `published_id` for a read of at most `hold`; fails, reading nothing,
    /// if it does not hold them (or does not answer within [`CLAIM_TIMEOUT`]).
    async fn claim_for_read(&self, target: &Target<Link>, published_id: &str, blocks: &[u32], hold: Duration) -> Result<(), Status> {
        let claim_id = self.next_claim.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.claims.lock().expect("lock").insert(claim_id, tx);
        let msg = pb::Claim {
            claim_id,
            published_id: published_id.to_string(),
            blocks: blocks.to_vec(),
            hold_ms: u32::try_from(hold.as_millis()).unwrap_or(u32::MAX),
        };
        let answer = match target.io.send(pb::session_down::Msg::Claim(msg)) {
            Ok(()) => tokio::time::timeout(CLAIM_TIMEOUT, rx).await,
            Err(e) => {
                self.claims.lock().expect("lock").remove(&claim_id);
                return Err(e.into());
            }
        };
        self.claims.lock().expect("lock").remove(&claim_id);
        match answer {
            Ok(Ok(c)) if c.code == 0 => Ok(()),
            Ok(Ok(c)) => Err(Status::new(tonic::Code::from(c.code), format!("prefill agent {:?}: {}", target.peer, c.error))),
            Ok(Err(_)) => {
                Err(Status::unavailable(format!("the session with prefill agent {:?} ended before it answered the claim", target.peer)))
            }
            Err(_) => Err(Status::unavailable(format!(
                "prefill agent {:?} did not answer the claim of {published_id:?} within {} s",
                target.peer,
                CLAIM_TIMEOUT.as_secs()
            ))),
        }
    }
}

/// A region an engine attached before the agent started, with where to
/// say how starting on it went.
#[derive(Debug)]
pub struct AttachCall {
    pub wanted: attach::Wanted,
    /// The shared file of a host region.
    pub fd: Option<std::os::fd::OwnedFd>,
    pub reply: oneshot::Sender<Result<pb::AttachRegionResponse, AgentError>>,
}

/// The service. Before an agent with `--region-from-client` has its region
/// the only call it takes is AttachRegion, which it passes to `gate`.
#[derive(Debug, Clone)]
pub struct SidecarService {
    agent: Arc<OnceLock<Arc<Agent>>>,
    role: Role,
    gate: Option<mpsc::Sender<AttachCall>>,
    inbox: fdpass::FdInbox,
    attaching: Arc<Mutex<bool>>,
    /// Started with `--memory cuda-ipc`: the region is the engine's GPU allocation.
    cuda_ipc: bool,
}

impl SidecarService {
    /// For an agent that has its region already.
    pub fn started(agent: Arc<Agent>) -> SidecarService {
        let role = agent.cfg.role;
        SidecarService {
            agent: Arc::new(OnceLock::from(agent)),
            role,
            gate: None,
            inbox: Default::default(),
            attaching: Default::default(),
            cuda_ipc: false,
        }
    }

    /// For an agent that waits for its engine's region: AttachRegion calls
    /// go to `gate` with the descriptor from `inbox`; the agent is set in
    /// `agent` once it runs.
    pub fn waiting(
        agent: Arc<OnceLock<Arc<Agent>>>,
        role: Role,
        gate: mpsc::Sender<AttachCall>,
        inbox: fdpass::FdInbox,
        cuda_ipc: bool,
    ) -> SidecarService {
        SidecarService { agent, role, gate: Some(gate), inbox, attaching: Default::default(), cuda_ipc }
    }

    fn agent(&self) -> Result<&Arc<Agent>, Status> {
        self.agent.get().ok_or_else(|| Status::failed_precondition("no region is attached yet: call AttachRegion first"))
    }

    fn in_role(&self, role: Role, call: &str) -> Result<&Arc<Agent>, Status> {
        let agent = self.agent()?;
        if agent.cfg.role != role {
            return Err(Status::failed_precondition(format!(
                "{call} is a {} agent's call; this is a {} agent",
                role.as_str(),
                agent.cfg.role.as_str()
            )));
        }
        Ok(agent)
    }

    async fn attach(&self, req: pb::AttachRegionRequest) -> Result<pb::AttachRegionResponse, AgentError> {
        if let Some(agent) = self.agent.get() {
            return Err(match &agent.sidecar.attached {
                Some(w) => AgentError::Failed(crate::agent::error::Failure::new(
                    crate::agent::error::ErrorKind::AlreadyExists,
                    format!("engine {:?} attached this agent's region already; one region per agent", w.engine_id),
                )),
                None => AgentError::Precondition("this agent has a region of its own (started without --region-from-client)".into()),
            });
        }
        let wanted = attach::check(&req, self.role, self.cuda_ipc)?;
        let gate = self.gate.as_ref().ok_or_else(|| AgentError::Precondition("this agent takes no region from its client".into()))?;
        {
            let mut busy = self.attaching.lock().expect("lock");
            if *busy {
                return Err(AgentError::Precondition("another AttachRegion is being served; wait for its answer".into()));
            }
            *busy = true;
        }
        let result = async {
            let fd = match &wanted.source {
                attach::Source::HostFd { token } => Some(self.inbox.take(token).ok_or_else(|| {
                    AgentError::Precondition(format!(
                        "no descriptor waits under token {token:?}: send it to the side socket first (it waits {} s)",
                        fdpass::TOKEN_TTL.as_secs()
                    ))
                })?),
                attach::Source::CudaIpc { .. } => None,
            };
            let (reply, answer) = oneshot::channel();
            gate.send(AttachCall { wanted, fd, reply }).await.map_err(|_| AgentError::ShuttingDown(self.role.as_str()))?;
            answer.await.map_err(|_| AgentError::ShuttingDown(self.role.as_str()))?
        }
        .await;
        *self.attaching.lock().expect("lock") = false;
        result
    }
}

/// A group list as the one group kvrail maps, or why not.
fn one_group(what: &str, groups: &[pb::BlockIds]) -> Result<Vec<u32>, Status> {
    match groups {
        [g] => Ok(g.ids.clone()),
        _ => Err(Status::invalid_argument(format!("{what}: {} block groups given; the region has one", groups.len()))),
    }
}

/// What a pull and a push name: this side's request and blocks, the
/// prefill agent and its published request and blocks.
struct Moved<'a> {
    request_id: &'a str,
    remote_agent_id: &'a str,
    remote_address: &'a str,
    remote_request_id: &'a str,
    local_blocks: &'a [pb::BlockIds],
    remote_blocks: &'a [pb::BlockIds],
}

/// The [`Moved`] of a Pull or an ExpectPush request (fields of one name).
macro_rules! moved {
    ($r:expr) => {
        Moved {
            request_id: &$r.request_id,
            remote_agent_id: &$r.remote_agent_id,
            remote_address: &$r.remote_address,
            remote_request_id: &$r.remote_request_id,
            local_blocks: &$r.local_blocks,
            remote_blocks: &$r.remote_blocks,
        }
    };
}

/// The checks a pull and a push share, before anything is held or sent:
/// one group a side, the ids, the session with the prefill agent (dialled
/// on the first call naming it, reused after), and every block against
/// both layouts. The request to submit, and its session.
async fn checked(agent: &Arc<Agent>, m: Moved<'_>, mode: pb::TransferMode) -> Result<(Target<Link>, pb::SubmitRequest), Status> {
    let local = one_group("local_blocks", m.local_blocks)?;
    let remote = one_group("remote_blocks", m.remote_blocks)?;
    crate::agent::validate::check_id("remote_request_id", m.remote_request_id)?;
    crate::agent::validate::check_id("request_id", m.request_id)?;
    let target = dial::target(agent, m.remote_agent_id, m.remote_address).await?;
    let submit = pb::SubmitRequest {
        request_id: m.request_id.to_string(),
        peer: target.peer.clone(),
        mode: mode as i32,
        src_blocks: remote,
        dst_blocks: local,
        peer_address: m.remote_address.to_string(),
    };
    crate::agent::validate::submit(&submit, &target.layout, &agent.layout)?;
    Ok((target, submit))
}

/// Records how a pull or a push ended for `Poll`: finished, and if it
/// failed, why and its local blocks as invalid.
fn record_end(agent: &Agent, id: String, failed: Option<String>, blocks: Vec<u32>) {
    let mut pulls = agent.sidecar.pulls.lock().expect("lock");
    if let Some(reason) = failed {
        pulls.failed.push(pb::FailedRequest { request_id: id.clone(), reason });
        pulls.invalid.extend(blocks);
    }
    pulls.finished.push(id);
}

#[tonic::async_trait]
impl pb::sidecar_server::Sidecar for SidecarService {
    async fn attach_region(&self, req: Request<pb::AttachRegionRequest>) -> Result<Response<pb::AttachRegionResponse>, Status> {
        Ok(Response::new(self.attach(req.into_inner()).await?))
    }

    async fn publish(&self, req: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        let agent = self.in_role(Role::Prefill, "Publish")?;
        let req = req.into_inner();
        let blocks = req.blocks.into_iter().map(|g| g.ids).collect();
        let lease = std::time::Duration::from_millis(u64::from(req.lease_ms));
        agent.sidecar.published.lock().expect("lock").publish(
            &req.request_id,
            blocks,
            &[agent.layout.num_blocks()],
            lease,
            Instant::now(),
        )?;
        agent.sidecar.publishes.notify_waiters();
        Ok(Response::new(pb::PublishResponse {}))
    }

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<pb::PullResponse>, Status> {
        let agent = self.in_role(Role::Decode, "Pull")?.clone();
        let req = req.into_inner();
        // Every block checked against both layouts before the claim, so a
        // pull refused for its own blocks leaves the prefill side's lease as
        // it was; then the prefill agent's word that the blocks are still
        // held: a read after they were freed would get whatever reused them.
        let (target, submit) = checked(&agent, moved!(req), pb::TransferMode::Read).await?;
        agent.sidecar.claim_for_read(&target, &req.remote_request_id, &submit.src_blocks, agent.cfg.request_timeout).await?;
        let (peer, published, local) = (target.peer.clone(), req.remote_request_id, submit.dst_blocks.clone());
        let answered = agent.clone();
        let answer: decode::Answer = Box::new(move |st: RequestState| {
            let id = req.request_id;
            let failed = match st {
                RequestState::Done { .. } => None,
                RequestState::Failed { message, .. } | RequestState::Cancelled { message, .. } => Some(message),
                RequestState::Pending => Some("the pull ended while still pending".into()),
            };
            if failed.is_none() {
                lease_update(&answered, &peer, pb::LeaseUpdate { read: vec![published], ..Default::default() });
            }
            record_end(&answered, id, failed, local);
        });
        decode::submit(&agent, submit, Some(answer)).await?;
        Ok(Response::new(pb::PullResponse {}))
    }

    async fn expect_push(&self, req: Request<pb::ExpectPushRequest>) -> Result<Response<pb::ExpectPushResponse>, Status> {
        let agent = self.in_role(Role::Decode, "ExpectPush")?.clone();
        let req = req.into_inner();
        // Both layouts first, then the blocks held for it: a refused push
        // holds nothing and orders nothing.
        let (target, submit) = checked(&agent, moved!(req), pb::TransferMode::Write).await?;
        let lease = Duration::from_millis(u64::from(req.lease_ms));
        let lease = agent.sidecar.expected.lock().expect("lock").expect(
            &req.request_id,
            &submit.dst_blocks,
            agent.layout.num_blocks(),
            lease,
            Instant::now(),
        )?;
        let (id, peer) = (req.request_id.clone(), target.peer.clone());
        let answered = agent.clone();
        let answer: decode::Answer = Box::new(move |st: RequestState| {
            let Some(ended) = answered.sidecar.expected.lock().expect("lock").end(&id) else { return };
            let failed = match (st, ended.expired) {
                (RequestState::Done { .. }, _) => None,
                (RequestState::Failed { message, .. } | RequestState::Cancelled { message, .. }, Some(lease)) => {
                    Some(format!("prefill agent {peer:?} did not push it within its lease of {} ms: {message}", lease.as_millis()))
                }
                (RequestState::Failed { message, .. } | RequestState::Cancelled { message, .. }, None) => Some(message),
                (RequestState::Pending, _) => Some("the push ended while still pending".into()),
            };
            record_end(&answered, id, failed, ended.blocks);
        });
        let published = decode::OfPublished { id: req.remote_request_id, hold: lease };
        if let Err(e) = decode::submit_with(&agent, submit, Some(answer), Some(published)).await {
            // Never started: nothing was ordered into its blocks.
            agent.sidecar.expected.lock().expect("lock").end(&req.request_id);
            return Err(e.into());
        }
        Ok(Response::new(pb::ExpectPushResponse {}))
    }

    async fn release(&self, req: Request<pb::ReleaseRequest>) -> Result<Response<pb::ReleaseResponse>, Status> {
        let agent = self.in_role(Role::Decode, "Release")?;
        let req = req.into_inner();
        crate::agent::validate::check_id("remote_request_id", &req.remote_request_id)?;
        let update = pb::LeaseUpdate { released: vec![req.remote_request_id], ..Default::default() };
        send_update(agent, &req.remote_agent_id, &req.remote_address, update).await?;
        Ok(Response::new(pb::ReleaseResponse {}))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let agent = self.in_role(Role::Decode, "Heartbeat")?;
        let req = req.into_inner();
        for id in &req.remote_request_ids {
            crate::agent::validate::check_id("remote_request_ids", id)?;
        }
        let update = pb::LeaseUpdate { extend: req.remote_request_ids, ..Default::default() };
        send_update(agent, &req.remote_agent_id, &req.remote_address, update).await?;
        Ok(Response::new(pb::HeartbeatResponse {}))
    }

    async fn poll(&self, _req: Request<pb::PollRequest>) -> Result<Response<pb::PollResponse>, Status> {
        let agent = self.agent()?;
        let mut resp = pb::PollResponse::default();
        // Expected pushes whose lease ran out: their writes stop, and each
        // is reported once nothing of it is in flight (its answer).
        let expired = agent.sidecar.expected.lock().expect("lock").expire(Instant::now());
        for id in expired {
            if let Err(e) = decode::cancel(agent, &id) {
                tracing::info!(request_id = %id, error = %e, "could not stop an expired push");
            }
        }
        {
            let mut p = agent.sidecar.published.lock().expect("lock");
            p.expire(Instant::now());
            resp.finished_sending = p.take_finished().into_iter().map(|(id, _)| id).collect();
        }
        let mut pulls = agent.sidecar.pulls.lock().expect("lock");
        resp.finished_recving = std::mem::take(&mut pulls.finished);
        resp.failed_recving = std::mem::take(&mut pulls.failed);
        let invalid = std::mem::take(&mut pulls.invalid);
        if !invalid.is_empty() {
            resp.invalid_blocks = vec![pb::BlockIds { ids: invalid }];
        }
        Ok(Response::new(resp))
    }
}

/// Sends `u` to the prefill agent `peer` (at `addr`, dialled if there is
/// no session with it yet), or says why not.
async fn send_update(agent: &Arc<Agent>, peer: &str, addr: &str, u: pb::LeaseUpdate) -> Result<(), AgentError> {
    agent.decode()?;
    let target = dial::target(agent, peer, addr).await?;
    target.io.send(pb::session_down::Msg::Leases(u))
}

/// The same after a pull, on the session the read used, when nobody waits
/// for the answer: the prefill agent frees the blocks at its lease's end if
/// this is lost.
fn lease_update(agent: &Agent, peer: &str, u: pb::LeaseUpdate) {
    let sent =
        agent.decode().and_then(|d| d.sessions.lock().expect("lock").pick(peer)).and_then(|t| t.io.send(pb::session_down::Msg::Leases(u)));
    if let Err(e) = sent {
        tracing::info!(prefill_agent = peer, error = %e, "could not tell the prefill agent a pull is done; its lease frees the blocks");
    }
}
