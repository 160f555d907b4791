//! `alexnet status`: a running job's state, as a table or JSON.

use super::StatusArgs;
use alexnet::auth::read_token;
use alexnet::launch::{COORDINATOR_FILE, TOKEN_FILE};
use anyhow::Context;
use std::path::{Path, PathBuf};

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
    let s = rt.block_on(async {
        let mut client = alexnet::worker::client(&opts).await?;
        anyhow::Ok(
            client
                .status(alexnet::proto::StatusRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("status: {}", s.message()))?
                .into_inner(),
        )
    })?;
    if a.json {
        let workers: Vec<serde_json::Value> = s
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({"rank": w.rank, "host": w.host, "device": w.device, "pid": w.pid,
                    "state": w.state, "step": w.step, "seconds_since_heard": w.seconds_since_heard,
                    "rss_bytes": w.rss_bytes, "error": w.error})
            })
            .collect();
        let v = serde_json::json!({"job_id": s.job_id, "generation": s.generation, "state": s.state,
            "world_size": s.world_size, "step": s.step, "total_steps": s.total_steps, "epoch": s.epoch,
            "loss": s.loss, "images_per_s": s.images_per_s, "eta_seconds": s.eta_seconds,
            "config_hash": s.config_hash, "error": s.error, "workers": workers});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "job {} (generation {}, config {}): {}",
        s.job_id, s.generation, s.config_hash, s.state
    );
    if !s.error.is_empty() {
        println!("error: {}", s.error);
    }
    println!(
        "step {}/{}  epoch {}  loss {:.4}  {:.1} images/s  ETA {:.0}s",
        s.step, s.total_steps, s.epoch, s.loss, s.images_per_s, s.eta_seconds
    );
    println!("rank  state     step  heard(s)  rss(MiB)  host / device / pid");
    for w in &s.workers {
        println!(
            "{:>4}  {:<8} {:>5}  {:>8.1}  {:>8}  {} / {} / {}{}",
            w.rank,
            w.state,
            w.step,
            w.seconds_since_heard,
            w.rss_bytes >> 20,
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
    Ok(())
}
