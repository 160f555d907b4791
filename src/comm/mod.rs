//! How the two columns and the replicas exchange activations and gradients.
//!
//! The columns talk only where the paper lets them: the inputs of conv3, fc6, fc7 and fc8, and
//! the logits. Forward, each of those is an all-gather of the columns' halves along channels
//! (or features); backward, the matching reduce-scatter sums, for each column's half, the
//! gradients that both columns computed. A process passes the columns it holds (one, or both)
//! and the exchange fills in the rest: from memory when both columns are here, over a [`Link`]
//! (threads, TCP; NCCL with the CUDA backend) when the other column lives elsewhere.
//!
//! Replicas of the pair (data parallelism) average their gradients after every backward pass
//! through a [`ReplicaReduce`]; they exchange nothing else.

pub mod channel;
pub mod job_thread;
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod pair;
pub mod replica;
pub mod tcp;
pub mod topology;

use crate::backend::Backend;

/// Columns of the network: each holds half the kernels of every layer, and the exchanges are
/// between them.
pub const COLUMNS: usize = 2;

pub use channel::{ChannelExchange, ChannelLink};
pub use local::LocalExchange;
pub use pair::{PairExchange, StagedLink};
pub use replica::{
    BufReduce, OverlappedReduce, ReduceAlgorithm, ReplicaReduce, Segment, StagedReduce,
    TcpReplicaGroup,
};
pub use tcp::{MeshKey, TcpLink, TcpMesh};
pub use topology::{connect, connect_tcp, Exchanges, Joined, Placement, ReplicaRange, Topology};

/// What crossed a link (or a set of links) so far: payload only, frame headers apart.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent_bytes: u64,
    pub received_bytes: u64,
    /// Blocks sent.
    pub messages: u64,
    /// Bytes of frame headers and handshakes, sent.
    pub overhead_bytes: u64,
}

impl std::ops::AddAssign for Traffic {
    fn add_assign(&mut self, o: Traffic) {
        self.sent_bytes += o.sent_bytes;
        self.received_bytes += o.received_bytes;
        self.messages += o.messages;
        self.overhead_bytes += o.overhead_bytes;
    }
}

/// A point-to-point link between two processes (or threads) carrying blocks of f32.
pub trait Link: Send {
    /// Sends `mine` and receives the peer's block, which must hold `expect` values. Both
    /// directions move at once, so two peers swapping large blocks never wait on each other.
    fn swap(&mut self, mine: &[f32], expect: usize) -> anyhow::Result<Vec<f32>>;
    /// What this link carried so far.
    fn traffic(&self) -> Traffic;
}

impl<L: Link + ?Sized> Link for Box<L> {
    fn swap(&mut self, mine: &[f32], expect: usize) -> anyhow::Result<Vec<f32>> {
        (**self).swap(mine, expect)
    }
    fn traffic(&self) -> Traffic {
        (**self).traffic()
    }
}

/// A point-to-point link between two columns that moves blocks held in a backend's memory:
/// staged through the host over a [`Link`] ([`StagedLink`]: TCP, channels), or in place on the
/// device (NCCL).
///
/// A device link queues its work: [`Self::finish_swap`] returns a block that the backend's
/// later ops read only once it has arrived, and the host learns whether it arrived whole (in
/// step with the peer, within the peer timeout) at [`Self::settle`], before anything is made of
/// the step.
pub trait BufLink<B: Backend>: Send {
    /// Starts swapping `mine` for the peer's block of `expect` values. `mine` must stay unchanged
    /// (and alive) until [`Self::finish_swap`], which must come before the next start.
    fn start_swap(&mut self, backend: &B, mine: &B::Buf, expect: usize) -> anyhow::Result<()>;
    /// The peer's block of the swap in flight.
    fn finish_swap(&mut self, backend: &B) -> anyhow::Result<B::Buf>;
    /// Waits until every swap so far is known to have completed, in step with the peer; the
    /// error of the first that did not. A host link knows at each finish.
    fn settle(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    /// What this link carried so far.
    fn traffic(&self) -> Traffic;
}

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
    ) -> anyhow::Result<()> {
        self.start_all_gather(backend, rows, width, local)?;
        self.finish_all_gather(backend, rows, width, local, out)
            .map(drop)
    }

    /// Starts [`Self::all_gather`]: sends this process's blocks to the other column and returns
    /// without waiting for its blocks, so that the caller can compute with the blocks it holds
    /// (the part of the next layer that reads them) while the others travel. `local` must stay
    /// unchanged until [`Self::finish_all_gather`], which must come before any other exchange.
    /// The default starts nothing (both columns in one process).
    fn start_all_gather(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        local: &[&B::Buf],
    ) -> anyhow::Result<()> {
        let _ = (backend, rows, width, local);
        Ok(())
    }

    /// Finishes what [`Self::start_all_gather`] started, with the same `local`: fills `out` as
    /// [`Self::all_gather`] does, and returns the blocks of the columns held elsewhere
    /// (`[rows, width]` each, in column order; none when both columns are here). Waits for them.
    fn finish_all_gather(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        local: &[&B::Buf],
        out: &mut B::Buf,
    ) -> anyhow::Result<Vec<B::Buf>>;

    /// Starts the backward exchange of a gathered tensor's gradients: sends the other column
    /// its part of `full` (this process's `[rows, COLUMNS * width]` gradients, one per held
    /// column) and returns without waiting for the reply, so that the caller can compute what
    /// does not need the sum (the layer's weight gradients) while the blocks travel. `full` must stay
    /// unchanged until [`Self::finish_reduce_scatter`], which must come before any other
    /// exchange. The default starts nothing: the whole exchange happens in the finish (both
    /// columns in one process: a sum in memory).
    fn start_reduce_scatter(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        full: &[&B::Buf],
    ) -> anyhow::Result<()> {
        let _ = (backend, rows, width, full);
        Ok(())
    }

    /// Finishes what [`Self::start_reduce_scatter`] started, with the same `full`: `out[i]`
    /// (`[rows, width]`) = the sum over all columns of block `local_columns()[i]` of their
    /// gradients. Waits for the other column's part.
    fn finish_reduce_scatter(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        full: &[&B::Buf],
        out: &mut [&mut B::Buf],
    ) -> anyhow::Result<()>;

    /// Waits until every exchange so far is known to have completed (see [`BufLink::settle`]):
    /// called once per step, before the SGD update uses what the exchanges brought.
    fn settle(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    /// What crossed to the other column so far (nothing when both columns are here).
    fn traffic(&self) -> Traffic {
        Traffic::default()
    }
}
