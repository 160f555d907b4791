//! The job's bookkeeping, wherever the job runs: progress logs, the learning-rate schedule,
//! checkpoint manifests and the training report. The coordinator keeps one for a distributed
//! job (fed with the replicas' combined reports); a single process is its own [`Reporter`].

use super::checkpoint::{self, EpochRecord, Manifest};
use super::fit::{EvalReport, LogMonitor, Reporter, ShardsWritten, StepReport};
use super::schedule::{Schedule, ScheduleState};
use crate::telemetry::tensorboard::EventWriter;
use crate::telemetry::{TrainPoint, ValPoint};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

pub struct JobBook {
    pub monitor: LogMonitor,
    schedule: Schedule,
    pub state: ScheduleState,
    run_dir: Option<PathBuf>,
    keep: usize,
    /// Shards a complete checkpoint has (the columns).
    shards_per_checkpoint: usize,
    steps_per_epoch: u64,
    seed: u64,
    config_hash: String,
    generation: u64,
    pending: BTreeMap<u64, BTreeMap<String, String>>,
    pub history: Vec<EpochRecord>,
    epoch_started: Instant,
    /// The newest complete checkpoint's step, and when it was completed.
    pub last_checkpoint: Option<u64>,
    pub last_checkpoint_at: Option<std::time::SystemTime>,
    /// The run's TensorBoard event file (a run with a run folder).
    pub tensorboard: Option<EventWriter>,
    /// The newest log line's and validation's figures.
    pub last_train: Option<TrainPoint>,
    pub last_validation: Option<ValPoint>,
}

/// What a book needs to know about its job.
pub struct BookSetup {
    pub log_every: u64,
    pub classes: usize,
    pub schedule: Schedule,
    pub lr: f32,
    pub run_dir: Option<PathBuf>,
    pub keep: usize,
    pub seed: u64,
    pub config_hash: String,
    pub generation: u64,
}

impl JobBook {
    pub fn new(s: BookSetup, resumed: Option<&Manifest>) -> Self {
        let mut book = JobBook {
            monitor: LogMonitor::new(s.log_every, s.classes),
            schedule: s.schedule,
            state: ScheduleState::new(s.lr),
            run_dir: s.run_dir,
            keep: s.keep,
            shards_per_checkpoint: crate::model::config::COLUMNS,
            steps_per_epoch: 0,
            seed: s.seed,
            config_hash: s.config_hash,
            generation: s.generation,
            pending: BTreeMap::new(),
            history: Vec::new(),
            epoch_started: Instant::now(),
            last_checkpoint: None,
            last_checkpoint_at: None,
            tensorboard: None,
            last_train: None,
            last_validation: None,
        };
        if let Some(m) = resumed {
            book.state = m.schedule;
            book.history = m.history.clone();
            book.last_checkpoint = Some(m.step);
            book.last_checkpoint_at = book.run_dir.as_ref().and_then(|dir| {
                std::fs::metadata(checkpoint::step_dir(dir, m.step))
                    .and_then(|md| md.modified())
                    .ok()
            });
        }
        if let Some(dir) = &book.run_dir {
            book.tensorboard = EventWriter::open(dir, resumed.map(|m| m.step).unwrap_or(0));
        }
        book
    }

    /// Takes a step; returns the figures of a log step (also written for TensorBoard).
    pub fn step(&mut self, r: &StepReport) -> Option<TrainPoint> {
        self.steps_per_epoch = r.steps_per_epoch;
        let point = self.monitor.step(r)?;
        if let Some(tb) = &mut self.tensorboard {
            tb.train(&point);
        }
        self.last_train = Some(point.clone());
        Some(point)
    }

    /// Logs an epoch's validation, applies the schedule, refreshes the report; returns the
    /// learning rate of the next epoch.
    pub fn evaluation(&mut self, r: &EvalReport) -> f32 {
        let lr_used = self.state.lr;
        let point = self
            .monitor
            .evaluation(r, self.epoch_started.elapsed().as_secs_f64());
        self.epoch_started = Instant::now();
        let next = self.state.observe(&self.schedule, r.hits.top1_err());
        self.history.push(EpochRecord {
            epoch: r.epoch,
            train_loss: point.train_loss,
            val_top1_err: r.hits.top1_err(),
            val_top5_err: r.hits.top5_err(),
            lr: lr_used,
            seconds: point.seconds,
            val_loss: Some(point.loss),
            images_per_s: Some(point.images_per_s),
        });
        if let Some(tb) = &mut self.tensorboard {
            tb.validation(&point);
        }
        self.last_validation = Some(point);
        if let Some(dir) = &self.run_dir {
            if let Err(e) = super::report::write(dir, &self.history, self.monitor.classes()) {
                tracing::warn!("could not refresh the training report: {e:#}");
            }
        }
        next
    }

    /// Records shards of a checkpoint; once all are in, writes its manifest (which makes it
    /// complete) and prunes old checkpoints. Returns the step of a checkpoint just completed.
    pub fn shards_written(&mut self, c: &ShardsWritten) -> anyhow::Result<Option<u64>> {
        let Some(run_dir) = self.run_dir.clone() else {
            return Ok(None);
        };
        let entry = self.pending.entry(c.step).or_default();
        for (name, sum) in &c.shards {
            entry.insert(name.clone(), sum.clone());
        }
        if entry.len() < self.shards_per_checkpoint {
            return Ok(None);
        }
        let shards = self.pending.remove(&c.step).expect("present");
        let mut m = Manifest::new(
            c.step,
            self.steps_per_epoch.max(1),
            self.state,
            self.seed,
            self.config_hash.clone(),
            self.generation,
        );
        m.shards = shards;
        m.history = self.history.clone();
        checkpoint::write_manifest(&run_dir, &m)?;
        checkpoint::prune(&run_dir, self.keep);
        self.last_checkpoint = Some(c.step);
        self.last_checkpoint_at = Some(std::time::SystemTime::now());
        tracing::info!(
            step = c.step,
            dir = %checkpoint::step_dir(&run_dir, c.step).display(),
            "checkpoint complete"
        );
        Ok(Some(c.step))
    }
}

impl Reporter for JobBook {
    fn step(&mut self, r: &StepReport) -> anyhow::Result<()> {
        JobBook::step(self, r);
        Ok(())
    }

    fn evaluation(&mut self, r: &EvalReport) -> anyhow::Result<f32> {
        Ok(JobBook::evaluation(self, r))
    }

    fn checkpoint(&mut self, c: &ShardsWritten) -> anyhow::Result<()> {
        self.shards_written(c).map(|_| ())
    }
}
