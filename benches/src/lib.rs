//! kvrail benchmarks live in `benches/`; this library is intentionally empty.
#![forbid(unsafe_code)]
