//! Validation of what peers and clients send, as pure functions of the
//! message and this agent's layout: no agent state, no I/O, nothing moves.
//! The RPC handlers run these before they touch anything; the fuzz target
//! (`fuzz/`) and the property tests below drive them with arbitrary input.

use kvrail_proto::v1 as pb;
use kvrail_transfer::plan::{self, TransferPlan};
use std::ops::Range;

use kvrail_transfer::{BlockLayout, MemoryKind, PeerSpec, RmaOp};

use super::convert;
use super::error::AgentError;

/// Longest request or agent id accepted, bytes.
pub const MAX_ID_LEN: usize = 256;

/// Ids are non-empty and bounded.
pub fn check_id(field: &str, id: &str) -> Result<(), AgentError> {
    if id.is_empty() {
        return Err(AgentError::Invalid(format!("{field} is empty")));
    }
    if id.len() > MAX_ID_LEN {
        return Err(AgentError::Invalid(format!("{field} is {} bytes long; the limit is {MAX_ID_LEN}", id.len())));
    }
    Ok(())
}

/// The protocol versions must be equal; the message names both.
pub fn protocol_version(peer: u32) -> Result<(), AgentError> {
    if peer != kvrail_proto::PROTOCOL_VERSION {
        return Err(AgentError::Precondition(format!(
            "protocol version mismatch: the peer speaks kvrail protocol v{peer}, this agent speaks v{}; run the same kvrail release on both sides",
            kvrail_proto::PROTOCOL_VERSION
        )));
    }
    Ok(())
}

/// The fields of a Submit that need no session: id and mode (an unknown
/// enum value is refused; UNSPECIFIED means the default, write).
pub fn submit_header(req: &pb::SubmitRequest) -> Result<pb::TransferMode, AgentError> {
    check_id("request_id", &req.request_id)?;
    pb::TransferMode::try_from(req.mode).map_err(|_| AgentError::Invalid(format!("mode {} is not a TransferMode", req.mode)))
}

/// The block lists of a Submit against the two layouts (`peer` holds the
/// source blocks, `local` the destination blocks): equal lengths, bounded,
/// in range, no destination twice. A read also gets its RMA plan.
pub fn submit_blocks(
    req: &pb::SubmitRequest,
    mode: pb::TransferMode,
    peer: &BlockLayout,
    local: &BlockLayout,
) -> Result<Option<Vec<RmaOp>>, AgentError> {
    plan::validate(peer, &req.src_blocks, local, &req.dst_blocks).map_err(|e| AgentError::Invalid(e.to_string()))?;
    Ok(match mode {
        pb::TransferMode::Read => Some(
            TransferPlan::build(peer, &req.src_blocks, local, &req.dst_blocks, 0)
                .map_err(|e| AgentError::Invalid(e.to_string()))?
                .into_ops(),
        ),
        _ => None,
    })
}

/// A whole Submit, header then blocks.
pub fn submit(req: &pb::SubmitRequest, peer: &BlockLayout, local: &BlockLayout) -> Result<Option<Vec<RmaOp>>, AgentError> {
    let mode = submit_header(req)?;
    submit_blocks(req, mode, peer, local)
}

/// How a validated Submit moves its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferPath {
    /// The prefill agent writes by RMA puts.
    Write,
    /// The prefill agent sends the blocks as active messages, accepted only
    /// into these byte ranges of this agent's region.
    Delivery(Vec<Range<u64>>),
    /// This agent reads with these RMA ops.
    Read(Vec<RmaOp>),
}

/// The block lists of a Submit checked against the two layouts, and the
/// path its bytes take. Where UCX emulates RMA in software (`deliver`:
/// tcp) the target of an emulated get is the prefill agent, which UCX can
/// abort if this agent dies mid-read; there both modes are deliveries: the
/// prefill agent sends, this agent never answers in UCX, and accepts the
/// bytes only into this request's destination blocks (the byte ranges a
/// read plan would fill).
pub fn transfer_path(
    req: &pb::SubmitRequest,
    mode: pb::TransferMode,
    deliver: bool,
    peer: &BlockLayout,
    local: &BlockLayout,
) -> Result<TransferPath, AgentError> {
    let plan_mode = if deliver { pb::TransferMode::Read } else { mode };
    Ok(match submit_blocks(req, plan_mode, peer, local)? {
        Some(ops) if deliver => TransferPath::Delivery(ops.iter().map(|o| o.dst_offset..o.dst_offset + o.len).collect()),
        Some(ops) => TransferPath::Read(ops),
        None => TransferPath::Write,
    })
}

/// One agent's side of a memory pairing: where its region lives and
/// whether its UCX was built with CUDA support.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemorySide {
    pub agent_id: String,
    pub kind: MemoryKind,
    pub ucx_cuda: bool,
    pub ucx_version: String,
}

/// Whether UCX can serve a pairing of these two regions. With host memory
/// on both sides it always can. With GPU memory on either side, both
/// agents' UCX need CUDA support: the GPU side to register and reach its
/// own device memory, the other to reach the peer's (cuda_ipc on one host,
/// the memory type in the rkey elsewhere). Otherwise FAILED_PRECONDITION,
/// one line naming the agent whose UCX lacks it and the fix.
pub fn memory_pairing(local: &MemorySide, peer: &MemorySide) -> Result<(), AgentError> {
    if local.kind == MemoryKind::Host && peer.kind == MemoryKind::Host {
        return Ok(());
    }
    let gpu = |side: &MemorySide| match side.kind {
        MemoryKind::Cuda => format!("{}'s region is GPU memory", side.agent_id),
        MemoryKind::Host => format!("{}'s region is host memory", side.agent_id),
    };
    let lacking = match (local.ucx_cuda, peer.ucx_cuda) {
        (true, true) => return Ok(()),
        (false, _) => crate::memory::no_cuda_ucx(&format!("{}'s", local.agent_id), &local.ucx_version),
        (true, false) => crate::memory::no_cuda_ucx(&format!("{}'s", peer.agent_id), &peer.ucx_version),
    };
    Err(AgentError::Precondition(format!("{} and {}, but {lacking}", gpu(local), gpu(peer))))
}

/// What an agent checks of a peer's AgentInfo once the peer is
/// authenticated: id, role (`role`, the other side's), layout (valid,
/// compatible, hash), hook mode, a memory pairing UCX can serve
/// ([`memory_pairing`] with `memory`, this agent's side), and a reachable
/// region that holds the layout.
pub fn admit(
    peer: &pb::AgentInfo,
    role: pb::Role,
    local: &BlockLayout,
    allow_hooks: bool,
    memory: &MemorySide,
) -> Result<(BlockLayout, PeerSpec), AgentError> {
    check_id("agent.agent_id", &peer.agent_id)?;
    if peer.role != role as i32 {
        return Err(AgentError::Invalid(format!("agent.role must be {}, got {}", role.as_str_name(), peer.role)));
    }
    let layout = convert::layout_from_pb(peer.layout.as_ref())?;
    local.check_compatible(&layout).map_err(|e| AgentError::Precondition(format!("incompatible KV layouts: {e}")))?;
    if peer.compat_hash != layout.compat_hash() {
        return Err(AgentError::Invalid("agent.compat_hash does not match agent.layout".into()));
    }
    if peer.hook_mode != pb::HookMode::None as i32 && !allow_hooks {
        return Err(AgentError::Precondition(format!(
            "peer {} runs with UCX mmap hook mode {}; kvrail requires none on both sides",
            peer.agent_id,
            convert::hook_mode_name(peer.hook_mode)
        )));
    }
    memory_pairing(memory, &convert::memory_side(peer)?)?;
    let spec = convert::peer_spec(peer, &layout)?;
    Ok((layout, spec))
}

/// Two agents whose engines attached regions for different models refuse
/// each other (an agent with its own region names no model and pairs with
/// any). `local_id` and `local` are this agent's id and model hash.
pub fn same_model(local_id: &str, local: &str, peer: &pb::AgentInfo) -> Result<(), AgentError> {
    if local.is_empty() || peer.model_hash.is_empty() || local == peer.model_hash {
        return Ok(());
    }
    Err(AgentError::Precondition(format!(
        "agent {} serves an engine running model {:?} and agent {local_id} one running {local:?}: KV blocks move only between engines of one model (the connector's model hash, from AttachRegion)",
        peer.agent_id, peer.model_hash
    )))
}

/// Decodes `bytes` as each message a peer or client can send and runs its
/// validation; panics if validation accepts something it must not. The
/// body of the fuzz target, and of the property test below.
pub fn fuzz_one(bytes: &[u8]) {
    use prost::Message as _;
    let local = BlockLayout::new(4096, 64, 2, 4096, 64 * 4096).expect("layout");
    let (selector, rest) = bytes.split_first().unwrap_or((&0, &[]));
    match selector % 3 {
        0 => {
            if let Ok(req) = pb::SubmitRequest::decode(rest) {
                if let Ok(ops) = submit(&req, &local, &local) {
                    let n = local.num_blocks();
                    assert!(!req.src_blocks.is_empty() && req.src_blocks.len() == req.dst_blocks.len());
                    assert!(req.src_blocks.iter().chain(&req.dst_blocks).all(|&b| b < n));
                    let mut dst = req.dst_blocks.clone();
                    dst.sort_unstable();
                    assert!(dst.windows(2).all(|w| w[0] != w[1]), "duplicate destination accepted");
                    let region = local.region_bytes();
                    for op in ops.iter().flatten() {
                        assert!(op.src_offset + op.len <= region && op.dst_offset + op.len <= region, "op out of the region: {op:?}");
                    }
                }
            }
        }
        1 => {
            if let Ok(req) = pb::HandshakeRequest::decode(rest) {
                if protocol_version(req.protocol_version).is_ok() {
                    if let Some(info) = &req.agent {
                        let memory =
                            MemorySide { agent_id: "fuzz".into(), kind: MemoryKind::Host, ucx_cuda: false, ucx_version: "1.13.1".into() };
                        if let Ok((layout, spec)) = admit(info, pb::Role::Prefill, &local, false, &memory) {
                            assert!(local.check_compatible(&layout).is_ok());
                            assert!(spec.region_len >= layout.region_bytes() && !spec.rkey.is_empty());
                            assert_ne!(info.memory_kind, pb::MemoryKind::Cuda as i32, "GPU memory admitted without CUDA in UCX");
                        }
                    }
                }
            }
        }
        _ => {
            if let Ok(up) = pb::SessionUp::decode(rest) {
                if let Some(pb::session_up::Msg::Completion(c)) = up.msg {
                    let _ = check_id("completion.request_id", &c.request_id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::error::ErrorKind;
    use proptest::prelude::*;
    use prost::Message as _;

    fn layout() -> BlockLayout {
        BlockLayout::new(4096, 64, 2, 4096, 64 * 4096).unwrap()
    }

    #[test]
    fn engines_of_different_models_refuse_each_other_and_an_unnamed_model_pairs_with_any() {
        let peer = |m: &str| pb::AgentInfo { agent_id: "p1".into(), model_hash: m.into(), ..Default::default() };
        assert!(same_model("d1", "llama-8b:bf16", &peer("llama-8b:bf16")).is_ok());
        assert!(same_model("d1", "", &peer("llama-8b:bf16")).is_ok(), "an agent with its own region names no model");
        assert!(same_model("d1", "llama-8b:bf16", &peer("")).is_ok());
        let e = same_model("d1", "llama-8b:bf16", &peer("qwen-7b:fp8")).unwrap_err();
        assert!(matches!(e, AgentError::Precondition(_)), "{e:?}");
        let m = e.to_string();
        assert!(m.contains("p1") && m.contains("d1") && m.contains("qwen-7b:fp8") && m.contains("llama-8b:bf16"), "{m}");
    }

    #[test]
    fn unknown_mode_and_bad_ids_are_invalid_argument() {
        let req = pb::SubmitRequest { request_id: "r".into(), mode: 7, src_blocks: vec![1], dst_blocks: vec![1], ..Default::default() };
        let e = submit(&req, &layout(), &layout()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("mode 7"));
        let long = pb::SubmitRequest { request_id: "x".repeat(MAX_ID_LEN + 1), ..req };
        assert!(submit(&long, &layout(), &layout()).unwrap_err().to_string().contains("limit is 256"));
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let e = protocol_version(kvrail_proto::PROTOCOL_VERSION + 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains(&format!("v{}", kvrail_proto::PROTOCOL_VERSION + 1)));
        assert!(e.to_string().contains(&format!("v{}", kvrail_proto::PROTOCOL_VERSION)));
    }

    fn side(agent_id: &str, kind: MemoryKind, ucx_cuda: bool) -> MemorySide {
        MemorySide { agent_id: agent_id.into(), kind, ucx_cuda, ucx_version: if ucx_cuda { "1.18.1" } else { "1.13.1" }.into() }
    }

    #[test]
    fn host_pairings_need_nothing_of_ucx() {
        assert!(memory_pairing(&side("d", MemoryKind::Host, false), &side("p", MemoryKind::Host, false)).is_ok());
        assert!(memory_pairing(&side("d", MemoryKind::Host, true), &side("p", MemoryKind::Host, false)).is_ok());
    }

    #[test]
    fn gpu_pairings_need_cuda_in_both_agents_ucx() {
        use MemoryKind::{Cuda, Host};
        for (lk, pk) in [(Cuda, Cuda), (Cuda, Host), (Host, Cuda)] {
            assert!(memory_pairing(&side("d", lk, true), &side("p", pk, true)).is_ok(), "{lk:?} {pk:?}");
            for (lc, pc) in [(false, true), (true, false), (false, false)] {
                let e = memory_pairing(&side("d", lk, lc), &side("p", pk, pc)).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
                let text = e.to_string();
                let culprit = if lc { "but p's UCX 1.13.1" } else { "but d's UCX 1.13.1" };
                assert!(text.contains(culprit), "{text}");
                assert!(text.contains("point KVRAIL_UCX_LIB at a CUDA-enabled UCX such as the libucx-cu12 wheels'"), "{text}");
                assert!(text.contains("GPU memory") && !text.contains('\n'), "{text}");
            }
        }
    }

    /// A valid prefill AgentInfo for `local`'s layout.
    fn prefill_info(kind: pb::MemoryKind, ucx_cuda: bool) -> pb::AgentInfo {
        let l = layout();
        pb::AgentInfo {
            agent_id: "p".into(),
            role: pb::Role::Prefill as i32,
            worker_address: vec![1; 8],
            region: Some(pb::RegionInfo { base: 1 << 20, length: l.region_bytes(), rkey: vec![2; 8] }),
            layout: Some(convert::layout_to_pb(&l)),
            compat_hash: l.compat_hash(),
            hook_mode: pb::HookMode::None as i32,
            ucx_version: "1.13.1".into(),
            transport: "sm".into(),
            memory_kind: kind as i32,
            ucx_cuda,
            cuda_device: 0,
            model_hash: String::new(),
        }
    }

    #[test]
    fn admission_refuses_a_gpu_peer_this_ucx_cannot_serve() {
        let host = side("d", MemoryKind::Host, false);
        // An agent from before the field (UNSPECIFIED) is host memory.
        assert!(admit(&prefill_info(pb::MemoryKind::Unspecified, false), pb::Role::Prefill, &layout(), false, &host).is_ok());
        assert!(admit(&prefill_info(pb::MemoryKind::Host, false), pb::Role::Prefill, &layout(), false, &host).is_ok());
        let e = admit(&prefill_info(pb::MemoryKind::Cuda, true), pb::Role::Prefill, &layout(), false, &host).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::FailedPrecondition);
        assert!(e.to_string().contains("p's region is GPU memory"), "{e}");
        // The same peer is admitted where both UCXs have CUDA support.
        assert!(admit(&prefill_info(pb::MemoryKind::Cuda, true), pb::Role::Prefill, &layout(), false, &side("d", MemoryKind::Cuda, true))
            .is_ok());
        // A host agent with an old peer that says nothing of its UCX: a GPU region here refuses it.
        let e = admit(
            &prefill_info(pb::MemoryKind::Unspecified, false),
            pb::Role::Prefill,
            &layout(),
            false,
            &side("d", MemoryKind::Cuda, true),
        )
        .unwrap_err();
        assert!(e.to_string().contains("but p's UCX"), "{e}");
        let mut odd = prefill_info(pb::MemoryKind::Host, false);
        odd.memory_kind = 9;
        let e = admit(&odd, pb::Role::Prefill, &layout(), false, &host).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("memory_kind 9"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            fuzz_one(&bytes);
        }

        #[test]
        fn accepted_submits_are_in_range_and_unique(
            src in proptest::collection::vec(0u32..80, 0..40),
            dst in proptest::collection::vec(0u32..80, 0..40),
            read in any::<bool>(),
        ) {
            let mode = if read { pb::TransferMode::Read } else { pb::TransferMode::Write } as i32;
            let req = pb::SubmitRequest { request_id: "p".into(), mode, src_blocks: src.clone(), dst_blocks: dst.clone(), ..Default::default() };
            // Through the wire encoding, as the fuzz target sees it.
            let mut bytes = vec![0u8];
            req.encode(&mut bytes).unwrap();
            fuzz_one(&bytes);
            let ok = submit(&req, &layout(), &layout()).is_ok();
            let mut sorted = dst.clone();
            sorted.sort_unstable();
            sorted.dedup();
            let expect = !src.is_empty() && src.len() == dst.len() && src.iter().chain(&dst).all(|&b| b < 64) && sorted.len() == dst.len();
            prop_assert_eq!(ok, expect);
        }
    }
}
