//! CPU affinity: which CPUs this process may run on, and binding a thread
//! (and the threads it starts afterwards) to some of them.

use crate::ffi;

/// The CPUs this process may run on, in order.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    ffi::sys::allowed_cpus()
}

/// Binds the calling thread, and every thread it starts afterwards, to
/// `cpus` (an engine's progress thread then binds itself to its own CPU if
/// it is given one). A CPU this process may not use is an error and
/// changes nothing.
pub fn bind_this_thread(cpus: &[usize]) -> std::io::Result<()> {
    ffi::sys::bind_this_thread(cpus)
}
