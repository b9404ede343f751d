//! A prefill agent's session stream on the decode side: opening it (the
//! session then takes orders) and reading what comes up it (completions,
//! heartbeats, a goodbye) into the session table until it ends.

use std::sync::Arc;
use std::time::Instant;

use kvrail_proto::v1 as pb;
use tokio::sync::mpsc;
use tonic::Streaming;

use super::{side, DownItem, Finished, Link, Waiter, GOODBYE_WAIT, PEER_KIND};
use crate::agent::effects::carry_out;
use crate::agent::error::AgentError;
use crate::agent::session::{CloseReason, Routed, Target};
use crate::agent::{convert, Agent};

/// Opens the session `session_id` names: what goes down it comes out of
/// the returned receiver, and what comes up `inbound` is read by a task
/// until the session ends.
pub async fn open(agent: &Arc<Agent>, session_id: &str, inbound: Streaming<pb::SessionUp>) -> Result<mpsc::Receiver<DownItem>, AgentError> {
    let d = agent
        .decode()
        .map_err(|_| AgentError::WrongRole { actual: "prefill", hint: "prefill agents open sessions with a decode agent" })?;
    let target = d.sessions.lock().expect("lock").find(session_id)?;
    // The prefill agent opens its session once its handshake is over: the
    // time to fault in our view of its region (sm).
    agent.engine.prefault(target.io.engine_peer).await?;
    // Dropped meanwhile (its lease ran out before the stream opened): refused.
    d.sessions.lock().expect("lock").open(session_id, Instant::now())?;
    let rx = target.io.stream.lock().expect("lock").take().ok_or_else(|| AgentError::AlreadyOpen(session_id.into()))?;
    tokio::spawn(read_up(agent.clone(), target, inbound, false));
    Ok(rx)
}

/// Reads the session's stream until it ends, or until the table closes the
/// session (lease, a newer handshake, shutdown, idle). On a session this
/// agent `dialled` the stream read is the answer to its own call: dropping
/// it would cancel the call, goodbye and all, so after a close it is read
/// until the prefill agent ends it (it does once the goodbye is there), for
/// a bounded time.
pub(super) async fn read_up(agent: Arc<Agent>, target: Target<Link>, mut inbound: Streaming<pb::SessionUp>, dialled: bool) {
    let d = side(&agent);
    let _finished = Finished(target.io.clone());
    let mut closed = target.io.closed.subscribe();
    let reason = loop {
        let msg = tokio::select! {
            _ = closed.wait_for(|c| *c) => None,
            m = inbound.message() => Some(m),
        };
        let Some(msg) = msg else {
            if dialled {
                let drained = async { while let Ok(Some(_)) = inbound.message().await {} };
                let _ = tokio::time::timeout(GOODBYE_WAIT, drained).await;
            }
            return;
        };
        let now = Instant::now();
        let msg = match msg {
            Ok(Some(pb::SessionUp { msg })) => msg,
            Ok(None) => break CloseReason::StreamEnded,
            Err(e) => break CloseReason::Broken(e.message().to_string()),
        };
        match msg {
            Some(pb::session_up::Msg::Completion(c)) => {
                let request_id = c.request_id.clone();
                let routed = d.sessions.lock().expect("lock").completion(target.epoch, convert::completion_from_pb(c), now);
                match routed {
                    Routed::Apply { waiter, outcome, .. } => Waiter::complete(&waiter, outcome),
                    Routed::Fenced => {
                        tracing::debug!(request_id = %request_id, peer = %target.peer, epoch = %target.epoch, "stale completion fenced")
                    }
                    Routed::Unknown => tracing::warn!(request_id = %request_id, peer = %target.peer, "completion for an unknown request"),
                }
            }
            Some(pb::session_up::Msg::Goodbye(g)) => break CloseReason::Goodbye(g.reason),
            Some(pb::session_up::Msg::Claimed(c)) => {
                d.sessions.lock().expect("lock").heard(target.epoch, now);
                agent.sidecar.claimed(c);
            }
            _ => {
                d.sessions.lock().expect("lock").heard(target.epoch, now);
            }
        }
    };
    let effects = d.sessions.lock().expect("lock").close(target.epoch, reason, Instant::now());
    carry_out(&agent, PEER_KIND, effects).await;
}
