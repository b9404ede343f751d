//! The agent's errors: one `thiserror` enum for everything the agent
//! refuses or fails, and the kinds a request's failure is reported with.
//! They become gRPC statuses in one place only, `convert::status_of`.

use kvrail_transfer::TransferError;

/// The kind of a failure, as a caller can act on it. The gRPC edge maps
/// each kind to the status code of the same name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The caller sent something malformed or out of range; fix the call.
    InvalidArgument,
    /// The agents (or this agent's configuration) cannot serve the call.
    FailedPrecondition,
    /// The named request, peer or session does not exist (any more).
    NotFound,
    /// The id is taken.
    AlreadyExists,
    /// A peer is gone or not ready yet; retrying may succeed.
    Unavailable,
    /// Stopped on request, after nothing was in flight any more.
    Cancelled,
    /// A deadline passed.
    DeadlineExceeded,
    /// The peer did not prove the cluster secret.
    Unauthenticated,
    /// A fault inside the agents; the message says which.
    Internal,
}

/// Why a request failed: its kind and a message a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub kind: ErrorKind,
    pub message: String,
}

impl Failure {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Failure {
        Failure { kind, message: message.into() }
    }
}

/// Everything an agent refuses or fails with.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A field of a call or handshake is malformed or out of range.
    #[error("{0}")]
    Invalid(String),
    /// The agents cannot work together (version, layout, hooks), or this
    /// agent is not started for the call.
    #[error("{0}")]
    Precondition(String),
    /// The peer did not prove the cluster secret.
    #[error("{0}")]
    Unauthenticated(String),
    /// The call belongs to the other role.
    #[error("this is a {actual} agent; {hint}")]
    WrongRole { actual: &'static str, hint: &'static str },
    /// No peer to pick for a request that names none.
    #[error("no {peer_kind} is connected")]
    NoPeer { peer_kind: &'static str },
    /// A request names no peer, and the only peers are not open yet.
    #[error("a {peer_kind} has handshaked but not yet opened its session stream; retry")]
    NoOpenPeer { peer_kind: &'static str },
    /// A request names no peer, and several could take it.
    #[error("several {peer_kind}s are connected; name one in `peer`")]
    AmbiguousPeer { peer_kind: &'static str },
    /// A request names a peer that has no session.
    #[error("no connected {peer_kind} is named {peer:?}{}", closed.as_ref().map(|r| format!(" (its last session closed: {r})")).unwrap_or_default())]
    UnknownPeer { peer_kind: &'static str, peer: String, closed: Option<String> },
    /// A request names a peer that has handshaked but not opened its stream.
    #[error("{peer_kind} {peer:?} has handshaked but not yet opened its session stream; retry")]
    NotOpen { peer_kind: &'static str, peer: String },
    /// A session stream names a session this agent never admitted.
    #[error("no session {0:?}; handshake first")]
    UnknownSession(String),
    /// A session stream names a session that closed before it opened.
    #[error("session {id:?} was dropped before its stream opened ({reason}); handshake again")]
    SessionGone { id: String, reason: String },
    /// A second stream for a session that has one.
    #[error("session {0:?} already has its stream open; a session has one stream")]
    AlreadyOpen(String),
    /// The session a request was to run on ended before it started.
    #[error("the session with {peer_kind} {peer} ended before the request started ({reason}); retry")]
    SessionEnded { peer_kind: &'static str, peer: String, reason: String },
    /// The session's stream cannot take another message now.
    #[error("session stream to {peer_kind} {peer} is full or closed")]
    StreamFull { peer_kind: &'static str, peer: String },
    /// A request id in use by a request that has not ended.
    #[error("request id {0:?} is already in use; wait for it or pick a new id")]
    RequestInUse(String),
    /// No request has this id (or its final state was already returned).
    #[error("no request with id {0:?}")]
    UnknownRequest(String),
    /// This agent stops; it takes no new sessions.
    #[error("this {0} agent is shutting down")]
    ShuttingDown(&'static str),
    /// The data plane refused or failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// A request failed with this kind and message.
    #[error(transparent)]
    Failed(#[from] Failure),
}

impl AgentError {
    /// The kind a caller gets.
    pub fn kind(&self) -> ErrorKind {
        use AgentError as E;
        match self {
            E::Invalid(_) | E::AmbiguousPeer { .. } | E::AlreadyOpen(_) => ErrorKind::InvalidArgument,
            E::Precondition(_) | E::WrongRole { .. } | E::NoPeer { .. } => ErrorKind::FailedPrecondition,
            E::Unauthenticated(_) => ErrorKind::Unauthenticated,
            E::UnknownPeer { .. } | E::UnknownSession(_) | E::SessionGone { .. } | E::UnknownRequest(_) => ErrorKind::NotFound,
            E::NoOpenPeer { .. } | E::NotOpen { .. } | E::SessionEnded { .. } | E::StreamFull { .. } | E::ShuttingDown(_) => {
                ErrorKind::Unavailable
            }
            E::RequestInUse(_) => ErrorKind::AlreadyExists,
            E::Transfer(e) => transfer_kind(e),
            E::Failed(f) => f.kind,
        }
    }

    /// As a request failure (kind and message).
    pub fn failure(&self) -> Failure {
        Failure::new(self.kind(), self.to_string())
    }
}

/// The kind of a data-plane error.
pub fn transfer_kind(e: &TransferError) -> ErrorKind {
    match e {
        TransferError::Plan(_) | TransferError::OutOfBounds(_) => ErrorKind::InvalidArgument,
        TransferError::Layout(_) => ErrorKind::FailedPrecondition,
        TransferError::UnknownPeer(_) => ErrorKind::NotFound,
        TransferError::PeerFailed(_) | TransferError::EngineStopped => ErrorKind::Unavailable,
        TransferError::Cancelled => ErrorKind::Cancelled,
        TransferError::Stalled(_) => ErrorKind::DeadlineExceeded,
        TransferError::HooksOn(_) | TransferError::Pin { .. } | TransferError::Gpu(_) => ErrorKind::FailedPrecondition,
        TransferError::Ucx { .. } | TransferError::Region(_) | TransferError::Io(_) => ErrorKind::Internal,
    }
}
