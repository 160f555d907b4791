//! Generates the coordinator's gRPC code from proto/ with a vendored protoc, so that building
//! needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/coordinator.proto");
    tonic_prost_build::configure().compile_protos(&["proto/coordinator.proto"], &["proto"])?;
    Ok(())
}
