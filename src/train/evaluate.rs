//! A trained run put to use: `eval` (top-1/top-5 error, centre crop or the paper's ten
//! patches), `predict` (top-5 classes of image files) and `export` (one unsplit safetensors
//! file with PyTorch-style names and shapes).

use super::checkpoint::{self, Manifest};
use super::fit::{DataSource, Hits};
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
        job,
        manifest,
        checkpoint: dir,
        net,
    })
}

fn is_prepared(dir: &Path) -> bool {
    dir.join(METADATA_FILE).exists()
}

/// Top-1/top-5 error of the run on `data` (default: the run's validation data): centre crops,
/// or with `ten_crop` the softmax averaged over the paper's ten patches (prepared data only).
pub fn evaluate(
    run: &mut TrainedRun,
    data: Option<&Path>,
    ten_crop: bool,
    batch: usize,
) -> anyhow::Result<Hits> {
    let job = &run.job;
    let prepared_run = is_prepared(&job.data);
    let target = match data {
        Some(d) => d.to_path_buf(),
        None if prepared_run => job
            .val
            .clone()
            .context("the run has no validation set: pass --data")?,
        None => job.data.clone(),
    };
    if is_prepared(&target) {
        anyhow::ensure!(
            prepared_run,
            "the run trained on IDX images; {} is a prepared dataset",
            target.display()
        );
        let train = Dataset::open(&job.data)?;
        let mut set = Dataset::open(&target)?;
        set.use_mean_of(&train)?;
        let set = Arc::new(set);
        if set.meta.classes != train.meta.classes {
            bail!(
                "the classes of {} differ from the run's ({} vs {} classes, or another order): evaluate on data prepared from the same class folders",
                target.display(),
                set.meta.classes.len(),
                train.meta.classes.len()
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
        let (train, _) = read_fashion_mnist_dir(&job.data)?;
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
    let job = run.job.clone();
    let classes = job.net.classes;
    let side = job.net.input_size;
    // Per image: its input, or why it has none (a bad file costs only itself).
    type Inputs = Vec<anyhow::Result<Vec<f32>>>;
    let (inputs, names): (Inputs, Vec<String>) = if is_prepared(&job.data) {
        let train = Dataset::open(&job.data)?;
        let input = |path: &PathBuf| -> anyhow::Result<Vec<f32>> {
            let img = crate::data::prepare::decode_square(path, train.side())?;
            let mut x = vec![0.0f32; 3 * side * side];
            crate::data::augment::render(
                &img,
                &train.mean,
                train.side(),
                crate::data::augment::centre(train.side(), side),
                [0.0; 3],
                side,
                &mut x,
            );
            Ok(x)
        };
        (
            images.iter().map(input).collect(),
            train.meta.classes.clone(),
        )
    } else {
        let (train, val) = read_fashion_mnist_dir(&job.data)?;
        let names = idx_class_names(&job.data, classes);
        let data = SampleData::new(
            &train,
            &val,
            &job.net,
            job.batch.min(train.len()),
            (1, 0),
            job.seed,
            names.clone(),
        )?;
        let input = |path: &PathBuf| -> anyhow::Result<Vec<f32>> {
            let img = image::ImageReader::open(path)
                .with_context(|| format!("opening {}", path.display()))?
                .with_guessed_format()?
                .decode()
                .with_context(|| format!("decoding {}", path.display()))?;
            // The run's images: `in_channels` planes at the IDX files' own size.
            let (h, w) = (train.height, train.width);
            let pixels: Vec<u8> = if train.channels == 1 {
                img.resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle)
                    .into_luma8()
                    .into_raw()
            } else {
                let rgb = img
                    .resize_exact(w as u32, h as u32, image::imageops::FilterType::Triangle)
                    .into_rgb8();
                let mut planar = vec![0u8; 3 * h * w];
                for (i, p) in rgb.pixels().enumerate() {
                    for c in 0..3 {
                        planar[c * h * w + i] = p.0[c];
                    }
                }
                planar
            };
            Ok(data.input_for(&pixels, train.channels, h, w))
        };
        (images.iter().map(input).collect(), names)
    };
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
