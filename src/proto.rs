//! The control plane's messages and service stubs, generated from `proto/coordinator.proto`.

#![allow(clippy::all, missing_docs)]
tonic::include_proto!("alexnet.v1");

/// The version every process of a job must share (part of the registration handshake).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// TensorBoard's event messages (`proto/tensorboard.proto`).
pub mod tensorboard {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("tensorboard");
}
