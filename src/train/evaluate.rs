//! A trained run put to use: `eval` (top-1/top-5 error, centre crop or the paper's ten
//! patches), `predict` (top-5 classes of image files) and `export` (one unsplit safetensors
//! file with PyTorch-style names and shapes).

use super::checkpoint::{self, Manifest};
use super::fit::{DataSource, Hits};
use super::input_form::{ImageForm, InputForm, RunInput};
use super::job::{self, JobConfig};
use super::sample::{idx_class_names, SampleData};
use crate::backend::{Backend, Cpu};
use crate::comm::LocalExchange;
use crate::data::idx::read_fashion_mnist_dir;
use crate::data::loader::{EpochLoader, LoaderConfig, View};
use crate::data::shards::{Dataset, METADATA_FILE};
use crate::model::{Mode, Network};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A run's job, its newest usable checkpoint, and the network loaded from it (both columns).
pub struct TrainedRun {
    pub run_dir: PathBuf,
    pub job: JobConfig,
    pub manifest: Manifest,
    pub checkpoint: PathBuf,
    pub net: Network<Cpu>,
}

pub fn load_run(run_dir: &Path, backend: Cpu) -> anyhow::Result<TrainedRun> {
    let path = run_dir.join("job.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} is not a run folder (no job.json)", run_dir.display()))?;
    let job: JobConfig =
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    let (dir, manifest) = checkpoint::latest(run_dir, Some(&job.hash()))?
        .with_context(|| format!("{} has no complete checkpoint yet", run_dir.display()))?;
    let mut net = Network::new(
        job.net.clone(),
        backend,
        Box::new(LocalExchange::default()),
        job.seed,
    )?;
    checkpoint::load_shards(&mut net, &dir)?;
    tracing::info!(step = manifest.step, checkpoint = %dir.display(), "run loaded");
    Ok(TrainedRun {
        run_dir: run_dir.to_path_buf(),
        job,
        manifest,
        checkpoint: dir,
        net,
    })
}

fn is_prepared(dir: &Path) -> bool {
    dir.join(METADATA_FILE).exists()
}

/// The run's training data, where its dataset itself is needed: named as gone when it has
/// moved.
fn training_data(job: &JobConfig, what: &str) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        job.data.exists(),
        "the run's dataset at {} is gone (moved or deleted): {what}",
        job.data.display()
    );
    Ok(job.data.clone())
}

/// How the run takes an image: from its run folder, or, for a run trained before the run
/// folder kept it, from its training data.
fn run_input(run: &TrainedRun) -> anyhow::Result<RunInput> {
    if let Some(input) = RunInput::read(&run.run_dir)? {
        return Ok(input);
    }
    let job = &run.job;
    let data = training_data(
        job,
        "this run was trained before its folder kept the input's form (input.json), so its \
         mean image and class names come from the dataset: move it back to use the run",
    )?;
    if is_prepared(&data) {
        let train = Dataset::open(&data)?;
        Ok(RunInput {
            form: InputForm {
                classes: train.meta.classes.clone(),
                image: ImageForm::Prepared { side: train.side() },
                data,
            },
            mean: train.mean.to_vec(),
        })
    } else {
        let (train, val) = read_fashion_mnist_dir(&data)?;
        let names = idx_class_names(&data, job.net.classes);
        let sample = SampleData::new(
            &train,
            &val,
            &job.net,
            job.batch.min(train.len()),
            (1, 0),
            job.seed,
            names,
        )?;
        Ok(DataSource::<Cpu>::input(&sample.from_folder(&data)))
    }
}

/// Top-1/top-5 error of the run on `data` (default: the run's validation data): centre crops,
/// or with `ten_crop` the softmax averaged over the paper's ten patches (prepared data only).
pub fn evaluate(
    run: &mut TrainedRun,
    data: Option<&Path>,
    ten_crop: bool,
    batch: usize,
) -> anyhow::Result<Hits> {
    let input = run_input(run)?;
    let job = &run.job;
    let prepared_run = matches!(input.form.image, ImageForm::Prepared { .. });
    let target = match data {
        Some(d) => d.to_path_buf(),
        None if prepared_run => job
            .val
            .clone()
            .context("the run has no validation set: pass --data")?,
        None => training_data(
            job,
            "its validation images are its t10k files: pass --data DIR (IDX files)",
        )?,
    };
    anyhow::ensure!(
        target.exists(),
        "the run's validation data at {} is gone (moved or deleted): pass --data DIR",
        target.display()
    );
    if is_prepared(&target) {
        anyhow::ensure!(
            prepared_run,
            "the run trained on IDX images; {} is a prepared dataset",
            target.display()
        );
        let mut set = Dataset::open(&target)?;
        let ImageForm::Prepared { side } = input.form.image else {
            unreachable!("a prepared run")
        };
        anyhow::ensure!(
            set.side() == side,
            "{} holds {}-pixel images, the run trained on {side}-pixel ones: evaluate on data \
             prepared at the training set's size",
            target.display(),
            set.side()
        );
        // The training set's mean, as in training (the run keeps it).
        set.mean = input.mean.clone().into();
        let set = Arc::new(set);
        if set.meta.classes != input.form.classes {
            bail!(
                "the classes of {} differ from the run's ({} vs {} classes, or another order): evaluate on data prepared from the same class folders",
                target.display(),
                set.meta.classes.len(),
                input.form.classes.len()
            );
        }
        let cfg = LoaderConfig {
            global_batch: batch,
            replicas: 1,
            replica: 0,
            seed: job.seed,
            view: if ten_crop {
                View::TenPatches
            } else {
                View::Centre
            },
            crop: job.net.input_size,
            threads: job.loader_threads.max(1),
            prefetch: 2,
            bytes: job.augment_on.on_device(run.net.backend.finishes_views()),
        };
        let classes = job.net.classes;
        let mut hits = Hits::default();
        let mut uploader = super::fit::BatchUploader::default();
        for b in EpochLoader::new(set, cfg, 0)? {
            let b = b?;
            let n = b.labels.len();
            let views = if ten_crop { 10 } else { 1 };
            let x = uploader.upload(&run.net.backend, &b.pixels)?;
            run.net.forward(&x, n * views, Mode::Eval)?;
            let logits = run
                .net
                .backend
                .download(run.net.logits().expect("forward ran"));
            let probs = average_softmax(&logits, n, views, classes);
            let (t1, t5) = super::count_correct(&probs, classes, &b.labels);
            hits += Hits {
                top1: t1 as u64,
                top5: t5 as u64,
                samples: n as u64,
            };
        }
        Ok(hits)
    } else {
        anyhow::ensure!(
            !ten_crop,
            "--ten-crop needs prepared data (256x256 images to take patches from); IDX images are resized whole"
        );
        anyhow::ensure!(
            !prepared_run,
            "the run trained on prepared data; {} holds IDX files",
            target.display()
        );
        let (train, _) = read_fashion_mnist_dir(&training_data(
            job,
            "evaluating IDX images takes the training images' mean from it",
        )?)?;
        let (_, other) = read_fashion_mnist_dir(&target)?;
        let max_label = other.labels.iter().copied().max().unwrap_or(0) as usize;
        anyhow::ensure!(
            max_label < job.net.classes,
            "{} has labels up to {max_label}; the run's network has {} classes",
            target.display(),
            job.net.classes
        );
        let classes = idx_class_names(&job.data, job.net.classes);
        let mut data = SampleData::new(&train, &other, &job.net, batch, (1, 0), job.seed, classes)?;
        DataSource::<Cpu>::evaluate(&mut data, &mut run.net)
    }
}

/// Per sample, the softmax averaged over its `views` consecutive rows of logits.
fn average_softmax(logits: &[f32], samples: usize, views: usize, classes: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; samples * classes];
    for (i, row) in logits.chunks(classes).enumerate().take(samples * views) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = row.iter().map(|v| (v - max).exp()).sum();
        let dst = &mut out[(i / views) * classes..][..classes];
        for (d, v) in dst.iter_mut().zip(row) {
            *d += (v - max).exp() / sum / views as f32;
        }
    }
    out
}

/// The top `k` classes of each image: (class index, class name, probability).
/// The classes most likely for one image, best first: (index, name, probability).
pub type TopClasses = Vec<(usize, String, f32)>;

pub fn predict(
    run: &mut TrainedRun,
    images: &[PathBuf],
    k: usize,
) -> anyhow::Result<Vec<anyhow::Result<TopClasses>>> {
    let input = run_input(run)?;
    let classes = run.job.net.classes;
    let side = run.job.net.input_size;
    // Per image: its input, or why it has none (a bad file costs only itself).
    let inputs: Vec<anyhow::Result<Vec<f32>>> =
        images.iter().map(|p| input.input_for(p, side)).collect();
    let names = input.form.classes;
    let mut out = Vec::new();
    for x in inputs {
        let x = match x {
            Ok(x) => x,
            Err(e) => {
                out.push(Err(e));
                continue;
            }
        };
        let buf = run.net.backend.upload(&x);
        run.net.forward(&buf, 1, Mode::Eval)?;
        let logits = run
            .net
            .backend
            .download(run.net.logits().expect("forward ran"));
        let probs = average_softmax(&logits, 1, 1, classes);
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
        out.push(Ok(order
            .into_iter()
            .take(k.min(classes))
            .map(|c| {
                let name = names.get(c).cloned().unwrap_or_else(|| c.to_string());
                (c, name, probs[c])
            })
            .collect()));
    }
    Ok(out)
}

/// Writes the run's parameters as one safetensors file, unsplit, with PyTorch's names and
/// shapes (`conv1.weight` `[96, 3, 11, 11]`, grouped layers `[out, in / 2, k, k]`, ...).
pub fn export(run: &TrainedRun, out: &Path) -> anyhow::Result<()> {
    let tensors = job::export_unsplit(&run.net)?;
    let bytes = checkpoint::serialize(&tensors)?;
    crate::files::write_atomic(out, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ten_view_softmax_is_averaged_per_sample() {
        // Two samples, two views each, two classes.
        let logits = [0.0, 0.0, 10.0, -10.0, -10.0, 10.0, -10.0, 10.0];
        let p = average_softmax(&logits, 2, 2, 2);
        assert!((p[0] - 0.75).abs() < 1e-4 && (p[1] - 0.25).abs() < 1e-4);
        assert!(p[3] > 0.999);
    }
}
