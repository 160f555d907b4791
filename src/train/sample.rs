//! Training on a small labelled image set held in memory (the carried Fashion-MNIST sample, or
//! the full Fashion-MNIST/MNIST files): the quick job that shows the whole network learning.
//!
//! Images are resized once to the network's input side (bilinear), the training set's mean
//! image is subtracted, and each epoch visits the training set in an order drawn from
//! `(seed, epoch)`, so a rerun sees the same batches.

use super::fit::{eval_batch, fit, EpochResult, FitOptions, HostBatch};
use crate::backend::{rng, Backend, SgdParams};
use crate::comm::LocalExchange;
use crate::data::idx::ImageSet;
use crate::model::{NetConfig, Network};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub epochs: usize,
    pub batch: usize,
    pub sgd: SgdParams,
    pub seed: u64,
    pub net: NetConfig,
    /// Log every this many steps.
    pub log_every: usize,
}

/// A set resized to `side` x `side`, as f32 with the training mean subtracted.
struct Prepared {
    values: Vec<f32>,
    labels: Vec<u32>,
    per_image: usize,
}

/// Bilinear resize of one `h x w` plane to `side x side` (pixel centres aligned).
fn resize_plane(src: &[u8], h: usize, w: usize, side: usize, dst: &mut [f32]) {
    let (sy, sx) = (h as f32 / side as f32, w as f32 / side as f32);
    for y in 0..side {
        let fy = ((y as f32 + 0.5) * sy - 0.5).clamp(0.0, (h - 1) as f32);
        let (y0, ty) = (fy.floor() as usize, fy.fract());
        let y1 = (y0 + 1).min(h - 1);
        for x in 0..side {
            let fx = ((x as f32 + 0.5) * sx - 0.5).clamp(0.0, (w - 1) as f32);
            let (x0, tx) = (fx.floor() as usize, fx.fract());
            let x1 = (x0 + 1).min(w - 1);
            let p = |yy: usize, xx: usize| src[yy * w + xx] as f32;
            let top = p(y0, x0) * (1.0 - tx) + p(y0, x1) * tx;
            let bottom = p(y1, x0) * (1.0 - tx) + p(y1, x1) * tx;
            dst[y * side + x] = top * (1.0 - ty) + bottom * ty;
        }
    }
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

/// Top-1 and top-5 error over `set`, in batches of `batch`.
fn evaluate<B: Backend>(
    net: &mut Network<B>,
    set: &Prepared,
    batch: usize,
) -> anyhow::Result<(f64, f64)> {
    let (mut top1, mut top5) = (0usize, 0usize);
    let n = set.labels.len();
    for start in (0..n).step_by(batch) {
        let end = (start + batch).min(n);
        let x = &set.values[start * set.per_image..end * set.per_image];
        let (a, b) = eval_batch(net, x, &set.labels[start..end], batch)?;
        top1 += a;
        top5 += b;
    }
    Ok((1.0 - top1 as f64 / n as f64, 1.0 - top5 as f64 / n as f64))
}

pub fn run<B: Backend>(
    backend: B,
    train: &ImageSet,
    val: &ImageSet,
    opts: &SampleOptions,
) -> anyhow::Result<Vec<EpochResult>> {
    anyhow::ensure!(!train.is_empty(), "the training set is empty");
    anyhow::ensure!(
        !val.is_empty(),
        "the validation (t10k) set is empty: validation needs at least one image"
    );
    anyhow::ensure!(opts.batch > 0, "--batch must be at least 1");
    anyhow::ensure!(
        train.channels == opts.net.in_channels,
        "the images have {} channel(s), the network's in_channels is {}",
        train.channels,
        opts.net.in_channels
    );
    let max_label = train
        .labels
        .iter()
        .chain(&val.labels)
        .copied()
        .max()
        .unwrap_or(0) as usize;
    anyhow::ensure!(
        max_label < opts.net.classes,
        "labels go up to {max_label}, the network has {} classes: raise `classes`",
        opts.net.classes
    );
    let side = opts.net.input_size;
    let t = Instant::now();
    let (train_set, mean) = prepare(train, side, None);
    let (val_set, _) = prepare(val, side, Some(&mean));
    tracing::info!(
        train = train.len(),
        val = val.len(),
        side,
        ms = t.elapsed().as_millis() as u64,
        "images resized and mean-subtracted"
    );
    let mut net = Network::new(
        opts.net.clone(),
        backend,
        Box::new(LocalExchange::default()),
        opts.seed,
    )?;
    tracing::info!(
        backend = net.backend.name(),
        parameters = crate::model::params::parameter_count(&net.cfg, &net.sides),
        "network ready"
    );
    let steps_per_epoch = train.len() / opts.batch;
    anyhow::ensure!(
        steps_per_epoch > 0,
        "--batch {} is larger than the training set ({})",
        opts.batch,
        train.len()
    );
    let fit_opts = FitOptions {
        epochs: opts.epochs,
        batch: opts.batch,
        sgd: opts.sgd,
        log_every: opts.log_every,
    };
    let (batch, seed, per) = (opts.batch, opts.seed, train_set.per_image);
    let train_ref = &train_set;
    let epoch_batches = move |epoch: u64| -> anyhow::Result<
        Box<dyn Iterator<Item = anyhow::Result<HostBatch>> + '_>,
    > {
        let order = epoch_order(train_ref.labels.len(), seed, epoch);
        let batches: Vec<Vec<usize>> = order.chunks_exact(batch).map(|c| c.to_vec()).collect();
        Ok(Box::new(batches.into_iter().map(move |chunk| {
            let mut x = Vec::with_capacity(batch * per);
            for &i in &chunk {
                x.extend_from_slice(&train_ref.values[i * per..(i + 1) * per]);
            }
            Ok((x, chunk.iter().map(|&i| train_ref.labels[i]).collect()))
        })))
    };
    fit(&mut net, &fit_opts, steps_per_epoch, epoch_batches, |net| {
        evaluate(net, &val_set, batch)
    })
}
#[cfg(test)]
mod tests {
    use super::*;

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
