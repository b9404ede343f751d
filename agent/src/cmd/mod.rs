//! One module per `kvrail` subcommand.

pub mod bench;
pub mod children;
pub mod demo;
pub mod info;
pub mod raw;
pub mod serve;
pub mod soak;
pub mod workload;
