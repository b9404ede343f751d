//! On-demand sessions: a request that names a prefill agent this decode
//! agent holds no session with (by address, or by id that a [`Resolver`]
//! turns into an address) dials it. The first request to a new peer
//! handshakes; requests that arrive meanwhile wait for the same handshake;
//! later ones reuse the session; a dialled session that carries no request
//! for `--idle-timeout` says goodbye and closes (the session table's lease
//! tick). A dial that fails fails only the requests waiting for it.
//!
//! The decode agent dials the prefill agent's Peer service and is the
//! client of the session stream (`Challenge` and `Handshake` on the
//! prefill agent, then `Serve`), rather than asking the prefill agent to
//! dial back: only the decode agent needs to reach the prefill agent (a
//! dial-back needs the reverse path too, and an address the decode agent
//! would have to advertise), the request that caused the dial learns its
//! outcome from the one handshake it waits for (a dial-back would have to
//! correlate a later incoming handshake with it), the session's lifetime
//! (the idle close) belongs to the side that opened it, and no agent can
//! be made to dial an address a caller chose. Once open, the stream
//! carries the same messages either way, so both ends serve a dialled
//! session with the code that serves an accepted one.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvrail_proto::v1 as pb;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;

use super::{side, stream, Link, PeerLink, PEER_KIND};
use crate::agent::effects::carry_out;
use crate::agent::error::{AgentError, ErrorKind, Failure};
use crate::agent::handshake::{self, Dial};
use crate::agent::session::{CloseReason, Target};
use crate::agent::{convert, validate, Agent};

/// Longest a dial (connection, challenge, handshake, stream) may take.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(10);

/// What a resolver's lookup returns.
pub type Resolved<'a> = Pin<Box<dyn Future<Output = Result<Option<String>, AgentError>> + Send + 'a>>;

/// Turns a prefill agent's id into the address of its Peer service (a
/// registry: etcd, a static peers file). `Ok(None)`: not known there.
pub trait Resolver: Send + Sync + fmt::Debug {
    fn resolve<'a>(&'a self, agent_id: &'a str) -> Resolved<'a>;
}

/// Knows no agent: only requests that give an address dial.
#[derive(Debug, Default)]
pub struct NoResolver;

impl Resolver for NoResolver {
    fn resolve<'a>(&'a self, _agent_id: &'a str) -> Resolved<'a> {
        Box::pin(async { Ok(None) })
    }
}

/// How a dial ended: the prefill agent's id, or why not.
type DialEnd = Option<Result<String, Failure>>;

/// The decode agent's dials: the resolver, the handshakes in progress and
/// which agent each dialled address turned out to be.
#[derive(Debug)]
pub struct Dialer {
    resolver: Mutex<Arc<dyn Resolver>>,
    /// By address: every request to it waits for this one handshake.
    pending: Mutex<HashMap<String, watch::Receiver<DialEnd>>>,
    /// Address to prefill agent id, for addresses that have been dialled.
    known: Mutex<HashMap<String, String>>,
}

impl Default for Dialer {
    fn default() -> Self {
        Dialer { resolver: Mutex::new(Arc::new(NoResolver)), pending: Mutex::default(), known: Mutex::default() }
    }
}

impl Dialer {
    /// Plugs in the resolver that turns agent ids into addresses.
    pub fn set_resolver(&self, r: Arc<dyn Resolver>) {
        *self.resolver.lock().expect("lock") = r;
    }

    fn resolver(&self) -> Arc<dyn Resolver> {
        self.resolver.lock().expect("lock").clone()
    }

    /// The prefill agent id the address was found to be, if any.
    fn known(&self, addr: &str) -> Option<String> {
        self.known.lock().expect("lock").get(addr).cloned()
    }
}

/// Whether a request naming `peer` and `addr` has its session now (no
/// dial needed): callers that submit many requests on one stream run the
/// others in tasks of their own, so one slow dial stalls no other peer.
pub fn ready(agent: &Agent, peer: &str, addr: &str) -> bool {
    let d = side(agent);
    let t = d.sessions.lock().expect("lock");
    match (peer, addr) {
        (_, "") => t.pick(peer).is_ok(),
        ("", addr) => d.dialer.known(addr).is_some_and(|id| t.pick(&id).is_ok()),
        (peer, _) => t.pick(peer).is_ok(),
    }
}

/// The session a request runs on: the one it names (`peer`: agent id;
/// `addr`: address), dialled first when there is none yet.
pub async fn target(agent: &Arc<Agent>, peer: &str, addr: &str) -> Result<Target<Link>, AgentError> {
    let d = side(agent);
    if addr.is_empty() {
        let picked = d.sessions.lock().expect("lock").pick(peer);
        return match picked {
            Err(AgentError::UnknownPeer { .. }) if !peer.is_empty() => match d.dialer.resolver().resolve(peer).await? {
                Some(addr) => dialled(agent, peer, &addr).await,
                None => picked,
            },
            _ => picked,
        };
    }
    check_address(addr)?;
    if !peer.is_empty() {
        if let Ok(t) = d.sessions.lock().expect("lock").pick(peer) {
            return Ok(t);
        }
    }
    if let Some(id) = d.dialer.known(addr).filter(|id| peer.is_empty() || id == peer) {
        if let Ok(t) = d.sessions.lock().expect("lock").pick(&id) {
            return Ok(t);
        }
    }
    dialled(agent, peer, addr).await
}

/// A dialable `host:port` of bounded length.
fn check_address(addr: &str) -> Result<(), AgentError> {
    validate::check_id("peer_address", addr)?;
    let bad = || AgentError::Invalid(format!("peer_address {addr:?} is not host:port (e.g. 10.0.0.7:50051)"));
    let rest = addr.split_once("://").map_or(addr, |(_, r)| r);
    let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(bad());
    }
    Ok(())
}

/// Waits for the dial of `addr` (starting it unless one is under way),
/// then picks its session; with `peer`, the agent there must be it.
async fn dialled(agent: &Arc<Agent>, peer: &str, addr: &str) -> Result<Target<Link>, AgentError> {
    let d = side(agent);
    let mut rx = {
        let mut pending = d.dialer.pending.lock().expect("lock");
        match pending.get(addr) {
            Some(rx) => rx.clone(),
            None => {
                let (tx, rx) = watch::channel(None);
                pending.insert(addr.to_string(), rx.clone());
                // Its own task: a caller that goes away does not stop the
                // handshake others wait for.
                let (agent, addr) = (agent.clone(), addr.to_string());
                tokio::spawn(async move {
                    let end = dial(&agent, &addr).await.map_err(|e| e.failure());
                    if let Ok(id) = &end {
                        side(&agent).dialer.known.lock().expect("lock").insert(addr.clone(), id.clone());
                    }
                    tx.send_replace(Some(end));
                    side(&agent).dialer.pending.lock().expect("lock").remove(&addr);
                });
                rx
            }
        }
    };
    let end = rx.wait_for(Option::is_some).await.map(|end| end.clone());
    let id = end.ok().flatten().ok_or_else(|| AgentError::Failed(dial_failure(addr, "the dial ended without a result")))??;
    if !peer.is_empty() && id != peer {
        return Err(AgentError::Precondition(format!(
            "the {PEER_KIND} at {addr} is {id:?}, not {peer:?}: fix the request's peer or peer_address"
        )));
    }
    d.sessions.lock().expect("lock").pick(&id)
}

fn dial_failure(addr: &str, why: &str) -> Failure {
    Failure::new(
        ErrorKind::Unavailable,
        format!("cannot dial the {PEER_KIND} at {addr}: {why}; check that it runs and listens there (kvrail prefill --listen)"),
    )
}

/// A dial's error as a request failure: the peer's refusal keeps its kind
/// (a wrong secret, a layout mismatch), anything else is UNAVAILABLE; the
/// message names the address.
fn dial_error(addr: &str, e: &anyhow::Error) -> AgentError {
    let why = crate::diagnose::one_line(e);
    let refused = e
        .downcast_ref::<tonic::Status>()
        .map(|s| convert::kind_of_code(s.code() as i32))
        .or_else(|| e.downcast_ref::<AgentError>().map(AgentError::kind))
        .filter(|k| matches!(k, ErrorKind::FailedPrecondition | ErrorKind::InvalidArgument | ErrorKind::Unauthenticated));
    let failure = match refused {
        Some(kind) => Failure::new(kind, format!("the {PEER_KIND} at {addr} refused the handshake: {why}")),
        None if crate::tls::is_tls_refusal(e) => {
            Failure::new(ErrorKind::Unauthenticated, format!("TLS with the {PEER_KIND} at {addr} failed: {why}; check --tls-*"))
        }
        None => dial_failure(addr, &why),
    };
    AgentError::Failed(failure)
}

/// Dials `addr` within [`DIAL_TIMEOUT`]; returns the prefill agent's id
/// once its session is open here.
async fn dial(agent: &Arc<Agent>, addr: &str) -> Result<String, AgentError> {
    match tokio::time::timeout(DIAL_TIMEOUT, open(agent, addr)).await {
        Ok(r) => r,
        Err(_) => Err(AgentError::Failed(dial_failure(addr, &format!("no session within {DIAL_TIMEOUT:?}")))),
    }
}

/// Handshakes with the prefill agent at `addr` and opens its `Serve`
/// stream; an agent there whose (claimed) id has a session here already is
/// not handshaken again.
async fn open(agent: &Arc<Agent>, addr: &str) -> Result<String, AgentError> {
    let d = side(agent);
    if agent.is_stopping() {
        return Err(AgentError::ShuttingDown("decode"));
    }
    let known = |id: &str| d.sessions.lock().expect("lock").pick(id).is_ok();
    let dialled = match handshake::dial(agent, addr, known).await.map_err(|e| dial_error(addr, &e))? {
        Dial::Known(id) => return Ok(id),
        Dial::New(dialled) => *dialled,
    };
    let handshake::Dialled { mut client, admitted, session_id, handshake_ms } = dialled;
    let peer = admitted.peer;
    let engine_peer = agent.engine.connect(admitted.spec).await?;
    let link = Arc::new(PeerLink::new(peer.agent_id.clone(), engine_peer));
    let (epoch, replaced) = {
        let mut t = d.sessions.lock().expect("lock");
        let (epoch, replaced) = t.admit(&peer.agent_id, session_id.clone(), admitted.layout, link.clone(), Instant::now());
        t.mark_dialled(epoch, addr);
        (epoch, replaced)
    };
    carry_out(agent, PEER_KIND, replaced).await;
    let opened = async {
        // Fault in our view of the prefill region (sm) before reads use it.
        agent.engine.prefault(engine_peer).await?;
        let rx = link.stream.lock().expect("lock").take().ok_or_else(|| AgentError::AlreadyOpen(session_id.clone()))?;
        let open = pb::SessionDown { msg: Some(pb::session_down::Msg::Open(pb::SessionOpen { session_id: session_id.clone() })) };
        let down = tokio_stream::once(open).chain(ReceiverStream::new(rx).filter_map(Result::ok));
        let up = client.serve(down).await.map_err(|s| dial_error(addr, &anyhow::Error::from(s)))?.into_inner();
        d.sessions.lock().expect("lock").open(&session_id, Instant::now())?;
        Ok::<_, AgentError>(up)
    };
    let up = match opened.await {
        Ok(up) => up,
        Err(e) => {
            let effects = d.sessions.lock().expect("lock").close(epoch, CloseReason::Broken(e.to_string()), Instant::now());
            carry_out(agent, PEER_KIND, effects).await;
            return Err(e);
        }
    };
    let target = Target { peer: peer.agent_id.clone(), epoch, layout: admitted.layout, io: link };
    tokio::spawn(stream::read_up(agent.clone(), target, up, true));
    tracing::info!(peer = %peer.agent_id, %addr, %epoch, handshake_ms, peer_ucx = %peer.ucx_version, "dialled prefill agent; session open");
    Ok(peer.agent_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_host_and_port() {
        for good in ["127.0.0.1:5000", "node7:50051", "[::1]:80", "http://h:1"] {
            assert!(check_address(good).is_ok(), "{good}");
        }
        for bad in ["", "node7", ":5000", "h:port", "h:70000"] {
            let e = check_address(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}: {e}");
        }
    }

    #[test]
    fn a_dial_error_names_the_address_and_keeps_a_refusal_s_kind() {
        let refused = dial_error("h:1", &tonic::Status::unauthenticated("proof does not match").into());
        assert_eq!(refused.kind(), ErrorKind::Unauthenticated);
        assert!(refused.to_string().contains("at h:1 refused the handshake"), "{refused}");
        let down = dial_error("h:1", &anyhow::anyhow!("connection refused"));
        assert_eq!(down.kind(), ErrorKind::Unavailable);
        assert!(down.to_string().contains("cannot dial the prefill agent at h:1") && down.to_string().contains("--listen"), "{down}");
    }
}
