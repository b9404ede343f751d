//! What an engine's AttachRegion may ask for, checked before anything is
//! mapped: the region's geometry as one [`BlockLayout`] at a page-aligned
//! offset of the shared file, inside the bytes the engine says it has.

use kvrail_proto::v1 as pb;
use kvrail_transfer::BlockLayout;

use crate::agent::convert;
use crate::agent::error::AgentError;
use crate::agent::validate::check_id;
use crate::agent::Role;

/// Offsets into the shared file must be whole pages (mmap's rule).
pub const PAGE: u64 = 4096;

/// Where an attached region's memory comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A shared file, its descriptor sent on the side socket under `token`.
    HostFd { token: String },
    /// An engine's cuMemAlloc allocation on `device`, by its IPC handle.
    CudaIpc { device: usize, handle: kvrail_cuda::IpcHandle },
}

/// The region an AttachRegion describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub engine_id: String,
    pub model_hash: String,
    pub layout: BlockLayout,
    /// Where the layout's first byte is in the shared file.
    pub offset: u64,
    pub source: Source,
}

/// Checks `req` against the agent's `role` and whether it was started
/// with `--memory cuda-ipc` (`cuda_ipc`); changes nothing.
pub fn check(req: &pb::AttachRegionRequest, role: Role, cuda_ipc: bool) -> Result<Wanted, AgentError> {
    check_id("engine_id", &req.engine_id)?;
    check_id("model_hash", &req.model_hash)?;
    let want = convert::role_to_pb(role) as i32;
    if req.role != want {
        return Err(AgentError::Invalid(format!(
            "role is {} but this is a {} agent: attach a {} engine's region here",
            role_name(req.role),
            role.as_str(),
            role.as_str()
        )));
    }
    let source = match (pb::RegionSource::try_from(req.source), cuda_ipc) {
        (Ok(pb::RegionSource::HostFd), false) => {
            check_id("fd_token", &req.fd_token)?;
            Source::HostFd { token: req.fd_token.clone() }
        }
        (Ok(pb::RegionSource::CudaIpc), true) => {
            let handle = kvrail_cuda::ipc_handle_from_bytes(&req.cuda_ipc_handle)
                .map_err(|e| AgentError::Invalid(format!("cuda_ipc_handle: {e}")))?;
            Source::CudaIpc { device: req.cuda_device as usize, handle }
        }
        (Ok(pb::RegionSource::CudaIpc), false) => {
            return Err(AgentError::Precondition(
                "a CUDA IPC region is attached to an agent started with --memory cuda-ipc; this agent takes host memory (REGION_SOURCE_HOST_FD)".into(),
            ))
        }
        (Ok(pb::RegionSource::HostFd), true) => {
            return Err(AgentError::Precondition(
                "this agent was started with --memory cuda-ipc: attach the engine's GPU allocation (REGION_SOURCE_CUDA_IPC)".into(),
            ))
        }
        _ => return Err(AgentError::Invalid(format!("source {} is not a RegionSource", req.source))),
    };
    let [tensor] = req.tensors.as_slice() else {
        return Err(AgentError::Invalid(format!(
            "{} KV cache tensors given; kvrail maps one tensor (one KV cache group) per region",
            req.tensors.len()
        )));
    };
    if matches!(source, Source::CudaIpc { .. }) && tensor.offset != 0 {
        return Err(AgentError::Invalid(format!(
            "tensor offset {} into a CUDA allocation: the tensor must start where the allocation the handle names does",
            tensor.offset
        )));
    }
    if !tensor.offset.is_multiple_of(PAGE) {
        return Err(AgentError::Invalid(format!("tensor offset {} is not a multiple of the {PAGE}-byte page", tensor.offset)));
    }
    let l = tensor.layout.as_ref().ok_or_else(|| AgentError::Invalid("tensors[0].layout is missing".into()))?;
    let layout = BlockLayout::new(l.block_bytes, l.num_blocks, l.num_layers, l.block_stride, l.layer_stride)
        .map_err(|e| AgentError::Invalid(format!("tensors[0].layout is invalid: {e}")))?;
    let end = tensor.offset.checked_add(layout.region_bytes()).filter(|&e| e <= req.region_bytes).ok_or_else(|| {
        AgentError::Invalid(format!(
            "the tensor ends at byte {} of the region, past its region_bytes {}",
            u128::from(tensor.offset) + u128::from(layout.region_bytes()),
            req.region_bytes
        ))
    })?;
    debug_assert!(end <= req.region_bytes);
    Ok(Wanted { engine_id: req.engine_id.clone(), model_hash: req.model_hash.clone(), layout, offset: tensor.offset, source })
}

fn role_name(raw: i32) -> String {
    pb::Role::try_from(raw).map_or_else(|_| format!("{raw} (not a Role)"), |r| r.as_str_name().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::error::ErrorKind;

    fn good() -> pb::AttachRegionRequest {
        let layout = BlockLayout::layer_major(4096, 16, 2).unwrap();
        pb::AttachRegionRequest {
            engine_id: "engine-0".into(),
            role: pb::Role::Decode as i32,
            model_hash: "m".into(),
            source: pb::RegionSource::HostFd as i32,
            region_bytes: PAGE + layout.region_bytes(),
            fd_token: "t".into(),
            tensors: vec![pb::KvTensor { group: 0, offset: PAGE, layout: Some(convert::layout_to_pb(&layout)) }],
            ..Default::default()
        }
    }

    #[test]
    fn a_good_attach_gives_its_layout_and_offset() {
        let w = check(&good(), Role::Decode, false).unwrap();
        assert_eq!((w.offset, w.layout.num_blocks(), w.layout.num_layers()), (PAGE, 16, 2));
        assert_eq!(w.source, Source::HostFd { token: "t".into() });
    }

    #[test]
    fn every_bad_attach_is_refused_with_what_is_wrong() {
        type Edit = fn(&mut pb::AttachRegionRequest);
        let cases: &[(Edit, ErrorKind, &str)] = &[
            (|r| r.role = pb::Role::Prefill as i32, ErrorKind::InvalidArgument, "role is ROLE_PREFILL but this is a decode agent"),
            (|r| r.engine_id.clear(), ErrorKind::InvalidArgument, "engine_id is empty"),
            (|r| r.fd_token.clear(), ErrorKind::InvalidArgument, "fd_token is empty"),
            (|r| r.source = 9, ErrorKind::InvalidArgument, "source 9 is not a RegionSource"),
            (|r| r.source = pb::RegionSource::CudaIpc as i32, ErrorKind::FailedPrecondition, "--memory cuda-ipc"),
            (|r| r.tensors.clear(), ErrorKind::InvalidArgument, "0 KV cache tensors given"),
            (|r| r.tensors.push(r.tensors[0]), ErrorKind::InvalidArgument, "2 KV cache tensors given"),
            (|r| r.tensors[0].offset = 100, ErrorKind::InvalidArgument, "offset 100 is not a multiple"),
            (|r| r.region_bytes -= 1, ErrorKind::InvalidArgument, "past its region_bytes"),
            (|r| r.tensors[0].offset = u64::MAX - PAGE + 1, ErrorKind::InvalidArgument, "past its region_bytes"),
            (|r| r.tensors[0].layout.as_mut().unwrap().block_stride = 1, ErrorKind::InvalidArgument, "block_stride"),
        ];
        for (edit, kind, text) in cases {
            let mut r = good();
            edit(&mut r);
            let e = check(&r, Role::Decode, false).unwrap_err();
            assert_eq!(e.kind(), *kind, "{e}");
            assert!(e.to_string().contains(text), "{e} lacks {text:?}");
        }
    }

    #[test]
    fn a_cuda_ipc_agent_takes_a_good_handle_at_offset_zero_only() {
        let handle: Vec<u8> = (1..=64).collect();
        let cuda = |edit: fn(&mut pb::AttachRegionRequest)| {
            let mut r = good();
            r.source = pb::RegionSource::CudaIpc as i32;
            r.cuda_ipc_handle = (1..=64).collect();
            r.cuda_device = 1;
            r.tensors[0].offset = 0;
            edit(&mut r);
            check(&r, Role::Decode, true)
        };
        let w = cuda(|_| {}).unwrap();
        assert_eq!(w.source, Source::CudaIpc { device: 1, handle: handle.try_into().unwrap() });
        type Case = (fn(&mut pb::AttachRegionRequest), ErrorKind, &'static str);
        let cases: &[Case] = &[
            (|r| r.cuda_ipc_handle.truncate(10), ErrorKind::InvalidArgument, "cuda_ipc_handle"),
            (|r| r.cuda_ipc_handle = vec![0; 64], ErrorKind::InvalidArgument, "cuda_ipc_handle"),
            (|r| r.tensors[0].offset = PAGE, ErrorKind::InvalidArgument, "must start where the allocation"),
            (|r| r.source = pb::RegionSource::HostFd as i32, ErrorKind::FailedPrecondition, "REGION_SOURCE_CUDA_IPC"),
        ];
        for (edit, kind, text) in cases {
            let e = cuda(*edit).unwrap_err();
            assert_eq!(e.kind(), *kind, "{e}");
            assert!(e.to_string().contains(text), "{e} lacks {text:?}");
        }
    }
}
