//! What the network is: its configuration, the parameters of each column, and how a forward
//! and a backward pass run through the columns.

pub mod config;
pub mod network;
pub mod params;

pub use config::NetConfig;
pub use network::{Mode, Network};
