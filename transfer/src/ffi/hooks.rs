//! Run-time proof that UCX's memory hooks are off: UCM's global options read
//! back from libucm, libc's memory entry points compared byte for byte with
//! the libc file on disk, the executable's own resolved addresses compared
//! with libc's, and a counting UCM event handler that never installs hooks.

use std::os::raw::{c_int, c_void};
use std::sync::atomic::{AtomicI8, AtomicU64, Ordering};
use std::sync::Once;

use super::decls;
use super::status::Status;
use super::sys;

/// UCM's option values as the library holds them now.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UcmOptions {
    pub mmap_hook_mode: i32,
    pub malloc_hooks: bool,
}

pub(crate) fn ucm_options() -> UcmOptions {
    // SAFETY: ucm_global_opts is a data symbol libucm exports and keeps for
    // the process's life; we read its leading fields, whose layout is the
    // same in every supported release (see UcmGlobalOptsHead). UCX writes it
    // only from its load-time constructor and ucm_set_global_opts, which
    // kvrail never calls, so the read does not race.
    let head = unsafe { &decls::ucm_global_opts };
    UcmOptions { mmap_hook_mode: head.mmap_hook_mode, malloc_hooks: head.enable_malloc_hooks != 0 }
}

/// Why an entry point looks patched, one line per finding; empty when clean.
pub(crate) fn patched_entry_points() -> Vec<String> {
    let mut findings = Vec::new();
    let own = sys::own_memory_call_addresses();
    for (name, own_addr) in sys::MEMORY_CALLS.iter().zip(own) {
        let Some(libc_addr) = sys::symbol_in("libc.so.6", name) else {
            findings.push(format!("{name}: not found in libc.so.6"));
            continue;
        };
        if own_addr != libc_addr {
            let owner = sys::object_of(own_addr).map(|(f, _)| f).unwrap_or_else(|| "?".into());
            findings.push(format!("{name}: the executable calls {own_addr:#x} in {owner}, not libc's {libc_addr:#x} (relocation hook)"));
        }
        match code_matches_file(libc_addr) {
            Ok(true) => {}
            Ok(false) => findings.push(format!("{name}: first bytes of libc's {name} differ from the file on disk (code patched)")),
            Err(e) => findings.push(format!("{name}: cannot compare with the file on disk: {e}")),
        }
    }
    findings
}

/// Compares the first 16 bytes at `addr` with the bytes of the backing file
/// at the matching offset (found through /proc/self/maps).
fn code_matches_file(addr: usize) -> Result<bool, String> {
    const N: usize = 16;
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
    if let Some(m) = crate::runtime::file_mappings(&maps).find(|m| m.start <= addr && addr + N <= m.end) {
        let file_off = m.offset + (addr - m.start) as u64;
        let mut disk = [0u8; N];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(m.path).and_then(|f| f.read_exact_at(&mut disk, file_off)).map_err(|e| format!("{}: {e}", m.path))?;
        return Ok(sys::read_code(addr, N) == disk);
    }
    Err(format!("address {addr:#x} is in no file-backed mapping"))
}

static MUNMAP_EVENTS: AtomicU64 = AtomicU64::new(0);
static COUNTER: Once = Once::new();
static COUNTER_STATUS: AtomicI8 = AtomicI8::new(0);

/// UCM_EVENT_MUNMAP | UCM_EVENT_VM_UNMAPPED.
const UNMAP_EVENTS: c_int = 0x2 | 0x20000;
/// UCM_EVENT_FLAG_NO_INSTALL: register the handler, install no hook.
const NO_INSTALL: c_int = 0x0100_0000;

unsafe extern "C" fn count_unmap(_event_type: c_int, _event: *mut c_void, _arg: *mut c_void) {
    // Runs inside whatever munmap UCM intercepted: no allocation, no panic.
    MUNMAP_EVENTS.fetch_add(1, Ordering::Relaxed);
}

/// Registers (once) a UCM handler that counts the unmap events UCM delivers,
/// without asking UCM to install any hook. With hooks off it must stay at 0;
/// with hooks on (a demonstration), it counts what UCX intercepted.
pub(crate) fn install_unmap_counter() -> Result<(), Status> {
    COUNTER.call_once(|| {
        // SAFETY: registers a static callback that only bumps an atomic; the
        // arg is unused (NULL). NO_INSTALL keeps UCM from patching anything.
        let st = unsafe { decls::ucm_set_event_handler(UNMAP_EVENTS | NO_INSTALL, 0, count_unmap, std::ptr::null_mut()) };
        COUNTER_STATUS.store(st, Ordering::Relaxed);
    });
    Status(COUNTER_STATUS.load(Ordering::Relaxed)).ok()
}

/// Unmap events UCM delivered to the counting handler so far.
pub(crate) fn unmap_events() -> u64 {
    MUNMAP_EVENTS.load(Ordering::Relaxed)
}
