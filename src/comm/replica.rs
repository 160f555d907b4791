//! Data parallelism: the replicas of one column average their gradients after every backward
//! pass, so that every replica takes the same SGD step.
//!
//! Over TCP, three replicas or more average around a ring ([`TcpReplicaGroup`]): a
//! reduce-scatter, after which each replica holds the sum of one class of values, then an
//! all-gather of the sums, each rank sending 2 (R - 1) / R of the buffer in all. Values are
//! assigned to classes by their position among all the parameters ([`Segment`],
//! [`RING_BLOCK`]), so that a value's order of summation is fixed whatever the buckets.

use super::job_thread::JobThread;
use super::{Link, TcpLink, Traffic};
use crate::backend::Backend;
use std::sync::{Arc, Mutex};

/// Where a bucket's values sit among all the gradients of a column position: consecutive
/// segments of the bucket, each at the position of its first value in the canonical layout
/// (every parameter of the held columns, in order; the same on every replica). The ring
/// reduction hands values to replicas by that position, so its order of summation, value by
/// value, does not depend on how the gradients are cut into buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub at: u64,
    pub len: usize,
}

/// The layout of a bucket that is one segment at position 0 (tests, tools).
pub fn whole(len: usize) -> Vec<Segment> {
    vec![Segment { at: 0, len }]
}

/// Averages a buffer across the replicas of one column.
pub trait ReplicaReduce: Send {
    /// Replicas in the group, this one included.
    fn replicas(&self) -> usize;
    /// `data` (laid out as `layout` says) = the mean of every replica's `data`, the same bits
    /// on every replica, summed in an order fixed by each value's position.
    fn all_reduce_mean(&mut self, data: &mut [f32], layout: &[Segment]) -> anyhow::Result<()>;
    /// What crossed to the other replicas so far.
    fn traffic(&self) -> Traffic;
}

/// Values per block of the ring's assignment: block `b` of the canonical layout is reduced
/// by the replica that owns class `b mod R`. Large enough that a block is one copy, small
/// enough that every bucket spreads over all replicas (conv1's weights are 17 blocks).
pub const RING_BLOCK: u64 = 2048;

/// How the replicas of a column average over TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceAlgorithm {
    /// Reduce-scatter then all-gather around the ring of replicas: each rank sends
    /// 2 (R - 1) / R of the buffer. Two replicas always go all-to-all (the same bytes, one
    /// round trip).
    Ring,
    /// Every replica sends its whole buffer to every other: (R - 1) times the buffer.
    AllToAll,
}

impl ReduceAlgorithm {
    /// The ring, unless `ALEXNET_REPLICA_REDUCE=all-to-all` (for the benchmark beside it).
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var("ALEXNET_REPLICA_REDUCE").as_deref() {
            Err(_) | Ok("") | Ok("ring") => Ok(ReduceAlgorithm::Ring),
            Ok("all-to-all") => Ok(ReduceAlgorithm::AllToAll),
            Ok(other) => anyhow::bail!(
                "ALEXNET_REPLICA_REDUCE={other}: expected ring (the default) or all-to-all"
            ),
        }
    }
}

/// The replicas of one column, linked by TCP to each other.
pub struct TcpReplicaGroup {
    me: usize,
    /// (replica index, link), by replica index.
    links: Vec<(usize, TcpLink)>,
    algorithm: ReduceAlgorithm,
}

impl TcpReplicaGroup {
    /// Replica `me` of `links.len() + 1`, with a link to each other replica.
    pub fn new(me: usize, mut links: Vec<(usize, TcpLink)>, algorithm: ReduceAlgorithm) -> Self {
        links.sort_by_key(|l| l.0);
        TcpReplicaGroup {
            me,
            links,
            algorithm,
        }
    }

    /// Every replica sends its whole buffer to every other one at once, and each sums in
    /// replica order.
    fn all_to_all(&mut self, data: &mut [f32]) -> anyhow::Result<()> {
        let n = data.len();
        let mine: &[f32] = data;
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

    /// One ring step: sends `block` to the next replica while receiving `expect` values from
    /// the previous one.
    fn ring_step(&mut self, block: &[f32], expect: usize) -> anyhow::Result<Vec<f32>> {
        let r = self.replicas();
        let (next, prev) = ((self.me + 1) % r, (self.me + r - 1) % r);
        let link = |replica: usize| {
            (self.links.iter())
                .position(|(i, _)| *i == replica)
                .expect("a link to every replica")
        };
        let (n, p) = (link(next), link(prev));
        // Two distinct links (three replicas or more): borrowed apart.
        let (to_next, from_prev) = if n < p {
            let (a, b) = self.links.split_at_mut(p);
            (&mut a[n].1, &mut b[0].1)
        } else {
            let (a, b) = self.links.split_at_mut(n);
            (&mut b[0].1, &mut a[p].1)
        };
        let (sent, received) = std::thread::scope(|s| {
            let sender = s.spawn(|| to_next.send(block));
            let received = from_prev.recv(expect);
            (sender.join().expect("a ring sender panicked"), received)
        });
        sent?;
        received
    }

    /// Reduce-scatter then all-gather around the ring, in classes of blocks by position
    /// ([`classes`]): class `c` is summed in ring order from replica `c`, (((x_c + x_c+1) +
    /// ...) + x_c-1), by replica `c - 1`, which scales it and hands it round.
    fn ring(&mut self, data: &mut [f32], layout: &[Segment]) -> anyhow::Result<()> {
        let r = self.replicas();
        let me = self.me;
        let classes = classes(layout, data.len(), r)?;
        let count = |c: usize| classes[c].iter().map(|x| x.len()).sum::<usize>();
        let gather = |data: &[f32], c: usize| -> Vec<f32> {
            (classes[c].iter())
                .flat_map(|x| data[x.clone()].iter().copied())
                .collect()
        };
        let scatter = |data: &mut [f32], c: usize, values: &[f32]| {
            let mut at = 0;
            for x in &classes[c] {
                data[x.clone()].copy_from_slice(&values[at..at + x.len()]);
                at += x.len();
            }
        };
        // Reduce-scatter: at step k this replica sends the partial sum of class me - k and
        // adds its own values to the partial of class me - k - 1 it receives.
        let mut partial = gather(data, me);
        for k in 0..r - 1 {
            let class = (me + 2 * r - k - 1) % r;
            let received = self.ring_step(&partial, count(class))?;
            let own = gather(data, class);
            partial = received.iter().zip(&own).map(|(a, b)| a + b).collect();
        }
        // This replica now holds the whole sum of class me + 1.
        let scale = 1.0 / r as f32;
        partial.iter_mut().for_each(|v| *v *= scale);
        scatter(data, (me + 1) % r, &partial);
        // All-gather: at step k it passes on class me + 1 - k and receives class me - k.
        let mut block = partial;
        for k in 0..r - 1 {
            let class = (me + r - k) % r;
            block = self.ring_step(&block, count(class))?;
            scatter(data, class, &block);
        }
        Ok(())
    }
}

/// The values of a bucket laid out as `layout` says, by class: class `c` holds the ranges
/// (within the bucket, in order) of every [`RING_BLOCK`] of the canonical layout whose index
/// is `c` modulo `r`.
pub fn classes(
    layout: &[Segment],
    n: usize,
    r: usize,
) -> anyhow::Result<Vec<Vec<std::ops::Range<usize>>>> {
    let covered: usize = layout.iter().map(|s| s.len).sum();
    anyhow::ensure!(
        covered == n,
        "a gradient bucket of {n} values laid out as {covered}"
    );
    let mut out: Vec<Vec<std::ops::Range<usize>>> = vec![Vec::new(); r];
    let mut pos = 0usize;
    for s in layout {
        let mut i = 0usize;
        while i < s.len {
            let g = s.at + i as u64;
            let block = g / RING_BLOCK;
            let take = (((block + 1) * RING_BLOCK - g) as usize).min(s.len - i);
            let class = &mut out[(block % r as u64) as usize];
            let range = pos + i..pos + i + take;
            match class.last_mut() {
                Some(last) if last.end == range.start => last.end = range.end,
                _ => class.push(range),
            }
            i += take;
        }
        pos += s.len;
    }
    Ok(out)
}

impl ReplicaReduce for TcpReplicaGroup {
    fn replicas(&self) -> usize {
        self.links.len() + 1
    }

    fn all_reduce_mean(&mut self, data: &mut [f32], layout: &[Segment]) -> anyhow::Result<()> {
        if self.replicas() <= 2 || self.algorithm == ReduceAlgorithm::AllToAll {
            self.all_to_all(data)
        } else {
            self.ring(data, layout)
        }
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
    thread: JobThread<(Vec<f32>, Vec<Segment>), Vec<f32>>,
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
            move |(mut bucket, layout): (Vec<f32>, Vec<Segment>)| {
                let r = group.all_reduce_mean(&mut bucket, &layout);
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

    /// Starts averaging `bucket`, laid out as `layout` says; [`Self::take_next`] returns it
    /// averaged.
    pub fn submit(&mut self, bucket: Vec<f32>, layout: Vec<Segment>) -> anyhow::Result<()> {
        self.thread.submit((bucket, layout))
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
    /// Starts averaging `bucket`, laid out as `layout` says (see [`Segment`]).
    fn submit(&mut self, backend: &B, bucket: B::Buf, layout: Vec<Segment>) -> anyhow::Result<()>;
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
    fn submit(&mut self, backend: &B, bucket: B::Buf, layout: Vec<Segment>) -> anyhow::Result<()> {
        self.inner.submit(backend.download_owned(bucket), layout)
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
        fn all_reduce_mean(&mut self, data: &mut [f32], _: &[Segment]) -> anyhow::Result<()> {
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
    fn values_go_to_classes_by_their_position_whatever_the_cut() {
        let b = RING_BLOCK as usize;
        // Two segments: the tail of block 0 and all of block 1, then block 3 from its start.
        let layout = [
            Segment {
                at: b as u64 - 5,
                len: 5 + b,
            },
            Segment {
                at: 3 * b as u64,
                len: 10,
            },
        ];
        let c = classes(&layout, 15 + b, 3).unwrap();
        assert_eq!(c[0], vec![0..5, 5 + b..15 + b]);
        assert_eq!(c[1], vec![5..5 + b]);
        assert!(c[2].is_empty());
        // Every value's class is its block's, modulo the replicas, however the bucket is cut.
        let n = 5 * b + 3;
        let one = classes(&whole(n), n, 4).unwrap();
        let class_of = |cs: &[Vec<std::ops::Range<usize>>], i: usize| {
            cs.iter()
                .position(|c| c.iter().any(|x| x.contains(&i)))
                .unwrap()
        };
        for i in (0..n).step_by(97) {
            assert_eq!(class_of(&one, i), (i / b) % 4);
        }
        let tail = classes(
            &[Segment {
                at: 1234,
                len: n - 1234,
            }],
            n - 1234,
            4,
        )
        .unwrap();
        for i in (0..n - 1234).step_by(101) {
            assert_eq!(class_of(&tail, i), class_of(&one, i + 1234));
        }
        assert!(
            classes(&whole(3), 4, 2).is_err(),
            "a layout that does not cover the bucket"
        );
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
            r.submit(vec![i as f32; 3 + i], whole(3 + i)).unwrap();
        }
        assert_eq!(r.pending(), 3);
        for i in 0..3 {
            assert_eq!(r.take_next().unwrap(), vec![i as f32 * 0.5; 3 + i]);
        }
        assert_eq!(r.pending(), 0);
        assert_eq!(r.traffic().messages, 3);
        r.submit(vec![1.0], whole(1)).unwrap();
        let e = r.take_next().unwrap_err();
        assert_eq!(
            e.downcast_ref::<crate::comm::tcp::PeerError>()
                .unwrap()
                .rank,
            7
        );
        let again = r.submit(vec![1.0], whole(1)).unwrap_err();
        assert!(
            format!("{again}").contains("failed earlier: rank 7 went away"),
            "{again}"
        );
    }
}
