//! The training loop shared by every data source: steps, progress logs with rate and ETA, and
//! validation after each epoch.

use super::{count_correct, train_step};
use crate::backend::{Backend, SgdParams};
use crate::model::{Mode, Network};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct FitOptions {
    pub epochs: usize,
    /// Samples per step.
    pub batch: usize,
    pub sgd: SgdParams,
    /// Log every this many steps.
    pub log_every: usize,
}

/// Validation figures after an epoch.
#[derive(Clone, Debug)]
pub struct EpochResult {
    pub epoch: usize,
    pub train_loss: f32,
    pub val_top1_err: f64,
    pub val_top5_err: f64,
}

/// One batch on the host: `[samples, ...]` f32 inputs and their labels.
pub type HostBatch = (Vec<f32>, Vec<u32>);

/// Trains `net` for `opts.epochs` epochs of `steps_per_epoch` batches from `epoch_batches`, and
/// after each epoch logs the error that `evaluate` measures (top-1, top-5).
pub fn fit<'a, B: Backend>(
    net: &mut Network<B>,
    opts: &FitOptions,
    steps_per_epoch: usize,
    mut epoch_batches: impl FnMut(
        u64,
    ) -> anyhow::Result<
        Box<dyn Iterator<Item = anyhow::Result<HostBatch>> + 'a>,
    >,
    mut evaluate: impl FnMut(&mut Network<B>) -> anyhow::Result<(f64, f64)>,
) -> anyhow::Result<Vec<EpochResult>> {
    anyhow::ensure!(
        steps_per_epoch > 0,
        "an epoch has no full batch of {}",
        opts.batch
    );
    let total_steps = (steps_per_epoch * opts.epochs) as u64;
    let started = Instant::now();
    let mut results = Vec::new();
    let mut step = 0u64;
    for epoch in 0..opts.epochs {
        let (mut loss_sum, mut top1, mut top5, mut n) = (0.0f64, 0usize, 0usize, 0usize);
        let mut epoch_loss = 0.0f64;
        let mut window_start = Instant::now();
        for (s, batch) in epoch_batches(epoch as u64)?.enumerate() {
            let (x, labels) = batch?;
            let x = net.backend.upload(&x);
            let r = train_step(net, &x, &labels, step, &opts.sgd)?;
            step += 1;
            epoch_loss += r.loss as f64;
            (loss_sum, top1, top5, n) = (
                loss_sum + r.loss as f64,
                top1 + r.top1_correct,
                top5 + r.top5_correct,
                n + labels.len(),
            );
            if step.is_multiple_of(opts.log_every as u64) || s + 1 == steps_per_epoch {
                let elapsed = started.elapsed().as_secs_f64();
                let steps_in_window = n.div_ceil(opts.batch).max(1);
                tracing::info!(
                    epoch = epoch + 1,
                    step,
                    of = total_steps,
                    loss = format!("{:.4}", loss_sum / steps_in_window as f64),
                    top1_err = format!("{:.3}", 1.0 - top1 as f64 / n as f64),
                    top5_err = format!("{:.3}", 1.0 - top5 as f64 / n as f64),
                    images_per_s =
                        format!("{:.1}", n as f64 / window_start.elapsed().as_secs_f64()),
                    lr = format!("{}", opts.sgd.lr),
                    eta = format!(
                        "{:.0}s",
                        elapsed / step as f64 * (total_steps - step) as f64
                    ),
                    "train"
                );
                (loss_sum, top1, top5, n) = (0.0, 0, 0, 0);
                window_start = Instant::now();
            }
        }
        let (val_top1_err, val_top5_err) = evaluate(net)?;
        let train_loss = (epoch_loss / steps_per_epoch as f64) as f32;
        tracing::info!(
            epoch = epoch + 1,
            train_loss = format!("{train_loss:.4}"),
            val_top1_err = format!("{val_top1_err:.3}"),
            val_top5_err = format!("{val_top5_err:.3}"),
            chance_top1_err = format!("{:.3}", 1.0 - 1.0 / net.cfg.classes as f64),
            "validation"
        );
        results.push(EpochResult {
            epoch: epoch + 1,
            train_loss,
            val_top1_err,
            val_top5_err,
        });
    }
    Ok(results)
}

/// Top-1 and top-5 hits on one evaluation batch of up to `batch` samples, padded with blank
/// images to `batch` (whose outputs are ignored) so that the network keeps one batch size.
pub fn eval_batch<B: Backend>(
    net: &mut Network<B>,
    x: &[f32],
    labels: &[u32],
    batch: usize,
) -> anyhow::Result<(usize, usize)> {
    let per = net.input_len(1);
    anyhow::ensure!(
        x.len() == labels.len() * per && labels.len() <= batch,
        "evaluation batch of the wrong size"
    );
    let mut host = x.to_vec();
    host.resize(batch * per, 0.0);
    net.forward(&net.backend.upload(&host), batch, Mode::Eval)?;
    let logits = net.backend.download(net.logits().expect("forward ran"));
    Ok(count_correct(
        &logits[..labels.len() * net.cfg.classes],
        net.cfg.classes,
        labels,
    ))
}
