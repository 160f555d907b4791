//! Two columns on two threads of one process, exchanging host copies over channels.
//!
//! The simplest exchange between columns that live apart: it shows that a column held alone
//! computes exactly its half of the network, and it is the pattern the network transports
//! (TCP, NCCL) follow: send this column's block, receive the other's, with a timeout on every
//! wait so that a dead peer is an error, not a hang.

use super::ColumnExchange;
use crate::backend::Backend;
use crate::model::config::COLUMNS;
use anyhow::{ensure, Context};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

/// One end of a two-column exchange.
pub struct ChannelExchange {
    column: [usize; 1],
    to_peer: Sender<Vec<f32>>,
    from_peer: Receiver<Vec<f32>>,
    timeout: Duration,
}

impl ChannelExchange {
    /// The two ends: for column 0 and for column 1.
    pub fn pair(timeout: Duration) -> (ChannelExchange, ChannelExchange) {
        let (a_tx, a_rx) = channel();
        let (b_tx, b_rx) = channel();
        (
            ChannelExchange {
                column: [0],
                to_peer: a_tx,
                from_peer: b_rx,
                timeout,
            },
            ChannelExchange {
                column: [1],
                to_peer: b_tx,
                from_peer: a_rx,
                timeout,
            },
        )
    }

    fn swap(&self, mine: Vec<f32>, expect: usize) -> anyhow::Result<Vec<f32>> {
        self.to_peer
            .send(mine)
            .ok()
            .context("the other column's end is gone")?;
        let theirs = self
            .from_peer
            .recv_timeout(self.timeout)
            .with_context(|| format!("no block from the other column within {:?}", self.timeout))?;
        ensure!(
            theirs.len() == expect,
            "the other column sent {} values, {expect} expected",
            theirs.len()
        );
        Ok(theirs)
    }
}

impl<B: Backend> ColumnExchange<B> for ChannelExchange {
    fn local_columns(&self) -> &[usize] {
        &self.column
    }

    fn all_gather(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        local: &[&B::Buf],
        out: &mut B::Buf,
    ) -> anyhow::Result<()> {
        ensure!(local.len() == 1, "a channel exchange holds one column");
        let theirs = backend.upload(&self.swap(backend.download(local[0]), rows * width)?);
        let mine = local[0];
        let parts: [&B::Buf; COLUMNS] = if self.column[0] == 0 {
            [mine, &theirs]
        } else {
            [&theirs, mine]
        };
        backend.concat_rows(rows, &parts, &[width; COLUMNS], out);
        Ok(())
    }

    fn reduce_scatter(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        full: &[&B::Buf],
        out: &mut [&mut B::Buf],
    ) -> anyhow::Result<()> {
        ensure!(
            full.len() == 1 && out.len() == 1,
            "a channel exchange holds one column"
        );
        let (me, peer) = (self.column[0], 1 - self.column[0]);
        // Send the peer its half of this column's gradient; add the peer's part of this half.
        let mut for_peer = backend.zeros(rows * width);
        backend.slice_rows(
            rows,
            COLUMNS * width,
            peer * width,
            width,
            full[0],
            &mut for_peer,
            false,
        );
        let theirs = backend.upload(&self.swap(backend.download(&for_peer), rows * width)?);
        // Always sum in column order, so that both layouts of the network add the same way.
        let own = |out: &mut B::Buf, accumulate: bool| {
            backend.slice_rows(
                rows,
                COLUMNS * width,
                me * width,
                width,
                full[0],
                out,
                accumulate,
            )
        };
        let peer_part = |out: &mut B::Buf, accumulate: bool| {
            backend.slice_rows(rows, width, 0, width, &theirs, out, accumulate)
        };
        if me == 0 {
            own(out[0], false);
            peer_part(out[0], true);
        } else {
            peer_part(out[0], false);
            own(out[0], true);
        }
        Ok(())
    }
}
