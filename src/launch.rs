//! `alexnet launch`: one machine's whole job, as torchrun's `--standalone` is: the coordinator
//! in this process (every generation behind one loopback address) and the same host agent
//! that multi-host jobs run ([`crate::agent::supervise`]), starting one worker per rank,
//! forwarding their logs with rank prefixes into one log file per rank, and restarting them
//! into the next generation after a failure. On failure it names the first rank that failed,
//! its exit status and its last error.

use crate::agent::{self, AgentOptions, Coordinated};
use crate::coordinator::generations::Supervisor;
use crate::coordinator::{CoordinatorConfig, ExchangeSeconds, Phase};
use crate::telemetry::prometheus::AgentBoard;
use anyhow::Context;
use std::path::PathBuf;
use std::process::ExitStatus;
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
    /// Where `/metrics` is served (the job's and this host's workers'), if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
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
    /// The newest step trained and its loss.
    pub last_step: Option<(u64, f32)>,
    /// Stopped by SIGINT or SIGTERM before the job ended.
    pub stopped: bool,
}

/// The coordinator beside the agent, in this process: a worker's death fails its generation
/// at once (naming the rank and the exit status), and the agent learns when the job is over.
struct Beside {
    supervisor: Supervisor,
    /// After the job ends, workers get this long to exit before they are killed.
    grace: Duration,
    /// "rank R exited with STATUS: LAST ERROR", for the first failure.
    first_failure: Mutex<Option<String>>,
}

impl Coordinated for Beside {
    fn worker_failed(
        &self,
        rank: Option<u32>,
        started: Instant,
        status: ExitStatus,
        last_error: Option<&str>,
    ) {
        let current = self.supervisor.current();
        // A worker of an earlier generation that ends after its generation's abort is not a
        // failure of the one that replaced it.
        if started < current.started() {
            return;
        }
        let line = format!(
            "rank {} exited with {status}{}",
            rank.map(|r| r.to_string()).unwrap_or_else(|| "?".into()),
            last_error.map(|l| format!(": {l}")).unwrap_or_default()
        );
        self.first_failure.lock().unwrap().get_or_insert(line);
        current.fail(rank, format!("its process exited with {status}"));
    }

    fn over(&self) -> Option<Duration> {
        self.supervisor.over().map(|_| self.grace)
    }
}

/// Where `alexnet status --run RUN_DIR` finds a live run: its coordinator's URL in
/// `RUN_DIR/coordinator`, its token in `RUN_DIR/token` (readable by its owner only). Removed
/// when the run ends, so that a stale address is not mistaken for a live one.
pub struct RunAddress {
    files: Vec<PathBuf>,
}

/// The file holding a live run's coordinator URL.
pub const COORDINATOR_FILE: &str = "coordinator";
/// The file holding a run's job token.
pub const TOKEN_FILE: &str = "token";

impl RunAddress {
    pub fn write(
        run_dir: &std::path::Path,
        url: &str,
        token: Option<&crate::auth::Secret>,
    ) -> anyhow::Result<RunAddress> {
        let mut files = Vec::new();
        if let Some(t) = token {
            let path = run_dir.join(TOKEN_FILE);
            crate::auth::write_private(&path, t.expose().as_bytes())?;
            files.push(path);
        }
        let path = run_dir.join(COORDINATOR_FILE);
        crate::files::write_atomic(&path, format!("{url}\n").as_bytes())?;
        files.push(path);
        Ok(RunAddress { files })
    }
}

impl Drop for RunAddress {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Runs the job: its workers are restarted from the newest complete checkpoint in a new
/// generation after a failure, up to `max_restarts` times.
pub fn run(opts: LaunchOptions) -> anyhow::Result<LaunchOutcome> {
    crate::coordinator::write_run_files(&opts.run_dir, &opts.coordinator)?;
    let mut cfg = opts.coordinator.clone();
    cfg.restarts_left = opts.max_restarts as u32;
    let first_generation = cfg.generation;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stop = agent::stop_on_signal(&rt);
    let supervisor = Supervisor::new(cfg.clone())?.restarting_workers();
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
    let watch = RunAddress::write(&opts.run_dir, &url, cfg.token.as_ref())?;
    tracing::info!(
        "watch it with `alexnet status --run {}`",
        opts.run_dir.display()
    );
    let board = Arc::new(AgentBoard::default());
    board.update(|b| b.job_id = cfg.job_id.clone());
    if let Some(addr) = opts.metrics_listen {
        let (s, b) = (supervisor.clone(), board.clone());
        let _in_runtime = rt.enter();
        crate::telemetry::prometheus::serve(
            addr,
            Arc::new(move || {
                s.metrics() + &crate::telemetry::prometheus::encode_agent(&b.0.lock().unwrap())
            }),
        )?;
    }
    let server = rt.spawn(supervisor.clone().serve(listener));
    let beside = Beside {
        supervisor: supervisor.clone(),
        grace: cfg.peer_timeout + Duration::from_secs(5),
        first_failure: Mutex::new(None),
    };
    let host = AgentOptions {
        coordinator: url,
        job_id: Some(cfg.job_id.clone()),
        config_hash: Some(supervisor.current().config_hash().to_string()),
        node_rank: Some(0),
        workers: cfg.job.topology.world_size(),
        devices: opts.devices.clone(),
        threads_per_worker: Some(opts.threads_per_worker),
        // The coordinator counts restarts in generations, and ends the job when none is left.
        max_restarts: None,
        // A worker's own default.
        rejoin_timeout: Duration::from_secs(30),
        max_clock_skew: cfg.max_clock_skew,
        token: cfg.token.clone(),
        tls_ca: None,
        tls_domain: None,
        exe: opts.exe.clone(),
        json_logs: opts.json_logs,
        // One log per rank, kept across generations.
        log_dir: Some(opts.run_dir.clone()),
        out: Some(opts.run_dir.join("params")),
        settings: opts.settings.clone(),
        metrics_listen: None,
        board: Some(board),
    };
    let (watched, fates) = agent::supervise(&host, &stop, &beside);
    let stopped = stop.load(std::sync::atomic::Ordering::SeqCst);
    if supervisor.over().is_none() {
        supervisor.abandon(match &watched {
            _ if stopped => "stopped by a signal".into(),
            Err(e) => format!("{e:#}"),
            Ok(()) => "every worker exited before the job finished".into(),
        });
    }
    let (phase, last) = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), server).await })
        .context("the coordinator did not stop")???;
    drop(watch);
    let mut first_failure = beside.first_failure.into_inner().unwrap();
    // The coordinator's verdict names the rank that failed first (a worker that lost its peer
    // blames the peer); the launcher adds what became of that rank's process.
    if let Phase::Failed {
        rank: Some(rank),
        error,
        ..
    } = &phase
    {
        if let Some(w) = fates.iter().find(|w| w.rank == Some(*rank)) {
            let fate = match (w.status, w.killed) {
                (_, true) => "was killed after the job ended".to_string(),
                (Some(s), false) => format!("exited with {s}"),
                (None, false) => "is gone".to_string(),
            };
            first_failure = Some(format!(
                "rank {rank} {fate}: {error}{}",
                w.last_error
                    .as_ref()
                    .map(|l| format!("; its last error: {l}"))
                    .unwrap_or_default()
            ));
        }
    }
    if first_failure.is_none() && !stopped {
        if let Err(e) = watched {
            first_failure = Some(format!("{e:#}"));
        }
    }
    Ok(LaunchOutcome {
        phase,
        first_failure,
        results: last.results(),
        exchange_seconds: last.exchange_seconds(),
        restarts: (last.generation() - first_generation) as usize,
        last_step: last.last_step(),
        stopped,
    })
}
