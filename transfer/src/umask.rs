//! The process's file-mode creation mask (the agent narrows it while it
//! creates its sockets).

/// Sets the process's file-mode creation mask; returns the previous one.
pub fn set_umask(mask: u32) -> u32 {
    crate::ffi::sys::set_umask(mask)
}
