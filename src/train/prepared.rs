//! Training on a prepared dataset (`alexnet prepare`): the paper's training views from the
//! background loader, and validation on the centre crops of a prepared validation set.

use super::fit::{eval_batch, DataSource, Hits, HostBatch};
use super::input_form::{ImageForm, InputForm, RunInput};
use crate::backend::Backend;
use crate::data::loader::{batches_per_epoch, EpochLoader, LoaderConfig, View};
use crate::data::shards::Dataset;
use crate::model::{NetConfig, Network};
use std::sync::Arc;

/// A prepared training set and validation set, as one replica of a job sees them.
pub struct PreparedData {
    train: Arc<Dataset>,
    val: Arc<Dataset>,
    base: LoaderConfig,
}

impl PreparedData {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        train: Arc<Dataset>,
        val: Arc<Dataset>,
        net: &NetConfig,
        global_batch: usize,
        (replicas, replica): (usize, usize),
        seed: u64,
        loader_threads: usize,
        finished_by_backend: bool,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            net.in_channels == 3,
            "prepared datasets are RGB: the network's in_channels must be 3, not {}",
            net.in_channels
        );
        if train.meta.classes != val.meta.classes {
            let (t, v) = (&train.meta.classes, &val.meta.classes);
            let at = t
                .iter()
                .zip(v)
                .position(|(a, b)| a != b)
                .unwrap_or(t.len().min(v.len()));
            let name = |c: &Vec<String>| c.get(at).map_or("nothing", String::as_str).to_string();
            anyhow::bail!(
                "the training set in {} and the validation set in {} have different classes \
                 ({} and {}; class {at} is {} in one, {} in the other): the validation set must \
                 have the training set's classes in its order; prepare it from the same class \
                 folders, or with --labels pass the training set's class list as --class-names",
                train.dir.display(),
                val.dir.display(),
                t.len(),
                v.len(),
                name(t),
                name(v)
            );
        }
        anyhow::ensure!(
            train.meta.classes.len() <= net.classes,
            "the data has {} classes, the network {}: set `classes`",
            train.meta.classes.len(),
            net.classes
        );
        let base = LoaderConfig {
            global_batch,
            replicas,
            replica,
            seed,
            view: View::Train,
            crop: net.input_size,
            threads: loader_threads.max(1),
            prefetch: 4,
            bytes: finished_by_backend,
        };
        anyhow::ensure!(
            batches_per_epoch(train.len(), &base) > 0,
            "the batch (--batch {global_batch}) is larger than the training set ({})",
            train.len()
        );
        tracing::info!(
            train = train.len(),
            val = val.len(),
            classes = train.meta.classes.len(),
            views = if finished_by_backend {
                "bytes, finished by the backend"
            } else {
                "finished by the loader"
            },
            "prepared data ready"
        );
        Ok(PreparedData { train, val, base })
    }
}

impl<B: Backend> DataSource<B> for PreparedData {
    fn class_names(&self) -> Vec<String> {
        self.train.meta.classes.clone()
    }

    fn input(&self) -> RunInput {
        RunInput {
            form: InputForm {
                classes: self.train.meta.classes.clone(),
                image: ImageForm::Prepared {
                    side: self.train.side(),
                },
                data: self.train.dir.clone(),
                descriptions: self.train.meta.class_descriptions.clone(),
            },
            mean: self.train.mean.to_vec(),
        }
    }

    fn steps_per_epoch(&self) -> usize {
        batches_per_epoch(self.train.len(), &self.base)
    }

    fn epoch(
        &mut self,
        epoch: u64,
    ) -> anyhow::Result<Box<dyn Iterator<Item = anyhow::Result<HostBatch>> + '_>> {
        let loader = EpochLoader::new(self.train.clone(), self.base.clone(), epoch)?;
        Ok(Box::new(loader.map(|b| b.map(|b| (b.pixels, b.labels)))))
    }

    /// Top-1 and top-5 hits on the centre crops of this replica's part of the validation set.
    fn evaluate(&mut self, net: &mut Network<B>) -> anyhow::Result<Hits> {
        // Validation runs once an epoch and pads its last batch: its views are finished here.
        let cfg = LoaderConfig {
            view: View::Centre,
            bytes: false,
            ..self.base.clone()
        };
        let local = cfg.global_batch / cfg.replicas;
        let mut hits = Hits::default();
        for b in EpochLoader::new(self.val.clone(), cfg, 0)? {
            let b = b?;
            hits += eval_batch(net, &b.pixels.into_floats()?, &b.labels, local)?;
        }
        Ok(hits)
    }
}
