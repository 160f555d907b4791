//! `alexnet status`: a running job's state, as a table or JSON.

use super::StatusArgs;
use alexnet::auth::read_token;
use anyhow::Context;

pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let token = read_token(a.token_file.as_deref())?;
    let opts = alexnet::worker::WorkerOptions {
        tls_ca: a
            .tls_ca
            .as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("reading --tls-ca {}", p.display())))
            .transpose()?,
        ..alexnet::worker::WorkerOptions::client_of(&a.coordinator, token)
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
