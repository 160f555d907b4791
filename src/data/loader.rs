//! Batches from a prepared dataset, made on background threads ahead of the training loop.
//!
//! An epoch visits the dataset in an order drawn from (seed, epoch); global batch `b` is the
//! `b`-th run of `global_batch` samples of that order, and replica `r` of `R` takes the `r`-th
//! of `R` equal parts of it. Views come from [`super::augment`], keyed by the sample's index, so
//! any process computes any part of any batch on its own and all agree.

use super::augment::{self, ByteViews, Crop};
use super::shards::Dataset;
use crate::rng;
use anyhow::{ensure, Result};
use rayon::prelude::*;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Which views a batch holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum View {
    /// Random crop, flip and PCA colour noise; the epoch's shuffled order, last partial batch
    /// dropped.
    Train,
    /// The centre crop; the dataset in order, every sample once.
    Centre,
    /// The ten patches per sample (`10 x` the batch's images, sample by sample); in order.
    TenPatches,
}

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Samples per global batch (all replicas together).
    pub global_batch: usize,
    pub replicas: usize,
    /// This process's replica, `0..replicas`.
    pub replica: usize,
    pub seed: u64,
    pub view: View,
    /// Side of the views (the paper: 224).
    pub crop: usize,
    /// Threads that make batches.
    pub threads: usize,
    /// Batches made ahead of the consumer.
    pub prefetch: usize,
    /// Ship views as bytes for the consumer to finish ([`Pixels::Bytes`]: a GPU does it)
    /// rather than as floats.
    pub bytes: bool,
}

/// This replica's part of one global batch.
pub struct Batch {
    pub epoch: u64,
    /// Index of the global batch in its epoch.
    pub index: usize,
    /// Global sample indices, in order.
    pub samples: Vec<usize>,
    pub labels: Vec<u32>,
    /// `[views, 3, crop, crop]` (views = samples, or 10 x samples for the ten patches).
    pub pixels: Pixels,
}

/// A batch's views: finished floats, or bytes for the backend to finish.
#[derive(Clone, Debug)]
pub enum Pixels {
    Floats(Vec<f32>),
    Bytes(ByteViews),
}

impl Pixels {
    /// The float views, finished here if they came as bytes.
    pub fn into_floats(self) -> Result<Vec<f32>> {
        match self {
            Pixels::Floats(x) => Ok(x),
            Pixels::Bytes(v) => v.finish(),
        }
    }
}

/// The order in which `epoch` visits `len` samples.
pub fn epoch_order(len: usize, seed: u64, epoch: u64, view: View) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    if view == View::Train {
        let key = rng::subkey(rng::key(seed, "loader.order"), epoch);
        order.sort_by_key(|&i| rng::mix64(key ^ i as u64));
    }
    order
}

/// Global batches in an epoch of `len` samples.
pub fn batches_per_epoch(len: usize, cfg: &LoaderConfig) -> usize {
    match cfg.view {
        View::Train => len / cfg.global_batch,
        _ => len.div_ceil(cfg.global_batch),
    }
}

/// Replica `cfg.replica`'s samples of global batch `index` of an epoch with `order`.
pub fn replica_samples<'a>(order: &'a [usize], index: usize, cfg: &LoaderConfig) -> &'a [usize] {
    let start = index * cfg.global_batch;
    let batch = &order[start..(start + cfg.global_batch).min(order.len())];
    // Equal parts, the first `len % replicas` one longer (only a last evaluation batch is uneven).
    let (base, extra) = (batch.len() / cfg.replicas, batch.len() % cfg.replicas);
    let lo = cfg.replica * base + cfg.replica.min(extra);
    let hi = lo + base + usize::from(cfg.replica < extra);
    &batch[lo..hi]
}

fn check(ds: &Dataset, cfg: &LoaderConfig) -> Result<()> {
    ensure!(
        cfg.global_batch > 0,
        "the batch must hold at least one sample"
    );
    ensure!(
        cfg.replicas > 0 && cfg.replica < cfg.replicas,
        "replica {} of {} does not exist",
        cfg.replica,
        cfg.replicas
    );
    ensure!(
        cfg.view != View::Train || cfg.global_batch.is_multiple_of(cfg.replicas),
        "a global batch of {} cannot be split evenly over {} replicas",
        cfg.global_batch,
        cfg.replicas
    );
    ensure!(
        cfg.crop <= ds.side(),
        "crops of {} do not fit the dataset's {} pixel images",
        cfg.crop,
        ds.side()
    );
    ensure!(
        !ds.is_empty(),
        "the dataset in {} holds no images",
        ds.dir.display()
    );
    Ok(())
}

/// The (crop, colour shift) of each view of `samples` in `epoch`, sample by sample (ten per
/// sample for the ten patches).
fn plan_views(
    ds: &Dataset,
    cfg: &LoaderConfig,
    samples: &[usize],
    epoch: u64,
) -> Vec<(Crop, [f32; 3])> {
    let (side, crop) = (ds.side(), cfg.crop);
    let meta = &ds.meta;
    match cfg.view {
        View::Train => samples
            .iter()
            .map(|&sample| {
                let v = augment::train_view(cfg.seed, epoch, sample as u64, side, crop);
                let shift =
                    augment::pca_shift(v.alphas, meta.rgb_eigenvalues, meta.rgb_eigenvectors);
                (v.crop, shift)
            })
            .collect(),
        View::Centre => vec![(augment::centre(side, crop), [0.0; 3]); samples.len()],
        View::TenPatches => {
            let patches = augment::ten_patches(side, crop);
            let views = samples
                .iter()
                .flat_map(|_| patches.iter().map(|&p| (p, [0.0; 3])));
            views.collect()
        }
    }
}

/// Makes batch `index` of `epoch` for this replica.
pub fn make_batch(
    ds: &Dataset,
    cfg: &LoaderConfig,
    order: &[usize],
    epoch: u64,
    index: usize,
) -> Result<Batch> {
    let samples = replica_samples(order, index, cfg).to_vec();
    let (side, crop) = (ds.side(), cfg.crop);
    let per_view = 3 * crop * crop;
    let views = if cfg.view == View::TenPatches { 10 } else { 1 };
    let plan = plan_views(ds, cfg, &samples, epoch);
    // Each sample's image is read once, by one task, which makes all of its views.
    let (labels, pixels) = if cfg.bytes {
        let mut bytes = vec![0u8; samples.len() * views * per_view];
        let labels = bytes
            .par_chunks_mut(views * per_view)
            .zip(samples.par_iter().zip(plan.par_chunks(views)))
            .map(|(out, (&sample, plan))| -> Result<u32> {
                let (label, image) = ds.image(sample)?;
                for (&(c, _), dst) in plan.iter().zip(out.chunks_mut(per_view)) {
                    augment::cut(image, side, c, crop, dst);
                }
                Ok(label)
            })
            .collect::<Result<Vec<u32>>>()?;
        let (crops, shifts) = plan.into_iter().unzip();
        let pixels = Pixels::Bytes(ByteViews {
            side,
            out_side: crop,
            pixels: bytes,
            crops,
            shifts,
            mean: ds.mean.clone(),
        });
        (labels, pixels)
    } else {
        let mut x = vec![0.0f32; samples.len() * views * per_view];
        let labels = x
            .par_chunks_mut(views * per_view)
            .zip(samples.par_iter().zip(plan.par_chunks(views)))
            .map(|(out, (&sample, plan))| -> Result<u32> {
                let (label, image) = ds.image(sample)?;
                for (&(c, shift), dst) in plan.iter().zip(out.chunks_mut(per_view)) {
                    augment::render(image, &ds.mean, side, c, shift, crop, dst);
                }
                Ok(label)
            })
            .collect::<Result<Vec<u32>>>()?;
        (labels, Pixels::Floats(x))
    };
    Ok(Batch {
        epoch,
        index,
        samples,
        labels,
        pixels,
    })
}

/// One epoch's batches, made ahead on background threads; iterate to receive them in order.
/// Dropping it stops the threads.
pub struct EpochLoader {
    rx: Receiver<Result<Batch>>,
    handle: Option<JoinHandle<()>>,
    pub batches: usize,
}

impl EpochLoader {
    pub fn new(ds: Arc<Dataset>, cfg: LoaderConfig, epoch: u64) -> Result<EpochLoader> {
        check(&ds, &cfg)?;
        let batches = batches_per_epoch(ds.len(), &cfg);
        let (tx, rx) = sync_channel(cfg.prefetch.max(1));
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .thread_name(|i| format!("loader-{i}"))
            .build()?;
        let handle = std::thread::Builder::new()
            .name("loader".into())
            .spawn(move || {
                let order = epoch_order(ds.len(), cfg.seed, epoch, cfg.view);
                for index in 0..batches {
                    let batch = pool.install(|| make_batch(&ds, &cfg, &order, epoch, index));
                    let failed = batch.is_err();
                    // The consumer went away, or the batch failed: either way, stop.
                    if tx.send(batch).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(EpochLoader {
            rx,
            handle: Some(handle),
            batches,
        })
    }
}

impl Iterator for EpochLoader {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        self.rx.recv().ok()
    }
}

impl Drop for EpochLoader {
    fn drop(&mut self) {
        // Unblock a producer waiting on a full queue, then let it finish its current batch.
        while self.rx.try_recv().is_ok() {}
        if let Some(h) = self.handle.take() {
            drop(std::mem::replace(&mut self.rx, sync_channel(1).1));
            let _ = h.join();
        }
    }
}
