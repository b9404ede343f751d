//! Arbitrary bytes as a Submit, a Handshake or a session message: decoding
//! and validation must never panic, and whatever they accept must be in
//! range (see `kvrail_agent::agent::validate::fuzz_one`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kvrail_agent::agent::validate::fuzz_one(data);
});
