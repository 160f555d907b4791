//! A thread that runs an exchange's jobs in order while the training thread computes: the
//! mechanism under the replicas' overlapped average and the column link's early swaps.
//!
//! Jobs go in with [`JobThread::submit`] and their results come back in the same order with
//! [`JobThread::take`]. The job itself bounds its waits on peers (the job's peer timeout), so a
//! take never hangs on a dead peer. The first failure is returned as it is (keeping the peer it
//! blames) and stops the thread; every later call fails at once, naming it. A panic on the
//! thread is reported with its message.

use anyhow::Context;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

pub struct JobThread<J, R> {
    jobs: Option<Sender<J>>,
    results: Receiver<anyhow::Result<R>>,
    thread: Option<JoinHandle<()>>,
    /// Jobs submitted and not yet taken back.
    pending: usize,
    /// Why the thread failed: it stays failed.
    failed: Option<String>,
    /// The thread, as messages name it ("the replicas' reduction thread").
    what: &'static str,
    /// What failed, for later calls ("averaging gradients with the other replicas").
    doing: &'static str,
}

impl<J: Send + 'static, R: Send + 'static> JobThread<J, R> {
    /// Starts thread `name`, which runs `run` on each job in turn.
    pub fn spawn(
        name: &str,
        what: &'static str,
        doing: &'static str,
        mut run: impl FnMut(J) -> anyhow::Result<R> + Send + 'static,
    ) -> anyhow::Result<Self> {
        let (jobs, job_rx) = channel::<J>();
        let (result_tx, results) = channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while let Ok(job) = job_rx.recv() {
                    let r = run(job);
                    let failed = r.is_err();
                    if result_tx.send(r).is_err() || failed {
                        return;
                    }
                }
            })
            .with_context(|| format!("starting {what}"))?;
        Ok(JobThread {
            jobs: Some(jobs),
            results,
            thread: Some(thread),
            pending: 0,
            failed: None,
            what,
            doing,
        })
    }
}

impl<J, R> JobThread<J, R> {
    /// Queues `job`; [`Self::take`] returns its result.
    pub fn submit(&mut self, job: J) -> anyhow::Result<()> {
        self.check()?;
        let sent = (self.jobs.as_ref()).is_some_and(|j| j.send(job).is_ok());
        if !sent {
            let e = self.ended();
            return Err(self.fail(e));
        }
        self.pending += 1;
        Ok(())
    }

    /// The result of the oldest job submitted and not yet taken. Waits for it.
    pub fn take(&mut self) -> anyhow::Result<R> {
        self.check()?;
        anyhow::ensure!(self.pending > 0, "nothing was handed to {}", self.what);
        // The job is over, whether it succeeded or not.
        self.pending -= 1;
        match self.results.recv() {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => Err(self.fail(e)),
            Err(_) => {
                let e = self.ended();
                Err(self.fail(e))
            }
        }
    }

    /// Jobs submitted and not yet taken back.
    pub fn pending(&self) -> usize {
        self.pending
    }

    fn check(&self) -> anyhow::Result<()> {
        match &self.failed {
            Some(why) => Err(anyhow::anyhow!("{} failed earlier: {why}", self.doing)),
            None => Ok(()),
        }
    }

    /// Records a failure, keeping the error (and the peer it blames) for the caller.
    fn fail(&mut self, e: anyhow::Error) -> anyhow::Error {
        self.failed = Some(format!("{e:#}"));
        e
    }

    /// Why the thread ended without an answer: it panicked (its message), or it is gone.
    fn ended(&mut self) -> anyhow::Error {
        let panicked = self.thread.take().and_then(|t| t.join().err());
        match panicked {
            Some(p) => {
                let why = (p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .or_else(|| p.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "no message".into());
                anyhow::anyhow!("{} panicked: {why}", self.what)
            }
            None => anyhow::anyhow!("{} ended unexpectedly", self.what),
        }
    }
}

impl<J, R> Drop for JobThread<J, R> {
    /// Ends the thread: at once when it is idle; when it still holds jobs (the step failed
    /// elsewhere), it is left to end when its current wait does (each is bounded by the peer
    /// timeout), so that the failure is reported without waiting for it.
    fn drop(&mut self) {
        self.jobs = None;
        if let Some(t) = self.thread.take() {
            if self.pending == 0 {
                let _ = t.join();
            }
        }
    }
}
