//! The coordinator: admits the workers of one job, tells each its place (rendezvous), relays
//! what the data plane needs, watches heartbeats, combines and logs progress, and aborts the
//! generation when a worker goes away.
//!
//! It never touches activations or gradients: those go between workers directly. Its
//! decisions are in `control.rs`, with no I/O; this module is the tonic service around them:
//! the sessions' streams, the waits (each bounded) and the watchdog's timer.

pub mod aggregate;
pub mod control;
pub mod generations;

pub use crate::admission::unix_time_ms;
pub use crate::auth::Secret;
pub use control::{ExchangeSeconds, Phase};

use crate::proto::coordinator_server::{Coordinator as CoordinatorRpc, CoordinatorServer};
use crate::proto::{Assignment, Command, JobStatus, RegisterRequest, StatusRequest, WorkerEvent};
use crate::train::checkpoint::Manifest;
use crate::train::job::JobConfig;
use control::{Control, Orders};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

/// The coordinator's TLS identity: its PEM certificate (chain) and private key.
#[derive(Clone, Debug)]
pub struct TlsIdentity {
    pub cert_pem: Vec<u8>,
    pub key_pem: Secret,
}

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
    /// TLS for the control plane.
    pub tls: Option<TlsIdentity>,
    /// Workers whose clock differs from the coordinator's by more than this are refused.
    pub max_clock_skew: Duration,
    /// Generations that may still follow this one after a failure: workers told to abort
    /// are told whether to rejoin.
    pub restarts_left: u32,
    /// An elastic job's generations after the first wait this long for every replica (its
    /// rendezvous timeout) before going on with the whole ones that came.
    pub rejoin_timeout: Duration,
}

type SessionSender = mpsc::Sender<Result<Command, Status>>;

/// The decisions and the open sessions they are carried out on, under one lock so that
/// commands leave in the order they were decided.
struct Shared {
    control: Control,
    sessions: BTreeMap<u32, SessionSender>,
}

/// The coordinator's shared state and the gRPC service over it.
#[derive(Clone)]
pub struct Coordinator {
    cfg: Arc<CoordinatorConfig>,
    config_hash: String,
    shared: Arc<Mutex<Shared>>,
    phase: watch::Sender<Phase>,
    everyone_joined: watch::Sender<bool>,
    /// When this generation began.
    started: Instant,
}

impl Coordinator {
    pub fn new(cfg: CoordinatorConfig) -> anyhow::Result<Self> {
        let cfg = Arc::new(cfg);
        let control = Control::new(cfg.clone())?;
        Ok(Coordinator {
            cfg,
            config_hash: control.config_hash().to_string(),
            shared: Arc::new(Mutex::new(Shared {
                control,
                sessions: BTreeMap::new(),
            })),
            phase: watch::channel(Phase::Waiting).0,
            everyone_joined: watch::channel(false).0,
            started: Instant::now(),
        })
    }

    pub fn config_hash(&self) -> &str {
        &self.config_hash
    }

    /// When this generation began: a worker started before it belonged to an earlier one.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// This generation's number.
    pub fn generation(&self) -> u64 {
        self.cfg.generation
    }

    /// Follows the job's phase.
    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    /// The newest step reported and its loss (the mean over the job's replicas).
    pub fn last_step(&self) -> Option<(u64, f32)> {
        let sh = self.shared.lock().unwrap();
        sh.control.last_step().map(|s| (s.step, s.loss))
    }

    /// The validation results so far.
    pub fn results(&self) -> Vec<crate::train::checkpoint::EpochRecord> {
        self.shared.lock().unwrap().control.results().to_vec()
    }

    /// The newest complete checkpoint's step.
    pub fn last_checkpoint(&self) -> Option<u64> {
        self.shared.lock().unwrap().control.last_checkpoint()
    }

    /// Per rank: seconds in the column exchange, in the replica exchange, and in all.
    pub fn exchange_seconds(&self) -> Vec<ExchangeSeconds> {
        self.shared
            .lock()
            .unwrap()
            .control
            .exchange_seconds()
            .to_vec()
    }

    /// Runs one decision on the state and carries out its orders: the commands go to their
    /// sessions, and the phase it leaves is published.
    fn decide<T>(&self, f: impl FnOnce(&mut Shared) -> (T, Orders)) -> T {
        let mut sh = self.shared.lock().unwrap();
        let (out, orders) = f(&mut sh);
        for o in orders.send {
            if let Some(tx) = sh.sessions.get(&o.rank) {
                let _ = tx.try_send(Ok(o.command));
            }
        }
        if orders.close_sessions {
            sh.sessions.clear();
        }
        if sh.control.rendezvous_closed() {
            self.everyone_joined
                .send_if_modified(|j| !std::mem::replace(j, true));
        }
        // Published under the lock, so that phases are seen in the order they were decided.
        let now = sh.control.phase();
        self.phase.send_if_modified(|p| {
            if p == now {
                return false;
            }
            *p = now.clone();
            true
        });
        out
    }

    /// The job's figures for `/metrics`.
    pub fn metrics(&self, restarts: u64) -> crate::telemetry::prometheus::JobSnapshot {
        self.shared
            .lock()
            .unwrap()
            .control
            .metrics(Instant::now(), restarts)
    }

    /// Stops writing this generation's TensorBoard file.
    pub fn close_telemetry(&self) {
        self.shared.lock().unwrap().control.close_telemetry();
    }

    /// Records the first failure, tells every other worker to abort, and ends the job.
    pub fn fail(&self, rank: Option<u32>, error: String) {
        self.decide(|sh| ((), sh.control.fail(rank, error)))
    }

    /// Fails the job when the rendezvous does not complete in time, or when a registered
    /// worker is silent for longer than the peer timeout.
    pub async fn watchdog(self) {
        let since = Instant::now();
        let mut phase = self.phase.subscribe();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = phase.changed() => {}
            }
            if self.phase.borrow().is_over() {
                return;
            }
            let failed = self.decide(|sh| match sh.control.tick(Instant::now(), since) {
                Some(orders) => (true, orders),
                None => (false, Orders::default()),
            });
            if failed {
                return;
            }
        }
    }

    fn status(&self) -> JobStatus {
        self.shared
            .lock()
            .unwrap()
            .control
            .status(Instant::now(), unix_time_ms())
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

    /// The configuration of the generation that follows this one: it starts from the newest
    /// complete checkpoint in the run folder, with one restart fewer left after a failure
    /// (`after_failure`; not when an elastic job's world grows). An elastic job's next
    /// generation waits `rejoin_timeout` for its replicas.
    pub fn next_generation(
        cfg: &CoordinatorConfig,
        after_failure: bool,
    ) -> anyhow::Result<CoordinatorConfig> {
        let mut next = cfg.clone();
        next.generation += 1;
        if after_failure {
            next.restarts_left = cfg.restarts_left.saturating_sub(1);
        }
        if cfg.job.topology.elastic.is_some() {
            next.rendezvous_timeout = cfg.rejoin_timeout;
        }
        if let Some(dir) = &cfg.run_dir {
            next.resume = crate::train::checkpoint::latest(dir, Some(&cfg.job.hash()))?;
        }
        Ok(next)
    }
}

/// Writes the run folder's job.json and job-id (what `--resume` reads back).
pub fn write_run_files(run_dir: &std::path::Path, cfg: &CoordinatorConfig) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(run_dir)
        .with_context(|| format!("creating the run folder {}", run_dir.display()))?;
    crate::files::write_atomic(
        &run_dir.join("job.json"),
        serde_json::to_string_pretty(&cfg.job)?.as_bytes(),
    )?;
    crate::files::write_atomic(&run_dir.join("job-id"), cfg.job_id.as_bytes())
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
    if let Some(TlsIdentity { cert_pem, key_pem }) = &cfg.tls {
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(
                tonic::transport::Identity::from_pem(cert_pem, key_pem.expose().as_bytes()),
            ))
            .map_err(|e| anyhow::anyhow!("the TLS certificate or key is not usable: {e}"))?;
    }
    let router =
        builder
            .add_service(health_service)
            .add_service(CoordinatorServer::with_interceptor(
                svc,
                move |req: Request<()>| crate::auth::check_bearer(&token, req),
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

/// Gives a registered rank back when its registration call is dropped before it returns.
struct Withdraw<'a> {
    coordinator: &'a Coordinator,
    rank: u32,
    pid: u32,
    armed: bool,
}

impl Drop for Withdraw<'_> {
    fn drop(&mut self) {
        if self.armed {
            if let Ok(mut sh) = self.coordinator.shared.lock() {
                sh.control.withdraw(self.rank, self.pid);
            }
        }
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for Coordinator {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<Assignment>, Status> {
        let req = request.into_inner();
        let admitted = {
            let mut sh = self.shared.lock().unwrap();
            sh.control.admit(&req, Instant::now(), unix_time_ms())
        };
        let admitted = admitted.map_err(Status::from).inspect_err(|s| {
            if crate::admission::waits_for_next_generation(s) {
                tracing::debug!(host = %req.host, pid = req.pid, "a worker waits: {}", s.message())
            } else {
                tracing::warn!(host = %req.host, pid = req.pid, "refused a worker: {}", s.message())
            }
        })?;
        if admitted.everyone {
            self.everyone_joined.send_replace(true);
        }
        // Should this call be cut off while the others are awaited (the worker died), the
        // rank is given back.
        let mut withdraw = Withdraw {
            coordinator: self,
            rank: admitted.rank,
            pid: req.pid,
            armed: true,
        };
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
        // The watchdog closes an elastic rendezvous at its deadline: a moment more here.
        let grace = if self.cfg.job.topology.elastic.is_some() {
            Duration::from_secs(10)
        } else {
            Duration::ZERO
        };
        let waited = tokio::time::timeout(self.cfg.rendezvous_timeout + grace, wait).await;
        withdraw.armed = false;
        match waited {
            Ok(Ok(())) => {
                let sh = self.shared.lock().unwrap();
                match sh.control.placed(admitted.rank) {
                    Some(rank) => Ok(Response::new(sh.control.assignment(rank))),
                    None => Err(sh.control.left_out(admitted.rank).into()),
                }
            }
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
        self.shared
            .lock()
            .unwrap()
            .control
            .may_open_session(rank, first.generation)?;
        let (tx, rx) = mpsc::channel(64);
        if let Some(ev) = first.event {
            self.decide(|sh| {
                (
                    (),
                    sh.control.event(rank, first.generation, ev, Instant::now()),
                )
            });
        }
        // The sender goes in with the decision, so that the start reaches this rank too.
        self.decide(|sh| {
            sh.sessions.insert(rank, tx);
            ((), sh.control.open_session(rank, Instant::now()))
        });
        let this = self.clone();
        tokio::spawn(async move {
            let timeout = this.cfg.peer_timeout;
            loop {
                match tokio::time::timeout(timeout, inbound.message()).await {
                    Ok(Ok(Some(ev))) => {
                        if let Some(e) = ev.event {
                            this.decide(|sh| {
                                ((), sh.control.event(rank, ev.generation, e, Instant::now()))
                            });
                        }
                    }
                    Ok(Ok(None)) | Ok(Err(_)) => {
                        this.decide(|sh| ((), sh.control.session_closed(rank)));
                        return;
                    }
                    // Silence is the watchdog's to judge: it knows when the coordinator
                    // itself was not running (a stopped process, a paused VM), and blames no
                    // one for that.
                    Err(_) => {
                        if this.phase.borrow().is_over() {
                            return;
                        }
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
