//! `alexnet launch`: one machine's whole job. Starts the coordinator in this process and one
//! worker process per device, prefixes each worker's log lines with its rank, keeps one log
//! file per rank in the run folder, and on failure names the first rank that failed, its exit
//! status and its last error.

use super::{Coordinator, CoordinatorConfig, ExchangeSeconds, Phase};
use crate::spawn::{spawn_worker, WorkerSpec};
use anyhow::Context;
use std::path::PathBuf;
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub coordinator: CoordinatorConfig,
    /// Where job.json, the per-rank logs and the parameters go.
    pub run_dir: PathBuf,
    /// Compute threads per worker.
    pub threads_per_worker: usize,
    /// Each rank's device (`cpu`, `cuda:N`), by rank modulo its length.
    pub devices: Vec<String>,
    /// The binary to start workers from (this one).
    pub exe: PathBuf,
    /// Workers log JSON lines instead of text.
    pub json_logs: bool,
    /// Restarts (new generations from the newest checkpoint) allowed after failures.
    pub max_restarts: usize,
    /// How the workers' devices run.
    pub settings: crate::backend::DeviceSettings,
}

/// How a launch ended.
#[derive(Debug)]
pub struct LaunchOutcome {
    pub phase: Phase,
    /// "rank R exited with STATUS: LAST ERROR" for the first worker that failed.
    pub first_failure: Option<String>,
    pub results: Vec<crate::train::checkpoint::EpochRecord>,
    /// Per rank: seconds in the column exchange, the replica exchange, and training.
    pub exchange_seconds: Vec<ExchangeSeconds>,
    pub restarts: usize,
}

/// Writes the run folder's job.json and job-id (what `--resume` reads back).
pub fn write_run_files(run_dir: &std::path::Path, cfg: &CoordinatorConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("creating the run folder {}", run_dir.display()))?;
    crate::files::write_atomic(
        &run_dir.join("job.json"),
        serde_json::to_string_pretty(&cfg.job)?.as_bytes(),
    )?;
    crate::files::write_atomic(&run_dir.join("job-id"), cfg.job_id.as_bytes())
}

/// Runs the job, restarting every worker from the newest complete checkpoint in a new
/// generation after a failure, up to `max_restarts` times.
pub fn run(opts: LaunchOptions) -> anyhow::Result<LaunchOutcome> {
    write_run_files(&opts.run_dir, &opts.coordinator)?;
    let mut cfg = opts.coordinator.clone();
    cfg.restarts_left = opts.max_restarts as u32;
    let mut restarts = 0;
    loop {
        let mut outcome = run_generation(&opts, &cfg)?;
        outcome.restarts = restarts;
        let Phase::Failed { rank, error } = &outcome.phase else {
            return Ok(outcome);
        };
        if cfg.restarts_left == 0 {
            if opts.max_restarts > 0 {
                tracing::error!(
                    restarts,
                    "no restarts left (--max-restarts {})",
                    opts.max_restarts
                );
            }
            return Ok(outcome);
        }
        restarts += 1;
        let next = Coordinator::next_generation(&cfg)?;
        tracing::warn!(
            failed_rank = ?rank,
            generation = next.generation,
            from_step = next.resume.as_ref().map(|r| r.1.step).unwrap_or(0),
            restart = restarts,
            of = opts.max_restarts,
            "restarting the workers after the failure ({error}) from the newest complete checkpoint"
        );
        cfg = next;
    }
}

struct RankProcess {
    rank: usize,
    child: Child,
    last_error: Arc<Mutex<Option<String>>>,
    status: Option<std::process::ExitStatus>,
    /// Killed by the launcher after the job ended without it.
    killed: bool,
}

fn run_generation(opts: &LaunchOptions, cfg: &CoordinatorConfig) -> anyhow::Result<LaunchOutcome> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let coordinator = Coordinator::new(cfg.clone())?;
    // Everything stays on loopback: a one-machine job is reachable from nowhere else.
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let url = format!("http://{}", listener.local_addr()?);
    tracing::info!(
        coordinator = %url,
        job = %cfg.job_id,
        run_dir = %opts.run_dir.display(),
        workers = cfg.job.topology.world_size(),
        "coordinator listening (loopback only)"
    );
    let server = rt.spawn(coordinator.clone().serve(listener));
    let world = cfg.job.topology.world_size();
    let mut procs = Vec::new();
    for rank in 0..world {
        let spec = WorkerSpec {
            exe: opts.exe.clone(),
            json_logs: opts.json_logs,
            coordinator: url.clone(),
            device: opts.devices[rank % opts.devices.len().max(1)].clone(),
            threads: opts.threads_per_worker,
            settings: opts.settings.clone(),
            rank: Some(rank as u32),
            job_id: Some(cfg.job_id.clone()),
            config_hash: Some(coordinator.config_hash().to_string()),
            connect_timeout: None,
            out: Some(opts.run_dir.join("params")),
            tls_ca: None,
            tls_domain: None,
            token: cfg.token.clone(),
            label: rank.to_string(),
            // One log per rank, kept across generations.
            log_file: Some(opts.run_dir.join(format!("rank{rank}.log"))),
        };
        let last_error = Arc::new(Mutex::new(None));
        let child = spawn_worker(&spec, last_error.clone())?;
        procs.push(RankProcess {
            rank,
            child,
            last_error,
            status: None,
            killed: false,
        });
    }
    let phase = coordinator.phase();
    let mut first_failure: Option<String> = None;
    let mut over_since: Option<Instant> = None;
    // After the job ends, workers get this long to exit before they are killed.
    let grace = cfg.peer_timeout + Duration::from_secs(5);
    loop {
        for p in procs.iter_mut().filter(|p| p.status.is_none()) {
            if let Some(status) = p.child.try_wait()? {
                p.status = Some(status);
                if !status.success() {
                    // Let the output threads catch the last lines.
                    std::thread::sleep(Duration::from_millis(100));
                    let last = p.last_error.lock().unwrap().clone();
                    let line = format!(
                        "rank {} exited with {status}{}",
                        p.rank,
                        last.map(|l| format!(": {l}")).unwrap_or_default()
                    );
                    if first_failure.is_none() {
                        first_failure = Some(line.clone());
                        coordinator.fail(
                            Some(p.rank as u32),
                            format!("its process exited with {status}"),
                        );
                    }
                }
            }
        }
        if procs.iter().all(|p| p.status.is_some()) {
            break;
        }
        if phase.borrow().is_over() {
            let since = *over_since.get_or_insert_with(Instant::now);
            if since.elapsed() > grace {
                for p in procs.iter_mut().filter(|p| p.status.is_none()) {
                    tracing::warn!(
                        rank = p.rank,
                        "still running {grace:?} after the job ended: killing it"
                    );
                    let _ = p.child.kill();
                    p.killed = true;
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !phase.borrow().is_over() {
        coordinator.fail(None, "every worker exited before the job finished".into());
    }
    // The coordinator's verdict names the rank that failed first (a worker that lost its peer
    // blames the peer); the launcher adds what became of that rank's process.
    if let Phase::Failed {
        rank: Some(rank),
        error,
    } = &*phase.borrow()
    {
        if let Some(p) = procs.iter().find(|p| p.rank == *rank as usize) {
            let fate = match (p.status, p.killed) {
                (_, true) => "was killed after the job ended".to_string(),
                (Some(s), false) => format!("exited with {s}"),
                (None, false) => "is gone".to_string(),
            };
            let last = p.last_error.lock().unwrap().clone();
            first_failure = Some(format!(
                "rank {rank} {fate}: {error}{}",
                last.map(|l| format!("; its last error: {l}"))
                    .unwrap_or_default()
            ));
        }
    }
    let end = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), server).await })
        .context("the coordinator did not stop")???;
    Ok(LaunchOutcome {
        phase: end,
        first_failure,
        results: coordinator.results(),
        exchange_seconds: coordinator.exchange_seconds(),
        restarts: 0,
    })
}
