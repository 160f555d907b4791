//! One column's end of a two-column exchange over a [`BufLink`] to the process holding the
//! other.
//!
//! A swap is started and taken back later: the backward pass sends the other column its part
//! of an input gradient, computes the layer's weight gradients while the blocks travel (they do
//! not depend on the exchange), and only then waits; the forward pass sends its block of a
//! gathered tensor and computes the next layer's part that reads it while the other column's
//! block travels. A host link runs on a thread of its own ([`LinkThread`], under
//! [`StagedLink`]); over NCCL the transfer runs on the communicator's stream, in place in the
//! device's memory, while those products run on the compute stream.

use super::job_thread::JobThread;
use super::COLUMNS;
use super::{BufLink, ColumnExchange, Link, Traffic};
use crate::backend::Backend;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

/// A [`Link`] on its own thread: [`LinkThread::start`] hands it a block to swap and returns at
/// once; [`LinkThread::finish`] waits for the peer's block. One swap at a time.
pub struct LinkThread<L: Link> {
    thread: JobThread<(Vec<f32>, usize), Vec<f32>>,
    traffic: Arc<Mutex<Traffic>>,
    _link: PhantomData<fn() -> L>,
}

impl<L: Link + 'static> LinkThread<L> {
    pub fn new(mut link: L) -> anyhow::Result<Self> {
        let traffic = Arc::new(Mutex::new(link.traffic()));
        let shared = traffic.clone();
        let thread = JobThread::spawn(
            "column-link",
            "the column link's thread",
            "the link to the other column",
            move |(mine, expect): (Vec<f32>, usize)| {
                let r = link.swap(&mine, expect);
                *shared.lock().unwrap_or_else(|p| p.into_inner()) = link.traffic();
                r
            },
        )?;
        Ok(LinkThread {
            thread,
            traffic,
            _link: PhantomData,
        })
    }
}

impl<L: Link> LinkThread<L> {
    /// Starts swapping `mine` for the peer's block of `expect` values.
    pub fn start(&mut self, mine: Vec<f32>, expect: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            !self.pending(),
            "a column swap was started while the last one was still in flight"
        );
        self.thread.submit((mine, expect))
    }

    /// The peer's block of the swap in flight. Waits for it: the link bounds its own waits on
    /// the peer (the job's peer timeout), so this never hangs on a dead peer.
    pub fn finish(&mut self) -> anyhow::Result<Vec<f32>> {
        self.thread.take()
    }

    /// [`Self::start`] and [`Self::finish`].
    pub fn swap(&mut self, mine: Vec<f32>, expect: usize) -> anyhow::Result<Vec<f32>> {
        self.start(mine, expect)?;
        self.finish()
    }

    pub fn pending(&self) -> bool {
        self.thread.pending() > 0
    }

    pub fn traffic(&self) -> Traffic {
        *self.traffic.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A [`Link`] between host buffers, carrying a backend's blocks: each is copied to the host
/// (the CPU's are there already), swapped on the link's thread, and copied back. The link for
/// TCP and in-process channels, and for GPUs without NCCL or sharing one GPU (uploads pass
/// through the CUDA backend's page-locked staging buffers).
pub struct StagedLink<L: Link> {
    link: LinkThread<L>,
}

impl<L: Link + 'static> StagedLink<L> {
    /// Starts the link's thread.
    pub fn new(link: L) -> anyhow::Result<Self> {
        Ok(StagedLink {
            link: LinkThread::new(link)?,
        })
    }
}

impl<B: Backend, L: Link> BufLink<B> for StagedLink<L> {
    fn start_swap(&mut self, backend: &B, mine: &B::Buf, expect: usize) -> anyhow::Result<()> {
        self.link.start(backend.download(mine), expect)
    }

    fn finish_swap(&mut self, backend: &B) -> anyhow::Result<B::Buf> {
        Ok(backend.upload_vec(self.link.finish()?))
    }

    fn traffic(&self) -> Traffic {
        self.link.traffic()
    }
}

/// The exchange of a process holding one column, whose partner column is across `link`.
pub struct PairExchange<B: Backend> {
    column: [usize; 1],
    link: Box<dyn BufLink<B>>,
    /// The block the reduce-scatter in flight sends, kept until it is finished.
    for_peer: Option<B::Buf>,
}

impl<B: Backend> PairExchange<B> {
    /// The end for `column` (0 or 1), over a link that moves the backend's buffers.
    pub fn new(column: usize, link: Box<dyn BufLink<B>>) -> Self {
        assert!(column < COLUMNS, "column {column} of {COLUMNS}");
        PairExchange {
            column: [column],
            link,
            for_peer: None,
        }
    }

    /// The end for `column` over a host link, staged through the host ([`StagedLink`]). Starts
    /// the link's thread.
    pub fn staged<L: Link + 'static>(column: usize, link: L) -> anyhow::Result<Self>
    where
        B: 'static,
    {
        Ok(Self::new(column, Box::new(StagedLink::new(link)?)))
    }
}

impl<B: Backend> ColumnExchange<B> for PairExchange<B> {
    fn local_columns(&self) -> &[usize] {
        &self.column
    }

    fn start_all_gather(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        local: &[&B::Buf],
    ) -> anyhow::Result<()> {
        anyhow::ensure!(local.len() == 1, "a pair exchange holds one column");
        self.link.start_swap(backend, local[0], rows * width)
    }

    fn finish_all_gather(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        local: &[&B::Buf],
        out: &mut B::Buf,
    ) -> anyhow::Result<Vec<B::Buf>> {
        anyhow::ensure!(local.len() == 1, "a pair exchange holds one column");
        let theirs = self.link.finish_swap(backend)?;
        let mine = local[0];
        let parts: [&B::Buf; COLUMNS] = if self.column[0] == 0 {
            [mine, &theirs]
        } else {
            [&theirs, mine]
        };
        backend.concat_rows(rows, &parts, &[width; COLUMNS], out);
        Ok(vec![theirs])
    }

    fn start_reduce_scatter(
        &mut self,
        backend: &B,
        rows: usize,
        width: usize,
        full: &[&B::Buf],
    ) -> anyhow::Result<()> {
        anyhow::ensure!(full.len() == 1, "a pair exchange holds one column");
        // Send the peer its half of this column's gradient. The block lives until the swap is
        // finished: a device link reads it in place meanwhile.
        let peer = 1 - self.column[0];
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
        self.link.start_swap(backend, &for_peer, rows * width)?;
        self.for_peer = Some(for_peer);
        Ok(())
    }

    fn finish_reduce_scatter(
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
        // Add the peer's part of this column's half.
        let theirs = match self.link.finish_swap(backend) {
            Ok(theirs) => theirs,
            Err(e) => {
                // A device link may still be reading the block: leave it allocated.
                std::mem::forget(self.for_peer.take());
                return Err(e);
            }
        };
        self.for_peer = None;
        let me = self.column[0];
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

    fn settle(&mut self) -> anyhow::Result<()> {
        self.link.settle()
    }

    fn traffic(&self) -> Traffic {
        self.link.traffic()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::ChannelLink;
    use std::time::Duration;

    #[test]
    fn swaps_started_early_come_back_and_a_failure_sticks() {
        let (a, b) = ChannelLink::pair(Duration::from_millis(300));
        let (mut a, mut b) = (LinkThread::new(a).unwrap(), LinkThread::new(b).unwrap());
        assert!(a.finish().is_err(), "nothing in flight");
        a.start(vec![1.0, 2.0], 3).unwrap();
        assert!(a.pending());
        assert!(a.start(vec![0.0], 1).is_err(), "one swap at a time");
        // The other end answers while the first end's swap is in flight.
        assert_eq!(b.swap(vec![7.0, 8.0, 9.0], 2).unwrap(), vec![1.0, 2.0]);
        assert_eq!(a.finish().unwrap(), vec![7.0, 8.0, 9.0]);
        assert!(!a.pending());
        let t = a.traffic();
        assert_eq!((t.sent_bytes, t.received_bytes, t.messages), (8, 12, 1));
        // The peer never answers: the link's own timeout ends the wait, and the link stays
        // failed.
        drop(b);
        a.start(vec![1.0], 1).unwrap();
        let e = a.finish().unwrap_err();
        assert!(format!("{e:#}").contains("other column"), "{e:#}");
        let again = a.start(vec![1.0], 1).unwrap_err();
        assert!(format!("{again}").contains("failed earlier"), "{again}");
    }

    struct PanickingLink;

    impl Link for PanickingLink {
        fn swap(&mut self, _: &[f32], _: usize) -> anyhow::Result<Vec<f32>> {
            panic!("the writer thread panicked")
        }
        fn traffic(&self) -> Traffic {
            Traffic::default()
        }
    }

    #[test]
    fn a_panic_on_the_links_thread_is_reported_with_its_message() {
        let mut link = LinkThread::new(PanickingLink).unwrap();
        link.start(vec![1.0], 1).unwrap();
        let e = link.finish().unwrap_err();
        assert!(
            format!("{e}").contains("panicked: the writer thread panicked"),
            "{e}"
        );
        assert!(link.start(vec![1.0], 1).is_err());
    }
}
