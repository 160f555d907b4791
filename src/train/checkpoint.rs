//! Checkpoints: each column's parameters and momenta (one safetensors shard per column,
//! written by the process that holds it) and a manifest that makes them one checkpoint.
//!
//! A checkpoint is complete only once its manifest exists, and the manifest is written only
//! after every shard is durably on disk (fsync, rename) with its checksum recorded in it. A
//! shard that is missing, truncated or altered fails its checksum, and the run falls back to
//! the previous complete checkpoint with a warning.

use super::schedule::ScheduleState;
use crate::backend::Backend;
use crate::files::{sync_dir, write_atomic};
use crate::model::Network;
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
const FORMAT: &str = "alexnet-checkpoint-v1";

/// What makes a set of shards one checkpoint, and where the run continues from it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    /// Steps done.
    pub step: u64,
    /// The epoch (0-based) the next step belongs to, and the batches of it already done.
    pub epoch: u64,
    pub batch_in_epoch: u64,
    pub schedule: ScheduleState,
    pub seed: u64,
    pub config_hash: String,
    pub generation: u64,
    /// Shard file name -> XXH3-64 (hex) of its bytes.
    pub shards: std::collections::BTreeMap<String, String>,
    /// Per-epoch results so far (epoch, train loss, val top-1, val top-5, lr).
    pub history: Vec<EpochRecord>,
}

/// One epoch's figures: what the report plots, the manifest keeps and `launch` sums up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub train_loss: f32,
    pub val_top1_err: f64,
    pub val_top5_err: f64,
    pub lr: f32,
    pub seconds: f64,
    /// The validation's mean cross-entropy (absent from runs checkpointed before it was kept).
    #[serde(default)]
    pub val_loss: Option<f64>,
    /// Training images per second over the epoch (absent likewise).
    #[serde(default)]
    pub images_per_s: Option<f64>,
}

impl Manifest {
    /// Whether the run this checkpoint belongs to has nothing left to train: every epoch of
    /// `epochs` is done, or `max_steps` steps are.
    pub fn completes(&self, epochs: usize, max_steps: Option<u64>) -> bool {
        (self.epoch >= epochs as u64 && self.batch_in_epoch == 0)
            || max_steps.is_some_and(|m| self.step >= m)
    }
}

/// The folder of the checkpoint after `step` steps.
pub fn step_dir(run_dir: &Path, step: u64) -> PathBuf {
    run_dir.join("checkpoints").join(format!("step-{step:09}"))
}

pub fn shard_name(column: usize) -> String {
    format!("column{column}.safetensors")
}

pub fn checksum(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Writes each held column's parameters and momenta to `dir`, durably; returns (file name,
/// checksum) per shard. The shards' size is checked against the free space first, so a full
/// disk is found before anything is written.
pub fn write_shards<B: Backend>(
    net: &Network<B>,
    dir: &Path,
) -> anyhow::Result<Vec<(String, String)>> {
    let needed = shards_size(net);
    let mut out: Vec<(String, String)> = Vec::new();
    let written = std::fs::create_dir_all(dir)
        .map_err(|e| match e.raw_os_error() {
            Some(28) => anyhow::Error::new(crate::files::DiskFull),
            _ => anyhow::Error::new(e).context(format!("creating {}", dir.display())),
        })
        .and_then(|()| match crate::files::free_space(dir) {
            Some(free) if free < needed => Err(anyhow::Error::new(crate::files::DiskFull)),
            _ => write_each_shard(net, dir, &mut out),
        });
    if let Err(e) = written {
        // No half checkpoint stays behind: this call's shards go, and the folder if it is
        // empty then (another column's shards may be in it; without a manifest it is
        // incomplete either way).
        for (name, _) in &out {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let _ = std::fs::remove_dir(dir);
        if crate::files::is_disk_full(&e) {
            return Err(e.context(disk_full_advice(dir, needed)));
        }
        return Err(e);
    }
    sync_dir(dir);
    Ok(out)
}

/// What a checkpoint that met a full disk tells the operator: the run folder, the
/// checkpoint, the space it needs and the space there is, and how to go on. A restart would
/// meet the same wall, so the job stops on it.
fn disk_full_advice(dir: &Path, needed: u64) -> String {
    let run_dir = dir.parent().and_then(Path::parent).unwrap_or(dir);
    let free = crate::files::free_space(run_dir)
        .map(crate::files::human_bytes)
        .unwrap_or_else(|| "an unknown amount".into());
    format!(
        "checkpoint {} needs {} and the disk of the run folder {} has {free} free: free space \
         there, or lower keep_checkpoints in the job, then continue with --resume {} (every \
         complete checkpoint is kept)",
        dir.display(),
        crate::files::human_bytes(needed),
        run_dir.display(),
        run_dir.display()
    )
}

/// The bytes this process's shards of one checkpoint take: every held parameter and its
/// momentum, plus a generous allowance for the safetensors headers.
fn shards_size<B: Backend>(net: &Network<B>) -> u64 {
    net.columns
        .iter()
        .flat_map(|c| &c.params)
        .map(|p| 2 * 4 * p.shape.iter().product::<usize>() as u64 + 2 * 256)
        .sum::<u64>()
        + 4096
}

fn write_each_shard<B: Backend>(
    net: &Network<B>,
    dir: &Path,
    out: &mut Vec<(String, String)>,
) -> anyhow::Result<()> {
    for col in &net.columns {
        let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for p in &col.params {
            tensors.push((
                p.name.clone(),
                p.shape.clone(),
                net.backend.download(&p.value),
            ));
            tensors.push((
                format!("{}.momentum", p.name),
                p.shape.clone(),
                net.backend.download(&p.momentum),
            ));
        }
        let bytes = serialize(&tensors)?;
        let name = shard_name(col.index);
        write_atomic(&dir.join(&name), &bytes)?;
        out.push((name, checksum(&bytes)));
    }
    Ok(())
}

pub fn serialize(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> anyhow::Result<Vec<u8>> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, v)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                shape.clone(),
                bytemuck::cast_slice(v),
            )
            .expect("shape matches data");
            (name.clone(), view)
        })
        .collect();
    Ok(safetensors::serialize(views, &None)?)
}

/// Tensors by name: name -> (shape, values).
pub type TensorsByName = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

/// Tensors of a safetensors file.
pub fn read_tensors(bytes: &[u8], what: &Path) -> anyhow::Result<TensorsByName> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .with_context(|| format!("{} is not a readable safetensors file", what.display()))?;
    let mut out = std::collections::HashMap::new();
    for (name, v) in st.tensors() {
        if v.dtype() != safetensors::Dtype::F32 {
            bail!("{}: tensor {name} is not f32", what.display());
        }
        let values = v
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        out.insert(name, (v.shape().to_vec(), values));
    }
    Ok(out)
}

/// Writes the manifest of a checkpoint whose shards are all on disk.
pub fn write_manifest(run_dir: &Path, m: &Manifest) -> anyhow::Result<()> {
    let dir = step_dir(run_dir, m.step);
    for (name, sum) in &m.shards {
        let bytes = std::fs::read(dir.join(name))
            .with_context(|| format!("checkpoint shard {} is missing", dir.join(name).display()))?;
        if &checksum(&bytes) != sum {
            bail!(
                "checkpoint shard {} does not match its checksum",
                dir.join(name).display()
            );
        }
    }
    let text = serde_json::to_string_pretty(m)?;
    if let Err(e) = write_atomic(&dir.join(MANIFEST), text.as_bytes()) {
        // The shards fit but the manifest does not: the same wall, and the same way on.
        if crate::files::is_disk_full(&e) {
            return Err(e.context(disk_full_advice(&dir, text.len() as u64)));
        }
        return Err(e);
    }
    sync_dir(&dir);
    Ok(())
}

/// Complete checkpoints of a run (those with a manifest), newest first.
pub fn list(run_dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(run_dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name.strip_prefix("step-")?.parse().ok()?;
            e.path().join(MANIFEST).exists().then(|| (step, e.path()))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found
}

/// Reads and checks one checkpoint: its manifest, and every shard against its checksum.
pub fn verify(dir: &Path, config_hash: Option<&str>) -> anyhow::Result<Manifest> {
    let text = std::fs::read_to_string(dir.join(MANIFEST))
        .with_context(|| format!("reading {}", dir.join(MANIFEST).display()))?;
    let m: Manifest = serde_json::from_str(&text)
        .with_context(|| format!("{} is damaged", dir.join(MANIFEST).display()))?;
    if m.format != FORMAT {
        bail!(
            "{}: format {} (this binary reads {FORMAT})",
            dir.display(),
            m.format
        );
    }
    if let Some(h) = config_hash {
        if m.config_hash != h {
            bail!(
                "{} belongs to a run with configuration {}, this job has {h}",
                dir.display(),
                m.config_hash
            );
        }
    }
    for (name, sum) in &m.shards {
        let path = dir.join(name);
        let bytes = std::fs::read(&path)
            .with_context(|| format!("checkpoint shard {} is missing", path.display()))?;
        if &checksum(&bytes) != sum {
            bail!(
                "checkpoint shard {} is truncated or corrupted ({} bytes; its checksum does not match the manifest)",
                path.display(),
                bytes.len()
            );
        }
    }
    Ok(m)
}

/// The newest checkpoint of `run_dir` that passes [`verify`]; damaged newer ones are named in
/// warnings. `None` when the run has no checkpoint yet; an error when it has some but none is
/// usable.
pub fn latest(
    run_dir: &Path,
    config_hash: Option<&str>,
) -> anyhow::Result<Option<(PathBuf, Manifest)>> {
    let all = list(run_dir);
    if all.is_empty() {
        return Ok(None);
    }
    let mut problems = Vec::new();
    for (_, dir) in &all {
        match verify(dir, config_hash) {
            Ok(m) => {
                if !problems.is_empty() {
                    tracing::warn!(
                        checkpoint = %dir.display(),
                        "resuming from an older checkpoint: the newer one(s) are damaged"
                    );
                }
                return Ok(Some((dir.clone(), m)));
            }
            Err(e) => {
                tracing::warn!("skipping checkpoint: {e:#}");
                problems.push(format!("{e:#}"));
            }
        }
    }
    bail!(
        "no usable checkpoint in {}: {}",
        run_dir.display(),
        problems.join("; ")
    )
}

/// Removes all but the newest `keep` complete checkpoints, and incomplete ones older than the
/// newest complete one.
pub fn prune(run_dir: &Path, keep: usize) {
    let complete = list(run_dir);
    let Some(&(newest, _)) = complete.first() else {
        return;
    };
    let kept: Vec<u64> = complete.iter().take(keep.max(1)).map(|c| c.0).collect();
    for e in std::fs::read_dir(run_dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(step) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        else {
            continue;
        };
        if !kept.contains(&step) && step < newest {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Removes the checkpoint folders of `run_dir` that never got their manifest (a crash or a
/// full disk in the middle of writing them), and names each in the log. Called when a run
/// resumes, before any worker writes: what is left then is nobody's work in progress.
pub fn remove_incomplete(run_dir: &Path) {
    for e in std::fs::read_dir(run_dir.join("checkpoints"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("step-") && !e.path().join(MANIFEST).exists() {
            match std::fs::remove_dir_all(e.path()) {
                Ok(()) => tracing::info!(
                    checkpoint = %e.path().display(),
                    "removed an incomplete checkpoint (no manifest: its writing was cut short)"
                ),
                Err(err) => tracing::warn!(
                    checkpoint = %e.path().display(),
                    "could not remove an incomplete checkpoint: {err}"
                ),
            }
        }
    }
}

/// Loads each held column's parameters and momenta from the shards in `dir`.
pub fn load_shards<B: Backend>(net: &mut Network<B>, dir: &Path) -> anyhow::Result<()> {
    for col in &mut net.columns {
        let path = dir.join(shard_name(col.index));
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let tensors = read_tensors(&bytes, &path)?;
        for p in &mut col.params {
            for (key, momentum) in [
                (p.name.clone(), false),
                (format!("{}.momentum", p.name), true),
            ] {
                let (shape, values) = tensors.get(&key).with_context(|| {
                    format!(
                        "{} has no tensor {key}: not a checkpoint of this network",
                        path.display()
                    )
                })?;
                if shape != &p.shape {
                    bail!(
                        "{}: {key} has shape {shape:?}, this network's column holds {:?}",
                        path.display(),
                        p.shape
                    );
                }
                let buf = net.backend.upload(values);
                if momentum {
                    p.momentum = buf;
                } else {
                    p.value = buf;
                }
            }
        }
    }
    Ok(())
}

impl Manifest {
    pub fn new(
        step: u64,
        steps_per_epoch: u64,
        schedule: ScheduleState,
        seed: u64,
        config_hash: String,
        generation: u64,
    ) -> Self {
        Manifest {
            format: FORMAT.into(),
            step,
            epoch: step / steps_per_epoch,
            batch_in_epoch: step % steps_per_epoch,
            schedule,
            seed,
            config_hash,
            generation,
            shards: Default::default(),
            history: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A checkpoint that meets a full disk leaves no half-written step folder, and its error
    /// says what to do for a run (not for `prepare`).
    #[cfg(unix)]
    #[test]
    fn a_full_disk_leaves_no_half_checkpoint_and_says_how_to_go_on() {
        let run = std::env::temp_dir().join(format!("alexnet-ckpt-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let cfg = crate::model::NetConfig::narrow(64, [8, 16, 16, 16, 8], [16, 16], 10);
        let net = Network::new(
            cfg,
            crate::backend::Cpu::with_threads(1),
            Box::new(crate::comm::LocalExchange::default()),
            1,
        )
        .unwrap();
        let dir = step_dir(&run, 7);
        std::fs::create_dir_all(&dir).unwrap();
        // Column 1's temporary file leads to /dev/full: its writes fail with ENOSPC, after
        // column 0's shard is whole.
        std::os::unix::fs::symlink("/dev/full", dir.join("column1.safetensors.tmp")).unwrap();
        let e = write_shards(&net, &dir).unwrap_err();
        let text = crate::log_fields::error_chain(&e);
        assert!(
            text.contains("the disk of the run folder")
                && text.contains(&format!("--resume {}", run.display()))
                && text.contains("column1.safetensors")
                && !text.contains("--output"),
            "{text}"
        );
        assert!(
            !dir.exists(),
            "a half checkpoint was left in {}",
            dir.display()
        );
        assert!(list(&run).is_empty());
        let _ = std::fs::remove_dir_all(&run);
    }

    /// The shards fit but the manifest meets the full disk (the coordinator writes it last):
    /// the same advice, naming the run folder and how to go on.
    #[cfg(unix)]
    #[test]
    fn a_manifest_on_a_full_disk_says_how_to_go_on() {
        let run =
            std::env::temp_dir().join(format!("alexnet-manifest-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let dir = step_dir(&run, 9);
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("/dev/full", dir.join("manifest.json.tmp")).unwrap();
        let m = Manifest::new(9, 5, ScheduleState::new(0.01), 1, "hash".into(), 0);
        let e = write_manifest(&run, &m).unwrap_err();
        let text = crate::log_fields::error_chain(&e);
        assert!(
            text.contains("the disk of the run folder")
                && text.contains("needs")
                && text.contains(&format!("--resume {}", run.display())),
            "{text}"
        );
        assert!(crate::files::is_disk_full(&e));
        assert!(list(&run).is_empty(), "no manifest, no complete checkpoint");
        let _ = std::fs::remove_dir_all(&run);
    }

    /// The shards' size is known before they are written: a disk without room for them is
    /// found before the first byte, and the error gives the space needed and free.
    #[test]
    fn a_checkpoint_without_room_is_refused_before_it_is_written() {
        let net = Network::new(
            crate::model::NetConfig::narrow(64, [8, 16, 16, 16, 8], [16, 16], 10),
            crate::backend::Cpu::with_threads(1),
            Box::new(crate::comm::LocalExchange::default()),
            1,
        )
        .unwrap();
        let run = std::env::temp_dir().join(format!("alexnet-ckpt-room-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let needed = shards_size(&net);
        let written = write_shards(&net, &step_dir(&run, 3)).unwrap();
        let bytes: u64 = written
            .iter()
            .map(|(name, _)| {
                std::fs::metadata(step_dir(&run, 3).join(name))
                    .unwrap()
                    .len()
            })
            .sum();
        assert!(
            needed >= bytes && needed < bytes + 64 * 1024,
            "estimated {needed} for {bytes} bytes"
        );
        let text = disk_full_advice(&step_dir(&run, 4), needed);
        assert!(
            text.contains(&format!(
                "step-000000004 needs {}",
                crate::files::human_bytes(needed)
            )) && text.contains(" free: free space there")
                && text.contains("keep_checkpoints")
                && text.contains(&format!("--resume {}", run.display())),
            "{text}"
        );
        let _ = std::fs::remove_dir_all(&run);
    }
}
