//! A worker: one process per device. It joins the coordinator's job, learns its place (rank,
//! replica, columns), connects the data plane to the ranks it exchanges with, trains its part
//! of the network, and reports every step; it stops when the coordinator says so, and aborts
//! when told that another rank failed.

use crate::auth::Secret;
pub use crate::auth::TokenInterceptor;
use crate::backend::Device;
use crate::comm::{MeshKey, Topology};
use crate::proto::coordinator_client::CoordinatorClient;
use crate::proto::{
    command, worker_event, Assignment, CheckpointShards, Evaluation, Failed, Finished, Heartbeat,
    Progress, RegisterRequest, WorkerEvent,
};
use crate::train::fit::{EvalReport, Reporter, ShardsWritten, StepReport};
use crate::train::job::{self, JobConfig, Role};
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::transport::Channel;

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The coordinator's URL (`http://host:port`).
    pub coordinator: String,
    /// The job this worker was started for; `None` joins whatever job the coordinator runs.
    pub job_id: Option<String>,
    pub config_hash: Option<String>,
    pub generation: Option<u64>,
    /// The rank to ask for; `None` takes the next free one.
    pub rank: Option<u32>,
    /// `cpu` (for now).
    pub device: String,
    /// Compute threads (default: every core).
    pub threads: Option<usize>,
    /// How the device runs (memory limit, TF32, convolutions).
    pub settings: crate::backend::DeviceSettings,
    /// How long to keep trying to reach the coordinator.
    pub connect_timeout: Duration,
    /// Where replica 0 writes its columns' parameters at the end.
    pub out: Option<PathBuf>,
    /// The job's token (sent with every call; proves membership on the data plane).
    pub token: Option<Secret>,
    /// For a coordinator serving TLS: the PEM certificate of the authority that signed its
    /// certificate, and the name to check it against (default: the URL's host).
    pub tls_ca: Option<Vec<u8>>,
    pub tls_domain: Option<String>,
}

impl WorkerOptions {
    /// Options for a control-plane client that is not a worker (`status`, an agent's checks):
    /// the coordinator, the job's token, and nothing of a worker's own.
    pub fn client_of(coordinator: &str, token: Option<Secret>) -> Self {
        WorkerOptions {
            coordinator: coordinator.to_string(),
            job_id: None,
            config_hash: None,
            generation: None,
            rank: None,
            device: "cpu".into(),
            threads: None,
            settings: Default::default(),
            connect_timeout: Duration::from_secs(5),
            out: None,
            token,
            tls_ca: None,
            tls_domain: None,
        }
    }
}

/// Resident memory of this process, from /proc (0 where unknown).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map(|pages| pages * 4096)
        .unwrap_or(0)
}

/// Why a worker or an agent ended without finishing, when restarting it cannot help (or, for a
/// stopped agent, when it must not count as done): its launcher (an agent, systemd, a
/// scheduler) reads this from the exit status.
#[derive(Debug)]
pub enum Verdict {
    /// The coordinator refused this worker for good (another job, version, clock, a rank
    /// already taken, a bad token): exit status `EXIT_REFUSED`.
    Refused(String),
    /// The coordinator ended the job with no generation to follow: exit status
    /// `EXIT_JOB_OVER`.
    JobOver(String),
    /// This worker met what no restart fixes (a full disk): exit status `EXIT_JOB_OVER`, so
    /// that its agent does not start it again; the coordinator stops the job for an operator.
    NeedsOperator(String),
    /// An agent stopped by SIGTERM or SIGINT before its job finished: exit status
    /// `EXIT_STOPPED` (128 + SIGTERM, as a shell reports it), so that a scheduler replaces an
    /// evicted host instead of counting it as done.
    Stopped(String),
    /// Not a failure: an elastic job's world changes at a checkpoint, and this worker is to
    /// join the next generation at once: exit status `EXIT_REGROUP`, which its agent restarts
    /// without counting a restart.
    Regroup(String),
}

/// Exit status of a worker the coordinator refused for good.
pub const EXIT_REFUSED: u8 = 3;
/// Exit status of a worker whose job the coordinator ended (no restarts left).
pub const EXIT_JOB_OVER: u8 = 4;
/// Exit status of an agent stopped by a signal before its job finished.
pub const EXIT_STOPPED: u8 = 143;
/// Exit status of a worker whose elastic job regroups (no failure: restart it at once).
pub const EXIT_REGROUP: u8 = 5;

impl Verdict {
    pub fn exit_code(&self) -> u8 {
        match self {
            Verdict::Refused(_) => EXIT_REFUSED,
            Verdict::JobOver(_) | Verdict::NeedsOperator(_) => EXIT_JOB_OVER,
            Verdict::Stopped(_) => EXIT_STOPPED,
            Verdict::Regroup(_) => EXIT_REGROUP,
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Refused(why) => write!(f, "the coordinator refused this worker: {why}"),
            Verdict::JobOver(why) => write!(f, "the coordinator ended the job: {why}"),
            Verdict::NeedsOperator(why) => write!(f, "{why}"),
            Verdict::Stopped(why) => write!(f, "stopped before the job finished: {why}"),
            Verdict::Regroup(why) => write!(f, "the next generation awaits this worker: {why}"),
        }
    }
}

impl std::error::Error for Verdict {}

/// The error of a worker whose generation was aborted: worth a restart when another
/// generation follows, final otherwise.
fn aborted(reason: &str, rejoin: bool, regroup: bool) -> anyhow::Error {
    if regroup {
        Verdict::Regroup(reason.to_string()).into()
    } else if rejoin {
        anyhow::anyhow!("the coordinator aborted this generation: {reason} (the next generation awaits this rank)")
    } else {
        Verdict::JobOver(reason.to_string()).into()
    }
}

/// The reason of a regroup the coordinator ordered (an elastic job's world changes), once
/// known: at once, or, when a peer was lost (`lost_peer`), after waiting a moment (at most
/// half a second) for the order that made the peer leave: the coordinator sends it to every
/// worker at once.
fn regroup_under_way(
    commands: &CommandBox,
    lost_peer: bool,
    peer_timeout: Duration,
) -> Option<String> {
    let deadline = Instant::now() + peer_timeout.min(Duration::from_millis(500));
    let mut state = commands.state.lock().unwrap();
    loop {
        match &state.abort {
            Some((reason, _, true)) => return Some(reason.clone()),
            Some(_) => return None,
            None if !lost_peer || state.stopped => return None,
            None => {}
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        state = commands.changed.wait_timeout(state, left).unwrap().0;
    }
}

/// What the coordinator said, as the training thread sees it.
#[derive(Default)]
struct Commands {
    /// Set when the coordinator aborted the generation (or went away): the reason, and
    /// whether a new generation follows.
    abort: Option<(String, bool, bool)>,
    stopped: bool,
    /// The learning rate decided after each epoch's validation.
    lr_after_epoch: BTreeMap<u64, f32>,
}

/// The commands and a condition variable to wait for a new one.
#[derive(Default)]
struct CommandBox {
    state: Mutex<Commands>,
    changed: std::sync::Condvar,
}

impl CommandBox {
    fn update(&self, f: impl FnOnce(&mut Commands)) {
        f(&mut self.state.lock().unwrap());
        self.changed.notify_all();
    }
}

/// Sends the training loop's reports to the coordinator and stops the loop on an abort.
struct RemoteReporter {
    rank: u32,
    generation: u64,
    events: mpsc::UnboundedSender<WorkerEvent>,
    commands: Arc<CommandBox>,
    /// How long to wait for the coordinator's decision after a validation.
    decision_timeout: Duration,
}

impl RemoteReporter {
    fn send(&self, event: worker_event::Event) {
        let _ = self.events.send(WorkerEvent {
            rank: self.rank,
            generation: self.generation,
            event: Some(event),
        });
    }

    fn check(&self) -> anyhow::Result<()> {
        if let Some((reason, rejoin, regroup)) = &self.commands.state.lock().unwrap().abort {
            return Err(aborted(reason, *rejoin, *regroup));
        }
        Ok(())
    }
}

impl Reporter for RemoteReporter {
    fn step(&mut self, r: &StepReport) -> anyhow::Result<()> {
        self.send(worker_event::Event::Progress(Progress {
            epoch: r.epoch,
            step: r.step,
            total_steps: r.total_steps,
            last_of_epoch: r.last_of_epoch,
            loss: r.loss,
            hits: Some(r.hits.into()),
            lr: r.lr,
            column_bytes: r.column_bytes,
            replica_bytes: r.replica_bytes,
            rss_bytes: rss_bytes(),
            steps_per_epoch: r.steps_per_epoch,
            train_seconds: r.train_seconds,
            column_seconds: r.column_seconds,
            replica_seconds: r.replica_seconds,
        }));
        self.check()
    }

    fn evaluation(&mut self, r: &EvalReport) -> anyhow::Result<f32> {
        self.send(worker_event::Event::Evaluation(Evaluation {
            epoch: r.epoch,
            hits: Some(r.hits.into()),
        }));
        // The coordinator combines every replica's validation and decides the learning rate.
        // The wait looks at the clock every second: time this process itself was not running
        // (stopped, a paused VM) is not the coordinator's delay.
        let look = Duration::from_secs(1);
        let mut deadline = Instant::now() + self.decision_timeout;
        let mut c = self.commands.state.lock().unwrap();
        loop {
            if let Some((reason, rejoin, regroup)) = &c.abort {
                return Err(aborted(reason, *rejoin, *regroup));
            }
            if let Some(&lr) = c.lr_after_epoch.get(&r.epoch) {
                return Ok(lr);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "the coordinator did not decide the learning rate after epoch {} within {:?}",
                    r.epoch,
                    self.decision_timeout
                );
            }
            let wait = left.min(look);
            let before = Instant::now();
            c = self.commands.changed.wait_timeout(c, wait).unwrap().0;
            let late = before.elapsed().saturating_sub(wait);
            if late > look {
                deadline += late;
            }
        }
    }

    fn checkpoint(&mut self, c: &ShardsWritten) -> anyhow::Result<()> {
        self.send(worker_event::Event::Checkpoint(CheckpointShards {
            step: c.step,
            shards: c.shards.iter().cloned().collect(),
        }));
        self.check()
    }
}

/// A client of the coordinator in `opts.coordinator`: TLS and token as `opts` says.
pub async fn client(
    opts: &WorkerOptions,
) -> anyhow::Result<
    CoordinatorClient<tonic::service::interceptor::InterceptedService<Channel, TokenInterceptor>>,
> {
    let channel = connect(opts).await?;
    Ok(CoordinatorClient::with_interceptor(
        channel,
        TokenInterceptor(opts.token.clone()),
    ))
}

/// An error and its causes, on one line (transport errors hide the useful part in a source).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// A channel to the coordinator, with TLS when `opts` gives an authority; retries until
/// `opts.connect_timeout`.
pub async fn connect(opts: &WorkerOptions) -> anyhow::Result<Channel> {
    let url = &opts.coordinator;
    anyhow::ensure!(
        url.starts_with("http://") || url.starts_with("https://"),
        "coordinator URL `{url}` has no scheme: write http://{url} (https:// with TLS)"
    );
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| {
            format!("coordinator URL `{url}` (expected http://host:port or https://host:port)")
        })?
        .connect_timeout(Duration::from_secs(5));
    if let Some(ca) = &opts.tls_ca {
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(ca));
        if let Some(d) = &opts.tls_domain {
            tls = tls.domain_name(d.clone());
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("TLS settings: {}", chain(&e)))?;
    }
    let timeout = opts.connect_timeout;
    let started = Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        match endpoint.connect().await {
            Ok(c) => return Ok(c),
            Err(e) if started.elapsed() < timeout => {
                tracing::debug!("coordinator at {url} not reachable yet ({}); retrying", chain(&e));
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => bail!(
                "no coordinator answered at {url} within {timeout:?} ({tries} tries, last: {}): \
                 is it running (`alexnet coordinator`), is the address right, and do TLS settings match?",
                chain(&e)
            ),
        }
    }
}

/// The local address this host uses to reach `url`: the data plane listens there.
fn local_ip_towards(url: &str) -> anyhow::Result<std::net::IpAddr> {
    let uri: tonic::codegen::http::Uri = url
        .parse()
        .with_context(|| format!("coordinator URL `{url}` (expected http://host:port)"))?;
    let host = uri.host().context("the coordinator URL has no host")?;
    let port = uri.port_u16().unwrap_or(80);
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&(host.trim_matches(['[', ']']), port))
        .with_context(|| format!("resolving the coordinator's host `{host}`"))?
        .next()
        .with_context(|| format!("the coordinator's host `{host}` has no address"))?;
    // A UDP "connection" picks the outgoing interface without sending anything.
    let probe = std::net::UdpSocket::bind(if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    })?;
    probe.connect(addr)?;
    Ok(probe.local_addr()?.ip())
}

/// What a worker offers the coordinator.
struct Offer {
    capabilities: Vec<String>,
    /// On a GPU with NCCL, fresh NCCL unique ids for its pair and for its replicas (the
    /// coordinator relays column 0's and replica 0's; this process must stay up until the
    /// others join, which it does: it is one of them).
    nccl_id: Vec<u8>,
    nccl_replica_id: Vec<u8>,
}

fn offer(device: &Device) -> Offer {
    #[allow(unused_mut)]
    let mut offer = Offer {
        capabilities: capabilities(),
        nccl_id: Vec::new(),
        nccl_replica_id: Vec::new(),
    };
    #[cfg(feature = "cuda")]
    if device.cuda_ordinal().is_some() {
        offer.capabilities.push("cuda".into());
        let ids = crate::comm::nccl::unique_id()
            .and_then(|pair| Ok((pair, crate::comm::nccl::unique_id()?)));
        match ids {
            Ok((pair, replicas)) => {
                offer.capabilities.push("nccl".into());
                offer.nccl_id = pair.to_vec();
                offer.nccl_replica_id = replicas.to_vec();
            }
            Err(e) => tracing::info!(
                "no NCCL here ({e:#}): the columns and the replicas exchange over TCP"
            ),
        }
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    offer
}

/// Runs one worker until the job ends. An error is this worker's failure (already reported to
/// the coordinator when it could be).
pub fn run(opts: WorkerOptions) -> anyhow::Result<()> {
    // The device first: a GPU that cannot start (or kernels that do not compile) is this
    // worker's error before it takes a place in the job.
    let device = Device::open(&opts.device, opts.threads, &opts.settings)?;
    let Offer {
        capabilities,
        nccl_id,
        nccl_replica_id,
    } = offer(&device);
    // `cuda` and `cuda:0` are one GPU: the coordinator sees the normalised name and the UUID.
    let (device_name, gpu_uuid) = device.describe();
    let gpu = device.cuda_ordinal();
    // The interface that routes to the coordinator. A host cut off from the network has no
    // route at all (not a slow one): wait for it like for the coordinator itself.
    let started = Instant::now();
    let ip = loop {
        match local_ip_towards(&opts.coordinator) {
            Ok(ip) => break ip,
            Err(e) if started.elapsed() < opts.connect_timeout => {
                tracing::debug!("no route to the coordinator yet ({e:#}); retrying");
                std::thread::sleep(Duration::from_millis(250));
            }
            Err(e) => {
                return Err(e.context(format!(
                    "no route to the coordinator at {} within {:?}: is this host's network up?",
                    opts.coordinator, opts.connect_timeout
                )))
            }
        }
    };
    let listener = TcpListener::bind((ip, 0))
        .with_context(|| format!("binding the data-plane listener on {ip}"))?;
    let data_addr = listener.local_addr()?.to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let host = crate::files::hostname();
    let mut request = RegisterRequest {
        job_id: opts.job_id.clone().unwrap_or_default(),
        config_hash: opts.config_hash.clone().unwrap_or_default(),
        generation: opts.generation,
        host: host.clone(),
        device: device_name,
        capabilities,
        data_addr,
        rank: opts.rank,
        version: crate::proto::VERSION.into(),
        pid: std::process::id(),
        unix_time_ms: crate::admission::unix_time_ms(),
        nccl_id,
        nccl_replica_id,
        gpu_uuid,
    };
    let placed = rt.block_on(async {
        let mut client = client(&opts).await?;
        tracing::info!(coordinator = %opts.coordinator, "connected; waiting for the other workers");
        let mut told = false;
        let a = loop {
            let answer = client.register(request.clone()).await;
            match answer {
                // An elastic job running without this worker's replica: it is held, then told
                // to ask again, until a generation takes it.
                Err(s) if crate::admission::waits_for_next_generation(&s) => {
                    if !told {
                        tracing::info!("waiting for the next generation: {}", s.message());
                        told = true;
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    request.unix_time_ms = crate::admission::unix_time_ms();
                }
                // The job finished while this worker waited for a place: nothing is left.
                Err(s) if told && s.metadata().contains_key(crate::admission::JOB_FINISHED) => {
                    tracing::info!("the job finished while this worker waited: {}", s.message());
                    return anyhow::Ok(None);
                }
                answer => break answer,
            }
        };
        let a = a
            .map_err(|s| {
                use tonic::Code;
                match s.code() {
                    // Nothing a restart would change.
                    Code::FailedPrecondition
                    | Code::AlreadyExists
                    | Code::InvalidArgument
                    | Code::Unauthenticated
                    | Code::ResourceExhausted => Verdict::Refused(s.message().to_string()).into(),
                    _ => anyhow::anyhow!("the coordinator refused this worker: {}", s.message()),
                }
            })?
            .into_inner();
        anyhow::Ok(Some((client, a)))
    })?;
    let Some((mut client, assignment)) = placed else {
        return Ok(());
    };
    let span = tracing::info_span!(
        "worker",
        rank = assignment.rank,
        replica = assignment.replica,
        columns = ?assignment.columns
    );
    let _guard = span.enter();
    let job: JobConfig = serde_json::from_str(&assignment.job_json)
        .context("the coordinator sent a job this worker cannot read (mixed versions?)")?;
    let (rank, generation) = (assignment.rank, assignment.generation);
    tracing::info!(
        job = %assignment.job_id,
        generation,
        world = assignment.world_size,
        config = %assignment.config_hash,
        "assigned"
    );

    // The session: events out, commands in, heartbeats beside.
    let (events, events_rx) = mpsc::unbounded_channel::<WorkerEvent>();
    let commands = Arc::new(CommandBox::default());
    let (started_tx, started_rx) = std_mpsc::channel::<()>();
    let heartbeat = Duration::from_millis(assignment.heartbeat_ms.max(10) as u64);
    let peer_timeout = Duration::from_millis(assignment.peer_timeout_ms.max(100) as u64);
    let _ = events.send(WorkerEvent {
        rank,
        generation,
        event: Some(worker_event::Event::Heartbeat(Heartbeat {
            rss_bytes: rss_bytes(),
        })),
    });
    let session = {
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(events_rx);
        rt.block_on(async { client.session(stream).await })
            .map_err(|s| {
                anyhow::anyhow!(
                    "the coordinator refused this worker's session: {}",
                    s.message()
                )
            })?
            .into_inner()
    };
    let commands_done = {
        let commands = commands.clone();
        rt.spawn(async move {
            let mut session = session;
            let mut started = Some(started_tx);
            loop {
                match session.message().await {
                    Ok(Some(c)) => match c.command {
                        Some(command::Command::Start(_)) => {
                            if let Some(tx) = started.take() {
                                let _ = tx.send(());
                            }
                        }
                        Some(command::Command::Stop(s)) => {
                            tracing::info!("the coordinator stopped the job: {}", s.reason);
                            commands.update(|c| c.stopped = true);
                            return;
                        }
                        Some(command::Command::Abort(a)) => {
                            commands.update(|c| c.abort = Some((a.reason, a.rejoin, a.regroup)));
                        }
                        Some(command::Command::SetLr(l)) => {
                            commands.update(|c| {
                                c.lr_after_epoch.insert(l.epoch, l.lr);
                            });
                        }
                        None => {}
                    },
                    Ok(None) | Err(_) => {
                        commands.update(|c| {
                            if !c.stopped && c.abort.is_none() {
                                c.abort = Some(("the coordinator went away".into(), true, false));
                            }
                        });
                        return;
                    }
                }
            }
        })
    };
    {
        let events = events.clone();
        rt.spawn(async move {
            loop {
                tokio::time::sleep(heartbeat).await;
                let ev = WorkerEvent {
                    rank,
                    generation,
                    event: Some(worker_event::Event::Heartbeat(Heartbeat {
                        rss_bytes: rss_bytes(),
                    })),
                };
                if events.send(ev).is_err() {
                    return;
                }
            }
        });
    }

    // A failed GPU op panics in the CUDA backend (its ops have no error path): caught here, so
    // that the coordinator hears why this worker stops rather than finding it gone.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        crate::with_device!(device, backend => train(
            backend,
            gpu,
            &opts,
            &assignment,
            &job,
            &listener,
            peer_timeout,
            started_rx,
            RemoteReporter {
                rank,
                generation,
                events: events.clone(),
                commands: commands.clone(),
                decision_timeout: peer_timeout * 10,
            },
        ))
    }))
    .unwrap_or_else(|panic| Err(panic_error(panic)));
    let send = |event| {
        let _ = events.send(WorkerEvent {
            rank,
            generation,
            event: Some(event),
        });
    };
    match result {
        Ok(finished) => {
            send(worker_event::Event::Finished(finished));
            // Wait for the coordinator's stop, so that the last reports are not cut off.
            let _ = rt.block_on(async { tokio::time::timeout(peer_timeout, commands_done).await });
            Ok(())
        }
        Err(e) => {
            let blames = e
                .chain()
                .find_map(|c| c.downcast_ref::<crate::comm::tcp::PeerError>())
                .map(|p| p.rank as u32);
            // A peer that left first may have left because the job regroups: the regroup's
            // abort is then on its way here too, and this is no failure.
            let elastic = job.topology.elastic.is_some();
            if let Some(reason) =
                regroup_under_way(&commands, elastic && blames.is_some(), peer_timeout)
            {
                return Err(Verdict::Regroup(reason).into());
            }
            let needs_operator = crate::files::is_disk_full(&e);
            send(worker_event::Event::Failed(Failed {
                error: format!("{e:#}"),
                blames,
                needs_operator,
            }));
            // Give the report a moment to leave before the process ends.
            std::thread::sleep(Duration::from_millis(300));
            if needs_operator {
                return Err(e.context(Verdict::NeedsOperator(
                    "a restart would meet the same error, so this worker is not to be restarted"
                        .into(),
                )));
            }
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn train<B: crate::backend::Backend + 'static>(
    backend: B,
    gpu: Option<usize>,
    opts: &WorkerOptions,
    a: &Assignment,
    job: &JobConfig,
    listener: &TcpListener,
    peer_timeout: Duration,
    started: std_mpsc::Receiver<()>,
    mut reporter: RemoteReporter,
) -> anyhow::Result<Finished> {
    started.recv_timeout(peer_timeout).map_err(|_| {
        anyhow::anyhow!("the coordinator did not start the job within {peer_timeout:?}")
    })?;
    reporter.check()?;
    let topology: Topology = job.topology;
    let addrs: BTreeMap<usize, String> = a
        .data_addrs
        .iter()
        .map(|(r, addr)| (*r as usize, addr.clone()))
        .collect();
    let key = MeshKey::new(
        a.mesh_key,
        a.generation,
        opts.token.as_ref().map(|t| t.expose()).unwrap_or(""),
    );
    let t = Instant::now();
    let column_link = nccl_column_link::<B>(gpu, a, &topology, peer_timeout)?;
    let replica_group = nccl_replica_group::<B>(gpu, a, &topology, peer_timeout)?;
    let over = |nccl: bool| if nccl { "NCCL" } else { "TCP" };
    let (columns_over, replicas_over) =
        (over(column_link.is_some()), over(replica_group.is_some()));
    let ex = crate::comm::connect::<B>(
        &topology,
        a.rank as usize,
        listener,
        &addrs,
        key,
        peer_timeout,
        crate::comm::Joined {
            column_link,
            replica_group,
        },
    )?;
    tracing::info!(
        ms = t.elapsed().as_millis() as u64,
        columns_over,
        replicas_over,
        "data plane connected"
    );
    let role = Role {
        replica: a.replica as usize,
        columns: ex.columns,
        replicas: ex.replicas,
        run_dir: (!a.run_dir.is_empty()).then(|| PathBuf::from(&a.run_dir)),
        resume: (a.resume_step > 0).then(|| job::ResumeFrom {
            dir: PathBuf::from(&a.resume_dir),
            step: a.resume_step,
            lr: a.lr,
        }),
        memory_sharers: a.memory_sharers.max(1) as usize,
    };
    let t = Instant::now();
    let (net, steps) = job::run(job, backend, role, &mut reporter)?;
    let train_seconds = t.elapsed().as_secs_f64();
    if let (Some(out), 0) = (&opts.out, a.replica) {
        let written = job::save_columns(&net, out).map_err(|e| {
            if crate::files::is_disk_full(&e) && !a.run_dir.is_empty() {
                // The final checkpoint is complete: the parameters are not lost.
                e.context(format!(
                    "the trained parameters could not be written to {}: free space there; the \
                     run's final checkpoint holds them, and `alexnet export --run {} --out \
                     FILE` writes them out",
                    out.display(),
                    a.run_dir
                ))
            } else {
                e
            }
        })?;
        for path in written {
            tracing::info!(path = %path.display(), "parameters written");
        }
    }
    let exchange_seconds = net.profile.seconds("exchange");
    let replica_seconds = net.profile.seconds("replicas");
    tracing::info!(
        steps,
        train_seconds = crate::log_fields::rounded(train_seconds, 2),
        exchange_seconds = crate::log_fields::rounded(exchange_seconds, 2),
        replica_seconds = crate::log_fields::rounded(replica_seconds, 2),
        column_mib = net.column_traffic().sent_bytes / (1 << 20),
        replica_mib = net.replica_traffic().sent_bytes / (1 << 20),
        "finished"
    );
    Ok(Finished {
        steps,
        exchange_seconds,
        replica_seconds,
        train_seconds,
    })
}

/// The link to the partner column over NCCL, when the coordinator relayed a NCCL id for this
/// rank's pair (both on GPUs with NCCL, not on one GPU).
#[cfg(feature = "cuda")]
fn nccl_column_link<B: crate::backend::Backend + 'static>(
    gpu: Option<usize>,
    a: &Assignment,
    topology: &Topology,
    timeout: Duration,
) -> anyhow::Result<Option<Box<dyn crate::comm::BufLink<B>>>> {
    let (Some(ordinal), Ok(id), Some(partner)) = (
        gpu,
        <[u8; 128]>::try_from(a.nccl_id.as_slice()),
        topology.column_partner(a.rank as usize),
    ) else {
        return Ok(None);
    };
    let me = topology.placement(a.rank as usize).columns[0];
    let link = crate::comm::nccl::NcclLink::<B>::new(ordinal, me, partner, id, timeout)
        .context("joining the pair's NCCL communicator")?;
    Ok(Some(Box::new(link)))
}

/// The replicas' NCCL communicator, when the coordinator relayed a NCCL id for this rank's
/// column position (every replica on its own GPU with NCCL).
#[cfg(feature = "cuda")]
fn nccl_replica_group<B: crate::backend::Backend + 'static>(
    gpu: Option<usize>,
    a: &Assignment,
    topology: &Topology,
    timeout: Duration,
) -> anyhow::Result<Option<Box<dyn crate::comm::BufReduce<B>>>> {
    let (Some(ordinal), Ok(id)) = (gpu, <[u8; 128]>::try_from(a.nccl_replica_id.as_slice())) else {
        return Ok(None);
    };
    let rank = a.rank as usize;
    let mut ranks: Vec<(usize, usize)> = topology.replica_peers(rank);
    ranks.push((a.replica as usize, rank));
    ranks.sort_unstable();
    let ranks: Vec<usize> = ranks.into_iter().map(|(_, r)| r).collect();
    let group = crate::comm::nccl::NcclReplicaGroup::<B>::new(
        ordinal,
        a.replica as usize,
        &ranks,
        id,
        timeout,
    )
    .context("joining the replicas' NCCL communicator")?;
    Ok(Some(Box::new(group)))
}

#[cfg(not(feature = "cuda"))]
fn nccl_replica_group<B: crate::backend::Backend>(
    _gpu: Option<usize>,
    _a: &Assignment,
    _topology: &Topology,
    _timeout: Duration,
) -> anyhow::Result<Option<Box<dyn crate::comm::BufReduce<B>>>> {
    Ok(None)
}

#[cfg(not(feature = "cuda"))]
fn nccl_column_link<B: crate::backend::Backend>(
    _gpu: Option<usize>,
    _a: &Assignment,
    _topology: &Topology,
    _timeout: Duration,
) -> anyhow::Result<Option<Box<dyn crate::comm::BufLink<B>>>> {
    Ok(None)
}

/// A panic out of training as the error this worker reports: after a GPU fault the device is
/// unusable until the process ends, so the worker stops (its agent or the coordinator restarts
/// it from the newest checkpoint).
fn panic_error(panic: Box<dyn std::any::Any + Send>) -> anyhow::Error {
    let message = (panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    anyhow::anyhow!(
        "training stopped: {message}; this worker exits (after a GPU failure the device is \
         unusable until its process ends)"
    )
}

fn capabilities() -> Vec<String> {
    #[allow(unused_mut)]
    let mut c = vec!["cpu".to_string()];
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        c.push("avx512".into());
    }
    c
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_panic_in_training_becomes_the_reported_error() {
        let caught = std::panic::catch_unwind(|| -> anyhow::Result<()> {
            panic!("CUDA: cuBLAS sgemm failed: CUBLAS_STATUS_EXECUTION_FAILED")
        })
        .unwrap_or_else(|p| Err(super::panic_error(p)));
        let e = format!("{:#}", caught.unwrap_err());
        assert!(
            e.contains("cuBLAS sgemm failed") && e.contains("worker exits"),
            "{e}"
        );
        let caught =
            std::panic::catch_unwind(|| -> anyhow::Result<()> { std::panic::panic_any(7u32) })
                .unwrap_or_else(|p| Err(super::panic_error(p)));
        assert!(format!("{}", caught.unwrap_err()).contains("without a message"));
    }
}
