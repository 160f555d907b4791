//! alexnet: a trainer for the two-column network of Krizhevsky, Sutskever and Hinton (2012).
//!
//! - [`model`]: what the network is (configuration, shapes, the two columns and their parameters).
//! - [`backend`]: how its ops run (CPU now; CUDA plugs in behind the same trait).
//! - [`comm`]: how the columns exchange activations and gradients.
//! - [`data`]: images in, batches out.
//! - [`train`]: the training loop and the benchmark.

pub mod admission;
pub mod agent;
pub mod auth;
pub mod backend;
pub mod comm;
pub mod coordinator;
pub mod data;
pub mod model;
pub mod proto;
pub mod spawn;
pub mod train;
pub mod worker;
