//! Process memory outside the region, as the memory self-check sees it: the
//! bytes the C allocator has in use, and anonymous mappings made (and
//! unmapped) on purpose, the churn and leak a self-check test needs.

use crate::ffi;

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
