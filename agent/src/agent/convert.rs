//! Conversions between wire messages and data-plane types, and the mapping
//! of data-plane errors to gRPC status codes (the only place that mapping
//! lives).

use kvrail_proto::v1 as pb;
use kvrail_transfer::hooks::HookMode;
use kvrail_transfer::{BlockLayout, PeerSpec, TransferError};
use tonic::{Code, Status};

use super::Role;
use crate::memwatch::MemReport;

pub fn role_to_pb(r: Role) -> pb::Role {
    match r {
        Role::Prefill => pb::Role::Prefill,
        Role::Decode => pb::Role::Decode,
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
pub fn layout_from_pb(l: Option<&pb::BlockLayout>) -> Result<BlockLayout, Status> {
    let l = l.ok_or_else(|| Status::invalid_argument("agent.layout is missing"))?;
    BlockLayout::new(l.block_bytes, l.num_blocks, l.num_layers, l.block_stride, l.layer_stride)
        .map_err(|e| Status::invalid_argument(format!("agent.layout is invalid: {e}")))
}

/// What the engine needs to reach a peer, checked for presence and bounds:
/// the region must hold the layout the peer announced.
pub fn peer_spec(info: &pb::AgentInfo, layout: &BlockLayout) -> Result<PeerSpec, Status> {
    let region = info.region.as_ref().ok_or_else(|| Status::invalid_argument("agent.region is missing"))?;
    if info.worker_address.is_empty() {
        return Err(Status::invalid_argument("agent.worker_address is empty"));
    }
    if region.rkey.is_empty() {
        return Err(Status::invalid_argument("agent.region.rkey is empty"));
    }
    if region.length < layout.region_bytes() {
        return Err(Status::invalid_argument(format!(
            "agent.region.length {} is smaller than its layout needs ({} bytes)",
            region.length,
            layout.region_bytes()
        )));
    }
    if region.base.checked_add(region.length).is_none() {
        return Err(Status::invalid_argument("agent.region base + length overflows"));
    }
    Ok(PeerSpec {
        worker_address: info.worker_address.clone(),
        region_base: region.base,
        region_len: region.length,
        rkey: region.rkey.clone(),
    })
}

/// The gRPC status for a data-plane error.
pub fn status_of(e: &TransferError) -> Status {
    let code = match e {
        TransferError::Plan(_) | TransferError::OutOfBounds(_) => Code::InvalidArgument,
        TransferError::Layout(_) => Code::FailedPrecondition,
        TransferError::UnknownPeer(_) => Code::NotFound,
        TransferError::PeerFailed(_) | TransferError::EngineStopped => Code::Unavailable,
        TransferError::Cancelled => Code::Cancelled,
        TransferError::Stalled(_) => Code::DeadlineExceeded,
        TransferError::HooksOn(_) | TransferError::Pin { .. } => Code::FailedPrecondition,
        TransferError::Ucx { .. } | TransferError::Region(_) | TransferError::Io(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
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
