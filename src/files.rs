//! Files that are either whole or absent: every file the project keeps (datasets, checkpoints,
//! reports, run files) is written into a temporary file, flushed to disk and renamed.

use anyhow::{bail, Result};
use std::io::Write;
use std::path::Path;

/// A write that failed because the disk is full: callers that know what the file is for add
/// what to do (free space, another output, resume).
#[derive(Debug, thiserror::Error)]
#[error("the disk is full")]
pub struct DiskFull;

/// Whether `e` or one of its causes is a full disk.
pub fn is_disk_full(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<DiskFull>())
}

/// The bytes an unprivileged process may still write on the file system holding `dir`
/// (`None` where the system does not say).
pub fn free_space(dir: &Path) -> Option<u64> {
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        // SAFETY: `c` is a valid C string and `st` a writable statvfs the call fills.
        if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
            return None;
        }
        Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        None
    }
}

/// Bytes for people: MiB below a GiB, GiB above.
pub fn human_bytes(b: u64) -> String {
    if b < 1 << 30 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    }
}

/// Writes `bytes` to `path` atomically: a temporary file, flushed to disk, then renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Writes `path` atomically with `fill`: into a temporary file, flushed to disk, then renamed;
/// on failure the temporary file is removed and the error names the file (and says when the
/// disk is full).
pub fn write_atomic_with(
    path: &Path,
    fill: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    let result = (|| -> std::io::Result<()> {
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        fill(&mut w)?;
        let f = w.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        if e.raw_os_error() == Some(28) {
            return Err(anyhow::Error::new(DiskFull).context(format!("writing {}", path.display())));
        }
        bail!("writing {}: {e}", path.display());
    }
    Ok(())
}

pub fn sync_dir(dir: &Path) {
    // Makes the renames durable; not every file system supports it, and nothing depends on it
    // beyond durability, so a failure is not an error.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// This host's name (for logs, event file names and registrations).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
