//! Data parallelism: the replicas of one column average their gradients after every backward
//! pass, so that every replica takes the same SGD step.

use super::job_thread::JobThread;
use super::{Link, TcpLink, Traffic};
use crate::backend::Backend;
use std::sync::{Arc, Mutex};

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

/// A [`ReplicaReduce`] on a thread of its own, fed gradient buckets as the backward pass
/// finishes them (the last layers first), so that averaging a layer's gradients overlaps the
/// backward pass of the layers below it, as PyTorch DDP's buckets do. Buckets come back in the
/// order they went, each averaged exactly as [`ReplicaReduce::all_reduce_mean`] averages it:
/// the mean is taken element by element, so splitting the gradients into buckets changes no
/// bit of the result.
pub struct OverlappedReduce {
    thread: JobThread<Vec<f32>, Vec<f32>>,
    replicas: usize,
    traffic: Arc<Mutex<Traffic>>,
}

impl OverlappedReduce {
    pub fn new(mut group: Box<dyn ReplicaReduce>) -> anyhow::Result<Self> {
        let replicas = group.replicas();
        let traffic = Arc::new(Mutex::new(group.traffic()));
        let shared = traffic.clone();
        let thread = JobThread::spawn(
            "replica-reduce",
            "the replicas' reduction thread",
            "averaging gradients with the other replicas",
            move |mut bucket: Vec<f32>| {
                let r = group.all_reduce_mean(&mut bucket);
                *shared.lock().unwrap_or_else(|p| p.into_inner()) = group.traffic();
                r.map(|()| bucket)
            },
        )?;
        Ok(OverlappedReduce {
            thread,
            replicas,
            traffic,
        })
    }

    pub fn replicas(&self) -> usize {
        self.replicas
    }

    /// Starts averaging `bucket`; [`Self::take_next`] returns it averaged.
    pub fn submit(&mut self, bucket: Vec<f32>) -> anyhow::Result<()> {
        self.thread.submit(bucket)
    }

    /// The oldest bucket submitted and not yet taken, averaged. Waits for it: the group bounds
    /// its own waits on the other replicas (the job's peer timeout).
    pub fn take_next(&mut self) -> anyhow::Result<Vec<f32>> {
        self.thread.take()
    }

    /// Buckets submitted and not yet taken back.
    pub fn pending(&self) -> usize {
        self.thread.pending()
    }

    /// What crossed to the other replicas so far.
    pub fn traffic(&self) -> Traffic {
        *self.traffic.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Averages gradient buckets held in a backend's memory across the replicas of one column, in
/// the background: the backward pass hands each bucket over as soon as it is final
/// ([`Self::submit`]) and takes them back averaged, in the same order, before the SGD step
/// ([`Self::take_next`]). Staged through the host over a [`ReplicaReduce`] ([`StagedReduce`]),
/// or in place on the device (NCCL), where a bucket taken back is read by the backend's later
/// ops only once it is averaged, and [`Self::settle`] says whether every reduction completed.
pub trait BufReduce<B: Backend>: Send {
    /// Replicas in the group, this one included.
    fn replicas(&self) -> usize;
    /// Starts averaging `bucket`.
    fn submit(&mut self, backend: &B, bucket: B::Buf) -> anyhow::Result<()>;
    /// The oldest bucket submitted and not yet taken, averaged: the mean of every replica's,
    /// the same bits on every replica.
    fn take_next(&mut self, backend: &B) -> anyhow::Result<B::Buf>;
    /// Waits until every reduction so far is known to have completed, in step with the other
    /// replicas; the error of the first that did not. A host group knows at each take.
    fn settle(&mut self) -> anyhow::Result<()> {
        Ok(())
    }
    /// What crossed to the other replicas so far.
    fn traffic(&self) -> Traffic;
}

/// A [`ReplicaReduce`] over host buffers, averaging a backend's buckets on its own thread
/// ([`OverlappedReduce`]): each is copied to the host (the CPU's are there already) and back.
pub struct StagedReduce {
    inner: OverlappedReduce,
}

impl StagedReduce {
    /// Starts the group's thread.
    pub fn new(group: Box<dyn ReplicaReduce>) -> anyhow::Result<Self> {
        Ok(StagedReduce {
            inner: OverlappedReduce::new(group)?,
        })
    }
}

impl<B: Backend> BufReduce<B> for StagedReduce {
    fn replicas(&self) -> usize {
        self.inner.replicas()
    }
    fn submit(&mut self, backend: &B, bucket: B::Buf) -> anyhow::Result<()> {
        self.inner.submit(backend.download_owned(bucket))
    }
    fn take_next(&mut self, backend: &B) -> anyhow::Result<B::Buf> {
        Ok(backend.upload_vec(self.inner.take_next()?))
    }
    fn traffic(&self) -> Traffic {
        self.inner.traffic()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group whose "other replica" holds zeros: the mean halves every value. It fails on
    /// bucket `fail_at`, blaming rank 7.
    struct HalvingGroup {
        calls: u64,
        fail_at: u64,
    }

    impl ReplicaReduce for HalvingGroup {
        fn replicas(&self) -> usize {
            2
        }
        fn all_reduce_mean(&mut self, data: &mut [f32]) -> anyhow::Result<()> {
            self.calls += 1;
            if self.calls == self.fail_at {
                return Err(crate::comm::tcp::PeerError {
                    rank: 7,
                    message: "rank 7 went away".into(),
                }
                .into());
            }
            data.iter_mut().for_each(|v| *v *= 0.5);
            Ok(())
        }
        fn traffic(&self) -> Traffic {
            Traffic {
                messages: self.calls,
                ..Traffic::default()
            }
        }
    }

    #[test]
    fn buckets_come_back_averaged_in_order_and_a_failure_sticks() {
        let group = HalvingGroup {
            calls: 0,
            fail_at: 4,
        };
        let mut r = OverlappedReduce::new(Box::new(group)).unwrap();
        assert_eq!(r.replicas(), 2);
        assert!(r.take_next().is_err(), "nothing submitted");
        for i in 0..3 {
            r.submit(vec![i as f32; 3 + i]).unwrap();
        }
        assert_eq!(r.pending(), 3);
        for i in 0..3 {
            assert_eq!(r.take_next().unwrap(), vec![i as f32 * 0.5; 3 + i]);
        }
        assert_eq!(r.pending(), 0);
        assert_eq!(r.traffic().messages, 3);
        r.submit(vec![1.0]).unwrap();
        let e = r.take_next().unwrap_err();
        assert_eq!(
            e.downcast_ref::<crate::comm::tcp::PeerError>()
                .unwrap()
                .rank,
            7
        );
        let again = r.submit(vec![1.0]).unwrap_err();
        assert!(
            format!("{again}").contains("failed earlier: rank 7 went away"),
            "{again}"
        );
    }
}
