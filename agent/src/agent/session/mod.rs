//! The session protocol as a pure state machine: an agent's peers, each
//! with its session, epoch, lease and the requests pending on it.
//!
//! [`SessionTable`] never touches a socket, a task or a clock: events come
//! in as method calls (a handshake admitted, a stream opened, a message
//! heard, a completion, a read done, a cancel, a stream ended, a lease
//! tick), each with the time it happened, and what the I/O layer must do
//! comes out as [`Effect`]s (say goodbye down this stream, end these
//! requests with this failure, stop this read, drop this session and
//! disconnect its engine peer). Both roles use it: the decode agent keeps
//! one session per prefill agent, the prefill agent one per decode agent
//! it serves. `decode`, `prefill` and `effects` are the thin async layer.
//!
//! Fencing: every admitted session gets a fresh [`Epoch`]; a peer that
//! handshakes again under the same agent id replaces its session with a new
//! epoch, and whatever still arrives from the old one (messages,
//! completions, a stream's end) is counted and dropped, never applied.
//! Each request run gets an order number that its completion must echo, so
//! a late completion of an earlier run of a reused request id is fenced too.

mod table;
#[cfg(test)]
mod tests;

use std::fmt;
use std::time::Duration;

pub use table::{Cancel, Effect, PeerStat, ReadEnd, Routed, SessionTable, Target};

use super::error::{ErrorKind, Failure};

/// Identifies one admitted session of a peer; a re-handshake gets a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a session is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// Admitted at handshake; its stream is not open, so it takes no orders.
    Handshaken,
    /// Its stream is open: it takes orders and must be heard within a lease.
    Open,
    /// Over, for this reason.
    Closed(CloseReason),
}

/// Why a session closed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The peer said goodbye (it is shutting down), with its words.
    Goodbye(String),
    /// This agent is shutting down and said goodbye.
    ShuttingDown,
    /// A session this agent dialled carried no request for this long; it
    /// said goodbye (the next request to the peer dials again).
    Idle(Duration),
    /// The peer handshaked again under the same agent id (it restarted).
    Replaced,
    /// Handshaken, but its stream was not opened within a lease.
    NeverOpened(Duration),
    /// Nothing heard, not even a heartbeat, for a lease.
    LeaseExpired(Duration),
    /// The stream ended without a goodbye.
    StreamEnded,
    /// The stream broke, with the transport's words.
    Broken(String),
    /// The peer's registry entry went away and did not come back (it
    /// stopped, or stopped answering etcd): the registry's words.
    LeftRegistry(String),
}

impl CloseReason {
    /// Whether this is a failure (worth a warning) rather than an orderly
    /// close by one side.
    pub fn is_failure(&self) -> bool {
        !matches!(self, CloseReason::Goodbye(_) | CloseReason::ShuttingDown | CloseReason::Idle(_))
    }

    /// The reason in words, naming the peer by its kind ("prefill agent").
    pub fn describe(&self, peer_kind: &str) -> String {
        match self {
            CloseReason::Goodbye(why) => format!("the {peer_kind} said goodbye: {why}"),
            CloseReason::ShuttingDown => "this agent is shutting down".into(),
            CloseReason::Idle(idle) => format!("no request to the {peer_kind} for {idle:?}: the dialled session closed"),
            CloseReason::Replaced => format!("the {peer_kind} re-handshaked (restarted); its earlier requests are void"),
            CloseReason::NeverOpened(lease) => format!("the {peer_kind} never opened its session stream within its lease ({lease:?})"),
            CloseReason::LeaseExpired(lease) => format!("nothing heard from the {peer_kind} for {lease:?}: its lease expired"),
            CloseReason::StreamEnded => format!("the {peer_kind} closed its session without a goodbye"),
            CloseReason::Broken(why) => format!("the session with the {peer_kind} broke: {why}"),
            CloseReason::LeftRegistry(why) => format!("{why}; its session is closed"),
        }
    }

    /// What the session's pending requests fail with.
    pub fn failure(&self, peer_kind: &str) -> Failure {
        Failure::new(ErrorKind::Unavailable, self.describe(peer_kind))
    }
}

/// Who moves a pending request's bytes, which decides how it ends and how
/// it is stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// The peer writes by RMA puts and answers with a completion (a decode
    /// agent's push).
    PeerWrites,
    /// The peer sends active messages into a tag this agent counts, and
    /// answers only a failure (a decode agent's push over tcp).
    PeerDelivers,
    /// This agent moves the bytes itself (a decode agent's read, a prefill
    /// agent's write order); stopping it stops its own work.
    Local,
}

/// What a finished transfer moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Moved {
    pub bytes: u64,
    pub ops: u64,
}

/// How a request's transfer ended, before the request's state is set.
pub type Outcome = Result<Moved, Failure>;

/// A peer's report that a write order finished (the wire's `Completion`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    pub request_id: String,
    /// The order number of the run it answers.
    pub order: u64,
    pub result: Outcome,
}
