//! A training job: what to train on what, and how it is laid out over workers. The same
//! description runs in one process (`alexnet train`) and across workers (`alexnet launch`,
//! where the coordinator sends it to every worker, and its hash guards against mismatches).

use super::fit::{fit, CheckpointPlan, DataSource, FitOptions, Reporter, Start};
use super::prepared::PreparedData;
use super::sample::SampleData;
use super::schedule::Schedule;
use crate::backend::{Backend, SgdParams};
use crate::comm::{BufReduce, ColumnExchange, Topology};
use crate::data::idx::read_fashion_mnist_dir;
use crate::data::shards::{Dataset, METADATA_FILE};
use crate::model::config::COLUMNS;
use crate::model::{NetConfig, Network};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Everything that decides what a run computes (and so must be equal on every worker). The
/// default is the paper's recipe (`jobs/paper.toml` spells it out, field by field).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    /// Training data: a prepared dataset (has dataset.json) or a folder of IDX files (which
    /// also holds the validation set).
    pub data: PathBuf,
    /// The prepared validation set (prepared training data only).
    pub val: Option<PathBuf>,
    /// The network (see `NetConfig`).
    pub net: NetConfig,
    /// Epochs to train (the paper: 90).
    pub epochs: usize,
    /// Samples per step, all replicas together (the paper: 128).
    pub batch: usize,
    /// Initial learning rate, momentum and weight decay (the paper: 0.01, 0.9, 0.0005).
    pub sgd: SgdParams,
    /// When the learning rate falls (the paper: divided by 10 when the validation error stops
    /// improving, three times).
    pub schedule: Schedule,
    /// Seeds the parameters, the dropout masks and the order of the data.
    pub seed: u64,
    /// Stop after this many steps in all (default: run every epoch).
    pub max_steps: Option<u64>,
    /// Workers and replicas.
    pub topology: Topology,
    /// Threads that make batches from prepared data, per worker.
    pub loader_threads: usize,
    /// Checkpoint every this many steps as well as at the end of every epoch (0: epochs only).
    pub checkpoint_every: u64,
    /// Complete checkpoints kept (older ones are removed).
    pub keep_checkpoints: usize,
    /// Start from these parameters (an `alexnet export` file: unsplit, PyTorch-style names)
    /// instead of the paper's initialisation.
    pub init: Option<PathBuf>,
    /// Where the training views of prepared data are finished (mirror, mean subtraction,
    /// colour shift): `auto` (on a GPU, which then receives bytes; by the loader on a CPU),
    /// `host` or `device`. The views are the same bits either way.
    pub augment_on: AugmentOn,
    /// Layers not taken from `init` but drawn afresh at this network's shape (fine-tuning:
    /// `fc8` for the new data's classes). Left out of the file when empty, so that the hash
    /// of a job without it is what it was.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reinit: Vec<String>,
    /// Layers that are not trained: no weight gradients, no update (fine-tuning on little
    /// data: `conv1..conv5`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub freeze: Vec<String>,
}

/// Where training views are finished; see [`JobConfig::augment_on`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AugmentOn {
    #[default]
    Auto,
    Host,
    Device,
}

impl AugmentOn {
    /// Whether the backend finishes the views, given whether it prefers to.
    pub fn on_device(self, backend_prefers: bool) -> bool {
        match self {
            AugmentOn::Auto => backend_prefers,
            AugmentOn::Host => false,
            AugmentOn::Device => true,
        }
    }
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            data: PathBuf::from("data/sample/fashion-mnist"),
            val: None,
            net: NetConfig::default(),
            epochs: 90,
            batch: 128,
            sgd: SgdParams {
                lr: 0.01,
                momentum: 0.9,
                weight_decay: 0.0005,
            },
            schedule: Schedule::default(),
            seed: 1,
            max_steps: None,
            topology: Topology {
                replicas: 1,
                columns_per_worker: 1,
                elastic: None,
            },
            loader_threads: 2,
            checkpoint_every: 0,
            keep_checkpoints: 3,
            init: None,
            augment_on: AugmentOn::Auto,
            reinit: Vec::new(),
            freeze: Vec::new(),
        }
    }
}

impl JobConfig {
    /// Refuses a job that cannot run, naming the field.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.net.validate().context("net")?;
        self.topology.validate().context("topology")?;
        anyhow::ensure!(self.batch > 0, "batch must be at least 1");
        anyhow::ensure!(self.epochs > 0, "epochs must be at least 1");
        anyhow::ensure!(
            self.sgd.lr > 0.0 && self.sgd.lr.is_finite(),
            "sgd.lr must be a positive number, not {}",
            self.sgd.lr
        );
        anyhow::ensure!(
            self.schedule.factor > 0.0 && self.schedule.factor <= 1.0,
            "schedule.factor must be in (0, 1], not {}",
            self.schedule.factor
        );
        anyhow::ensure!(
            self.keep_checkpoints >= 1,
            "keep_checkpoints must be at least 1"
        );
        if let Some(range) = self.topology.elastic {
            anyhow::ensure!(
                range.min <= self.batch,
                "batch {} cannot give each of {} replicas (MIN of the elastic range {range}) a \
                 sample: raise the batch or lower MIN",
                self.batch,
                range.min
            );
            let uneven: Vec<usize> = (range.min..=range.max)
                .filter(|r| !self.batch.is_multiple_of(*r))
                .collect();
            anyhow::ensure!(
                uneven.is_empty(),
                "batch {} cannot be split evenly over {} replicas, which the elastic range {range} \
                 may run with: every count in the range must divide the batch (each replica takes \
                 batch / replicas samples, so that the global batch stays the same when the world \
                 changes); make the batch a multiple of {}, or narrow the range",
                self.batch,
                uneven
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                (range.min..=range.max).fold(1, lcm)
            );
        }
        anyhow::ensure!(
            self.batch.is_multiple_of(self.topology.replicas),
            "batch {} cannot be split evenly over {} replicas: make it a multiple of {}",
            self.batch,
            self.topology.replicas,
            self.topology.replicas
        );
        anyhow::ensure!(
            !self.net.lrn_across_columns || self.topology.columns_per_worker == COLUMNS,
            "net.lrn_across_columns needs both columns in each worker (columns_per_worker = 2)"
        );
        for (field, layers) in [("reinit", &self.reinit), ("freeze", &self.freeze)] {
            for l in layers {
                anyhow::ensure!(
                    crate::model::params::LAYERS.contains(&l.as_str()),
                    "{field}: `{l}` is not a layer (the layers are {})",
                    crate::model::params::LAYERS.join(", ")
                );
            }
        }
        anyhow::ensure!(
            self.reinit.is_empty() || self.init.is_some(),
            "reinit ({}) draws layers afresh instead of taking them from --init: pass --init FILE, \
             or leave --reinit out",
            self.reinit.join(", ")
        );
        anyhow::ensure!(
            crate::model::params::LAYERS
                .iter()
                .any(|l| !self.freeze.iter().any(|f| f == l)),
            "freeze names every layer: nothing would train (leave at least fc8 out)"
        );
        Ok(())
    }

    /// A digest of what the configuration computes: workers of one job must agree on it, and a
    /// run resumes only under the same one. How long to run (`epochs`, `max_steps`) and how
    /// often to checkpoint are left out, so that a resumed run may be extended.
    pub fn hash(&self) -> String {
        // An elastic job's generations differ only in their replica count: they share one
        // hash, so that each resumes the others' checkpoints.
        let topology = self.topology.with_replicas(self.topology.max_replicas());
        let what = JobConfig {
            topology,
            epochs: 0,
            max_steps: None,
            checkpoint_every: 0,
            keep_checkpoints: 0,
            loader_threads: 0,
            augment_on: AugmentOn::Auto,
            ..self.clone()
        };
        let text = serde_json::to_string(&what).expect("a job serialises");
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(text.as_bytes()))
    }
}

fn lcm(a: usize, b: usize) -> usize {
    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }
    a / gcd(a, b) * b
}

/// A checkpoint a run continues from: its folder, the steps it holds and the learning rate the
/// schedule had reached.
#[derive(Clone, Debug, PartialEq)]
pub struct ResumeFrom {
    pub dir: PathBuf,
    pub step: u64,
    pub lr: f32,
}

/// Where this process sits in the job, and where its run starts.
pub struct Role<B: Backend> {
    pub replica: usize,
    pub columns: Box<dyn ColumnExchange<B>>,
    pub replicas: Option<Box<dyn BufReduce<B>>>,
    /// The run folder, for checkpoints (none: no checkpoints).
    pub run_dir: Option<PathBuf>,
    /// A checkpoint to continue from.
    pub resume: Option<ResumeFrom>,
    /// Processes of the job whose buffers come out of the same memory as this one's, itself
    /// included (CPU workers on one host): each checks its batch against its share.
    pub memory_sharers: usize,
}

/// The data of `job` as replica `replica` sees it.
/// `views_on_device`: whether the backend finishes the training views of prepared data.
pub fn open_data<B: Backend>(
    job: &JobConfig,
    replica: usize,
    views_on_device: bool,
) -> anyhow::Result<Box<dyn DataSource<B>>> {
    let split = (job.topology.replicas, replica);
    if job.data.join(METADATA_FILE).exists() {
        let val = job.val.as_ref().ok_or_else(|| {
            anyhow::anyhow!(
                "{} is a prepared dataset: pass --val DIR, a validation set prepared the same way (for ImageNet, \
                 `alexnet prepare` its val/ folder sorted into class folders)",
                job.data.display()
            )
        })?;
        let train = Dataset::open(&job.data)?;
        let mut val = Dataset::open(val)?;
        val.use_mean_of(&train)?;
        let (train, val) = (Arc::new(train), Arc::new(val));
        Ok(Box::new(PreparedData::new(
            train,
            val,
            &job.net,
            job.batch,
            split,
            job.seed,
            job.loader_threads,
            views_on_device,
        )?))
    } else {
        let (train, val) = read_idx_data(&job.data)?;
        let classes = super::sample::idx_class_names(&job.data, job.net.classes);
        Ok(Box::new(
            SampleData::new(&train, &val, &job.net, job.batch, split, job.seed, classes)?
                .from_folder(&job.data),
        ))
    }
}

/// The IDX training and validation sets in `dir`.
fn read_idx_data(
    dir: &Path,
) -> anyhow::Result<(crate::data::idx::ImageSet, crate::data::idx::ImageSet)> {
    read_fashion_mnist_dir(dir).with_context(|| {
        format!(
            "loading the image set in {} (expected IDX files or a prepared dataset)",
            dir.display()
        )
    })
}

/// Whether the job's data can be read and fits its network and batch: a launcher checks it
/// (with [`check_init`]) before any worker starts, so that what no restart can fix fails once,
/// at once, in its own words.
pub fn check_data(job: &JobConfig) -> anyhow::Result<()> {
    if job.data.join(METADATA_FILE).exists() {
        // Opening a prepared dataset reads its metadata and maps its shards: cheap.
        let data = open_data::<crate::backend::Cpu>(job, 0, false)?;
        drop(data);
    } else {
        let (train, val) = read_idx_data(&job.data)?;
        super::sample::SampleData::check(&train, &val, &job.net, job.batch, job.topology.replicas)?;
    }
    Ok(())
}

/// Whether `path` holds every parameter of `net` (unsplit, PyTorch-style names) in its shape,
/// but for the layers in `reinit`, which are drawn afresh.
pub fn check_init(
    path: &Path,
    net: &crate::model::NetConfig,
    reinit: &[String],
) -> anyhow::Result<()> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading --init {}", path.display()))?;
    let tensors = super::checkpoint::read_tensors(&bytes, path)?;
    let sides = net.validate()?;
    let layers = crate::model::params::LAYERS;
    for (layer, (w, b)) in layers
        .iter()
        .zip(crate::model::params::column_shapes(net, &sides))
    {
        if reinit.iter().any(|r| r == layer) {
            continue;
        }
        for (kind, mut want) in [("weight", w), ("bias", b)] {
            want[0] *= COLUMNS;
            let name = format!("{layer}.{kind}");
            let (shape, _) = tensors
                .get(&name)
                .or_else(|| tensors.get(&format!("param.{name}")))
                .with_context(|| {
                    format!(
                        "--init {}: no tensor {name} (an `alexnet export` file holds every layer)",
                        path.display()
                    )
                })?;
            anyhow::ensure!(
                *shape == want,
                "--init {}: parameter {name} has shape {shape:?}, this network expects {want:?} \
                 (the file was exported from another network: pass the same --net{}, or start \
                 without --init)",
                path.display(),
                if *layer == "fc8" {
                    "; or, to fine-tune on data with other classes, --reinit fc8 to draw fc8 \
                     afresh at this network's classes"
                } else {
                    ""
                }
            );
        }
    }
    Ok(())
}

/// Runs `job` in this process's role: builds its columns (fresh, imported or from a
/// checkpoint), trains them, and returns the network and the steps done in all.
pub fn run<B: Backend>(
    job: &JobConfig,
    backend: B,
    role: Role<B>,
    reporter: &mut dyn Reporter,
) -> anyhow::Result<(Network<B>, u64)> {
    job.validate()?;
    let on_device = job.augment_on.on_device(backend.finishes_views());
    let mut data = open_data::<B>(job, role.replica, on_device)?;
    // The run keeps what using it will need (one writer: replica 0's holder of column 0).
    if let Some(dir) = &role.run_dir {
        if role.replica == 0 && role.columns.local_columns().contains(&0) {
            data.input().write(dir)?;
        }
    }
    let mut net = Network::new(job.net.clone(), backend, role.columns, job.seed)?;
    if let Some(group) = role.replicas {
        net.join_replicas(group, role.replica, job.batch / job.topology.replicas)?;
    }
    let mut start = Start {
        step: 0,
        lr: job.sgd.lr,
    };
    match (&role.resume, &job.init) {
        (Some(ResumeFrom { dir, step, lr }), _) => {
            super::checkpoint::load_shards(&mut net, dir)?;
            start = Start {
                step: *step,
                lr: *lr,
            };
            tracing::info!(
                step,
                lr = crate::log_fields::single(*lr),
                checkpoint = %dir.display(),
                "resuming"
            );
        }
        (None, Some(init)) => {
            import_unsplit(&mut net, init, &job.reinit)?;
            tracing::info!(
                file = %init.display(),
                drawn_afresh = (!job.reinit.is_empty()).then(|| job.reinit.join(",")),
                "parameters imported"
            );
        }
        (None, None) => {}
    }
    if !job.freeze.is_empty() {
        net.freeze(&job.freeze)?;
        tracing::info!(layers = %job.freeze.join(","), "frozen: not trained");
    }
    let kept_choices = role.run_dir.as_ref().map(|dir| {
        let columns: String = net.columns.iter().map(|c| c.index.to_string()).collect();
        dir.join(format!(
            "cudnn-algorithms.replica{}.columns{columns}.json",
            role.replica
        ))
    });
    if let Some(path) = &kept_choices {
        adopt_kept_choices(&net.backend, path);
    }
    // A batch that does not fit this device fails now, naming the layer, before the loader
    // and the peers wait on the first step.
    net.share_memory(role.memory_sharers);
    net.reserve(job.batch / job.topology.replicas)?;
    if let Some(path) = &kept_choices {
        keep_choices(&net.backend, path);
    }
    tracing::info!(
        backend = net.backend.name(),
        columns = ?net.columns.iter().map(|c| c.index).collect::<Vec<_>>(),
        replica = role.replica,
        parameters = crate::model::params::parameter_count(&net.cfg, &net.sides),
        "network ready"
    );
    let opts = FitOptions {
        epochs: job.epochs,
        batch: job.batch,
        sgd: job.sgd,
        max_steps: job.max_steps,
        checkpoints: role.run_dir.clone().map(|run_dir| CheckpointPlan {
            run_dir,
            every_steps: Some(job.checkpoint_every).filter(|&n| n > 0),
            write: role.replica == 0,
        }),
    };
    let steps = fit(&mut net, &opts, start, data.as_mut(), reporter)?;
    // The evaluation's and a short last batch's convolutions were planned since.
    if let Some(path) = &kept_choices {
        keep_choices(&net.backend, path);
    }
    Ok((net, steps))
}

/// Hands the backend the algorithm choices (cuDNN's, timed) that the run folder keeps for
/// this process's part of the network (`path`), if any: a resumed or restarted process runs
/// the algorithms the first one timed, so that the run repeats bit for bit. Choices that
/// cannot be used (another GPU model or cuDNN version, a damaged file) are timed afresh, with
/// a warning.
fn adopt_kept_choices<B: Backend>(backend: &B, path: &Path) {
    let Ok(bytes) = std::fs::read(path) else {
        return;
    };
    let adopted = serde_json::from_slice::<serde_json::Value>(&bytes)
        .map_err(anyhow::Error::from)
        .and_then(|v| backend.adopt_timed_choices(&v));
    match adopted {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(path = %path.display(), convolutions = n, "using the kept cuDNN algorithms")
        }
        Err(e) => tracing::warn!(
            path = %path.display(),
            "the kept cuDNN algorithms cannot be used ({e:#}): timing them again"
        ),
    }
}

/// Writes the backend's timed choices to `path` in the run folder, unless it holds them
/// already (adopted from it).
fn keep_choices<B: Backend>(backend: &B, path: &Path) {
    let Some(choices) = backend.timed_choices() else {
        return;
    };
    let empty = choices["convolutions"]
        .as_array()
        .is_none_or(|c| c.is_empty());
    let kept = std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    if empty || kept.as_ref() == Some(&choices) {
        return;
    }
    let written = serde_json::to_vec_pretty(&choices)
        .map_err(anyhow::Error::from)
        .and_then(|bytes| crate::files::write_atomic(path, &bytes));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), "could not keep the timed cuDNN algorithms: {e:#}");
    }
}

/// Loads an unsplit parameter file (`alexnet export`, PyTorch-style names and shapes) into the
/// held columns, but for the layers in `reinit`, which keep their fresh values.
pub fn import_unsplit<B: Backend>(
    net: &mut Network<B>,
    path: &Path,
    reinit: &[String],
) -> anyhow::Result<()> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let tensors = super::checkpoint::read_tensors(&bytes, path)?;
    let fresh = |name: &str| {
        reinit
            .iter()
            .any(|r| name.split('.').next() == Some(r.as_str()))
    };
    net.load_unsplit_some(|name| {
        if fresh(name) {
            return Ok(None);
        }
        tensors
            .get(name)
            .or_else(|| tensors.get(&format!("param.{name}")))
            .cloned()
            .map(Some)
            .with_context(|| format!("{} has no tensor {name}", path.display()))
    })
    .with_context(|| format!("importing {}", path.display()))
}

/// Named tensors in order: (name, shape, values).
pub type NamedTensors = Vec<(String, Vec<usize>, Vec<f32>)>;

/// The unsplit parameters of a network holding both columns, by PyTorch-style name.
pub fn export_unsplit<B: Backend>(net: &Network<B>) -> anyhow::Result<NamedTensors> {
    anyhow::ensure!(net.columns.len() == COLUMNS, "exporting needs both columns");
    let mut out = Vec::new();
    for (i, p) in net.columns[0].params.iter().enumerate() {
        let mut shape = p.shape.clone();
        shape[0] *= COLUMNS;
        let mut values = Vec::with_capacity(p.len() * COLUMNS);
        for col in &net.columns {
            values.extend(net.backend.download(&col.params[i].value));
        }
        out.push((p.name.clone(), shape, values));
    }
    Ok(out)
}

/// Writes each held column's parameters to `dir/column{c}.safetensors` (the layer's rows of
/// that column, under the layer's name), atomically.
pub fn save_columns<B: Backend>(net: &Network<B>, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut written = Vec::new();
    for col in &net.columns {
        let values: Vec<(String, Vec<usize>, Vec<f32>)> = col
            .params
            .iter()
            .map(|p| {
                (
                    p.name.clone(),
                    p.shape.clone(),
                    net.backend.download(&p.value),
                )
            })
            .collect();
        let bytes = super::checkpoint::serialize(&values)?;
        let path = dir.join(format!("column{}.safetensors", col.index));
        crate::files::write_atomic(&path, &bytes)?;
        written.push(path);
    }
    Ok(written)
}

/// Reads a file written by [`save_columns`]: (name, shape, values), by name.
pub fn load_column_file(path: &Path) -> anyhow::Result<NamedTensors> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out: Vec<_> = super::checkpoint::read_tensors(&bytes, path)?
        .into_iter()
        .map(|(name, (shape, values))| (name, shape, values))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_paper_job_file_is_the_default_recipe() {
        let text = include_str!("../../jobs/paper.toml");
        let job: JobConfig = toml::from_str(text).unwrap();
        assert_eq!(job, JobConfig::default());
        assert_eq!((job.batch, job.epochs, job.sgd.lr), (128, 90, 0.01));
    }

    #[test]
    fn a_mistyped_field_is_refused_by_name() {
        let e = toml::from_str::<JobConfig>("epoch = 3\n").unwrap_err();
        assert!(e.to_string().contains("epoch"), "{e}");
        let e = toml::from_str::<JobConfig>("[sgd]\nrl = 0.1\n").unwrap_err();
        assert!(e.to_string().contains("rl"), "{e}");
    }

    #[test]
    fn how_long_to_run_is_not_part_of_the_hash() {
        let a = JobConfig::default();
        let b = JobConfig {
            epochs: 3,
            max_steps: Some(7),
            ..a.clone()
        };
        assert_eq!(a.hash(), b.hash());
        let c = JobConfig {
            seed: 2,
            ..a.clone()
        };
        assert_ne!(a.hash(), c.hash());
    }
}
