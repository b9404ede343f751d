//! The thin async layer under a [`SessionTable`]: what a session's and a
//! request's handles must do ([`SessionIo`], [`RequestWaiter`]), carrying
//! out the table's effects, and the lease ticker (heartbeats out, expired
//! sessions closed). Both roles use it with their own handles.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvrail_transfer::PeerId;

use super::error::Failure;
use super::session::{CloseReason, Effect, SessionTable};
use super::Agent;

/// The I/O layer's handle of one session.
pub trait SessionIo: Clone + Send + Sync + 'static {
    /// The engine's handle of the peer.
    fn engine_peer(&self) -> PeerId;
    /// Sends a heartbeat down the stream (best effort).
    fn heartbeat(&self);
    /// Sends a goodbye with these words (best effort).
    fn goodbye(&self, reason: &str);
    /// Ends the stream and stops its reader, which learns `reason`.
    fn end(&self, reason: &CloseReason);
}

/// The I/O layer's handle of one request's task.
pub trait RequestWaiter: Clone + Send + 'static {
    /// The request ended with `failure`; its task sets the final state
    /// once nothing of it is in flight any more.
    fn end(self, failure: Failure);
    /// Stop the request's own work (a read); its task reports how it ended.
    fn stop(&self);
}

/// Carries out `effects` in order. A dropped session is logged here, once:
/// a warning when it failed, information when one side said goodbye.
pub async fn carry_out<P: SessionIo, W: RequestWaiter>(agent: &Agent, peer_kind: &str, effects: Vec<Effect<P, W>>) {
    for e in effects {
        match e {
            Effect::Goodbye { io, reason } => io.goodbye(&reason),
            Effect::End { waiter, failure, .. } => waiter.end(failure),
            Effect::Stop { waiter, .. } => waiter.stop(),
            Effect::Drop { peer, session_id, epoch, io, reason } => {
                let why = reason.describe(peer_kind);
                if reason.is_failure() {
                    tracing::warn!(peer = %peer, peer_kind, session = %session_id, %epoch, reason = %why, "session ended");
                } else {
                    tracing::info!(peer = %peer, peer_kind, session = %session_id, %epoch, reason = %why, "session closed");
                }
                io.end(&reason);
                if let Err(e) = agent.engine.disconnect(io.engine_peer()).await {
                    tracing::debug!(peer = %peer, error = %e, "engine peer already gone");
                }
            }
        }
    }
}

/// This agent stops: every session of `table` is told `goodbye` and
/// closes. Returns once each session that was open is done with its stream
/// (`finished`: the peer has ended its side, so the goodbye reached it),
/// or after `wait` for each.
pub async fn say_goodbye<P: SessionIo, W: RequestWaiter>(
    agent: &Agent,
    table: &Mutex<SessionTable<P, W>>,
    goodbye: &str,
    wait: Duration,
    finished: impl Fn(&P) -> tokio::sync::watch::Receiver<bool>,
) {
    let (effects, kind) = {
        let mut t = table.lock().expect("lock");
        (t.close_all(goodbye, Instant::now()), t.peer_kind())
    };
    let open: Vec<P> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Goodbye { io, .. } => Some(io.clone()),
            _ => None,
        })
        .collect();
    carry_out(agent, kind, effects).await;
    for io in open {
        let mut done = finished(&io);
        let _ = tokio::time::timeout(wait, done.wait_for(|f| *f)).await;
    }
}

/// Every fifth of a lease: a heartbeat to every open session, and the
/// table's lease tick, for as long as the agent runs.
pub fn spawn_ticker<P: SessionIo, W: RequestWaiter>(
    agent: Arc<Agent>,
    table: fn(&Agent) -> &Mutex<SessionTable<P, W>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let every = (agent.cfg.lease / 5).max(Duration::from_millis(10));
        let mut t = tokio::time::interval(every);
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            t.tick().await;
            let (open, effects, kind) = {
                let mut g = table(&agent).lock().expect("lock");
                let effects = g.poll(Instant::now());
                (g.open_sessions(), effects, g.peer_kind())
            };
            for (_, io) in open {
                io.heartbeat();
            }
            carry_out(&agent, kind, effects).await;
        }
    })
}
