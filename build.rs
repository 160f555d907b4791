//! Generates the coordinator's gRPC code (and TensorBoard's event messages) from proto/ with a vendored protoc, so that building
//! needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/coordinator.proto");
    println!("cargo:rerun-if-changed=proto/tensorboard.proto");
    tonic_prost_build::configure().compile_protos(&["proto/coordinator.proto"], &["proto"])?;
    // TensorBoard's event records: messages only, no service.
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .compile_protos(&["proto/tensorboard.proto"], &["proto"])?;
    Ok(())
}
