//! The server's entry points: one module per `kvrail` subcommand that runs
//! an agent or reports on this host. The drivers that exercise agents as
//! clients (demo, bench, soak, raw-ucx) live in [`crate::drive`].

pub mod info;
pub mod peers;
pub mod serve;
