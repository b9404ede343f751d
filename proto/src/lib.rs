//! kvrail wire protocol: generated code for package `kvrail.v1`.
//!
//! This crate owns the `.proto` files and nothing else: no UCX, no agent logic.
#![forbid(unsafe_code)]

/// Generated messages and services of `kvrail.v1`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    tonic::include_proto!("kvrail.v1");
}

/// Protocol version spoken by this build. Bumped on any incompatible change;
/// peers with a different version are refused at handshake. v4: write
/// orders and completions carry an order number (a late completion of an
/// earlier run of a reused request id is fenced), and sessions end with a
/// goodbye. v5: either side may dial (a decode agent handshakes with a
/// prefill agent and opens `Serve`), and an agent holds sessions with
/// many peers. v6: a write order may name a published request
/// (`published_id`, `hold_ms`: the decode engine's push mode), which the
/// prefill agent must check before it writes; a v5 agent would ignore it.
pub const PROTOCOL_VERSION: u32 = 6;
