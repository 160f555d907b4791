//! The control plane in process: the real coordinator service on a loopback port of its own
//! choosing, called as workers and agents call it, without worker processes. What needs real
//! processes (kills, freezes, restarts, agents) is in `distributed.rs`.

use alexnet::auth::Secret;
use alexnet::comm::Topology;
use alexnet::coordinator::{Coordinator, CoordinatorConfig};
use alexnet::proto::{Assignment, RegisterRequest, StatusRequest};
use alexnet::train::job::JobConfig;
use alexnet::worker::WorkerOptions;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "a token for the tests";

/// Log lines of the coordinator, captured as text.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    /// Captures what this thread logs from now on while the guard lives (the tests run the
    /// service on a single-threaded runtime, so its log lines are this thread's).
    fn capture() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A coordinator of job `job_id` with the defaults of `alexnet coordinator`, changed by
/// `change`, serving on a loopback port; returns its URL.
async fn coordinator(job_id: &str, change: impl FnOnce(&mut CoordinatorConfig)) -> String {
    let mut cfg = CoordinatorConfig {
        job_id: job_id.into(),
        job: JobConfig::default(),
        generation: 0,
        peer_timeout: Duration::from_secs(60),
        heartbeat: Duration::from_secs(2),
        rendezvous_timeout: Duration::from_secs(600),
        log_every: 1,
        run_dir: None,
        resume: None,
        token: Some(Secret::new(TOKEN)),
        tls: None,
        max_clock_skew: Duration::from_secs(60),
        restarts_left: 0,
        rejoin_timeout: Duration::from_secs(600),
    };
    change(&mut cfg);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(Coordinator::new(cfg).unwrap().serve(listener));
    url
}

fn replicas(n: usize) -> impl FnOnce(&mut CoordinatorConfig) {
    move |c| {
        c.job.topology = Topology {
            replicas: n,
            columns_per_worker: 1,
            elastic: None,
        }
    }
}

async fn client(
    url: &str,
    token: Option<&str>,
) -> alexnet::proto::coordinator_client::CoordinatorClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        alexnet::auth::TokenInterceptor,
    >,
> {
    let opts = WorkerOptions::client_of(url, token.map(Secret::new));
    alexnet::worker::client(&opts).await.unwrap()
}

/// A registration as a CPU worker on host `elsewhere` sends it, changed by `change`.
fn worker(change: impl FnOnce(&mut RegisterRequest)) -> RegisterRequest {
    let mut r = RegisterRequest {
        host: "elsewhere".into(),
        device: "cpu".into(),
        data_addr: "127.0.0.1:9".into(),
        version: alexnet::proto::VERSION.into(),
        pid: 1,
        unix_time_ms: alexnet::admission::unix_time_ms(),
        ..Default::default()
    };
    change(&mut r);
    r
}

/// Registers `req` with the job's token; the refusal it must meet.
async fn refused(url: &str, req: RegisterRequest) -> tonic::Status {
    client(url, Some(TOKEN))
        .await
        .register(req)
        .await
        .expect_err("a registration that must be refused was admitted")
}

#[tokio::test]
async fn workers_of_another_job_configuration_or_version_are_refused() {
    let (logs, _guard) = Logs::capture();
    let url = coordinator("alpha", |_| {}).await;
    // Without the job's token, or with another: refused, and the coordinator logs who knocked.
    for token in [None, Some("a guess")] {
        let s = client(&url, token)
            .await
            .register(worker(|r| r.job_id = "alpha".into()))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert!(s.message().contains("needs its token"), "{}", s.message());
    }
    let text = logs.text();
    assert!(
        text.lines()
            .any(|l| l.contains("refused a call without this job's token")
                && l.contains("peer=127.0.0.1:")),
        "{text}"
    );
    let s = refused(&url, worker(|r| r.job_id = "beta".into())).await;
    assert!(
        s.message().contains("runs job `alpha`") && s.message().contains("started for job `beta`"),
        "{}",
        s.message()
    );
    let s = refused(
        &url,
        worker(|r| {
            r.job_id = "alpha".into();
            r.config_hash = "0123456789abcdef".into();
        }),
    )
    .await;
    assert!(
        s.message().contains("configuration") && s.message().contains("0123456789abcdef"),
        "{}",
        s.message()
    );
    let s = refused(&url, worker(|r| r.generation = Some(3))).await;
    assert!(
        s.message().contains("generation 0") && s.message().contains("generation 3"),
        "{}",
        s.message()
    );
    let s = refused(&url, worker(|r| r.rank = Some(7))).await;
    assert!(
        s.message().contains("rank 7 does not exist"),
        "{}",
        s.message()
    );
    // Two workers claiming one rank: the second is refused, naming the first.
    let first = {
        let url = url.clone();
        tokio::spawn(async move {
            client(&url, Some(TOKEN))
                .await
                .register(worker(|r| r.rank = Some(0)))
                .await
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut status = client(&url, Some(TOKEN)).await;
    loop {
        let s = status.status(StatusRequest {}).await.unwrap().into_inner();
        if s.workers.iter().any(|w| w.rank == 0) {
            break;
        }
        assert!(Instant::now() < deadline, "rank 0 never joined: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let s = refused(&url, worker(|r| r.rank = Some(0))).await;
    assert_eq!(s.code(), tonic::Code::AlreadyExists);
    assert!(
        s.message().contains("rank 0 is already taken by"),
        "{}",
        s.message()
    );
    first.abort();
    // The standard health service answers for the coordinator (for probes).
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let serving = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest {
            service: "alexnet.v1.Coordinator".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        serving,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // The coordinator keeps waiting for proper workers, and says what it is doing.
    let s = status.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (s.job_id.as_str(), s.state.as_str()),
        ("alpha", "waiting for workers")
    );
    let text = logs.text();
    assert!(text.contains("refused a worker"), "{text}");
}

#[tokio::test]
async fn a_host_whose_clock_or_binary_differs_is_refused() {
    let url = coordinator("epsilon", |c| c.max_clock_skew = Duration::from_secs(30)).await;
    let s = refused(
        &url,
        worker(|r| r.unix_time_ms = alexnet::admission::unix_time_ms() - 90_000),
    )
    .await;
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert!(
        s.message().contains("clock of host `elsewhere` is 90.")
            && s.message().contains("synchronise"),
        "{}",
        s.message()
    );
    let s = refused(&url, worker(|r| r.version = "0.0.1-elsewhere".into())).await;
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert!(
        s.message().contains("alexnet 0.0.1-elsewhere") && s.message().contains("same binary"),
        "{}",
        s.message()
    );
}

/// Registers `reqs` at once (registration answers when every rank has joined).
async fn register_all(url: &str, reqs: Vec<RegisterRequest>) -> Vec<Assignment> {
    // Each registration waits for the others: they run side by side.
    let calls: Vec<_> = reqs
        .into_iter()
        .map(|r| {
            let url = url.to_string();
            tokio::spawn(async move { client(&url, Some(TOKEN)).await.register(r).await })
        })
        .collect();
    let mut out = Vec::new();
    for c in calls {
        let a = tokio::time::timeout(Duration::from_secs(60), c)
            .await
            .expect("the rendezvous did not complete within 60 s")
            .unwrap();
        out.push(a.unwrap_or_else(|s| panic!("{}", s.message())).into_inner());
    }
    out
}

fn gpu_worker(rank: u32, host: &str, device: &str, nccl: Option<u8>) -> RegisterRequest {
    worker(|r| {
        r.host = host.into();
        r.device = device.split('@').next().unwrap().into();
        r.capabilities = ["cpu", "cuda"]
            .into_iter()
            .chain(nccl.map(|_| "nccl"))
            .map(String::from)
            .collect();
        r.rank = Some(rank);
        r.pid = 1 + rank;
        r.nccl_id = nccl.map(|b| vec![b; 128]).unwrap_or_default();
        r.nccl_replica_id = nccl.map(|b| vec![100 + b; 128]).unwrap_or_default();
        // `cuda:N@UUID` in these cases names the GPU's UUID too.
        r.gpu_uuid = device
            .split_once('@')
            .map(|d| d.1.to_string())
            .unwrap_or_default();
    })
}

/// The assignments a coordinator of `job` with `replicas` replicas gives GPU workers (host,
/// device, NCCL id byte) registering as ranks 0, 1, ...
async fn gpu_assignments(
    job: &str,
    replicas_: usize,
    workers: &[(&str, &str, Option<u8>)],
) -> Vec<Assignment> {
    let url = coordinator(job, replicas(replicas_)).await;
    let reqs = workers
        .iter()
        .enumerate()
        .map(|(r, (host, dev, nccl))| gpu_worker(r as u32, host, dev, *nccl))
        .collect();
    register_all(&url, reqs).await
}

#[tokio::test]
async fn column_0s_nccl_id_is_relayed_to_gpu_pairs_on_two_gpus_only() {
    let cases = [
        // Two GPUs with NCCL: both ranks get column 0's id.
        (
            "eta",
            [("a", "cuda:0", Some(1)), ("b", "cuda:0", Some(2))],
            Some(1u8),
        ),
        // One GPU for both: NCCL cannot, TCP it is.
        (
            "theta",
            [("a", "cuda:0", Some(1)), ("a", "cuda:0", Some(2))],
            None,
        ),
        // A partner without NCCL.
        (
            "iota",
            [("a", "cuda:0", Some(1)), ("b", "cuda:1", None)],
            None,
        ),
        // Two device numbers, one GPU (CUDA_VISIBLE_DEVICES renumbers): the UUID tells.
        (
            "kappa",
            [("a", "cuda:0@0f", Some(1)), ("a", "cuda:1@0f", Some(2))],
            None,
        ),
        (
            "lambda",
            [("a", "cuda:0@0f", Some(1)), ("a", "cuda:0@1e", Some(2))],
            Some(1),
        ),
    ];
    for (job, workers, want) in cases {
        for a in gpu_assignments(job, 1, &workers).await {
            let expect = want.map(|b| vec![b; 128]).unwrap_or_default();
            assert_eq!(a.nccl_id, expect, "{job}: rank {}", a.rank);
        }
    }
}

#[tokio::test]
async fn replica_0s_nccl_id_is_relayed_to_replicas_each_on_its_own_gpu_only() {
    // Two replicas of a pair: ranks 0 and 2 hold column 0, ranks 1 and 3 column 1. Each
    // position's replicas get replica 0's replica id (100 + its byte here), or nothing.
    let cases = [
        (
            "mu",
            [
                ("a", "cuda:0", Some(1)),
                ("a", "cuda:1", Some(2)),
                ("b", "cuda:0", Some(3)),
                ("b", "cuda:1", Some(4)),
            ],
            [Some(101u8), Some(102)],
        ),
        // Column 0's replicas share a GPU: they average over TCP; column 1's need not.
        (
            "nu",
            [
                ("a", "cuda:0@0f", Some(1)),
                ("a", "cuda:1@1e", Some(2)),
                ("a", "cuda:2@0f", Some(3)),
                ("a", "cuda:3@2d", Some(4)),
            ],
            [None, Some(102)],
        ),
        // A replica without NCCL.
        (
            "xi",
            [
                ("a", "cuda:0", Some(1)),
                ("a", "cuda:1", Some(2)),
                ("b", "cuda:0", Some(3)),
                ("b", "cuda:1", None),
            ],
            [Some(101), None],
        ),
    ];
    for (job, workers, want) in cases {
        for a in gpu_assignments(job, 2, &workers).await {
            let expect = want[a.rank as usize % 2]
                .map(|b| vec![b; 128])
                .unwrap_or_default();
            assert_eq!(a.nccl_replica_id, expect, "{job}: rank {}", a.rank);
        }
    }
}

#[tokio::test]
async fn workers_on_the_same_memory_are_counted_in_their_assignments() {
    let cases = [
        // Two CPU workers on one host share its memory; on two hosts, each has its own.
        ("mu", [("a", "cpu"), ("a", "cpu")], 2),
        ("nu", [("a", "cpu"), ("b", "cpu")], 1),
        // Two workers on one GPU share its memory; on two GPUs (the UUIDs differ), they do not.
        ("xi", [("a", "cuda:0"), ("a", "cuda:0")], 2),
        ("omicron", [("a", "cuda:0@0f"), ("a", "cuda:1@1e")], 1),
        // A GPU worker and a CPU worker on one host: the GPU's memory is not the host's.
        ("pi", [("a", "cuda:0"), ("a", "cpu")], 1),
    ];
    for (job, workers, want) in cases {
        let workers = workers.map(|(host, dev)| (host, dev, None));
        for a in gpu_assignments(job, 1, &workers).await {
            assert_eq!(a.memory_sharers, want, "{job}: rank {}", a.rank);
        }
    }
}

#[tokio::test]
async fn a_session_of_another_generation_or_an_unregistered_rank_is_refused() {
    let url = coordinator("rho", |c| c.generation = 2).await;
    let mut c = client(&url, Some(TOKEN)).await;
    let open = |rank: u32, generation: u64| {
        tokio_stream::iter([alexnet::proto::WorkerEvent {
            rank,
            generation,
            event: None,
        }])
    };
    let s = c.session(open(0, 1)).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::FailedPrecondition);
    assert!(
        s.message()
            .contains("generation 1 is over: this job is in generation 2"),
        "{}",
        s.message()
    );
    let s = c.session(open(0, 2)).await.unwrap_err();
    assert!(
        s.message()
            .contains("rank 0 has not registered with job `rho`"),
        "{}",
        s.message()
    );
}

/// A worker that registered and then died before every rank joined (its registration call is
/// cut off) gives its rank back: the worker its agent starts next takes it, instead of being
/// refused as a second holder while the job waits for the dead one.
#[tokio::test]
async fn a_worker_that_dies_before_the_rendezvous_gives_its_rank_back() {
    let url = coordinator("withdraw", |_| {}).await;
    let first = {
        let url = url.clone();
        tokio::spawn(async move {
            client(&url, Some(TOKEN))
                .await
                .register(worker(|r| {
                    r.rank = Some(1);
                    r.pid = 41;
                }))
                .await
        })
    };
    // Once the coordinator holds rank 1 for the first worker, a second is refused.
    let workers = |url: String| async move {
        client(&url, Some(TOKEN))
            .await
            .status(StatusRequest {})
            .await
            .unwrap()
            .into_inner()
            .workers
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while workers(url.clone()).await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "rank 1 never joined");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = refused(
        &url,
        worker(|r| {
            r.rank = Some(1);
            r.pid = 42;
        }),
    )
    .await;
    assert!(
        s.message()
            .contains("rank 1 is already taken by elsewhere (pid 41)"),
        "{}",
        s.message()
    );
    // The first worker dies: its call is dropped with its connection, and the coordinator
    // lists rank 1 no more.
    first.abort();
    let _ = first.await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let w = workers(url.clone()).await;
        if w.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rank 1 was not given back: {w:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let assignments = register_all(
        &url,
        vec![
            worker(|r| {
                r.rank = Some(1);
                r.pid = 43;
            }),
            worker(|r| r.rank = Some(0)),
        ],
    )
    .await;
    assert_eq!(
        assignments.iter().map(|a| a.rank).collect::<Vec<_>>(),
        [1, 0]
    );
}
