//! One column's end of a two-column exchange over a [`Link`] to the process holding the other.

use super::{ColumnExchange, Link, Traffic};
use crate::backend::Backend;
use crate::model::config::COLUMNS;

/// The exchange of a process holding one column, whose partner column is across `link`.
pub struct PairExchange<L: Link> {
    column: [usize; 1],
    link: L,
}

impl<L: Link> PairExchange<L> {
    /// The end for `column` (0 or 1).
    pub fn new(column: usize, link: L) -> Self {
        assert!(column < COLUMNS, "column {column} of {COLUMNS}");
        PairExchange {
            column: [column],
            link,
        }
    }
}

impl<B: Backend, L: Link> ColumnExchange<B> for PairExchange<L> {
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
        anyhow::ensure!(local.len() == 1, "a pair exchange holds one column");
        let theirs = self.link.swap(&backend.download(local[0]), rows * width)?;
        let theirs = backend.upload(&theirs);
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
        anyhow::ensure!(
            full.len() == 1 && out.len() == 1,
            "a pair exchange holds one column"
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
        let theirs = backend.upload(&self.link.swap(&backend.download(&for_peer), rows * width)?);
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

    fn traffic(&self) -> Traffic {
        self.link.traffic()
    }
}
