//! One module per `kvrail` subcommand.

pub mod children;
pub mod demo;
pub mod info;
pub mod serve;
pub mod soak;
pub mod workload;
