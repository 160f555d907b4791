//! `alexnet status`: a running job's state, as a table or JSON.

use super::StatusArgs;
use alexnet::auth::read_token;
use alexnet::launch::{COORDINATOR_FILE, TOKEN_FILE};
use alexnet::proto::JobStatus;
use anyhow::Context;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The coordinator asked when nothing names one.
const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:50051";

/// The live run a status call is about: `--run`, else the current folder if it is a live run,
/// else the one live run under ./runs. `None`: no run folder (then `--coordinator` or the
/// default address).
fn run_folder(a: &StatusArgs) -> anyhow::Result<Option<PathBuf>> {
    let live = |d: &Path| d.join(COORDINATOR_FILE).is_file();
    if let Some(dir) = &a.run {
        anyhow::ensure!(
            dir.join("job.json").is_file(),
            "--run {}: not a run folder (no job.json)",
            dir.display()
        );
        anyhow::ensure!(
            live(dir),
            "--run {}: no coordinator serves this run now ({} is written while `alexnet \
             launch` or `alexnet coordinator` runs it): it has ended (see its report.csv and \
             rank logs), or its coordinator runs elsewhere (pass --coordinator URL)",
            dir.display(),
            dir.join(COORDINATOR_FILE).display()
        );
        return Ok(Some(dir.clone()));
    }
    if a.coordinator.is_some() {
        return Ok(None);
    }
    if live(Path::new(".")) {
        return Ok(Some(PathBuf::from(".")));
    }
    let mut runs: Vec<PathBuf> = std::fs::read_dir("runs")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| live(p))
                .collect()
        })
        .unwrap_or_default();
    runs.sort();
    match runs.len() {
        0 => Ok(None),
        1 => Ok(runs.pop()),
        _ => anyhow::bail!(
            "{} live runs under ./runs ({}): name one with --run DIR",
            runs.len(),
            runs.iter()
                .map(|r| r.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let run = run_folder(&a)?;
    let coordinator = match (&a.coordinator, &run) {
        (Some(url), _) => url.clone(),
        (None, Some(dir)) => {
            let path = dir.join(COORDINATOR_FILE);
            std::fs::read_to_string(&path)
                .with_context(|| format!("reading the run's address {}", path.display()))?
                .trim()
                .to_string()
        }
        (None, None) => DEFAULT_COORDINATOR.to_string(),
    };
    let token = match (read_token(a.token_file.as_deref())?, &run) {
        (Some(t), _) => Some(t),
        (None, Some(dir)) if dir.join(TOKEN_FILE).is_file() => {
            read_token(Some(&dir.join(TOKEN_FILE)))?
        }
        (None, _) => None,
    };
    let opts = alexnet::worker::WorkerOptions {
        tls_ca: a
            .tls_ca
            .as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("reading --tls-ca {}", p.display())))
            .transpose()?,
        ..alexnet::worker::WorkerOptions::client_of(&coordinator, token)
    };
    let fetch = || {
        rt.block_on(async {
            let mut client = alexnet::worker::client(&opts).await?;
            // A coordinator that is stopped or cut off mid-call must not hang the watch.
            let answer = tokio::time::timeout(
                Duration::from_secs(10),
                client.status(alexnet::proto::StatusRequest {}),
            )
            .await
            .map_err(|_| anyhow::anyhow!("status: no answer within 10s"))?;
            anyhow::Ok(
                answer
                    .map_err(|s| anyhow::anyhow!("status: {}", s.message()))?
                    .into_inner(),
            )
        })
    };
    if a.watch {
        return watch(&fetch, a.interval, run.as_deref());
    }
    let s = fetch()?;
    if a.json {
        let workers: Vec<serde_json::Value> = s
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({"rank": w.rank, "host": w.host, "device": w.device, "pid": w.pid,
                    "state": w.state, "step": w.step, "seconds_since_heard": w.seconds_since_heard,
                    "rss_bytes": w.rss_bytes, "error": w.error, "replica": w.replica,
                    "columns": w.columns, "images_per_s": w.images_per_s,
                    "column_share": w.column_share, "replica_share": w.replica_share,
                    "column_bytes": w.column_bytes, "replica_bytes": w.replica_bytes, "slot": w.slot})
            })
            .collect();
        let v = serde_json::json!({"job_id": s.job_id, "generation": s.generation, "state": s.state,
            "world_size": s.world_size, "replicas": s.replicas, "max_replicas": s.max_replicas,
            "world": s.world, "step": s.step, "total_steps": s.total_steps, "epoch": s.epoch,
            "loss": s.loss, "images_per_s": s.images_per_s, "eta_seconds": s.eta_seconds,
            "config_hash": s.config_hash, "error": s.error, "workers": workers, "lr": s.lr,
            "top1_err": s.top1_err, "top5_err": s.top5_err,
            "last_checkpoint_step": s.last_checkpoint_step, "restarts_left": s.restarts_left,
            "last_epoch": s.last_epoch.as_ref().map(|e| serde_json::json!({"epoch": e.epoch,
                "train_loss": e.train_loss, "val_loss": e.val_loss,
                "val_top1_err": e.val_top1_err, "val_top5_err": e.val_top5_err,
                "seconds": e.seconds}))});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    print!("{}", render(&s, None));
    Ok(())
}

/// Redraws the status every `interval` until the job is over; a coordinator that goes away
/// ends the watch (a run's folder says whether the run ended).
fn watch(
    fetch: &dyn Fn() -> anyhow::Result<JobStatus>,
    interval: Duration,
    run: Option<&Path>,
) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    let mut last: Option<JobStatus> = None;
    loop {
        let s = match fetch() {
            Ok(s) => s,
            Err(e) => {
                let Some(last) = &last else { return Err(e) };
                // The coordinator ends with its job, often between two looks.
                if let Some(dir) = run.filter(|d| !d.join(COORDINATOR_FILE).exists()) {
                    println!("the run has ended: its report is in {}", dir.display());
                    return Ok(());
                }
                if last.total_steps > 0 && last.step >= last.total_steps {
                    println!(
                        "the job has ended (step {} of {}) and its coordinator with it",
                        last.step, last.total_steps
                    );
                    return Ok(());
                }
                return Err(e.context("the coordinator stopped answering"));
            }
        };
        let mut frame = render(&s, Some(interval));
        if tty {
            // Home and clear, then the frame: a redraw in place.
            frame = format!("\x1b[H\x1b[2J{frame}");
        } else {
            frame.push('\n');
        }
        print!("{frame}");
        use std::io::Write;
        let _ = std::io::stdout().flush();
        // A failed generation with restarts left is followed by the next one: keep watching.
        if s.state == "finished" || (s.state == "failed" && s.restarts_left == 0) {
            return Ok(());
        }
        last = Some(s);
        std::thread::sleep(interval);
    }
}

/// A progress bar of `width` cells for `done` of `total`.
fn bar(done: u64, total: u64, width: usize) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((done.min(total) as f64 / total as f64) * width as f64).round() as usize
    };
    format!("[{}{}]", "#".repeat(filled), "-".repeat(width - filled))
}

/// Seconds as 1h02m03s, 2m03s or 3s.
fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s:02}s"),
        (h, m, s) => format!("{h}h{m:02}m{s:02}s"),
    }
}

/// The status as text: the job, its progress bar and ETA, its newest figures, and a row per
/// rank. `watching`: the redraw interval, said in the last line.
pub fn render(s: &JobStatus, watching: Option<Duration>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "job {} (generation {}, config {}): {}{}",
        s.job_id,
        s.generation,
        s.config_hash,
        s.state,
        if s.restarts_left > 0 {
            format!(", {} restart(s) left", s.restarts_left)
        } else {
            String::new()
        }
    );
    if !s.error.is_empty() {
        let label = if s.state == "regrouping" {
            "why"
        } else {
            "error"
        };
        let _ = writeln!(out, "{label}: {}", s.error);
    }
    if s.max_replicas > s.replicas || !s.world.is_empty() {
        let _ = writeln!(
            out,
            "replicas {} of at most {} (elastic){}",
            s.replicas,
            s.max_replicas,
            if s.world.is_empty() {
                String::new()
            } else {
                format!(": {}", s.world)
            }
        );
    }
    let pct = if s.total_steps > 0 {
        100.0 * s.step as f64 / s.total_steps as f64
    } else {
        0.0
    };
    let _ = writeln!(
        out,
        "{} {pct:5.1}%  step {}/{}  epoch {}  ETA {}",
        bar(s.step, s.total_steps, 30),
        s.step,
        s.total_steps,
        s.epoch,
        duration(s.eta_seconds)
    );
    let _ = writeln!(
        out,
        "loss {:.4}  top-1 err {:.3}  top-5 err {:.3}  lr {}  {:.1} images/s{}",
        s.loss,
        s.top1_err,
        s.top5_err,
        s.lr,
        s.images_per_s,
        if s.last_checkpoint_step > 0 {
            format!("  checkpoint at step {}", s.last_checkpoint_step)
        } else {
            String::new()
        }
    );
    if let Some(e) = &s.last_epoch {
        let _ = writeln!(
            out,
            "epoch {}: train loss {:.4}  val loss {:.4}  val top-1 err {:.3}  top-5 err {:.3}  ({})",
            e.epoch,
            e.train_loss,
            e.val_loss,
            e.val_top1_err,
            e.val_top5_err,
            duration(e.seconds)
        );
    }
    let _ = writeln!(
        out,
        "rank  rep/col  state     step  images/s  heard(s)  column%  replica%  rss(MiB)  gen  host / device / pid"
    );
    for w in &s.workers {
        let cols: Vec<String> = w.columns.iter().map(|c| c.to_string()).collect();
        let _ = writeln!(
            out,
            "{:>4}  {:>7}  {:<8} {:>5}  {:>8.1}  {:>8.1}  {:>7.1}  {:>8.1}  {:>8}  {:>3}  {} / {} / {}{}",
            w.rank,
            format!("{}/{}", w.replica, cols.join("+")),
            w.state,
            w.step,
            w.images_per_s,
            w.seconds_since_heard,
            100.0 * w.column_share,
            100.0 * w.replica_share,
            w.rss_bytes >> 20,
            s.generation,
            w.host,
            w.device,
            w.pid,
            if w.error.is_empty() {
                String::new()
            } else {
                format!("  ({})", w.error)
            }
        );
    }
    if let Some(every) = watching {
        let _ = writeln!(
            out,
            "(redrawn every {}s; Ctrl-C stops watching, not the job)",
            every.as_secs_f64()
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use alexnet::proto::{EpochResult, WorkerStatus};

    #[test]
    fn the_status_shows_a_bar_with_eta_and_a_row_per_rank() {
        let s = JobStatus {
            job_id: "j1".into(),
            state: "running".into(),
            step: 23,
            total_steps: 46,
            epoch: 1,
            eta_seconds: 125.0,
            generation: 2,
            last_epoch: Some(EpochResult {
                epoch: 1,
                val_top1_err: 0.5,
                ..Default::default()
            }),
            workers: (0..2)
                .map(|r| WorkerStatus {
                    rank: r,
                    state: "running".into(),
                    columns: vec![r],
                    images_per_s: 210.0,
                    column_share: 0.025,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        let text = render(&s, Some(Duration::from_secs(2)));
        assert!(
            text.contains(&format!("[{}{}]  50.0%", "#".repeat(15), "-".repeat(15))),
            "{text}"
        );
        assert!(text.contains("ETA 2m05s"), "{text}");
        assert!(text.contains("val top-1 err 0.500"), "{text}");
        let rows: Vec<&str> = text.lines().filter(|l| l.contains("running ")).collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert!(rows[1].contains("0/1") && rows[1].contains("210.0") && rows[1].contains("2.5"));
        assert!(text.contains("redrawn every 2s"));
        assert_eq!(duration(3725.0), "1h02m05s");
        assert_eq!(bar(5, 0, 4), "[----]");
    }
}
