//! Conversions between wire messages and the agent's own types (layouts,
//! completions, request states), and the mapping of the agent's errors to
//! gRPC status codes: the only place wire integers and `tonic::Status` meet
//! the agent's types.

use kvrail_proto::v1 as pb;
use kvrail_transfer::hooks::HookMode;
use std::time::Duration;

use kvrail_transfer::{BlockLayout, MemoryKind, PeerSpec};
use tonic::{Code, Status};

use super::decode::RequestState;
use super::error::{AgentError, ErrorKind, Failure};
use super::session::{Completion, Moved, PeerStat, SessionState};
use super::Role;
use crate::memwatch::MemReport;

pub fn role_to_pb(r: Role) -> pb::Role {
    match r {
        Role::Prefill => pb::Role::Prefill,
        Role::Decode => pb::Role::Decode,
    }
}

/// `"prefill"`, `"decode"` for a wire role (unknown values named as such).
pub fn role_name(raw: i32) -> String {
    match pb::Role::try_from(raw) {
        Ok(pb::Role::Prefill) => "prefill".into(),
        Ok(pb::Role::Decode) => "decode".into(),
        _ => format!("unknown-role ({raw})"),
    }
}

pub fn hook_mode_to_pb(m: HookMode) -> pb::HookMode {
    match m {
        HookMode::None => pb::HookMode::None,
        HookMode::Reloc => pb::HookMode::Reloc,
        HookMode::Bistro => pb::HookMode::Bistro,
        HookMode::Valgrind => pb::HookMode::Valgrind,
        HookMode::Unknown => pb::HookMode::Unspecified,
    }
}

/// `"none"`, `"reloc"`, ... for a wire hook mode (unknown values named as such).
pub fn hook_mode_name(raw: i32) -> String {
    match pb::HookMode::try_from(raw) {
        Ok(pb::HookMode::None) => "none".into(),
        Ok(pb::HookMode::Reloc) => "reloc".into(),
        Ok(pb::HookMode::Bistro) => "bistro".into(),
        Ok(pb::HookMode::Valgrind) => "valgrind".into(),
        Ok(pb::HookMode::Unspecified) => "unspecified".into(),
        Err(_) => format!("unknown ({raw})"),
    }
}

pub fn memory_kind_to_pb(k: MemoryKind) -> pb::MemoryKind {
    match k {
        MemoryKind::Host => pb::MemoryKind::Host,
        MemoryKind::Cuda => pb::MemoryKind::Cuda,
    }
}

/// A peer's memory kind: UNSPECIFIED (an agent that predates the field)
/// is host memory; an unknown value is INVALID_ARGUMENT.
pub fn memory_kind_from_pb(raw: i32) -> Result<MemoryKind, AgentError> {
    match pb::MemoryKind::try_from(raw) {
        Ok(pb::MemoryKind::Unspecified | pb::MemoryKind::Host) => Ok(MemoryKind::Host),
        Ok(pb::MemoryKind::Cuda) => Ok(MemoryKind::Cuda),
        Err(_) => Err(AgentError::Invalid(format!("agent.memory_kind {raw} is not a MemoryKind"))),
    }
}

/// A peer's side of a memory pairing, from its AgentInfo.
pub fn memory_side(info: &pb::AgentInfo) -> Result<super::validate::MemorySide, AgentError> {
    Ok(super::validate::MemorySide {
        agent_id: info.agent_id.clone(),
        kind: memory_kind_from_pb(info.memory_kind)?,
        ucx_cuda: info.ucx_cuda,
        ucx_version: info.ucx_version.clone(),
    })
}

pub fn layout_to_pb(l: &BlockLayout) -> pb::BlockLayout {
    pb::BlockLayout {
        block_bytes: l.block_bytes(),
        num_blocks: l.num_blocks(),
        num_layers: l.num_layers(),
        block_stride: l.block_stride(),
        layer_stride: l.layer_stride(),
    }
}

/// A peer's layout, validated; a bad one is INVALID_ARGUMENT.
pub fn layout_from_pb(l: Option<&pb::BlockLayout>) -> Result<BlockLayout, AgentError> {
    let l = l.ok_or_else(|| AgentError::Invalid("agent.layout is missing".into()))?;
    BlockLayout::new(l.block_bytes, l.num_blocks, l.num_layers, l.block_stride, l.layer_stride)
        .map_err(|e| AgentError::Invalid(format!("agent.layout is invalid: {e}")))
}

/// What the engine needs to reach a peer, checked for presence and bounds:
/// the region must hold the layout the peer announced.
pub fn peer_spec(info: &pb::AgentInfo, layout: &BlockLayout) -> Result<PeerSpec, AgentError> {
    let region = info.region.as_ref().ok_or_else(|| AgentError::Invalid("agent.region is missing".into()))?;
    if info.worker_address.is_empty() {
        return Err(AgentError::Invalid("agent.worker_address is empty".into()));
    }
    if region.rkey.is_empty() {
        return Err(AgentError::Invalid("agent.region.rkey is empty".into()));
    }
    if region.length < layout.region_bytes() {
        return Err(AgentError::Invalid(format!(
            "agent.region.length {} is smaller than its layout needs ({} bytes)",
            region.length,
            layout.region_bytes()
        )));
    }
    if region.base.checked_add(region.length).is_none() {
        return Err(AgentError::Invalid("agent.region base + length overflows".into()));
    }
    Ok(PeerSpec {
        worker_address: info.worker_address.clone(),
        region_base: region.base,
        region_len: region.length,
        rkey: region.rkey.clone(),
    })
}

/// The gRPC code of an error kind.
pub fn code_of(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The error kind of a gRPC code a peer sent (codes the agents do not
/// send are internal faults).
pub fn kind_of_code(code: i32) -> ErrorKind {
    match Code::from_i32(code) {
        Code::InvalidArgument => ErrorKind::InvalidArgument,
        Code::FailedPrecondition => ErrorKind::FailedPrecondition,
        Code::NotFound => ErrorKind::NotFound,
        Code::AlreadyExists => ErrorKind::AlreadyExists,
        Code::Unavailable => ErrorKind::Unavailable,
        Code::Cancelled => ErrorKind::Cancelled,
        Code::DeadlineExceeded => ErrorKind::DeadlineExceeded,
        Code::Unauthenticated => ErrorKind::Unauthenticated,
        _ => ErrorKind::Internal,
    }
}

/// The gRPC status of an agent error: its kind's code and its message.
pub fn status_of(e: &AgentError) -> Status {
    Status::new(code_of(e.kind()), e.to_string())
}

impl From<AgentError> for Status {
    fn from(e: AgentError) -> Status {
        status_of(&e)
    }
}

pub fn completion_from_pb(c: pb::Completion) -> Completion {
    let result = if c.ok { Ok(Moved { bytes: c.bytes, ops: c.ops }) } else { Err(Failure::new(kind_of_code(c.code), c.error)) };
    Completion { request_id: c.request_id, order: c.order, result }
}

pub fn completion_to_pb(c: Completion) -> pb::Completion {
    match c.result {
        Ok(m) => pb::Completion { request_id: c.request_id, order: c.order, ok: true, bytes: m.bytes, ops: m.ops, ..Default::default() },
        Err(f) => pb::Completion {
            request_id: c.request_id,
            order: c.order,
            ok: false,
            code: code_of(f.kind) as i32,
            error: f.message,
            ..Default::default()
        },
    }
}

/// A request's state on the wire (a cancelled request is FAILED with code
/// CANCELLED).
pub fn request_state_to_pb(st: &RequestState) -> pb::RequestState {
    match st {
        RequestState::Pending => pb::RequestState::Pending,
        RequestState::Done { .. } => pb::RequestState::Done,
        RequestState::Failed { .. } | RequestState::Cancelled { .. } => pb::RequestState::Failed,
    }
}

/// What `Wait`, `Transfer` and `Transfers` answer for a request.
pub fn wait_response(request_id: String, st: RequestState) -> pb::WaitResponse {
    let state = request_state_to_pb(&st) as i32;
    let us = |d: Duration| d.as_micros() as u64;
    match st {
        RequestState::Pending => pb::WaitResponse { request_id, state, ..Default::default() },
        RequestState::Done { bytes, ops, latency } => {
            pb::WaitResponse { request_id, state, bytes, ops, latency_us: us(latency), ..Default::default() }
        }
        RequestState::Failed { kind, message, latency } => pb::WaitResponse {
            request_id,
            state,
            latency_us: us(latency),
            code: code_of(kind) as i32,
            error: message,
            ..Default::default()
        },
        RequestState::Cancelled { message, latency } => pb::WaitResponse {
            request_id,
            state,
            latency_us: us(latency),
            code: Code::Cancelled as i32,
            error: message,
            ..Default::default()
        },
    }
}

/// The answer in a `Transfers` stream to a request that did not run: the
/// code and message its `Submit` would have failed with.
pub fn refused(request_id: String, e: &AgentError) -> pb::WaitResponse {
    pb::WaitResponse {
        request_id,
        state: pb::RequestState::Failed as i32,
        code: code_of(e.kind()) as i32,
        error: e.to_string(),
        ..Default::default()
    }
}

pub fn memory_to_pb(r: &MemReport) -> pb::MemoryStats {
    let latest = r.latest.clone().unwrap_or_default();
    let a = &r.assessment;
    pb::MemoryStats {
        vm_rss: latest.vm_rss,
        rss_anon: latest.rss_anon,
        rss_file: latest.rss_file,
        rss_shmem: latest.rss_shmem,
        heap: latest.heap.unwrap_or(0),
        maps: latest.maps,
        verdict: a.verdict.as_str().to_string(),
        rss_slope_mib_per_min: a.rss_slope_mib_per_min,
        heap_slope_mib_per_min: a.heap_slope_mib_per_min.unwrap_or(0.0),
        threshold_mib_per_min: a.threshold_mib_per_min,
        window_secs: a.window_secs,
        samples: a.samples_in_window as u64,
        forensics: r.forensics.as_ref().map(|f| f.summary.clone()).unwrap_or_default(),
        report_json: serde_json::to_string(r).unwrap_or_default(),
    }
}

/// One peer's session for Stats.
pub fn peer_stat_to_pb(p: PeerStat) -> pb::PeerStats {
    let state = match &p.state {
        SessionState::Handshaken => "handshaken".to_string(),
        SessionState::Open => "open".to_string(),
        SessionState::Closed(reason) => format!("closed: {}", reason.describe("peer")),
    };
    pb::PeerStats {
        agent_id: p.peer,
        address: p.address.unwrap_or_default(),
        state,
        epoch: p.epoch.0,
        age_ms: p.age.as_millis() as u64,
        bytes: p.bytes,
        requests_ok: p.requests_ok,
        requests_failed: p.requests_failed,
        pending: p.pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_round_trips_through_its_code() {
        use ErrorKind as K;
        for k in [
            K::InvalidArgument,
            K::FailedPrecondition,
            K::NotFound,
            K::AlreadyExists,
            K::Unavailable,
            K::Cancelled,
            K::DeadlineExceeded,
            K::Unauthenticated,
            K::Internal,
        ] {
            assert_eq!(kind_of_code(code_of(k) as i32), k);
        }
        assert_eq!(kind_of_code(9999), K::Internal, "a code no agent sends is a fault");
    }

    #[test]
    fn completions_round_trip() {
        for result in [Ok(Moved { bytes: 5, ops: 2 }), Err(Failure::new(ErrorKind::Cancelled, "stopped"))] {
            let c = Completion { request_id: "r".into(), order: 9, result };
            assert_eq!(completion_from_pb(completion_to_pb(c.clone())), c);
        }
    }
}
