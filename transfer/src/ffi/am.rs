//! Block deliveries as UCX active messages: the message id, the fixed
//! header length, and the receive callback that hands every message to the
//! [`AmSink`] the layer above registered on the worker.
//!
//! Nothing here reads a header or decides where bytes go: that is the
//! sink's business (the engine's inbox). What this module owns is the C
//! side of the handler: the pointers UCX passes are turned into slices that
//! do not outlive the call, rendezvous descriptors and malformed messages
//! are refused before the sink sees them, and no panic unwinds into UCX.

use std::os::raw::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::rc::Rc;

use ucx1_sys as sys_ucx;

use super::decls;

/// The active-message id of a block delivery (the same on every kvrail
/// worker: senders use it, receivers register it).
pub(super) const DELIVERY_ID: u32 = 0x6b76;

/// Length of a delivery header. Its content is the sink's format; this
/// layer only keeps headers alive while UCX may read them.
pub(crate) const HEADER_LEN: usize = 16;

/// Why a message was not handed to the sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// A rendezvous descriptor, not data (kvrail's senders always force
    /// eager, so it comes from a foreign sender).
    Rendezvous,
    /// No header, or a payload length without payload.
    Malformed,
}

/// Where a worker's deliveries land. Called by UCX's progress engine inside
/// `ucp_worker_progress`, on the worker's thread, once per message.
///
/// An implementation should not panic; if it does, the process aborts (the
/// handler cannot unwind into UCX, and a sink that panicked half-way is not
/// trusted with the next message).
pub(crate) trait AmSink: std::fmt::Debug {
    /// One eager message: its header and its payload, readable only for
    /// the duration of the call.
    fn receive(&self, header: &[u8], data: &[u8]);

    /// A message that was dropped before [`AmSink::receive`].
    fn refuse(&self, why: Refused);
}

/// `ucp_am_recv_callback_t` as ucx1-sys declares it (status as its enum).
type AmRecvCb = unsafe extern "C" fn(
    *mut c_void,
    *const c_void,
    sys_ucx::size_t,
    *mut c_void,
    sys_ucx::size_t,
    *const sys_ucx::ucp_am_recv_param_t,
) -> sys_ucx::ucs_status_t;

/// The same callback as [`on_delivery`] defines it (status as raw `i8`).
type AmCallback = unsafe extern "C" fn(
    *mut c_void,
    *const c_void,
    sys_ucx::size_t,
    *mut c_void,
    sys_ucx::size_t,
    *const sys_ucx::ucp_am_recv_param_t,
) -> i8;

/// Makes `sink` the receiver of `worker`'s deliveries; returns UCX's raw
/// status. The handler is [`on_delivery`] for the sink's own type: a static
/// call per message, no vtable, no allocation.
///
/// # Safety
///
/// `worker` is a live worker of a context with `UCP_FEATURE_AM`, used only
/// on the calling thread, and the caller keeps `sink` (a clone of this
/// `Rc`) alive until `ucp_worker_destroy(worker)` has returned: UCX passes
/// a raw pointer to the sink to every callback until then.
pub(super) unsafe fn register<S: AmSink>(worker: sys_ucx::ucp_worker_h, sink: &Rc<S>) -> i8 {
    // SAFETY: zeroed = nothing set; the fields set are named in the mask.
    let mut am: sys_ucx::ucp_am_handler_param_t = unsafe { std::mem::zeroed() };
    am.field_mask = (sys_ucx::ucp_am_handler_param_field::UCP_AM_HANDLER_PARAM_FIELD_ID
        | sys_ucx::ucp_am_handler_param_field::UCP_AM_HANDLER_PARAM_FIELD_CB
        | sys_ucx::ucp_am_handler_param_field::UCP_AM_HANDLER_PARAM_FIELD_ARG)
        .0 as u64;
    am.id = DELIVERY_ID;
    // SAFETY: the two fn pointer types differ only in the return type, i8
    // here and ucx1-sys's #[repr(i8)] enum there: the same C ABI. We return
    // a raw i8 (always 0, UCS_OK), so no enum value is ever made up.
    am.cb = Some(unsafe { std::mem::transmute::<AmCallback, AmRecvCb>(on_delivery::<S>) });
    // A thin pointer to the sink itself: on_delivery::<S> knows its type.
    am.arg = Rc::as_ptr(sink) as *mut c_void;
    // SAFETY: live worker on its own thread (the caller's contract), and a
    // params struct that lives for the call; UCX copies it. The pointer in
    // `arg` stays valid as long as the caller keeps the sink (contract).
    unsafe { decls::ucp_worker_set_am_recv_handler(worker, &am) }
}

/// The active-message handler of block deliveries, for sinks of type `S`.
/// Always returns `UCS_OK`: the payload is consumed (copied or dropped)
/// before the callback returns, so UCX may release it.
unsafe extern "C" fn on_delivery<S: AmSink>(
    arg: *mut c_void,
    header: *const c_void,
    header_length: sys_ucx::size_t,
    data: *mut c_void,
    length: sys_ucx::size_t,
    param: *const sys_ucx::ucp_am_recv_param_t,
) -> i8 {
    // SAFETY: arg is the Rc::as_ptr of an S that register() installed; its
    // caller keeps that Rc alive until ucp_worker_destroy returned, and UCX
    // calls no handler of the worker after that. Only `&self` methods are
    // called, on the worker's thread, the only thread that touches the sink.
    let sink = unsafe { &*(arg as *const S) };
    // SAFETY: UCX passes a valid parameter struct for the call's duration.
    let attr = unsafe { (*param).recv_attr };
    // Nothing below may unwind into UCX (undefined behaviour before Rust
    // 1.81, an abort since): the sink's code is caught here, and a panic
    // ends the process explicitly. The slices are only read, never stored.
    let delivered = catch_unwind(AssertUnwindSafe(|| {
        if attr & sys_ucx::ucp_am_recv_attr_t::UCP_AM_RECV_ATTR_FLAG_RNDV as u64 != 0 {
            // Returning OK without receiving releases the descriptor (UCX
            // completes the sender's call).
            sink.refuse(Refused::Rendezvous);
            return;
        }
        if header.is_null() || (data.is_null() && length > 0) {
            sink.refuse(Refused::Malformed);
            return;
        }
        // SAFETY: UCX guarantees header_length readable header bytes and,
        // for an eager message, length readable data bytes until the
        // callback returns; both slices are dropped before that (the sink
        // gets them only for the call) and never written.
        let (h, d) = unsafe {
            (
                std::slice::from_raw_parts(header.cast::<u8>(), header_length as usize),
                if length == 0 { &[][..] } else { std::slice::from_raw_parts(data.cast::<u8>(), length as usize) },
            )
        };
        sink.receive(h, d);
    }));
    if delivered.is_err() {
        std::process::abort();
    }
    0
}
