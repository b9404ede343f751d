//! The raw half of the hooks check (the safe half, which decides what the
//! readings mean, is the crate's `hooks` module): UCM's global options read
//! back from libucm, a counting UCM unmap handler that never installs hooks,
//! and libc's memory entry points as this process sees them (where the
//! executable's own calls go, where libc defines them, their first bytes).

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

/// Bytes of an entry point read for comparison with the file on disk.
pub(crate) const ENTRY_BYTES: usize = 16;

/// One libc memory call UCM hooks (by relocation or by patching code).
#[derive(Debug, Clone, Copy)]
pub(crate) struct MemoryCall {
    pub name: &'static str,
    /// The address the executable itself calls (its GOT entry as resolved
    /// now).
    pub called: usize,
    /// libc's own definition (looked up in libc.so.6, past any interposer)
    /// and its first [`ENTRY_BYTES`] bytes as they are in memory now; `None`
    /// if libc.so.6 does not define it.
    pub libc: Option<(usize, [u8; ENTRY_BYTES])>,
}

/// mmap, munmap, mremap and madvise as this process sees them.
pub(crate) fn memory_calls() -> [MemoryCall; 4] {
    let called = [
        libc::mmap as *const () as usize,
        libc::munmap as *const () as usize,
        libc::mremap as *const () as usize,
        libc::madvise as *const () as usize,
    ];
    let names = ["mmap", "munmap", "mremap", "madvise"];
    std::array::from_fn(|i| MemoryCall {
        name: names[i],
        called: called[i],
        libc: sys::symbol_in("libc.so.6", names[i]).map(|addr| (addr, entry_bytes(addr))),
    })
}

/// The first [`ENTRY_BYTES`] bytes of code at `addr`, an address dlsym
/// returned for a function of libc.so.6 (private: no other address may
/// reach the read).
fn entry_bytes(addr: usize) -> [u8; ENTRY_BYTES] {
    let mut out = [0u8; ENTRY_BYTES];
    // SAFETY: addr is the entry of a function of a loaded object that never
    // unloads (libc.so.6, resolved by dlsym in memory_calls), so at least
    // ENTRY_BYTES (16) bytes of mapped, readable text follow it; we copy
    // them into our own buffer and never form a reference to the text.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), ENTRY_BYTES) };
    out
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
