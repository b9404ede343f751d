//! The drivers: `kvrail demo`, `bench`, `soak` and `raw-ucx`. They are
//! clients of the agents, never part of them: they start agent processes
//! (or reach running ones), drive them through the same public APIs a user
//! has, and own a run's report from its start to its end or failure.

pub mod bench;
pub mod chart;
pub mod children;
pub mod cluster;
pub mod crew;
pub mod demo;
pub mod progress;
pub mod raw;
pub mod soak;
pub mod workload;
