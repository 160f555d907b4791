//! The training loop shared by every data source and every layout of the workers: steps,
//! validation after each epoch, and what they report.
//!
//! The loop reports each step and each validation to a [`Reporter`]. In one process that is a
//! [`LogMonitor`], which logs progress with rate and ETA; in a worker it is the link to the
//! coordinator, which combines the replicas' reports and feeds the same monitor.

use super::{count_correct, train_step};
use crate::backend::{Backend, SgdParams};
use crate::data::loader::Pixels;
use crate::model::{Mode, Network};
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct FitOptions {
    pub epochs: usize,
    /// Samples per step, all replicas together.
    pub batch: usize,
    /// Momentum and weight decay; the learning rate comes from [`Start`] and the schedule.
    pub sgd: SgdParams,
    /// Stop after this many steps in all (a short run, or a test).
    pub max_steps: Option<u64>,
    /// Where and how often this process writes its columns' checkpoint shards.
    pub checkpoints: Option<CheckpointPlan>,
}

#[derive(Clone, Debug)]
pub struct CheckpointPlan {
    pub run_dir: std::path::PathBuf,
    /// Also checkpoint every this many steps (always at the end of an epoch and of the run).
    pub every_steps: Option<u64>,
    /// Whether this process writes shards (one replica does; the others hold the same values).
    pub write: bool,
}

/// Where training starts: step 0, or the position of a checkpoint.
#[derive(Clone, Copy, Debug)]
pub struct Start {
    pub step: u64,
    pub lr: f32,
}

/// A checkpoint's shards that this process wrote, durably.
#[derive(Clone, Debug)]
pub struct ShardsWritten {
    pub step: u64,
    /// (file name, checksum).
    pub shards: Vec<(String, String)>,
}

/// One batch on the host: `[samples, ...]` inputs (floats, or bytes for the backend to
/// finish) and their labels.
pub type HostBatch = (Pixels, Vec<u32>);

/// Puts batches on the backend: floats are uploaded, bytes finished there against the mean
/// image, which is uploaded once per dataset.
pub struct BatchUploader<B: Backend> {
    mean: Option<(Arc<[f32]>, B::Buf)>,
}

impl<B: Backend> Default for BatchUploader<B> {
    fn default() -> Self {
        BatchUploader { mean: None }
    }
}

impl<B: Backend> BatchUploader<B> {
    pub fn upload(&mut self, backend: &B, pixels: &Pixels) -> anyhow::Result<B::Buf> {
        match pixels {
            Pixels::Floats(x) => Ok(backend.upload(x)),
            Pixels::Bytes(views) => {
                let fresh = !matches!(&self.mean, Some((m, _)) if Arc::ptr_eq(m, &views.mean));
                if fresh {
                    self.mean = Some((views.mean.clone(), backend.upload(&views.mean)));
                }
                let (_, mean) = self.mean.as_ref().expect("set above");
                backend.finish_views(views, mean)
            }
        }
    }
}

/// Where the batches of one process come from: its replica's part of every global batch.
pub trait DataSource<B: Backend> {
    /// Global batches per epoch.
    fn steps_per_epoch(&self) -> usize;
    /// This replica's part of each global batch of `epoch`, in order.
    fn epoch(
        &mut self,
        epoch: u64,
    ) -> anyhow::Result<Box<dyn Iterator<Item = anyhow::Result<HostBatch>> + '_>>;
    /// Class names, by label (for predictions); numbers where the data has none.
    fn class_names(&self) -> Vec<String>;
    /// What a trained network needs to take an image file as it took this data.
    fn input(&self) -> super::input_form::RunInput;
    /// Top-1 hits, top-5 hits and samples on this replica's part of the validation set.
    fn evaluate(&mut self, net: &mut Network<B>) -> anyhow::Result<Hits>;
}

/// Correct answers on some samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Hits {
    pub top1: u64,
    pub top5: u64,
    pub samples: u64,
    /// The samples' cross-entropy, summed.
    pub loss_sum: f64,
}

impl std::ops::AddAssign for Hits {
    fn add_assign(&mut self, o: Hits) {
        self.top1 += o.top1;
        self.top5 += o.top5;
        self.samples += o.samples;
        self.loss_sum += o.loss_sum;
    }
}

/// The counts as the control plane carries them.
impl From<Hits> for crate::proto::Hits {
    fn from(h: Hits) -> Self {
        crate::proto::Hits {
            top1: h.top1,
            top5: h.top5,
            samples: h.samples,
            loss_sum: h.loss_sum,
        }
    }
}

impl From<crate::proto::Hits> for Hits {
    fn from(h: crate::proto::Hits) -> Self {
        Hits {
            top1: h.top1,
            top5: h.top5,
            samples: h.samples,
            loss_sum: h.loss_sum,
        }
    }
}

impl Hits {
    pub fn top1_err(&self) -> f64 {
        1.0 - self.top1 as f64 / self.samples.max(1) as f64
    }
    pub fn top5_err(&self) -> f64 {
        1.0 - self.top5 as f64 / self.samples.max(1) as f64
    }
    /// The samples' mean cross-entropy.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.samples.max(1) as f64
    }
}

pub use crate::telemetry::{TrainPoint, ValPoint};

/// What one step of one process measured.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// 1-based.
    pub epoch: u64,
    /// Steps done so far in all (1-based).
    pub step: u64,
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    pub last_of_epoch: bool,
    /// Mean loss of the samples below.
    pub loss: f32,
    pub hits: Hits,
    pub lr: f32,
    /// Bytes sent to the other column and to the other replicas so far.
    pub column_bytes: u64,
    pub replica_bytes: u64,
    /// Seconds since training began in this process, and of them the seconds in the column
    /// exchange and in the replicas' average.
    pub train_seconds: f64,
    pub column_seconds: f64,
    pub replica_seconds: f64,
}

/// Validation after an epoch.
#[derive(Clone, Debug, PartialEq)]
pub struct EvalReport {
    pub epoch: u64,
    pub hits: Hits,
}

/// Receives what the loop measures; an error stops the loop (the job was aborted).
pub trait Reporter {
    fn step(&mut self, r: &StepReport) -> anyhow::Result<()>;
    /// Takes an epoch's validation; returns the learning rate for the next epoch.
    fn evaluation(&mut self, r: &EvalReport) -> anyhow::Result<f32>;
    /// This process's shards of a checkpoint are on disk.
    fn checkpoint(&mut self, c: &ShardsWritten) -> anyhow::Result<()>;
}

/// Logs training progress every `log_every` steps (loss, training error, images/s, learning
/// rate, ETA) and validation after each epoch (the job's book keeps the per-epoch records).
pub struct LogMonitor {
    log_every: u64,
    classes: usize,
    started: Instant,
    window_start: Instant,
    window: (f64, Hits, u64),
    epoch_loss: (f64, u64),
    epoch_samples: u64,
    last_step: u64,
    /// The step before the first this monitor saw (a continued run's checkpoint).
    first_step: Option<u64>,
}

impl LogMonitor {
    pub fn new(log_every: u64, classes: usize) -> Self {
        LogMonitor {
            log_every: log_every.max(1),
            classes,
            started: Instant::now(),
            window_start: Instant::now(),
            window: (0.0, Hits::default(), 0),
            epoch_loss: (0.0, 0),
            epoch_samples: 0,
            last_step: 0,
            first_step: None,
        }
    }

    /// The classes the network tells apart (chance is 1 - 1/classes).
    pub fn classes(&self) -> usize {
        self.classes
    }
}

impl LogMonitor {
    /// Takes a step; at a log step (every `log_every`, an epoch's last, the run's last) logs
    /// the interval's figures and returns them.
    pub fn step(&mut self, r: &StepReport) -> Option<TrainPoint> {
        self.window.0 += r.loss as f64;
        self.window.1 += r.hits;
        self.window.2 += 1;
        self.epoch_loss.0 += r.loss as f64;
        self.epoch_loss.1 += 1;
        self.epoch_samples += r.hits.samples;
        self.last_step = r.step;
        let first = *self.first_step.get_or_insert(r.step.saturating_sub(1));
        if !(r.step.is_multiple_of(self.log_every) || r.last_of_epoch || r.step == r.total_steps) {
            return None;
        }
        let (loss, hits, steps) = self.window;
        let elapsed = self.started.elapsed().as_secs_f64();
        let point = TrainPoint {
            epoch: r.epoch,
            step: r.step,
            total_steps: r.total_steps,
            loss: loss / steps as f64,
            top1_err: hits.top1_err(),
            // Top-5 of 5 classes or fewer is always right: not reported.
            top5_err: (self.classes > 5).then(|| hits.top5_err()),
            images_per_s: hits.samples as f64 / self.window_start.elapsed().as_secs_f64(),
            lr: r.lr,
            // Over the steps this monitor timed: a continued run's earlier ones took no time here.
            eta_s: elapsed / (r.step - first).max(1) as f64
                * r.total_steps.saturating_sub(r.step) as f64,
        };
        tracing::info!(
            epoch = point.epoch,
            step = point.step,
            of = point.total_steps,
            loss = crate::log_fields::rounded(point.loss, 4),
            top1_err = crate::log_fields::rounded(point.top1_err, 3),
            top5_err = point.top5_err.map(|e| crate::log_fields::rounded(e, 3)),
            images_per_s = crate::log_fields::rounded(point.images_per_s, 1),
            lr = crate::log_fields::single(point.lr),
            eta_s = crate::log_fields::rounded(point.eta_s, 0),
            "train"
        );
        self.window = (0.0, Hits::default(), 0);
        self.window_start = Instant::now();
        Some(point)
    }

    /// Logs a validation that came `seconds` after the previous one (or the start); returns
    /// its figures with the epoch's mean training loss and images per second.
    pub fn evaluation(&mut self, r: &EvalReport, seconds: f64) -> ValPoint {
        let train_loss = (self.epoch_loss.0 / self.epoch_loss.1.max(1) as f64) as f32;
        self.epoch_loss = (0.0, 0);
        let point = ValPoint {
            epoch: r.epoch,
            step: self.last_step,
            train_loss,
            loss: r.hits.loss(),
            top1_err: r.hits.top1_err(),
            top5_err: (self.classes > 5).then(|| r.hits.top5_err()),
            seconds,
            images_per_s: self.epoch_samples as f64 / seconds.max(1e-9),
        };
        self.epoch_samples = 0;
        tracing::info!(
            epoch = r.epoch,
            train_loss = crate::log_fields::rounded(train_loss as f64, 4),
            val_loss = crate::log_fields::rounded(point.loss, 4),
            val_top1_err = crate::log_fields::rounded(point.top1_err, 3),
            val_top5_err = point.top5_err.map(|e| crate::log_fields::rounded(e, 3)),
            chance_top1_err = crate::log_fields::rounded(1.0 - 1.0 / self.classes as f64, 3),
            samples = r.hits.samples,
            seconds = crate::log_fields::rounded(seconds, 1),
            "validation"
        );
        point
    }
}

/// Trains `net` on `data` from `start` for `opts.epochs` epochs (or to `opts.max_steps` steps),
/// validating after each complete epoch and checkpointing as `opts.checkpoints` says. Returns
/// the steps done in all.
pub fn fit<B: Backend>(
    net: &mut Network<B>,
    opts: &FitOptions,
    start: Start,
    data: &mut dyn DataSource<B>,
    reporter: &mut dyn Reporter,
) -> anyhow::Result<u64> {
    let steps_per_epoch = data.steps_per_epoch() as u64;
    anyhow::ensure!(
        steps_per_epoch > 0,
        "an epoch has no full batch of {}",
        opts.batch
    );
    let mut total_steps = steps_per_epoch * opts.epochs as u64;
    if let Some(max) = opts.max_steps {
        total_steps = total_steps.min(max);
    }
    let (mut step, mut lr) = (start.step, start.lr);
    let checkpoint =
        |net: &Network<B>, step: u64, reporter: &mut dyn Reporter| -> anyhow::Result<()> {
            let Some(plan) = opts.checkpoints.as_ref().filter(|p| p.write) else {
                return Ok(());
            };
            let t = Instant::now();
            let dir = super::checkpoint::step_dir(&plan.run_dir, step);
            let shards = super::checkpoint::write_shards(net, &dir)?;
            tracing::debug!(
                step,
                ms = t.elapsed().as_millis() as u64,
                "checkpoint shards written"
            );
            reporter.checkpoint(&ShardsWritten { step, shards })
        };
    let every = opts
        .checkpoints
        .as_ref()
        .and_then(|p| p.every_steps)
        .filter(|&n| n > 0);
    let mut last_checkpoint = start.step;
    let started = Instant::now();
    let mut uploader = BatchUploader::default();
    while step < total_steps {
        let epoch = step / steps_per_epoch;
        let done_in_epoch = (step % steps_per_epoch) as usize;
        let before = step;
        for (s, batch) in data.epoch(epoch)?.enumerate().skip(done_in_epoch) {
            let (pixels, labels) = batch?;
            let x = uploader.upload(&net.backend, &pixels)?;
            let sgd = SgdParams { lr, ..opts.sgd };
            let r = train_step(net, &x, &labels, step, &sgd)?;
            step += 1;
            let last_of_epoch = s as u64 + 1 == steps_per_epoch;
            reporter.step(&StepReport {
                epoch: epoch + 1,
                step,
                total_steps,
                steps_per_epoch,
                last_of_epoch,
                loss: r.loss,
                hits: Hits {
                    top1: r.top1_correct as u64,
                    top5: r.top5_correct as u64,
                    samples: labels.len() as u64,
                    loss_sum: r.loss as f64 * labels.len() as f64,
                },
                lr,
                column_bytes: net.column_traffic().sent_bytes,
                replica_bytes: net.replica_traffic().sent_bytes,
                train_seconds: started.elapsed().as_secs_f64(),
                column_seconds: net.profile.seconds("exchange"),
                replica_seconds: net.profile.seconds("replicas"),
            })?;
            if last_of_epoch || step >= total_steps {
                break;
            }
            if every.is_some_and(|n| step.is_multiple_of(n)) {
                checkpoint(net, step, reporter)?;
                last_checkpoint = step;
            }
        }
        anyhow::ensure!(
            step > before,
            "epoch {} ran out of batches after {done_in_epoch} of {steps_per_epoch}",
            epoch + 1
        );
        if step.is_multiple_of(steps_per_epoch) {
            let hits = data.evaluate(net)?;
            lr = reporter.evaluation(&EvalReport {
                epoch: epoch + 1,
                hits,
            })?;
        }
        if step.is_multiple_of(steps_per_epoch) || step >= total_steps {
            checkpoint(net, step, reporter)?;
            last_checkpoint = step;
        }
    }
    if last_checkpoint != step {
        checkpoint(net, step, reporter)?;
    }
    Ok(step)
}

/// Top-1 and top-5 hits on one evaluation batch of up to `batch` samples, padded with blank
/// images to `batch` (whose outputs are ignored) so that the network keeps one batch size.
pub fn eval_batch<B: Backend>(
    net: &mut Network<B>,
    x: &[f32],
    labels: &[u32],
    batch: usize,
) -> anyhow::Result<Hits> {
    let per = net.input_len(1);
    anyhow::ensure!(
        x.len() == labels.len() * per && labels.len() <= batch,
        "evaluation batch of the wrong size"
    );
    let mut host = x.to_vec();
    host.resize(batch * per, 0.0);
    net.forward(&net.backend.upload(&host), batch, Mode::Eval)?;
    let logits = net.backend.download(net.logits().expect("forward ran"));
    let logits = &logits[..labels.len() * net.cfg.classes];
    let (top1, top5) = count_correct(logits, net.cfg.classes, labels);
    Ok(Hits {
        top1: top1 as u64,
        top5: top5 as u64,
        samples: labels.len() as u64,
        loss_sum: super::cross_entropy_sum(logits, net.cfg.classes, labels),
    })
}
