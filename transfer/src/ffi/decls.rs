//! Our own declarations of the UCX entry points that return or receive a
//! `ucs_status_t`, with the status as a raw `i8` instead of ucx1-sys's Rust
//! enum, so an unknown code from a newer UCX is a value, not undefined
//! behaviour. Struct and handle types still come from ucx1-sys.
#![allow(clashing_extern_declarations)]

use std::os::raw::{c_char, c_int, c_uint, c_void};

use ucx1_sys::{
    size_t, ucp_address_t, ucp_am_handler_param_t, ucp_config_t, ucp_context_h, ucp_ep_h, ucp_ep_params_t, ucp_mem_attr_t, ucp_mem_h,
    ucp_mem_map_params_t, ucp_params_t, ucp_rkey_h, ucp_worker_h, ucp_worker_params_t,
};

/// A request-completion callback as UCX calls it, status as raw `i8`.
pub(crate) type SendCallback = unsafe extern "C" fn(request: *mut c_void, status: i8, user_data: *mut c_void);
/// An endpoint error callback, status as raw `i8`.
pub(crate) type ErrCallback = unsafe extern "C" fn(arg: *mut c_void, ep: ucp_ep_h, status: i8);
/// A UCM memory-event callback.
pub(crate) type UcmCallback = unsafe extern "C" fn(event_type: c_int, event: *mut c_void, arg: *mut c_void);

/// The leading fields of UCM's `ucm_global_config_t`, identical in every UCX
/// release kvrail supports (1.12 to 1.22): log level, events, mmap hook mode,
/// malloc hooks, malloc relocations.
#[repr(C)]
pub(crate) struct UcmGlobalOptsHead {
    pub log_level: c_int,
    pub enable_events: c_int,
    pub mmap_hook_mode: c_int,
    pub enable_malloc_hooks: c_int,
    pub enable_malloc_reloc: c_int,
}

extern "C" {
    pub(crate) fn ucs_status_string(status: i8) -> *const c_char;
    pub(crate) fn ucp_config_read(env_prefix: *const c_char, filename: *const c_char, config_p: *mut *mut ucp_config_t) -> i8;
    pub(crate) fn ucp_config_modify(config: *mut ucp_config_t, name: *const c_char, value: *const c_char) -> i8;
    pub(crate) fn ucp_init_version(
        api_major_version: c_uint,
        api_minor_version: c_uint,
        params: *const ucp_params_t,
        config: *const ucp_config_t,
        context_p: *mut ucp_context_h,
    ) -> i8;
    pub(crate) fn ucp_worker_create(context: ucp_context_h, params: *const ucp_worker_params_t, worker_p: *mut ucp_worker_h) -> i8;
    pub(crate) fn ucp_worker_get_address(worker: ucp_worker_h, address_p: *mut *mut ucp_address_t, address_length_p: *mut size_t) -> i8;
    pub(crate) fn ucp_worker_get_efd(worker: ucp_worker_h, fd: *mut c_int) -> i8;
    pub(crate) fn ucp_worker_arm(worker: ucp_worker_h) -> i8;
    pub(crate) fn ucp_worker_set_am_recv_handler(worker: ucp_worker_h, param: *const ucp_am_handler_param_t) -> i8;
    pub(crate) fn ucp_ep_create(worker: ucp_worker_h, params: *const ucp_ep_params_t, ep_p: *mut ucp_ep_h) -> i8;
    pub(crate) fn ucp_mem_map(context: ucp_context_h, params: *const ucp_mem_map_params_t, memh_p: *mut ucp_mem_h) -> i8;
    pub(crate) fn ucp_mem_unmap(context: ucp_context_h, memh: ucp_mem_h) -> i8;
    pub(crate) fn ucp_mem_query(memh: ucp_mem_h, attr: *mut ucp_mem_attr_t) -> i8;
    pub(crate) fn ucp_rkey_pack(context: ucp_context_h, memh: ucp_mem_h, rkey_buffer_p: *mut *mut c_void, size_p: *mut size_t) -> i8;
    pub(crate) fn ucp_ep_rkey_unpack(ep: ucp_ep_h, rkey_buffer: *const c_void, rkey_p: *mut ucp_rkey_h) -> i8;
    pub(crate) fn ucp_rkey_ptr(rkey: ucp_rkey_h, raddr: u64, addr_p: *mut *mut c_void) -> i8;
    pub(crate) fn ucp_request_check_status(request: *mut c_void) -> i8;
    pub(crate) fn ucm_set_event_handler(events: c_int, priority: c_int, cb: UcmCallback, arg: *mut c_void) -> i8;
    pub(crate) static ucm_global_opts: UcmGlobalOptsHead;
}
