//! How the two columns (and, later, replicas) exchange activations and gradients.
//!
//! The columns talk only where the paper lets them: the inputs of conv3, fc6, fc7 and fc8, and
//! the logits. Forward, each of those is an all-gather of the columns' halves along channels
//! (or features); backward, the matching reduce-scatter sums, for each column's half, the
//! gradients that both columns computed. A process passes the columns it holds (one, or both)
//! and the exchange fills in the rest: from memory when both columns are here, over NCCL or TCP
//! when the other column lives in another process.

pub mod channel;
pub mod local;

use crate::backend::Backend;

pub use channel::ChannelExchange;
pub use local::LocalExchange;

/// One collective operation between the columns of one network.
pub trait ColumnExchange<B: Backend>: Send {
    /// The columns this process holds, in increasing order.
    fn local_columns(&self) -> &[usize];

    /// `out[rows, COLUMNS * width]` = the columns' `[rows, width]` blocks side by side, column 0
    /// first. `local` holds this process's blocks, in [`Self::local_columns`] order.
    fn all_gather(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        local: &[&B::Buf],
        out: &mut B::Buf,
    ) -> anyhow::Result<()>;

    /// `out[i]` (`[rows, width]`) = the sum over all columns of block `local_columns()[i]` of
    /// their `[rows, COLUMNS * width]` gradients. `full` holds this process's gradients.
    fn reduce_scatter(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        full: &[&B::Buf],
        out: &mut [&mut B::Buf],
    ) -> anyhow::Result<()>;
}
