//! Who may join a job: the same job, the same binary, a clock close enough to the
//! coordinator's, a rank that exists and is free. The coordinator applies these rules to each
//! worker that registers, an agent to the coordinator it is pointed at before it starts
//! anything; both take them from here, and each refusal says what to do about it in the
//! words of whoever has to act on it.

use std::time::Duration;

/// Milliseconds since the Unix epoch by this host's clock.
pub fn unix_time_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Who asks to join, which decides how a refusal is worded.
#[derive(Clone, Copy, Debug)]
pub enum Joiner<'a> {
    /// A worker registering with the coordinator, from `host`.
    Worker { host: &'a str },
    /// An agent checking the coordinator at `coordinator` before it starts this host's
    /// workers as ranks `node_rank * workers ..`.
    Agent {
        coordinator: &'a str,
        node_rank: u32,
        workers: usize,
    },
}

/// What kind of refusal: it decides the gRPC status code the coordinator answers with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalKind {
    /// Another job, generation, configuration, binary or clock.
    Mismatch,
    /// A request that cannot be right whatever the job (a rank that does not exist, an
    /// address that is not one).
    Invalid,
    /// The rank is held by another worker.
    Taken,
    /// Every rank is held.
    Full,
    /// The job is past its rendezvous.
    Closed,
    /// An elastic job's generation runs without this worker's replica: it joins the next
    /// one (the call is answered, to be asked again, so that no wait is unbounded).
    NextGeneration,
}

/// The metadata key that marks a registration answered "ask again: the next generation takes
/// you" ([`RefusalKind::NextGeneration`]).
pub const WAIT_FOR_NEXT_GENERATION: &str = "x-alexnet-next-generation";

/// The metadata key that marks a registration refused because the job has finished (a worker
/// that waited for a place has nothing left to do).
pub const JOB_FINISHED: &str = "x-alexnet-job-finished";

/// Whether the coordinator answered a registration with "ask again".
pub fn waits_for_next_generation(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::Unavailable && s.metadata().contains_key(WAIT_FOR_NEXT_GENERATION)
}

/// Why someone may not join, and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

impl Refusal {
    fn new(kind: RefusalKind, message: String) -> Refusal {
        Refusal { kind, message }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Refusal {}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> tonic::Status {
        match r.kind {
            RefusalKind::Mismatch | RefusalKind::Closed => {
                tonic::Status::failed_precondition(r.message)
            }
            RefusalKind::Invalid => tonic::Status::invalid_argument(r.message),
            RefusalKind::Taken => tonic::Status::already_exists(r.message),
            RefusalKind::Full => tonic::Status::resource_exhausted(r.message),
            RefusalKind::NextGeneration => {
                let mut s = tonic::Status::unavailable(r.message);
                s.metadata_mut()
                    .insert(WAIT_FOR_NEXT_GENERATION, "1".parse().expect("ascii"));
                s
            }
        }
    }
}

/// The joiner was started for job `wanted` (empty: any job); the coordinator runs `running`.
pub fn same_job(running: &str, wanted: &str, who: Joiner) -> Result<(), Refusal> {
    if wanted.is_empty() || wanted == running {
        return Ok(());
    }
    let message = match who {
        Joiner::Worker { .. } => format!(
            "this coordinator runs job `{running}`, the worker was started for job `{wanted}`: point it at its own job's coordinator"
        ),
        Joiner::Agent { coordinator, .. } => format!(
            "the coordinator at {coordinator} runs job `{running}`, this agent was started for job `{wanted}`: point it at its own job's coordinator"
        ),
    };
    Err(Refusal::new(RefusalKind::Mismatch, message))
}

/// The joiner runs alexnet `theirs`; this binary is `crate::proto::VERSION`. For an agent,
/// `theirs` is the coordinator's.
pub fn same_version(theirs: &str, who: Joiner) -> Result<(), Refusal> {
    let ours = crate::proto::VERSION;
    if theirs == ours {
        return Ok(());
    }
    let message = match who {
        Joiner::Worker { .. } => format!(
            "the worker runs alexnet {theirs}, the coordinator {ours}: run the same binary everywhere"
        ),
        Joiner::Agent { .. } => format!(
            "the coordinator runs alexnet {theirs}, this host {ours}: install the same binary on every host"
        ),
    };
    Err(Refusal::new(RefusalKind::Mismatch, message))
}

/// The joining host's clock minus the coordinator's is `offset_ms` (`unknown`: the joiner
/// sent no clock, which is refused as any clock too far off).
pub fn clock_within(
    offset_ms: i64,
    unknown: bool,
    max_skew: Duration,
    who: Joiner,
) -> Result<(), Refusal> {
    let skew = Duration::from_millis(offset_ms.unsigned_abs());
    if !unknown && skew <= max_skew {
        return Ok(());
    }
    let message = match who {
        Joiner::Worker { host } => format!(
            "the clock of host `{host}` is {:.1} s off the coordinator's (at most {max_skew:?} allowed): \
             synchronise the hosts' clocks (NTP, chrony) before training across them",
            offset_ms.unsigned_abs() as f64 / 1000.0
        ),
        Joiner::Agent { .. } => format!(
            "this host's clock is {:.1} s {} the coordinator's (at most {max_skew:?} allowed): synchronise the clocks (NTP, chrony)",
            skew.as_secs_f64(),
            if offset_ms < 0 { "behind" } else { "ahead of" },
        ),
    };
    Err(Refusal::new(RefusalKind::Mismatch, message))
}

/// Rank `rank` exists in job `job` of `world` ranks.
pub fn rank_exists(rank: u32, world: u32, job: &str, who: Joiner) -> Result<(), Refusal> {
    if rank < world {
        return Ok(());
    }
    let message = match who {
        Joiner::Worker { .. } => format!(
            "rank {rank} does not exist: job `{job}` has {world} ranks (0..{})",
            world.saturating_sub(1)
        ),
        Joiner::Agent {
            node_rank, workers, ..
        } => format!(
            "--node-rank {node_rank} with {workers} workers claims rank {rank}, but job `{job}` has {world} ranks: check --node-rank and --workers"
        ),
    };
    Err(Refusal::new(RefusalKind::Invalid, message))
}

/// A rank's current holder, as the coordinator knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holder {
    pub rank: u32,
    pub host: String,
    pub pid: u32,
    /// `joined` or `running`.
    pub state: String,
}

/// The rank the joiner claims is not held (`holder`: who holds it, if anyone).
pub fn rank_free(rank: u32, holder: Option<&Holder>, who: Joiner) -> Result<(), Refusal> {
    let Some(h) = holder else {
        return Ok(());
    };
    let message = match who {
        Joiner::Worker { .. } => format!(
            "rank {rank} is already taken by {} (pid {}): give each worker its own --rank",
            h.host, h.pid
        ),
        Joiner::Agent { .. } => format!(
            "rank {rank} is already held by a worker on {} (pid {}, {}): is another agent running with the same --node-rank?",
            h.host, h.pid, h.state
        ),
    };
    Err(Refusal::new(RefusalKind::Taken, message))
}

/// What a coordinator's generation requires of the workers that register with it.
#[derive(Clone, Debug)]
pub struct JobFacts<'a> {
    pub job_id: &'a str,
    pub generation: u64,
    pub config_hash: &'a str,
    pub max_clock_skew: Duration,
}

/// The rules a registering worker must meet before a rank is considered: job, generation,
/// configuration, binary, clock (against `now_ms`, the coordinator's) and a data-plane
/// address.
pub fn worker_fits(
    job: &JobFacts,
    req: &crate::proto::RegisterRequest,
    now_ms: i64,
) -> Result<(), Refusal> {
    let who = Joiner::Worker { host: &req.host };
    same_job(job.job_id, &req.job_id, who)?;
    if let Some(g) = req.generation {
        if g != job.generation {
            return Err(Refusal::new(
                RefusalKind::Mismatch,
                format!(
                    "job `{}` is in generation {}, the worker asked for generation {g}: restart it without --generation",
                    job.job_id, job.generation
                ),
            ));
        }
    }
    if !req.config_hash.is_empty() && req.config_hash != job.config_hash {
        return Err(Refusal::new(
            RefusalKind::Mismatch,
            format!(
                "job `{}` has configuration {}, the worker expects {}: both sides must use the same job settings",
                job.job_id, job.config_hash, req.config_hash
            ),
        ));
    }
    same_version(&req.version, who)?;
    clock_within(
        req.unix_time_ms - now_ms,
        req.unix_time_ms == 0,
        job.max_clock_skew,
        who,
    )?;
    if req.data_addr.parse::<std::net::SocketAddr>().is_err() {
        return Err(Refusal::new(
            RefusalKind::Invalid,
            format!("data-plane address `{}` is not host:port", req.data_addr),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::RegisterRequest;

    const WORKER: Joiner = Joiner::Worker { host: "elsewhere" };
    const AGENT: Joiner = Joiner::Agent {
        coordinator: "http://10.0.0.1:50051",
        node_rank: 2,
        workers: 2,
    };

    fn facts() -> JobFacts<'static> {
        JobFacts {
            job_id: "alpha",
            generation: 0,
            config_hash: "feedface",
            max_clock_skew: Duration::from_secs(30),
        }
    }

    fn req() -> RegisterRequest {
        RegisterRequest {
            host: "elsewhere".into(),
            device: "cpu".into(),
            data_addr: "127.0.0.1:9".into(),
            version: crate::proto::VERSION.into(),
            unix_time_ms: 1_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn a_worker_of_this_job_binary_and_clock_fits() {
        worker_fits(&facts(), &req(), 1_000_000 + 29_000).unwrap();
        let mut r = req();
        r.job_id = "alpha".into();
        r.generation = Some(0);
        r.config_hash = "feedface".into();
        worker_fits(&facts(), &r, 1_000_000).unwrap();
    }

    #[test]
    fn each_mismatch_is_refused_with_what_to_do() {
        let refused = |r: RegisterRequest, now: i64| worker_fits(&facts(), &r, now).unwrap_err();
        let mut r = req();
        r.job_id = "beta".into();
        let e = refused(r, 1_000_000);
        assert_eq!(e.kind, RefusalKind::Mismatch);
        assert!(
            e.message.contains("runs job `alpha`") && e.message.contains("started for job `beta`")
        );
        let mut r = req();
        r.generation = Some(3);
        let e = refused(r, 1_000_000).message;
        assert!(
            e.contains("generation 0") && e.contains("generation 3"),
            "{e}"
        );
        let mut r = req();
        r.config_hash = "0123456789abcdef".into();
        let e = refused(r, 1_000_000).message;
        assert!(
            e.contains("configuration") && e.contains("0123456789abcdef"),
            "{e}"
        );
        let mut r = req();
        r.version = "0.0.1-elsewhere".into();
        let e = refused(r, 1_000_000).message;
        assert!(
            e.contains("alexnet 0.0.1-elsewhere") && e.contains("same binary"),
            "{e}"
        );
        let e = refused(req(), 1_090_000).message;
        assert!(
            e.contains("clock of host `elsewhere` is 90.0 s") && e.contains("synchronise"),
            "{e}"
        );
        let mut r = req();
        r.unix_time_ms = 0;
        let e = refused(r, 0).message;
        assert!(e.contains("clock of host"), "{e}");
        let mut r = req();
        r.data_addr = "nowhere".into();
        let e = refused(r, 1_000_000);
        assert_eq!(e.kind, RefusalKind::Invalid);
        assert!(e.message.contains("`nowhere` is not host:port"), "{e}");
    }

    #[test]
    fn the_same_rule_speaks_to_a_worker_and_to_an_agent() {
        let e = same_job("gamma", "delta", AGENT).unwrap_err().message;
        assert!(
            e.contains("runs job `gamma`") && e.contains("started for job `delta`"),
            "{e}"
        );
        let e = same_version("0.0.1-elsewhere", AGENT).unwrap_err().message;
        assert!(
            e.contains("alexnet 0.0.1-elsewhere") && e.contains("same binary"),
            "{e}"
        );
        // The coordinator's clock 95 s behind this host's: this host is ahead of it.
        let e = clock_within(95_000, false, Duration::from_secs(30), AGENT)
            .unwrap_err()
            .message;
        assert!(e.contains("95.0 s ahead of") && e.contains("NTP"), "{e}");
        let e = clock_within(-95_000, false, Duration::from_secs(30), AGENT)
            .unwrap_err()
            .message;
        assert!(e.contains("95.0 s behind"), "{e}");
        clock_within(-29_000, false, Duration::from_secs(30), AGENT).unwrap();
        let e = rank_exists(7, 2, "alpha", WORKER).unwrap_err();
        assert_eq!(e.kind, RefusalKind::Invalid);
        assert!(e.message.contains("rank 7 does not exist"), "{e}");
        let e = rank_exists(5, 4, "alpha", AGENT).unwrap_err().message;
        assert!(
            e.contains("claims rank 5") && e.contains("has 4 ranks"),
            "{e}"
        );
        rank_exists(3, 4, "alpha", WORKER).unwrap();
        let holder = Holder {
            rank: 0,
            host: "host-a".into(),
            pid: 4242,
            state: "joined".into(),
        };
        let e = rank_free(0, Some(&holder), WORKER).unwrap_err();
        assert_eq!(e.kind, RefusalKind::Taken);
        assert!(
            e.message
                .contains("rank 0 is already taken by host-a (pid 4242)"),
            "{e}"
        );
        let e = rank_free(0, Some(&holder), AGENT).unwrap_err().message;
        assert!(
            e.contains("rank 0 is already held by a worker on host-a (pid 4242"),
            "{e}"
        );
        rank_free(0, None, AGENT).unwrap();
    }
}
