//! [`SessionTable`]: an agent's sessions by peer agent id, the requests
//! pending on them, and the rules that move both (see the module above).
//!
//! `P` is the I/O layer's handle of one session (engine peer and stream),
//! opaque here; `W` is how the I/O layer reaches the task of one request.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use kvrail_transfer::BlockLayout;

use super::{CloseReason, Completion, Epoch, Outcome, RequestKind, SessionState};
use crate::agent::error::{AgentError, ErrorKind, Failure};

/// Closed sessions are remembered this many leases, so a request naming
/// their peer hears why it is gone.
const TOMBSTONE_LEASES: u32 = 12;

/// What the I/O layer must do after an event, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Effect<P, W> {
    /// Send a goodbye with these words down this session's stream.
    Goodbye { io: P, reason: String },
    /// This request ended with this failure: tell its task, which sets its
    /// state once nothing of it is in flight any more.
    End { request_id: String, waiter: W, failure: Failure },
    /// This local work's session is gone: stop it. Its task still reports
    /// how it ended ([`SessionTable::local_done`]), which names the failure.
    Stop { request_id: String, waiter: W },
    /// The session is over: end its stream and disconnect its engine peer.
    Drop { peer: String, session_id: String, epoch: Epoch, io: P, reason: CloseReason },
}

/// A session a request may run on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target<P> {
    pub peer: String,
    pub epoch: Epoch,
    pub layout: BlockLayout,
    pub io: P,
}

/// Where a completion went.
#[derive(Debug, PartialEq, Eq)]
pub enum Routed<W> {
    /// It ends this request: tell its task.
    Apply { request_id: String, waiter: W, outcome: Outcome },
    /// It came from an older epoch, or answers an earlier run of the
    /// request id: counted, not applied.
    Fenced,
    /// No request of the current session is waiting for it (it ended
    /// already, e.g. its deadline passed).
    Unknown,
}

/// How to stop a pending request.
#[derive(Debug, PartialEq, Eq)]
pub enum Cancel<P, W> {
    /// Ask the peer to stop this order (it answers once nothing is in flight).
    Order { io: P, order: u64 },
    /// Stop this agent's own work.
    Stop(W),
}

/// How local work ended, and whether its peer is still there to hear it.
#[derive(Debug, PartialEq, Eq)]
pub struct ReadEnd<P> {
    pub outcome: Outcome,
    /// The session to tell it is done, if that session is still open.
    pub notify: Option<P>,
}

#[derive(Debug)]
struct Session<P> {
    id: String,
    epoch: Epoch,
    layout: BlockLayout,
    state: State<P>,
    /// The address this agent dialled (it may close the session when
    /// idle); `None` when the peer dialled.
    address: Option<String>,
    admitted: Instant,
    /// The last time a request started or ended on it.
    last_active: Instant,
    counts: Counts,
}

/// What a session's requests moved and how they ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Counts {
    bytes: u64,
    ok: u64,
    failed: u64,
}

/// One peer's session, as stats report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStat {
    pub peer: String,
    pub address: Option<String>,
    pub state: SessionState,
    pub epoch: Epoch,
    pub age: Duration,
    pub bytes: u64,
    pub requests_ok: u64,
    pub requests_failed: u64,
    pub pending: u64,
}

#[derive(Debug)]
enum State<P> {
    Handshaken { io: P, since: Instant },
    Open { io: P, last_heard: Instant },
    Closed { reason: CloseReason, since: Instant },
}

impl<P> State<P> {
    fn io(&self) -> Option<&P> {
        match self {
            State::Handshaken { io, .. } | State::Open { io, .. } => Some(io),
            State::Closed { .. } => None,
        }
    }
}

#[derive(Debug)]
struct Pending<W> {
    peer: String,
    epoch: Epoch,
    order: u64,
    kind: RequestKind,
    waiter: W,
    /// Local work whose session closed: the failure it ends with, unless
    /// its bytes landed after all.
    orphaned: Option<Failure>,
}

/// An agent's sessions and the requests pending on them.
#[derive(Debug)]
pub struct SessionTable<P, W> {
    /// How the peers are named in messages ("prefill agent").
    peer_kind: &'static str,
    lease: Duration,
    next_epoch: u64,
    next_order: u64,
    /// By peer agent id; closed sessions stay a while as tombstones.
    sessions: HashMap<String, Session<P>>,
    /// By request id.
    requests: HashMap<String, Pending<W>>,
    fenced: u64,
    /// A dialled session with no request for this long closes.
    idle: Option<Duration>,
}

impl<P: Clone, W: Clone> SessionTable<P, W> {
    pub fn new(peer_kind: &'static str, lease: Duration) -> Self {
        Self { peer_kind, lease, next_epoch: 1, next_order: 1, sessions: HashMap::new(), requests: HashMap::new(), fenced: 0, idle: None }
    }

    /// Dialled sessions with no request for `idle` close (`None`: never).
    pub fn with_idle_timeout(mut self, idle: Option<Duration>) -> Self {
        self.idle = idle;
        self
    }

    pub fn peer_kind(&self) -> &'static str {
        self.peer_kind
    }

    /// Messages and completions dropped because they came from an older
    /// epoch or answered an earlier run.
    pub fn fenced(&self) -> u64 {
        self.fenced
    }

    /// Admits a handshaken peer; a live session of the same peer is closed
    /// first (the peer restarted), and its effects come back.
    pub fn admit(&mut self, peer: &str, session_id: String, layout: BlockLayout, io: P, now: Instant) -> (Epoch, Vec<Effect<P, W>>) {
        let effects = self.close_peer(peer, CloseReason::Replaced, now);
        let epoch = Epoch(self.next_epoch);
        self.next_epoch += 1;
        let state = State::Handshaken { io, since: now };
        let s = Session { id: session_id, epoch, layout, state, address: None, admitted: now, last_active: now, counts: Counts::default() };
        self.sessions.insert(peer.to_string(), s);
        (epoch, effects)
    }

    /// `epoch`'s session is one this agent dialled at `address`: requests
    /// naming the address find it, and it closes when idle.
    pub fn mark_dialled(&mut self, epoch: Epoch, address: &str) {
        if let Some(s) = self.sessions.values_mut().find(|s| s.epoch == epoch) {
            s.address = Some(address.to_string());
        }
    }

    /// The open session of the peer this agent dialled at `address`.
    pub fn find_address(&self, address: &str) -> Option<Target<P>> {
        self.sessions.iter().find_map(|(p, s)| match &s.state {
            State::Open { io, .. } if s.address.as_deref() == Some(address) => {
                Some(Target { peer: p.clone(), epoch: s.epoch, layout: s.layout, io: io.clone() })
            }
            _ => None,
        })
    }

    /// A request of `peer`'s session `epoch` ended with `outcome`.
    pub fn record(&mut self, peer: &str, epoch: Epoch, outcome: &Outcome, now: Instant) {
        let Some(s) = self.sessions.get_mut(peer).filter(|s| s.epoch == epoch) else { return };
        s.last_active = now;
        match outcome {
            Ok(m) => {
                s.counts.bytes += m.bytes;
                s.counts.ok += 1;
            }
            Err(_) => s.counts.failed += 1,
        }
    }

    /// Every peer's session (closed ones while remembered), by peer id.
    pub fn peer_stats(&self, now: Instant) -> Vec<PeerStat> {
        let mut v: Vec<PeerStat> = self
            .sessions
            .iter()
            .map(|(p, s)| PeerStat {
                peer: p.clone(),
                address: s.address.clone(),
                state: self.state(p).expect("present"),
                epoch: s.epoch,
                age: now.saturating_duration_since(s.admitted),
                bytes: s.counts.bytes,
                requests_ok: s.counts.ok,
                requests_failed: s.counts.failed,
                pending: self.requests.values().filter(|r| r.epoch == s.epoch).count() as u64,
            })
            .collect();
        v.sort_by(|a, b| a.peer.cmp(&b.peer));
        v
    }

    /// Whether `peer` has a live session (handshaken or open).
    pub fn is_live(&self, peer: &str) -> bool {
        self.sessions.get(peer).is_some_and(|s| s.state.io().is_some())
    }

    /// Whether `peer`'s live session is one this agent dialled.
    pub fn is_dialled(&self, peer: &str) -> bool {
        self.sessions.get(peer).is_some_and(|s| s.state.io().is_some() && s.address.is_some())
    }

    /// The session a stream names, while it waits for its stream.
    pub fn find(&self, session_id: &str) -> Result<Target<P>, AgentError> {
        let (peer, s) =
            self.sessions.iter().find(|(_, s)| s.id == session_id).ok_or_else(|| AgentError::UnknownSession(session_id.into()))?;
        match &s.state {
            State::Handshaken { io, .. } => Ok(Target { peer: peer.clone(), epoch: s.epoch, layout: s.layout, io: io.clone() }),
            State::Open { .. } => Err(AgentError::AlreadyOpen(session_id.into())),
            State::Closed { reason, .. } => Err(AgentError::SessionGone { id: session_id.into(), reason: reason.describe(self.peer_kind) }),
        }
    }

    /// The session's stream is open: it takes orders from now on, and its
    /// lease starts.
    pub fn open(&mut self, session_id: &str, now: Instant) -> Result<(), AgentError> {
        let peer_kind = self.peer_kind;
        let s = self.sessions.values_mut().find(|s| s.id == session_id).ok_or_else(|| AgentError::UnknownSession(session_id.into()))?;
        match &s.state {
            State::Handshaken { io, .. } => {
                s.state = State::Open { io: io.clone(), last_heard: now };
                Ok(())
            }
            State::Open { .. } => Err(AgentError::AlreadyOpen(s.id.clone())),
            State::Closed { reason, .. } => Err(AgentError::SessionGone { id: s.id.clone(), reason: reason.describe(peer_kind) }),
        }
    }

    /// The state of `peer`'s session, if it has or recently had one.
    pub fn state(&self, peer: &str) -> Option<SessionState> {
        self.sessions.get(peer).map(|s| match &s.state {
            State::Handshaken { .. } => SessionState::Handshaken,
            State::Open { .. } => SessionState::Open,
            State::Closed { reason, .. } => SessionState::Closed(reason.clone()),
        })
    }

    /// Peers whose stream is open (they take orders), with their handles.
    pub fn open_sessions(&self) -> Vec<(String, P)> {
        let mut v: Vec<(String, P)> = self
            .sessions
            .iter()
            .filter_map(|(p, s)| match &s.state {
                State::Open { io, .. } => Some((p.clone(), io.clone())),
                _ => None,
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Picks the session a request names, or the only open one when it
    /// names none. A peer that has handshaken but not opened its stream
    /// cannot take orders: it is not picked, and naming it is
    /// `Unavailable` (retry).
    pub fn pick(&self, name: &str) -> Result<Target<P>, AgentError> {
        let peer_kind = self.peer_kind;
        let target =
            |peer: &str, s: &Session<P>, io: &P| Target { peer: peer.to_string(), epoch: s.epoch, layout: s.layout, io: io.clone() };
        if name.is_empty() {
            let mut open = self.sessions.iter().filter_map(|(p, s)| match &s.state {
                State::Open { io, .. } => Some(target(p, s, io)),
                _ => None,
            });
            return match (open.next(), open.next()) {
                (Some(one), None) => Ok(one),
                (None, _) if self.sessions.values().all(|s| s.state.io().is_none()) => Err(AgentError::NoPeer { peer_kind }),
                (None, _) => Err(AgentError::NoOpenPeer { peer_kind }),
                _ => Err(AgentError::AmbiguousPeer { peer_kind }),
            };
        }
        match self.sessions.get(name) {
            Some(s) => match &s.state {
                State::Open { io, .. } => Ok(target(name, s, io)),
                State::Handshaken { .. } => Err(AgentError::NotOpen { peer_kind, peer: name.into() }),
                State::Closed { reason, .. } => {
                    Err(AgentError::UnknownPeer { peer_kind, peer: name.into(), closed: Some(reason.describe(peer_kind)) })
                }
            },
            None => Err(AgentError::UnknownPeer { peer_kind, peer: name.into(), closed: None }),
        }
    }

    /// Something arrived on `epoch`'s stream: its lease is renewed. False
    /// (and counted) when the epoch is not current: drop the message.
    pub fn heard(&mut self, epoch: Epoch, now: Instant) -> bool {
        let s = self.sessions.values_mut().find(|s| s.epoch == epoch);
        match s.map(|s| &mut s.state) {
            Some(State::Open { last_heard, .. }) => {
                *last_heard = now;
                true
            }
            _ => {
                self.fenced += 1;
                false
            }
        }
    }

    /// Attaches a request to `peer`'s session of `epoch` (the one it was
    /// picked on); returns its order number (the wire carries it, and the
    /// completion must echo it).
    pub fn start(&mut self, request_id: &str, peer: &str, epoch: Epoch, kind: RequestKind, waiter: W) -> Result<u64, AgentError> {
        let peer_kind = self.peer_kind;
        let ended = |reason: &CloseReason| AgentError::SessionEnded { peer_kind, peer: peer.into(), reason: reason.describe(peer_kind) };
        let Some(s) = self.sessions.get(peer) else {
            return Err(AgentError::UnknownPeer { peer_kind, peer: peer.into(), closed: None });
        };
        if s.epoch != epoch {
            return Err(ended(&CloseReason::Replaced));
        }
        match &s.state {
            State::Open { .. } => {}
            State::Handshaken { .. } => return Err(AgentError::NotOpen { peer_kind, peer: peer.into() }),
            State::Closed { reason, .. } => return Err(ended(reason)),
        }
        if self.requests.contains_key(request_id) {
            return Err(AgentError::RequestInUse(request_id.into()));
        }
        let order = self.next_order;
        self.next_order += 1;
        let p = Pending { peer: peer.to_string(), epoch, order, kind, waiter, orphaned: None };
        self.requests.insert(request_id.to_string(), p);
        Ok(order)
    }

    /// Requests pending on sessions (orphaned local work included).
    pub fn pending(&self) -> usize {
        self.requests.len()
    }

    /// Whether `request_id`'s run `order` is still pending.
    pub fn is_pending(&self, request_id: &str, order: u64) -> bool {
        self.requests.get(request_id).is_some_and(|p| p.order == order)
    }

    /// A completion arrived on `epoch`'s stream.
    pub fn completion(&mut self, epoch: Epoch, c: Completion, now: Instant) -> Routed<W> {
        if !self.heard(epoch, now) {
            return Routed::Fenced;
        }
        let Some(p) = self.requests.get(&c.request_id) else { return Routed::Unknown };
        if p.epoch != epoch || p.order != c.order || p.kind == RequestKind::Local {
            self.fenced += 1;
            return Routed::Fenced;
        }
        let p = self.requests.remove(&c.request_id).expect("present");
        let outcome = match (p.kind, c.result) {
            (RequestKind::PeerDelivers, Ok(_)) => {
                Err(Failure::new(ErrorKind::Internal, format!("the {} reported a delivery done before every byte landed", self.peer_kind)))
            }
            (_, result) => result,
        };
        Routed::Apply { request_id: c.request_id, waiter: p.waiter, outcome }
    }

    /// The request's own task ended run `order` (it met its deadline, its
    /// delivery landed, its order could not be sent): it leaves the table.
    pub fn finish(&mut self, request_id: &str, order: u64) -> Option<W> {
        if !self.is_pending(request_id, order) {
            return None;
        }
        self.requests.remove(request_id).map(|p| p.waiter)
    }

    /// Local work (a read, an executed order) ended with `result`. If its
    /// session closed meanwhile, a failure is the session's (its own error
    /// is only the consequence); bytes that landed are landed either way.
    pub fn local_done(&mut self, request_id: &str, order: u64, result: Outcome) -> ReadEnd<P> {
        if !self.is_pending(request_id, order) {
            return ReadEnd { outcome: result, notify: None };
        }
        let p = self.requests.remove(request_id).expect("present");
        let outcome = match (result, p.orphaned) {
            (Ok(m), _) => Ok(m),
            (Err(_), Some(session)) => Err(session),
            (Err(e), None) => Err(e),
        };
        let notify = self.sessions.get(&p.peer).filter(|s| s.epoch == p.epoch).and_then(|s| match &s.state {
            State::Open { io, .. } => Some(io.clone()),
            _ => None,
        });
        ReadEnd { outcome, notify }
    }

    /// How to stop a pending request (`None`: nothing to do, it is ending
    /// already or unknown here).
    pub fn cancel(&self, request_id: &str) -> Option<Cancel<P, W>> {
        let p = self.requests.get(request_id)?;
        match p.kind {
            RequestKind::Local => Some(Cancel::Stop(p.waiter.clone())),
            RequestKind::PeerWrites | RequestKind::PeerDelivers => {
                let s = self.sessions.get(&p.peer).filter(|s| s.epoch == p.epoch)?;
                match &s.state {
                    State::Open { io, .. } => Some(Cancel::Order { io: io.clone(), order: p.order }),
                    _ => None,
                }
            }
        }
    }

    /// `epoch`'s session ended for `reason`. Nothing happens if it is not
    /// current (an older epoch's stream ending late).
    pub fn close(&mut self, epoch: Epoch, reason: CloseReason, now: Instant) -> Vec<Effect<P, W>> {
        let Some(peer) = self.sessions.iter().find(|(_, s)| s.epoch == epoch && s.state.io().is_some()).map(|(p, _)| p.clone()) else {
            return Vec::new();
        };
        self.close_peer(&peer, reason, now)
    }

    /// Closes `peer`'s live session, if any: its pending requests end with
    /// the reason's failure, local work is stopped, then the session drops.
    pub fn close_peer(&mut self, peer: &str, reason: CloseReason, now: Instant) -> Vec<Effect<P, W>> {
        let Some(s) = self.sessions.get_mut(peer) else { return Vec::new() };
        let io = match std::mem::replace(&mut s.state, State::Closed { reason: reason.clone(), since: now }) {
            State::Handshaken { io, .. } | State::Open { io, .. } => io,
            closed @ State::Closed { .. } => {
                s.state = closed;
                return Vec::new();
            }
        };
        let (epoch, session_id) = (s.epoch, s.id.clone());
        // Named: with many peers, a failure says whose session ended.
        let failure = reason.failure(&format!("{} {peer:?}", self.peer_kind));
        let mut ids: Vec<String> = self.requests.iter().filter(|(_, p)| p.epoch == epoch).map(|(id, _)| id.clone()).collect();
        ids.sort();
        let mut effects = Vec::new();
        for id in ids {
            let p = self.requests.get_mut(&id).expect("present");
            if p.kind == RequestKind::Local {
                if p.orphaned.is_none() {
                    p.orphaned = Some(failure.clone());
                    effects.push(Effect::Stop { request_id: id, waiter: p.waiter.clone() });
                }
            } else {
                let p = self.requests.remove(&id).expect("present");
                effects.push(Effect::End { request_id: id, waiter: p.waiter, failure: failure.clone() });
            }
        }
        effects.push(Effect::Drop { peer: peer.to_string(), session_id, epoch, io, reason });
        effects
    }

    /// The lease tick: sessions not heard for a lease (or never opened
    /// within one) close; tombstones old enough are forgotten.
    pub fn poll(&mut self, now: Instant) -> Vec<Effect<P, W>> {
        let lease = self.lease;
        let mut expired: Vec<(String, CloseReason)> = self
            .sessions
            .iter()
            .filter_map(|(p, s)| match s.state {
                State::Handshaken { since, .. } if now.saturating_duration_since(since) >= lease => {
                    Some((p.clone(), CloseReason::NeverOpened(lease)))
                }
                State::Open { last_heard, .. } if now.saturating_duration_since(last_heard) >= lease => {
                    Some((p.clone(), CloseReason::LeaseExpired(lease)))
                }
                State::Open { .. } => self
                    .idle
                    .filter(|&idle| {
                        s.address.is_some()
                            && now.saturating_duration_since(s.last_active) >= idle
                            && !self.requests.values().any(|r| r.epoch == s.epoch)
                    })
                    .map(|idle| (p.clone(), CloseReason::Idle(idle))),
                _ => None,
            })
            .collect();
        expired.sort_by(|a, b| a.0.cmp(&b.0));
        let forget = lease * TOMBSTONE_LEASES;
        self.sessions.retain(|_, s| !matches!(s.state, State::Closed { since, .. } if now.saturating_duration_since(since) >= forget));
        let mut effects = Vec::new();
        for (peer, reason) in expired {
            if let (CloseReason::Idle(_), Some(State::Open { io, .. })) = (&reason, self.sessions.get(&peer).map(|s| &s.state)) {
                effects.push(Effect::Goodbye { io: io.clone(), reason: reason.describe(self.peer_kind) });
            }
            effects.extend(self.close_peer(&peer, reason, now));
        }
        effects
    }

    /// This agent stops: every open session is told `goodbye`, then every
    /// live session closes.
    pub fn close_all(&mut self, goodbye: &str, now: Instant) -> Vec<Effect<P, W>> {
        let mut live: Vec<String> = self.sessions.iter().filter(|(_, s)| s.state.io().is_some()).map(|(p, _)| p.clone()).collect();
        live.sort();
        let mut effects = Vec::new();
        for peer in live {
            if let Some(State::Open { io, .. }) = self.sessions.get(&peer).map(|s| &s.state) {
                effects.push(Effect::Goodbye { io: io.clone(), reason: goodbye.to_string() });
            }
            effects.extend(self.close_peer(&peer, CloseReason::ShuttingDown, now));
        }
        effects
    }
}
