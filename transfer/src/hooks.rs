//! UCX's memory hooks: the environment that turns them off, and the run-time
//! proof that they are off.
//!
//! UCX reads `UCX_MEM_*` in libucs's load-time constructor, before `main`, so
//! a process must be started with the variables already set (the `kvrail`
//! binary re-executes itself to guarantee that). [`verify`] then proves it:
//! UCM's own option is read back, libc's memory entry points are compared
//! with the file on disk, the executable's resolved addresses are compared
//! with libc's, and a counting UCM handler (installed without hooks) shows
//! how many unmap events UCX delivered.

use serde::Serialize;

use crate::ffi::hooks as raw;

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
        patched: raw::patched_entry_points(),
        rcache_max_unreleased: std::env::var("UCX_RCACHE_MAX_UNRELEASED").ok(),
        intercepted_unmaps: raw::unmap_events(),
    }
}

/// Unmap events UCM delivered so far (see [`HookReport::intercepted_unmaps`]).
pub fn intercepted_unmaps() -> u64 {
    raw::unmap_events()
}

/// The guard variables that are missing or different in this environment.
pub fn guard_env_missing() -> Vec<(&'static str, &'static str)> {
    GUARD_ENV.iter().copied().filter(|(k, v)| std::env::var(k).ok().as_deref() != Some(*v)).collect()
}
