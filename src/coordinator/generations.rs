//! A job whose generations follow one another behind one address: what `alexnet coordinator`
//! serves to agents on other hosts. When a generation fails (a worker died, a host dropped off
//! the network), the next one starts at once from the newest complete checkpoint and waits for
//! the workers to rejoin, until the job finishes or no restarts are left.
//!
//! Workers never talk to an old generation by mistake: a worker that registers while the
//! failed generation is being replaced waits for its successor, and every session names its
//! generation.

use super::{Coordinator, CoordinatorConfig, Phase};
use crate::proto::coordinator_server::Coordinator as CoordinatorRpc;
use crate::proto::{Assignment, JobStatus, RegisterRequest, StatusRequest, WorkerEvent};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};

/// The longest a registration waiting for an elastic job's next generation is held before it
/// is told to ask again.
pub const HOLD: Duration = Duration::from_secs(20);

/// Serves the current generation's coordinator and starts the next one after a failure.
#[derive(Clone)]
pub struct Supervisor {
    current: watch::Sender<Coordinator>,
    /// Set once the job is over for good (finished, or failed with no restarts left).
    over: watch::Sender<Option<Phase>>,
    /// No generation follows the current one, whatever restarts are left (its workers are
    /// gone for good).
    abandoned: Arc<AtomicBool>,
    /// The workers are restarted by this process (`alexnet launch`), not by agents
    /// elsewhere: the log says so.
    restarts_workers: bool,
    /// Generations started after a failure.
    restarts: Arc<AtomicU64>,
}

impl Supervisor {
    pub fn new(cfg: CoordinatorConfig) -> anyhow::Result<Self> {
        Ok(Supervisor {
            current: watch::channel(Coordinator::new(cfg)?).0,
            over: watch::channel(None).0,
            abandoned: Arc::new(AtomicBool::new(false)),
            restarts_workers: false,
            restarts: Arc::new(AtomicU64::new(0)),
        })
    }

    /// A supervisor whose workers this process restarts (`alexnet launch`).
    pub fn restarting_workers(self) -> Self {
        Supervisor {
            restarts_workers: true,
            ..self
        }
    }

    /// How the job ended, once it is over for good.
    pub fn over(&self) -> Option<Phase> {
        self.over.borrow().clone()
    }

    /// Ends the job for good: the current generation fails with `error` (unless it is over
    /// already), and no other follows.
    pub fn abandon(&self, error: String) {
        self.abandoned.store(true, Ordering::SeqCst);
        let c = self.current();
        if !c.phase.borrow().is_over() {
            c.fail(None, error);
        }
    }

    /// The job's metrics as `/metrics` serves them (without the closing `# EOF`).
    pub fn metrics(&self) -> String {
        let snapshot = self.current().metrics(self.restarts.load(Ordering::SeqCst));
        crate::telemetry::prometheus::encode_job(&snapshot)
    }

    /// The generation being served now.
    pub fn current(&self) -> Coordinator {
        self.current.borrow().clone()
    }

    /// Serves the job on `listener` until it finishes or fails with no restarts left;
    /// returns how it ended, with the last generation's coordinator.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
    ) -> anyhow::Result<(Phase, Coordinator)> {
        let cfg = self.current().cfg.clone();
        let server = tokio::spawn(super::serve_rpc(self.clone(), &cfg, listener)?);
        let end = loop {
            let c = self.current();
            tokio::spawn(c.clone().watchdog());
            let end = c.phase().wait_for(|p| p.is_over()).await?.clone();
            if let Phase::Regrouping { reason } = &end {
                // Not a failure: no restart is spent.
                c.close_telemetry();
                let next = Coordinator::next_generation(&c.cfg, false)?;
                tracing::warn!(
                    generation = next.generation,
                    from_step = next.resume.as_ref().map(|r| r.1.step).unwrap_or(0),
                    "{reason}: generation {} starts from that checkpoint as the workers rejoin",
                    next.generation
                );
                self.current.send_replace(Coordinator::new(next)?);
                continue;
            }
            let Phase::Failed {
                rank,
                error,
                needs_operator,
            } = &end
            else {
                break end;
            };
            if self.abandoned.load(Ordering::SeqCst) {
                break end;
            }
            if *needs_operator {
                tracing::error!(
                    failed_rank = ?rank,
                    "a restart would meet the same error, so the job stops here with its \
                     restarts unspent: {error}"
                );
                break end;
            }
            if c.cfg.restarts_left == 0 {
                tracing::error!("no restarts left (--max-restarts): the job has failed");
                break end;
            }
            // The failed generation's late reports write nothing for TensorBoard: the next
            // one cuts the curves back to its checkpoint and goes on from there.
            c.close_telemetry();
            let next = Coordinator::next_generation(&c.cfg, true)?;
            let from_step = next.resume.as_ref().map(|r| r.1.step).unwrap_or(0);
            if self.restarts_workers {
                tracing::warn!(
                    failed_rank = ?rank,
                    generation = next.generation,
                    from_step,
                    restarts_left = next.restarts_left,
                    "restarting the workers after the failure ({error}) from the newest \
                     complete checkpoint"
                );
            } else {
                tracing::warn!(
                    failed_rank = ?rank,
                    generation = next.generation,
                    from_step,
                    restarts_left = next.restarts_left,
                    "generation {} failed ({error}); waiting for the workers to rejoin \
                     generation {} from the newest complete checkpoint",
                    c.cfg.generation,
                    next.generation
                );
            }
            self.current.send_replace(Coordinator::new(next)?);
            self.restarts.fetch_add(1, Ordering::SeqCst);
        };
        self.over.send_replace(Some(end.clone()));
        // Let the last commands (stop, abort) and status calls go out before closing.
        tokio::time::sleep(Duration::from_millis(500)).await;
        server.abort();
        Ok((end, self.current()))
    }

    /// The generation a registering worker joins: the current one, or, while a failed one is
    /// being replaced, its successor.
    async fn joinable(&self) -> Result<Coordinator, Status> {
        let mut current = self.current.subscribe();
        let deadline = Duration::from_secs(10);
        loop {
            let c = current.borrow_and_update().clone();
            if !c.phase.borrow().is_over() {
                return Ok(c);
            }
            if let Some(end) = self.over.borrow().clone() {
                let finished = end == Phase::Finished;
                let mut status = Status::failed_precondition(match end {
                    Phase::Finished => format!("job `{}` has finished", c.cfg.job_id),
                    Phase::Failed {
                        error,
                        needs_operator: true,
                        ..
                    } => format!(
                        "job `{}` has stopped until an operator acts: {error}",
                        c.cfg.job_id
                    ),
                    Phase::Failed { error, .. } => format!(
                        "job `{}` has failed with no restarts left: {error}",
                        c.cfg.job_id
                    ),
                    _ => format!("job `{}` is over", c.cfg.job_id),
                });
                if finished {
                    status
                        .metadata_mut()
                        .insert(crate::admission::JOB_FINISHED, "1".parse().expect("ascii"));
                }
                return Err(status);
            }
            match tokio::time::timeout(deadline, current.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Status::unavailable("the coordinator is stopping")),
                // A finished generation whose job is not marked over yet: look again.
                Err(_) => {}
            }
        }
    }
}

#[tonic::async_trait]
impl CoordinatorRpc for Supervisor {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<Assignment>, Status> {
        let mut req = request.into_inner();
        let received = tokio::time::Instant::now();
        let sent_at = req.unix_time_ms;
        let hold_until = received + HOLD;
        loop {
            let c = self.joinable().await?;
            let answer = CoordinatorRpc::register(&c, Request::new(req.clone())).await;
            match answer {
                // An elastic job's worker that waits for the next generation: held here until
                // that generation begins (then it joins it), or for `HOLD`, when it is told to
                // ask again, so that neither side waits unbounded on the other.
                Err(s) if crate::admission::waits_for_next_generation(&s) => {
                    let mut current = self.current.subscribe();
                    let generation = c.generation();
                    let next = async {
                        current
                            .wait_for(|n| n.generation() != generation)
                            .await
                            .map(|_| ())
                    };
                    match tokio::time::timeout_at(hold_until, next).await {
                        Ok(Ok(_)) => {
                            // Its clock as it would read now, for the admission's skew check.
                            req.unix_time_ms = sent_at + received.elapsed().as_millis() as i64;
                            continue;
                        }
                        Ok(Err(_)) => {
                            return Err(Status::unavailable("the coordinator is stopping"))
                        }
                        Err(_) => return Err(s),
                    }
                }
                answer => return answer,
            }
        }
    }

    type SessionStream = <Coordinator as CoordinatorRpc>::SessionStream;

    async fn session(
        &self,
        request: Request<Streaming<WorkerEvent>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        CoordinatorRpc::session(&self.current(), request).await
    }

    async fn status(&self, request: Request<StatusRequest>) -> Result<Response<JobStatus>, Status> {
        CoordinatorRpc::status(&self.current(), request).await
    }
}
