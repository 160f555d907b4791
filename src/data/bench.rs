//! `alexnet bench-data`: how fast `prepare` turns ImageNet-sized JPEGs into shards, and how fast
//! the loader turns shards into training batches.

use super::loader::{EpochLoader, LoaderConfig, View};
use super::prepare::{prepare, PrepareOptions};
use super::shards::Dataset;
use anyhow::{Context, Result};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[derive(Clone, Debug, Serialize)]
pub struct DataBenchReport {
    pub threads: usize,
    /// `prepare` on `prepare_images` JPEGs of 500x375.
    pub prepare_images: usize,
    pub prepare_images_per_s: f64,
    pub prepare_images_per_s_per_core: f64,
    /// Training batches (random crop, flip, PCA colour, mean subtraction) from the shards.
    pub loader_batch: usize,
    pub loader_images_per_s: f64,
    pub loader_images_per_s_per_core: f64,
    /// Cores the loader needs to feed a GPU training at 5,000 images/s.
    pub loader_cores_for_5000_per_s: f64,
    /// The same batches cut as bytes for a GPU to finish (what `--augment-on auto` ships to a
    /// GPU), and the bytes per image shipped each way.
    pub loader_bytes_images_per_s: f64,
    pub loader_bytes_cores_for_5000_per_s: f64,
    pub bytes_per_image_floats: usize,
    pub bytes_per_image_bytes: usize,
}

/// Writes `count` ImageNet-sized (500x375) JPEGs into `dir` as an ImageFolder tree, made from
/// the photographs under `photos` (resized, so that decoding costs what ImageNet's does).
pub fn make_imagenet_sized_jpegs(photos: &Path, dir: &Path, count: usize) -> Result<()> {
    let mut sources = Vec::new();
    for class in
        std::fs::read_dir(photos).with_context(|| format!("listing {}", photos.display()))?
    {
        let class = class?.path();
        if class.is_dir() {
            for f in std::fs::read_dir(&class)? {
                sources.push(f?.path());
            }
        }
    }
    sources.sort();
    anyhow::ensure!(
        !sources.is_empty(),
        "no photographs under {}",
        photos.display()
    );
    let resized: Vec<Vec<u8>> = sources
        .iter()
        .map(|p| -> Result<Vec<u8>> {
            let img = image::open(p).with_context(|| format!("decoding {}", p.display()))?;
            let img = img
                .resize_exact(500, 375, image::imageops::FilterType::Triangle)
                .into_rgb8();
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(&img)?;
            Ok(out)
        })
        .collect::<Result<_>>()?;
    for i in 0..count {
        let class = dir.join(format!("class{:02}", i % 10));
        std::fs::create_dir_all(&class)?;
        std::fs::write(
            class.join(format!("img{i:06}.jpg")),
            &resized[i % resized.len()],
        )?;
    }
    Ok(())
}

pub fn run(photos: &Path, work: &Path, images: usize, batch: usize) -> Result<DataBenchReport> {
    let threads = rayon::current_num_threads();
    let input = work.join("jpegs");
    let output = work.join("prepared");
    let _ = std::fs::remove_dir_all(work);
    make_imagenet_sized_jpegs(photos, &input, images)?;
    let summary = prepare(
        &input,
        &output,
        &PrepareOptions {
            progress: false,
            ..PrepareOptions::default()
        },
    )?;
    let ds = Arc::new(Dataset::open(&output)?);
    let cfg = LoaderConfig {
        global_batch: batch.min(ds.len()),
        replicas: 1,
        replica: 0,
        seed: 1,
        view: View::Train,
        crop: 224,
        threads,
        prefetch: 4,
        bytes: false,
    };
    // Warm the page cache and the checksums, then time a few epochs.
    for b in EpochLoader::new(ds.clone(), cfg.clone(), 0)? {
        b?;
    }
    let rate = |cfg: &LoaderConfig| -> Result<f64> {
        let started = Instant::now();
        let mut made = 0usize;
        for epoch in 1..=3 {
            for b in EpochLoader::new(ds.clone(), cfg.clone(), epoch)? {
                made += b?.labels.len();
            }
        }
        Ok(made as f64 / started.elapsed().as_secs_f64())
    };
    let loader_rate = rate(&cfg)?;
    let bytes_rate = rate(&LoaderConfig {
        bytes: true,
        ..cfg.clone()
    })?;
    let _ = std::fs::remove_dir_all(work);
    Ok(DataBenchReport {
        threads,
        prepare_images: summary.images,
        prepare_images_per_s: summary.images_per_s,
        prepare_images_per_s_per_core: summary.images_per_s / threads as f64,
        loader_batch: cfg.global_batch,
        loader_images_per_s: loader_rate,
        loader_images_per_s_per_core: loader_rate / threads as f64,
        loader_cores_for_5000_per_s: 5000.0 / (loader_rate / threads as f64),
        loader_bytes_images_per_s: bytes_rate,
        loader_bytes_cores_for_5000_per_s: 5000.0 / (bytes_rate / threads as f64),
        bytes_per_image_floats: 4 * 3 * cfg.crop * cfg.crop,
        bytes_per_image_bytes: 3 * cfg.crop * cfg.crop,
    })
}
