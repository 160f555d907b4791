//! Where the time of forward and backward passes goes, per layer (the benchmark's table, and the
//! worker's time in the exchanges).

use crate::backend::Backend;
use std::time::{Duration, Instant};

/// The time one layer (or `exchange`, `replicas`, `sgd`) took, summed over the passes profiled.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerTime {
    pub layer: &'static str,
    pub forward: Duration,
    pub backward: Duration,
}

/// Which pass a timed section belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    Forward,
    Backward,
}

#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// In the order layers first ran.
    pub layers: Vec<LayerTime>,
    /// Wait for the backend at the end of every layer. A device queues its ops, so without
    /// this a layer's time is the time to queue it, and the wait lands on whichever layer
    /// next reads a result on the host; with it, each layer's time is its own, at the cost of
    /// the waits (the benchmark times its steps without, then profiles a few with).
    pub synchronize: bool,
}

impl Profile {
    /// Times what runs until the returned guard is dropped, as `layer`'s share of `pass`.
    pub fn time<'a, B: Backend>(
        &'a mut self,
        backend: &'a B,
        layer: &'static str,
        pass: Pass,
    ) -> Timed<'a, B> {
        Timed {
            profile: self,
            backend,
            layer,
            pass,
            since: Instant::now(),
        }
    }

    /// Seconds spent in `layer`, both passes.
    pub fn seconds(&self, layer: &str) -> f64 {
        self.layers
            .iter()
            .filter(|l| l.layer == layer)
            .map(|l| (l.forward + l.backward).as_secs_f64())
            .sum()
    }

    fn add(&mut self, layer: &'static str, pass: Pass, d: Duration) {
        let entry = match self.layers.iter_mut().position(|e| e.layer == layer) {
            Some(i) => &mut self.layers[i],
            None => {
                self.layers.push(LayerTime {
                    layer,
                    forward: Duration::ZERO,
                    backward: Duration::ZERO,
                });
                self.layers.last_mut().expect("just pushed")
            }
        };
        match pass {
            Pass::Forward => entry.forward += d,
            Pass::Backward => entry.backward += d,
        }
    }
}

/// A timed section of a layer: adds its time to the profile when dropped (on every path out,
/// errors included).
pub struct Timed<'a, B: Backend> {
    profile: &'a mut Profile,
    backend: &'a B,
    layer: &'static str,
    pass: Pass,
    since: Instant,
}

impl<B: Backend> Drop for Timed<'_, B> {
    fn drop(&mut self) {
        if self.profile.synchronize {
            self.backend.synchronize();
        }
        let d = self.since.elapsed();
        self.profile.add(self.layer, self.pass, d);
    }
}
