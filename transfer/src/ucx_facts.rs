//! Facts about the UCX actually loaded in this process: its version and
//! library path, whether kvrail supports it, whether its libuct was built
//! with assertions, and the transports a default context finds.

use serde::Serialize;

use crate::ffi;
use crate::proc_maps::loaded_object;

/// The UCX release the bindings were generated from.
pub const UCX_HEADERS_VERSION: &str = "1.12.1";

/// UCX releases (major, minor) kvrail is built and tested against.
pub const SUPPORTED_UCX: [(u32, u32); 4] = [(1, 13), (1, 18), (1, 21), (1, 22)];

/// The UCX library this process runs on.
#[derive(Debug, Clone, Serialize)]
pub struct UcxRuntime {
    /// `ucp_get_version_string()` of the loaded library.
    pub version: String,
    /// Path of the libucp object actually loaded.
    pub library: String,
    /// Whether kvrail supports this version.
    pub supported: bool,
    /// Whether the loaded libuct was built with assertions (Debian's and
    /// Ubuntu's packages are; release builds such as PyPI's are not). See
    /// [`uct_has_assertions`].
    pub assertions: bool,
}

/// Version and path of the loaded libucp.
pub fn ucx_runtime() -> UcxRuntime {
    let version = ffi::ucp::loaded_version();
    let supported = parse_version(&version).is_some_and(is_supported);
    UcxRuntime {
        version,
        library: ffi::ucp::loaded_library().unwrap_or_else(|| "unknown".into()),
        supported,
        assertions: uct_has_assertions(),
    }
}

/// The text of the check UCX runs before invoking a send completion. A
/// libuct built with assertions carries it; one built without has no trace
/// of it.
const COMPLETION_ASSERTION: &[u8] = b"comp->count > 0";

/// Whether the libuct loaded in this process was built with assertions,
/// read once from the object file `/proc/self/maps` names.
///
/// It decides how tcp sends its data. When a tcp peer dies while a
/// zero-copy send to it is half written, UCX (1.13 up to at least 1.22,
/// `uct_tcp_ep_sendv`) completes that send twice: once while purging the
/// failed endpoint, once more on the way out. A build without assertions
/// lets the second completion pass; one with assertions aborts the whole
/// process on it (`Assertion 'comp->count > 0' failed`), so a prefill agent
/// would die with the decode agent it was sending to.
pub fn uct_has_assertions() -> bool {
    static ASSERTIONS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ASSERTIONS.get_or_init(|| {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        loaded_object(&maps, "libuct.so")
            .and_then(|path| std::fs::read(path).ok())
            .is_some_and(|text| contains(&text, COMPLETION_ASSERTION))
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// `"1.13.1"` -> `(1, 13)`.
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    // The FFI layer parses the loaded version itself (it decides which
    // request fields that UCX reads); one parser serves both.
    ffi::ucp::release(v)
}

/// 1.12 (the headers) up to the newest release tested.
pub fn is_supported((major, minor): (u32, u32)) -> bool {
    major == 1 && (12..=22).contains(&minor)
}

/// Transports (`tl/device`) a default UCP context finds on this machine.
pub fn transports() -> Vec<String> {
    match ffi::ucp::Context::new(&[]) {
        Ok(ctx) => parse_transports(&ctx.describe()),
        Err(e) => vec![format!("error: {} failed: {}", e.call, e.status)],
    }
}

/// UCX's CUDA transports found in a transport list ([`transports`]): the
/// ones a UCX built with CUDA support brings, when the CUDA driver loads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CudaTransports {
    /// Copies between host and device memory (and the memory type checks
    /// every CUDA use of UCX needs).
    pub cuda_copy: bool,
    /// Device memory of another process on the same host.
    pub cuda_ipc: bool,
    /// CPU access to device memory through GDRCopy's BAR mapping.
    pub gdr_copy: bool,
}

impl CudaTransports {
    /// Which CUDA transports `transports` (`tl/device` names) holds.
    pub fn of(transports: &[String]) -> CudaTransports {
        let has = |tl: &str| transports.iter().any(|t| t.split('/').next() == Some(tl));
        CudaTransports { cuda_copy: has("cuda_copy"), cuda_ipc: has("cuda_ipc"), gdr_copy: has("gdr_copy") }
    }
}

/// The CUDA transport modules of the loaded UCX (`libuct_cuda`,
/// `libuct_cuda_gdrcopy`), as files in its module directory
/// (`UCX_MODULE_DIR`, else `ucx/` beside the loaded libucp). A UCX built
/// without CUDA, such as Debian's, has none.
pub fn cuda_modules() -> Vec<String> {
    let dir = match std::env::var_os("UCX_MODULE_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => match ffi::ucp::loaded_library() {
            Some(lib) => std::path::Path::new(&lib).with_file_name("ucx"),
            None => return Vec::new(),
        },
    };
    let mut found: Vec<String> = std::fs::read_dir(&dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|name| is_cuda_module(name))
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// `libuct_cuda.so`, `libuct_cuda.so.0`, `libuct_cuda_gdrcopy.so.0`, ...
fn is_cuda_module(name: &str) -> bool {
    ["libuct_cuda.so", "libuct_cuda_gdrcopy.so"].iter().any(|m| name.starts_with(m))
}

/// Whether the loaded UCX was built with CUDA support (its `libuct_cuda`
/// module is there), read once. This is what a GPU region needs of UCX;
/// whether the transports come up also takes a driver and a device
/// ([`CudaTransports`]).
pub fn has_cuda_support() -> bool {
    static CUDA: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CUDA.get_or_init(|| cuda_modules().iter().any(|m| m.starts_with("libuct_cuda.so")))
}

/// Picks the `tl/device` names out of `ucp_context_print_info` text.
fn parse_transports(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .lines()
        .filter(|l| l.contains("resource"))
        .filter_map(|l| l.split_whitespace().last())
        .filter(|w| w.contains('/'))
        .map(str::to_string)
        .collect();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions() {
        assert_eq!(parse_version("1.13.1"), Some((1, 13)));
        assert_eq!(parse_version("1.22.0-rc1"), Some((1, 22)));
        assert_eq!(parse_version("garbage"), None);
        assert!(is_supported((1, 18)));
        assert!(!is_supported((2, 0)));
        assert!(!is_supported((1, 9)));
    }

    #[test]
    fn finds_the_cuda_transports_in_a_transport_list() {
        let list: Vec<String> = ["tcp/lo", "cuda_copy/cuda", "posix/memory", "gdr_copy/cuda"].map(String::from).to_vec();
        assert_eq!(CudaTransports::of(&list), CudaTransports { cuda_copy: true, cuda_ipc: false, gdr_copy: true });
        let plain: Vec<String> = ["tcp/lo", "sysv/memory", "cma/memory"].map(String::from).to_vec();
        assert_eq!(CudaTransports::of(&plain), CudaTransports::default());
        // A device named like a transport is not the transport.
        assert!(!CudaTransports::of(&["tcp/cuda_ipc".to_string()]).cuda_ipc);
    }

    #[test]
    fn names_the_cuda_modules_only() {
        for name in ["libuct_cuda.so", "libuct_cuda.so.0", "libuct_cuda.so.0.0.0", "libuct_cuda_gdrcopy.so.0"] {
            assert!(is_cuda_module(name), "{name}");
        }
        for name in ["libuct_cma.so.0", "libuct_ib.so", "libucm_cuda.so.0", "libuct_cudax.txt"] {
            assert!(!is_cuda_module(name), "{name}");
        }
    }

    #[test]
    fn recognises_the_completion_assertion_text() {
        assert!(contains(b"..Assertion `comp->count > 0' failed..", COMPLETION_ASSERTION));
        assert!(!contains(b"comp->count >= 0", COMPLETION_ASSERTION));
    }
}
