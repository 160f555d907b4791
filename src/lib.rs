//! alexnet: a trainer for the two-column network of Krizhevsky, Sutskever and Hinton (2012).
//!
//! - [`model`]: what the network is (configuration, shapes, the two columns and their parameters).
//! - [`backend`]: how its ops run (CPU now; CUDA plugs in behind the same trait).
//! - [`comm`]: how the columns exchange activations and gradients.
//! - [`data`]: images in, batches out.
//! - [`train`]: the training loop and the benchmark.
//! - [`telemetry`]: what a run shows TensorBoard and Prometheus.
//! - [`selftest`]: a backend checked against the CPU reference and PyTorch's golden vectors.
//! - [`rng`], [`files`]: randomness as a function of coordinates; files written atomically
//!   (leaves that every layer above may use).

pub mod admission;
pub mod agent;
pub mod auth;
pub mod backend;
pub mod comm;
pub mod coordinator;
pub mod data;
pub mod files;
pub mod launch;
pub mod log_fields;
pub mod model;
pub mod proto;
pub mod rng;
pub mod selftest;
pub mod spawn;
pub mod telemetry;
pub mod train;
pub mod worker;
