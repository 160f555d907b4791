//! Training on a prepared dataset (`alexnet prepare`): the paper's training views from the
//! background loader, and validation on the centre crops of a prepared validation set.

use super::fit::{eval_batch, fit, EpochResult, FitOptions, HostBatch};
use crate::backend::Backend;
use crate::comm::LocalExchange;
use crate::data::loader::{batches_per_epoch, EpochLoader, LoaderConfig, View};
use crate::data::shards::Dataset;
use crate::model::{NetConfig, Network};
use std::sync::Arc;

#[derive(Clone, Debug)]
pub struct PreparedOptions {
    pub fit: FitOptions,
    pub seed: u64,
    pub net: NetConfig,
    /// Threads that make batches.
    pub loader_threads: usize,
}

fn loader_config(opts: &PreparedOptions, view: View) -> LoaderConfig {
    LoaderConfig {
        global_batch: opts.fit.batch,
        replicas: 1,
        replica: 0,
        seed: opts.seed,
        view,
        crop: opts.net.input_size,
        threads: opts.loader_threads,
        prefetch: 4,
    }
}

/// Top-1 and top-5 error of the centre crops of `val`.
fn evaluate<B: Backend>(
    net: &mut Network<B>,
    val: &Arc<Dataset>,
    opts: &PreparedOptions,
) -> anyhow::Result<(f64, f64)> {
    let (mut top1, mut top5, mut n) = (0usize, 0usize, 0usize);
    for b in EpochLoader::new(val.clone(), loader_config(opts, View::Centre), 0)? {
        let b = b?;
        let (a, c) = eval_batch(net, &b.x, &b.labels, opts.fit.batch)?;
        (top1, top5, n) = (top1 + a, top5 + c, n + b.labels.len());
    }
    Ok((1.0 - top1 as f64 / n as f64, 1.0 - top5 as f64 / n as f64))
}

pub fn run<B: Backend>(
    backend: B,
    train: Arc<Dataset>,
    val: Arc<Dataset>,
    opts: &PreparedOptions,
) -> anyhow::Result<Vec<EpochResult>> {
    anyhow::ensure!(
        opts.net.in_channels == 3,
        "prepared datasets are RGB: the network's in_channels must be 3, not {}",
        opts.net.in_channels
    );
    anyhow::ensure!(
        train.meta.classes == val.meta.classes,
        "the training set in {} and the validation set in {} have different classes",
        train.dir.display(),
        val.dir.display()
    );
    anyhow::ensure!(
        train.meta.classes.len() <= opts.net.classes,
        "the data has {} classes, the network {}: set `classes`",
        train.meta.classes.len(),
        opts.net.classes
    );
    let mut net = Network::new(
        opts.net.clone(),
        backend,
        Box::new(LocalExchange::default()),
        opts.seed,
    )?;
    tracing::info!(
        backend = net.backend.name(),
        train = train.len(),
        val = val.len(),
        classes = train.meta.classes.len(),
        "network and data ready"
    );
    let steps = batches_per_epoch(train.len(), &loader_config(opts, View::Train));
    anyhow::ensure!(
        steps > 0,
        "--batch {} is larger than the training set ({})",
        opts.fit.batch,
        train.len()
    );
    let epoch_batches =
        |epoch: u64| -> anyhow::Result<Box<dyn Iterator<Item = anyhow::Result<HostBatch>>>> {
            let loader = EpochLoader::new(train.clone(), loader_config(opts, View::Train), epoch)?;
            Ok(Box::new(loader.map(|b| b.map(|b| (b.x, b.labels)))))
        };
    fit(&mut net, &opts.fit, steps, epoch_batches, |net| {
        evaluate(net, &val, opts)
    })
}
