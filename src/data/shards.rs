//! The prepared form of an image set on disk: shards of 256x256 RGB images and one metadata
//! file that is written last, so that its presence means the set is complete.
//!
//! ```text
//! dataset.json          classes, counts, shards (with checksums), mean image file, RGB PCA
//! mean.bin              the mean image, f32 little-endian, [3, side, side]
//! shard-00000.bin       "ALXSHRD1", u32 side, u32 count, u32 labels[count],
//!                       u8 images[count][3][side][side]   (planar RGB)
//! ```
//!
//! Shards are a few hundred MB (1,024 images by default), so ImageNet's 1.28 M images never
//! need to fit in memory: the loader maps them.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const METADATA_FILE: &str = "dataset.json";
pub const MEAN_FILE: &str = "mean.bin";
pub const FORMAT: &str = "alexnet-shards-v1";
pub const SHARD_MAGIC: &[u8; 8] = b"ALXSHRD1";
/// Bytes before the labels: magic, side, count.
pub const SHARD_HEADER: usize = 16;

/// One shard as the metadata lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    pub file: String,
    pub images: usize,
    pub bytes: u64,
    /// XXH3-64 of the whole file, hex.
    pub xxh3: String,
}

/// A file that was not turned into an image, and why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Skipped {
    pub path: String,
    pub reason: String,
}

/// `dataset.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    pub format: String,
    /// Side of the stored square images (256).
    pub side: usize,
    /// Class names (the input's folder names), in label order.
    pub classes: Vec<String>,
    /// Images per class.
    pub class_counts: Vec<usize>,
    pub images: usize,
    pub shards: Vec<ShardInfo>,
    pub mean_xxh3: String,
    /// Eigenvalues of the 3x3 covariance of RGB values (scaled to [0, 1]) over every pixel of
    /// every image, largest first.
    pub rgb_eigenvalues: [f64; 3],
    /// The matching unit eigenvectors: `rgb_eigenvectors[i]` goes with `rgb_eigenvalues[i]`.
    pub rgb_eigenvectors: [[f64; 3]; 3],
    pub skipped: Vec<Skipped>,
    /// A digest of the input it was prepared from (each image file's path under the input,
    /// size and modification time, and the side): a rerun into the same output compares it
    /// with its own input. Empty in datasets prepared before it was kept.
    #[serde(default)]
    pub input_fingerprint: String,
    /// How `prepare --val-fraction` split one tree into this set and its sibling (`train/`,
    /// `val/`); absent for a set prepared whole.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<SplitRecord>,
    /// Human names of the classes (`prepare --class-names`), by label; empty where none were
    /// given (the class names are then the only names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub class_descriptions: Vec<String>,
}

/// One part of a tree split by `prepare --val-fraction`. An image is in `val/` when
/// `rng::uniform(rng::key(seed, "val-split/" + its path under the input), 0) < val_fraction`:
/// a function of its own path and the seed, so adding images never moves the others. (The one
/// exception: a class whose every image would go to `val/` keeps the one drawn highest for
/// training.)
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitRecord {
    /// `train` or `val`.
    pub part: String,
    pub val_fraction: f64,
    pub seed: u64,
    /// Images assigned to each part (before any failed to decode).
    pub train_files: usize,
    pub val_files: usize,
    /// Where the mean image and the RGB PCA of this part come from: always `train` (the
    /// validation set is centred and coloured by the training set's statistics).
    pub statistics_of: String,
}

impl Metadata {
    /// The name to show for class `label`: its description where `--class-names` gave one
    /// (`n01440764 tench, Tinca tinca`), else its folder or label-file name.
    pub fn display_name(&self, label: usize) -> String {
        display_name(&self.classes, &self.class_descriptions, label)
    }
}

/// `classes[label]`, with its description after it where there is one.
pub fn display_name(classes: &[String], descriptions: &[String], label: usize) -> String {
    let name = classes
        .get(label)
        .cloned()
        .unwrap_or_else(|| label.to_string());
    match descriptions.get(label).filter(|d| !d.is_empty()) {
        Some(d) => format!("{name} {d}"),
        None => name,
    }
}

pub fn shard_name(index: usize) -> String {
    format!("shard-{index:05}.bin")
}

pub fn shard_bytes(side: usize, images: usize) -> u64 {
    (SHARD_HEADER + 4 * images + images * 3 * side * side) as u64
}

pub fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Serialises a shard: header, labels, planar images.
pub fn encode_shard(side: usize, labels: &[u32], images: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::with_capacity(shard_bytes(side, labels.len()) as usize);
    out.extend_from_slice(SHARD_MAGIC);
    out.extend_from_slice(&(side as u32).to_le_bytes());
    out.extend_from_slice(&(labels.len() as u32).to_le_bytes());
    for l in labels {
        out.extend_from_slice(&l.to_le_bytes());
    }
    for img in images {
        debug_assert_eq!(img.len(), 3 * side * side);
        out.extend_from_slice(img);
    }
    out
}

/// A prepared image set, opened for reading: shards memory-mapped, checked against the
/// metadata when first used.
pub struct Dataset {
    pub dir: PathBuf,
    pub meta: Metadata,
    /// `[3, side, side]`, f32 (shared with the batches that a device finishes).
    pub mean: std::sync::Arc<[f32]>,
    shards: Vec<std::sync::OnceLock<Result<memmap2::Mmap, String>>>,
    /// First global index of each shard, and one past the last.
    starts: Vec<usize>,
}

impl Dataset {
    /// Opens `dir`, checking the metadata, the mean image's checksum and every shard's size
    /// (a truncated shard is caught here; a corrupted one by its checksum when first read).
    pub fn open(dir: &Path) -> Result<Dataset> {
        let meta_path = dir.join(METADATA_FILE);
        let text = std::fs::read_to_string(&meta_path).with_context(|| {
            format!(
                "{} is missing: {} is not a prepared dataset, or its preparation did not finish \
                 (run `alexnet prepare` again to complete it)",
                meta_path.display(),
                dir.display()
            )
        })?;
        let meta: Metadata = serde_json::from_str(&text)
            .with_context(|| format!("reading {}", meta_path.display()))?;
        ensure!(
            meta.format == FORMAT,
            "{}: format {:?}, this build reads {FORMAT:?}",
            meta_path.display(),
            meta.format
        );
        ensure!(
            meta.classes.len() == meta.class_counts.len(),
            "{}: classes and class_counts differ in length",
            meta_path.display()
        );
        let total: usize = meta.shards.iter().map(|s| s.images).sum();
        ensure!(
            total == meta.images,
            "{}: the shards hold {total} images, the metadata says {}",
            meta_path.display(),
            meta.images
        );
        let mean_path = dir.join(MEAN_FILE);
        let mean_bytes = std::fs::read(&mean_path)
            .with_context(|| format!("reading {}", mean_path.display()))?;
        ensure!(
            mean_bytes.len() == 4 * 3 * meta.side * meta.side
                && xxh3_hex(&mean_bytes) == meta.mean_xxh3,
            "{} is damaged (its size or checksum does not match {}): prepare the dataset again",
            mean_path.display(),
            METADATA_FILE
        );
        let mean = mean_bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect::<Vec<f32>>()
            .into();
        for s in &meta.shards {
            let path = dir.join(&s.file);
            let len = std::fs::metadata(&path)
                .with_context(|| format!("shard {} is missing", path.display()))?
                .len();
            ensure!(
                len == s.bytes && s.bytes == shard_bytes(meta.side, s.images),
                "shard {} holds {len} bytes, {} expects {}: it is truncated or damaged; prepare the dataset again",
                path.display(),
                METADATA_FILE,
                s.bytes
            );
        }
        let mut starts = vec![0];
        for s in &meta.shards {
            starts.push(starts.last().unwrap() + s.images);
        }
        let shards = meta
            .shards
            .iter()
            .map(|_| std::sync::OnceLock::new())
            .collect();
        Ok(Dataset {
            dir: dir.to_path_buf(),
            meta,
            mean,
            shards,
            starts,
        })
    }

    pub fn len(&self) -> usize {
        self.meta.images
    }

    /// Subtracts `train`'s mean image from this set's views instead of its own: evaluation
    /// data must be centred as the network's training data was, not by its own statistics.
    pub fn use_mean_of(&mut self, train: &Dataset) -> Result<()> {
        ensure!(
            train.side() == self.side(),
            "{} holds {}-pixel images, the training set in {} {}-pixel ones: evaluate on data \
             prepared at the training set's size",
            self.dir.display(),
            self.side(),
            train.dir.display(),
            train.side()
        );
        self.mean = train.mean.clone();
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.meta.images == 0
    }

    pub fn side(&self) -> usize {
        self.meta.side
    }

    /// Maps shard `i` and verifies its checksum, once.
    fn shard(&self, i: usize) -> Result<&memmap2::Mmap> {
        let cell = self.shards[i].get_or_init(|| {
            let info = &self.meta.shards[i];
            let path = self.dir.join(&info.file);
            let file = std::fs::File::open(&path)
                .map_err(|e| format!("opening shard {}: {e}", path.display()))?;
            // SAFETY: the shard is never written after its dataset is complete; a concurrent
            // writer would be a misuse this cannot guard against (and the checksum would likely
            // catch it).
            let map = unsafe { memmap2::Mmap::map(&file) }
                .map_err(|e| format!("mapping shard {}: {e}", path.display()))?;
            if map.len() as u64 != info.bytes || &map[..8] != SHARD_MAGIC {
                return Err(format!(
                    "shard {} is truncated or not a shard: prepare the dataset again",
                    path.display()
                ));
            }
            let sum = xxh3_hex(&map);
            if sum != info.xxh3 {
                return Err(format!(
                    "shard {} is corrupted: checksum {sum}, {} says {}; prepare the dataset again",
                    path.display(),
                    METADATA_FILE,
                    info.xxh3
                ));
            }
            Ok(map)
        });
        match cell {
            Ok(m) => Ok(m),
            Err(e) => bail!("{e}"),
        }
    }

    /// Label and planar RGB bytes (`[3, side, side]`) of image `index`.
    pub fn image(&self, index: usize) -> Result<(u32, &[u8])> {
        ensure!(
            index < self.len(),
            "image {index} is beyond the dataset's {}",
            self.len()
        );
        let s = self.starts.partition_point(|&start| start <= index) - 1;
        let local = index - self.starts[s];
        let map = self.shard(s)?;
        let count = self.meta.shards[s].images;
        let at = SHARD_HEADER + 4 * local;
        let label = u32::from_le_bytes([map[at], map[at + 1], map[at + 2], map[at + 3]]);
        let size = 3 * self.side() * self.side();
        let start = SHARD_HEADER + 4 * count + local * size;
        Ok((label, &map[start..start + size]))
    }
}
