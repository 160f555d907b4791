//! The coordinator's decisions for one generation, with no network and no clocks of its own:
//! admission and rendezvous, the assignments, the job's progress from the workers' events,
//! heartbeats, the first failure. Each input (a registration, a session opening, an event, a
//! tick of the watchdog, with the time it happened) changes the state and returns the
//! commands to send; the tonic service in `mod.rs` does the sending and the waiting. That
//! keeps every rule testable with plain unit tests.

use super::aggregate::Aggregator;
use super::CoordinatorConfig;
use crate::admission::{self, Holder, JobFacts, Joiner, Refusal, RefusalKind};
use crate::proto::{
    command, worker_event, Abort, Assignment, Command, EpochResult, JobStatus, RegisterRequest,
    SetLearningRate, Start, Stop, WorkerStatus,
};
use crate::telemetry::prometheus::{JobSnapshot, RankSnapshot};
use crate::telemetry::RankPoint;
use crate::train::book::{BookSetup, JobBook};
use crate::train::fit::{EvalReport, ShardsWritten, StepReport};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        /// A restart would meet the same wall (a full disk): the job stops for an operator
        /// instead of spending its restarts.
        needs_operator: bool,
    },
}

impl Phase {
    pub fn is_over(&self) -> bool {
        matches!(self, Phase::Finished | Phase::Failed { .. })
    }
}

/// One rank's time in the exchanges, as it reported when it finished.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ExchangeSeconds {
    pub rank: u32,
    /// In the column exchange (all-gather, reduce-scatter).
    pub columns: f64,
    /// In the replicas' gradient average.
    pub replicas: f64,
    /// In training, exchanges included.
    pub train: f64,
}

/// A command for one rank's session.
#[derive(Clone, Debug, PartialEq)]
pub struct Order {
    pub rank: u32,
    pub command: Command,
}

/// What the service must do after an input: send these commands, then (when
/// `close_sessions`) end every open session.
#[derive(Debug, Default, PartialEq)]
pub struct Orders {
    pub send: Vec<Order>,
    pub close_sessions: bool,
}

impl Orders {
    fn to_all(ranks: &BTreeSet<u32>, command: command::Command) -> Vec<Order> {
        ranks
            .iter()
            .map(|&rank| Order {
                rank,
                command: Command {
                    command: Some(command.clone()),
                },
            })
            .collect()
    }
}

/// A worker admitted to the rendezvous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admitted {
    pub rank: u32,
    /// It was the last: every rank has joined and the assignments can go out.
    pub everyone: bool,
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
    /// The newest progress counters, those at the job's previous log step, and the rates
    /// between the two.
    counters: Counters,
    at_log: Counters,
    rates: RankPoint,
}

/// A worker's cumulative figures, as its newest progress report gave them.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    step: u64,
    train_seconds: f64,
    column_seconds: f64,
    replica_seconds: f64,
    column_bytes: u64,
    replica_bytes: u64,
}

impl Counters {
    /// The rates from `before` to `self`, for a rank that takes `images` images a step.
    fn since(&self, before: &Counters, images: u64) -> Option<(f64, f64, f64, f64, f64)> {
        let seconds = self.train_seconds - before.train_seconds;
        let steps = self.step.checked_sub(before.step).filter(|&s| s > 0)? as f64;
        if seconds <= 0.0 {
            return None;
        }
        Some((
            steps * images as f64 / seconds,
            ((self.column_seconds - before.column_seconds) / seconds).clamp(0.0, 1.0),
            ((self.replica_seconds - before.replica_seconds) / seconds).clamp(0.0, 1.0),
            self.column_bytes.saturating_sub(before.column_bytes) as f64 / steps,
            self.replica_bytes.saturating_sub(before.replica_bytes) as f64 / steps,
        ))
    }
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

fn describe(rank: u32, m: Option<&Member>) -> String {
    match m {
        Some(m) => format!("rank {rank} ({}, {}, pid {})", m.host, m.device, m.pid),
        None => format!("rank {rank}"),
    }
}

/// One generation of a job: who joined, where each rank stands, how the job goes.
pub struct Control {
    cfg: Arc<CoordinatorConfig>,
    world: u32,
    config_hash: String,
    job_json: String,
    mesh_key: u64,
    phase: Phase,
    /// Members are never removed within a generation: a rank that fails stays, marked.
    members: BTreeMap<u32, Member>,
    /// Ranks whose session is open (they receive commands).
    open: BTreeSet<u32>,
    aggregator: Aggregator,
    book: JobBook,
    last_step: Option<StepReport>,
    started: Option<Instant>,
    exchange_seconds: Vec<ExchangeSeconds>,
    /// The watchdog's previous look, and how long the coordinator itself was not running
    /// (stopped, paused with its VM, starved of CPU): silence it could not hear is no one's.
    last_look: Option<Instant>,
    not_running: Duration,
}

impl Control {
    pub fn new(cfg: Arc<CoordinatorConfig>) -> anyhow::Result<Control> {
        cfg.job.validate()?;
        let world = cfg.job.topology.world_size() as u32;
        let job_json = serde_json::to_string(&cfg.job)?;
        let config_hash = cfg.job.hash();
        let mesh_key =
            xxhash_rust::xxh3::xxh3_64(format!("{}/{config_hash}", cfg.job_id).as_bytes());
        let book = JobBook::new(
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
        );
        Ok(Control {
            aggregator: Aggregator::new(cfg.job.topology.replicas),
            cfg,
            world,
            config_hash,
            job_json,
            mesh_key,
            phase: Phase::Waiting,
            members: BTreeMap::new(),
            open: BTreeSet::new(),
            book,
            last_step: None,
            started: None,
            exchange_seconds: Vec::new(),
            last_look: None,
            not_running: Duration::ZERO,
        })
    }

    pub fn world(&self) -> u32 {
        self.world
    }

    pub fn config_hash(&self) -> &str {
        &self.config_hash
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn is_registered(&self, rank: u32) -> bool {
        self.members.contains_key(&rank)
    }

    /// The newest step reported, with its loss.
    pub fn last_step(&self) -> Option<&crate::train::fit::StepReport> {
        self.last_step.as_ref()
    }

    /// The validation results so far.
    pub fn results(&self) -> &[crate::train::checkpoint::EpochRecord] {
        &self.book.history
    }

    /// The newest complete checkpoint's step.
    pub fn last_checkpoint(&self) -> Option<u64> {
        self.book.last_checkpoint
    }

    pub fn exchange_seconds(&self) -> &[ExchangeSeconds] {
        &self.exchange_seconds
    }

    /// Admits a registering worker at `now` (`now_ms`: the coordinator's clock) and gives it
    /// its rank: the one it asks for, or the lowest free one.
    pub fn admit(
        &mut self,
        req: &RegisterRequest,
        now: Instant,
        now_ms: i64,
    ) -> Result<Admitted, Refusal> {
        let cfg = &self.cfg;
        let facts = JobFacts {
            job_id: &cfg.job_id,
            generation: cfg.generation,
            config_hash: &self.config_hash,
            max_clock_skew: cfg.max_clock_skew,
        };
        admission::worker_fits(&facts, req, now_ms)?;
        if self.phase != Phase::Waiting {
            return Err(Refusal {
                kind: RefusalKind::Closed,
                message: format!(
                    "job `{}` generation {} has already started (or ended): a new worker cannot join it",
                    cfg.job_id, cfg.generation
                ),
            });
        }
        let who = Joiner::Worker { host: &req.host };
        let rank = match req.rank {
            Some(r) => {
                admission::rank_exists(r, self.world, &cfg.job_id, who)?;
                let holder = self.members.get(&r).map(|m| Holder {
                    rank: r,
                    host: m.host.clone(),
                    pid: m.pid,
                    state: m.state.into(),
                });
                admission::rank_free(r, holder.as_ref(), who)?;
                r
            }
            None => (0..self.world)
                .find(|r| !self.members.contains_key(r))
                .ok_or_else(|| Refusal {
                    kind: RefusalKind::Full,
                    message: format!(
                        "job `{}` already has all its {} workers",
                        cfg.job_id, self.world
                    ),
                })?,
        };
        let place = cfg.job.topology.placement(rank as usize);
        self.members.insert(
            rank,
            Member {
                host: req.host.clone(),
                device: req.device.clone(),
                pid: req.pid,
                data_addr: req.data_addr.clone(),
                state: "joined",
                step: 0,
                heard: now,
                rss: 0,
                error: String::new(),
                columns: place.columns.iter().map(|&c| c as u32).collect(),
                replica: place.replica as u32,
                capabilities: req.capabilities.clone(),
                nccl_id: req.nccl_id.clone(),
                nccl_replica_id: req.nccl_replica_id.clone(),
                gpu_uuid: req.gpu_uuid.clone(),
                counters: Counters::default(),
                // A worker's counters start with this generation, at its checkpoint's step.
                at_log: Counters {
                    step: cfg.resume.as_ref().map(|r| r.1.step).unwrap_or(0),
                    ..Counters::default()
                },
                rates: RankPoint {
                    rank,
                    replica: place.replica as u32,
                    column: place.columns.first().copied().unwrap_or(0) as u32,
                    ..RankPoint::default()
                },
            },
        );
        tracing::info!(
            rank,
            host = %req.host,
            device = %req.device,
            pid = req.pid,
            joined = self.members.len(),
            of = self.world,
            "worker joined"
        );
        let everyone = self.members.len() as u32 == self.world;
        if everyone {
            tracing::info!(
                workers = self.world,
                "every worker has joined: assigning places"
            );
        }
        Ok(Admitted { rank, everyone })
    }

    /// A worker whose registration was cut off before the rendezvous completed (its process
    /// died, its host dropped off) gives its rank back, so that the worker its agent starts
    /// next is not refused as a second holder. Only while others are still awaited: once
    /// every rank has joined, the places are handed out.
    pub fn withdraw(&mut self, rank: u32, pid: u32) {
        if self.phase != Phase::Waiting || self.members.len() as u32 >= self.world {
            return;
        }
        if self.members.get(&rank).is_some_and(|m| m.pid == pid) {
            self.members.remove(&rank);
            tracing::warn!(
                rank,
                pid,
                joined = self.members.len(),
                of = self.world,
                "a worker left before the job started (its registration was cut off): its rank is free again"
            );
        }
    }

    /// Rank `rank`'s place in the job, once every rank has joined (`rank` must have been
    /// admitted).
    pub fn assignment(&self, rank: u32) -> Assignment {
        let cfg = &self.cfg;
        let m = &self.members[&rank];
        Assignment {
            job_id: cfg.job_id.clone(),
            generation: cfg.generation,
            rank,
            world_size: self.world,
            replica: m.replica,
            columns: m.columns.clone(),
            job_json: self.job_json.clone(),
            config_hash: self.config_hash.clone(),
            data_addrs: self
                .members
                .iter()
                .map(|(r, m)| (*r, m.data_addr.clone()))
                .collect(),
            nccl_id: self.pair_nccl_id(rank),
            nccl_replica_id: self.replica_nccl_id(rank),
            memory_sharers: self
                .members
                .values()
                .filter(|o| m.shares_memory_with(o))
                .count() as u32,
            mesh_key: self.mesh_key,
            peer_timeout_ms: cfg.peer_timeout.as_millis() as u32,
            heartbeat_ms: cfg.heartbeat.as_millis() as u32,
            resume_step: cfg.resume.as_ref().map(|r| r.1.step).unwrap_or(0),
            resume_dir: cfg
                .resume
                .as_ref()
                .map(|r| r.0.to_string_lossy().into_owned())
                .unwrap_or_default(),
            lr: self.book.state.lr,
            run_dir: cfg
                .run_dir
                .as_ref()
                .map(|d| d.to_string_lossy().into_owned())
                .unwrap_or_default(),
        }
    }

    /// The NCCL id of `rank`'s pair (its column-0 rank's), when both ranks run on GPUs with
    /// NCCL and not on the same GPU (NCCL refuses two ranks of a communicator on one device);
    /// empty otherwise: the pair exchanges over TCP.
    fn pair_nccl_id(&self, rank: u32) -> Vec<u8> {
        let Some(partner) = self.cfg.job.topology.column_partner(rank as usize) else {
            return Vec::new();
        };
        let (Some(me), Some(other)) =
            (self.members.get(&rank), self.members.get(&(partner as u32)))
        else {
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
    fn replica_nccl_id(&self, rank: u32) -> Vec<u8> {
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
        let group: Option<Vec<&Member>> = ranks
            .iter()
            .map(|r| self.members.get(&(*r as u32)))
            .collect();
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

    /// Whether rank `rank` may open a session for `generation`.
    pub fn may_open_session(&self, rank: u32, generation: u64) -> Result<(), Refusal> {
        if generation != self.cfg.generation {
            return Err(Refusal {
                kind: RefusalKind::Mismatch,
                message: format!(
                    "generation {generation} is over: this job is in generation {}",
                    self.cfg.generation
                ),
            });
        }
        if !self.members.contains_key(&rank) {
            return Err(Refusal {
                kind: RefusalKind::Mismatch,
                message: format!(
                    "rank {rank} has not registered with job `{}`",
                    self.cfg.job_id
                ),
            });
        }
        Ok(())
    }

    /// Rank `rank`'s session is open at `now`; the job starts when every rank's is.
    pub fn open_session(&mut self, rank: u32, now: Instant) -> Orders {
        self.open.insert(rank);
        if let Some(m) = self.members.get_mut(&rank) {
            m.heard = now;
        }
        if self.open.len() as u32 != self.world || self.started.is_some() {
            return Orders::default();
        }
        self.started = Some(now);
        let send = Orders::to_all(&self.open, command::Command::Start(Start {}));
        // A failure before the last session opened stands: the job does not start over it.
        if !self.phase.is_over() {
            self.phase = Phase::Running;
        }
        tracing::info!(
            job = %self.cfg.job_id,
            generation = self.cfg.generation,
            workers = self.world,
            replicas = self.cfg.job.topology.replicas,
            columns_per_worker = self.cfg.job.topology.columns_per_worker,
            "job started"
        );
        Orders {
            send,
            close_sessions: false,
        }
    }

    /// Records the first failure (that of rank `rank`, or the coordinator's own when `None`)
    /// and tells every other worker to abort; a later failure only marks its rank.
    pub fn fail(&mut self, rank: Option<u32>, error: String) -> Orders {
        self.fail_with(rank, error, false)
    }

    /// [`Control::fail`], for a failure that a restart would meet again when
    /// `needs_operator` (a full disk): no worker is told to rejoin.
    fn fail_with(&mut self, rank: Option<u32>, error: String, needs_operator: bool) -> Orders {
        let first = !self.phase.is_over();
        if first {
            self.phase = Phase::Failed {
                rank,
                error: error.clone(),
                needs_operator,
            };
        }
        if let Some(m) = rank.and_then(|r| self.members.get_mut(&r)) {
            if m.state != "finished" {
                m.state = "failed";
                m.error = error.clone();
            }
        }
        if !first {
            tracing::debug!(?rank, "after the first failure: {error}");
            return Orders::default();
        }
        let who = match rank {
            Some(r) => describe(r, self.members.get(&r)),
            None => "the coordinator".into(),
        };
        tracing::error!(
            rank,
            "{who} failed: {error}; aborting generation {}",
            self.cfg.generation
        );
        let abort = command::Command::Abort(Abort {
            reason: format!("{who} failed: {error}"),
            rejoin: self.cfg.restarts_left > 0 && !needs_operator,
        });
        let others: BTreeSet<u32> = self
            .open
            .iter()
            .copied()
            .filter(|r| Some(*r) != rank)
            .collect();
        self.open.clear();
        Orders {
            send: Orders::to_all(&others, abort),
            close_sessions: true,
        }
    }

    /// Rank `rank`'s session ended (closed, or broken): a failure unless it had finished or
    /// the job is already over.
    pub fn session_closed(&mut self, rank: u32) -> Orders {
        let finished = self
            .members
            .get(&rank)
            .is_some_and(|m| m.state == "finished");
        if finished || self.phase.is_over() {
            return Orders::default();
        }
        self.fail(
            Some(rank),
            "its connection to the coordinator closed before it finished (the process died or was killed)".into(),
        )
    }

    /// An event from rank `rank`'s session at `now`, sent for `generation` (an event of
    /// another generation is stale and ignored).
    pub fn event(
        &mut self,
        rank: u32,
        generation: u64,
        ev: worker_event::Event,
        now: Instant,
    ) -> Orders {
        if generation != self.cfg.generation {
            tracing::debug!(
                rank,
                generation,
                "ignored an event of another generation than {}",
                self.cfg.generation
            );
            return Orders::default();
        }
        if let Some(m) = self.members.get_mut(&rank) {
            m.heard = now;
        }
        match ev {
            worker_event::Event::Heartbeat(h) => {
                if let Some(m) = self.members.get_mut(&rank) {
                    m.rss = h.rss_bytes;
                }
                Orders::default()
            }
            worker_event::Event::Progress(p) => {
                let column0 = self.members.get_mut(&rank).map(|m| {
                    m.step = p.step;
                    m.rss = p.rss_bytes;
                    m.state = "running";
                    m.counters = Counters {
                        step: p.step,
                        train_seconds: p.train_seconds,
                        column_seconds: p.column_seconds,
                        replica_seconds: p.replica_seconds,
                        column_bytes: p.column_bytes,
                        replica_bytes: p.replica_bytes,
                    };
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
                        train_seconds: p.train_seconds,
                        column_seconds: p.column_seconds,
                        replica_seconds: p.replica_seconds,
                    };
                    if let Some(job_step) = self.aggregator.step(report) {
                        if let Some(point) = self.book.step(&job_step) {
                            self.log_ranks(point.step);
                        }
                        self.last_step = Some(job_step);
                    }
                }
                Orders::default()
            }
            worker_event::Event::Evaluation(e) => {
                let column0 = self
                    .members
                    .get(&rank)
                    .is_some_and(|m| m.columns.contains(&0));
                if !column0 {
                    return Orders::default();
                }
                let report = EvalReport {
                    epoch: e.epoch,
                    hits: e.hits.unwrap_or_default().into(),
                };
                let Some(job_eval) = self.aggregator.evaluation(report) else {
                    return Orders::default();
                };
                // The schedule decides; every worker trains the next epoch with it.
                let lr = self.book.evaluation(&job_eval);
                Orders {
                    send: Orders::to_all(
                        &self.open,
                        command::Command::SetLr(SetLearningRate {
                            epoch: job_eval.epoch,
                            lr,
                        }),
                    ),
                    close_sessions: false,
                }
            }
            worker_event::Event::Finished(f) => {
                if let Some(m) = self.members.get_mut(&rank) {
                    m.state = "finished";
                    m.step = f.steps;
                }
                self.exchange_seconds.push(ExchangeSeconds {
                    rank,
                    columns: f.exchange_seconds,
                    replicas: f.replica_seconds,
                    train: f.train_seconds,
                });
                if !self.members.values().all(|m| m.state == "finished") {
                    return Orders::default();
                }
                tracing::info!(
                    steps = f.steps,
                    seconds = %format!(
                        "{:.2}",
                        self.started.map(|t| now.saturating_duration_since(t).as_secs_f64()).unwrap_or(0.0)
                    ),
                    "every worker finished"
                );
                let send = Orders::to_all(
                    &self.open,
                    command::Command::Stop(Stop {
                        reason: "the job is complete".into(),
                    }),
                );
                self.open.clear();
                if !self.phase.is_over() {
                    self.phase = Phase::Finished;
                }
                Orders {
                    send,
                    close_sessions: true,
                }
            }
            worker_event::Event::Checkpoint(c) => {
                let written = ShardsWritten {
                    step: c.step,
                    shards: c.shards.into_iter().collect(),
                };
                match self.book.shards_written(&written) {
                    Ok(_) => Orders::default(),
                    Err(e) => self.fail_with(
                        None,
                        format!("writing the checkpoint manifest: {e:#}"),
                        crate::files::is_disk_full(&e),
                    ),
                }
            }
            worker_event::Event::Failed(f) => match f.blames {
                // A peer went away under this worker: the failure is the peer's.
                Some(peer) if peer != rank && peer < self.world => {
                    self.fail(Some(peer), format!("lost by rank {rank}: {}", f.error))
                }
                _ => self.fail_with(Some(rank), f.error, f.needs_operator),
            },
        }
    }

    /// At a log step of the job: every rank's rates since the previous one, kept for
    /// `status` and written for TensorBoard.
    fn log_ranks(&mut self, step: u64) {
        let images = (self.cfg.job.batch / self.cfg.job.topology.replicas.max(1)) as u64;
        let mut points = Vec::new();
        for m in self.members.values_mut() {
            if let Some((ips, column, replica, cb, rb)) = m.counters.since(&m.at_log, images) {
                m.rates.images_per_s = ips;
                m.rates.column_share = column;
                m.rates.replica_share = replica;
                m.rates.column_bytes_per_step = cb;
                m.rates.replica_bytes_per_step = rb;
                m.at_log = m.counters;
                points.push(m.rates.clone());
            }
        }
        if let Some(tb) = &mut self.book.tensorboard {
            tb.ranks(step, &points);
        }
    }

    /// Stops writing this generation's TensorBoard file (the next generation writes its own,
    /// after cutting the curves back to its checkpoint).
    pub fn close_telemetry(&mut self) {
        self.book.tensorboard = None;
    }

    /// The watchdog's look at `now` (it started watching at `since`): fails the job when the
    /// rendezvous did not complete in time, or when a registered worker has been silent for
    /// longer than the peer timeout. `None`: nothing to do.
    pub fn tick(&mut self, now: Instant, since: Instant) -> Option<Orders> {
        if self.phase.is_over() {
            return None;
        }
        self.discount_own_pause(now);
        let timeout = self.cfg.rendezvous_timeout;
        let waited = now
            .saturating_duration_since(since)
            .saturating_sub(self.not_running);
        if self.phase == Phase::Waiting && waited > timeout {
            let joined: Vec<u32> = self.members.keys().copied().collect();
            let missing: Vec<u32> = (0..self.world).filter(|r| !joined.contains(r)).collect();
            return Some(self.fail(
                None,
                format!(
                    "the workers did not all come within {timeout:?}: ranks {joined:?} joined, {missing:?} did not"
                ),
            ));
        }
        let peer_timeout = self.cfg.peer_timeout;
        let running = self.phase == Phase::Running;
        let silent = self
            .members
            .iter()
            .filter(|(_, m)| {
                m.state != "finished" && now.saturating_duration_since(m.heard) > peer_timeout
            })
            .map(|(r, _)| *r)
            .find(|r| running || self.open.contains(r))?;
        if let Some(m) = self.members.get_mut(&silent) {
            m.state = "lost";
        }
        Some(self.fail(
            Some(silent),
            format!(
                "nothing heard from it for {peer_timeout:?} (the peer timeout): it hangs or its host is unreachable"
            ),
        ))
    }

    /// Notices that the coordinator itself was not running between two looks of the watchdog
    /// (which looks several times a second): a look late by more than half the peer timeout
    /// means a stopped process, a paused VM or a starved host, during which no heartbeat could
    /// be heard. Every member's silence is moved on by the gap, so no one is blamed for it,
    /// and a worker that really died meanwhile is still found one peer timeout after.
    fn discount_own_pause(&mut self, now: Instant) {
        let Some(last) = self.last_look.replace(now) else {
            return;
        };
        let gap = now.saturating_duration_since(last);
        if gap <= self.cfg.peer_timeout / 2 {
            return;
        }
        self.not_running += gap;
        for m in self.members.values_mut() {
            m.heard = (m.heard + gap).min(now);
        }
        tracing::warn!(
            not_running_s = crate::log_fields::rounded(gap.as_secs_f64(), 1),
            peer_timeout_s = crate::log_fields::rounded(self.cfg.peer_timeout.as_secs_f64(), 1),
            "the coordinator itself was not running for {:.1}s (stopped, paused with its VM or \
             starved of CPU): every worker gets a fresh peer timeout",
            gap.as_secs_f64()
        );
    }

    /// The job as `/metrics` shows it, at `now` (`restarts`: generations started after a
    /// failure, which the supervisor counts).
    pub fn metrics(&self, now: Instant, restarts: u64) -> JobSnapshot {
        let status = self.status(now, 0);
        let state = match &self.phase {
            Phase::Waiting => "waiting",
            Phase::Running => "running",
            Phase::Finished => "finished",
            Phase::Failed { .. } => "failed",
        };
        let last_val = self.book.history.last();
        JobSnapshot {
            job_id: self.cfg.job_id.clone(),
            version: crate::proto::VERSION.into(),
            config_hash: self.config_hash.clone(),
            state,
            step: status.step,
            total_steps: status.total_steps,
            epoch: status.epoch,
            train: self
                .book
                .last_train
                .as_ref()
                .map(|t| (t.loss, t.top1_err, t.top5_err)),
            validation: last_val.map(|h| {
                (
                    h.val_loss.unwrap_or(f64::NAN),
                    h.val_top1_err,
                    (self.cfg.job.net.classes > 5).then_some(h.val_top5_err),
                )
            }),
            images_per_s: status.images_per_s,
            lr: status.lr as f64,
            eta_s: status.eta_seconds,
            generation: self.cfg.generation,
            restarts,
            restarts_left: self.cfg.restarts_left,
            workers_expected: self.world,
            workers_joined: self.members.len() as u32,
            workers_lost: self.members.values().filter(|m| m.state == "lost").count() as u32,
            last_checkpoint_step: self.book.last_checkpoint.unwrap_or(0),
            checkpoint_age_s: self
                .book
                .last_checkpoint_at
                .and_then(|t| t.elapsed().ok())
                .map(|d| d.as_secs_f64()),
            ranks: self
                .members
                .iter()
                .map(|(&rank, m)| RankSnapshot {
                    rank,
                    replica: m.replica,
                    column: m.rates.column,
                    host: m.host.clone(),
                    up: matches!(m.state, "joined" | "running"),
                    heartbeat_age_s: now.saturating_duration_since(m.heard).as_secs_f64(),
                    step: m.step,
                    images_per_s: m.rates.images_per_s,
                    column_share: m.rates.column_share,
                    replica_share: m.rates.replica_share,
                    column_bytes: m.counters.column_bytes,
                    replica_bytes: m.counters.replica_bytes,
                    rss_bytes: m.rss,
                })
                .collect(),
        }
    }

    /// The job as `alexnet status` shows it, at `now` (`now_ms`: the coordinator's clock).
    pub fn status(&self, now: Instant, now_ms: i64) -> JobStatus {
        let (state, error) = match &self.phase {
            Phase::Waiting => ("waiting for workers", String::new()),
            Phase::Running => ("running", String::new()),
            Phase::Finished => ("finished", String::new()),
            Phase::Failed { error, .. } => ("failed", error.clone()),
        };
        let last = self.last_step.as_ref();
        let elapsed = self
            .started
            .map(|t| now.saturating_duration_since(t).as_secs_f64())
            .unwrap_or(0.0);
        let (step, total) = last.map(|s| (s.step, s.total_steps)).unwrap_or((0, 0));
        // This generation's steps: a continued run began at its checkpoint's.
        let from = self.cfg.resume.as_ref().map(|r| r.1.step).unwrap_or(0);
        let done = step.saturating_sub(from);
        let per_step = if done > 0 { elapsed / done as f64 } else { 0.0 };
        JobStatus {
            job_id: self.cfg.job_id.clone(),
            generation: self.cfg.generation,
            state: state.into(),
            world_size: self.world,
            step,
            total_steps: total,
            epoch: last.map(|s| s.epoch).unwrap_or(0),
            loss: last.map(|s| s.loss).unwrap_or(0.0),
            images_per_s: if elapsed > 0.0 {
                (done * self.cfg.job.batch as u64) as f64 / elapsed
            } else {
                0.0
            },
            eta_seconds: per_step * total.saturating_sub(step) as f64,
            workers: self
                .members
                .iter()
                .map(|(r, m)| WorkerStatus {
                    rank: *r,
                    host: m.host.clone(),
                    device: m.device.clone(),
                    pid: m.pid,
                    state: m.state.into(),
                    step: m.step,
                    seconds_since_heard: now.saturating_duration_since(m.heard).as_secs_f64(),
                    rss_bytes: m.rss,
                    error: m.error.clone(),
                    replica: m.replica,
                    columns: m.columns.clone(),
                    images_per_s: m.rates.images_per_s,
                    column_share: m.rates.column_share,
                    replica_share: m.rates.replica_share,
                    column_bytes: m.counters.column_bytes,
                    replica_bytes: m.counters.replica_bytes,
                })
                .collect(),
            config_hash: self.config_hash.clone(),
            error,
            version: crate::proto::VERSION.into(),
            unix_time_ms: now_ms,
            restarts_left: self.cfg.restarts_left,
            lr: last.map(|s| s.lr).unwrap_or(self.book.state.lr),
            last_checkpoint_step: self.book.last_checkpoint.unwrap_or(0),
            last_epoch: self.book.history.last().map(|h| EpochResult {
                epoch: h.epoch,
                train_loss: h.train_loss as f64,
                val_loss: h.val_loss.unwrap_or(f64::NAN),
                val_top1_err: h.val_top1_err,
                val_top5_err: h.val_top5_err,
                seconds: h.seconds,
            }),
            top1_err: self
                .book
                .last_train
                .as_ref()
                .map(|t| t.top1_err)
                .unwrap_or(0.0),
            top5_err: self
                .book
                .last_train
                .as_ref()
                .and_then(|t| t.top5_err)
                .unwrap_or(0.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Topology;
    use crate::proto::{Failed, Finished, Heartbeat};
    use crate::train::job::JobConfig;
    use std::time::Duration;

    const NOW_MS: i64 = 1_700_000_000_000;

    fn config(replicas: usize) -> CoordinatorConfig {
        CoordinatorConfig {
            job_id: "alpha".into(),
            job: JobConfig {
                topology: Topology {
                    replicas,
                    columns_per_worker: 1,
                },
                ..JobConfig::default()
            },
            generation: 0,
            peer_timeout: Duration::from_secs(10),
            heartbeat: Duration::from_secs(1),
            rendezvous_timeout: Duration::from_secs(60),
            log_every: 1,
            run_dir: None,
            resume: None,
            token: None,
            tls: None,
            max_clock_skew: Duration::from_secs(30),
            restarts_left: 1,
        }
    }

    fn control(cfg: CoordinatorConfig) -> Control {
        Control::new(Arc::new(cfg)).unwrap()
    }

    fn worker(rank: Option<u32>, host: &str) -> RegisterRequest {
        RegisterRequest {
            host: host.into(),
            device: "cpu".into(),
            data_addr: format!("127.0.0.1:{}", 7000 + rank.unwrap_or(99)),
            rank,
            version: crate::proto::VERSION.into(),
            pid: 100 + rank.unwrap_or(99),
            unix_time_ms: NOW_MS,
            ..Default::default()
        }
    }

    /// A control whose `world` workers have all joined (as ranks 0, 1, ...) and opened their
    /// sessions: the job is running.
    fn running(cfg: CoordinatorConfig, t0: Instant) -> Control {
        let mut c = control(cfg);
        for r in 0..c.world() {
            c.admit(&worker(Some(r), "a"), t0, NOW_MS).unwrap();
        }
        for r in 0..c.world() {
            c.open_session(r, t0);
        }
        assert_eq!(*c.phase(), Phase::Running);
        c
    }

    fn kinds(orders: &Orders) -> Vec<(u32, &'static str)> {
        orders
            .send
            .iter()
            .map(|o| {
                let kind = match o.command.command {
                    Some(command::Command::Start(_)) => "start",
                    Some(command::Command::Stop(_)) => "stop",
                    Some(command::Command::Abort(_)) => "abort",
                    Some(command::Command::SetLr(_)) => "set_lr",
                    None => "none",
                };
                (o.rank, kind)
            })
            .collect()
    }

    #[test]
    fn the_rendezvous_completes_whatever_order_the_workers_arrive_in() {
        let t0 = Instant::now();
        let orders: [[Option<u32>; 4]; 4] = [
            [Some(0), Some(1), Some(2), Some(3)],
            [Some(3), Some(1), Some(0), Some(2)],
            [Some(2), None, Some(3), None],
            [None, None, None, None],
        ];
        for order in orders {
            let mut c = control(config(2));
            let mut ranks = Vec::new();
            for (i, want) in order.iter().enumerate() {
                let a = c.admit(&worker(*want, "a"), t0, NOW_MS).unwrap();
                if let Some(w) = want {
                    assert_eq!(a.rank, *w, "{order:?}");
                }
                // Only the last to arrive completes the rendezvous.
                assert_eq!(a.everyone, i == 3, "{order:?}");
                ranks.push(a.rank);
            }
            ranks.sort_unstable();
            assert_eq!(ranks, [0, 1, 2, 3], "{order:?}");
            for r in 0..4 {
                let a = c.assignment(r);
                assert_eq!((a.rank, a.world_size, a.generation), (r, 4, 0));
                // Two replicas of a pair: ranks 0 and 1 are replica 0's columns 0 and 1.
                assert_eq!((a.replica, a.columns.clone()), (r / 2, vec![r % 2]));
                assert_eq!(a.data_addrs.len(), 4);
                assert_eq!(a.memory_sharers, 4, "four CPU workers on host a");
            }
            // Sessions open in any order too; the job starts with the last.
            for (i, r) in [2, 0, 3, 1].into_iter().enumerate() {
                let o = c.open_session(r, t0);
                if i < 3 {
                    assert!(o.send.is_empty());
                    assert_eq!(*c.phase(), Phase::Waiting);
                } else {
                    assert_eq!(
                        kinds(&o),
                        [(0, "start"), (1, "start"), (2, "start"), (3, "start")]
                    );
                    assert_eq!(*c.phase(), Phase::Running);
                }
            }
        }
    }

    #[test]
    fn a_rank_claimed_twice_is_refused_naming_its_holder() {
        let t0 = Instant::now();
        let mut c = control(config(1));
        c.admit(&worker(Some(0), "host-a"), t0, NOW_MS).unwrap();
        let e = c.admit(&worker(Some(0), "host-b"), t0, NOW_MS).unwrap_err();
        assert_eq!(e.kind, RefusalKind::Taken);
        assert!(
            e.message
                .contains("rank 0 is already taken by host-a (pid 100)"),
            "{e}"
        );
        // The refused worker changed nothing: rank 1 is still free and completes the job.
        assert!(
            c.admit(&worker(None, "host-b"), t0, NOW_MS)
                .unwrap()
                .everyone
        );
        assert_eq!(c.assignment(0).data_addrs[&0], "127.0.0.1:7000");
    }

    #[test]
    fn a_worker_late_for_the_rendezvous_is_refused() {
        let t0 = Instant::now();
        let mut c = control(config(1));
        c.admit(&worker(Some(0), "a"), t0, NOW_MS).unwrap();
        c.admit(&worker(Some(1), "a"), t0, NOW_MS).unwrap();
        // Assigned, not started yet: every rank is held.
        let e = c.admit(&worker(None, "b"), t0, NOW_MS).unwrap_err();
        assert_eq!(e.kind, RefusalKind::Full);
        assert!(e.message.contains("already has all its 2 workers"), "{e}");
        let e = c.admit(&worker(Some(1), "b"), t0, NOW_MS).unwrap_err();
        assert_eq!(e.kind, RefusalKind::Taken);
        c.open_session(0, t0);
        c.open_session(1, t0);
        // Started: nobody joins any more.
        let e = c.admit(&worker(None, "b"), t0, NOW_MS).unwrap_err();
        assert_eq!(e.kind, RefusalKind::Closed);
        assert!(
            e.message.contains("generation 0 has already started"),
            "{e}"
        );
    }

    #[test]
    fn a_coordinator_that_was_not_running_blames_no_one_and_still_finds_the_dead() {
        let t0 = Instant::now();
        let mut c = running(config(1), t0);
        let beat = |c: &mut Control, rank: u32, at: Instant| {
            c.event(
                rank,
                0,
                worker_event::Event::Heartbeat(Heartbeat { rss_bytes: 1 }),
                at,
            );
        };
        // The watchdog looks four times a second while both ranks send heartbeats.
        let mut now = t0;
        for _ in 0..8 {
            now += Duration::from_millis(250);
            beat(&mut c, 0, now);
            beat(&mut c, 1, now);
            assert!(c.tick(now, t0).is_none());
        }
        // The coordinator is stopped for three peer timeouts; rank 1 dies meanwhile, rank 0
        // is healthy and its heartbeats wait in the socket.
        now += Duration::from_secs(30);
        assert!(c.tick(now, t0).is_none(), "{:?}", c.phase());
        assert_eq!(*c.phase(), Phase::Running);
        // Rank 0's heartbeats are read; rank 1 stays silent and is found one peer timeout
        // after the coordinator ran again, not before.
        let resumed = now;
        let found = loop {
            now += Duration::from_millis(250);
            beat(&mut c, 0, now);
            if let Some(orders) = c.tick(now, t0) {
                assert_eq!(kinds(&orders), [(0, "abort")]);
                break now;
            }
        };
        let after = found - resumed;
        assert!(
            after > Duration::from_secs(10) && after <= Duration::from_millis(10_500),
            "{after:?}"
        );
        let Phase::Failed { rank, error, .. } = c.phase().clone() else {
            panic!("{:?}", c.phase())
        };
        assert_eq!(rank, Some(1));
        assert!(error.contains("nothing heard from it"), "{error}");
    }

    #[test]
    fn a_lost_worker_fails_the_generation_and_the_next_one_assigns_afresh() {
        let t0 = Instant::now();
        let cfg = config(1);
        let mut c = running(cfg.clone(), t0);
        // Rank 0 keeps sending heartbeats; rank 1 falls silent.
        let later = t0 + Duration::from_secs(8);
        c.event(
            0,
            0,
            worker_event::Event::Heartbeat(Heartbeat { rss_bytes: 1 }),
            later,
        );
        assert!(c.tick(later, t0).is_none());
        let lost = t0 + Duration::from_secs(11);
        let orders = c.tick(lost, t0).expect("rank 1 is lost");
        assert_eq!(kinds(&orders), [(0, "abort")]);
        assert!(orders.close_sessions);
        let Some(command::Command::Abort(a)) = &orders.send[0].command.command else {
            unreachable!()
        };
        assert!(a.rejoin, "a restart is left");
        assert!(
            a.reason.contains("rank 1 (a, cpu, pid 101) failed"),
            "{}",
            a.reason
        );
        let Phase::Failed { rank, error, .. } = c.phase().clone() else {
            panic!("{:?}", c.phase())
        };
        assert_eq!(rank, Some(1));
        assert!(error.contains("nothing heard from it for 10s"), "{error}");
        assert_eq!(c.status(lost, NOW_MS).workers[1].state, "failed");
        // Nothing more happens to a failed generation: later failures only mark their rank.
        assert!(c.tick(lost, t0).is_none());
        assert_eq!(c.fail(Some(0), "late".into()), Orders::default());
        // The next generation: one restart fewer, the workers join it as they come.
        let next = super::super::Coordinator::next_generation(&cfg).unwrap();
        assert_eq!((next.generation, next.restarts_left), (1, 0));
        let mut n = control(next);
        let mut stale = worker(Some(0), "a");
        stale.generation = Some(0);
        let e = n.admit(&stale, lost, NOW_MS).unwrap_err();
        assert!(e.message.contains("is in generation 1"), "{e}");
        let mut fresh = worker(Some(1), "b");
        fresh.generation = Some(1);
        n.admit(&fresh, lost, NOW_MS).unwrap();
        assert!(n.admit(&worker(None, "a"), lost, NOW_MS).unwrap().everyone);
        let a = n.assignment(1);
        assert_eq!(
            (a.generation, a.rank, a.data_addrs[&1].as_str()),
            (1, 1, "127.0.0.1:7001")
        );
        assert_eq!(n.assignment(0).data_addrs[&0], "127.0.0.1:7099");
        let o = {
            n.open_session(0, lost);
            n.open_session(1, lost)
        };
        assert_eq!(kinds(&o), [(0, "start"), (1, "start")]);
    }

    #[test]
    fn a_stale_generations_messages_are_ignored() {
        let t0 = Instant::now();
        let mut cfg = config(1);
        cfg.generation = 1;
        let mut c = running(cfg, t0);
        let finished = |steps| {
            worker_event::Event::Finished(Finished {
                steps,
                ..Default::default()
            })
        };
        // Generation 0's last words change nothing in generation 1.
        for r in 0..2 {
            assert_eq!(c.event(r, 0, finished(5), t0), Orders::default());
        }
        let failed = worker_event::Event::Failed(Failed {
            error: "old".into(),
            blames: None,
            needs_operator: false,
        });
        assert_eq!(c.event(0, 0, failed, t0), Orders::default());
        assert_eq!(*c.phase(), Phase::Running);
        assert!(c.exchange_seconds().is_empty());
        let e = c.may_open_session(0, 0).unwrap_err();
        assert!(e.message.contains("generation 0 is over"), "{e}");
        c.may_open_session(0, 1).unwrap();
        // Generation 1's own messages count.
        assert_eq!(c.event(0, 1, finished(5), t0), Orders::default());
        let o = c.event(1, 1, finished(5), t0);
        assert_eq!(kinds(&o), [(0, "stop"), (1, "stop")]);
        assert_eq!(*c.phase(), Phase::Finished);
        assert_eq!(c.exchange_seconds().len(), 2);
    }

    #[test]
    fn a_full_disk_stops_the_job_without_asking_anyone_to_rejoin() {
        let t0 = Instant::now();
        let mut c = running(config(1), t0);
        let ev = worker_event::Event::Failed(Failed {
            error: "checkpoint ... needs 1.0 MiB: the disk is full".into(),
            blames: None,
            needs_operator: true,
        });
        let o = c.event(1, 0, ev, t0);
        assert_eq!(kinds(&o), [(0, "abort")]);
        let Some(command::Command::Abort(a)) = &o.send[0].command.command else {
            unreachable!()
        };
        assert!(!a.rejoin, "a restart would meet the same full disk");
        assert!(matches!(
            c.phase(),
            Phase::Failed {
                rank: Some(1),
                needs_operator: true,
                ..
            }
        ));
    }

    #[test]
    fn a_worker_that_loses_its_peer_blames_the_peer() {
        let t0 = Instant::now();
        let mut c = running(config(1), t0);
        let ev = worker_event::Event::Failed(Failed {
            error: "connection reset".into(),
            blames: Some(1),
            needs_operator: false,
        });
        let o = c.event(0, 0, ev, t0);
        // Rank 1 is the failure: rank 0, which reported it, is told to abort.
        assert_eq!(kinds(&o), [(0, "abort")]);
        assert_eq!(
            *c.phase(),
            Phase::Failed {
                rank: Some(1),
                error: "lost by rank 0: connection reset".into(),
                needs_operator: false,
            }
        );
    }

    #[test]
    fn a_closed_session_fails_the_job_unless_its_worker_finished() {
        let t0 = Instant::now();
        let mut c = running(config(1), t0);
        let done = worker_event::Event::Finished(Finished::default());
        c.event(0, 0, done, t0);
        assert_eq!(c.session_closed(0), Orders::default());
        assert_eq!(*c.phase(), Phase::Running);
        let o = c.session_closed(1);
        assert_eq!(kinds(&o), [(0, "abort")]);
        assert!(
            matches!(c.phase(), Phase::Failed { rank: Some(1), error, .. } if error.contains("connection to the coordinator closed"))
        );
    }

    #[test]
    fn a_rendezvous_that_does_not_complete_names_the_missing_ranks() {
        let t0 = Instant::now();
        let mut c = control(config(1));
        c.admit(&worker(Some(0), "a"), t0, NOW_MS).unwrap();
        assert!(c.tick(t0 + Duration::from_secs(59), t0).is_none());
        c.tick(t0 + Duration::from_secs(61), t0).unwrap();
        let Phase::Failed {
            rank: None, error, ..
        } = c.phase()
        else {
            panic!("{:?}", c.phase())
        };
        assert!(error.contains("ranks [0] joined, [1] did not"), "{error}");
    }
}
