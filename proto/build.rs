//! Generates the tonic/prost code for `proto/kvrail/v1/{kvrail,sidecar}.proto`.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure().compile_protos(&["proto/kvrail/v1/kvrail.proto", "proto/kvrail/v1/sidecar.proto"], &["proto"])?;
    Ok(())
}
