//! `/metrics` in the OpenMetrics text format (which Prometheus scrapes), encoded by
//! `prometheus-client` and served by `axum` when a process is started with
//! `--metrics-listen ADDR`.
//!
//! Each scrape encodes a fresh snapshot (the coordinator's job, an agent's workers), so that a
//! series exists exactly while its figure does. Labels say which job (`job_id`: Prometheus
//! keeps `job` for its scrape job), rank, replica, column and host; the job's token never
//! appears.

use anyhow::Context;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

type Labels = Vec<(String, String)>;
type GaugeFamily = Family<Labels, Gauge<f64, AtomicU64>>;
type CounterFamily = Family<Labels, Counter<f64, AtomicU64>>;

/// The content types `/metrics` serves: OpenMetrics to a scraper that asks for it (Prometheus
/// does), Prometheus's classic text format to anything else (curl, `promtool check metrics`).
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
pub const CLASSIC_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text as Prometheus's classic text format: a counter's family is named with its
/// `_total` suffix there, and there are no `# UNIT` or `# EOF` lines.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: std::collections::BTreeSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// One rank as the coordinator sees it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RankSnapshot {
    pub rank: u32,
    pub replica: u32,
    pub column: u32,
    pub host: String,
    /// Joined or running (not lost, failed or finished).
    pub up: bool,
    pub heartbeat_age_s: f64,
    pub step: u64,
    pub images_per_s: f64,
    pub column_share: f64,
    pub replica_share: f64,
    pub column_bytes: u64,
    pub replica_bytes: u64,
    pub rss_bytes: u64,
}

/// The job as the coordinator sees it at a scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobSnapshot {
    pub job_id: String,
    pub version: String,
    pub config_hash: String,
    /// One of [`JOB_STATES`].
    pub state: &'static str,
    pub step: u64,
    pub total_steps: u64,
    pub epoch: u64,
    /// The newest log interval's figures (absent before the first).
    pub train: Option<(f64, f64, Option<f64>)>,
    /// The newest validation: loss, top-1 and top-5 error.
    pub validation: Option<(f64, f64, Option<f64>)>,
    pub images_per_s: f64,
    pub lr: f64,
    pub eta_s: f64,
    pub generation: u64,
    pub restarts: u64,
    pub restarts_left: u32,
    pub workers_expected: u32,
    /// Replicas in the current generation, and the most the job may have (an elastic job's
    /// MAX; the same when fixed).
    pub replicas: u32,
    pub replicas_max: u32,
    pub workers_joined: u32,
    pub workers_lost: u32,
    pub last_checkpoint_step: u64,
    pub checkpoint_age_s: Option<f64>,
    pub ranks: Vec<RankSnapshot>,
}

/// The states `alexnet_job_state` tells apart.
pub const JOB_STATES: [&str; 5] = ["waiting", "running", "regrouping", "finished", "failed"];

/// One worker process of an agent.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentWorker {
    /// The rank it asked for (`None`: the next free one; shown by its local index).
    pub rank: Option<u32>,
    pub local: usize,
    pub running: bool,
    pub restarts: u64,
}

/// An agent's workers at a scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AgentSnapshot {
    pub job_id: String,
    pub host: String,
    pub workers: Vec<AgentWorker>,
    /// `None`: no limit here.
    pub restarts_left: Option<u64>,
}

/// An agent's snapshot, updated by its watch loop and read by scrapes.
#[derive(Debug, Default)]
pub struct AgentBoard(pub Mutex<AgentSnapshot>);

impl AgentBoard {
    pub fn update(&self, f: impl FnOnce(&mut AgentSnapshot)) {
        f(&mut self.0.lock().unwrap());
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Registers one metric family and returns it.
fn register<F>(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> F
where
    F: prometheus_client::registry::Metric + Clone + Default,
{
    let f = F::default();
    match unit {
        Some(u) => reg.register_with_unit(name, help, u, f.clone()),
        None => reg.register(name, help, f.clone()),
    }
    f
}

fn gauge(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> GaugeFamily {
    register(reg, name, help, unit)
}

fn counter(reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> CounterFamily {
    register(reg, name, help, unit)
}

fn finish(reg: &Registry) -> String {
    let mut out = String::new();
    encode_registry(&mut out, reg).expect("writing to a String");
    out
}

/// The job's metrics (without the closing `# EOF`).
pub fn encode_job(s: &JobSnapshot) -> String {
    let mut reg = Registry::with_prefix("alexnet");
    let job = labels(&[("job_id", &s.job_id)]);
    gauge(
        &mut reg,
        "info",
        "The job's binary version and configuration hash (always 1)",
        None,
    )
    .get_or_create(&labels(&[
        ("job_id", &s.job_id),
        ("version", &s.version),
        ("config_hash", &s.config_hash),
    ]))
    .set(1.0);
    let state = gauge(
        &mut reg,
        "job_state",
        "1 for the job's current state, 0 for the others",
        None,
    );
    for st in JOB_STATES {
        state
            .get_or_create(&labels(&[("job_id", &s.job_id), ("state", st)]))
            .set(if st == s.state { 1.0 } else { 0.0 });
    }
    let mut set = |name: &str, help: &str, unit: Option<Unit>, v: f64| {
        gauge(&mut reg, name, help, unit).get_or_create(&job).set(v);
    };
    set("step", "Training steps done", None, s.step as f64);
    set(
        "total_steps",
        "Training steps in the run",
        None,
        s.total_steps as f64,
    );
    set(
        "epoch",
        "The epoch being trained (1-based)",
        None,
        s.epoch as f64,
    );
    set(
        "images_per_second",
        "Training images per second since the generation started",
        None,
        s.images_per_s,
    );
    set(
        "learning_rate",
        "The newest step's learning rate",
        None,
        s.lr,
    );
    set(
        "eta",
        "Estimated time to the run's end",
        Some(Unit::Seconds),
        s.eta_s,
    );
    set(
        "generation",
        "The generation being served (a new one starts after each failure)",
        None,
        s.generation as f64,
    );
    set(
        "restarts_left",
        "Generations that may still start after a failure",
        None,
        s.restarts_left as f64,
    );
    set(
        "workers_expected",
        "Workers the job runs",
        None,
        s.workers_expected as f64,
    );
    set(
        "replicas",
        "Replicas in the current generation (an elastic job's changes with its hosts)",
        None,
        s.replicas as f64,
    );
    set(
        "replicas_max",
        "The most replicas the job runs with (an elastic job's MAX)",
        None,
        s.replicas_max as f64,
    );
    set(
        "workers_joined",
        "Workers of the current generation that joined",
        None,
        s.workers_joined as f64,
    );
    set(
        "workers_lost",
        "Workers of the current generation lost (silent past the peer timeout)",
        None,
        s.workers_lost as f64,
    );
    set(
        "last_checkpoint_step",
        "The newest complete checkpoint's step (0: none)",
        None,
        s.last_checkpoint_step as f64,
    );
    if let Some(age) = s.checkpoint_age_s {
        set(
            "checkpoint_age",
            "Time since the newest complete checkpoint",
            Some(Unit::Seconds),
            age,
        );
    }
    for (what, of, figures) in [
        ("train", "The newest log interval's", s.train),
        ("validation", "The newest validation's", s.validation),
    ] {
        let Some((loss, top1, top5)) = figures else {
            continue;
        };
        let ratio = || Some(Unit::Other("ratio".into()));
        set(
            &format!("{what}_loss"),
            &format!("{of} mean loss"),
            None,
            loss,
        );
        set(
            &format!("{what}_top1_error"),
            &format!("{of} top-1 error"),
            ratio(),
            top1,
        );
        if let Some(top5) = top5 {
            set(
                &format!("{what}_top5_error"),
                &format!("{of} top-5 error"),
                ratio(),
                top5,
            );
        }
    }
    counter(
        &mut reg,
        "restarts",
        "Generations started after a failure",
        None,
    )
    .get_or_create(&job)
    .inc_by(s.restarts as f64);

    let rank_gauge = |reg: &mut Registry, name: &str, help: &str, unit: Option<Unit>| {
        gauge(reg, &format!("worker_{name}"), help, unit)
    };
    let up = rank_gauge(
        &mut reg,
        "up",
        "1 while the rank is joined or running, 0 once lost, failed or finished",
        None,
    );
    let heard = rank_gauge(
        &mut reg,
        "heartbeat_age",
        "Time since the rank was last heard from",
        Some(Unit::Seconds),
    );
    let step = rank_gauge(&mut reg, "step", "The rank's newest step", None);
    let ips = rank_gauge(
        &mut reg,
        "images_per_second",
        "Images per second through the rank over the newest log interval",
        None,
    );
    let col_share = rank_gauge(
        &mut reg,
        "column_exchange_share",
        "Share of the rank's step spent in the column exchange (newest log interval)",
        Some(Unit::Other("ratio".into())),
    );
    let rep_share = rank_gauge(
        &mut reg,
        "replica_exchange_share",
        "Share of the rank's step spent averaging gradients with its replicas",
        Some(Unit::Other("ratio".into())),
    );
    let rss = rank_gauge(
        &mut reg,
        "resident_memory",
        "The rank's resident memory",
        Some(Unit::Bytes),
    );
    let col_bytes = counter(
        &mut reg,
        "worker_column_exchange_sent",
        "Bytes the rank sent to the other column (this generation)",
        Some(Unit::Bytes),
    );
    let rep_bytes = counter(
        &mut reg,
        "worker_replica_exchange_sent",
        "Bytes the rank sent to its replicas (this generation)",
        Some(Unit::Bytes),
    );
    for r in &s.ranks {
        let (rank, replica, column) = (
            r.rank.to_string(),
            r.replica.to_string(),
            r.column.to_string(),
        );
        let l = labels(&[
            ("job_id", &s.job_id),
            ("rank", &rank),
            ("replica", &replica),
            ("column", &column),
            ("host", &r.host),
        ]);
        up.get_or_create(&l).set(if r.up { 1.0 } else { 0.0 });
        heard.get_or_create(&l).set(r.heartbeat_age_s);
        step.get_or_create(&l).set(r.step as f64);
        ips.get_or_create(&l).set(r.images_per_s);
        col_share.get_or_create(&l).set(r.column_share);
        rep_share.get_or_create(&l).set(r.replica_share);
        rss.get_or_create(&l).set(r.rss_bytes as f64);
        col_bytes.get_or_create(&l).inc_by(r.column_bytes as f64);
        rep_bytes.get_or_create(&l).inc_by(r.replica_bytes as f64);
    }
    finish(&reg)
}

/// An agent's metrics (without the closing `# EOF`).
pub fn encode_agent(s: &AgentSnapshot) -> String {
    let mut reg = Registry::with_prefix("alexnet_agent");
    let host = labels(&[("job_id", &s.job_id), ("host", &s.host)]);
    gauge(&mut reg, "workers", "Workers this host runs", None)
        .get_or_create(&host)
        .set(s.workers.len() as f64);
    if let Some(left) = s.restarts_left {
        gauge(
            &mut reg,
            "restarts_left",
            "Restarts of this host's workers still allowed (--max-restarts)",
            None,
        )
        .get_or_create(&host)
        .set(left as f64);
    }
    let running = gauge(
        &mut reg,
        "worker_running",
        "1 while the worker process runs",
        None,
    );
    let restarts = counter(
        &mut reg,
        "worker_restarts",
        "Times the worker process was restarted",
        None,
    );
    for w in &s.workers {
        let rank = w
            .rank
            .map(|r| r.to_string())
            .unwrap_or_else(|| format!("local{}", w.local));
        let l = labels(&[("job_id", &s.job_id), ("host", &s.host), ("rank", &rank)]);
        running
            .get_or_create(&l)
            .set(if w.running { 1.0 } else { 0.0 });
        restarts.get_or_create(&l).inc_by(w.restarts as f64);
    }
    finish(&reg)
}

/// What a scrape answers: the metrics of this process, closed by `# EOF`.
pub type Exposition = Arc<dyn Fn() -> String + Send + Sync>;

/// Binds `addr` now (a taken port is an error naming it) and serves `GET /metrics` with
/// `exposition` on the current tokio runtime until the process ends.
pub fn serve(addr: SocketAddr, exposition: Exposition) -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(addr).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            ": another process listens there; pick another port with --metrics-listen"
        } else {
            ""
        };
        anyhow::anyhow!("--metrics-listen {addr}: could not listen there ({e}){hint}")
    })?;
    listener.set_nonblocking(true)?;
    let bound = listener.local_addr()?;
    let listener = tokio::net::TcpListener::from_std(listener)
        .with_context(|| format!("serving metrics on {bound}"))?;
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move |headers: axum::http::HeaderMap| {
                let exposition = exposition.clone();
                async move {
                    let mut body = exposition();
                    encode_eof(&mut body).expect("writing to a String");
                    let openmetrics = headers
                        .get_all(axum::http::header::ACCEPT)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .any(|v| v.contains("application/openmetrics-text"));
                    if openmetrics {
                        ([(axum::http::header::CONTENT_TYPE, OPENMETRICS)], body)
                    } else {
                        (
                            [(axum::http::header::CONTENT_TYPE, CLASSIC_TEXT)],
                            classic_text(&body),
                        )
                    }
                }
            }),
        )
        .route(
            "/",
            axum::routing::get(|| async { "alexnet: the metrics are at /metrics\n" }),
        );
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the metrics server stopped: {e}");
        }
    });
    tracing::info!(addr = %bound, "serving Prometheus metrics at http://{bound}/metrics");
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_figure_has_its_series_and_the_names_follow_prometheus_conventions() {
        let s = JobSnapshot {
            job_id: "j1".into(),
            version: "0.1.0".into(),
            config_hash: "abc".into(),
            state: "running",
            step: 7,
            total_steps: 10,
            train: Some((2.0, 0.5, Some(0.25))),
            validation: Some((2.5, 0.75, None)),
            checkpoint_age_s: Some(3.0),
            restarts: 2,
            ranks: vec![RankSnapshot {
                rank: 1,
                column: 1,
                host: "h".into(),
                up: true,
                column_bytes: 4096,
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = encode_job(&s);
        for line in [
            "alexnet_step{job_id=\"j1\"} 7.0",
            "alexnet_job_state{job_id=\"j1\",state=\"running\"} 1.0",
            "alexnet_job_state{job_id=\"j1\",state=\"failed\"} 0.0",
            "alexnet_train_top5_error_ratio{job_id=\"j1\"} 0.25",
            "alexnet_checkpoint_age_seconds{job_id=\"j1\"} 3.0",
            "alexnet_restarts_total{job_id=\"j1\"} 2.0",
            "alexnet_worker_up{job_id=\"j1\",rank=\"1\",replica=\"0\",column=\"1\",host=\"h\"} 1.0",
            "alexnet_worker_column_exchange_sent_bytes_total{job_id=\"j1\",rank=\"1\",replica=\"0\",column=\"1\",host=\"h\"} 4096.0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        assert!(!text.contains("alexnet_validation_top5_error_ratio{"));
        let agent = encode_agent(&AgentSnapshot {
            job_id: "j1".into(),
            host: "h".into(),
            workers: vec![AgentWorker {
                rank: Some(3),
                local: 0,
                running: true,
                restarts: 1,
            }],
            restarts_left: None,
        });
        assert!(
            agent.contains(
                "alexnet_agent_worker_restarts_total{job_id=\"j1\",host=\"h\",rank=\"3\"} 1.0"
            ),
            "{agent}"
        );
        assert!(!agent.contains("restarts_left{"));
        let classic = classic_text(&(text + "# EOF\n"));
        assert!(classic.contains("# TYPE alexnet_restarts_total counter\n"));
        assert!(classic.contains("# HELP alexnet_restarts_total Generations"));
        assert!(classic.contains("# TYPE alexnet_step gauge\n"));
        assert!(!classic.contains("# UNIT") && !classic.contains("# EOF"));
    }
}
