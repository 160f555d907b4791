//! `alexnet agent`: the launcher of one host in a multi-host job (what torchrun is per node).
//!
//! It checks that the coordinator runs this agent's job, binary version and (within the
//! allowed skew) clock, then starts this host's workers, forwards their logs with rank
//! prefixes, restarts a worker that failed (it rejoins the job's next generation, which
//! resumes from the newest checkpoint) within its restart budget, and stops them all on
//! SIGTERM or SIGINT. A worker's exit status tells it whether a restart can help
//! (`worker::EXIT_REFUSED`, `worker::EXIT_JOB_OVER`).

use crate::admission::{self, Holder, Joiner};
use crate::auth::Secret;
use crate::spawn::{spawn_worker, WorkerSpec};
use crate::telemetry::prometheus::{AgentBoard, AgentWorker};
use crate::worker::{Verdict, WorkerOptions, EXIT_JOB_OVER, EXIT_REFUSED, EXIT_REGROUP};
use anyhow::Context;
use std::path::PathBuf;
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// The coordinator's URL.
    pub coordinator: String,
    /// The job this host was started for; `None` joins whatever job the coordinator runs.
    pub job_id: Option<String>,
    /// The configuration its workers must find (`None`: whatever the job has).
    pub config_hash: Option<String>,
    /// This host's place among the hosts: its workers take ranks
    /// `node_rank * workers .. (node_rank + 1) * workers`. `None`: the next free ranks.
    pub node_rank: Option<u32>,
    /// Workers on this host.
    pub workers: usize,
    /// Each local worker's device (`cpu`, `cuda:N`), by local index modulo its length.
    pub devices: Vec<String>,
    /// Compute threads per worker (`None`: the cores divided among the workers).
    pub threads_per_worker: Option<usize>,
    /// Restarts of this host's workers allowed in all (`None`: no limit here, where the
    /// coordinator beside in this process decides, by ending the job, when restarting stops).
    pub max_restarts: Option<usize>,
    /// How long a (re)started worker keeps trying to reach the coordinator: how long a
    /// host may be cut off and still rejoin.
    pub rejoin_timeout: Duration,
    /// Largest allowed difference between this host's clock and the coordinator's.
    pub max_clock_skew: Duration,
    pub token: Option<Secret>,
    pub tls_ca: Option<PathBuf>,
    pub tls_domain: Option<String>,
    /// The binary to start workers from (this one).
    pub exe: PathBuf,
    pub json_logs: bool,
    /// Where each rank's log file goes (`rank<N>.log`, appended across restarts).
    pub log_dir: Option<PathBuf>,
    /// Where replica 0's workers write their trained columns.
    pub out: Option<PathBuf>,
    /// How the workers' devices run.
    pub settings: crate::backend::DeviceSettings,
    /// Where this agent serves `/metrics`, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// What the agent tells `/metrics` about its workers (made by `run` when it serves them).
    pub board: Option<Arc<AgentBoard>>,
}

impl AgentOptions {
    /// The ranks this host's workers ask for (`None` each: the next free rank).
    pub fn ranks(&self) -> Vec<Option<u32>> {
        (0..self.workers as u32)
            .map(|i| self.node_rank.map(|n| n * self.workers as u32 + i))
            .collect()
    }
}

/// What the agent found out about the coordinator before starting anything.
#[derive(Debug)]
pub struct Peer {
    pub job_id: String,
    pub version: String,
    pub world_size: u32,
    /// The ranks a host may ask for: the world, or an elastic job's largest world (each
    /// generation numbers its whole replicas' workers afresh).
    pub slots: u32,
    /// Coordinator clock minus this host's, corrected for half the round trip.
    pub clock_offset_ms: i64,
    /// Ranks held by live workers.
    pub held: Vec<Holder>,
}

/// Checks the coordinator's answer against this agent: same job, same binary version, clocks
/// within the allowed skew, and the ranks this host claims exist and are free (the rules a
/// worker meets at the coordinator, asked before anything is started).
pub fn check_peer(opts: &AgentOptions, peer: &Peer) -> Result<(), admission::Refusal> {
    let who = Joiner::Agent {
        coordinator: &opts.coordinator,
        node_rank: opts.node_rank.unwrap_or(0),
        workers: opts.workers,
    };
    if let Some(job) = &opts.job_id {
        admission::same_job(&peer.job_id, job, who)?;
    }
    admission::same_version(&peer.version, who)?;
    // The offset is the coordinator's clock minus this host's; the rule takes the other sign.
    admission::clock_within(-peer.clock_offset_ms, false, opts.max_clock_skew, who)?;
    for rank in opts.ranks().into_iter().flatten() {
        admission::rank_exists(rank, peer.slots, &peer.job_id, who)?;
        admission::rank_free(rank, peer.held.iter().find(|h| h.rank == rank), who)?;
    }
    Ok(())
}

/// Asks the coordinator for its job, version, clock and members.
async fn ask_coordinator(opts: &AgentOptions) -> anyhow::Result<Peer> {
    let wopts = WorkerOptions {
        connect_timeout: opts.rejoin_timeout,
        tls_ca: opts
            .tls_ca
            .as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("reading --tls-ca {}", p.display())))
            .transpose()?,
        tls_domain: opts.tls_domain.clone(),
        ..WorkerOptions::client_of(&opts.coordinator, opts.token.clone())
    };
    let mut client = crate::worker::client(&wopts).await?;
    let sent = admission::unix_time_ms();
    let s = tokio::time::timeout(
        Duration::from_secs(30),
        client.status(crate::proto::StatusRequest {}),
    )
    .await
    .context("the coordinator did not answer a status request within 30 s")?
    .map_err(|s| anyhow::anyhow!("the coordinator refused this agent: {}", s.message()))?
    .into_inner();
    let received = admission::unix_time_ms();
    let live = ["joined", "running"];
    let slots = match (s.replicas, s.max_replicas) {
        (r, max) if r > 0 && max > r => s.world_size / r * max,
        _ => s.world_size,
    };
    Ok(Peer {
        job_id: s.job_id,
        version: s.version,
        world_size: s.world_size,
        slots,
        clock_offset_ms: s.unix_time_ms - (sent + received) / 2,
        held: s
            .workers
            .into_iter()
            .filter(|w| live.contains(&w.state.as_str()) && s.state != "failed")
            .map(|w| Holder {
                // Ranks are asked for by slot.
                rank: if s.max_replicas > s.replicas {
                    w.slot
                } else {
                    w.rank
                },
                host: w.host,
                pid: w.pid,
                state: w.state,
            })
            .collect(),
    })
}

struct WorkerProcess {
    /// This host's index of the worker.
    local: usize,
    /// "0", "1", ... or "#0" for a worker whose rank the coordinator picks.
    label: String,
    rank: Option<u32>,
    child: Option<Child>,
    last_error: Arc<Mutex<Option<String>>>,
    /// When its current process started.
    started: Instant,
    /// How its last process ended: status, and its last error line.
    exit: Option<(ExitStatus, Option<String>)>,
    /// Killed by this host after the job was over.
    killed: bool,
    done: bool,
    /// When to start it again after a failure.
    restart_at: Option<Instant>,
    /// Times it was restarted.
    restarts: u64,
}

/// What became of one of this host's workers: how its last process ended.
#[derive(Debug)]
pub struct WorkerFate {
    pub rank: Option<u32>,
    /// Its last process's exit status (`None`: still running, or never started).
    pub status: Option<ExitStatus>,
    /// Killed by the launcher after the job was over.
    pub killed: bool,
    /// The last error line of its last process.
    pub last_error: Option<String>,
}

/// The coordinator a host's workers belong to, as the loop that runs them sees it. An agent on
/// another host knows it only through the network ([`Remote`]); `alexnet launch` runs it in
/// the same process, tells it at once of a worker's death and learns from it when the job is
/// over.
pub trait Coordinated {
    /// A worker started at `started` exited with `status` (not success), its last error line
    /// `last_error`.
    fn worker_failed(
        &self,
        _rank: Option<u32>,
        _started: Instant,
        _status: ExitStatus,
        _last_error: Option<&str>,
    ) {
    }
    /// `Some(grace)` once the job is over for good: failed workers are not restarted, and
    /// workers still running `grace` later are killed. `None` while it goes on (or where
    /// nothing tells: a remote coordinator ends its workers itself).
    fn over(&self) -> Option<Duration> {
        None
    }
}

/// A coordinator on another host: the loop learns of it only through its workers' exits.
pub struct Remote;

impl Coordinated for Remote {}

/// How worker `w` of this host is started.
fn spec(opts: &AgentOptions, w: &WorkerProcess, threads: usize) -> WorkerSpec {
    let log_name = match w.rank {
        Some(r) => format!("rank{r}.log"),
        None => format!("worker{}.log", w.label.trim_start_matches('#')),
    };
    WorkerSpec {
        exe: opts.exe.clone(),
        json_logs: opts.json_logs,
        coordinator: opts.coordinator.clone(),
        device: opts.devices[w.local % opts.devices.len().max(1)].clone(),
        threads,
        settings: opts.settings.clone(),
        rank: w.rank,
        job_id: opts.job_id.clone(),
        config_hash: opts.config_hash.clone(),
        connect_timeout: Some(opts.rejoin_timeout),
        out: opts.out.clone(),
        tls_ca: opts.tls_ca.clone(),
        tls_domain: opts.tls_domain.clone(),
        token: opts.token.clone(),
        label: w.label.clone(),
        log_file: opts.log_dir.as_ref().map(|d| d.join(log_name)),
    }
}

/// Runs this host's part of the job until its workers finish (Ok), the job fails for good,
/// or a signal stops the agent.
pub fn run(opts: AgentOptions) -> anyhow::Result<()> {
    anyhow::ensure!(opts.workers > 0, "--workers must be at least 1");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let stop = stop_on_signal(&rt);
    tracing::info!(coordinator = %opts.coordinator, "asking the coordinator about its job");
    let peer = rt.block_on(ask_coordinator(&opts))?;
    // A mismatch will not go away by itself: the agent's exit status says so (as a worker's).
    check_peer(&opts, &peer).map_err(|e| Verdict::Refused(format!("{e:#}")))?;
    tracing::info!(
        job = %peer.job_id,
        version = %peer.version,
        world = peer.world_size,
        clock_offset_ms = peer.clock_offset_ms,
        "the coordinator runs this job"
    );
    let mut opts = opts;
    if let Some(addr) = opts.metrics_listen {
        let board = Arc::new(AgentBoard::default());
        board.update(|b| b.job_id = peer.job_id.clone());
        let b = board.clone();
        let _in_runtime = rt.enter();
        crate::telemetry::prometheus::serve(
            addr,
            Arc::new(move || crate::telemetry::prometheus::encode_agent(&b.0.lock().unwrap())),
        )?;
        opts.board = Some(board);
    }
    supervise(&opts, &stop, &Remote).0
}

/// A flag raised by SIGTERM or SIGINT, watched on `rt`.
pub fn stop_on_signal(rt: &tokio::runtime::Runtime) -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    rt.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        flag.store(true, Ordering::SeqCst);
    });
    stop
}

/// Starts this host's workers, restarts those that fail (within `opts.max_restarts`, and
/// while `coordinator` says the job goes on), and stops them all on `stop`. Returns how the
/// watch ended and what became of each worker.
pub fn supervise(
    opts: &AgentOptions,
    stop: &AtomicBool,
    coordinator: &dyn Coordinated,
) -> (anyhow::Result<()>, Vec<WorkerFate>) {
    let mut workers = Vec::new();
    let outcome = watch(opts, stop, coordinator, &mut workers);
    stop_all(&mut workers);
    let fates = workers
        .into_iter()
        .map(|w| WorkerFate {
            rank: w.rank,
            status: w.exit.as_ref().map(|e| e.0),
            killed: w.killed,
            last_error: w.exit.and_then(|e| e.1),
        })
        .collect();
    (outcome, fates)
}

fn watch(
    opts: &AgentOptions,
    stop: &AtomicBool,
    coordinator: &dyn Coordinated,
    workers: &mut Vec<WorkerProcess>,
) -> anyhow::Result<()> {
    if let Some(dir) = &opts.log_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the log folder {}", dir.display()))?;
    }
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = opts
        .threads_per_worker
        .unwrap_or((cores / opts.workers).max(1));
    *workers = opts
        .ranks()
        .into_iter()
        .enumerate()
        .map(|(i, rank)| WorkerProcess {
            local: i,
            label: rank.map(|r| r.to_string()).unwrap_or(format!("#{i}")),
            rank,
            child: None,
            last_error: Arc::new(Mutex::new(None)),
            started: Instant::now(),
            exit: None,
            killed: false,
            done: false,
            restart_at: Some(Instant::now()),
            restarts: 0,
        })
        .collect();
    tracing::info!(
        workers = opts.workers,
        ranks = ?opts.ranks(),
        threads_per_worker = threads,
        devices = ?opts.devices,
        "starting this host's workers"
    );
    let mut restarts = 0;
    let mut over_since: Option<Instant> = None;
    loop {
        if stop.load(Ordering::SeqCst) {
            tracing::warn!("stopping on a signal: terminating this host's workers");
            return Err(Verdict::Stopped("this agent was stopped by a signal".into()).into());
        }
        let over = coordinator.over();
        if let Some(grace) = over {
            // The job is over for good: nothing is restarted, stragglers are killed.
            if workers.iter().all(|w| w.child.is_none()) {
                return Ok(());
            }
            let since = *over_since.get_or_insert_with(Instant::now);
            if since.elapsed() > grace {
                for w in workers.iter_mut() {
                    if let Some(c) = w.child.as_mut() {
                        tracing::warn!(
                            rank = %w.label,
                            "still running {grace:?} after the job ended: killing it"
                        );
                        let _ = c.kill();
                        w.killed = true;
                    }
                }
            }
        }
        for w in workers.iter_mut() {
            if let Some(at) = w.restart_at {
                if over.is_some() {
                    w.restart_at = None;
                } else if Instant::now() >= at {
                    w.restart_at = None;
                    w.started = Instant::now();
                    w.child = Some(spawn_worker(&spec(opts, w, threads), w.last_error.clone())?);
                }
            }
        }
        for w in workers.iter_mut() {
            let Some(child) = w.child.as_mut() else {
                continue;
            };
            let Some(status) = child.try_wait()? else {
                continue;
            };
            w.child = None;
            // Let the output threads catch the last lines.
            std::thread::sleep(Duration::from_millis(100));
            let last = w.last_error.lock().unwrap().take();
            w.exit = Some((status, last.clone()));
            let why = |status: ExitStatus| {
                format!(
                    "the worker of rank {} exited with {status}{}",
                    w.label,
                    last.as_ref().map(|l| format!(": {l}")).unwrap_or_default()
                )
            };
            match status.code() {
                Some(0) => {
                    w.done = true;
                    tracing::info!(rank = %w.label, "worker finished");
                }
                Some(c) if c == EXIT_REFUSED as i32 => {
                    return Err(Verdict::Refused(format!("{} (not restarted)", why(status))).into())
                }
                // The coordinator beside knows the job is over; it says how it ended.
                _ if over.is_some() => {}
                // An elastic job's world changes: not a failure, so no restart is counted.
                Some(c) if c == EXIT_REGROUP as i32 => {
                    tracing::info!(
                        rank = %w.label,
                        "the job regroups at a checkpoint (its world changes): restarting the \
                         worker to join the next generation"
                    );
                    w.restart_at = Some(Instant::now() + Duration::from_millis(100));
                }
                Some(c) if c == EXIT_JOB_OVER as i32 => {
                    return Err(Verdict::JobOver(why(status)).into())
                }
                _ => {
                    coordinator.worker_failed(w.rank, w.started, status, last.as_deref());
                    match opts.max_restarts {
                        Some(max) if restarts >= max => {
                            return Err(anyhow::anyhow!(
                                "{}; no restarts left (--max-restarts {max})",
                                why(status)
                            ))
                        }
                        Some(max) => {
                            restarts += 1;
                            tracing::warn!(
                                rank = %w.label,
                                restart = restarts,
                                of = max,
                                "{}; restarting it to rejoin the job",
                                why(status)
                            );
                        }
                        // The coordinator beside names the failure and counts the restarts.
                        None => restarts += 1,
                    }
                    w.restart_at = Some(Instant::now() + Duration::from_secs(1));
                    w.restarts += 1;
                }
            }
        }
        if let Some(board) = &opts.board {
            publish(board, workers, opts.max_restarts, restarts);
        }
        if workers.iter().all(|w| w.done) {
            tracing::info!(restarts, "every worker of this host finished");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What `/metrics` says of this host's workers.
fn publish(board: &AgentBoard, workers: &[WorkerProcess], max: Option<usize>, restarts: usize) {
    board.update(|b| {
        if b.host.is_empty() {
            b.host = crate::files::hostname();
        }
        b.restarts_left = max.map(|m| m.saturating_sub(restarts) as u64);
        b.workers = workers
            .iter()
            .map(|w| AgentWorker {
                rank: w.rank,
                local: w.local,
                running: w.child.is_some(),
                restarts: w.restarts,
            })
            .collect();
    });
}

/// SIGTERM to every running worker, SIGKILL to those still running 10 s later.
fn stop_all(workers: &mut [WorkerProcess]) {
    for w in workers.iter_mut() {
        w.restart_at = None;
    }
    let running: Vec<&mut Child> = workers
        .iter_mut()
        .filter_map(|w| w.child.as_mut())
        .collect();
    if running.is_empty() {
        return;
    }
    for c in &running {
        crate::spawn::terminate(c);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in running {
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() > deadline => {
                    tracing::warn!(
                        pid = c.id(),
                        "a worker ignored SIGTERM for 10 s: killing it"
                    );
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(node_rank: Option<u32>, workers: usize) -> AgentOptions {
        AgentOptions {
            coordinator: "http://10.0.0.1:50051".into(),
            job_id: Some("alpha".into()),
            config_hash: None,
            node_rank,
            workers,
            devices: vec!["cpu".into()],
            threads_per_worker: None,
            max_restarts: Some(3),
            rejoin_timeout: Duration::from_secs(60),
            max_clock_skew: Duration::from_secs(30),
            token: None,
            tls_ca: None,
            tls_domain: None,
            exe: "alexnet".into(),
            json_logs: false,
            log_dir: None,
            out: None,
            settings: Default::default(),
            metrics_listen: None,
            board: None,
        }
    }

    fn peer() -> Peer {
        Peer {
            job_id: "alpha".into(),
            version: crate::proto::VERSION.into(),
            world_size: 4,
            slots: 4,
            clock_offset_ms: 120,
            held: vec![Holder {
                rank: 0,
                host: "host-a".into(),
                pid: 4242,
                state: "joined".into(),
            }],
        }
    }

    #[test]
    fn hosts_take_consecutive_ranks() {
        assert_eq!(opts(Some(1), 2).ranks(), vec![Some(2), Some(3)]);
        assert_eq!(opts(None, 2).ranks(), vec![None, None]);
        check_peer(&opts(Some(1), 2), &peer()).unwrap();
    }

    #[test]
    fn another_job_version_clock_or_a_taken_rank_is_a_clear_error() {
        let err = |o: &AgentOptions, p: &Peer| check_peer(o, p).unwrap_err().to_string();
        let mut p = peer();
        p.job_id = "beta".into();
        let e = err(&opts(Some(1), 2), &p);
        assert!(
            e.contains("runs job `beta`") && e.contains("for job `alpha`"),
            "{e}"
        );
        let mut p = peer();
        p.version = "0.0.1-elsewhere".into();
        let e = err(&opts(Some(1), 2), &p);
        assert!(
            e.contains("alexnet 0.0.1-elsewhere") && e.contains("same binary"),
            "{e}"
        );
        let mut p = peer();
        p.clock_offset_ms = -95_000;
        let e = err(&opts(Some(1), 2), &p);
        assert!(e.contains("95.0 s ahead of") && e.contains("NTP"), "{e}");
        let e = err(&opts(Some(0), 2), &peer());
        assert!(
            e.contains("rank 0 is already held by a worker on host-a (pid 4242"),
            "{e}"
        );
        let e = err(&opts(Some(2), 2), &peer());
        assert!(
            e.contains("claims rank 4") && e.contains("has 4 ranks"),
            "{e}"
        );
    }
}
