//! `alexnet prepare`: an ImageFolder tree (`root/<class>/<image>`) into the paper's
//! preprocessed form (shorter side to 256, central 256x256 crop, RGB), in shards.
//!
//! Atomic and resumable: the shards are made one after another, each written to a temporary
//! name, flushed to disk and renamed, with a small record of its statistics beside it; the
//! metadata file that marks the dataset complete is written last, the same way. An interrupted
//! run leaves no `dataset.json`, and a rerun keeps the finished shards and makes the rest (the
//! file list is sorted, so every shard holds the same files each time).

use super::shards::{
    shard_name, xxh3_hex, Metadata, ShardInfo, Skipped, SplitRecord, FORMAT, MEAN_FILE,
    METADATA_FILE, SHARD_MAGIC,
};
use crate::files::{sync_dir, write_atomic, write_atomic_with};
use anyhow::{bail, ensure, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct PrepareOptions {
    /// Side of the stored images (the paper: 256).
    pub side: usize,
    /// Images per shard (1,024 at 256x256 is 201 MB).
    pub shard_images: usize,
    /// Fail on the first file that is not a readable image instead of skipping it.
    pub strict: bool,
    /// Draw a progress bar on stderr.
    pub progress: bool,
    /// Split the input into `train/` and `val/` sets under the output.
    pub val_split: Option<ValSplit>,
    /// A label file for a flat folder of images (`--labels`): ILSVRC's
    /// `LOC_val_solution.csv` or `file,class` lines.
    pub labels: Option<PathBuf>,
    /// Human names of the classes (`--class-names`): `LOC_synset_mapping.txt` lines, a class
    /// then its words.
    pub class_names: Option<PathBuf>,
}

/// How `prepare --val-fraction` splits one tree: see [`in_val`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ValSplit {
    /// The share of each class's images that goes to `val/`, in (0, 1).
    pub fraction: f64,
    pub seed: u64,
}

/// Whether the image at `relative` (its path under the input, `/`-separated) goes to the
/// validation set: a function of that path and the seed alone, so a split stays as it was
/// when images are added, and of no other image, so every class is split at the same rate.
pub fn in_val(relative: &str, split: ValSplit) -> bool {
    split_draw(relative, split.seed) < split.fraction
}

fn split_draw(relative: &str, seed: u64) -> f64 {
    crate::rng::uniform(crate::rng::key(seed, &format!("val-split/{relative}")), 0) as f64
}

/// `path` under `input`, with `/` between its parts on every system.
fn relative_name(input: &Path, path: &Path) -> String {
    let rel = path.strip_prefix(input).unwrap_or(path);
    rel.components()
        .map(|c| c.as_os_str().to_string_lossy())
        .collect::<Vec<_>>()
        .join("/")
}

impl Default for PrepareOptions {
    fn default() -> Self {
        PrepareOptions {
            side: 256,
            shard_images: 1024,
            strict: false,
            progress: true,
            val_split: None,
            labels: None,
            class_names: None,
        }
    }
}

/// What a run of `prepare` did.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub images: usize,
    pub classes: usize,
    pub shards: usize,
    /// Shards found complete from an earlier run and kept.
    pub shards_reused: usize,
    pub skipped: Vec<Skipped>,
    pub seconds: f64,
    /// Images decoded and written by this run, per second.
    pub images_per_s: f64,
    /// The validation part, where the input was split (`images` and the rest above are then
    /// the training part's).
    pub val: Option<Box<Summary>>,
}

/// Statistics of one shard, kept beside it until the dataset is complete.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ShardRecord {
    info: ShardInfo,
    class_counts: Vec<usize>,
    /// Sums over all pixels of r, g, b, rr, rg, rb, gg, gb, bb (exact integers).
    moments: [u64; 9],
    skipped: Vec<Skipped>,
}

const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Every image file (by its extension) under `dir`, recursively, sorted.
pub fn images_under(dir: &Path) -> Result<Vec<PathBuf>> {
    Ok(files_under(dir)?
        .into_iter()
        .filter(|p| has_image_extension(p))
        .collect())
}

/// A digest of what `prepare` reads: each image file's path under `input`, its label, size
/// and modification time, and the side it is stored at.
fn input_fingerprint(input: &Path, files: &[(PathBuf, u32)], side: usize) -> Result<String> {
    let mut listing = format!("side {side}\n");
    for (path, label) in files {
        let meta =
            std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
        let modified = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let relative = path.strip_prefix(input).unwrap_or(path);
        listing.push_str(&format!(
            "{}\t{label}\t{}\t{modified}\n",
            relative.display(),
            meta.len()
        ));
    }
    Ok(xxh3_hex(listing.as_bytes()))
}

/// The classes (sorted folder names) and every image file with its label; files that are not
/// images by their extension are returned apart.
/// Class names, image files with their labels, and the files that are not images.
type InputListing = (Vec<String>, Vec<(PathBuf, u32)>, Vec<Skipped>);

fn list_input(input: &Path) -> Result<InputListing> {
    ensure!(
        input.is_dir(),
        "--input {} is not a folder",
        input.display()
    );
    let mut classes: Vec<(String, PathBuf)> = std::fs::read_dir(input)
        .with_context(|| format!("listing {}", input.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect();
    classes.sort();
    ensure!(
        !classes.is_empty(),
        "{} holds no class folders: expected {}/<class>/<image> (an ImageFolder tree, like ImageNet's train/)",
        input.display(),
        input.display()
    );
    let mut files = Vec::new();
    let mut not_images = Vec::new();
    for (label, (name, dir)) in classes.iter().enumerate() {
        let mut found = 0;
        for path in files_under(dir)? {
            if has_image_extension(&path) {
                files.push((path, label as u32));
                found += 1;
            } else {
                not_images.push(Skipped {
                    path: path.display().to_string(),
                    reason: "not an image file (extension)".into(),
                });
            }
        }
        ensure!(
            found > 0,
            "class folder {} holds no images (.jpg, .jpeg, .png): remove it or fill it; every class needs images",
            dir.display()
        );
        let _ = name;
    }
    Ok((
        classes.into_iter().map(|c| c.0).collect(),
        files,
        not_images,
    ))
}

/// The input's classes, labelled images, skipped files, and the classes' descriptions (empty
/// without `--class-names`): from class folders, or from a label file for a flat folder.
type FullListing = (Vec<String>, Vec<(PathBuf, u32)>, Vec<Skipped>, Vec<String>);

fn list_any(input: &Path, opts: &PrepareOptions) -> Result<FullListing> {
    let names = opts
        .class_names
        .as_deref()
        .map(super::labels::read_class_names)
        .transpose()?;
    let (classes, files, not_images) = match &opts.labels {
        None => list_input(input)?,
        Some(labels) => list_labelled(
            input,
            labels,
            names.as_deref().zip(opts.class_names.as_deref()),
        )?,
    };
    let descriptions = match &names {
        None => Vec::new(),
        Some(names) => {
            let by_class: std::collections::HashMap<&str, &str> = names
                .iter()
                .map(|(c, d)| (c.as_str(), d.as_str()))
                .collect();
            let unnamed: Vec<&str> = (classes.iter())
                .filter(|c| !by_class.contains_key(c.as_str()))
                .map(String::as_str)
                .collect();
            if !unnamed.is_empty() {
                tracing::warn!(
                    classes = unnamed.len(),
                    "--class-names gives no name for {}: they are shown by their folder names",
                    unnamed
                        .iter()
                        .take(10)
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            (classes.iter())
                .map(|c| by_class.get(c.as_str()).unwrap_or(&"").to_string())
                .collect()
        }
    };
    Ok((classes, files, not_images, descriptions))
}

/// A flat folder of images and a label file for them (see [`super::labels`]). Images the file
/// does not name are skipped, and named as skipped.
fn list_labelled(
    input: &Path,
    labels: &Path,
    names: Option<(&[(String, String)], &Path)>,
) -> Result<InputListing> {
    ensure!(
        input.is_dir(),
        "--input {} is not a folder",
        input.display()
    );
    let (images, others): (Vec<PathBuf>, Vec<PathBuf>) = files_under(input)?
        .into_iter()
        .partition(|p| has_image_extension(p));
    let listed = super::labels::read_label_file(labels, input, &images)?;
    let classes = super::labels::classes_of(&listed.entries, labels, names)?;
    let index: std::collections::HashMap<&str, u32> = (classes.iter().enumerate())
        .map(|(i, c)| (c.as_str(), i as u32))
        .collect();
    let mut files: Vec<(PathBuf, u32)> = (listed.entries.iter())
        .map(|(p, c)| (p.clone(), index[c.as_str()]))
        .collect();
    files.sort();
    let labelled: std::collections::HashSet<&PathBuf> = files.iter().map(|(p, _)| p).collect();
    let mut skipped: Vec<Skipped> = (others.iter())
        .map(|p| Skipped {
            path: p.display().to_string(),
            reason: "not an image file (extension)".into(),
        })
        .collect();
    skipped.extend(
        images
            .iter()
            .filter(|p| !labelled.contains(p))
            .map(|p| Skipped {
                path: p.display().to_string(),
                reason: format!("not in --labels {}", labels.display()),
            }),
    );
    Ok((classes, files, skipped))
}

/// Decodes an image file into planar RGB `[3, side, side]`: the central square of the image
/// (the shorter side's length) resized to `side` x `side`, which is the shorter side rescaled
/// to `side` and the central crop taken.
pub fn decode_square(path: &Path, side: usize) -> Result<Vec<u8>> {
    use fast_image_resize as fr;
    let img = image::ImageReader::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("reading {}", path.display()))?
        .decode()
        .with_context(|| format!("decoding {}", path.display()))?;
    let rgb = img.into_rgb8();
    let (w, h) = rgb.dimensions();
    ensure!(w > 0 && h > 0, "{} has no pixels", path.display());
    let src = fr::images::Image::from_vec_u8(w, h, rgb.into_raw(), fr::PixelType::U8x3)?;
    let mut dst = fr::images::Image::new(side as u32, side as u32, fr::PixelType::U8x3);
    let s = w.min(h) as f64;
    let options = fr::ResizeOptions::new()
        .resize_alg(fr::ResizeAlg::Convolution(fr::FilterType::Bilinear))
        .crop((w as f64 - s) / 2.0, (h as f64 - s) / 2.0, s, s);
    fr::Resizer::new().resize(&src, &mut dst, &options)?;
    let interleaved = dst.buffer();
    let plane = side * side;
    let mut planar = vec![0u8; 3 * plane];
    for (i, px) in interleaved.chunks_exact(3).enumerate() {
        planar[i] = px[0];
        planar[plane + i] = px[1];
        planar[2 * plane + i] = px[2];
    }
    Ok(planar)
}

/// Adds an image's per-position values and RGB moments.
#[multiversion::multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw+avx2+fma",
    "x86_64+avx2+fma"
))]
fn accumulate(planar: &[u8], sums: &mut [u64], moments: &mut [u64; 9]) {
    let plane = planar.len() / 3;
    for (s, &v) in sums.iter_mut().zip(planar) {
        *s += v as u64;
    }
    let (r, rest) = planar.split_at(plane);
    let (g, b) = rest.split_at(plane);
    // 4,096 products of bytes fit a u32 (4096 * 255 * 255 < 2^32): sum them in u32 lanes, which
    // vectorise, and carry each chunk's sums into the u64 totals.
    for ((r, g), b) in r.chunks(4096).zip(g.chunks(4096)).zip(b.chunks(4096)) {
        let mut m = [0u32; 9];
        for i in 0..r.len() {
            let (r, g, b) = (r[i] as u32, g[i] as u32, b[i] as u32);
            m[0] += r;
            m[1] += g;
            m[2] += b;
            m[3] += r * r;
            m[4] += r * g;
            m[5] += r * b;
            m[6] += g * g;
            m[7] += g * b;
            m[8] += b * b;
        }
        for (a, b) in moments.iter_mut().zip(m) {
            *a += b as u64;
        }
    }
}

fn sums_name(index: usize) -> String {
    format!("shard-{index:05}.sums")
}

fn record_name(index: usize) -> String {
    format!("shard-{index:05}.json")
}

/// A shard finished by an earlier run, if its record and its files agree.
fn finished_shard(output: &Path, index: usize, plane3: usize) -> Option<(ShardRecord, Vec<u64>)> {
    let record: ShardRecord =
        serde_json::from_slice(&std::fs::read(output.join(record_name(index))).ok()?).ok()?;
    let len = std::fs::metadata(output.join(&record.info.file))
        .ok()?
        .len();
    let sums = std::fs::read(output.join(sums_name(index))).ok()?;
    if len != record.info.bytes || sums.len() != 8 * plane3 {
        return None;
    }
    let sums = sums
        .chunks_exact(8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()))
        .collect();
    Some((record, sums))
}

/// A decoded shard on its way to the writer.
struct PendingShard {
    index: usize,
    labels: Vec<u32>,
    images: Vec<Vec<u8>>,
    sums: Vec<u64>,
    class_counts: Vec<usize>,
    moments: [u64; 9],
    skipped: Vec<Skipped>,
}

/// Writes a shard (streamed, hashed on the way), then its sums, then its record, each
/// atomically; the record is what marks the shard finished for a rerun.
fn write_shard(output: &Path, side: usize, p: PendingShard) -> Result<ShardInfo> {
    let file = shard_name(p.index);
    let path = output.join(&file);
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut bytes = 0u64;
    write_atomic_with(&path, |w| {
        let mut put = |b: &[u8]| -> std::io::Result<()> {
            hasher.update(b);
            bytes += b.len() as u64;
            w.write_all(b)
        };
        put(SHARD_MAGIC)?;
        put(&(side as u32).to_le_bytes())?;
        put(&(p.labels.len() as u32).to_le_bytes())?;
        let labels: Vec<u8> = p.labels.iter().flat_map(|l| l.to_le_bytes()).collect();
        put(&labels)?;
        for img in &p.images {
            put(img)?;
        }
        Ok(())
    })?;
    let info = ShardInfo {
        file,
        images: p.labels.len(),
        bytes,
        xxh3: format!("{:016x}", hasher.digest()),
    };
    let sum_bytes: Vec<u8> = p.sums.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_atomic(&output.join(sums_name(p.index)), &sum_bytes)?;
    let record = ShardRecord {
        info: info.clone(),
        class_counts: p.class_counts,
        moments: p.moments,
        skipped: p.skipped,
    };
    write_atomic(
        &output.join(record_name(p.index)),
        &serde_json::to_vec(&record)?,
    )?;
    Ok(info)
}

/// Eigenvalues (descending) and unit eigenvectors of a symmetric 3x3 matrix (Jacobi rotations).
#[allow(clippy::needless_range_loop)] // the rotations read two entries of each row at once
pub fn symmetric_eigen3(m: [[f64; 3]; 3]) -> ([f64; 3], [[f64; 3]; 3]) {
    let mut a = m;
    let mut v = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    for _ in 0..64 {
        let off = a[0][1].abs() + a[0][2].abs() + a[1][2].abs();
        if off < 1e-300 {
            break;
        }
        for (p, q) in [(0, 1), (0, 2), (1, 2)] {
            if a[p][q].abs() < 1e-300 {
                continue;
            }
            let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
            let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
            let t = if theta == 0.0 { 1.0 } else { t };
            let (c, s) = (1.0 / (t * t + 1.0).sqrt(), t / (t * t + 1.0).sqrt());
            for k in 0..3 {
                let (akp, akq) = (a[k][p], a[k][q]);
                a[k][p] = c * akp - s * akq;
                a[k][q] = s * akp + c * akq;
            }
            for k in 0..3 {
                let (apk, aqk) = (a[p][k], a[q][k]);
                a[p][k] = c * apk - s * aqk;
                a[q][k] = s * apk + c * aqk;
            }
            for row in v.iter_mut() {
                let (vp, vq) = (row[p], row[q]);
                row[p] = c * vp - s * vq;
                row[q] = s * vp + c * vq;
            }
        }
    }
    let mut order = [0usize, 1, 2];
    order.sort_by(|&i, &j| a[j][j].total_cmp(&a[i][i]));
    let values = order.map(|i| a[i][i]);
    // Column i of v is the eigenvector of a[i][i].
    let vectors = order.map(|i| [v[0][i], v[1][i], v[2][i]]);
    (values, vectors)
}

/// Prepares `input` into `output`; see the module documentation. An output folder this call
/// created is removed again if it fails with nothing in it.
pub fn prepare(input: &Path, output: &Path, opts: &PrepareOptions) -> Result<Summary> {
    let existed = output.exists();
    let result = prepare_into(input, output, opts).map_err(|e| {
        if crate::files::is_disk_full(&e) {
            e.context(format!(
                "--output {}: the disk is full; free space or choose another --output \
                 (finished shards are kept and a rerun continues)",
                output.display()
            ))
        } else {
            e
        }
    });
    if result.is_err() && !existed {
        // Only empty folders go: finished shards are kept for a rerun.
        for part in ["val", "train"] {
            let _ = std::fs::remove_dir(output.join(part));
        }
        let _ = std::fs::remove_dir(output);
    }
    result
}

/// Which set a call of [`prepare_set`] makes.
enum Part<'a> {
    /// The whole input, with its own statistics.
    Whole,
    /// The training part of a split, with its own statistics.
    Train(SplitRecord),
    /// The validation part of a split, with the training part's metadata and mean image.
    Val(SplitRecord, &'a Metadata, &'a [u8]),
}

fn prepare_into(input: &Path, output: &Path, opts: &PrepareOptions) -> Result<Summary> {
    ensure!(opts.side >= 8, "--side {} is too small", opts.side);
    ensure!(opts.shard_images > 0, "--shard-images must be at least 1");
    let (classes, files, not_images, descriptions) = list_any(input, opts)?;
    if opts.strict {
        if let Some(s) = not_images.first() {
            bail!("{}: {} (--strict)", s.path, s.reason);
        }
    }
    for s in &not_images {
        tracing::warn!(path = %s.path, "skipped: {}", s.reason);
    }
    ensure!(
        !output.join("job.json").exists(),
        "--output {} is a training run's folder (it holds job.json): prepare into a folder of \
         its own",
        output.display()
    );
    let Some(split) = opts.val_split else {
        ensure!(
            !output.join("train").join(METADATA_FILE).exists(),
            "--output {} holds a split dataset (train/ and val/, from --val-fraction): pass the \
             same --val-fraction and --seed to check or finish it, or choose another --output",
            output.display()
        );
        let (summary, _, _) = prepare_set(
            input,
            output,
            &classes,
            &files,
            &descriptions,
            not_images,
            opts,
            Part::Whole,
        )?;
        return Ok(summary);
    };
    ensure!(
        split.fraction > 0.0 && split.fraction < 1.0,
        "--val-fraction {} must be between 0 and 1 (0.1 puts a tenth of each class in val/)",
        split.fraction
    );
    ensure!(
        !output.join(METADATA_FILE).exists(),
        "--output {} holds a dataset prepared whole: --val-fraction writes train/ and val/ \
         into a folder of their own; choose another --output",
        output.display()
    );
    let (train, val) = split_files(input, &classes, &files, split);
    ensure!(
        !val.is_empty(),
        "--val-fraction {} puts none of the {} images in val/: raise it or add images",
        split.fraction,
        files.len()
    );
    let mut val_counts = vec![0usize; classes.len()];
    for (_, label) in &val {
        val_counts[*label as usize] += 1;
    }
    let empty: Vec<&str> = (classes.iter().zip(&val_counts))
        .filter(|(_, &n)| n == 0)
        .map(|(c, _)| c.as_str())
        .collect();
    if !empty.is_empty() {
        tracing::warn!(
            classes = empty.len(),
            "no validation image for {} (too few images for --val-fraction {}): they are \
             trained on but not measured",
            empty.join(", "),
            split.fraction
        );
    }
    let per_class: Vec<String> = (classes.iter().zip(&val_counts))
        .take(20)
        .map(|(c, n)| format!("{c} {n}"))
        .collect();
    tracing::info!(
        train = train.len(),
        val = val.len(),
        val_fraction = split.fraction,
        seed = split.seed,
        "split; validation images per class: {}{}",
        per_class.join(", "),
        if classes.len() > 20 { ", ..." } else { "" }
    );
    let record = |part: &str| SplitRecord {
        part: part.into(),
        val_fraction: split.fraction,
        seed: split.seed,
        train_files: train.len(),
        val_files: val.len(),
        statistics_of: "train".into(),
    };
    std::fs::create_dir_all(output)
        .with_context(|| format!("creating --output {}", output.display()))?;
    let (mut summary, train_meta, train_mean) = prepare_set(
        input,
        &output.join("train"),
        &classes,
        &train,
        &descriptions,
        not_images,
        opts,
        Part::Train(record("train")),
    )?;
    let (val_summary, _, _) = prepare_set(
        input,
        &output.join("val"),
        &classes,
        &val,
        &descriptions,
        Vec::new(),
        opts,
        Part::Val(record("val"), &train_meta, &train_mean),
    )?;
    summary.val = Some(Box::new(val_summary));
    Ok(summary)
}

/// `files` in the training and the validation part, each in the input's sorted order; a class
/// that would have no training image keeps the one drawn highest.
type Labelled = Vec<(PathBuf, u32)>;

fn split_files(
    input: &Path,
    classes: &[String],
    files: &[(PathBuf, u32)],
    split: ValSplit,
) -> (Labelled, Labelled) {
    let draws: Vec<f64> = files
        .iter()
        .map(|(p, _)| split_draw(&relative_name(input, p), split.seed))
        .collect();
    let mut to_val: Vec<bool> = draws.iter().map(|&u| u < split.fraction).collect();
    for label in 0..classes.len() as u32 {
        let members: Vec<usize> = (0..files.len()).filter(|&i| files[i].1 == label).collect();
        if !members.is_empty() && members.iter().all(|&i| to_val[i]) {
            let keep = *members
                .iter()
                .max_by(|&&a, &&b| draws[a].total_cmp(&draws[b]))
                .expect("a member");
            to_val[keep] = false;
        }
    }
    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (f, v) in files.iter().zip(to_val) {
        if v {
            val.push(f.clone());
        } else {
            train.push(f.clone());
        }
    }
    (train, val)
}

/// Prepares `files` (labels index `classes`) into `output`; returns what it did, the metadata
/// and the mean image's bytes.
#[allow(clippy::too_many_arguments)]
fn prepare_set(
    input: &Path,
    output: &Path,
    classes: &[String],
    files: &[(PathBuf, u32)],
    descriptions: &[String],
    not_images: Vec<Skipped>,
    opts: &PrepareOptions,
    part: Part<'_>,
) -> Result<(Summary, Metadata, Vec<u8>)> {
    let started = Instant::now();
    let mut fingerprint = input_fingerprint(input, files, opts.side)?;
    if !descriptions.is_empty() {
        fingerprint = xxh3_hex(format!("{fingerprint} {}", descriptions.join("\n")).as_bytes());
    }
    match &part {
        Part::Whole => {}
        // A part is also what it was split by, and the validation part the training
        // statistics it carries.
        Part::Train(r) => {
            fingerprint =
                xxh3_hex(format!("{fingerprint} train {} {}", r.val_fraction, r.seed).as_bytes())
        }
        Part::Val(r, train, _) => {
            fingerprint = xxh3_hex(
                format!(
                    "{fingerprint} val {} {} {}",
                    r.val_fraction, r.seed, train.mean_xxh3
                )
                .as_bytes(),
            )
        }
    }
    std::fs::create_dir_all(output)
        .with_context(|| format!("creating --output {}", output.display()))?;
    if output.join(METADATA_FILE).exists() {
        let meta: Metadata = serde_json::from_slice(&std::fs::read(output.join(METADATA_FILE))?)
            .with_context(|| format!("reading {}", output.join(METADATA_FILE).display()))?;
        ensure!(
            meta.input_fingerprint.is_empty() || meta.input_fingerprint == fingerprint,
            "--output {} holds a dataset prepared from other input ({} images in {} classes \
             then; {} images in {} classes in --input {} now, or files changed, or another \
             --side{}): remove {} to prepare it again, or choose another --output",
            output.display(),
            meta.images,
            meta.classes.len(),
            files.len(),
            classes.len(),
            input.display(),
            if matches!(part, Part::Whole) {
                ""
            } else {
                ", --val-fraction or --seed"
            },
            output.display()
        );
        tracing::info!(output = %output.display(), images = meta.images, "already prepared: nothing to do");
        let mean_bytes = std::fs::read(output.join(MEAN_FILE))
            .with_context(|| format!("reading {}", output.join(MEAN_FILE).display()))?;
        return Ok((
            Summary {
                images: meta.images,
                classes: meta.classes.len(),
                shards: meta.shards.len(),
                shards_reused: meta.shards.len(),
                skipped: meta.skipped.clone(),
                seconds: started.elapsed().as_secs_f64(),
                images_per_s: 0.0,
                val: None,
            },
            meta,
            mean_bytes,
        ));
    }
    let plane3 = 3 * opts.side * opts.side;
    let shard_count = files.len().div_ceil(opts.shard_images);
    tracing::info!(
        input = %input.display(),
        output = %output.display(),
        classes = classes.len(),
        files = files.len(),
        shards = shard_count,
        "preparing"
    );
    let bar = if opts.progress {
        indicatif::ProgressBar::new(files.len() as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images, {per_sec}, ETA {eta} {msg}",
        )
        .expect("valid template"),
    );
    let mut sums = vec![0u64; plane3];
    let mut moments = [0u64; 9];
    let mut class_counts = vec![0usize; classes.len()];
    let mut skipped = not_images;
    let (mut reused, mut decoded) = (0usize, 0usize);
    let mut infos: Vec<Option<ShardInfo>> = vec![None; shard_count];
    let mut last_log = Instant::now();
    // Shards are written on a thread of their own while the next one is decoded: writing and
    // flushing 200 MB takes about as long as decoding it.
    let written: Result<Vec<(usize, ShardInfo)>> = std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<PendingShard>(1);
        let writer = scope.spawn(move || -> Result<Vec<(usize, ShardInfo)>> {
            let mut done = Vec::new();
            for p in rx {
                let index = p.index;
                done.push((index, write_shard(output, opts.side, p)?));
            }
            Ok(done)
        });
        for (index, chunk) in files.chunks(opts.shard_images).enumerate() {
            let (counts, m, shard_sums, bad) = match finished_shard(output, index, plane3) {
                Some((record, shard_sums)) => {
                    reused += 1;
                    infos[index] = Some(record.info);
                    (
                        record.class_counts,
                        record.moments,
                        shard_sums,
                        record.skipped,
                    )
                }
                None => {
                    let results: Vec<Result<Vec<u8>>> = chunk
                        .par_iter()
                        .map(|(path, _)| decode_square(path, opts.side))
                        .collect();
                    let (mut labels, mut images, mut bad) = (Vec::new(), Vec::new(), Vec::new());
                    let mut counts = vec![0usize; classes.len()];
                    for ((path, label), r) in chunk.iter().zip(results) {
                        match r {
                            Ok(img) => {
                                counts[*label as usize] += 1;
                                labels.push(*label);
                                images.push(img);
                            }
                            Err(e) if opts.strict => {
                                drop(tx);
                                let _ = writer.join();
                                return Err(
                                    e.context("--strict: stopping at the first unreadable image")
                                );
                            }
                            Err(e) => {
                                tracing::warn!(path = %path.display(), "skipped: {}", crate::log_fields::error_chain(&e));
                                bad.push(Skipped {
                                    path: path.display().to_string(),
                                    reason: crate::log_fields::error_chain(&e),
                                });
                            }
                        }
                    }
                    // Integer sums, so the order of the parallel reduction does not matter.
                    let (shard_sums, m) = images
                        .par_iter()
                        .fold(
                            || (vec![0u64; plane3], [0u64; 9]),
                            |(mut s, mut m), img| {
                                accumulate(img, &mut s, &mut m);
                                (s, m)
                            },
                        )
                        .reduce(
                            || (vec![0u64; plane3], [0u64; 9]),
                            |(mut a, mut ma), (b, mb)| {
                                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                                ma.iter_mut().zip(mb).for_each(|(x, y)| *x += y);
                                (a, ma)
                            },
                        );
                    decoded += images.len();
                    let pending = PendingShard {
                        index,
                        labels,
                        images,
                        sums: shard_sums.clone(),
                        class_counts: counts.clone(),
                        moments: m,
                        skipped: bad.clone(),
                    };
                    if tx.send(pending).is_err() {
                        // The writer stopped on an error: report it.
                        break;
                    }
                    (counts, m, shard_sums, bad)
                }
            };
            sums.iter_mut().zip(&shard_sums).for_each(|(a, b)| *a += b);
            moments.iter_mut().zip(m).for_each(|(a, b)| *a += b);
            class_counts
                .iter_mut()
                .zip(&counts)
                .for_each(|(a, b)| *a += b);
            skipped.extend(bad);
            bar.inc(chunk.len() as u64);
            // Progress in the logs too, for runs without a terminal (jobs, pipes).
            let done = ((index + 1) * opts.shard_images).min(files.len());
            if last_log.elapsed().as_secs() >= 30 && done < files.len() {
                let rate = done as f64 / started.elapsed().as_secs_f64();
                tracing::info!(
                    done,
                    of = files.len(),
                    images_per_s = crate::log_fields::rounded(rate, 0),
                    eta_s = crate::log_fields::rounded((files.len() - done) as f64 / rate, 0),
                    "preparing"
                );
                last_log = Instant::now();
            }
        }
        drop(tx);
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("the shard writer panicked"))?
    });
    for (index, info) in written? {
        infos[index] = Some(info);
    }
    let shards: Vec<ShardInfo> = infos
        .into_iter()
        .map(|i| i.expect("every shard written or reused"))
        .collect();
    bar.finish_and_clear();
    let images: usize = class_counts.iter().sum();
    ensure!(
        images > 0,
        "no image in {} could be read (see the warnings above)",
        input.display()
    );
    let mut listed = vec![0usize; classes.len()];
    for (_, label) in files {
        listed[*label as usize] += 1;
    }
    for ((name, &n), &want) in classes.iter().zip(&class_counts).zip(&listed) {
        // A validation part may lack a small class; a class with images must keep one.
        ensure!(
            n > 0 || want == 0,
            "class {name}: none of its images could be read (see the warnings above)"
        );
    }
    // The mean image, and the covariance of RGB values scaled to [0, 1] over every pixel.
    let mean: Vec<f32> = sums
        .iter()
        .map(|&s| (s as f64 / images as f64) as f32)
        .collect();
    let n = (images * opts.side * opts.side) as f64;
    let mu = [
        moments[0] as f64 / n,
        moments[1] as f64 / n,
        moments[2] as f64 / n,
    ];
    let second = |k: usize| moments[k] as f64 / n;
    let cov_raw = [
        [
            second(3) - mu[0] * mu[0],
            second(4) - mu[0] * mu[1],
            second(5) - mu[0] * mu[2],
        ],
        [
            second(4) - mu[0] * mu[1],
            second(6) - mu[1] * mu[1],
            second(7) - mu[1] * mu[2],
        ],
        [
            second(5) - mu[0] * mu[2],
            second(7) - mu[1] * mu[2],
            second(8) - mu[2] * mu[2],
        ],
    ];
    let cov = cov_raw.map(|row| row.map(|v| v / (255.0 * 255.0)));
    let (mut values, mut vectors) = symmetric_eigen3(cov);
    let mut mean_bytes: Vec<u8> = mean.iter().flat_map(|v| v.to_le_bytes()).collect();
    let split = match part {
        Part::Whole => None,
        Part::Train(r) => Some(r),
        // Validation images are centred and coloured as the training images are.
        Part::Val(r, train, train_mean) => {
            mean_bytes = train_mean.to_vec();
            (values, vectors) = (train.rgb_eigenvalues, train.rgb_eigenvectors);
            Some(r)
        }
    };
    write_atomic(&output.join(MEAN_FILE), &mean_bytes)?;
    let meta = Metadata {
        format: FORMAT.into(),
        side: opts.side,
        classes: classes.to_vec(),
        class_counts,
        images,
        shards,
        mean_xxh3: xxh3_hex(&mean_bytes),
        rgb_eigenvalues: values,
        rgb_eigenvectors: vectors,
        skipped: skipped.clone(),
        input_fingerprint: fingerprint,
        split,
        class_descriptions: descriptions.to_vec(),
    };
    write_atomic(
        &output.join(METADATA_FILE),
        &serde_json::to_vec_pretty(&meta)?,
    )?;
    sync_dir(output);
    // The per-shard records only served a rerun.
    for index in 0..shard_count {
        let _ = std::fs::remove_file(output.join(sums_name(index)));
        let _ = std::fs::remove_file(output.join(record_name(index)));
    }
    let seconds = started.elapsed().as_secs_f64();
    let summary = Summary {
        images,
        classes: classes.len(),
        shards: shard_count,
        shards_reused: reused,
        skipped,
        seconds,
        images_per_s: decoded as f64 / seconds,
        val: None,
    };
    tracing::info!(
        images,
        classes = summary.classes,
        shards = shard_count,
        reused,
        skipped = summary.skipped.len(),
        seconds = crate::log_fields::rounded(seconds, 1),
        images_per_s = crate::log_fields::rounded(summary.images_per_s as f64, 0),
        output = %output.display(),
        "prepared"
    );
    Ok((summary, meta, mean_bytes))
}
