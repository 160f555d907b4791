//! Data parallelism: the replicas of one column average their gradients after every backward
//! pass, so that every replica takes the same SGD step.

use super::{Link, TcpLink, Traffic};

/// Averages a buffer across the replicas of one column.
pub trait ReplicaReduce: Send {
    /// Replicas in the group, this one included.
    fn replicas(&self) -> usize;
    /// `data` = the mean of every replica's `data`, summed in replica order so that all
    /// replicas end with the same bits.
    fn all_reduce_mean(&mut self, data: &mut [f32]) -> anyhow::Result<()>;
    /// What crossed to the other replicas so far.
    fn traffic(&self) -> Traffic;
}

/// The replicas of one column, linked by TCP to each other.
pub struct TcpReplicaGroup {
    me: usize,
    /// (replica index, link), by replica index.
    links: Vec<(usize, TcpLink)>,
}

impl TcpReplicaGroup {
    /// Replica `me` of `links.len() + 1`, with a link to each other replica.
    pub fn new(me: usize, mut links: Vec<(usize, TcpLink)>) -> Self {
        links.sort_by_key(|l| l.0);
        TcpReplicaGroup { me, links }
    }
}

impl ReplicaReduce for TcpReplicaGroup {
    fn replicas(&self) -> usize {
        self.links.len() + 1
    }

    fn all_reduce_mean(&mut self, data: &mut [f32]) -> anyhow::Result<()> {
        let n = data.len();
        let mine: &[f32] = data;
        // Every replica sends its whole buffer to every other one at once; for the few replicas
        // of a CPU job this moves as much as a ring would, in one round trip.
        let received: Vec<anyhow::Result<Vec<f32>>> = std::thread::scope(|s| {
            let handles: Vec<_> = self
                .links
                .iter_mut()
                .map(|(_, link)| s.spawn(move || link.swap(mine, n)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a replica link thread panicked"))
                .collect()
        });
        let mut theirs = Vec::with_capacity(received.len());
        for r in received {
            theirs.push(r?);
        }
        let mut sum = vec![0f32; n];
        let mut own_added = false;
        let mut add = |part: &[f32]| sum.iter_mut().zip(part).for_each(|(s, v)| *s += v);
        for ((replica, _), part) in self.links.iter().zip(&theirs) {
            if *replica > self.me && !own_added {
                add(data);
                own_added = true;
            }
            add(part);
        }
        if !own_added {
            add(data);
        }
        let scale = 1.0 / self.replicas() as f32;
        data.iter_mut().zip(&sum).for_each(|(d, s)| *d = s * scale);
        Ok(())
    }

    fn traffic(&self) -> Traffic {
        let mut t = Traffic::default();
        for (_, l) in &self.links {
            t += l.traffic();
        }
        t
    }
}
