//! How the result of a non-blocking UCX call is read: the check that runs
//! after every put, get and flush on the hot path. Public so the
//! micro-benchmarks and tests can drive it with plain integers.

use crate::ffi::status::{decode_ptr, PtrStatus};

/// What a `ucs_status_ptr_t` value means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusPtrKind {
    /// NULL: completed in place.
    Done,
    /// A request handle: completes later through its callback.
    Pending,
    /// An error code carried in the pointer.
    Failed(i8),
}

/// Classifies the pointer-sized value a non-blocking UCX call returned.
pub fn classify_status_ptr(raw: usize) -> StatusPtrKind {
    match decode_ptr(raw as *mut std::os::raw::c_void) {
        PtrStatus::Done => StatusPtrKind::Done,
        PtrStatus::Pending(_) => StatusPtrKind::Pending,
        PtrStatus::Failed(s) => StatusPtrKind::Failed(s.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_null_errors_and_handles() {
        assert_eq!(classify_status_ptr(0), StatusPtrKind::Done);
        assert_eq!(classify_status_ptr(-3isize as usize), StatusPtrKind::Failed(-3));
        assert_eq!(classify_status_ptr(0x7f00_1234_5000), StatusPtrKind::Pending);
    }
}
