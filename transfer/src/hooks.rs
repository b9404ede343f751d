//! UCX's memory hooks: the environment that turns them off, and the run-time
//! proof that they are off. This is the safe half of the check; the raw
//! readings (UCM's options, the unmap counter, libc's entry points) come
//! from `ffi::hooks`.
//!
//! UCX reads `UCX_MEM_*` in libucs's load-time constructor, before `main`, so
//! a process must be started with the variables already set (the `kvrail`
//! binary re-executes itself to guarantee that). [`verify`] then proves it:
//! UCM's own option is read back, libc's memory entry points are compared
//! with the file on disk, the executable's resolved addresses are compared
//! with libc's, and a counting UCM handler (installed without hooks) shows
//! how many unmap events UCX delivered.

use serde::Serialize;

use crate::ffi::hooks::{self as raw, ENTRY_BYTES};
use crate::ffi::sys::object_of;
use crate::proc_maps::file_mappings;

/// Variables that must be in the environment before UCX loads.
pub const GUARD_ENV: [(&str, &str); 3] = [
    ("UCX_MEM_MMAP_HOOK_MODE", "none"),
    ("UCX_MEM_MALLOC_HOOKS", "no"),
    // Defence in depth: bound the registration cache's unreleased queue even
    // if hooks were somehow on.
    ("UCX_RCACHE_MAX_UNRELEASED", "1024"),
];

/// UCM's mmap hook mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HookMode {
    None,
    Reloc,
    Bistro,
    Valgrind,
    Unknown,
}

impl HookMode {
    fn from_raw(v: i32) -> HookMode {
        match v {
            0 => HookMode::None,
            1 => HookMode::Reloc,
            2 => HookMode::Bistro,
            3 => HookMode::Valgrind,
            _ => HookMode::Unknown,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HookMode::None => "none",
            HookMode::Reloc => "reloc",
            HookMode::Bistro => "bistro",
            HookMode::Valgrind => "valgrind",
            HookMode::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for HookMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`verify`] found.
#[derive(Debug, Clone, Serialize)]
pub struct HookReport {
    /// UCM's mmap hook mode, read back from libucm.
    pub mode: HookMode,
    /// UCM's malloc hooks switch, read back.
    pub malloc_hooks: bool,
    /// Why libc's entry points look patched; empty when they are clean.
    pub patched: Vec<String>,
    /// `UCX_RCACHE_MAX_UNRELEASED` as the process sees it.
    pub rcache_max_unreleased: Option<String>,
    /// Unmap events UCM delivered to kvrail's counting handler (0 when off).
    pub intercepted_unmaps: u64,
}

impl HookReport {
    /// Hooks are off and nothing is patched.
    pub fn is_off(&self) -> bool {
        self.mode == HookMode::None && self.patched.is_empty()
    }

    /// One line for a person.
    pub fn summary(&self) -> String {
        if self.is_off() {
            format!("mmap hooks off (UCM mode none, libc entry points unpatched, {} unmaps intercepted)", self.intercepted_unmaps)
        } else {
            let mut s = format!("UCM mmap hook mode is {}", self.mode);
            for p in &self.patched {
                s.push_str("; ");
                s.push_str(p);
            }
            s.push_str(". Start the process with UCX_MEM_MMAP_HOOK_MODE=none in its environment (the kvrail binary does this itself).");
            s
        }
    }
}

/// Reads back UCM's options and inspects libc's entry points. Registers the
/// counting unmap handler on first call.
pub fn verify() -> HookReport {
    if let Err(st) = raw::install_unmap_counter() {
        tracing::warn!(status = %st, "could not register the UCM unmap counter");
    }
    let opts = raw::ucm_options();
    HookReport {
        mode: HookMode::from_raw(opts.mmap_hook_mode),
        malloc_hooks: opts.malloc_hooks,
        patched: patched_entry_points(),
        rcache_max_unreleased: std::env::var("UCX_RCACHE_MAX_UNRELEASED").ok(),
        intercepted_unmaps: raw::unmap_events(),
    }
}

/// Why an entry point looks patched, one line per finding; empty when clean.
fn patched_entry_points() -> Vec<String> {
    let mut findings = Vec::new();
    for call in raw::memory_calls() {
        let (name, own_addr) = (call.name, call.called);
        let Some((libc_addr, code)) = call.libc else {
            findings.push(format!("{name}: not found in libc.so.6"));
            continue;
        };
        if own_addr != libc_addr {
            let owner = object_of(own_addr).map(|(f, _)| f).unwrap_or_else(|| "?".into());
            findings.push(format!("{name}: the executable calls {own_addr:#x} in {owner}, not libc's {libc_addr:#x} (relocation hook)"));
        }
        match code_matches_file(libc_addr, &code) {
            Ok(true) => {}
            Ok(false) => findings.push(format!("{name}: first bytes of libc's {name} differ from the file on disk (code patched)")),
            Err(e) => findings.push(format!("{name}: cannot compare with the file on disk: {e}")),
        }
    }
    findings
}

/// Compares `code`, the bytes in memory at `addr`, with the bytes of the
/// backing file at the matching offset (found through /proc/self/maps).
fn code_matches_file(addr: usize, code: &[u8; ENTRY_BYTES]) -> Result<bool, String> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|e| e.to_string())?;
    if let Some(m) = file_mappings(&maps).find(|m| m.start <= addr && addr + ENTRY_BYTES <= m.end) {
        let file_off = m.offset + (addr - m.start) as u64;
        let mut disk = [0u8; ENTRY_BYTES];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(m.path).and_then(|f| f.read_exact_at(&mut disk, file_off)).map_err(|e| format!("{}: {e}", m.path))?;
        return Ok(*code == disk);
    }
    Err(format!("address {addr:#x} is in no file-backed mapping"))
}

/// Unmap events UCM delivered so far (see [`HookReport::intercepted_unmaps`]).
pub fn intercepted_unmaps() -> u64 {
    raw::unmap_events()
}

/// The guard variables that are missing or different in this environment.
pub fn guard_env_missing() -> Vec<(&'static str, &'static str)> {
    GUARD_ENV.iter().copied().filter(|(k, v)| std::env::var(k).ok().as_deref() != Some(*v)).collect()
}
