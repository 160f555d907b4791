//! What the network is: its configuration, the parameters of each column, and how a forward
//! and a backward pass run through the columns.

pub mod config;
mod layers;
pub mod network;
pub mod params;
pub mod profile;
pub mod shapes;

pub use config::NetConfig;
pub use network::{Mode, Network};
