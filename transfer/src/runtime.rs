//! Facts about the UCX actually loaded in this process, and process memory
//! figures only the FFI layer can read.

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

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    ffi::sys::allowed_cpus()
}

/// Binds the calling thread, and every thread it starts afterwards, to
/// `cpus` (an engine's progress thread then binds itself to its own CPU if
/// it is given one). A CPU this process may not use is an error and
/// changes nothing.
pub fn bind_this_thread(cpus: &[usize]) -> std::io::Result<()> {
    ffi::sys::bind_this_thread(cpus)
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

/// Bytes the C allocator has in use (glibc mallinfo2), Rust's heap included.
pub fn heap_in_use() -> u64 {
    ffi::sys::heap_in_use()
}

/// Anonymous memory outside the heap, mapped and touched, unmapped on drop:
/// what a leak of mmap'd ranges looks like to `/proc` (used by the test-only
/// leak injection that proves the memory self-check works).
#[derive(Debug)]
pub struct AnonMemory(ffi::sys::Mapping);

impl AnonMemory {
    /// Maps `len` bytes and writes one byte per page so they count in RSS.
    pub fn touched(len: usize) -> std::io::Result<AnonMemory> {
        let m = ffi::sys::Mapping::anonymous(len, false)?;
        for off in (0..len).step_by(4096) {
            ffi::sys::copy_in(m.addr(), m.len(), off, &[0xA5]);
        }
        Ok(AnonMemory(m))
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.len() == 0
    }
}

/// Maps and immediately unmaps `count` anonymous ranges of `len` bytes with
/// direct mmap/munmap calls (allocator churn of the kind UCX's hooks see).
/// Returns how many munmap calls were made.
pub fn map_unmap(count: usize, len: usize) -> u64 {
    let mut n = 0;
    for _ in 0..count {
        if let Ok(m) = ffi::sys::Mapping::anonymous(len, false) {
            ffi::sys::copy_in(m.addr(), m.len(), 0, &[1]);
            drop(m);
            n += 1;
        }
    }
    n
}

/// Sets the process's file-mode creation mask; returns the previous one.
pub fn set_umask(mask: u32) -> u32 {
    ffi::sys::set_umask(mask)
}

/// Transports (`tl/device`) a default UCP context finds on this machine.
pub fn transports() -> Vec<String> {
    match ffi::ucp::Context::new(&[]) {
        Ok(ctx) => parse_transports(&ctx.describe()),
        Err(e) => vec![format!("error: {} failed: {}", e.call, e.status)],
    }
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
    fn recognises_the_completion_assertion_text() {
        assert!(contains(b"..Assertion `comp->count > 0' failed..", COMPLETION_ASSERTION));
        assert!(!contains(b"comp->count >= 0", COMPLETION_ASSERTION));
    }
}
