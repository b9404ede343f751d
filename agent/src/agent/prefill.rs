//! Prefill side: dial the decode agent, handshake, keep one session open,
//! and execute the write orders that arrive on it (plan, put, flush, then
//! report completion). Re-handshakes when the session breaks.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvrail_proto::v1 as pb;
use kvrail_transfer::plan::TransferPlan;
use kvrail_transfer::{BlockLayout, Direction, PeerId};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{convert, Agent};

/// The admitted connection to a decode agent.
#[derive(Debug)]
pub struct Link {
    pub decode_agent: String,
    pub decode_layout: BlockLayout,
    pub engine_peer: PeerId,
    pub session_id: String,
    up: mpsc::Sender<pb::SessionUp>,
    /// Cancel flags of the write orders in progress.
    cancels: std::sync::Mutex<std::collections::HashMap<String, Arc<std::sync::atomic::AtomicBool>>>,
}

/// Handshakes with the decode agent at `addr` and serves its orders, for
/// ever: a broken session is re-established. `ready` fires after the first
/// session is open, with the handshake time.
pub async fn run(agent: Arc<Agent>, addr: String, ready: tokio::sync::oneshot::Sender<anyhow::Result<f64>>) {
    let mut ready = Some(ready);
    let mut backoff = Duration::from_millis(50);
    loop {
        match session_once(&agent, &addr, &mut ready).await {
            Ok(why) => {
                tracing::warn!(decode = %addr, reason = %why, "session with decode agent ended; reconnecting");
                backoff = Duration::from_millis(50);
            }
            Err(e) => {
                tracing::debug!(decode = %addr, error = %e, "cannot reach decode agent yet");
                if let Some(tx) = ready.take_if(|_| is_permanent(&e)) {
                    let _ = tx.send(Err(e));
                    return;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Refusals that retrying cannot fix (version, layout, hooks, bad input, a
/// TLS peer that does not accept our certificate or that we do not accept).
fn is_permanent(e: &anyhow::Error) -> bool {
    e.downcast_ref::<tonic::Status>()
        .is_some_and(|s| matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::InvalidArgument | tonic::Code::Unauthenticated))
        || crate::tls::is_tls_refusal(e)
}

async fn session_once(
    agent: &Arc<Agent>,
    addr: &str,
    ready: &mut Option<tokio::sync::oneshot::Sender<anyhow::Result<f64>>>,
) -> anyhow::Result<String> {
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
            return Err(tonic::Status::unauthenticated(
                "the decode agent did not prove the cluster secret; refusing to write into its region",
            )
            .into());
        }
    }
    let layout = convert::layout_from_pb(decode.layout.as_ref())?;
    agent.layout.check_compatible(&layout)?;
    let spec = convert::peer_spec(&decode, &layout)?;
    let engine_peer = agent.engine.connect(spec).await?;
    let handshake_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Handshake over: now fault in our view of the decode region (sm).
    agent.engine.prefault(engine_peer).await?;
    let (up_tx, up_rx) = mpsc::channel(4096);
    up_tx.send(pb::SessionUp { msg: Some(pb::session_up::Msg::Open(pb::SessionOpen { session_id: resp.session_id.clone() })) }).await?;
    let mut down = client.session(ReceiverStream::new(up_rx)).await?.into_inner();
    let link = Arc::new(Link {
        decode_agent: decode.agent_id.clone(),
        decode_layout: layout,
        engine_peer,
        session_id: resp.session_id,
        up: up_tx,
        cancels: Default::default(),
    });
    *agent.link.lock().expect("lock") = Some(link.clone());
    *agent.handshake_ms.lock().expect("lock") = Some(handshake_ms);
    tracing::info!(decode = %decode.agent_id, handshake_ms, decode_ucx = %decode.ucx_version, "session with decode agent open");
    if let Some(tx) = ready.take() {
        let _ = tx.send(Ok(handshake_ms));
    }
    let lease = agent.cfg.lease;
    let beat = {
        let up = link.up.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(lease / 5);
            loop {
                t.tick().await;
                if up.send(pb::SessionUp { msg: Some(pb::session_up::Msg::Heartbeat(super::heartbeat())) }).await.is_err() {
                    break;
                }
            }
        })
    };
    let why = loop {
        let msg = match tokio::time::timeout(lease, down.message()).await {
            Ok(m) => m,
            Err(_) => break format!("nothing heard from the decode agent for {lease:?}: its lease expired"),
        };
        match msg {
            Ok(Some(pb::SessionDown { msg: Some(pb::session_down::Msg::Write(order)) })) => {
                let (agent, link) = (agent.clone(), link.clone());
                tokio::spawn(async move { execute(&agent, &link, order).await });
            }
            Ok(Some(pb::SessionDown { msg: Some(pb::session_down::Msg::Cancel(c)) })) => {
                if let Some(flag) = link.cancels.lock().expect("lock").get(&c.request_id) {
                    flag.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Ok(Some(pb::SessionDown { msg: Some(pb::session_down::Msg::ReadDone(done)) })) => {
                tracing::debug!(request_id = %done.request_id, ok = done.ok, "decode agent finished reading; blocks may be freed");
            }
            Ok(Some(_)) => {}
            Ok(None) => break "the decode agent closed the session".to_string(),
            Err(e) => break format!("session broke: {}", e.message()),
        }
    };
    beat.abort();
    agent.link.lock().expect("lock").take();
    let _ = agent.engine.disconnect(engine_peer).await;
    Ok(why)
}

/// How a write order asks for its blocks to be sent.
fn direction(delivery_tag: u64) -> Direction {
    match delivery_tag {
        0 => Direction::Write,
        tag => Direction::Deliver { tag },
    }
}

/// Executes one write order and answers with its completion, only after
/// the flush completed. A delivery is answered only if it failed: the
/// decode agent sees it complete as its bytes land.
async fn execute(agent: &Agent, link: &Link, order: pb::WriteOrder) {
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    link.cancels.lock().expect("lock").insert(order.request_id.clone(), flag.clone());
    let result = match TransferPlan::build(&agent.layout, &order.src_blocks, &link.decode_layout, &order.dst_blocks, 0) {
        Ok(plan) => agent
            .engine
            .transfer_cancellable(link.engine_peer, direction(order.delivery_tag), plan.into_ops(), flag)
            .await
            .map_err(|e| convert::status_of(&e)),
        Err(e) => Err(tonic::Status::invalid_argument(e.to_string())),
    };
    link.cancels.lock().expect("lock").remove(&order.request_id);
    let completion = match result {
        Ok(_) if order.delivery_tag != 0 => return,
        Ok(done) => pb::Completion { request_id: order.request_id, ok: true, bytes: done.bytes, ops: done.ops, ..Default::default() },
        Err(s) => {
            if s.code() == tonic::Code::Cancelled {
                tracing::debug!(request_id = %order.request_id, "write order cancelled");
            } else {
                tracing::warn!(request_id = %order.request_id, blocks = order.src_blocks.len(), error = %s.message(), "write order failed");
            }
            pb::Completion {
                request_id: order.request_id,
                ok: false,
                code: s.code() as i32,
                error: s.message().to_string(),
                ..Default::default()
            }
        }
    };
    let _ = link.up.send(pb::SessionUp { msg: Some(pb::session_up::Msg::Completion(completion)) }).await;
}
