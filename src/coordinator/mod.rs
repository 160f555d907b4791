//! The coordinator: admits the workers of one job, tells each its place (rendezvous), relays
//! what the data plane needs, watches heartbeats, combines and logs progress, and aborts the
//! generation when a worker goes away.
//!
//! It never touches activations or gradients: those go between workers directly.

pub mod aggregate;
pub mod generations;
pub mod launch;

use crate::proto::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use crate::proto::{
    command, worker_event, Abort, Assignment, Command, JobStatus, RegisterRequest, SetLearningRate,
    Start, StatusRequest, Stop, WorkerEvent, WorkerStatus,
};
use crate::train::book::{BookSetup, JobBook};
use crate::train::checkpoint::Manifest;
use crate::train::fit::{EvalReport, ShardsWritten, StepReport};
use crate::train::job::JobConfig;
use aggregate::Aggregator;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// How the coordinator runs one job.
#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub job_id: String,
    pub job: JobConfig,
    pub generation: u64,
    /// A worker not heard from for this long is lost; data-plane waits use it too.
    pub peer_timeout: Duration,
    pub heartbeat: Duration,
    /// How long the first worker waits for the last one.
    pub rendezvous_timeout: Duration,
    pub log_every: u64,
    /// The run folder: checkpoint manifests and the report (none: no checkpoints).
    pub run_dir: Option<std::path::PathBuf>,
    /// The checkpoint this generation starts from.
    pub resume: Option<(std::path::PathBuf, Manifest)>,
    /// The job's token: every gRPC call and every data-plane connection must present it.
    pub token: Option<Secret>,
    /// TLS for the control plane: PEM certificate (chain) and private key.
    pub tls: Option<(Vec<u8>, Secret)>,
    /// Workers whose clock differs from the coordinator's by more than this are refused.
    pub max_clock_skew: Duration,
    /// Generations that may still follow this one after a failure: workers told to abort
    /// are told whether to rejoin.
    pub restarts_left: u32,
}

/// Milliseconds since the Unix epoch by this host's clock.
pub fn unix_time_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A value that never appears in logs or debug output (the job token, a private key).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A fresh random token (256 bits, hex).
    pub fn random() -> anyhow::Result<Secret> {
        let mut b = [0u8; 32];
        getrandom::fill(&mut b)
            .map_err(|e| anyhow::anyhow!("no randomness for the job token: {e}"))?;
        Ok(Secret(b.iter().map(|x| format!("{x:02x}")).collect()))
    }
}

/// Lets a call through only with the job's token (`authorization: Bearer TOKEN`); a refusal
/// is logged with the caller's address.
fn check_token(token: &Option<Secret>, req: Request<()>) -> Result<Request<()>, Status> {
    let Some(Secret(want)) = token else {
        return Ok(req);
    };
    let given = req
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| {
        g.len() == want.len()
            && g.bytes()
                .zip(want.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        return Ok(req);
    }
    let peer = req
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|| "an unknown address".into());
    tracing::warn!(%peer, "refused a call without this job's token");
    Err(Status::unauthenticated(
        "this job needs its token: give the worker ALEXNET_TOKEN or --token-file",
    ))
}

/// How the job ended (or that it has not).
#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    Waiting,
    Running,
    Finished,
    /// The first failure: the rank (if a worker's) and what happened.
    Failed {
        rank: Option<u32>,
        error: String,
    },
}

impl Phase {
    pub fn is_over(&self) -> bool {
        matches!(self, Phase::Finished | Phase::Failed { .. })
    }
}

#[derive(Debug)]
struct Member {
    host: String,
    device: String,
    pid: u32,
    data_addr: String,
    state: &'static str,
    step: u64,
    heard: Instant,
    rss: u64,
    error: String,
    columns: Vec<u32>,
    replica: u32,
    capabilities: Vec<String>,
    /// The NCCL unique ids the worker made (GPU workers with NCCL): for its pair, and for
    /// its replicas.
    nccl_id: Vec<u8>,
    nccl_replica_id: Vec<u8>,
    gpu_uuid: String,
}

impl Member {
    fn has_nccl(&self) -> bool {
        self.capabilities.iter().any(|c| c == "nccl") && self.nccl_id.len() == 128
    }

    /// Whether two workers' buffers come out of the same memory: both on the CPU of one
    /// host, or on one GPU.
    fn shares_memory_with(&self, other: &Member) -> bool {
        (self.host == other.host && self.device == "cpu" && other.device == "cpu")
            || (self.device != "cpu" && other.device != "cpu" && self.same_gpu(other))
    }

    /// Whether two workers run on one GPU (NCCL refuses two ranks of a communicator there).
    fn same_gpu(&self, other: &Member) -> bool {
        if !self.gpu_uuid.is_empty() && !other.gpu_uuid.is_empty() {
            self.gpu_uuid == other.gpu_uuid
        } else {
            self.host == other.host && self.device == other.device
        }
    }
}

struct State {
    members: BTreeMap<u32, Member>,
    sessions: BTreeMap<u32, mpsc::Sender<Result<Command, Status>>>,
    aggregator: Aggregator,
    book: JobBook,
    last_step: Option<StepReport>,
    started: Option<Instant>,
    exchange_seconds: Vec<(u32, f64, f64, f64)>,
}

/// The coordinator's shared state and the gRPC service over it.
#[derive(Clone)]
pub struct Coordinator {
    cfg: Arc<CoordinatorConfig>,
    world: u32,
    config_hash: String,
    job_json: String,
    mesh_key: u64,
    state: Arc<Mutex<State>>,
    phase: watch::Sender<Phase>,
    everyone_joined: watch::Sender<bool>,
}

impl Coordinator {
    pub fn new(cfg: CoordinatorConfig) -> anyhow::Result<Self> {
        cfg.job.validate()?;
        let world = cfg.job.topology.world_size() as u32;
        let job_json = serde_json::to_string(&cfg.job)?;
        let config_hash = cfg.job.hash();
        let mesh_key =
            xxhash_rust::xxh3::xxh3_64(format!("{}/{config_hash}", cfg.job_id).as_bytes());
        let state = State {
            members: BTreeMap::new(),
            sessions: BTreeMap::new(),
            aggregator: Aggregator::new(cfg.job.topology.replicas),
            book: JobBook::new(
                BookSetup {
                    log_every: cfg.log_every,
                    classes: cfg.job.net.classes,
                    schedule: cfg.job.schedule,
                    lr: cfg.job.sgd.lr,
                    run_dir: cfg.run_dir.clone(),
                    keep: cfg.job.keep_checkpoints,
                    seed: cfg.job.seed,
                    config_hash: cfg.job.hash(),
                    generation: cfg.generation,
                },
                cfg.resume.as_ref().map(|r| &r.1),
            ),
            last_step: None,
            started: None,
            exchange_seconds: Vec::new(),
        };
        Ok(Coordinator {
            cfg: Arc::new(cfg),
            world,
            config_hash,
            job_json,
            mesh_key,
            state: Arc::new(Mutex::new(state)),
            phase: watch::channel(Phase::Waiting).0,
            everyone_joined: watch::channel(false).0,
        })
    }

    pub fn config_hash(&self) -> &str {
        &self.config_hash
    }

    /// Follows the job's phase.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// The validation results so far.
    pub fn results(&self) -> Vec<crate::train::fit::EpochResult> {
        self.state.lock().unwrap().book.monitor.results.clone()
    }

    /// The newest complete checkpoint's step.
    pub fn last_checkpoint(&self) -> Option<u64> {
        self.state.lock().unwrap().book.last_checkpoint
    }

    /// Per rank: seconds in the column exchange, in the replica exchange, and in all.
    pub fn exchange_seconds(&self) -> Vec<(u32, f64, f64, f64)> {
        self.state.lock().unwrap().exchange_seconds.clone()
    }

    /// Records the first failure, tells every other worker to abort, and ends the job.
    pub fn fail(&self, rank: Option<u32>, error: String) {
        let mut first = false;
        self.phase.send_if_modified(|p| {
            if p.is_over() {
                return false;
            }
            *p = Phase::Failed {
                rank,
                error: error.clone(),
            };
            first = true;
            true
        });
        let mut st = self.state.lock().unwrap();
        if let Some(r) = rank {
            if let Some(m) = st.members.get_mut(&r) {
                if m.state != "finished" {
                    m.state = "failed";
                    m.error = error.clone();
                }
            }
        }
        if !first {
            tracing::debug!(?rank, "after the first failure: {error}");
            return;
        }
        let who = match rank {
            Some(r) => describe(r, st.members.get(&r)),
            None => "the coordinator".into(),
        };
        tracing::error!(
            rank,
            "{who} failed: {error}; aborting generation {}",
            self.cfg.generation
        );
        let reason = format!("{who} failed: {error}");
        for (r, tx) in &st.sessions {
            if Some(*r) != rank {
                let _ = tx.try_send(Ok(Command {
                    command: Some(command::Command::Abort(Abort {
                        reason: reason.clone(),
                        rejoin: self.cfg.restarts_left > 0,
                    })),
                }));
            }
        }
        st.sessions.clear();
    }

    fn check_fits(&self, req: &RegisterRequest) -> Result<(), Status> {
        let cfg = &self.cfg;
        if !req.job_id.is_empty() && req.job_id != cfg.job_id {
            return Err(Status::failed_precondition(format!(
                "this coordinator runs job `{}`, the worker was started for job `{}`: point it at its own job's coordinator",
                cfg.job_id, req.job_id
            )));
        }
        if let Some(g) = req.generation {
            if g != cfg.generation {
                return Err(Status::failed_precondition(format!(
                    "job `{}` is in generation {}, the worker asked for generation {g}: restart it without --generation",
                    cfg.job_id, cfg.generation
                )));
            }
        }
        if !req.config_hash.is_empty() && req.config_hash != self.config_hash {
            return Err(Status::failed_precondition(format!(
                "job `{}` has configuration {}, the worker expects {}: both sides must use the same job settings",
                cfg.job_id, self.config_hash, req.config_hash
            )));
        }
        if req.version != crate::proto::VERSION {
            return Err(Status::failed_precondition(format!(
                "the worker runs alexnet {}, the coordinator {}: run the same binary everywhere",
                req.version,
                crate::proto::VERSION
            )));
        }
        let skew_ms = (req.unix_time_ms - unix_time_ms()).unsigned_abs();
        if req.unix_time_ms == 0 || Duration::from_millis(skew_ms) > cfg.max_clock_skew {
            return Err(Status::failed_precondition(format!(
                "the clock of host `{}` is {:.1} s off the coordinator's (at most {:?} allowed): \
                 synchronise the hosts' clocks (NTP, chrony) before training across them",
                req.host,
                skew_ms as f64 / 1000.0,
                cfg.max_clock_skew
            )));
        }
        if req.data_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "data-plane address `{}` is not host:port",
                req.data_addr
            )));
        }
        Ok(())
    }

    fn admit(&self, req: &RegisterRequest) -> Result<u32, Status> {
        self.check_fits(req)?;
        if *self.phase.borrow() != Phase::Waiting {
            return Err(Status::failed_precondition(format!(
                "job `{}` generation {} has already started (or ended): a new worker cannot join it",
                self.cfg.job_id, self.cfg.generation
            )));
        }
        let mut st = self.state.lock().unwrap();
        let rank = match req.rank {
            Some(r) if r >= self.world => {
                return Err(Status::invalid_argument(format!(
                    "rank {r} does not exist: job `{}` has {} ranks (0..{})",
                    self.cfg.job_id,
                    self.world,
                    self.world - 1
                )))
            }
            Some(r) => {
                if let Some(m) = st.members.get(&r) {
                    return Err(Status::already_exists(format!(
                        "rank {r} is already taken by {} (pid {}): give each worker its own --rank",
                        m.host, m.pid
                    )));
                }
                r
            }
            None => (0..self.world)
                .find(|r| !st.members.contains_key(r))
                .ok_or_else(|| {
                    Status::resource_exhausted(format!(
                        "job `{}` already has all its {} workers",
                        self.cfg.job_id, self.world
                    ))
                })?,
        };
        let place = self.cfg.job.topology.placement(rank as usize);
        st.members.insert(
            rank,
            Member {
                host: req.host.clone(),
                device: req.device.clone(),
                pid: req.pid,
                data_addr: req.data_addr.clone(),
                state: "joined",
                step: 0,
                heard: Instant::now(),
                rss: 0,
                error: String::new(),
                columns: place.columns.iter().map(|&c| c as u32).collect(),
                replica: place.replica as u32,
                capabilities: req.capabilities.clone(),
                nccl_id: req.nccl_id.clone(),
                nccl_replica_id: req.nccl_replica_id.clone(),
                gpu_uuid: req.gpu_uuid.clone(),
            },
        );
        tracing::info!(
            rank,
            host = %req.host,
            device = %req.device,
            pid = req.pid,
            joined = st.members.len(),
            of = self.world,
            "worker joined"
        );
        if st.members.len() as u32 == self.world {
            tracing::info!(
                workers = self.world,
                "every worker has joined: assigning places"
            );
            self.everyone_joined.send_replace(true);
        }
        Ok(rank)
    }

    fn assignment(&self, rank: u32) -> Assignment {
        let st = self.state.lock().unwrap();
        let m = &st.members[&rank];
        Assignment {
            job_id: self.cfg.job_id.clone(),
            generation: self.cfg.generation,
            rank,
            world_size: self.world,
            replica: m.replica,
            columns: m.columns.clone(),
            job_json: self.job_json.clone(),
            config_hash: self.config_hash.clone(),
            data_addrs: st
                .members
                .iter()
                .map(|(r, m)| (*r, m.data_addr.clone()))
                .collect(),
            nccl_id: self.pair_nccl_id(&st.members, rank),
            nccl_replica_id: self.replica_nccl_id(&st.members, rank),
            memory_sharers: st
                .members
                .values()
                .filter(|o| m.shares_memory_with(o))
                .count() as u32,
            mesh_key: self.mesh_key,
            peer_timeout_ms: self.cfg.peer_timeout.as_millis() as u32,
            heartbeat_ms: self.cfg.heartbeat.as_millis() as u32,
            resume_step: self.cfg.resume.as_ref().map(|r| r.1.step).unwrap_or(0),
            resume_dir: self
                .cfg
                .resume
                .as_ref()
                .map(|r| r.0.to_string_lossy().into_owned())
                .unwrap_or_default(),
            lr: st.book.state.lr,
            run_dir: self
                .cfg
                .run_dir
                .as_ref()
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// The NCCL id of `rank`'s pair (its column-0 rank's), when both ranks run on GPUs with
    /// NCCL and not on the same GPU (NCCL refuses two ranks of a communicator on one device);
    /// empty otherwise: the pair exchanges over TCP.
    fn pair_nccl_id(&self, members: &BTreeMap<u32, Member>, rank: u32) -> Vec<u8> {
        let Some(partner) = self.cfg.job.topology.column_partner(rank as usize) else {
            return Vec::new();
        };
        let (Some(me), Some(other)) = (members.get(&rank), members.get(&(partner as u32))) else {
            return Vec::new();
        };
        if !me.has_nccl() || !other.has_nccl() || me.same_gpu(other) {
            return Vec::new();
        }
        let column0 = if me.columns.first() == Some(&0) {
            me
        } else {
            other
        };
        column0.nccl_id.clone()
    }

    /// The NCCL id of the replicas of `rank`'s column position (replica 0's), when every one
    /// of them runs on a GPU with NCCL and no two on the same GPU; empty otherwise: the
    /// replicas average over TCP.
    fn replica_nccl_id(&self, members: &BTreeMap<u32, Member>, rank: u32) -> Vec<u8> {
        let topology = &self.cfg.job.topology;
        let mut ranks: Vec<usize> = topology
            .replica_peers(rank as usize)
            .iter()
            .map(|p| p.1)
            .collect();
        if ranks.is_empty() {
            return Vec::new();
        }
        ranks.push(rank as usize);
        ranks.sort_unstable();
        let group: Option<Vec<&Member>> = ranks.iter().map(|r| members.get(&(*r as u32))).collect();
        let Some(group) = group else {
            return Vec::new();
        };
        let usable = group
            .iter()
            .all(|m| m.has_nccl() && m.nccl_replica_id.len() == 128);
        let distinct = group
            .iter()
            .enumerate()
            .all(|(i, a)| group[i + 1..].iter().all(|b| !a.same_gpu(b)));
        if !usable || !distinct {
            return Vec::new();
        }
        // Replica 0 holds the lowest rank of its position.
        group[0].nccl_replica_id.clone()
    }

    fn on_event(&self, rank: u32, ev: worker_event::Event) {
        let mut st = self.state.lock().unwrap();
        if let Some(m) = st.members.get_mut(&rank) {
            m.heard = Instant::now();
        }
        match ev {
            worker_event::Event::Heartbeat(h) => {
                if let Some(m) = st.members.get_mut(&rank) {
                    m.rss = h.rss_bytes;
                }
            }
            worker_event::Event::Progress(p) => {
                let column0 = st.members.get_mut(&rank).map(|m| {
                    m.step = p.step;
                    m.rss = p.rss_bytes;
                    m.state = "running";
                    m.columns.contains(&0)
                });
                // Both columns of a replica see the same loss and logits: count each replica once.
                if column0 == Some(true) {
                    let report = StepReport {
                        epoch: p.epoch,
                        step: p.step,
                        total_steps: p.total_steps,
                        steps_per_epoch: p.steps_per_epoch,
                        last_of_epoch: p.last_of_epoch,
                        loss: p.loss,
                        hits: p.hits.unwrap_or_default().into(),
                        lr: p.lr,
                        column_bytes: p.column_bytes,
                        replica_bytes: p.replica_bytes,
                    };
                    if let Some(job_step) = st.aggregator.step(report) {
                        st.book.step(&job_step);
                        st.last_step = Some(job_step);
                    }
                }
            }
            worker_event::Event::Evaluation(e) => {
                let column0 = st
                    .members
                    .get(&rank)
                    .is_some_and(|m| m.columns.contains(&0));
                if column0 {
                    let report = EvalReport {
                        epoch: e.epoch,
                        hits: e.hits.unwrap_or_default().into(),
                    };
                    if let Some(job_eval) = st.aggregator.evaluation(report) {
                        // The schedule decides; every worker trains the next epoch with it.
                        let lr = st.book.evaluation(&job_eval);
                        for tx in st.sessions.values() {
                            let _ = tx.try_send(Ok(Command {
                                command: Some(command::Command::SetLr(SetLearningRate {
                                    epoch: job_eval.epoch,
                                    lr,
                                })),
                            }));
                        }
                    }
                }
            }
            worker_event::Event::Finished(f) => {
                if let Some(m) = st.members.get_mut(&rank) {
                    m.state = "finished";
                    m.step = f.steps;
                }
                st.exchange_seconds.push((
                    rank,
                    f.exchange_seconds,
                    f.replica_seconds,
                    f.train_seconds,
                ));
                let all = st.members.values().all(|m| m.state == "finished");
                if all {
                    tracing::info!(
                        steps = f.steps,
                        seconds = %format!(
                            "{:.2}",
                            st.started.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0)
                        ),
                        "every worker finished"
                    );
                    for tx in st.sessions.values() {
                        let _ = tx.try_send(Ok(Command {
                            command: Some(command::Command::Stop(Stop {
                                reason: "the job is complete".into(),
                            })),
                        }));
                    }
                    st.sessions.clear();
                    drop(st);
                    self.phase.send_if_modified(|p| {
                        if p.is_over() {
                            return false;
                        }
                        *p = Phase::Finished;
                        true
                    });
                }
            }
            worker_event::Event::Checkpoint(c) => {
                let written = ShardsWritten {
                    step: c.step,
                    shards: c.shards.into_iter().collect(),
                };
                if let Err(e) = st.book.shards_written(&written) {
                    drop(st);
                    self.fail(None, format!("writing the checkpoint manifest: {e:#}"));
                }
            }
            worker_event::Event::Failed(f) => {
                drop(st);
                match f.blames {
                    // A peer went away under this worker: the failure is the peer's.
                    Some(peer) if peer != rank && peer < self.world => {
                        self.fail(Some(peer), format!("lost by rank {rank}: {}", f.error))
                    }
                    _ => self.fail(Some(rank), f.error),
                }
            }
        }
    }

    /// Opens rank `rank`'s session; starts the job when every session is open.
    fn open_session(&self, rank: u32, tx: mpsc::Sender<Result<Command, Status>>) {
        let mut st = self.state.lock().unwrap();
        st.sessions.insert(rank, tx);
        if let Some(m) = st.members.get_mut(&rank) {
            m.heard = Instant::now();
        }
        if st.sessions.len() as u32 == self.world && st.started.is_none() {
            st.started = Some(Instant::now());
            for tx in st.sessions.values() {
                let _ = tx.try_send(Ok(Command {
                    command: Some(command::Command::Start(Start {})),
                }));
            }
            drop(st);
            self.phase.send_replace(Phase::Running);
            tracing::info!(
                job = %self.cfg.job_id,
                generation = self.cfg.generation,
                workers = self.world,
                replicas = self.cfg.job.topology.replicas,
                columns_per_worker = self.cfg.job.topology.columns_per_worker,
                "job started"
            );
        }
    }

    /// Fails the job when the rendezvous does not complete in time, or when a registered
    /// worker is silent for longer than the peer timeout.
    pub async fn watchdog(self) {
        let created = Instant::now();
        let mut phase = self.phase.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = phase.changed() => {}
            }
            let now = self.phase.borrow().clone();
            if now.is_over() {
                return;
            }
            if now == Phase::Waiting && created.elapsed() > self.cfg.rendezvous_timeout {
                let (joined, missing) = {
                    let st = self.state.lock().unwrap();
                    let joined: Vec<u32> = st.members.keys().copied().collect();
                    let missing: Vec<u32> =
                        (0..self.world).filter(|r| !joined.contains(r)).collect();
                    (joined, missing)
                };
                self.fail(
                    None,
                    format!(
                        "the workers did not all come within {:?}: ranks {joined:?} joined, {missing:?} did not",
                        self.cfg.rendezvous_timeout
                    ),
                );
                return;
            }
            let silent: Vec<(u32, String)> = {
                let st = self.state.lock().unwrap();
                st.members
                    .iter()
                    .filter(|(_, m)| {
                        m.state != "finished" && m.heard.elapsed() > self.cfg.peer_timeout
                    })
                    .filter(|(r, _)| now == Phase::Running || st.sessions.contains_key(r))
                    .map(|(r, m)| (*r, describe(*r, Some(m))))
                    .collect()
            };
            if let Some((rank, _)) = silent.first() {
                if let Some(m) = self.state.lock().unwrap().members.get_mut(rank) {
                    m.state = "lost";
                }
                self.fail(
                    Some(*rank),
                    format!(
                        "nothing heard from it for {:?} (the peer timeout): it hangs or its host is unreachable",
                        self.cfg.peer_timeout
                    ),
                );
                return;
            }
        }
    }

    fn status(&self) -> JobStatus {
        let st = self.state.lock().unwrap();
        let phase = self.phase.borrow().clone();
        let (state, error) = match &phase {
            Phase::Waiting => ("waiting for workers", String::new()),
            Phase::Running => ("running", String::new()),
            Phase::Finished => ("finished", String::new()),
            Phase::Failed { error, .. } => ("failed", error.clone()),
        };
        let last = st.last_step.clone();
        let elapsed = st.started.map(|t| t.elapsed().as_secs_f64()).unwrap_or(0.0);
        let (step, total) = last
            .as_ref()
            .map(|s| (s.step, s.total_steps))
            .unwrap_or((0, 0));
        let per_step = if step > 0 { elapsed / step as f64 } else { 0.0 };
        JobStatus {
            job_id: self.cfg.job_id.clone(),
            generation: self.cfg.generation,
            state: state.into(),
            world_size: self.world,
            step,
            total_steps: total,
            epoch: last.as_ref().map(|s| s.epoch).unwrap_or(0),
            loss: last.as_ref().map(|s| s.loss).unwrap_or(0.0),
            images_per_s: if elapsed > 0.0 {
                (step * self.cfg.job.batch as u64) as f64 / elapsed
            } else {
                0.0
            },
            eta_seconds: per_step * total.saturating_sub(step) as f64,
            workers: st
                .members
                .iter()
                .map(|(r, m)| WorkerStatus {
                    rank: *r,
                    host: m.host.clone(),
                    device: m.device.clone(),
                    pid: m.pid,
                    state: m.state.into(),
                    step: m.step,
                    seconds_since_heard: m.heard.elapsed().as_secs_f64(),
                    rss_bytes: m.rss,
                    error: m.error.clone(),
                })
                .collect(),
            config_hash: self.config_hash.clone(),
            error,
            version: crate::proto::VERSION.into(),
            unix_time_ms: unix_time_ms(),
            restarts_left: self.cfg.restarts_left,
        }
    }

    /// Serves the coordinator (and the standard gRPC health service) on `listener` until the
    /// job ends; returns how it ended. One generation only: `generations::Supervisor` serves
    /// a job whose generations follow one another behind one address.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> anyhow::Result<Phase> {
        let mut phase = self.phase.subscribe();
        tokio::spawn(self.clone().watchdog());
        let server = tokio::spawn(serve_rpc(self.clone(), &self.cfg, listener)?);
        let end = phase.wait_for(|p| p.is_over()).await?.clone();
        // Let the last commands (stop, abort) and status calls go out before closing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.abort();
        Ok(end)
    }

    /// The configuration of the generation that follows this one after a failure: it starts
    /// from the newest complete checkpoint in the run folder, with one restart fewer left.
    pub fn next_generation(cfg: &CoordinatorConfig) -> anyhow::Result<CoordinatorConfig> {
        let mut next = cfg.clone();
        next.generation += 1;
        next.restarts_left = cfg.restarts_left.saturating_sub(1);
        if let Some(dir) = &cfg.run_dir {
            next.resume = crate::train::checkpoint::latest(dir, Some(&cfg.job.hash()))?;
        }
        Ok(next)
    }
}

/// The gRPC server of a job: the coordinator service `svc` behind the token check, the
/// standard health service beside it, TLS when `cfg` has a certificate.
pub(crate) fn serve_rpc<S: CoordinatorRpc>(
    svc: S,
    cfg: &CoordinatorConfig,
    listener: tokio::net::TcpListener,
) -> anyhow::Result<impl std::future::Future<Output = Result<(), tonic::transport::Error>>> {
    let (health, health_service) = tonic_health::server::health_reporter();
    // The service name probes ask for is the coordinator's, whatever serves it.
    let name = <CoordinatorServer<S> as tonic::server::NamedService>::NAME;
    let token = cfg.token.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some((cert, key)) = &cfg.tls {
        builder = builder
            .tls_config(
                tonic::transport::ServerTlsConfig::new()
                    .identity(tonic::transport::Identity::from_pem(cert, key.0.as_bytes())),
            )
            .map_err(|e| anyhow::anyhow!("the TLS certificate or key is not usable: {e}"))?;
    }
    let router =
        builder
            .add_service(health_service)
            .add_service(CoordinatorServer::with_interceptor(
                svc,
                move |req: Request<()>| check_token(&token, req),
            ));
    Ok(async move {
        health
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
        router
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    })
}

fn describe(rank: u32, m: Option<&Member>) -> String {
    match m {
        Some(m) => format!("rank {rank} ({}, {}, pid {})", m.host, m.device, m.pid),
        None => format!("rank {rank}"),
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for Coordinator {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<Assignment>, Status> {
        let req = request.into_inner();
        let rank = self.admit(&req).inspect_err(|s| {
            tracing::warn!(host = %req.host, pid = req.pid, "refused a worker: {}", s.message())
        })?;
        let mut joined = self.everyone_joined.subscribe();
        let mut phase = self.phase.subscribe();
        let wait = async {
            tokio::select! {
                r = joined.wait_for(|j| *j) => r.map(|_| ()).map_err(|_| Status::unavailable("the coordinator is stopping")),
                p = phase.wait_for(|p| p.is_over()) => Err(Status::aborted(match p.as_deref() {
                    Ok(Phase::Failed { error, .. }) => format!("the job failed before it started: {error}"),
                    _ => "the job ended before it started".into(),
                })),
            }
        };
        match tokio::time::timeout(self.cfg.rendezvous_timeout, wait).await {
            Ok(Ok(())) => Ok(Response::new(self.assignment(rank))),
            Ok(Err(s)) => Err(s),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "not every worker joined within {:?}",
                self.cfg.rendezvous_timeout
            ))),
        }
    }

    type SessionStream = ReceiverStream<Result<Command, Status>>;

    async fn session(
        &self,
        request: Request<Streaming<WorkerEvent>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(self.cfg.peer_timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no first session event"))??
            .ok_or_else(|| Status::invalid_argument("empty session"))?;
        let rank = first.rank;
        if first.generation != self.cfg.generation {
            return Err(Status::failed_precondition(format!(
                "generation {} is over: this job is in generation {}",
                first.generation, self.cfg.generation
            )));
        }
        if !self.state.lock().unwrap().members.contains_key(&rank) {
            return Err(Status::failed_precondition(format!(
                "rank {rank} has not registered with job `{}`",
                self.cfg.job_id
            )));
        }
        let (tx, rx) = mpsc::channel(64);
        if let Some(ev) = first.event {
            self.on_event(rank, ev);
        }
        self.open_session(rank, tx);
        let this = self.clone();
        tokio::spawn(async move {
            let timeout = this.cfg.peer_timeout;
            loop {
                match tokio::time::timeout(timeout, inbound.message()).await {
                    Ok(Ok(Some(ev))) => {
                        if let Some(e) = ev.event {
                            this.on_event(rank, e);
                        }
                    }
                    Ok(Ok(None)) | Ok(Err(_)) => {
                        let finished = this
                            .state
                            .lock()
                            .unwrap()
                            .members
                            .get(&rank)
                            .is_some_and(|m| m.state == "finished");
                        if !finished && !this.phase.borrow().is_over() {
                            this.fail(
                                Some(rank),
                                "its connection to the coordinator closed before it finished (the process died or was killed)".into(),
                            );
                        }
                        return;
                    }
                    Err(_) => {
                        this.fail(
                            Some(rank),
                            format!("no heartbeat for {timeout:?} (the peer timeout)"),
                        );
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<JobStatus>, Status> {
        Ok(Response::new(self.status()))
    }
}
