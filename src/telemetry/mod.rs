//! What a run shows the tools people watch runs with: TensorBoard's event files
//! ([`tensorboard`]) and Prometheus's text format ([`prometheus`]). The figures come from the
//! job's bookkeeping (`train::book`, the coordinator); this module only writes and serves them.

pub mod prometheus;
pub mod tensorboard;

/// What one log line of training says, over the steps since the previous one.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainPoint {
    pub epoch: u64,
    pub step: u64,
    pub total_steps: u64,
    /// The steps' mean loss.
    pub loss: f64,
    pub top1_err: f64,
    /// Absent for 5 classes or fewer (top-5 is then always right).
    pub top5_err: Option<f64>,
    pub images_per_s: f64,
    pub lr: f32,
    pub eta_s: f64,
}

/// An epoch's end: its validation and what the epoch took.
#[derive(Clone, Debug, PartialEq)]
pub struct ValPoint {
    pub epoch: u64,
    /// The step the epoch ended at.
    pub step: u64,
    /// The epoch's mean training loss.
    pub train_loss: f32,
    pub loss: f64,
    pub top1_err: f64,
    pub top5_err: Option<f64>,
    pub seconds: f64,
    pub images_per_s: f64,
}

/// One rank over the newest log interval: the exchanges' shares of its step, and the bytes it
/// sent per step.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankPoint {
    pub rank: u32,
    pub replica: u32,
    pub column: u32,
    pub images_per_s: f64,
    pub column_share: f64,
    pub replica_share: f64,
    pub column_bytes_per_step: f64,
    pub replica_bytes_per_step: f64,
}
