//! `--memory`: where an agent's one region lives, and what each choice
//! needs before anything starts.
//!
//! * `host` (the default): host memory, UCX's allocation or kvrail's mmap
//!   (`--mmap-region`), as always;
//! * `cuda:N`: one `cuMemAlloc` of the region's size on CUDA device N;
//! * `cuda-ipc`: the inference engine's own KV allocation, mapped from the
//!   CUDA IPC handle it hands over on the local API.
//!
//! GPU regions are registered once with UCX as CUDA memory; pattern fills
//! and checks reach them through the driver's copies. The CUDA driver is
//! looked for at once ([`Memory::preflight`]), before any agent, UCX
//! context or port exists, so a machine without one says so in one line.

use std::fmt;
use std::str::FromStr;

use kvrail_cuda::CudaError;
use kvrail_transfer::{MemoryKind, RegionAlloc};

/// Where a region lives (`--memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Memory {
    /// Host memory.
    #[default]
    Host,
    /// One device allocation on this CUDA device.
    Cuda(usize),
    /// The engine's allocation, imported from its CUDA IPC handle.
    CudaIpc,
}

/// What an agent started with `--memory cuda-ipc` needs: the engine hands
/// it its allocation over the local API.
pub const CUDA_IPC_EXPECTS: &str = "--memory cuda-ipc maps the inference engine's own KV allocation: a CUDA IPC handle of a cuMemAlloc allocation \
     (64 bytes, 128 hex digits, from cuIpcGetMemHandle; not stream-ordered pool memory) with its device and length, handed over on the local API \
     (Sidecar AttachRegion, REGION_SOURCE_CUDA_IPC): start the agent with --region-from-client --local-socket PATH, or use --memory cuda:N for a GPU region of kvrail's own";

impl Memory {
    pub fn kind(self) -> MemoryKind {
        match self {
            Memory::Host => MemoryKind::Host,
            Memory::Cuda(_) | Memory::CudaIpc => MemoryKind::Cuda,
        }
    }

    /// Checks, before anything starts, that this memory can be had here:
    /// for GPU memory a CUDA driver (else the one line
    /// `no CUDA driver (libcuda.so.1 not found): use --memory host`) and
    /// the device (for `cuda-ipc`, named later by the engine's handle).
    pub fn preflight(self) -> Result<(), String> {
        let device = match self {
            Memory::Host => return Ok(()),
            Memory::Cuda(n) => Some(n),
            Memory::CudaIpc => None,
        };
        let info = kvrail_cuda::probe().map_err(|e| e.to_string())?;
        match device {
            Some(n) if n >= info.devices.len() => Err(CudaError::NoDevice { ordinal: n, count: info.devices.len() }.to_string()),
            // cuda-ipc: the device comes with the engine's handle.
            _ => Ok(()),
        }
    }

    /// How the engine makes a region of this memory; `mmap_region` picks
    /// kvrail's mmap over UCX's allocation for host memory.
    pub fn region_alloc(self, mmap_region: bool) -> Result<RegionAlloc, String> {
        match self {
            Memory::Host if mmap_region => Ok(RegionAlloc::Mapped { populate: true }),
            Memory::Host => Ok(RegionAlloc::Ucx),
            Memory::Cuda(device) => Ok(RegionAlloc::Cuda { device }),
            Memory::CudaIpc => Err(CUDA_IPC_EXPECTS.to_owned()),
        }
    }
}

impl fmt::Display for Memory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Memory::Host => f.write_str("host"),
            Memory::Cuda(n) => write!(f, "cuda:{n}"),
            Memory::CudaIpc => f.write_str("cuda-ipc"),
        }
    }
}

impl FromStr for Memory {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "host" => Ok(Memory::Host),
            "cuda-ipc" => Ok(Memory::CudaIpc),
            "cuda" => Err("say which CUDA device: cuda:0, cuda:1, ...".into()),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Memory::Cuda).map_err(|_| format!("{other:?}: the CUDA device must be a number, as in cuda:0")),
                None => Err(format!("unknown memory {other:?}: expected host, cuda:N or cuda-ipc")),
            },
        }
    }
}

/// The one line that names the fix when the loaded UCX cannot serve GPU
/// memory. `whose` says which agent's UCX it is ("this agent's", "peer
/// X's").
pub fn no_cuda_ucx(whose: &str, ucx_version: &str) -> String {
    format!(
        "{whose} UCX {ucx_version} has no CUDA transports (built without CUDA support): point {} at a CUDA-enabled UCX such as the libucx-cu12 wheels' (pip install libucx-cu12; KVRAIL_UCX_LIB=<site-packages>/libucx/lib)",
        crate::guard::UCX_LIB_VAR
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_choice() {
        for (text, m) in [("host", Memory::Host), ("cuda:0", Memory::Cuda(0)), ("cuda:3", Memory::Cuda(3)), ("cuda-ipc", Memory::CudaIpc)] {
            assert_eq!(text.parse::<Memory>(), Ok(m));
            assert_eq!(m.to_string(), text);
        }
        assert_eq!(" CUDA:1 ".parse::<Memory>(), Ok(Memory::Cuda(1)));
        assert!("cuda".parse::<Memory>().unwrap_err().contains("cuda:0"));
        assert!("cuda:x".parse::<Memory>().unwrap_err().contains("must be a number"));
        assert!("cuda:-1".parse::<Memory>().is_err());
        assert!("gpu".parse::<Memory>().unwrap_err().contains("expected host, cuda:N or cuda-ipc"));
    }

    #[test]
    fn host_memory_needs_nothing_and_keeps_todays_allocation() {
        assert_eq!(Memory::Host.preflight(), Ok(()));
        assert!(matches!(Memory::Host.region_alloc(false), Ok(RegionAlloc::Ucx)));
        assert!(matches!(Memory::Host.region_alloc(true), Ok(RegionAlloc::Mapped { populate: true })));
        assert!(matches!(Memory::Cuda(2).region_alloc(false), Ok(RegionAlloc::Cuda { device: 2 })));
        assert_eq!(Memory::Host.kind(), MemoryKind::Host);
        assert_eq!(Memory::CudaIpc.kind(), MemoryKind::Cuda);
    }

    #[test]
    fn gpu_memory_without_a_driver_is_one_line_naming_the_way_out() {
        let Err(CudaError::NoDriver { .. }) = kvrail_cuda::probe() else {
            eprintln!(
                "!!! SKIPPED gpu_memory_without_a_driver_is_one_line_naming_the_way_out: this build or machine has {:?}",
                kvrail_cuda::probe().map(|i| i.devices.len())
            );
            return;
        };
        assert_eq!(Memory::Cuda(0).preflight(), Err("no CUDA driver (libcuda.so.1 not found): use --memory host".to_owned()));
        // cuda-ipc says the same first: it needs the driver as much.
        assert_eq!(Memory::CudaIpc.preflight(), Memory::Cuda(0).preflight());
    }

    #[test]
    fn cuda_ipc_says_what_it_expects() {
        let e = Memory::CudaIpc.region_alloc(false).unwrap_err();
        for word in ["CUDA IPC handle", "128 hex digits", "cuMemAlloc", "local API", "--memory cuda:N"] {
            assert!(e.contains(word), "{word}: {e}");
        }
        assert!(!e.contains('\n'));
    }

    #[test]
    fn the_missing_cuda_ucx_line_names_the_fix() {
        let line = no_cuda_ucx("this agent's", "1.13.1");
        assert!(line.starts_with("this agent's UCX 1.13.1 has no CUDA transports"), "{line}");
        assert!(line.contains("point KVRAIL_UCX_LIB at a CUDA-enabled UCX such as the libucx-cu12 wheels'"), "{line}");
        assert!(!line.contains('\n'));
    }
}
