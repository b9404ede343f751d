//! The one private module of `kvrail-transfer` that holds `unsafe` code.
//!
//! Everything UCX, libc and the dynamic loader is reached from here, each
//! `unsafe` block with a `// SAFETY:` argument. What leaves this module is
//! safe: owned handles whose drop order is structural (endpoint -> worker ->
//! context; a registration owns its memory), plain values, and errors.
//!
//! ucx1-sys is generated from UCX 1.12.1 headers and its `ucs_status_t` is a
//! Rust enum: receiving a status code the bindings do not know (a newer UCX
//! adds some) would be undefined behaviour. So every UCX function that returns
//! a status, and every callback that receives one, is declared here with the
//! status as a plain `i8` (the C type is a packed enum of one byte).
//!
//! This module is a leaf: it knows libc, UCX (ucx1-sys) and its own files,
//! nothing of the crate above it. What the layers above decide reaches it as
//! data or through a trait it defines ([`am::AmSink`], which the engine's
//! inbox implements), never as an import of theirs.

pub(crate) mod am;
mod decls;
pub(crate) mod hooks;
pub(crate) mod status;
pub(crate) mod sys;
pub(crate) mod ucp;
