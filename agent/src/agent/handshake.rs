//! The handshake, from either end: the side that serves it (hands out a
//! nonce, checks the dialler's version, proof and AgentInfo, answers with
//! its own proof) and the side that dials (asks for a nonce, proves the
//! cluster secret, checks the answer's proof and AgentInfo). Either role
//! may dial: a prefill agent dials the decode agents of its `--peer`s, a
//! decode agent dials a prefill agent a request names. Each side proves
//! with its own role, over a nonce the serving side issued once.

use std::time::{Duration, Instant};

use kvrail_proto::v1 as pb;
use kvrail_transfer::{BlockLayout, PeerSpec};
use tonic::transport::Channel;

use super::error::AgentError;
use super::{convert, validate, Agent, Role};

/// Longest a dialler waits for the TCP (and TLS) connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// What a checked handshake yields about the peer.
#[derive(Debug)]
pub struct Admitted {
    pub peer: pb::AgentInfo,
    pub layout: BlockLayout,
    pub spec: PeerSpec,
}

/// The other role: the one a peer of `role` has.
fn other(role: Role) -> Role {
    match role {
        Role::Prefill => Role::Decode,
        Role::Decode => Role::Prefill,
    }
}

/// A fresh session id.
pub fn session_id() -> String {
    format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>())
}

/// Serving side: checks a dialler's handshake: version, that this agent
/// still takes sessions, the one-time nonce and the proof, then its
/// AgentInfo (the other role, layout, hooks). Nothing about this agent's
/// region leaves before the peer has proven it holds the cluster secret.
pub fn check_incoming(agent: &Agent, req: &pb::HandshakeRequest) -> Result<Admitted, AgentError> {
    validate::protocol_version(req.protocol_version)?;
    if agent.is_stopping() {
        return Err(AgentError::ShuttingDown(agent.cfg.role.as_str()));
    }
    let peer = req.agent.clone().ok_or_else(|| AgentError::Invalid("agent is missing".into()))?;
    let role = other(agent.cfg.role);
    if let Some(secret) = &agent.cfg.secret {
        if !agent.nonces.take(&req.nonce) {
            return Err(AgentError::Unauthenticated(
                "handshake nonce unknown or expired: call Challenge first, then Handshake within 30 s".into(),
            ));
        }
        if !secret.check(role.as_str(), &req.nonce, &peer, &req.auth_proof) {
            tracing::warn!(peer = %peer.agent_id, "handshake refused: wrong cluster secret");
            return Err(AgentError::Unauthenticated("handshake proof does not match: the agents do not share the cluster secret".into()));
        }
    }
    let (layout, spec) = validate::admit(&peer, convert::role_to_pb(role), &agent.layout, agent.cfg.allow_hooks, &agent.memory_side())?;
    validate::same_model(&agent.cfg.agent_id, agent.model_hash(), &peer)?;
    Ok(Admitted { peer, layout, spec })
}

/// Serving side: the answer to an admitted handshake.
pub fn answer(agent: &Agent, nonce: &[u8], session_id: String) -> pb::HandshakeResponse {
    let info = agent.info();
    let auth_proof = agent.cfg.secret.as_ref().map(|s| s.prove(agent.cfg.role.as_str(), nonce, &info)).unwrap_or_default();
    pb::HandshakeResponse { protocol_version: kvrail_proto::PROTOCOL_VERSION, agent: Some(info), session_id, auth_proof }
}

/// A dialled handshake that went through: the client to open the session
/// stream with, what was checked of the peer, and the session it was given.
#[derive(Debug)]
pub struct Dialled {
    pub client: pb::peer_client::PeerClient<Channel>,
    pub admitted: Admitted,
    pub session_id: String,
    /// Connection and handshake, milliseconds.
    pub handshake_ms: f64,
}

/// How a dial ended before any session was made.
#[derive(Debug)]
pub enum Dial {
    /// The agent there claims an id `known` accepts: a session with it is
    /// held already, so no handshake was made (the claim is unproven, but
    /// it only selects a session that was proven).
    Known(String),
    /// Handshaken.
    New(Box<Dialled>),
}

/// Dialling side: connects to the agent at `addr`, asks for a nonce (and
/// stops there if the agent's claimed id is one `known` accepts), proves
/// the cluster secret, and checks the answer: its proof, then its
/// AgentInfo (the other role, layout, hooks).
pub async fn dial(agent: &Agent, addr: &str, known: impl Fn(&str) -> bool) -> anyhow::Result<Dial> {
    let t0 = Instant::now();
    let channel = crate::tls::endpoint(addr, agent.cfg.tls.as_ref())?.connect_timeout(CONNECT_TIMEOUT).connect().await?;
    let mut client = pb::peer_client::PeerClient::new(channel)
        .max_decoding_message_size(crate::cmd::serve::MAX_MESSAGE)
        .max_encoding_message_size(crate::cmd::serve::MAX_MESSAGE);
    let challenge = client.challenge(pb::ChallengeRequest { agent_id: agent.cfg.agent_id.clone() }).await?.into_inner();
    if !challenge.agent_id.is_empty() && known(&challenge.agent_id) {
        return Ok(Dial::Known(challenge.agent_id));
    }
    let nonce = challenge.nonce;
    let info = agent.info();
    let role = agent.cfg.role;
    let auth_proof = agent.cfg.secret.as_ref().map(|s| s.prove(role.as_str(), &nonce, &info)).unwrap_or_default();
    let req =
        pb::HandshakeRequest { protocol_version: kvrail_proto::PROTOCOL_VERSION, agent: Some(info), nonce: nonce.clone(), auth_proof };
    let resp = client.handshake(req).await?.into_inner();
    let peer_role = other(role);
    let peer =
        resp.agent.ok_or_else(|| anyhow::anyhow!("the {} agent answered the handshake without its AgentInfo", peer_role.as_str()))?;
    if let Some(secret) = &agent.cfg.secret {
        if !secret.check(peer_role.as_str(), &nonce, &peer, &resp.auth_proof) {
            return Err(AgentError::Unauthenticated(format!(
                "the {} agent did not prove the cluster secret; refusing to share this agent's region with it",
                peer_role.as_str()
            ))
            .into());
        }
    }
    let (layout, spec) =
        validate::admit(&peer, convert::role_to_pb(peer_role), &agent.layout, agent.cfg.allow_hooks, &agent.memory_side())?;
    validate::same_model(&agent.cfg.agent_id, agent.model_hash(), &peer)?;
    Ok(Dial::New(Box::new(Dialled {
        client,
        admitted: Admitted { peer, layout, spec },
        session_id: resp.session_id,
        handshake_ms: t0.elapsed().as_secs_f64() * 1e3,
    })))
}
