//! Two columns on two threads of one process, exchanging host copies over channels.
//!
//! The simplest link between columns that live apart: it shows that a column held alone
//! computes exactly its half of the network, with the same timeout on every wait as the
//! network links, so that a dead peer is an error, not a hang.

use super::{Link, PairExchange, Traffic};
use crate::backend::Backend;
use anyhow::{ensure, Context};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::Duration;

/// One end of an in-process link.
pub struct ChannelLink {
    to_peer: Sender<Vec<f32>>,
    from_peer: Receiver<Vec<f32>>,
    timeout: Duration,
    traffic: Traffic,
}

/// A column's end of a two-thread exchange.
pub type ChannelExchange<B> = PairExchange<B>;

impl ChannelLink {
    /// The two ends of a link.
    pub fn pair(timeout: Duration) -> (ChannelLink, ChannelLink) {
        let (a_tx, a_rx) = channel();
        let (b_tx, b_rx) = channel();
        let end = |to_peer, from_peer| ChannelLink {
            to_peer,
            from_peer,
            timeout,
            traffic: Traffic::default(),
        };
        (end(a_tx, b_rx), end(b_tx, a_rx))
    }
}

impl<B: Backend + 'static> PairExchange<B> {
    /// The two ends of a two-thread exchange over channels: for column 0 and for column 1.
    pub fn pair(timeout: Duration) -> anyhow::Result<(ChannelExchange<B>, ChannelExchange<B>)> {
        let (a, b) = ChannelLink::pair(timeout);
        Ok((PairExchange::staged(0, a)?, PairExchange::staged(1, b)?))
    }
}

impl Link for ChannelLink {
    fn swap(&mut self, mine: &[f32], expect: usize) -> anyhow::Result<Vec<f32>> {
        self.to_peer
            .send(mine.to_vec())
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
        self.traffic.sent_bytes += 4 * mine.len() as u64;
        self.traffic.received_bytes += 4 * expect as u64;
        self.traffic.messages += 1;
        Ok(theirs)
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }
}
