//! Safe owners of UCP objects.
//!
//! Ownership encodes the order UCX needs: a [`RemoteRegion`] (unpacked rkey)
//! holds its [`Endpoint`], an endpoint holds its [`Worker`], a worker holds
//! its [`Registration`] and [`Context`], a registration holds its context
//! and its memory. Dropping any of them releases exactly its own UCX object
//! after everything built on it is gone.
//!
//! A worker and everything built on it is `!Send`: it lives and dies on the
//! progress thread that created it. Requests carry an `Rc<OpCounter>` as
//! user data, reclaimed by the completion callback, so a counter outlives
//! every request that reports to it, whatever the caller does meanwhile.

use std::cell::Cell;
use std::ffi::{CStr, CString};
use std::os::fd::BorrowedFd;
use std::os::raw::{c_int, c_void};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ucx1_sys as sys_ucx;

use super::am::{self, AmSink, HEADER_LEN};
use super::decls::{self, ErrCallback, SendCallback};
use super::status::{decode_ptr, PtrStatus, Status};
use super::sys::{self, Mapping};

/// A UCX failure: the call that failed and its raw status.
#[derive(Debug, Clone)]
pub(crate) struct UcxFailure {
    pub call: &'static str,
    pub status: Status,
}

impl UcxFailure {
    fn new(call: &'static str, status: Status) -> Self {
        UcxFailure { call, status }
    }
}

fn check(call: &'static str, raw: i8) -> Result<(), UcxFailure> {
    Status(raw).ok().map_err(|s| UcxFailure::new(call, s))
}

/// The version string of the libucp actually loaded (not the headers').
pub(crate) fn loaded_version() -> String {
    // SAFETY: returns a pointer to a static NUL-terminated string.
    let p = unsafe { sys_ucx::ucp_get_version_string() };
    if p.is_null() {
        return "unknown".into();
    }
    // SAFETY: non-null static C string (above).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// The release (major, minor) of a UCX version string: `"1.13.1"` ->
/// `(1, 13)`, `"1.22.0-rc1"` -> `(1, 22)`.
pub(crate) fn release(version: &str) -> Option<(u32, u32)> {
    let mut it = version.trim().split('.');
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    Some((major, minor))
}

/// Path of the libucp object the process resolved `ucp_init_version` to.
pub(crate) fn loaded_library() -> Option<String> {
    let addr = decls::ucp_init_version as *const () as usize;
    sys::object_of(addr).map(|(path, _)| std::fs::canonicalize(&path).map(|p| p.display().to_string()).unwrap_or(path))
}

/// A UCP context (`ucp_init`), cleaned up when the last owner drops it.
#[derive(Debug)]
pub(crate) struct Context {
    h: sys_ucx::ucp_context_h,
}

// SAFETY: the context is created with MT_WORKERS_SHARED, which makes UCX
// serialise context-level calls (mem map/unmap, rkey pack) internally; the
// handle itself is an opaque pointer with no thread affinity.
unsafe impl Send for Context {}
// SAFETY: see Send.
unsafe impl Sync for Context {}

impl Context {
    /// `settings` are UCX configuration names and values (e.g. `("TLS", "sm")`)
    /// applied on top of the environment's `UCX_*` variables.
    pub(crate) fn new(settings: &[(&str, &str)]) -> Result<Arc<Context>, UcxFailure> {
        let mut config: *mut sys_ucx::ucp_config_t = std::ptr::null_mut();
        // SAFETY: NULL prefix/file mean "environment only"; config is an
        // out-pointer to a local.
        check("ucp_config_read", unsafe { decls::ucp_config_read(std::ptr::null(), std::ptr::null(), &mut config) })?;
        let guard = ConfigGuard(config);
        for (name, value) in settings {
            let (n, v) = (CString::new(*name).expect("no NUL"), CString::new(*value).expect("no NUL"));
            // SAFETY: live config from ucp_config_read; NUL-terminated strings.
            check("ucp_config_modify", unsafe { decls::ucp_config_modify(guard.0, n.as_ptr(), v.as_ptr()) })?;
        }
        // SAFETY: a zeroed params struct is the documented "nothing set"
        // state; we then set only fields named in field_mask.
        let mut params: sys_ucx::ucp_params_t = unsafe { std::mem::zeroed() };
        params.field_mask =
            (sys_ucx::ucp_params_field::UCP_PARAM_FIELD_FEATURES | sys_ucx::ucp_params_field::UCP_PARAM_FIELD_MT_WORKERS_SHARED).0 as u64;
        params.features =
            (sys_ucx::ucp_feature::UCP_FEATURE_RMA | sys_ucx::ucp_feature::UCP_FEATURE_AM | sys_ucx::ucp_feature::UCP_FEATURE_WAKEUP).0
                as u64;
        params.mt_workers_shared = 1;
        let mut h: sys_ucx::ucp_context_h = std::ptr::null_mut();
        // SAFETY: params and config are live; API version 1.12 is what the
        // struct layouts come from, and UCX accepts older minor versions.
        check("ucp_init", unsafe { decls::ucp_init_version(sys_ucx::UCP_API_MAJOR, sys_ucx::UCP_API_MINOR, &params, guard.0, &mut h) })?;
        Ok(Arc::new(Context { h }))
    }
}

impl Context {
    /// UCX's own description of the context (`ucp_context_print_info`).
    pub(crate) fn describe(&self) -> String {
        // SAFETY: live context and a live FILE*; UCX only writes text to it.
        printed(|f| unsafe { sys_ucx::ucp_context_print_info(self.h, f.cast()) })
    }
}

/// The text UCX writes through `print` into a temporary file.
fn printed(print: impl FnOnce(*mut libc::FILE)) -> String {
    // SAFETY: tmpfile returns a fresh FILE* or NULL (checked).
    let f = unsafe { libc::tmpfile() };
    if f.is_null() {
        return String::new();
    }
    print(f);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    // SAFETY: rewind then read into a live buffer of the length passed;
    // the FILE* is closed exactly once afterwards.
    unsafe {
        libc::rewind(f);
        loop {
            let n = libc::fread(buf.as_mut_ptr().cast(), 1, buf.len(), f);
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        libc::fclose(f);
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: last owner; every worker and registration holds an Arc, so
        // none is left.
        unsafe { sys_ucx::ucp_cleanup(self.h) };
    }
}

struct ConfigGuard(*mut sys_ucx::ucp_config_t);

impl Drop for ConfigGuard {
    fn drop(&mut self) {
        // SAFETY: config from ucp_config_read, released exactly once.
        unsafe { sys_ucx::ucp_config_release(self.0) };
    }
}

/// Where a registration's memory comes from.
#[derive(Debug)]
pub(crate) enum Backing {
    /// Our own mmap (anonymous, or of a shared file), registered with UCX;
    /// unmapped after UCX's registration is gone (drop order).
    Mapped(#[allow(dead_code)] Mapping),
    /// Allocated by UCX itself (`UCP_MEM_MAP_ALLOCATE`), freed on unmap.
    UcxAllocated,
    /// Device memory (`cuMemAlloc`, or an engine's allocation imported over
    /// CUDA IPC), registered as CUDA memory; released (freed or unmapped)
    /// after UCX's registration is gone (drop order). Its bytes are reached
    /// only through the driver's copies, never through a host pointer.
    Gpu(kvrail_cuda::GpuRegion),
}

/// One registered memory region: the memory and its UCX mapping, together.
#[derive(Debug)]
pub(crate) struct Registration {
    memh: sys_ucx::ucp_mem_h,
    base: usize,
    len: usize,
    backing: Backing,
    ctx: Arc<Context>,
}

// SAFETY: memh is used only for context-level calls (rkey pack, unmap),
// which the MT_WORKERS_SHARED context serialises; host region bytes are only
// copied through raw pointers (see sys::copy_in/copy_out), GPU region bytes
// only through the driver's copies (GpuRegion is Send and Sync).
unsafe impl Send for Registration {}
// SAFETY: see Send.
unsafe impl Sync for Registration {}

impl Registration {
    /// Maps `len` bytes of anonymous memory and registers it.
    pub(crate) fn map_anonymous(ctx: &Arc<Context>, len: usize, populate: bool) -> Result<Registration, String> {
        let mapping = Mapping::anonymous(len, populate).map_err(|e| format!("mmap of {len} bytes failed: {e}"))?;
        Self::register_mapping(ctx, mapping)
    }

    /// Maps `len` bytes at `offset` of the shared file `fd` (the region an
    /// engine process shares with its agent) and registers them.
    pub(crate) fn map_shared(ctx: &Arc<Context>, fd: BorrowedFd<'_>, offset: u64, len: usize) -> Result<Registration, String> {
        let mapping = Mapping::shared_file(fd, offset, len, true)
            .map_err(|e| format!("mapping the shared region ({len} bytes at offset {offset}) failed: {e}"))?;
        Self::register_mapping(ctx, mapping)
    }

    fn register_mapping(ctx: &Arc<Context>, mapping: Mapping) -> Result<Registration, String> {
        // SAFETY: zeroed params = nothing set; fields set below are named in
        // the mask.
        let mut p: sys_ucx::ucp_mem_map_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = (sys_ucx::ucp_mem_map_params_field::UCP_MEM_MAP_PARAM_FIELD_ADDRESS
            | sys_ucx::ucp_mem_map_params_field::UCP_MEM_MAP_PARAM_FIELD_LENGTH)
            .0 as u64;
        p.address = mapping.addr() as *mut c_void;
        p.length = mapping.len() as _;
        let memh = Self::map(ctx, &p).map_err(|f| format!("{} failed: {}", f.call, f.status))?;
        Ok(Registration { memh, base: mapping.addr(), len: mapping.len(), backing: Backing::Mapped(mapping), ctx: ctx.clone() })
    }

    /// Registers a GPU region with UCX as CUDA memory: the device address
    /// and length, the memory type given (`UCS_MEMORY_TYPE_CUDA`, so UCX
    /// picks its CUDA memory domains instead of guessing), nothing allocated
    /// by UCX.
    pub(crate) fn register_gpu(ctx: &Arc<Context>, gpu: kvrail_cuda::GpuRegion) -> Result<Registration, String> {
        // SAFETY: zeroed params = nothing set; fields set below are named in
        // the mask (no UCP_MEM_MAP_ALLOCATE: the memory is the driver's).
        let mut p: sys_ucx::ucp_mem_map_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = (sys_ucx::ucp_mem_map_params_field::UCP_MEM_MAP_PARAM_FIELD_ADDRESS
            | sys_ucx::ucp_mem_map_params_field::UCP_MEM_MAP_PARAM_FIELD_LENGTH
            | sys_ucx::ucp_mem_map_params_field::UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE)
            .0 as u64;
        p.address = gpu.device_ptr() as usize as *mut c_void;
        p.length = gpu.len() as _;
        p.memory_type = sys_ucx::ucs_memory_type::UCS_MEMORY_TYPE_CUDA;
        let memh = Self::map(ctx, &p)
            .map_err(|f| format!("{} of {} bytes of CUDA memory on device {} failed: {}", f.call, gpu.len(), gpu.ordinal(), f.status))?;
        let (base, len) = (gpu.device_ptr() as usize, gpu.len());
        Ok(Registration { memh, base, len, backing: Backing::Gpu(gpu), ctx: ctx.clone() })
    }

    /// Asks UCX to allocate and register `len` bytes itself.
    pub(crate) fn allocate(ctx: &Arc<Context>, len: usize) -> Result<Registration, String> {
        // SAFETY: zeroed params = nothing set.
        let mut p: sys_ucx::ucp_mem_map_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = (sys_ucx::ucp_mem_map_params_field::UCP_MEM_MAP_PARAM_FIELD_LENGTH
            | sys_ucx::ucp_mem_map_params_field::UCP_MEM_MAP_PARAM_FIELD_FLAGS)
            .0 as u64;
        p.length = len as _;
        p.flags = sys_ucx::UCP_MEM_MAP_ALLOCATE as u32;
        let memh = Self::map(ctx, &p).map_err(|f| format!("{} failed: {}", f.call, f.status))?;
        // SAFETY: zeroed attr with the two fields we ask for in the mask.
        let mut attr: sys_ucx::ucp_mem_attr_t = unsafe { std::mem::zeroed() };
        attr.field_mask =
            (sys_ucx::ucp_mem_attr_field::UCP_MEM_ATTR_FIELD_ADDRESS | sys_ucx::ucp_mem_attr_field::UCP_MEM_ATTR_FIELD_LENGTH).0 as u64;
        // SAFETY: memh is live; attr is a live out-struct.
        let st = unsafe { decls::ucp_mem_query(memh, &mut attr) };
        let reg =
            Registration { memh, base: attr.address as usize, len: attr.length as usize, backing: Backing::UcxAllocated, ctx: ctx.clone() };
        check("ucp_mem_query", st).map_err(|f| format!("{} failed: {}", f.call, f.status))?;
        if reg.base == 0 || reg.len < len {
            return Err(format!("UCX allocated {} bytes at {:#x}, asked for {len}", reg.len, reg.base));
        }
        // Fault every page in now (as MAP_POPULATE does for our own
        // mappings), so no transfer pays for first touches.
        for off in (0..reg.len).step_by(4096) {
            sys::copy_in(reg.base, reg.len, off, &[0]);
        }
        Ok(reg)
    }

    fn map(ctx: &Arc<Context>, p: &sys_ucx::ucp_mem_map_params_t) -> Result<sys_ucx::ucp_mem_h, UcxFailure> {
        let mut memh: sys_ucx::ucp_mem_h = std::ptr::null_mut();
        // SAFETY: live context and params; out-pointer to a local. For a
        // given address the mapping stays valid for the registration's life
        // (the Registration owns it and unmaps from UCX first).
        check("ucp_mem_map", unsafe { decls::ucp_mem_map(ctx.h, p, &mut memh) })?;
        Ok(memh)
    }

    pub(crate) fn base(&self) -> usize {
        self.base
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The packed remote key a peer needs to reach this region.
    pub(crate) fn pack_rkey(&self) -> Result<Vec<u8>, UcxFailure> {
        let mut buf: *mut c_void = std::ptr::null_mut();
        let mut size: sys_ucx::size_t = 0;
        // SAFETY: live context and memh; out-pointers to locals.
        check("ucp_rkey_pack", unsafe { decls::ucp_rkey_pack(self.ctx.h, self.memh, &mut buf, &mut size) })?;
        // SAFETY: UCX returned `size` readable bytes at `buf`.
        let out = unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), size as usize) }.to_vec();
        // SAFETY: buffer from ucp_rkey_pack, released once, after the copy.
        unsafe { sys_ucx::ucp_rkey_buffer_release(buf) };
        Ok(out)
    }

    /// The GPU region behind this registration, if it is one.
    pub(crate) fn gpu(&self) -> Option<&kvrail_cuda::GpuRegion> {
        match &self.backing {
            Backing::Gpu(g) => Some(g),
            _ => None,
        }
    }

    /// Copies region bytes `[offset, offset + dst.len())` out (from device
    /// memory with `cuMemcpyDtoH`).
    pub(crate) fn read(&self, offset: u64, dst: &mut [u8]) -> Result<(), String> {
        self.check_range(offset, dst.len() as u64)?;
        match self.gpu() {
            Some(g) => g.copy_to_host(offset as usize, dst).map_err(|e| e.to_string()),
            None => {
                sys::copy_out(self.base, self.len, offset as usize, dst);
                Ok(())
            }
        }
    }

    /// Copies `src` into the region at `offset` (into device memory with
    /// `cuMemcpyHtoD`).
    pub(crate) fn write(&self, offset: u64, src: &[u8]) -> Result<(), String> {
        self.check_range(offset, src.len() as u64)?;
        match self.gpu() {
            Some(g) => g.copy_from_host(offset as usize, src).map_err(|e| e.to_string()),
            None => {
                sys::copy_in(self.base, self.len, offset as usize, src);
                Ok(())
            }
        }
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), String> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len as u64 => Ok(()),
            _ => Err(format!("range {offset}+{len} is outside the region of {} bytes", self.len)),
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: memh from ucp_mem_map on this context, unmapped once. Every
        // worker that could use it holds an Arc to this registration, so
        // none is left; the backing memory is released after this (field
        // drop order), never before.
        let st = unsafe { decls::ucp_mem_unmap(self.ctx.h, self.memh) };
        if st != 0 {
            tracing::warn!(status = %Status(st), "ucp_mem_unmap failed");
        }
    }
}

/// Completion bookkeeping shared by a batch of requests. For deliveries it
/// also holds their headers: UCX may read a header until its request
/// completes, and every request keeps the counter alive until then.
#[derive(Debug, Default)]
pub(crate) struct OpCounter {
    pending: Cell<u32>,
    first_error: Cell<i8>,
    headers: Box<[[u8; HEADER_LEN]]>,
    next_header: Cell<usize>,
}

impl OpCounter {
    /// A counter for deliveries with these headers, used in order.
    pub(crate) fn with_headers(headers: Vec<[u8; HEADER_LEN]>) -> OpCounter {
        OpCounter { headers: headers.into_boxed_slice(), ..OpCounter::default() }
    }

    #[cfg(test)]
    pub(crate) fn headers(&self) -> &[[u8; HEADER_LEN]] {
        &self.headers
    }

    pub(crate) fn pending(&self) -> u32 {
        self.pending.get()
    }

    pub(crate) fn error(&self) -> Option<Status> {
        let e = self.first_error.get();
        (e != 0).then_some(Status(e))
    }

    fn record(&self, status: i8) {
        if status < 0 && self.first_error.get() == 0 {
            self.first_error.set(status);
        }
    }
}

unsafe extern "C" fn op_done(request: *mut c_void, status: i8, user_data: *mut c_void) {
    // Called by UCX inside ucp_worker_progress on the worker's thread. No
    // panics possible below: plain Cell updates and frees.
    // SAFETY: user_data is the Rc::into_raw of issue(); each request's
    // callback runs exactly once, so this reclaims exactly that reference.
    let counter = unsafe { Rc::from_raw(user_data as *const OpCounter) };
    counter.pending.set(counter.pending.get().saturating_sub(1));
    counter.record(status);
    // SAFETY: the request handle UCX passed us, released once, here.
    unsafe { sys_ucx::ucp_request_free(request) };
}

/// A UCP worker owned by one thread (`!Send`), with the one region it serves
/// and the sink its active-message deliveries land in.
#[derive(Debug)]
pub(crate) struct Worker {
    h: sys_ucx::ucp_worker_h,
    efd: c_int,
    /// Kept until after `ucp_worker_destroy`: the delivery handler points
    /// at it (see [`am::register`]).
    _sink: Rc<dyn AmSink>,
    region: Arc<Registration>,
    _ctx: Arc<Context>,
}

impl Worker {
    /// A worker on `ctx` serving `region`, whose deliveries go to `sink`.
    pub(crate) fn new<S: AmSink + 'static>(ctx: &Arc<Context>, region: Arc<Registration>, sink: Rc<S>) -> Result<Rc<Worker>, UcxFailure> {
        // SAFETY: zeroed params = nothing set; thread mode single (one
        // thread owns the worker; Worker is !Send).
        let mut p: sys_ucx::ucp_worker_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = sys_ucx::ucp_worker_params_field::UCP_WORKER_PARAM_FIELD_THREAD_MODE.0 as u64;
        p.thread_mode = sys_ucx::ucs_thread_mode_t::UCS_THREAD_MODE_SINGLE;
        let mut h: sys_ucx::ucp_worker_h = std::ptr::null_mut();
        // SAFETY: live context and params; out-pointer to a local.
        check("ucp_worker_create", unsafe { decls::ucp_worker_create(ctx.h, &p, &mut h) })?;
        let mut w = Worker { h, efd: -1, _sink: sink.clone(), region, _ctx: ctx.clone() };
        let mut efd: c_int = -1;
        // SAFETY: live worker (context has WAKEUP); out-pointer to a local.
        check("ucp_worker_get_efd", unsafe { decls::ucp_worker_get_efd(w.h, &mut efd) })?;
        w.efd = efd;
        // SAFETY: live worker on this thread, of a context with AM (see
        // Context::new); `w._sink` is a clone of `sink`, dropped only after
        // Drop::drop ran ucp_worker_destroy (fields drop after it). If
        // registration fails, `w` drops here: the worker is destroyed
        // before the sink, as in every other case.
        check("ucp_worker_set_am_recv_handler", unsafe { am::register(w.h, &sink) })?;
        Ok(Rc::new(w))
    }

    pub(crate) fn region(&self) -> &Arc<Registration> {
        &self.region
    }

    pub(crate) fn event_fd(&self) -> c_int {
        self.efd
    }

    pub(crate) fn address(&self) -> Result<Vec<u8>, UcxFailure> {
        let mut addr: *mut sys_ucx::ucp_address_t = std::ptr::null_mut();
        let mut len: sys_ucx::size_t = 0;
        // SAFETY: live worker; out-pointers to locals.
        check("ucp_worker_get_address", unsafe { decls::ucp_worker_get_address(self.h, &mut addr, &mut len) })?;
        // SAFETY: UCX returned `len` readable bytes at addr.
        let out = unsafe { std::slice::from_raw_parts(addr.cast::<u8>(), len as usize) }.to_vec();
        // SAFETY: address from ucp_worker_get_address, released once.
        unsafe { sys_ucx::ucp_worker_release_address(self.h, addr) };
        Ok(out)
    }

    /// Runs UCX's progress engine until it reports no more events, at most
    /// [`Worker::PROGRESS_ROUNDS`] times. Unbounded, one call could last as
    /// long as a peer kept the socket fed (over tcp a receiving engine was
    /// seen inside it for 44 ms, 6,144 events), and everything the caller
    /// does between calls (reporting landed deliveries, opening new ones)
    /// waited that long.
    pub(crate) fn progress(&self) -> u32 {
        let mut total = 0;
        for _ in 0..Self::PROGRESS_ROUNDS {
            // SAFETY: live worker, called on its own thread (Worker is !Send).
            let n = unsafe { sys_ucx::ucp_worker_progress(self.h) };
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    }

    /// Calls of UCX's progress per [`Worker::progress`]: over tcp one call
    /// reads at most one receive segment (64 KiB here) per socket.
    const PROGRESS_ROUNDS: u32 = 16;

    /// Arms the event fd. `Ok(true)`: safe to sleep on it; `Ok(false)`:
    /// events are pending, progress again first.
    pub(crate) fn arm(&self) -> Result<bool, UcxFailure> {
        // SAFETY: live worker on its own thread.
        match Status(unsafe { decls::ucp_worker_arm(self.h) }) {
            Status::OK => Ok(true),
            Status::ERR_BUSY => Ok(false),
            s => Err(UcxFailure::new("ucp_worker_arm", s)),
        }
    }

    /// Waits for a request to finish by progressing, up to `limit`, then
    /// releases it (UCX frees a still-running request when it completes).
    fn wait_and_free(&self, req: *mut c_void, limit: Duration) -> Status {
        let start = Instant::now();
        loop {
            // SAFETY: req is a live request from this worker, not yet freed.
            let st = Status(unsafe { decls::ucp_request_check_status(req) });
            if st != Status::INPROGRESS || start.elapsed() > limit {
                // SAFETY: released once, here.
                unsafe { sys_ucx::ucp_request_free(req) };
                return st;
            }
            self.progress();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // SAFETY: every endpoint holds an Rc to this worker, so none is left;
        // destroyed on the owning thread. The region outlives it (field).
        unsafe { sys_ucx::ucp_worker_destroy(self.h) };
    }
}

/// State the endpoint error callback writes.
#[derive(Debug, Default)]
struct EpError {
    status: Cell<i8>,
}

unsafe extern "C" fn ep_failed(arg: *mut c_void, _ep: sys_ucx::ucp_ep_h, status: i8) {
    // SAFETY: arg is the pointer of the Rc<EpError> the Endpoint keeps alive
    // until its close request completed, after which UCX never calls this.
    let slot = unsafe { &*(arg as *const EpError) };
    if slot.status.get() == 0 {
        slot.status.set(if status == 0 { -1 } else { status });
    }
}

/// A connection to a peer worker.
#[derive(Debug)]
pub(crate) struct Endpoint {
    h: sys_ucx::ucp_ep_h,
    error: Rc<EpError>,
    worker: Rc<Worker>,
}

impl Endpoint {
    /// Connects to a peer's worker address. With `peer_errors`, a peer that
    /// dies fails the endpoint's requests instead of leaving them hanging.
    pub(crate) fn connect(worker: &Rc<Worker>, address: &[u8], peer_errors: bool) -> Result<Endpoint, UcxFailure> {
        let error = Rc::new(EpError::default());
        // SAFETY: zeroed params = nothing set.
        let mut p: sys_ucx::ucp_ep_params_t = unsafe { std::mem::zeroed() };
        p.field_mask = sys_ucx::ucp_ep_params_field::UCP_EP_PARAM_FIELD_REMOTE_ADDRESS.0 as u64;
        p.address = address.as_ptr().cast();
        if peer_errors {
            p.field_mask |= (sys_ucx::ucp_ep_params_field::UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE
                | sys_ucx::ucp_ep_params_field::UCP_EP_PARAM_FIELD_ERR_HANDLER)
                .0 as u64;
            p.err_mode = sys_ucx::ucp_err_handling_mode_t::UCP_ERR_HANDLING_MODE_PEER;
            // SAFETY: the two fn pointer types differ only in the status
            // parameter, i8 here and ucx1-sys's #[repr(i8)] enum there: the
            // same C ABI. We take it as i8 so unknown codes are not UB.
            p.err_handler.cb = Some(unsafe { std::mem::transmute::<ErrCallback, ErrHandlerCb>(ep_failed) });
            p.err_handler.arg = Rc::as_ptr(&error) as *mut c_void;
        }
        let mut h: sys_ucx::ucp_ep_h = std::ptr::null_mut();
        // SAFETY: live worker on its thread; the address bytes are a peer's
        // ucp_worker_get_address output (UCX validates their content) and
        // are only read during the call.
        check("ucp_ep_create", unsafe { decls::ucp_ep_create(worker.h, &p, &mut h) })?;
        Ok(Endpoint { h, error, worker: worker.clone() })
    }

    /// UCX's own description of the endpoint (`ucp_ep_print_info`): its
    /// lanes and, per protocol, which message sizes go short, by copy,
    /// zero-copy or by rendezvous.
    pub(crate) fn describe(&self) -> String {
        // SAFETY: live endpoint on its worker's thread and a live FILE*; UCX
        // only writes text to it.
        printed(|f| unsafe { sys_ucx::ucp_ep_print_info(self.h, f.cast()) })
    }

    /// The status the error callback reported, if the peer failed.
    pub(crate) fn failure(&self) -> Option<Status> {
        let s = self.error.status.get();
        (s != 0).then_some(Status(s))
    }
}

type ErrHandlerCb = unsafe extern "C" fn(*mut c_void, sys_ucx::ucp_ep_h, sys_ucx::ucs_status_t);
type SendCb = unsafe extern "C" fn(*mut c_void, sys_ucx::ucs_status_t, *mut c_void);
impl Drop for Endpoint {
    fn drop(&mut self) {
        // SAFETY: zeroed request params plus the FLAGS field: force-close,
        // which does not wait for the peer (it may be dead).
        let mut p: sys_ucx::ucp_request_param_t = unsafe { std::mem::zeroed() };
        p.op_attr_mask = sys_ucx::ucp_op_attr_t::UCP_OP_ATTR_FIELD_FLAGS as u32;
        p.flags = sys_ucx::ucp_ep_close_flags_t::UCP_EP_CLOSE_FLAG_FORCE.0;
        // SAFETY: live endpoint, closed once, on the worker's thread. Every
        // rkey unpacked on it holds an Rc to it, so none is left.
        let ret = unsafe { sys_ucx::ucp_ep_close_nbx(self.h, &p) };
        if let PtrStatus::Pending(req) = decode_ptr(ret) {
            self.worker.wait_and_free(req, Duration::from_secs(5));
        }
    }
}

/// A peer's region: its unpacked rkey on one endpoint, with its bounds.
#[derive(Debug)]
pub(crate) struct RemoteRegion {
    rkey: sys_ucx::ucp_rkey_h,
    base: u64,
    len: u64,
    ep: Rc<Endpoint>,
    populator: std::cell::RefCell<Option<Populator>>,
}

/// Pre-faults this process's mapping of a peer's shared-memory segment on a
/// background thread, so RMA into it runs at memory speed instead of taking
/// one page fault per 4 KiB on first touch (~0.35 s per GiB here). Stopped
/// and joined before the rkey (and with it the mapping) is released.
#[derive(Debug)]
struct Populator {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Counts one running populator in a shared gauge while it lives.
struct Running(Arc<std::sync::atomic::AtomicU64>);

impl Running {
    fn new(gauge: &Arc<std::sync::atomic::AtomicU64>) -> Running {
        gauge.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Running(gauge.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Populator {
    /// Chunk between checks of the stop flag (~1.5 ms of work here).
    const CHUNK: usize = 8 << 20;

    /// `running` counts populators still at work (the engine's gauge).
    fn start(addr: usize, len: usize, running: &Arc<std::sync::atomic::AtomicU64>) -> Option<Populator> {
        use std::sync::atomic::Ordering;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let counted = Running::new(running);
        let thread = std::thread::Builder::new()
            .name("kvrail-populate".into())
            .spawn(move || {
                let _counted = counted;
                let t0 = Instant::now();
                let mut done = 0;
                while done < len && !flag.load(Ordering::Relaxed) {
                    let n = Self::CHUNK.min(len - done);
                    if let Err(e) = sys::populate_write(addr + done, n) {
                        tracing::debug!(error = %e, "peer mapping not pre-faulted; first touches will fault it in");
                        return;
                    }
                    done += n;
                }
                tracing::debug!(bytes = done, ms = t0.elapsed().as_secs_f64() * 1e3, "peer mapping pre-faulted");
            })
            .ok()?;
        Some(Populator { stop, thread: Some(thread) })
    }
}

impl Populator {
    /// Waits for the thread (at once if already joined).
    fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Populator {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.join();
    }
}

/// Direction of one RMA operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rma {
    /// Local region -> remote region.
    Put,
    /// Remote region -> local region.
    Get,
    /// Local region -> remote region as eager active messages the peer's
    /// inbox copies (see [`AmSink`]); the header must stay valid until the
    /// request completes.
    Deliver,
}

impl RemoteRegion {
    pub(crate) fn unpack(ep: &Rc<Endpoint>, packed: &[u8], base: u64, len: u64) -> Result<RemoteRegion, UcxFailure> {
        let mut rkey: sys_ucx::ucp_rkey_h = std::ptr::null_mut();
        // SAFETY: live endpoint on its worker's thread; the packed bytes are
        // only read during the call and UCX validates them.
        check("ucp_ep_rkey_unpack", unsafe { decls::ucp_ep_rkey_unpack(ep.h, packed.as_ptr().cast(), &mut rkey) })?;
        Ok(RemoteRegion { rkey, base, len, ep: ep.clone(), populator: Default::default() })
    }

    /// Starts pre-faulting this process's mapping of the peer's region on a
    /// background thread, where the transport reaches it through shared
    /// memory; returns whether it did (once per region: later calls return
    /// `false`). Not part of `unpack`: the faulting competes with whatever
    /// runs next for the CPUs and this process's memory map, so it belongs
    /// after the handshake, not inside it. `running` counts populators
    /// still at work until each finishes (or is stopped).
    pub(crate) fn prefault(&self, running: &Arc<std::sync::atomic::AtomicU64>) -> bool {
        let mut slot = self.populator.borrow_mut();
        if slot.is_some() {
            return false;
        }
        *slot = self.local_view().and_then(|addr| Populator::start(addr, self.len as usize, running));
        slot.is_some()
    }

    /// Blocks until the background pre-faulting of the peer mapping (if any)
    /// has finished.
    pub(crate) fn wait_populated(&self) {
        if let Some(p) = self.populator.borrow_mut().as_mut() {
            p.join();
        }
    }

    /// Where the whole peer region is mapped in this process, when the
    /// transport reaches it through shared memory (`ucp_rkey_ptr`), checked
    /// at both ends so the range is one contiguous mapping.
    fn local_view(&self) -> Option<usize> {
        let ptr = |raddr: u64| {
            let mut p: *mut c_void = std::ptr::null_mut();
            // SAFETY: live rkey; raddr lies inside the peer's advertised
            // region; UCX only writes the out-pointer.
            let rc = unsafe { decls::ucp_rkey_ptr(self.rkey, raddr, &mut p) };
            (rc == 0 && !p.is_null()).then_some(p as usize)
        };
        let first = ptr(self.base)?;
        let last = ptr(self.base + self.len.checked_sub(1)?)?;
        (last.checked_sub(first)? == self.len as usize - 1).then_some(first)
    }

    pub(crate) fn endpoint(&self) -> &Rc<Endpoint> {
        &self.ep
    }

    /// Starts one put, get or delivery of `len` bytes between the worker's
    /// own region at `local_offset` and this remote region at
    /// `remote_offset`. Both ranges are bounds-checked first. A delivery
    /// sends the counter's next header. On `Ok`, the counter's pending count
    /// covers the request if it did not complete at once.
    pub(crate) fn start(&self, dir: Rma, local_offset: u64, remote_offset: u64, len: u64, counter: &Rc<OpCounter>) -> Result<(), RmaError> {
        let region = self.ep.worker.region();
        if local_offset.checked_add(len).is_none_or(|e| e > region.len() as u64) {
            return Err(RmaError::OutOfBounds(format!("local range {local_offset}+{len} exceeds the region ({} bytes)", region.len())));
        }
        if remote_offset.checked_add(len).is_none_or(|e| e > self.len) {
            return Err(RmaError::OutOfBounds(format!("remote range {remote_offset}+{len} exceeds the peer region ({} bytes)", self.len)));
        }
        let local = (region.base() as u64 + local_offset) as *mut c_void;
        let remote = self.base + remote_offset;
        let mut param = request_param(counter, Some(region.memh));
        let (ret, call) = match dir {
            // SAFETY: ep and rkey are live and belong to this worker's
            // thread; the local range lies inside the worker's own registered
            // region, which outlives the worker and therefore every request
            // on it; the remote range lies inside the bounds the peer
            // advertised with this rkey; the counter reference in user_data
            // is reclaimed by op_done. `param` is a RequestParam: a newer UCX
            // that reads fields past the 1.12 struct (memh) finds them there,
            // set or zeroed.
            Rma::Put => (unsafe { sys_ucx::ucp_put_nbx(self.ep.h, local, len as _, remote, self.rkey, &param.base) }, "ucp_put_nbx"),
            // SAFETY: as for Put.
            Rma::Get => (unsafe { sys_ucx::ucp_get_nbx(self.ep.h, local, len as _, remote, self.rkey, &param.base) }, "ucp_get_nbx"),
            Rma::Deliver => {
                let i = counter.next_header.get();
                let Some(header) = counter.headers.get(i) else {
                    // Give back the reference request_param lent.
                    settle(std::ptr::null_mut(), counter, "ucp_am_send_nbx")?;
                    return Err(RmaError::OutOfBounds(format!("delivery {i} has no header (only {})", counter.headers.len())));
                };
                counter.next_header.set(i + 1);
                param.base.op_attr_mask |= sys_ucx::ucp_op_attr_t::UCP_OP_ATTR_FIELD_FLAGS as u32;
                param.base.flags = sys_ucx::ucp_send_am_flags::UCP_AM_SEND_FLAG_EAGER.0;
                // SAFETY: live endpoint on its worker's thread; the local
                // range is inside the registered region (as for Put); the
                // header lives in the counter, which the request's user_data
                // keeps alive until its callback ran, so UCX may read it for
                // as long as the request exists.
                let ret = unsafe {
                    sys_ucx::ucp_am_send_nbx(
                        self.ep.h,
                        am::DELIVERY_ID,
                        header.as_ptr().cast(),
                        HEADER_LEN as _,
                        local,
                        len as _,
                        &param.base,
                    )
                };
                (ret, "ucp_am_send_nbx")
            }
        };
        settle(ret, counter, call)
    }

    /// Starts a flush of the endpoint: completes when every operation
    /// issued on it before is complete at the target.
    pub(crate) fn flush(&self, counter: &Rc<OpCounter>) -> Result<(), RmaError> {
        let param = request_param(counter, None);
        // SAFETY: live endpoint on its thread; user_data and the extended
        // parameter struct as in start().
        let ret = unsafe { sys_ucx::ucp_ep_flush_nbx(self.ep.h, &param.base) };
        settle(ret, counter, "ucp_ep_flush_nbx")
    }
}

impl Drop for RemoteRegion {
    fn drop(&mut self) {
        // The populating thread works on the mapping the rkey keeps alive.
        drop(self.populator.get_mut().take());
        // SAFETY: rkey from ucp_ep_rkey_unpack, destroyed once, before its
        // endpoint (we hold the Rc until after this).
        unsafe { sys_ucx::ucp_rkey_destroy(self.rkey) };
    }
}

/// Why an RMA operation could not start.
#[derive(Debug, Clone)]
pub(crate) enum RmaError {
    OutOfBounds(String),
    Ucx(UcxFailure),
}

/// `ucp_request_param_t` as UCX 1.18+ lays it out: the 1.12 fields, then
/// `memh` (offset 64), then fields 1.22 added; zeroed fields are unused.
#[repr(C)]
struct RequestParam {
    base: sys_ucx::ucp_request_param_t,
    memh: sys_ucx::ucp_mem_h,
    reserved: [u64; 4],
}

const _: () = assert!(std::mem::size_of::<sys_ucx::ucp_request_param_t>() == 64);

/// `UCP_OP_ATTR_FIELD_MEMH` (UCX 1.18+).
const OP_ATTR_FIELD_MEMH: u32 = 1 << 8;

/// Whether the loaded UCX takes a memory handle in request parameters.
fn takes_memh() -> bool {
    static TAKES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TAKES.get_or_init(|| release(&loaded_version()).is_some_and(|(major, minor)| major > 1 || minor >= 18))
}

/// Parameters of a request reporting to `counter`; with `memh` (and a UCX
/// that supports it) the local buffer's registration is passed along, so
/// UCX does not look it up in its registration cache on every operation.
fn request_param(counter: &Rc<OpCounter>, memh: Option<sys_ucx::ucp_mem_h>) -> RequestParam {
    // SAFETY: zeroed = nothing set; we set callback and user_data (and memh)
    // and name them in op_attr_mask.
    let mut p: RequestParam = unsafe { std::mem::zeroed() };
    p.base.op_attr_mask =
        sys_ucx::ucp_op_attr_t::UCP_OP_ATTR_FIELD_CALLBACK as u32 | sys_ucx::ucp_op_attr_t::UCP_OP_ATTR_FIELD_USER_DATA as u32;
    // SAFETY: identical C ABI; status received as i8 (see ErrHandlerCb).
    p.base.cb.send = Some(unsafe { std::mem::transmute::<SendCallback, SendCb>(op_done) });
    p.base.user_data = Rc::into_raw(counter.clone()) as *mut c_void;
    if let Some(m) = memh.filter(|_| takes_memh()) {
        p.memh = m;
        p.base.op_attr_mask |= OP_ATTR_FIELD_MEMH;
    }
    p
}

/// Accounts for the outcome of a just-issued non-blocking call whose
/// user_data holds one counter reference.
fn settle(ret: *mut c_void, counter: &Rc<OpCounter>, call: &'static str) -> Result<(), RmaError> {
    match decode_ptr(ret) {
        PtrStatus::Pending(_) => {
            counter.pending.set(counter.pending.get() + 1);
            Ok(())
        }
        done_or_failed => {
            // No callback will run: take back the reference we lent.
            // SAFETY: strong count was incremented by request_param for this
            // call and nothing else can reclaim it.
            unsafe { Rc::decrement_strong_count(Rc::as_ptr(counter)) };
            match done_or_failed {
                PtrStatus::Failed(s) => Err(RmaError::Ucx(UcxFailure::new(call, s))),
                _ => Ok(()),
            }
        }
    }
}
