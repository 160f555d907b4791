//! Training: one SGD step of the network, the training loop, and the speed benchmark.

pub mod bench;
pub mod book;
pub mod checkpoint;
pub mod evaluate;
pub mod fit;
pub mod input_form;
pub mod job;
pub mod prepared;
pub mod report;
pub mod sample;
pub mod scaling;
pub mod schedule;

use crate::backend::{Backend, SgdParams, StepReadout};
use crate::model::{Mode, Network};

/// What one training step measured.
#[derive(Clone, Debug)]
pub struct StepResult {
    pub loss: f32,
    /// Samples whose label was the top-1 / among the top-5 logits.
    pub top1_correct: usize,
    pub top5_correct: usize,
}

/// Forward, loss, backward, the replicas' gradient average (if any) and SGD update on this
/// process's part of one batch; `step` keys the dropout masks.
pub fn train_step<B: Backend>(
    net: &mut Network<B>,
    x: &B::Buf,
    labels: &[u32],
    step: u64,
    sgd: &SgdParams,
) -> anyhow::Result<StepResult> {
    let batch = labels.len();
    let classes = net.cfg.classes;
    let mode = Mode::Train { step };
    net.forward(x, batch, mode)?;
    let logits = net.logits().expect("forward ran");
    let mut dlogits = net.backend.zeros(batch * classes);
    // The loss and logits are read back behind the softmax, and waited for only once the
    // backward pass is queued: a device runs the backward pass meanwhile.
    let readout = (net.backend).softmax_xent_read(batch, classes, logits, labels, &mut dlogits);
    net.backward(x, &dlogits)?;
    let StepReadout { loss, logits } = readout.wait();
    if !loss.is_finite() {
        // Blocks that did not arrive whole (a failed exchange) make garbage logits too: that
        // is the error to report, naming the peer.
        net.settle_exchanges()?;
        anyhow::bail!("the loss diverged to {loss} at step {step}: lower the learning rate");
    }
    net.sync_replicas()?;
    net.sgd_step(sgd);
    let (top1_correct, top5_correct) = count_correct(&logits, classes, labels);
    Ok(StepResult {
        loss,
        top1_correct,
        top5_correct,
    })
}

/// Top-1 and top-5 hits of `logits` (`[labels.len(), classes]`) against `labels`.
pub fn count_correct(logits: &[f32], classes: usize, labels: &[u32]) -> (usize, usize) {
    let top = crate::backend::cpu::top_k(labels.len(), classes, logits, 5.min(classes));
    let top1 = top.iter().zip(labels).filter(|(t, l)| t[0] == **l).count();
    let top5 = top
        .iter()
        .zip(labels)
        .filter(|(t, l)| t.contains(l))
        .count();
    (top1, top5)
}

/// The summed cross-entropy of `labels` under `logits` (one row of `classes` per label), in
/// f64 with the log-sum-exp shifted by each row's largest logit.
pub fn cross_entropy_sum(logits: &[f32], classes: usize, labels: &[u32]) -> f64 {
    logits
        .chunks(classes)
        .zip(labels)
        .map(|(row, &label)| {
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
            max + sum.ln() - row[label as usize] as f64
        })
        .sum()
}
