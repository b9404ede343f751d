//! UCX status codes and `ucs_status_ptr_t` decoding.
//!
//! The C macros (`UCS_PTR_IS_PTR` and friends) rely on unsigned wrap-around;
//! ucx1-sys's Rust port of `UCS_PTR_IS_PTR` overflows on NULL (a panic in
//! debug builds), so the arithmetic here is our own and explicitly wrapping.

use std::ffi::CStr;
use std::fmt;
use std::os::raw::c_void;

use super::decls;

/// `UCS_ERR_LAST`: every error code is above it and below zero.
const UCS_ERR_LAST: i8 = -100;

/// A raw UCX status code. Never converted into ucx1-sys's enum, so codes a
/// newer UCX adds stay plain values.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Status(pub(crate) i8);

impl Status {
    pub(crate) const OK: Status = Status(0);
    pub(crate) const INPROGRESS: Status = Status(1);
    pub(crate) const ERR_BUSY: Status = Status(-15);
    pub(crate) const ERR_UNREACHABLE: Status = Status(-6);

    pub(crate) fn is_ok(self) -> bool {
        self.0 == 0
    }

    /// `Ok(())` for `UCS_OK`, else the status as an error.
    pub(crate) fn ok(self) -> Result<(), Status> {
        if self.is_ok() {
            Ok(())
        } else {
            Err(self)
        }
    }

    /// UCX's own text for this code (`ucs_status_string`).
    pub(crate) fn message(self) -> String {
        // SAFETY: ucs_status_string accepts any value (unknown codes map to a
        // generic text) and returns a pointer to a static NUL-terminated
        // string that lives as long as the library.
        let ptr = unsafe { decls::ucs_status_string(self.0) };
        if ptr.is_null() {
            return format!("unknown status {}", self.0);
        }
        // SAFETY: non-null, NUL-terminated, static (see above).
        unsafe { CStr::from_ptr(ptr) }.to_string_lossy().into_owned()
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message(), self.0)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (status {})", self.message(), self.0)
    }
}

/// What a `ucs_status_ptr_t` returned by a non-blocking call means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PtrStatus {
    /// NULL: the operation completed in place.
    Done,
    /// A request handle: the operation completes later through its callback.
    Pending(*mut c_void),
    /// An error code encoded in the pointer.
    Failed(Status),
}

/// Decodes a `ucs_status_ptr_t` like `UCS_PTR_IS_PTR` / `UCS_PTR_IS_ERR`, with
/// wrapping arithmetic so NULL and error values never overflow.
pub(crate) fn decode_ptr(ptr: *mut c_void) -> PtrStatus {
    let raw = ptr as usize;
    let err_last = UCS_ERR_LAST as isize as usize;
    if raw == 0 {
        PtrStatus::Done
    } else if raw.wrapping_sub(1) < err_last.wrapping_sub(1) {
        PtrStatus::Pending(ptr)
    } else {
        // An error pointer is the sign-extended status code.
        PtrStatus::Failed(Status(raw as isize as i8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ptr(v: isize) -> *mut c_void {
        v as usize as *mut c_void
    }

    #[test]
    fn null_is_done() {
        assert_eq!(decode_ptr(std::ptr::null_mut()), PtrStatus::Done);
    }

    #[test]
    fn error_pointers_decode_to_their_code() {
        for code in [-1isize, -3, -4, -16, -25, -99] {
            assert_eq!(decode_ptr(ptr(code)), PtrStatus::Failed(Status(code as i8)), "code {code}");
        }
    }

    #[test]
    fn err_last_itself_is_an_error_not_a_pointer() {
        assert_eq!(decode_ptr(ptr(-100)), PtrStatus::Failed(Status(-100)));
    }

    #[test]
    fn ordinary_addresses_are_requests() {
        for addr in [0x1000isize, 0x7fff_dead_b000, 1, 0x7fff_ffff_ffff_ffff] {
            assert_eq!(decode_ptr(ptr(addr)), PtrStatus::Pending(ptr(addr)));
        }
    }

    #[test]
    fn status_helpers() {
        assert!(Status::OK.is_ok());
        assert!(Status::OK.ok().is_ok());
        assert_eq!(Status(-3).ok(), Err(Status(-3)));
    }
}
