//! A projection of a run larger than any machine here (`alexnet plan`): images/s, the
//! exchanges' share of the step and the bytes each rank sends per step, for pairs of GPUs
//! (the two columns of a replica on two GPUs of one host) replicated over hosts.
//!
//! The model, step by step, for one replica at `batch` images:
//! - **Compute.** A pair's step time without exchanges (given, or measured), spread over the
//!   layers' passes in proportion to their FLOPs ([`layer_flops_per_image`]).
//! - **The columns' exchange**, over the GPUs' link in the host (NVLink): the bytes the layer
//!   shapes give at each exchange point ([`column_bytes_per_step`]), in both directions at once.
//!   As the runtime does it, each forward all-gather but the logits' overlaps the part of the
//!   next layer that reads the column's own block (half its forward pass), and each backward
//!   reduce-scatter overlaps the layer's weight gradient (half its backward pass); what does
//!   not fit is exposed, and the logits' gather is exposed whole.
//! - **The replicas' average**, bucket by bucket as the backward pass finishes them (fc8, fc7,
//!   fc6, conv3-5, conv2, conv1), one after the other: a ring from 3 replicas (2 (R - 1) / R of a
//!   bucket per rank, in 2 (R - 1) steps), all-to-all for 2. Within one host the ring runs over
//!   NVLink; across hosts, each host's network link carries, per direction, one ring hop for
//!   each of the two column positions. What runs past the end of the backward pass is exposed.
//! - Each message costs a latency besides its bytes.
//!
//! What it leaves out: contention between the two exchanges, the input pipeline, stragglers.

use crate::comm::ReduceAlgorithm;
use crate::model::params::{column_shapes, LAYERS};
use crate::model::shapes::{column_bytes_per_step, layer_flops_per_image};
use crate::model::NetConfig;
use serde::Serialize;

/// The machine and the run.
#[derive(Clone, Debug)]
pub struct Cluster {
    pub hosts: usize,
    /// GPUs per host (even: each replica's two columns on two GPUs of one host).
    pub gpus_per_host: usize,
    /// Between hosts, per host, each direction, bits/s.
    pub link_bits: f64,
    /// Between two GPUs of a host, each direction, bits/s.
    pub nvlink_bits: f64,
    /// Each message's latency, seconds: within a host and between hosts.
    pub nvlink_latency: f64,
    pub link_latency: f64,
    /// How the replicas average (the runtime's default: the ring from 3 replicas).
    pub reduce: ReduceAlgorithm,
}

impl Cluster {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.hosts >= 1, "--hosts must be at least 1");
        anyhow::ensure!(
            self.gpus_per_host >= 2 && self.gpus_per_host.is_multiple_of(2),
            "--gpus-per-host must be even (each replica's two columns on two GPUs of one host), not {}",
            self.gpus_per_host
        );
        anyhow::ensure!(
            self.link_bits > 0.0 && self.nvlink_bits > 0.0,
            "link speeds must be positive"
        );
        Ok(())
    }

    /// Replicas of the pair of columns.
    pub fn replicas(&self) -> usize {
        self.hosts * self.gpus_per_host / 2
    }
}

/// What the model predicts for one cluster.
#[derive(Clone, Debug, Serialize)]
pub struct Projection {
    pub hosts: usize,
    pub gpus: usize,
    pub replicas: usize,
    pub batch_per_replica: usize,
    /// Compute, and the exchanges' exposed time, ms per step.
    pub compute_ms: f64,
    pub column_exposed_ms: f64,
    pub replica_exposed_ms: f64,
    pub step_ms: f64,
    pub images_per_s: f64,
    /// Exposed exchange time over the step.
    pub exchange_share: f64,
    /// Bytes each rank sends per step: to its partner column, to the other replicas.
    pub column_bytes: u64,
    pub replica_bytes: u64,
}

/// Bytes one rank sends to the other replicas to average `gradient_bytes` over `replicas`, as
/// the TCP runtime counts them: none alone, the whole buffer for two, 2 (R - 1) / R of it
/// for a ring.
pub fn replica_bytes(gradient_bytes: u64, replicas: usize) -> u64 {
    replica_bytes_by(ReduceAlgorithm::Ring, gradient_bytes, replicas)
}

/// [`replica_bytes`] for `reduce`: all-to-all sends the whole buffer to each other replica.
pub fn replica_bytes_by(reduce: ReduceAlgorithm, gradient_bytes: u64, replicas: usize) -> u64 {
    match (replicas, reduce) {
        (0 | 1, _) => 0,
        (2, _) => gradient_bytes,
        (r, ReduceAlgorithm::AllToAll) => gradient_bytes * (r as u64 - 1),
        (r, ReduceAlgorithm::Ring) => gradient_bytes * 2 * (r as u64 - 1) / r as u64,
    }
}

/// The gradient buckets, in the order the backward pass hands them over, with the layers
/// whose backward pass must finish first: bytes of one column's gradients.
fn buckets(cfg: &NetConfig) -> anyhow::Result<Vec<(&'static str, u64)>> {
    let sides = cfg.validate()?;
    let shapes = column_shapes(cfg, &sides);
    let bytes = |layer: &str| -> u64 {
        let i = LAYERS.iter().position(|l| *l == layer).expect("a layer");
        let (w, b) = &shapes[i];
        4 * (w.iter().product::<usize>() + b.iter().product::<usize>()) as u64
    };
    Ok(vec![
        ("fc8", bytes("fc8")),
        ("fc7", bytes("fc7")),
        ("fc6", bytes("fc6")),
        ("conv3", bytes("conv3") + bytes("conv4") + bytes("conv5")),
        ("conv2", bytes("conv2")),
        ("conv1", bytes("conv1")),
    ])
}

/// Seconds to average a bucket of `bytes` over the cluster's replicas.
fn reduce_seconds(c: &Cluster, bytes: u64) -> f64 {
    let r = c.replicas();
    if r < 2 {
        return 0.0;
    }
    // A ring's 2 (R - 1) steps follow one another; all-to-all's sends go out at once.
    let messages = match (r, c.reduce) {
        (2, _) | (_, ReduceAlgorithm::AllToAll) => 1.0,
        (r, ReduceAlgorithm::Ring) => 2.0 * (r - 1) as f64,
    };
    let per_rank = replica_bytes_by(c.reduce, bytes, r) as f64;
    let within = 8.0 * per_rank / c.nvlink_bits + messages * c.nvlink_latency;
    if c.hosts == 1 {
        return within;
    }
    // Each host sends, per direction, one ring hop (or, for two replicas, one copy) for each
    // of the two column positions.
    let across = 8.0 * 2.0 * per_rank / c.link_bits + messages * c.link_latency;
    within.max(across)
}

/// The projection of `cfg` at `batch` images per replica on `cluster`, from a pair's step time
/// without exchanges (`compute_ms`).
pub fn project(
    cfg: &NetConfig,
    batch: usize,
    compute_ms: f64,
    cluster: &Cluster,
) -> anyhow::Result<Projection> {
    cluster.validate()?;
    anyhow::ensure!(batch >= 1, "the batch per replica must be at least 1");
    anyhow::ensure!(compute_ms > 0.0, "the step time must be positive");
    let layers = layer_flops_per_image(cfg)?;
    let total: u64 = layers.iter().map(|l| l.forward + l.backward).sum();
    let secs = compute_ms / 1e3;
    let time = |flops: u64| secs * flops as f64 / total as f64;
    let fwd = |name: &str| {
        time(
            layers
                .iter()
                .find(|l| l.layer == name)
                .expect("layer")
                .forward,
        )
    };
    let bwd = |name: &str| {
        time(
            layers
                .iter()
                .find(|l| l.layer == name)
                .expect("layer")
                .backward,
        )
    };

    // The columns' exchange at pool2 (before conv3), pool5 (before fc6), fc6, fc7, logits.
    let col = column_bytes_per_step(cfg, batch)?;
    let send = |bytes: u64| 8.0 * bytes as f64 / cluster.nvlink_bits + cluster.nvlink_latency;
    let next = ["conv3", "fc6", "fc7", "fc8"];
    let mut column_exposed = 0.0;
    for (i, layer) in next.iter().enumerate() {
        column_exposed += (send(col.forward[i]) - fwd(layer) / 2.0).max(0.0);
        column_exposed += (send(col.backward[i]) - bwd(layer) / 2.0).max(0.0);
    }
    column_exposed += send(col.forward[4]);

    // The replicas' buckets, each ready when its layers' backward pass is done, averaged one
    // after the other.
    let order = [
        "fc8", "fc7", "fc6", "conv5", "conv4", "conv3", "conv2", "conv1",
    ];
    let mut clock = 0.0;
    let mut ready = std::collections::HashMap::new();
    for layer in order {
        clock += bwd(layer);
        ready.insert(layer, clock);
    }
    let backward_end = clock;
    let mut link_free = 0.0f64;
    let gradient_bytes: u64 = buckets(cfg)?.iter().map(|b| b.1).sum();
    for (last_layer, bytes) in buckets(cfg)? {
        let start = link_free.max(ready[last_layer]);
        link_free = start + reduce_seconds(cluster, bytes);
    }
    let replica_exposed = (link_free - backward_end).max(0.0);

    let step = secs + column_exposed + replica_exposed;
    let r = cluster.replicas();
    Ok(Projection {
        hosts: cluster.hosts,
        gpus: cluster.hosts * cluster.gpus_per_host,
        replicas: r,
        batch_per_replica: batch,
        compute_ms,
        column_exposed_ms: column_exposed * 1e3,
        replica_exposed_ms: replica_exposed * 1e3,
        step_ms: step * 1e3,
        images_per_s: (r * batch) as f64 / step,
        exchange_share: (column_exposed + replica_exposed) / step,
        column_bytes: col.total(),
        replica_bytes: replica_bytes_by(cluster.reduce, gradient_bytes, r),
    })
}

/// A table of projections, one line each.
pub fn render(rows: &[Projection]) -> String {
    let mut out = String::from(
        "hosts  GPUs  replicas  step ms  images/s  exchange  column MB/rank  replica MB/rank\n",
    );
    for p in rows {
        out += &format!(
            "{:>5}  {:>4}  {:>8}  {:>7.1}  {:>8.0}  {:>7.1}%  {:>14.1}  {:>15.1}\n",
            p.hosts,
            p.gpus,
            p.replicas,
            p.step_ms,
            p.images_per_s,
            100.0 * p.exchange_share,
            p.column_bytes as f64 / 1e6,
            p.replica_bytes as f64 / 1e6
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(hosts: usize, link_gbit: f64) -> Cluster {
        Cluster {
            hosts,
            gpus_per_host: 8,
            link_bits: link_gbit * 1e9,
            nvlink_bits: 3600e9,
            nvlink_latency: 5e-6,
            link_latency: 10e-6,
            reduce: ReduceAlgorithm::Ring,
        }
    }

    #[test]
    fn the_bytes_are_the_runtimes_and_the_rings_formula() {
        let cfg = NetConfig::default();
        let gradient: u64 = buckets(&cfg).unwrap().iter().map(|b| b.1).sum();
        // One column's gradients: half the paper's 61 million parameters, in f32.
        let params = crate::model::params::parameter_count(&cfg, &cfg.validate().unwrap());
        assert_eq!(gradient, 4 * params as u64 / 2);
        for (hosts, r) in [(1, 4), (2, 8), (8, 32)] {
            let p = project(&cfg, 128, 100.0, &cluster(hosts, 100.0)).unwrap();
            assert_eq!(p.replicas, r);
            assert_eq!(p.replica_bytes, gradient * 2 * (r as u64 - 1) / r as u64);
            assert_eq!(
                p.column_bytes,
                column_bytes_per_step(&cfg, 128).unwrap().total()
            );
        }
        let all = Cluster {
            reduce: ReduceAlgorithm::AllToAll,
            ..cluster(2, 100.0)
        };
        let p = project(&cfg, 128, 100.0, &all).unwrap();
        assert_eq!(
            p.replica_bytes,
            gradient * 7,
            "all-to-all: (R - 1) x G at R = 8"
        );
        assert_eq!(replica_bytes(1000, 2), 1000);
        assert_eq!(replica_bytes(1200, 3), 1600);
        assert_eq!(replica_bytes(1000, 1), 0);
    }

    #[test]
    fn a_faster_link_never_hurts_and_a_slow_one_shows() {
        let cfg = NetConfig::default();
        let slow = project(&cfg, 128, 100.0, &cluster(8, 10.0)).unwrap();
        let fast = project(&cfg, 128, 100.0, &cluster(8, 400.0)).unwrap();
        assert!(fast.step_ms <= slow.step_ms);
        assert!(slow.exchange_share > fast.exchange_share);
        // At 10 Gbit/s, 2 x 2 (R - 1) / R x 122 MB leave a host per step: most of a second,
        // far more than the backward pass hides.
        assert!(slow.replica_exposed_ms > 100.0, "{slow:?}");
        // One pair alone exchanges only between its columns.
        let one = Cluster {
            gpus_per_host: 2,
            ..cluster(1, 100.0)
        };
        let alone = project(&cfg, 128, 100.0, &one).unwrap();
        assert_eq!((alone.replicas, alone.replica_bytes), (1, 0));
        assert_eq!(alone.replica_exposed_ms, 0.0);
        assert!(alone.images_per_s <= 128.0 / 0.1 + 1e-9);
    }

    #[test]
    fn bad_clusters_are_refused_by_name() {
        let cfg = NetConfig::default();
        let odd = Cluster {
            gpus_per_host: 3,
            ..cluster(1, 100.0)
        };
        let e = project(&cfg, 128, 100.0, &odd).unwrap_err();
        assert!(
            format!("{e}").contains("--gpus-per-host must be even"),
            "{e}"
        );
        let none = Cluster {
            hosts: 0,
            ..cluster(1, 100.0)
        };
        assert!(project(&cfg, 128, 100.0, &none).is_err());
    }
}
