//! TensorBoard's event files: records of `Event` protobufs (`proto/tensorboard.proto`, encoded
//! by prost), each framed by its length and masked CRC32Cs as TensorFlow's record writer
//! frames them. `tensorboard --logdir runs/` reads them while the run is alive.
//!
//! A run that continues from a checkpoint (a resume, a restart after a failure) first cuts
//! the existing files back to the checkpoint's step, so that the curves go on without a step
//! twice or a step backwards. Nothing here fails a run: an unwritable folder is a warning.

use super::{RankPoint, TrainPoint, ValPoint};
use crate::proto::tensorboard::{event, summary, Event, Summary};
use anyhow::Context;
use prost::Message;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

/// The folder of a run's event files.
pub fn folder(run_dir: &Path) -> PathBuf {
    run_dir.join("tensorboard")
}

/// TensorFlow's CRC mask: a CRC of data that holds CRCs is still a good check.
fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One record: length (u64 LE), its masked CRC, the data, the data's masked CRC.
fn frame(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc(data).to_le_bytes());
    out
}

/// The events of an event file, in order; a damaged or cut-off tail (a process killed while
/// writing) ends the list.
pub fn read_events(path: &Path) -> anyhow::Result<Vec<Event>> {
    Ok(read_records(path)?.0)
}

/// The events of an event file, and whether bytes after them were left unread (a torn tail).
fn read_records(path: &Path) -> anyhow::Result<(Vec<Event>, bool)> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .with_context(|| format!("reading {}", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0usize;
    while at + 12 <= bytes.len() {
        let len_bytes = &bytes[at..at + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes"));
        let len_crc = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes"));
        // The record's end, when the length is sound and the file holds it.
        let end = usize::try_from(len)
            .ok()
            .and_then(|l| (at + 16).checked_add(l))
            .filter(|&e| e <= bytes.len());
        let Some(end) = end.filter(|_| masked_crc(len_bytes) == len_crc) else {
            break;
        };
        let data = &bytes[at + 12..end - 4];
        let crc = u32::from_le_bytes(bytes[end - 4..end].try_into().expect("4 bytes"));
        if masked_crc(data) != crc {
            break;
        }
        match Event::decode(data) {
            Ok(e) => events.push(e),
            Err(_) => break,
        }
        at = end;
    }
    Ok((events, at < bytes.len()))
}

fn is_event_file(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.contains("tfevents") && !n.ends_with(".tmp"))
}

/// The event files of a folder, in the order TensorBoard reads them (by name).
pub fn event_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| is_event_file(p))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Cuts every event file in `dir` back to the events of steps up to `step`: what a run that
/// continues from the checkpoint at `step` keeps. A file left with no scalars is removed.
pub fn cut_back(dir: &Path, step: u64) -> anyhow::Result<()> {
    // A rewrite cut short by a crash leaves its partial file: never a curve.
    if let Ok(rd) = std::fs::read_dir(dir) {
        for p in rd.filter_map(|e| e.ok().map(|e| e.path())) {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if name.starts_with(".cut-") || (name.contains("tfevents") && name.ends_with(".tmp")) {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    for path in event_files(dir) {
        let (events, torn) = read_records(&path)?;
        let kept: Vec<&Event> = events.iter().filter(|e| e.step as u64 <= step).collect();
        let scalars = kept
            .iter()
            .any(|e| matches!(e.what, Some(event::What::Summary(_))));
        if !scalars {
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            continue;
        }
        if kept.len() == events.len() && !torn {
            continue;
        }
        let mut bytes = Vec::new();
        for e in kept {
            bytes.extend(frame(&e.encode_to_vec()));
        }
        // Written beside under a name TensorBoard does not read (it reads any name holding
        // "tfevents"), then renamed over the file.
        let partial = dir.join(".cut-partial");
        let write = || -> std::io::Result<()> {
            let mut f = File::create(&partial)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&partial, &path)
        };
        write().with_context(|| format!("rewriting {}", path.display()))?;
    }
    Ok(())
}

fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Writes one run's scalars into a new event file of its `tensorboard/` folder.
pub struct EventWriter {
    path: PathBuf,
    out: Option<BufWriter<File>>,
}

impl EventWriter {
    /// Opens a new event file in `run_dir/tensorboard/` for a run that continues after
    /// `step` (0: a fresh run), having cut the folder's existing files back to that step.
    /// `None`, with a warning, when the folder cannot be written: the run goes on without.
    pub fn open(run_dir: &Path, step: u64) -> Option<EventWriter> {
        match Self::try_open(run_dir, step) {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(
                    "TensorBoard's event files will not be written (the run goes on): {e:#}"
                );
                None
            }
        }
    }

    fn try_open(run_dir: &Path, step: u64) -> anyhow::Result<EventWriter> {
        let dir = folder(run_dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        cut_back(&dir, step)?;
        let host = crate::files::hostname();
        let secs = now_s() as u64;
        // Files sort by name in the order they were made, as TensorBoard expects.
        let seq = event_files(&dir).len();
        let path = dir.join(format!("events.out.tfevents.{secs:010}.{host}.{seq:04}"));
        let file = File::options()
            .create_new(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        let mut w = EventWriter {
            path,
            out: Some(BufWriter::new(file)),
        };
        w.write(Event {
            wall_time: now_s(),
            step: step as i64,
            what: Some(event::What::FileVersion("brain.Event:2".into())),
        });
        w.flush();
        Ok(w)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, e: Event) {
        let Some(out) = &mut self.out else { return };
        if let Err(e) = out.write_all(&frame(&e.encode_to_vec())) {
            self.give_up(e.into());
        }
    }

    fn give_up(&mut self, e: anyhow::Error) {
        tracing::warn!(
            path = %self.path.display(),
            "TensorBoard's event file could not be written; the run goes on without it: {e:#}"
        );
        self.out = None;
    }

    /// Makes what was written readable (the run's log interval).
    pub fn flush(&mut self) {
        if let Some(out) = &mut self.out {
            if let Err(e) = out.flush() {
                self.give_up(e.into());
            }
        }
    }

    /// Writes scalars `(tag, value)` at `step`.
    pub fn scalars(&mut self, step: u64, values: &[(String, f64)]) {
        let value = values
            .iter()
            .map(|(tag, v)| summary::Value {
                tag: tag.clone(),
                value: Some(summary::value::Value::SimpleValue(*v as f32)),
                metadata: None,
            })
            .collect();
        self.write(Event {
            wall_time: now_s(),
            step: step as i64,
            what: Some(event::What::Summary(Summary { value })),
        });
    }

    /// A log line's figures (flushed: the log interval is when files are made readable).
    pub fn train(&mut self, p: &TrainPoint) {
        let mut v = vec![
            ("train/loss".to_string(), p.loss),
            ("train/top1_error".into(), p.top1_err),
            ("train/images_per_second".into(), p.images_per_s),
            ("train/learning_rate".into(), p.lr as f64),
            ("train/eta_seconds".into(), p.eta_s),
        ];
        if let Some(e) = p.top5_err {
            v.push(("train/top5_error".into(), e));
        }
        self.scalars(p.step, &v);
        self.flush();
    }

    /// Every rank's exchange figures at `step`.
    pub fn ranks(&mut self, step: u64, ranks: &[RankPoint]) {
        let mut v = Vec::new();
        for r in ranks {
            let t = |what: &str| format!("exchange/rank{}/{what}", r.rank);
            v.push((t("column_share"), r.column_share));
            v.push((t("replica_share"), r.replica_share));
            v.push((t("column_bytes_per_step"), r.column_bytes_per_step));
            v.push((t("replica_bytes_per_step"), r.replica_bytes_per_step));
        }
        if !v.is_empty() {
            self.scalars(step, &v);
            self.flush();
        }
    }

    /// An epoch's end.
    pub fn validation(&mut self, p: &ValPoint) {
        let mut v = vec![
            ("validation/loss".to_string(), p.loss),
            ("validation/top1_error".into(), p.top1_err),
            ("epoch/train_loss".into(), p.train_loss as f64),
            ("epoch/seconds".into(), p.seconds),
            ("epoch/images_per_second".into(), p.images_per_s),
        ];
        if let Some(e) = p.top5_err {
            v.push(("validation/top5_error".into(), e));
        }
        self.scalars(p.step, &v);
        self.flush();
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scalars(path: &Path) -> Vec<(i64, String, f32)> {
        read_events(path)
            .unwrap()
            .into_iter()
            .filter_map(|e| match e.what {
                Some(event::What::Summary(s)) => Some((e.step, s)),
                _ => None,
            })
            .flat_map(|(step, s)| {
                s.value.into_iter().map(move |v| match v.value {
                    Some(summary::value::Value::SimpleValue(x)) => (step, v.tag, x),
                    None => (step, v.tag, f32::NAN),
                })
            })
            .collect()
    }

    #[test]
    fn the_crc_is_tensorflows_masked_crc32c() {
        // TensorFlow's record of an empty string: length 0, then two masked CRCs.
        let r = frame(b"");
        assert_eq!(r.len(), 16);
        assert_eq!(
            u32::from_le_bytes(r[8..12].try_into().unwrap()),
            masked_crc(&[0u8; 8])
        );
        // crc32c("123456789") = 0xe3069283, the standard check value.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(
            masked_crc(b"123456789"),
            0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8)
        );
    }

    #[test]
    fn a_continued_run_cuts_the_curves_back_to_its_checkpoint() {
        let run = std::env::temp_dir().join(format!("alexnet-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run);
        let mut w = EventWriter::open(&run, 0).unwrap();
        for step in 1..=6 {
            w.scalars(step, &[("train/loss".into(), step as f64)]);
        }
        let first = w.path().to_path_buf();
        drop(w);
        // A torn record at the end (a killed writer) is left out when the file is read, and
        // cut off when the folder is cut back, even to a step that keeps every event.
        let mut f = File::options().append(true).open(&first).unwrap();
        f.write_all(&frame(b"torn")[..10]).unwrap();
        drop(f);
        assert_eq!(scalars(&first).len(), 6);
        cut_back(&folder(&run), 100).unwrap();
        assert!(
            !read_records(&first).unwrap().1,
            "the torn tail is still there"
        );
        assert_eq!(scalars(&first).len(), 6);
        // A rewrite's leftover is removed, never read as a curve.
        std::fs::write(folder(&run).join(".cut-partial"), b"x").unwrap();
        std::fs::write(folder(&run).join("events.out.tfevents.1.h.0009.tmp"), b"x").unwrap();

        let mut w = EventWriter::open(&run, 4).unwrap();
        w.scalars(5, &[("train/loss".into(), 50.0)]);
        let second = w.path().to_path_buf();
        drop(w);
        assert!(first < second, "files sort in the order they were made");
        let all: Vec<_> = event_files(&folder(&run))
            .iter()
            .flat_map(|p| scalars(p))
            .map(|(s, _, v)| (s, v))
            .collect();
        assert_eq!(all, vec![(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]);
        let names: Vec<String> = std::fs::read_dir(folder(&run))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| !n.ends_with(".tmp") && !n.starts_with(".cut-")),
            "{names:?}"
        );

        // A fresh run in the same folder starts its curves afresh.
        drop(EventWriter::open(&run, 0).unwrap());
        assert!(event_files(&folder(&run))
            .iter()
            .all(|p| scalars(p).is_empty()));
        std::fs::remove_dir_all(&run).unwrap();
    }
}
