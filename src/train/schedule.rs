//! The paper's learning-rate schedule: divide by 10 when the validation error stops improving.

use serde::{Deserialize, Serialize};

/// When and how the learning rate falls.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Schedule {
    /// Epochs without a new best validation top-1 error before the learning rate falls.
    pub patience_epochs: usize,
    /// What the learning rate is multiplied by when it falls.
    pub factor: f32,
    /// How many times it may fall (the paper: three).
    pub max_drops: usize,
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule {
            patience_epochs: 3,
            factor: 0.1,
            max_drops: 3,
        }
    }
}

/// Where the schedule stands: saved in every checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    pub lr: f32,
    /// Best validation top-1 error so far (none before the first validation).
    pub best_top1_err: Option<f64>,
    pub epochs_without_improvement: usize,
    pub drops: usize,
}

impl ScheduleState {
    pub fn new(lr: f32) -> Self {
        ScheduleState {
            lr,
            best_top1_err: None,
            epochs_without_improvement: 0,
            drops: 0,
        }
    }

    /// Takes an epoch's validation error; returns the learning rate for the next epoch.
    pub fn observe(&mut self, s: &Schedule, top1_err: f64) -> f32 {
        if self.best_top1_err.is_none_or(|best| top1_err < best) {
            self.best_top1_err = Some(top1_err);
            self.epochs_without_improvement = 0;
        } else {
            self.epochs_without_improvement += 1;
            if self.epochs_without_improvement >= s.patience_epochs && self.drops < s.max_drops {
                self.lr *= s.factor;
                self.drops += 1;
                self.epochs_without_improvement = 0;
                tracing::info!(
                    lr = crate::log_fields::single(self.lr),
                    drops = self.drops,
                    of = s.max_drops,
                    best_top1_err =
                        crate::log_fields::rounded(self.best_top1_err.unwrap_or(1.0), 4),
                    "validation error stopped improving: learning rate divided"
                );
            }
        }
        self.lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_after_patience_and_at_most_max_drops_times() {
        let s = Schedule {
            patience_epochs: 2,
            factor: 0.1,
            max_drops: 1,
        };
        let mut st = ScheduleState::new(0.01);
        assert_eq!(st.observe(&s, 0.5), 0.01);
        assert_eq!(st.observe(&s, 0.4), 0.01);
        assert_eq!(st.observe(&s, 0.45), 0.01);
        let lr = st.observe(&s, 0.41);
        assert!((lr - 0.001).abs() < 1e-9);
        // No more drops.
        for _ in 0..5 {
            assert!((st.observe(&s, 0.9) - 0.001).abs() < 1e-9);
        }
    }
}
