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
                descriptions: train.meta.class_descriptions.clone(),
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

/// How often each class was taken for each: `counts[true * classes + predicted]` (the
/// top-1 class; rows are the true classes, columns the predicted ones).
#[derive(Clone, Debug, PartialEq)]
pub struct Confusion {
    pub names: Vec<String>,
    pub counts: Vec<u64>,
}

impl Confusion {
    /// An empty matrix over the network's outputs, named by `names` (an output past them, the
    /// one fc8 adds to an odd class count, by its index).
    pub fn new(outputs: usize, names: &[String]) -> Confusion {
        Confusion {
            names: (0..outputs)
                .map(|i| names.get(i).cloned().unwrap_or_else(|| i.to_string()))
                .collect(),
            counts: vec![0; outputs * outputs],
        }
    }

    pub fn classes(&self) -> usize {
        self.names.len()
    }

    pub fn add(&mut self, label: u32, predicted: usize) {
        let n = self.classes();
        self.counts[label as usize * n + predicted] += 1;
    }

    /// Images of class `c`, and those of them taken for `c`.
    fn row(&self, c: usize) -> (u64, u64) {
        let n = self.classes();
        let row = &self.counts[c * n..(c + 1) * n];
        (row.iter().sum(), row[c])
    }

    /// Classes that have images (an unused output or a class absent from the data has none).
    fn shown(&self) -> Vec<usize> {
        (0..self.classes()).filter(|&c| self.row(c).0 > 0).collect()
    }

    /// `confusion.csv`: a header of the predicted classes, then one row per true class.
    pub fn to_csv(&self) -> String {
        let quote = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        let n = self.classes();
        let mut out = String::from("true \\ predicted");
        for name in &self.names {
            out.push(',');
            out.push_str(&quote(name));
        }
        out.push('\n');
        for (c, name) in self.names.iter().enumerate() {
            out.push_str(&quote(name));
            for v in &self.counts[c * n..(c + 1) * n] {
                out.push_str(&format!(",{v}"));
            }
            out.push('\n');
        }
        out
    }

    /// The matrix as a table (rows: true classes with images; columns: predicted classes,
    /// numbered), each row's share right, then the classes most often taken for others; a
    /// matrix wider than 30 classes is left to the CSV file.
    pub fn render(&self) -> String {
        let n = self.classes();
        let rows = self.shown();
        let mut out = String::new();
        let name_width = rows
            .iter()
            .map(|&c| self.names[c].chars().count())
            .max()
            .unwrap_or(4)
            .clamp(12, 32);
        if n <= 30 {
            let cell = (self.counts.iter().max().map_or(1, |m| m.to_string().len()))
                .max(n.to_string().len())
                .max(2);
            let head = format!("{:<w$}", "true \\ predicted", w = name_width + 4);
            out.push_str(&head);
            for p in 0..n {
                out.push_str(&format!(" {p:>cell$}"));
            }
            out.push_str("   correct\n");
            for &c in &rows {
                let name: String = self.names[c].chars().take(name_width).collect();
                out.push_str(&format!("{c:>3} {name:<name_width$}"));
                for p in 0..n {
                    out.push_str(&format!(" {:>cell$}", self.counts[c * n + p]));
                }
                let (all, right) = self.row(c);
                out.push_str(&format!("   {right}/{all}\n"));
            }
        } else {
            out.push_str(&format!(
                "{n} classes: too many to print as a table (the whole matrix is in the CSV file)\n"
            ));
            for &c in &rows {
                let (all, right) = self.row(c);
                out.push_str(&format!(
                    "{c:>4} {:<name_width$}  {right}/{all}\n",
                    self.names[c]
                ));
            }
        }
        let mut pairs: Vec<(u64, usize, usize)> = (0..n)
            .flat_map(|t| (0..n).map(move |p| (t, p)))
            .filter(|(t, p)| t != p)
            .map(|(t, p)| (self.counts[t * n + p], t, p))
            .filter(|(v, _, _)| *v > 0)
            .collect();
        pairs.sort_by(|a, b| b.0.cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
        if !pairs.is_empty() {
            out.push_str("most confused (true -> predicted):\n");
            for (v, t, p) in pairs.into_iter().take(5) {
                out.push_str(&format!("  {} -> {}: {v}\n", self.names[t], self.names[p]));
            }
        }
        out
    }
}

/// What `eval` measured: the error counts and the confusion matrix.
pub struct Evaluation {
    pub hits: Hits,
    pub confusion: Confusion,
}

/// Top-1/top-5 error of the run on `data` (default: the run's validation data): centre crops,
/// or with `ten_crop` the softmax averaged over the paper's ten patches (prepared data only).
pub fn evaluate(
    run: &mut TrainedRun,
    data: Option<&Path>,
    ten_crop: bool,
    batch: usize,
) -> anyhow::Result<Evaluation> {
    let input = run_input(run)?;
    let mut confusion = Confusion::new(run.job.net.classes, &input.form.display_names());
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
                // The loss of the views' averaged probabilities.
                loss_sum: probs
                    .chunks(classes)
                    .zip(&b.labels)
                    .map(|(p, &l)| -(p[l as usize] as f64).max(f64::MIN_POSITIVE).ln())
                    .sum(),
            };
            let top = crate::backend::cpu::top_k(n, classes, &probs, 1);
            for (&label, t) in b.labels.iter().zip(top) {
                confusion.add(label, t[0] as usize);
            }
        }
        Ok(Evaluation { hits, confusion })
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
        let hits = DataSource::<Cpu>::evaluate(&mut data, &mut run.net)?;
        for (label, predicted) in data.val_predictions(&mut run.net)? {
            confusion.add(label, predicted);
        }
        Ok(Evaluation { hits, confusion })
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
    let names = input.form.display_names();
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
    fn the_confusion_matrix_counts_rows_by_truth_and_names_its_classes() {
        let mut m = Confusion::new(3, &["cat".into(), "dog, big".into()]);
        for (t, p) in [(0, 0), (0, 1), (1, 1), (1, 1), (0, 0)] {
            m.add(t, p);
        }
        assert_eq!(m.counts, [2, 1, 0, 0, 2, 0, 0, 0, 0]);
        assert_eq!(
            m.to_csv(),
            "true \\ predicted,cat,\"dog, big\",2\ncat,2,1,0\n\"dog, big\",0,2,0\n2,0,0,0\n"
        );
        let text = m.render();
        assert!(text.contains("2/3") && text.contains("2/2"), "{text}");
        assert!(text.contains("cat -> dog, big: 1"), "{text}");
        assert!(
            !text.lines().any(|l| l.starts_with("  2 ")),
            "no row for a class without images: {text}"
        );
    }

    #[test]
    fn ten_view_softmax_is_averaged_per_sample() {
        // Two samples, two views each, two classes.
        let logits = [0.0, 0.0, 10.0, -10.0, -10.0, 10.0, -10.0, 10.0];
        let p = average_softmax(&logits, 2, 2, 2);
        assert!((p[0] - 0.75).abs() < 1e-4 && (p[1] - 0.25).abs() < 1e-4);
        assert!(p[3] > 0.999);
    }
}
