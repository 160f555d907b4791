//! Which rank holds what: the pair of columns, replicated for data parallelism.
//!
//! Ranks are numbered replica by replica: with one column per worker, rank `2r + c` holds
//! column `c` of replica `r`; with both columns per worker, rank `r` is replica `r`.

use super::tcp::MeshKey;
use super::COLUMNS;
use super::{
    BufLink, BufReduce, ColumnExchange, LocalExchange, PairExchange, ReduceAlgorithm, StagedReduce,
    TcpMesh, TcpReplicaGroup,
};
use crate::backend::Backend;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// Copies of the pair of columns, each on its own part of the global batch. In an
    /// elastic job: this generation's count, within `elastic`.
    pub replicas: usize,
    /// Columns each worker holds: 1 (the paper's split, a column per device) or 2.
    pub columns_per_worker: usize,
    /// Elastic replicas (`--replicas MIN:MAX`): each generation runs with as many whole
    /// replicas as have joined, within this range. Left out of the file when fixed, so that
    /// the hash of a fixed job is what it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elastic: Option<ReplicaRange>,
}

/// The replica counts an elastic job may run with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicaRange {
    pub min: usize,
    pub max: usize,
}

impl std::fmt::Display for ReplicaRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.min, self.max)
    }
}

impl std::str::FromStr for ReplicaRange {
    type Err = String;

    /// `N` (fixed: N:N) or `MIN:MAX`.
    fn from_str(s: &str) -> Result<Self, String> {
        let count = |t: &str| {
            t.trim().parse::<usize>().map_err(|_| {
                format!("`{s}` is not a replica count: give N (fixed) or MIN:MAX (elastic), e.g. 4 or 3:4")
            })
        };
        let (min, max) = match s.split_once(':') {
            Some((a, b)) => (count(a)?, count(b)?),
            None => {
                let n = count(s)?;
                (n, n)
            }
        };
        if min == 0 {
            return Err(format!("`{s}`: a job needs at least 1 replica"));
        }
        if min > max {
            return Err(format!(
                "`{s}`: the smallest count ({min}) is above the largest ({max}); write MIN:MAX, e.g. {max}:{min}"
            ));
        }
        Ok(ReplicaRange { min, max })
    }
}

/// What one rank holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub rank: usize,
    pub replica: usize,
    pub columns: Vec<usize>,
}

impl Topology {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.replicas >= 1, "replicas must be at least 1");
        if let Some(r) = self.elastic {
            anyhow::ensure!(
                r.min >= 1 && r.min <= r.max,
                "elastic replicas {r}: the range must be MIN:MAX with 1 <= MIN <= MAX"
            );
            anyhow::ensure!(
                (r.min..=r.max).contains(&self.replicas),
                "replicas {} is outside the elastic range {r}",
                self.replicas
            );
        }
        anyhow::ensure!(
            self.columns_per_worker == 1 || self.columns_per_worker == COLUMNS,
            "columns per worker must be 1 or {COLUMNS}, not {}",
            self.columns_per_worker
        );
        Ok(())
    }

    pub fn world_size(&self) -> usize {
        self.replicas * COLUMNS / self.columns_per_worker
    }

    /// The most replicas this job runs with (its count, when fixed).
    pub fn max_replicas(&self) -> usize {
        self.elastic.map_or(self.replicas, |r| r.max)
    }

    /// This topology with `replicas` replicas (an elastic job's generation).
    pub fn with_replicas(self, replicas: usize) -> Topology {
        Topology { replicas, ..self }
    }

    pub fn workers_per_replica(&self) -> usize {
        COLUMNS / self.columns_per_worker
    }

    pub fn placement(&self, rank: usize) -> Placement {
        let per = self.workers_per_replica();
        let replica = rank / per;
        let columns = if per == 1 {
            (0..COLUMNS).collect()
        } else {
            vec![rank % per]
        };
        Placement {
            rank,
            replica,
            columns,
        }
    }

    /// The rank holding the other column of `rank`'s replica, when it is another rank.
    pub fn column_partner(&self, rank: usize) -> Option<usize> {
        (self.workers_per_replica() == COLUMNS).then_some(rank ^ 1)
    }

    /// The ranks holding the same columns in the other replicas, as (replica, rank).
    pub fn replica_peers(&self, rank: usize) -> Vec<(usize, usize)> {
        let per = self.workers_per_replica();
        (0..self.replicas)
            .filter(|&r| r != rank / per)
            .map(|r| (r, r * per + rank % per))
            .collect()
    }
}

/// The exchanges of one rank: to its partner column, and to its replicas.
pub struct Exchanges<B: Backend> {
    pub columns: Box<dyn ColumnExchange<B>>,
    pub replicas: Option<Box<dyn BufReduce<B>>>,
}

/// Connects `rank` to the ranks it exchanges with over TCP.
pub fn connect_tcp<B: Backend + 'static>(
    topology: &Topology,
    rank: usize,
    listener: &TcpListener,
    addrs: &BTreeMap<usize, String>,
    key: MeshKey,
    timeout: Duration,
) -> anyhow::Result<Exchanges<B>> {
    connect(
        topology,
        rank,
        listener,
        addrs,
        key,
        timeout,
        Joined::default(),
    )
}

/// Exchanges already joined by other means (NCCL between GPUs), which TCP then leaves out.
pub struct Joined<B: Backend> {
    /// To the partner column.
    pub column_link: Option<Box<dyn BufLink<B>>>,
    /// To the other replicas of this column position.
    pub replica_group: Option<Box<dyn BufReduce<B>>>,
}

impl<B: Backend> Default for Joined<B> {
    fn default() -> Self {
        Joined {
            column_link: None,
            replica_group: None,
        }
    }
}

/// Connects `rank` to the ranks it exchanges with: to its partner column and to its replicas
/// through what `joined` holds (NCCL between GPUs), over TCP for the rest.
pub fn connect<B: Backend + 'static>(
    topology: &Topology,
    rank: usize,
    listener: &TcpListener,
    addrs: &BTreeMap<usize, String>,
    key: MeshKey,
    timeout: Duration,
    joined: Joined<B>,
) -> anyhow::Result<Exchanges<B>> {
    let Joined {
        column_link,
        replica_group,
    } = joined;
    let partner = topology.column_partner(rank);
    let peers = topology.replica_peers(rank);
    let over_tcp = |p: &(usize, usize)| replica_group.is_none().then_some(p.1);
    let needed: Vec<usize> = partner
        .iter()
        .copied()
        .filter(|_| column_link.is_none())
        .chain(peers.iter().filter_map(over_tcp))
        .collect();
    let mut links = TcpMesh::connect(rank, listener, addrs, &needed, key, timeout)?;
    let place = topology.placement(rank);
    let columns: Box<dyn ColumnExchange<B>> = match (partner, column_link) {
        (Some(_), Some(link)) => Box::new(PairExchange::new(place.columns[0], link)),
        (Some(p), None) => Box::new(PairExchange::staged(
            place.columns[0],
            links.remove(&p).expect("connected"),
        )?),
        (None, _) => Box::new(LocalExchange::default()),
    };
    let replicas: Option<Box<dyn BufReduce<B>>> = if peers.is_empty() {
        None
    } else if let Some(group) = replica_group {
        anyhow::ensure!(
            group.replicas() == peers.len() + 1,
            "a replica group of {} for {} replicas",
            group.replicas(),
            peers.len() + 1
        );
        Some(group)
    } else {
        let group = peers
            .iter()
            .map(|&(replica, r)| (replica, links.remove(&r).expect("connected")))
            .collect();
        let group = TcpReplicaGroup::new(place.replica, group, ReduceAlgorithm::from_env()?);
        Some(Box::new(StagedReduce::new(Box::new(group))?))
    };
    Ok(Exchanges { columns, replicas })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_go_replica_by_replica() {
        let t = Topology {
            replicas: 2,
            columns_per_worker: 1,
            elastic: None,
        };
        assert_eq!(t.world_size(), 4);
        assert_eq!(t.placement(3).replica, 1);
        assert_eq!(t.placement(3).columns, vec![1]);
        assert_eq!(t.column_partner(2), Some(3));
        assert_eq!(t.replica_peers(1), vec![(1, 3)]);
        let both = Topology {
            replicas: 3,
            columns_per_worker: 2,
            elastic: None,
        };
        assert_eq!(both.world_size(), 3);
        assert_eq!(both.placement(2).columns, vec![0, 1]);
        assert_eq!(both.column_partner(2), None);
        assert_eq!(both.replica_peers(2), vec![(0, 0), (1, 1)]);
    }
}
