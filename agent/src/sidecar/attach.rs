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

/// The region an AttachRegion describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub engine_id: String,
    pub model_hash: String,
    pub layout: BlockLayout,
    /// Where the layout's first byte is in the shared file.
    pub offset: u64,
    pub fd_token: String,
}

/// Checks `req` against the agent's `role`; changes nothing.
pub fn check(req: &pb::AttachRegionRequest, role: Role) -> Result<Wanted, AgentError> {
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
    match pb::RegionSource::try_from(req.source) {
        Ok(pb::RegionSource::HostFd) => check_id("fd_token", &req.fd_token)?,
        Ok(pb::RegionSource::CudaIpc) => {
            return Err(AgentError::Precondition(
                "a CUDA IPC region is attached to an agent started with --memory cuda-ipc; this agent takes host memory (REGION_SOURCE_HOST_FD)".into(),
            ))
        }
        _ => return Err(AgentError::Invalid(format!("source {} is not a RegionSource: use REGION_SOURCE_HOST_FD", req.source))),
    }
    let [tensor] = req.tensors.as_slice() else {
        return Err(AgentError::Invalid(format!(
            "{} KV cache tensors given; kvrail maps one tensor (one KV cache group) per region",
            req.tensors.len()
        )));
    };
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
    Ok(Wanted {
        engine_id: req.engine_id.clone(),
        model_hash: req.model_hash.clone(),
        layout,
        offset: tensor.offset,
        fd_token: req.fd_token.clone(),
    })
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
        let w = check(&good(), Role::Decode).unwrap();
        assert_eq!((w.offset, w.layout.num_blocks(), w.layout.num_layers()), (PAGE, 16, 2));
        assert_eq!(w.fd_token, "t");
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
            let e = check(&r, Role::Decode).unwrap_err();
            assert_eq!(e.kind(), *kind, "{e}");
            assert!(e.to_string().contains(text), "{e} lacks {text:?}");
        }
    }
}
