//! Training on a small labelled image set held in memory (the carried Fashion-MNIST sample, or
//! the full Fashion-MNIST/MNIST files): the quick job that shows the whole network learning.
//!
//! Images are resized once to the network's input side (bilinear), the training set's mean
//! image is subtracted, and each epoch visits the training set in an order drawn from
//! `(seed, epoch)`, so a rerun sees the same batches.

use super::fit::{eval_batch, DataSource, Hits, HostBatch};
use super::input_form::{network_input, resize_plane, ImageForm, InputForm, RunInput};
use crate::backend::Backend;
use crate::data::idx::ImageSet;
use crate::data::loader::Pixels;
use crate::model::{NetConfig, Network};
use crate::rng;
use std::time::Instant;

/// A set resized to `side` x `side`, as f32 with the training mean subtracted.
struct Prepared {
    values: Vec<f32>,
    labels: Vec<u32>,
    per_image: usize,
}

fn prepare(set: &ImageSet, side: usize, mean: Option<&[f32]>) -> (Prepared, Vec<f32>) {
    let per_image = set.channels * side * side;
    let mut values = vec![0.0f32; set.len() * per_image];
    for (i, dst) in values.chunks_mut(per_image).enumerate() {
        let img = set.image(i);
        for c in 0..set.channels {
            let plane = &img[c * set.height * set.width..(c + 1) * set.height * set.width];
            resize_plane(
                plane,
                set.height,
                set.width,
                side,
                &mut dst[c * side * side..(c + 1) * side * side],
            );
        }
    }
    let mean = match mean {
        Some(m) => m.to_vec(),
        None => {
            let mut m = vec![0.0f64; per_image];
            for img in values.chunks(per_image) {
                m.iter_mut().zip(img).for_each(|(a, &b)| *a += b as f64);
            }
            m.iter()
                .map(|v| (v / set.len().max(1) as f64) as f32)
                .collect()
        }
    };
    for img in values.chunks_mut(per_image) {
        img.iter_mut().zip(&mean).for_each(|(a, b)| *a -= b);
    }
    (
        Prepared {
            values,
            labels: set.labels.clone(),
            per_image,
        },
        mean,
    )
}

/// The visiting order of epoch `epoch`: a permutation drawn from `(seed, epoch)`.
pub fn epoch_order(len: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let key = rng::subkey(rng::key(seed, "sample.order"), epoch);
    let mut order: Vec<usize> = (0..len).collect();
    order.sort_by_key(|&i| rng::mix64(key ^ i as u64));
    order
}

/// A labelled image set in memory, as one replica of a data-parallel job sees it.
pub struct SampleData {
    train: Prepared,
    val: Prepared,
    global_batch: usize,
    replicas: usize,
    replica: usize,
    seed: u64,
    classes: Vec<String>,
    /// The training set's mean image at the network's input side.
    mean: Vec<f32>,
    side: usize,
    /// The IDX images' own form: what an image file is resized to first.
    height: usize,
    width: usize,
    channels: usize,
    /// Where the images came from.
    data: std::path::PathBuf,
}

pub use crate::data::idx::FASHION_MNIST_CLASSES;

/// Class names of an IDX folder: `classes.txt` (one per line) if present, Fashion-MNIST's for
/// a folder named like it, otherwise the label numbers.
pub fn idx_class_names(dir: &std::path::Path, classes: usize) -> Vec<String> {
    if let Ok(text) = std::fs::read_to_string(dir.join("classes.txt")) {
        let names: Vec<String> = text
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect();
        if names.len() >= classes {
            return names;
        }
    }
    let name = dir.to_string_lossy().to_lowercase();
    if name.contains("fashion") && classes <= 10 {
        return FASHION_MNIST_CLASSES
            .iter()
            .map(|s| s.to_string())
            .collect();
    }
    (0..classes).map(|c| c.to_string()).collect()
}

/// Replica `replica`'s part of `batch`: equal parts, the first `len % replicas` one longer
/// (only a last evaluation batch is uneven).
fn replica_part<T>(batch: &[T], replicas: usize, replica: usize) -> &[T] {
    let (base, extra) = (batch.len() / replicas, batch.len() % replicas);
    let lo = replica * base + replica.min(extra);
    &batch[lo..lo + base + usize::from(replica < extra)]
}

impl SampleData {
    /// Resizes `train` and `val` to the network's input and subtracts the training mean.
    pub fn new(
        train: &ImageSet,
        val: &ImageSet,
        net: &NetConfig,
        global_batch: usize,
        (replicas, replica): (usize, usize),
        seed: u64,
        classes: Vec<String>,
    ) -> anyhow::Result<Self> {
        Self::check(train, val, net, global_batch, replicas)?;
        let side = net.input_size;
        let t = Instant::now();
        let (train_set, mean) = prepare(train, side, None);
        let (val_set, _) = prepare(val, side, Some(&mean));
        let mean_kept = mean.clone();
        tracing::info!(
            train = train.len(),
            val = val.len(),
            side,
            ms = t.elapsed().as_millis() as u64,
            "images resized and mean-subtracted"
        );
        Ok(SampleData {
            train: train_set,
            val: val_set,
            global_batch,
            replicas,
            replica,
            seed,
            classes,
            mean: mean_kept,
            side,
            height: train.height,
            width: train.width,
            channels: train.channels,
            data: std::path::PathBuf::new(),
        })
    }

    /// Records where the images came from (for the run's input form).
    pub fn from_folder(self, data: &std::path::Path) -> Self {
        SampleData {
            data: data.to_path_buf(),
            ..self
        }
    }

    /// Whether `train` and `val` can feed `net` in batches of `global_batch` over `replicas`
    /// (what [`SampleData::new`] checks before it resizes anything).
    pub fn check(
        train: &ImageSet,
        val: &ImageSet,
        net: &NetConfig,
        global_batch: usize,
        replicas: usize,
    ) -> anyhow::Result<()> {
        anyhow::ensure!(!train.is_empty(), "the training set is empty");
        anyhow::ensure!(
            !val.is_empty(),
            "the validation (t10k) set is empty: validation needs at least one image"
        );
        anyhow::ensure!(global_batch > 0, "the batch must be at least 1");
        anyhow::ensure!(
            global_batch.is_multiple_of(replicas),
            "a batch of {global_batch} cannot be split evenly over {replicas} replicas: make it a multiple"
        );
        anyhow::ensure!(
            train.channels == net.in_channels,
            "the images have {} channel(s), the network's in_channels is {} (set `in_channels = \
             {}` under [net] in the job file, or use --net demo for grey 28x28 images)",
            train.channels,
            net.in_channels,
            train.channels
        );
        let max_label = train
            .labels
            .iter()
            .chain(&val.labels)
            .copied()
            .max()
            .unwrap_or(0) as usize;
        anyhow::ensure!(
            max_label < net.classes,
            "labels go up to {max_label}, the network has {} classes: raise `classes`",
            net.classes
        );
        anyhow::ensure!(
            train.len() >= global_batch,
            "the batch (--batch {global_batch}) is larger than the training set ({})",
            train.len()
        );
        Ok(())
    }
}

impl SampleData {
    /// The network input for one `h x w` image with the set's channels (resized to the input
    /// side, training mean subtracted), as the training images were made.
    pub fn input_for(&self, pixels: &[u8], channels: usize, h: usize, w: usize) -> Vec<f32> {
        network_input(pixels, channels, h, w, self.side, &self.mean)
    }
}

impl<B: Backend> DataSource<B> for SampleData {
    fn class_names(&self) -> Vec<String> {
        self.classes.clone()
    }

    fn input(&self) -> RunInput {
        RunInput {
            form: InputForm {
                classes: self.classes.clone(),
                image: ImageForm::Idx {
                    height: self.height,
                    width: self.width,
                    channels: self.channels,
                },
                data: self.data.clone(),
                descriptions: Vec::new(),
            },
            mean: self.mean.clone(),
        }
    }

    fn steps_per_epoch(&self) -> usize {
        self.train.labels.len() / self.global_batch
    }

    fn epoch(
        &mut self,
        epoch: u64,
    ) -> anyhow::Result<Box<dyn Iterator<Item = anyhow::Result<HostBatch>> + '_>> {
        let order = epoch_order(self.train.labels.len(), self.seed, epoch);
        let set = &self.train;
        let (replicas, replica, per) = (self.replicas, self.replica, set.per_image);
        let batches: Vec<Vec<usize>> = order
            .chunks_exact(self.global_batch)
            .map(|c| replica_part(c, replicas, replica).to_vec())
            .collect();
        Ok(Box::new(batches.into_iter().map(move |chunk| {
            let mut x = Vec::with_capacity(chunk.len() * per);
            for &i in &chunk {
                x.extend_from_slice(&set.values[i * per..(i + 1) * per]);
            }
            let labels = chunk.iter().map(|&i| set.labels[i]).collect();
            Ok((Pixels::Floats(x), labels))
        })))
    }

    fn evaluate(&mut self, net: &mut Network<B>) -> anyhow::Result<Hits> {
        let mut hits = Hits::default();
        let set = &self.val;
        let n = set.labels.len();
        let local = self.global_batch / self.replicas;
        let all: Vec<usize> = (0..n).collect();
        for batch in all.chunks(self.global_batch) {
            let part = replica_part(batch, self.replicas, self.replica);
            let (lo, hi) = match (part.first(), part.last()) {
                (Some(&a), Some(&b)) => (a, b + 1),
                _ => (0, 0),
            };
            let x = &set.values[lo * set.per_image..hi * set.per_image];
            hits += eval_batch(net, x, &set.labels[lo..hi], local)?;
        }
        Ok(hits)
    }
}

impl SampleData {
    /// Each validation image's label and the class the network ranks first (one process
    /// holding both columns), in the set's order.
    pub fn val_predictions<B: Backend>(
        &self,
        net: &mut Network<B>,
    ) -> anyhow::Result<Vec<(u32, usize)>> {
        let set = &self.val;
        let classes = net.cfg.classes;
        let mut out = Vec::with_capacity(set.labels.len());
        for (labels, x) in set
            .labels
            .chunks(self.global_batch)
            .zip(set.values.chunks(self.global_batch * set.per_image))
        {
            let mut host = x.to_vec();
            host.resize(self.global_batch * set.per_image, 0.0);
            net.forward(
                &net.backend.upload(&host),
                self.global_batch,
                crate::model::Mode::Eval,
            )?;
            let logits = net.backend.download(net.logits().expect("forward ran"));
            let top = crate::backend::cpu::top_k(labels.len(), classes, &logits, 1);
            out.extend(labels.iter().zip(top).map(|(&l, t)| (l, t[0] as usize)));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_parts_cover_a_batch_once() {
        let batch: Vec<usize> = (0..7).collect();
        let parts: Vec<&[usize]> = (0..3).map(|r| replica_part(&batch, 3, r)).collect();
        assert_eq!(parts, vec![&[0, 1, 2][..], &[3, 4], &[5, 6]]);
    }

    #[test]
    fn resize_keeps_a_constant_image_constant_and_scales_a_ramp() {
        let src = vec![7u8; 4 * 4];
        let mut dst = vec![0.0; 8 * 8];
        resize_plane(&src, 4, 4, 8, &mut dst);
        assert!(dst.iter().all(|&v| v == 7.0));
        let ramp: Vec<u8> = (0..2).flat_map(|_| [0u8, 100]).collect();
        let mut dst = vec![0.0; 4 * 4];
        resize_plane(&ramp, 2, 2, 4, &mut dst);
        assert_eq!(&dst[..4], &[0.0, 25.0, 75.0, 100.0]);
    }

    #[test]
    fn epoch_order_is_a_permutation_fixed_by_seed_and_epoch() {
        let a = epoch_order(100, 1, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 1, 0));
        assert_ne!(a, epoch_order(100, 1, 1));
        assert_ne!(a, epoch_order(100, 2, 0));
    }
}
