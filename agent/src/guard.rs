//! Start-up guard: make sure UCX's memory hooks are off *before* UCX loads.
//!
//! libucs reads `UCX_MEM_*` in its load-time constructor, which runs before
//! `main`, so setting variables inside `main` is too late. The `kvrail`
//! binary therefore re-executes itself once, with the guard variables set and
//! the loader pointed at exactly one UCX: `KVRAIL_UCX_LIB` (a directory
//! holding `libucp.so.0`) when given, else the system's. Library paths that
//! hold another libucp (for example the copy `cargo` puts on the path) are
//! dropped. After the re-exec the engine verifies the result at run time.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use kvrail_transfer::hooks::GUARD_ENV;

/// Set in the re-executed process.
pub const GUARDED_VAR: &str = "KVRAIL_GUARDED";
/// Directory of the libucp to load instead of the system's.
pub const UCX_LIB_VAR: &str = "KVRAIL_UCX_LIB";
/// Demonstration only: leave UCX's hooks at their default (on).
pub const ALLOW_HOOKS_VAR: &str = "KVRAIL_ALLOW_UCX_MMAP_HOOKS";

/// Re-executes the current binary with the guard environment, unless this
/// process already is the guarded one. Returns only on error, or when
/// already guarded.
pub fn ensure() -> anyhow::Result<()> {
    if std::env::var_os(GUARDED_VAR).is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    let mut cmd = Command::new(&exe);
    cmd.arg0(argv0).args(args);
    for (k, v) in guard_env(std::env::var_os(ALLOW_HOOKS_VAR).is_some()) {
        cmd.env(k, v);
    }
    let ucx_lib = std::env::var_os(UCX_LIB_VAR).map(PathBuf::from);
    if let Some(dir) = &ucx_lib {
        if !dir.join("libucp.so.0").exists() {
            anyhow::bail!("{UCX_LIB_VAR}={} holds no libucp.so.0; point it at the lib directory of a UCX build", dir.display());
        }
    }
    let current = std::env::var_os("LD_LIBRARY_PATH").unwrap_or_default();
    cmd.env("LD_LIBRARY_PATH", library_path(&current, ucx_lib.as_deref()));
    if std::env::var_os("UCX_WARN_UNUSED_ENV_VARS").is_none() {
        // Older UCX releases do not know UCX_RCACHE_MAX_UNRELEASED.
        cmd.env("UCX_WARN_UNUSED_ENV_VARS", "n");
    }
    cmd.env(GUARDED_VAR, "1");
    let err = cmd.exec();
    Err(anyhow::anyhow!("re-executing {} with UCX's hooks off failed: {err}", exe.display()))
}

/// The variables to set: all guard variables, or none at all for the
/// hooks-on demonstration (UCX's own defaults, plus whatever the caller set).
fn guard_env(allow_hooks: bool) -> Vec<(&'static str, &'static str)> {
    if allow_hooks {
        return Vec::new();
    }
    GUARD_ENV.to_vec()
}

/// Variables to remove from a child's environment so that it re-executes
/// itself with UCX's hooks on (demonstration only): the guard's own marker
/// and every guard variable it inherited.
pub fn hooks_on_child_env() -> Vec<(String, Option<String>)> {
    let mut env: Vec<(String, Option<String>)> = GUARD_ENV.iter().map(|(k, _)| (k.to_string(), None)).collect();
    env.push((GUARDED_VAR.to_string(), None));
    env.push((ALLOW_HOOKS_VAR.to_string(), Some("1".into())));
    env
}

/// `LD_LIBRARY_PATH` with every directory holding a libucp other than
/// `chosen` removed, and `chosen` first.
pub fn library_path(current: &std::ffi::OsStr, chosen: Option<&Path>) -> OsString {
    let mut dirs: Vec<PathBuf> = chosen.map(Path::to_path_buf).into_iter().collect();
    for dir in std::env::split_paths(current) {
        if dir.as_os_str().is_empty() || Some(dir.as_path()) == chosen {
            continue;
        }
        if dir.join("libucp.so.0").exists() || dir.join("libucp.so").exists() {
            continue;
        }
        dirs.push(dir);
    }
    std::env::join_paths(dirs).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_path_drops_other_ucx_and_puts_choice_first() {
        let tmp = std::env::temp_dir().join(format!("kvrail-guard-{}", std::process::id()));
        let other = tmp.join("other");
        let chosen = tmp.join("chosen");
        let plain = tmp.join("plain");
        for d in [&other, &chosen, &plain] {
            std::fs::create_dir_all(d).unwrap();
        }
        std::fs::write(other.join("libucp.so.0"), b"").unwrap();
        std::fs::write(chosen.join("libucp.so.0"), b"").unwrap();
        let cur = std::env::join_paths([&other, &plain]).unwrap();
        let out = library_path(&cur, Some(&chosen));
        let dirs: Vec<_> = std::env::split_paths(&out).collect();
        assert_eq!(dirs, vec![chosen.clone(), plain.clone()]);
        let out = library_path(&cur, None);
        assert_eq!(std::env::split_paths(&out).collect::<Vec<_>>(), vec![plain]);
        std::fs::remove_dir_all(tmp).unwrap();
    }

    #[test]
    fn guard_env_turns_hooks_off_unless_demonstrating() {
        let on = guard_env(false);
        assert!(on.contains(&("UCX_MEM_MMAP_HOOK_MODE", "none")));
        assert!(guard_env(true).is_empty());
        let child = hooks_on_child_env();
        assert!(child.contains(&("UCX_MEM_MMAP_HOOK_MODE".to_string(), None)));
        assert!(child.contains(&(GUARDED_VAR.to_string(), None)));
    }
}
