//! The replicas report each step separately; the job's figures are their combination.

use crate::train::fit::{EvalReport, Hits, StepReport};
use std::collections::BTreeMap;

/// Collects one report per replica for each step (and each validation) and hands out the
/// combined report once every replica has sent its own, in step order.
#[derive(Debug)]
pub struct Aggregator {
    replicas: usize,
    steps: BTreeMap<u64, Vec<StepReport>>,
    evals: BTreeMap<u64, Vec<EvalReport>>,
}

impl Aggregator {
    /// The replicas whose reports make one of the job's.
    pub fn replicas(&self) -> usize {
        self.replicas
    }

    pub fn new(replicas: usize) -> Self {
        Aggregator {
            replicas,
            steps: BTreeMap::new(),
            evals: BTreeMap::new(),
        }
    }

    /// Adds one replica's step; returns the job's step when it is complete.
    pub fn step(&mut self, r: StepReport) -> Option<StepReport> {
        let step = r.step;
        let parts = self.steps.entry(step).or_default();
        parts.push(r);
        if parts.len() < self.replicas {
            return None;
        }
        let mut parts = self.steps.remove(&step)?;
        // Summed in an order that does not depend on which replica reported first.
        parts.sort_by(|a, b| a.loss.total_cmp(&b.loss));
        let mut out = parts[0].clone();
        out.hits = Hits::default();
        let mut loss = 0.0f64;
        for p in &parts {
            out.hits += p.hits;
            // Replicas hold equal parts of the batch: the batch's loss is the mean of theirs.
            loss += p.loss as f64;
            out.column_bytes = out.column_bytes.max(p.column_bytes);
            out.replica_bytes = out.replica_bytes.max(p.replica_bytes);
        }
        out.loss = (loss / parts.len() as f64) as f32;
        Some(out)
    }

    /// Adds one replica's validation; returns the job's when it is complete.
    pub fn evaluation(&mut self, r: EvalReport) -> Option<EvalReport> {
        let epoch = r.epoch;
        let parts = self.evals.entry(epoch).or_default();
        parts.push(r);
        if parts.len() < self.replicas {
            return None;
        }
        let mut parts = self.evals.remove(&epoch)?;
        // Summed in an order that does not depend on which replica reported first.
        parts.sort_by(|a, b| a.hits.loss_sum.total_cmp(&b.hits.loss_sum));
        let mut hits = Hits::default();
        for p in &parts {
            hits += p.hits;
        }
        Some(EvalReport {
            epoch: parts[0].epoch,
            hits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: u64, loss: f32, top1: u64) -> StepReport {
        StepReport {
            epoch: 1,
            step,
            total_steps: 10,
            steps_per_epoch: 5,
            last_of_epoch: false,
            loss,
            hits: Hits {
                top1,
                top5: top1,
                samples: 4,
                loss_sum: 4.0 * loss as f64,
            },
            lr: 0.01,
            column_bytes: 0,
            replica_bytes: 0,
            train_seconds: 1.0,
            column_seconds: 0.0,
            replica_seconds: 0.0,
        }
    }

    #[test]
    fn combines_replicas_once_all_reported() {
        let mut a = Aggregator::new(2);
        assert!(a.step(step(1, 1.0, 1)).is_none());
        assert!(a.step(step(2, 3.0, 2)).is_none());
        let s1 = a.step(step(1, 2.0, 3)).unwrap();
        assert_eq!((s1.loss, s1.hits.top1, s1.hits.samples), (1.5, 4, 8));
        assert!(a
            .evaluation(EvalReport {
                epoch: 1,
                hits: Hits {
                    top1: 1,
                    top5: 2,
                    samples: 3,
                    loss_sum: 3.0,
                }
            })
            .is_none());
    }
}
