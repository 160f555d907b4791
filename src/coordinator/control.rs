//! The coordinator's decisions for one generation, with no network and no clocks of its own:
//! admission and rendezvous, the assignments, the job's progress from the workers' events,
//! heartbeats, the first failure. Each input (a registration, a session opening, an event, a
//! tick of the watchdog, with the time it happened) changes the state and returns the
//! commands to send; the tonic service in `mod.rs` does the sending and the waiting. That
//! keeps every rule testable with plain unit tests.

use super::aggregate::Aggregator;
use super::CoordinatorConfig;
use crate::admission::{self, Holder, JobFacts, Joiner, Refusal, RefusalKind};
use crate::comm::ReplicaRange;
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
    /// Not a failure: an elastic job's world changes at a checkpoint (a replica joins), and
    /// the next generation goes on from it.
    Regrouping {
        reason: String,
    },
}

impl Phase {
    pub fn is_over(&self) -> bool {
        matches!(
            self,
            Phase::Finished | Phase::Failed { .. } | Phase::Regrouping { .. }
        )
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
    /// The rank it asked for (in an elastic job, its place in the largest world).
    slot: u32,
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

/// An elastic job's rendezvous (see `Topology::elastic`): workers join by slot, their rank in
/// the largest world; the rendezvous closes with the whole replicas among them, numbered
/// afresh, and a worker left out (or late) waits for the next generation.
#[derive(Debug)]
struct Elastic {
    range: ReplicaRange,
    per_replica: u32,
    /// Once the rendezvous closed: the rank each slot in this generation got.
    ranks: Option<BTreeMap<u32, u32>>,
    /// Workers waiting for the next generation, by slot: their host and when they last asked.
    waiting: BTreeMap<u32, (String, Instant)>,
    /// How this generation's world came to be (the log and `status` say it).
    why: String,
}

/// A waiting worker not heard from for this long has gone (a waiting worker asks again at
/// least every `generations::HOLD`).
const WAITING_FRESH: Duration = Duration::from_secs(60);

/// One generation of a job: who joined, where each rank stands, how the job goes.
pub struct Control {
    cfg: Arc<CoordinatorConfig>,
    /// Workers in this generation (an elastic job's largest world until its rendezvous
    /// closes).
    world: u32,
    /// When the rendezvous closed (every rank has joined, or an elastic job's deadline came
    /// with enough whole replicas).
    closed_at: Option<Instant>,
    elastic: Option<Elastic>,
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
    pub fn new(mut cfg: Arc<CoordinatorConfig>) -> anyhow::Result<Control> {
        cfg.job.validate()?;
        // An elastic rendezvous admits the largest world; it closes with the replicas that
        // came.
        let elastic = cfg.job.topology.elastic.map(|range| Elastic {
            range,
            per_replica: cfg.job.topology.workers_per_replica() as u32,
            ranks: None,
            waiting: BTreeMap::new(),
            why: String::new(),
        });
        if let Some(e) = &elastic {
            if cfg.job.topology.replicas != e.range.max {
                let c = Arc::make_mut(&mut cfg);
                c.job.topology = c.job.topology.with_replicas(e.range.max);
            }
        }
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
            closed_at: None,
            elastic,
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
        let cfg = self.cfg.clone();
        let facts = JobFacts {
            job_id: &cfg.job_id,
            generation: cfg.generation,
            config_hash: &self.config_hash,
            max_clock_skew: cfg.max_clock_skew,
        };
        admission::worker_fits(&facts, req, now_ms)?;
        // A fixed job's closed rendezvous has every rank held (refused below as such).
        let elastic_closed = self.elastic.is_some() && self.closed_at.is_some();
        if self.phase != Phase::Waiting || elastic_closed {
            if let Some(message) = self.may_wait(req, now) {
                return Err(Refusal {
                    kind: RefusalKind::NextGeneration,
                    message,
                });
            }
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
                slot: rank,
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
            self.close_rendezvous(now);
        }
        Ok(Admitted { rank, everyone })
    }

    /// Whether the rendezvous has closed: the places are decided.
    pub fn rendezvous_closed(&self) -> bool {
        self.closed_at.is_some()
    }

    /// A worker that finds this generation closed: in an elastic job with room for its
    /// replica, it is noted as waiting (a whole replica of them grows the world at the next
    /// checkpoint) and told to ask again; `None`: it is refused.
    fn may_wait(&mut self, req: &RegisterRequest, now: Instant) -> Option<String> {
        let replicas = self.cfg.job.topology.replicas;
        let e = self.elastic.as_mut()?;
        let slot = req.rank?;
        let largest = e.range.max as u32 * e.per_replica;
        if slot >= largest {
            return None;
        }
        // Ending as the worker asks: it waits for the generation that follows, if one does.
        if self.phase.is_over() {
            let follows = match &self.phase {
                Phase::Regrouping { .. } => true,
                Phase::Failed { needs_operator, .. } => {
                    !needs_operator && self.cfg.restarts_left > 0
                }
                _ => false,
            };
            return follows.then(|| {
                format!(
                    "generation {} is ending: this worker (slot {slot}) joins the next one",
                    self.cfg.generation
                )
            });
        }
        if e.ranks.as_ref().is_some_and(|r| r.contains_key(&slot)) {
            return None;
        }
        if e.waiting.insert(slot, (req.host.clone(), now)).is_none() {
            tracing::info!(
                slot,
                host = %req.host,
                "the worker of slot {slot} waits for the next generation"
            );
        }
        let message = if replicas < e.range.max {
            format!(
                "generation {} runs with {replicas} of {} replicas without this worker's (slot {slot}): \
                 it joins the next generation, which starts at the next checkpoint once its \
                 replica's {} workers all wait",
                self.cfg.generation, e.range.max, e.per_replica
            )
        } else {
            format!(
                "generation {} has all its {} replicas: this worker (slot {slot}) joins a later \
                 generation",
                self.cfg.generation, e.range.max
            )
        };
        Some(message)
    }

    /// The replicas (by slot) whose workers have all joined.
    fn whole_replicas(&self) -> Vec<u32> {
        let Some(e) = &self.elastic else {
            return Vec::new();
        };
        (0..e.range.max as u32)
            .filter(|r| {
                (0..e.per_replica).all(|c| self.members.contains_key(&(r * e.per_replica + c)))
            })
            .collect()
    }

    /// Decides the places: in an elastic job, the whole replicas are numbered afresh (slot
    /// order) and the workers of incomplete ones wait for the next generation.
    fn close_rendezvous(&mut self, now: Instant) {
        self.closed_at = Some(now);
        let whole = self.whole_replicas();
        let Some(e) = &mut self.elastic else {
            return;
        };
        let per = e.per_replica;
        let mut slots = std::mem::take(&mut self.members);
        let mut ranks = BTreeMap::new();
        for (replica, &slot_replica) in whole.iter().enumerate() {
            for c in 0..per {
                let slot = slot_replica * per + c;
                let rank = replica as u32 * per + c;
                let mut m = slots.remove(&slot).expect("a whole replica's member");
                m.replica = replica as u32;
                m.rates.rank = rank;
                m.rates.replica = replica as u32;
                self.members.insert(rank, m);
                ranks.insert(slot, rank);
            }
        }
        for (slot, m) in slots {
            e.waiting.insert(slot, (m.host, now));
        }
        let replicas = whole.len();
        let missing: Vec<u32> = (0..e.range.max as u32)
            .filter(|r| !whole.contains(r))
            .collect();
        e.why = if missing.is_empty() {
            format!(
                "{replicas} of {} replicas: every replica joined",
                e.range.max
            )
        } else {
            format!(
                "{replicas} of {} replicas: replica slot{} {} (ranks {}) did not come whole within {:?}",
                e.range.max,
                if missing.len() > 1 { "s" } else { "" },
                missing.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
                missing
                    .iter()
                    .map(|r| format!("{}..{}", r * per, (r + 1) * per - 1))
                    .collect::<Vec<_>>()
                    .join(", "),
                self.cfg.rendezvous_timeout
            )
        };
        e.ranks = Some(ranks);
        let c = Arc::make_mut(&mut self.cfg);
        c.job.topology = c.job.topology.with_replicas(replicas);
        self.world = replicas as u32 * per;
        self.job_json = serde_json::to_string(&self.cfg.job).expect("a job serialises");
        self.aggregator = Aggregator::new(replicas);
        if missing.is_empty() {
            tracing::info!(
                generation = self.cfg.generation,
                replicas,
                "the world: {}",
                e.why
            );
        } else {
            tracing::warn!(
                generation = self.cfg.generation,
                replicas,
                "the world shrinks: {}; this generation goes on without them, and they join at a \
                 checkpoint once they are back",
                e.why
            );
        }
    }

    /// Rank `slot`'s place, once the rendezvous closed: `None` when its replica was left out
    /// (it waits for the next generation). In a fixed job, a slot is its rank.
    pub fn placed(&self, slot: u32) -> Option<u32> {
        match &self.elastic {
            None => Some(slot),
            Some(e) => e.ranks.as_ref()?.get(&slot).copied(),
        }
    }

    /// What a worker left out of this generation is told.
    pub fn left_out(&self, slot: u32) -> Refusal {
        Refusal {
            kind: RefusalKind::NextGeneration,
            message: format!(
                "generation {} started with {} without this worker's replica (slot {slot}): it \
                 joins the next generation",
                self.cfg.generation,
                self.elastic.as_ref().map(|e| e.why.as_str()).unwrap_or("")
            ),
        }
    }

    /// At a complete checkpoint (`step`) of an elastic job running short of replicas: when
    /// whole replicas wait to join, this generation ends here and the next one, with them,
    /// goes on from this checkpoint.
    fn grow_at_checkpoint(&mut self, step: u64, now: Instant) -> Orders {
        let replicas = self.cfg.job.topology.replicas;
        let Some(e) = &mut self.elastic else {
            return Orders::default();
        };
        if self.phase != Phase::Running || replicas >= e.range.max {
            return Orders::default();
        }
        // The job's last checkpoint ends it: nothing is left to train with more replicas.
        let total = self.last_step.as_ref().map(|s| s.total_steps);
        if total.is_none_or(|t| step >= t) {
            return Orders::default();
        }
        e.waiting
            .retain(|_, (_, at)| now.saturating_duration_since(*at) <= WAITING_FRESH);
        let per = e.per_replica;
        let held = e.ranks.clone().unwrap_or_default();
        let joining: Vec<u32> = (0..e.range.max as u32)
            .filter(|r| {
                (0..per).all(|c| {
                    let slot = r * per + c;
                    e.waiting.contains_key(&slot) && !held.contains_key(&slot)
                })
            })
            .take(e.range.max - replicas)
            .collect();
        if joining.is_empty() {
            return Orders::default();
        }
        let hosts: BTreeSet<&str> = joining
            .iter()
            .flat_map(|r| (0..per).map(move |c| r * per + c))
            .filter_map(|slot| e.waiting.get(&slot).map(|w| w.0.as_str()))
            .collect();
        let reason =
            format!(
            "replica slot{} {} ({}) {} back: the world grows from {replicas} to {} replicas from \
             the checkpoint at step {step}",
            if joining.len() > 1 { "s" } else { "" },
            joining.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", "),
            hosts.into_iter().collect::<Vec<_>>().join(", "),
            if joining.len() > 1 { "are" } else { "is" },
            replicas + joining.len()
        );
        tracing::warn!(
            generation = self.cfg.generation,
            step,
            "{reason}; ending generation {} here",
            self.cfg.generation
        );
        self.phase = Phase::Regrouping {
            reason: reason.clone(),
        };
        let abort = command::Command::Abort(Abort {
            reason,
            rejoin: true,
            regroup: true,
        });
        let send = Orders::to_all(&self.open, abort);
        self.open.clear();
        Orders {
            send,
            close_sessions: true,
        }
    }

    /// A worker whose registration was cut off before the rendezvous completed (its process
    /// died, its host dropped off) gives its rank back, so that the worker its agent starts
    /// next is not refused as a second holder. Only while others are still awaited: once
    /// every rank has joined, the places are handed out.
    pub fn withdraw(&mut self, rank: u32, pid: u32) {
        if self.phase != Phase::Waiting || self.closed_at.is_some() {
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
            regroup: false,
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
                    Ok(Some(step)) => self.grow_at_checkpoint(step, now),
                    Ok(None) => Orders::default(),
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
        // An elastic rendezvous that closed at its deadline gives the sessions a timeout of
        // their own; a fixed job's stays counted from the start, as it always was.
        let elastic_closed = self.elastic.is_some() && self.closed_at.is_some();
        if self.phase == Phase::Waiting && !elastic_closed && waited > timeout {
            let joined: Vec<u32> = self.members.keys().copied().collect();
            let missing: Vec<u32> = (0..self.world).filter(|r| !joined.contains(r)).collect();
            if let Some(e) = &self.elastic {
                let whole = self.whole_replicas().len();
                if whole >= e.range.min {
                    self.close_rendezvous(now);
                    return None;
                }
                let min = e.range.min;
                return Some(self.fail(
                    None,
                    format!(
                        "fewer than {min} whole replicas (the elastic range's least) came within \
                         {timeout:?}: {whole} did; ranks {joined:?} joined, {missing:?} did not"
                    ),
                ));
            }
            return Some(self.fail(
                None,
                format!(
                    "the workers did not all come within {timeout:?}: ranks {joined:?} joined, {missing:?} did not"
                ),
            ));
        }
        if let Some(closed) = self
            .closed_at
            .filter(|_| elastic_closed && self.phase == Phase::Waiting)
        {
            if now.saturating_duration_since(closed) > timeout {
                let opened: Vec<u32> = self.open.iter().copied().collect();
                let missing: Vec<u32> = (0..self.world).filter(|r| !opened.contains(r)).collect();
                return Some(self.fail(
                    None,
                    format!(
                        "every worker had its place, but the sessions of ranks {missing:?} did not open within {timeout:?}"
                    ),
                ));
            }
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
            Phase::Regrouping { .. } => "regrouping",
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
            replicas: self.cfg.job.topology.replicas as u32,
            replicas_max: self.cfg.job.topology.max_replicas() as u32,
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
            Phase::Regrouping { reason } => ("regrouping", reason.clone()),
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
                    slot: m.slot,
                })
                .collect(),
            replicas: self.cfg.job.topology.replicas as u32,
            max_replicas: self.cfg.job.topology.max_replicas() as u32,
            world: self
                .elastic
                .as_ref()
                .map(|e| e.why.clone())
                .unwrap_or_default(),
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
                    elastic: None,
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
            rejoin_timeout: Duration::from_secs(30),
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

    /// An elastic job (`--replicas min:max`) of one column per worker, batch 48.
    fn elastic(min: usize, max: usize) -> CoordinatorConfig {
        let mut cfg = config(max);
        cfg.job.batch = 48;
        cfg.job.topology.elastic = Some(ReplicaRange { min, max });
        cfg
    }

    fn in_slot(slot: u32, host: &str) -> RegisterRequest {
        worker(Some(slot), host)
    }

    /// Writes the shards of a checkpoint at `step` and reports them from both columns.
    fn checkpoint(c: &mut Control, run_dir: &std::path::Path, step: u64, now: Instant) -> Orders {
        let dir = crate::train::checkpoint::step_dir(run_dir, step);
        std::fs::create_dir_all(&dir).unwrap();
        let mut orders = Orders::default();
        for column in 0..2u32 {
            let name = format!("column{column}.safetensors");
            std::fs::write(dir.join(&name), [column as u8; 8]).unwrap();
            let sum = crate::train::checkpoint::checksum(&[column as u8; 8]);
            let ev = worker_event::Event::Checkpoint(crate::proto::CheckpointShards {
                step,
                shards: [(name, sum)].into_iter().collect(),
            });
            orders = c.event(column, 0, ev, now);
        }
        orders
    }

    /// Every replica's column 0 reports step `step` of `total`.
    fn progress(c: &mut Control, step: u64, total: u64, now: Instant) {
        for r in (0..c.world()).step_by(2) {
            let ev = worker_event::Event::Progress(crate::proto::Progress {
                step,
                total_steps: total,
                steps_per_epoch: total,
                loss: 1.0,
                ..Default::default()
            });
            c.event(r, 0, ev, now);
        }
    }

    #[test]
    fn an_elastic_rendezvous_goes_on_with_the_whole_replicas_and_numbers_them_afresh() {
        let t0 = Instant::now();
        let mut c = control(elastic(3, 4));
        assert_eq!(c.world(), 8, "the largest world is admitted");
        // Replicas 0, 1 and 3 come whole; of replica 2 only slot 4.
        for slot in [0, 1, 2, 3, 6, 7, 4] {
            let a = c
                .admit(&in_slot(slot, &format!("h{}", slot / 2)), t0, NOW_MS)
                .unwrap();
            assert!(!a.everyone);
        }
        // The watchdog looks often (a late look would mean the coordinator was paused).
        for second in 1..=60 {
            assert!(c.tick(t0 + Duration::from_secs(second), t0).is_none());
            assert!(!c.rendezvous_closed(), "the deadline has not come");
        }
        // At the deadline: three whole replicas, enough (MIN 3).
        assert!(c.tick(t0 + Duration::from_millis(60_500), t0).is_none());
        assert!(c.rendezvous_closed());
        assert_eq!(c.world(), 6);
        assert_eq!(
            [0, 1, 2, 3, 6, 7].map(|s| c.placed(s)),
            [0, 1, 2, 3, 4, 5].map(Some)
        );
        assert_eq!(c.placed(4), None, "an incomplete replica waits");
        assert!(c.left_out(4).message.contains("joins the next generation"));
        let a = c.assignment(4);
        assert_eq!((a.rank, a.replica, a.world_size), (4, 2, 6));
        assert_eq!(
            a.data_addrs[&4], "127.0.0.1:7006",
            "slot 6's worker is rank 4"
        );
        let job: JobConfig = serde_json::from_str(&a.job_json).unwrap();
        assert_eq!(job.topology.replicas, 3);
        assert_eq!(
            a.config_hash,
            elastic(3, 4).job.hash(),
            "one hash for every world"
        );
        let st = c.status(t0, NOW_MS);
        assert_eq!((st.replicas, st.max_replicas), (3, 4));
        assert!(
            st.world
                .contains("replica slot 2 (ranks 4..5) did not come"),
            "{}",
            st.world
        );
        assert_eq!(st.workers[4].slot, 6);
        for r in 0..6 {
            c.open_session(r, t0);
        }
        assert_eq!(*c.phase(), Phase::Running);
        assert_eq!(c.aggregator.replicas(), 3);
    }

    #[test]
    fn an_elastic_rendezvous_with_fewer_whole_replicas_than_min_fails_naming_them() {
        let t0 = Instant::now();
        let mut c = control(elastic(3, 4));
        for slot in [0, 1, 2, 3, 4] {
            c.admit(&in_slot(slot, "h"), t0, NOW_MS).unwrap();
        }
        let o = c
            .tick(t0 + Duration::from_secs(61), t0)
            .expect("the generation fails");
        assert!(o.close_sessions);
        let Phase::Failed { error, .. } = c.phase() else {
            panic!("{:?}", c.phase())
        };
        assert!(error.contains("fewer than 3 whole replicas"), "{error}");
        assert!(error.contains("2 did"), "{error}");
    }

    /// An elastic 2:3 job with a run folder (named after `test`), running with replicas 0 and
    /// 1 (slots 0-3) after its rendezvous closed at the deadline; with the time it began.
    fn running_short(test: &str) -> (Control, std::path::PathBuf, Instant) {
        let run_dir =
            std::env::temp_dir().join(format!("alexnet-elastic-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&run_dir);
        let t0 = Instant::now();
        let mut cfg = elastic(2, 3);
        cfg.run_dir = Some(run_dir.clone());
        let mut c = control(cfg);
        for slot in [0, 1, 2, 3] {
            c.admit(&in_slot(slot, "h"), t0, NOW_MS).unwrap();
        }
        assert!(c.tick(t0 + Duration::from_secs(61), t0).is_none());
        for r in 0..4 {
            c.open_session(r, t0);
        }
        assert_eq!(*c.phase(), Phase::Running);
        (c, run_dir, t0)
    }

    #[test]
    fn an_elastic_job_grows_at_the_checkpoint_after_a_whole_replica_waits() {
        let (mut c, run_dir, t0) = running_short("grow");
        // Host 2's workers come back: each is told to wait, none placed.
        let t1 = t0 + Duration::from_secs(70);
        let e = c.admit(&in_slot(4, "h2"), t1, NOW_MS).unwrap_err();
        assert_eq!(e.kind, RefusalKind::NextGeneration);
        assert!(e.message.contains("runs with 2 of 3 replicas"), "{e}");
        // A slot held in this generation, or beyond the largest world, is refused.
        assert_eq!(
            c.admit(&in_slot(0, "x"), t1, NOW_MS).unwrap_err().kind,
            RefusalKind::Closed
        );
        assert_eq!(
            c.admit(&in_slot(6, "x"), t1, NOW_MS).unwrap_err().kind,
            RefusalKind::Closed
        );
        // Half a replica waits: the checkpoint passes without a change.
        progress(&mut c, 10, 30, t1);
        assert_eq!(c.last_step().map(|s| s.total_steps), Some(30));
        assert_eq!(checkpoint(&mut c, &run_dir, 10, t1), Orders::default());
        assert_eq!(*c.phase(), Phase::Running);
        c.admit(&in_slot(5, "h2"), t1, NOW_MS).unwrap_err();
        // The next checkpoint: the world grows; every worker is told to rejoin, not failed.
        progress(&mut c, 20, 30, t1);
        let o = checkpoint(&mut c, &run_dir, 20, t1);
        assert_eq!(
            kinds(&o),
            [(0, "abort"), (1, "abort"), (2, "abort"), (3, "abort")]
        );
        assert!(o.close_sessions);
        let Some(command::Command::Abort(a)) = &o.send[0].command.command else {
            unreachable!()
        };
        assert!(a.rejoin && a.regroup);
        let Phase::Regrouping { reason } = c.phase().clone() else {
            panic!("{:?}", c.phase())
        };
        assert!(
            reason.contains("replica slot 2 (h2) is back: the world grows from 2 to 3 replicas from the checkpoint at step 20"),
            "{reason}"
        );
        assert_eq!(c.status(t1, NOW_MS).state, "regrouping");
        // A worker asking meanwhile waits for the next generation, even one of this one's.
        let e = c.admit(&in_slot(0, "h"), t1, NOW_MS).unwrap_err();
        assert_eq!(e.kind, RefusalKind::NextGeneration);
        assert!(e.message.contains("generation 0 is ending"), "{e}");
        // The next generation starts from that checkpoint with no restart spent and waits
        // the rejoin timeout for its replicas.
        let cfg = c.cfg.clone();
        let next = super::super::Coordinator::next_generation(&cfg, false).unwrap();
        assert_eq!(next.restarts_left, cfg.restarts_left);
        assert_eq!(next.rendezvous_timeout, cfg.rejoin_timeout);
        assert_eq!(next.resume.as_ref().map(|r| r.1.step), Some(20));
        let n = control(next);
        assert_eq!(n.world(), 6, "it admits the largest world again");
        let _ = std::fs::remove_dir_all(&run_dir);
    }

    #[test]
    fn an_elastic_job_does_not_regroup_at_its_last_checkpoint() {
        let (mut c, run_dir, t0) = running_short("last");
        let t1 = t0 + Duration::from_secs(70);
        for slot in [4, 5] {
            c.admit(&in_slot(slot, "h2"), t1, NOW_MS).unwrap_err();
        }
        progress(&mut c, 30, 30, t1);
        assert_eq!(checkpoint(&mut c, &run_dir, 30, t1), Orders::default());
        assert_eq!(*c.phase(), Phase::Running, "the job finishes as it is");
        let _ = std::fs::remove_dir_all(&run_dir);
    }

    #[test]
    fn elastic_ranges_that_cannot_run_are_refused_by_name() {
        use std::str::FromStr;
        let e = ReplicaRange::from_str("3:2").unwrap_err();
        assert!(
            e.contains("the smallest count (3) is above the largest (2)"),
            "{e}"
        );
        assert!(ReplicaRange::from_str("0:2")
            .unwrap_err()
            .contains("at least 1"));
        assert!(ReplicaRange::from_str("x").unwrap_err().contains("MIN:MAX"));
        assert_eq!(
            ReplicaRange::from_str("4").unwrap(),
            ReplicaRange { min: 4, max: 4 }
        );
        let job = |batch, min, max| {
            let mut j = JobConfig {
                batch,
                ..JobConfig::default()
            };
            j.topology.replicas = max;
            j.topology.elastic = Some(ReplicaRange { min, max });
            j.validate().map_err(|e| format!("{e:#}"))
        };
        assert!(job(48, 3, 4).is_ok());
        let e = job(64, 3, 4).unwrap_err();
        assert!(
            e.contains("batch 64 cannot be split evenly over 3 replicas")
                && e.contains("a multiple of 12"),
            "{e}"
        );
        let e = job(2, 3, 4).unwrap_err();
        assert!(e.contains("cannot give each of 3 replicas"), "{e}");
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
        let next = super::super::Coordinator::next_generation(&cfg, true).unwrap();
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
