//! libc pieces of the data plane: anonymous or shared-file memory for the region and
//! copies in and out of it, an eventfd and an epoll set for the progress
//! thread, the allocator's in-use byte count, the dynamic loader's view of
//! an address or a symbol, CPU affinity and the umask.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

/// One page-aligned mapping (anonymous, or of a shared file), unmapped on drop.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain process memory with no thread affinity; all
// access to its bytes goes through `copy_in` / `copy_out`, which take `&self`
// and copy with raw pointers, the same way UCX (another thread or process)
// reads and writes it. No Rust reference to its bytes is ever created.
unsafe impl Send for Mapping {}
// SAFETY: see `Send`: shared access only copies through raw pointers.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps `len` bytes of anonymous private memory; with `populate`, faults
    /// every page in now so the first transfer does not pay for it.
    pub(crate) fn anonymous(len: usize, populate: bool) -> io::Result<Mapping> {
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "region length is zero"));
        }
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
        if populate {
            flags |= libc::MAP_POPULATE;
        }
        // SAFETY: a fresh anonymous mapping at an address the kernel picks:
        // it aliases nothing, and we check the result before using it.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, -1, 0) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }

    /// Maps `len` bytes at `offset` (a whole number of pages) of the file
    /// behind `fd` (a memfd or a /dev/shm file another process shares)
    /// read-write and shared, so that both processes see the same pages.
    /// The file must hold `offset + len` bytes: a shorter one is refused
    /// here, since touching a page past its end would raise SIGBUS. With
    /// `populate`, every page is faulted in now.
    pub(crate) fn shared_file(fd: BorrowedFd<'_>, offset: u64, len: usize, populate: bool) -> io::Result<Mapping> {
        let invalid = |m: String| io::Error::new(io::ErrorKind::InvalidInput, m);
        if len == 0 {
            return Err(invalid("region length is zero".into()));
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
        if !offset.is_multiple_of(page) {
            return Err(invalid(format!("offset {offset} is not a multiple of the {page}-byte page")));
        }
        let size = std::fs::File::from(fd.try_clone_to_owned()?).metadata()?.len();
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(invalid(format!("the shared file holds {size} bytes, fewer than the region's {len} at offset {offset}")));
        }
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid(format!("offset {offset} does not fit an off_t")))?;
        let mut flags = libc::MAP_SHARED;
        if populate {
            flags |= libc::MAP_POPULATE;
        }
        // SAFETY: a new mapping at an address the kernel picks, so it
        // aliases no Rust memory; the file covers all `len` bytes from the
        // page-aligned offset (checked above), and the result is checked
        // before use. Other processes writing the same pages is what the
        // mapping is for: its bytes are only ever copied through raw
        // pointers (see `Send`). The file is the engine's, run by the same
        // user; were it truncated later, touching the lost pages would
        // raise SIGBUS, as for any shared mapping.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd.as_raw_fd(), offset) };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned NULL"))?;
        Ok(Mapping { ptr, len })
    }

    pub(crate) fn addr(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }
}

/// `MADV_POPULATE_WRITE` (Linux 5.14): fault pages in as if written, without
/// writing; not in every libc crate release's constants.
const MADV_POPULATE_WRITE: libc::c_int = 23;

/// Pre-faults the page-table entries of `[addr, addr + len)` in this process,
/// a range some other owner mapped (a peer's shared-memory segment attached by
/// UCX). Contents are untouched; an unmapped or read-only range is an error,
/// never a fault.
pub(crate) fn populate_write(addr: usize, len: usize) -> io::Result<()> {
    // SAFETY: MADV_POPULATE_WRITE only establishes page-table entries as a
    // write fault would, without writing: it cannot change any byte of the
    // range, and the kernel checks the range (ENOMEM if unmapped, EFAULT /
    // EINVAL if not writable) instead of faulting the process.
    let rc = unsafe { libc::madvise(addr as *mut libc::c_void, len, MADV_POPULATE_WRITE) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly what mmap returned; the owner of this
        // mapping (the registration) has been unregistered from UCX before it
        // lets go of the mapping, so nothing uses the range any more.
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::warn!(error = %io::Error::last_os_error(), "munmap of region failed");
        }
    }
}

/// Copies `dst.len()` bytes from `base + offset` into `dst`. The caller has
/// checked that `[offset, offset + dst.len())` lies inside a live mapping of
/// `len` bytes at `base`.
pub(crate) fn copy_out(base: usize, len: usize, offset: usize, dst: &mut [u8]) {
    assert!(offset.checked_add(dst.len()).is_some_and(|end| end <= len), "copy_out out of bounds");
    // SAFETY: the range is inside the live mapping (asserted above; the
    // caller keeps the mapping alive for the call). `dst` is a distinct Rust
    // buffer, so the ranges do not overlap. Bytes may be concurrently written
    // by UCX; we only copy them, never form a reference to them.
    unsafe { std::ptr::copy_nonoverlapping((base + offset) as *const u8, dst.as_mut_ptr(), dst.len()) };
}

/// Copies `src` to `base + offset`; same contract as [`copy_out`].
pub(crate) fn copy_in(base: usize, len: usize, offset: usize, src: &[u8]) {
    assert!(offset.checked_add(src.len()).is_some_and(|end| end <= len), "copy_in out of bounds");
    // SAFETY: as in copy_out, with the direction reversed.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), (base + offset) as *mut u8, src.len()) };
}

/// A non-blocking eventfd used to wake the progress thread.
#[derive(Debug)]
pub(crate) struct EventFd(OwnedFd);

impl EventFd {
    pub(crate) fn new() -> io::Result<EventFd> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor we own exclusively.
        Ok(EventFd(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Makes the fd readable (wakes a sleeper). Never blocks.
    pub(crate) fn notify(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd. A full
        // counter (EAGAIN) already means "readable", so the result is moot.
        let _ = unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Resets the fd to not-readable.
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from our own non-blocking fd.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
    }

    pub(crate) fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// An epoll set over a few fds, for sleeping until any becomes readable.
#[derive(Debug)]
pub(crate) struct Poller(OwnedFd);

impl Poller {
    pub(crate) fn new(fds: &[RawFd]) -> io::Result<Poller> {
        // SAFETY: plain syscall; the result is checked.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if ep < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: ep is a fresh descriptor we own exclusively.
        let poller = Poller(unsafe { OwnedFd::from_raw_fd(ep) });
        for &fd in fds {
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: fd as u64 };
            // SAFETY: valid epoll fd, a caller-owned fd that outlives the
            // poller (the engine drops the poller first), and a live event.
            let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        Ok(poller)
    }

    /// Sleeps until a registered fd is readable or `timeout_ms` passes.
    pub(crate) fn wait(&self, timeout_ms: i32) {
        let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 4];
        // SAFETY: the buffer is live and its length is passed; EINTR and
        // timeouts are both fine for a caller that re-checks its state.
        let _ = unsafe { libc::epoll_wait(self.0.as_raw_fd(), evs.as_mut_ptr(), evs.len() as i32, timeout_ms) };
    }
}

/// Bytes the C allocator has handed out and not yet freed (mallinfo2:
/// in-use arena chunks plus mmapped chunks). Rust's heap is glibc's here.
pub(crate) fn heap_in_use() -> u64 {
    // SAFETY: mallinfo2 only reads allocator statistics under its own lock.
    let mi = unsafe { libc::mallinfo2() };
    (mi.uordblks + mi.hblkhd) as u64
}

/// The file and base address of the loaded object that contains `addr`.
pub(crate) fn object_of(addr: usize) -> Option<(String, usize)> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    // SAFETY: dladdr only reads loader tables and fills the live struct.
    let rc = unsafe { libc::dladdr(addr as *const libc::c_void, &mut info) };
    if rc == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the loader,
    // valid while the object stays loaded (libc and libucp never unload).
    let name = unsafe { std::ffi::CStr::from_ptr(info.dli_fname) }.to_string_lossy().into_owned();
    Some((name, info.dli_fbase as usize))
}

/// Address of `symbol` as defined by the already-loaded object `lib` (looked
/// up in that object, not through any interposer).
pub(crate) fn symbol_in(lib: &str, symbol: &str) -> Option<usize> {
    let lib = std::ffi::CString::new(lib).ok()?;
    let sym = std::ffi::CString::new(symbol).ok()?;
    // SAFETY: RTLD_NOLOAD never loads anything new; it only returns a handle
    // to an object already in the process (or NULL).
    let handle = unsafe { libc::dlopen(lib.as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return None;
    }
    // SAFETY: valid handle and NUL-terminated name.
    let addr = unsafe { libc::dlsym(handle, sym.as_ptr()) };
    // SAFETY: drops the reference NOLOAD took; the object stays loaded.
    unsafe { libc::dlclose(handle) };
    (!addr.is_null()).then_some(addr as usize)
}

/// Binds the calling thread to the CPUs in `cpus` (`sched_setaffinity(2)`
/// on the thread itself); threads it starts afterwards inherit the set.
pub(crate) fn bind_this_thread(cpus: &[usize]) -> io::Result<()> {
    if cpus.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no CPU given"));
    }
    if let Some(cpu) = cpus.iter().find(|&&c| c >= libc::CPU_SETSIZE as usize) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("CPU {cpu} is beyond CPU_SETSIZE")));
    }
    // SAFETY: cpu_set_t is plain bits, all-zero is the empty set; CPU_SET
    // writes one bit inside it (every cpu < CPU_SETSIZE, checked above);
    // pid 0 is the calling thread, and the set outlives the call. The
    // result is checked.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The CPUs the calling thread may run on (`sched_getaffinity(2)`).
pub(crate) fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: all-zero cpu_set_t is the empty set; the kernel fills the live
    // local set of the size we pass; CPU_ISSET reads bits below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| libc::CPU_ISSET(c, &set)).collect())
    }
}

/// `umask(2)`: sets the file-mode creation mask, returns the previous one.
pub(crate) fn set_umask(mask: u32) -> u32 {
    // SAFETY: umask only swaps a per-process integer; it cannot fail.
    unsafe { libc::umask(mask as libc::mode_t) as u32 }
}
