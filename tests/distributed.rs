//! The distributed runtime with real processes: a coordinator and worker processes on this
//! machine, talking gRPC (control) and TCP (data) over loopback. The coordinator's refusals
//! and assignments, which need no worker process, are tested in process in `control_plane.rs`.

mod common;

use common::process::Proc;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn exe() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_alexnet"));
    c.env("NO_COLOR", "1").env_remove("RUST_LOG");
    c
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("alexnet-dist-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{err}");
    err
}

fn column_files(dir: &Path) -> Vec<alexnet::train::job::NamedTensors> {
    (0..2)
        .map(|c| {
            alexnet::train::job::load_column_file(&dir.join(format!("column{c}.safetensors")))
                .unwrap()
        })
        .collect()
}

/// The reference: one process holding both columns, 5 steps of the default job.
fn one_process(dir: &Path) -> Vec<alexnet::train::job::NamedTensors> {
    run_ok(
        exe()
            .args(["train", "--steps", "5", "--backend", "cpu", "--out"])
            .arg(dir),
    );
    column_files(dir)
}

#[test]
fn two_worker_processes_train_exactly_like_one_process() {
    let dir = scratch("exact2");
    let reference = one_process(&dir.join("one"));
    let out = run_ok(
        exe()
            .args([
                "launch",
                "--steps",
                "5",
                "--peer-timeout",
                "20",
                "--run-dir",
            ])
            .arg(dir.join("run")),
    );
    assert!(
        out.contains("[rank 0]") && out.contains("[rank 1]"),
        "{out}"
    );
    let split = column_files(&dir.join("run/params"));
    // Bit for bit: the exchange only moves values, and the CPU backend's sums do not depend on
    // how the work is spread over threads or processes.
    for (c, (a, b)) in reference.iter().zip(&split).enumerate() {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.0, y.0);
            assert!(x.2 == y.2, "column {c} {} differs between the layouts", x.0);
        }
    }
    // Each rank logged its part, to its own file.
    for r in 0..2 {
        let log = std::fs::read_to_string(dir.join(format!("run/rank{r}.log"))).unwrap();
        assert!(log.contains("data plane connected"), "{log}");
    }
}

#[test]
fn two_replicas_of_two_columns_in_four_processes_match_one_process_on_the_whole_batch() {
    let dir = scratch("exact4");
    let reference = one_process(&dir.join("one"));
    run_ok(
        exe()
            .args([
                "launch",
                "--steps",
                "5",
                "--replicas",
                "2",
                "--peer-timeout",
                "20",
            ])
            .arg("--run-dir")
            .arg(dir.join("run")),
    );
    let split = column_files(&dir.join("run/params"));
    for (c, (a, b)) in reference.iter().zip(&split).enumerate() {
        for (x, y) in a.iter().zip(b) {
            let e = common::rel_err(&y.2, &x.2);
            assert!(e < 1e-5, "column {c} {}: relative error {e:.2e}", x.0);
        }
    }
}

/// Starts a launch, waits until it trains, and returns it with the pid of `rank`.
fn launch_until_training(dir: &Path, peer_timeout: &str, rank: u32, extra: &[&str]) -> (Proc, u32) {
    let mut p = Proc::start(
        exe()
            .args(["launch", "--log-every", "1"])
            .args(["--peer-timeout", peer_timeout])
            .args(extra)
            .arg("--run-dir")
            .arg(dir),
    );
    let joined = p.wait_line(Duration::from_secs(60), |l| {
        l.contains("worker joined") && l.contains(&format!("rank={rank} "))
    });
    let pid: u32 = joined
        .split("pid=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .parse()
        .unwrap();
    p.wait_line(Duration::from_secs(60), |l| {
        l.contains(" train ") && l.contains("step=2 ")
    });
    (p, pid)
}

fn signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}

#[test]
fn a_killed_worker_stops_the_job_and_is_named_as_the_first_failure() {
    let dir = scratch("kill");
    let (p, pid) = launch_until_training(&dir, "5", 1, &["--epochs", "50", "--max-restarts", "0"]);
    signal(pid, "-KILL");
    let (ok, out, waited) = p.finish(Duration::from_secs(60));
    assert!(
        !ok,
        "the launch succeeded after a worker was killed:\n{out}"
    );
    assert!(
        out.contains("first failure: rank 1 exited with signal: 9"),
        "{out}"
    );
    // The coordinator named the rank, and the other worker stopped with an error naming it
    // (from the data plane, or from the coordinator's abort, whichever came first).
    assert!(out.contains("rank 1 (") && out.contains("failed"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("[rank 0]") && l.contains("ERROR") && l.contains("rank 1")),
        "{out}"
    );
    assert!(waited < Duration::from_secs(20), "took {waited:?}");
}

/// A frozen worker (or a cut link) is noticed by its silence within the peer timeout.
#[test]
fn a_silent_worker_is_named_within_the_peer_timeout() {
    let dir = scratch("stop");
    let (p, pid) = launch_until_training(&dir, "3", 0, &["--epochs", "50", "--max-restarts", "0"]);
    signal(pid, "-STOP");
    let (ok, out, waited) = p.finish(Duration::from_secs(60));
    // The launcher kills what is left of a failed job; make sure of it.
    let _ = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(Stdio::null())
        .status();
    assert!(!ok, "{out}");
    assert!(out.contains("first failure: rank 0"), "{out}");
    assert!(
        out.contains("rank 0")
            && (out.contains("sent nothing for") || out.contains("nothing heard from it")),
        "{out}"
    );
    assert!(waited < Duration::from_secs(30), "took {waited:?}");
}

/// Recovery: a worker killed mid-run is restarted (with all the others, in a new generation)
/// from the newest complete checkpoint, and the run ends with the steps it was asked for and
/// the same parameters as a run that was never interrupted.
#[test]
fn a_killed_worker_is_restarted_from_the_last_checkpoint_and_the_run_completes() {
    let dir = scratch("recover");
    let steps = "60";
    let (p, pid) = launch_until_training(
        &dir.join("run"),
        "5",
        1,
        &["--steps", steps, "--checkpoint-every", "4"],
    );
    // Let a checkpoint or two complete, then kill rank 1.
    let mut p = p;
    p.wait_line(Duration::from_secs(60), |l| {
        l.contains("checkpoint complete step=8")
    });
    signal(pid, "-KILL");
    let (ok, out, _) = p.finish(Duration::from_secs(120));
    assert!(ok, "the run did not recover:\n{out}");
    assert!(out.contains("restarting the workers"), "{out}");
    assert!(
        out.contains("generation=1") && out.contains("resuming step="),
        "{out}"
    );
    assert!(
        out.contains("rank 1 ("),
        "the failure was not named:\n{out}"
    );
    // Nothing was lost: the run ends at the requested step with the uninterrupted parameters.
    let last = alexnet::train::checkpoint::latest(&dir.join("run"), None)
        .unwrap()
        .unwrap();
    assert_eq!(last.1.step, 60);
    run_ok(
        exe()
            .args([
                "launch",
                "--steps",
                steps,
                "--checkpoint-every",
                "4",
                "--run-dir",
            ])
            .arg(dir.join("straight")),
    );
    let straight = alexnet::train::checkpoint::latest(&dir.join("straight"), None)
        .unwrap()
        .unwrap();
    for c in 0..2 {
        let name = alexnet::train::checkpoint::shard_name(c);
        let a = std::fs::read(last.0.join(&name)).unwrap();
        let b = std::fs::read(straight.0.join(&name)).unwrap();
        assert!(a == b, "column {c} differs from the uninterrupted run");
    }
}

/// Resume is exact: 10 steps straight, and 5 steps + stop + resume + 5 steps, give the same
/// bits; a damaged newest checkpoint is skipped with a warning; none left is a clear error.
#[test]
fn resume_is_exact_and_damaged_checkpoints_are_caught() {
    let dir = scratch("resume");
    run_ok(
        exe()
            .args(["launch", "--steps", "10", "--run-dir"])
            .arg(dir.join("straight")),
    );
    run_ok(
        exe()
            .args(["launch", "--steps", "5", "--run-dir"])
            .arg(dir.join("split")),
    );
    let out = run_ok(
        exe()
            .args(["launch", "--steps", "10", "--resume"])
            .arg(dir.join("split")),
    );
    assert!(out.contains("resuming step=5"), "{out}");
    let ck = |run: &str, step: u64| alexnet::train::checkpoint::step_dir(&dir.join(run), step);
    for c in 0..2 {
        let name = alexnet::train::checkpoint::shard_name(c);
        let a = std::fs::read(ck("straight", 10).join(&name)).unwrap();
        let b = std::fs::read(ck("split", 10).join(&name)).unwrap();
        assert!(
            a == b,
            "column {c}: resumed run differs from the straight one"
        );
    }
    // Truncate the newest shard: the run falls back to step 5, with a warning.
    let newest = ck("split", 10).join(alexnet::train::checkpoint::shard_name(1));
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let out = run_ok(
        exe()
            .args(["launch", "--steps", "6", "--resume"])
            .arg(dir.join("split")),
    );
    assert!(
        out.contains("truncated or corrupted") && out.contains("resuming step=5"),
        "{out}"
    );
    // Corrupt every checkpoint: a clear error, before any work.
    for entry in std::fs::read_dir(dir.join("split/checkpoints")).unwrap() {
        let shard = entry
            .unwrap()
            .path()
            .join(alexnet::train::checkpoint::shard_name(0));
        if shard.exists() {
            let mut b = std::fs::read(&shard).unwrap();
            let n = b.len();
            b[n - 1] ^= 0xff;
            std::fs::write(&shard, b).unwrap();
        }
    }
    let out = exe()
        .args(["launch", "--steps", "12", "--resume"])
        .arg(dir.join("split"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("no usable checkpoint"), "{err}");
    // A run folder of another configuration is refused before any work.
    let out = exe()
        .args(["launch", "--steps", "2", "--run-dir"])
        .arg(dir.join("straight"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--resume"), "{err}");
}

/// A coordinator waiting for its workers, on a port of its choosing; returns it and its URL.
const TOKEN: &str = "a token for the tests";

fn coordinator(job_id: &str, extra: &[&str]) -> (Proc, String) {
    let mut p = Proc::start(
        exe()
            .env("ALEXNET_TOKEN", TOKEN)
            .args(["coordinator", "--listen", "127.0.0.1:0", "--job-id", job_id])
            .arg("--run-dir")
            .arg(scratch(&format!("coordinator-{job_id}")))
            .args(extra),
    );
    let line = p.wait_line(Duration::from_secs(30), |l| {
        l.contains("coordinator listening")
    });
    let addr = line
        .split("listen=")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .unwrap()
        .to_string();
    (p, format!("http://{addr}"))
}

fn worker(url: &str, extra: &[&str]) -> (bool, String) {
    worker_with_token(url, Some(TOKEN), extra)
}

fn worker_with_token(url: &str, token: Option<&str>, extra: &[&str]) -> (bool, String) {
    let mut cmd = exe();
    cmd.env_remove("ALEXNET_TOKEN");
    if let Some(t) = token {
        cmd.env("ALEXNET_TOKEN", t);
    }
    let out = cmd
        .args(["worker", "--coordinator", url, "--connect-timeout", "2"])
        .args(extra)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_coordinator_that_does_not_answer_is_a_clear_error_after_bounded_retries() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = Instant::now();
    let (ok, err) = worker(&format!("http://127.0.0.1:{port}"), &[]);
    assert!(!ok);
    assert!(
        err.contains("no coordinator answered at") && err.contains("tries"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(15));
}

#[test]
fn a_worker_that_never_comes_fails_the_rendezvous_by_rank() {
    let (c, url) = coordinator("lonely", &["--rendezvous-timeout", "2"]);
    let (ok, err) = worker(&url, &["--rank", "0"]);
    assert!(!ok);
    assert!(err.contains("within"), "{err}");
    let (ok, out, _) = c.finish(Duration::from_secs(30));
    assert!(!ok);
    assert!(out.contains("[1] did not"), "{out}");
}

/// The control plane over TLS: a coordinator with a certificate made here, workers that trust
/// it train a short job; a worker that trusts another authority is refused.
#[test]
fn a_job_runs_over_tls_and_a_certificate_from_elsewhere_is_refused() {
    let dir = scratch("tls");
    let write_pair = |name: &str| {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.signing_key.serialize_pem()).unwrap();
        (cert, key)
    };
    let (cert, key) = write_pair("coordinator");
    let (other, _) = write_pair("elsewhere");
    let (c, url) = coordinator(
        "secure",
        &[
            "--steps",
            "3",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url = url.replace("http://", "https://");
    let (ok, err) = worker(
        &url,
        &[
            "--tls-ca",
            other.to_str().unwrap(),
            "--tls-domain",
            "localhost",
        ],
    );
    assert!(!ok);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    let workers: Vec<_> = (0..2)
        .map(|rank| {
            let (url, cert) = (url.clone(), cert.clone());
            std::thread::spawn(move || {
                worker(
                    &url,
                    &[
                        "--rank",
                        &rank.to_string(),
                        "--tls-ca",
                        cert.to_str().unwrap(),
                        "--tls-domain",
                        "localhost",
                    ],
                )
            })
        })
        .collect();
    for w in workers {
        let (ok, err) = w.join().unwrap();
        assert!(ok, "{err}");
    }
    let (ok, out, _) = c.finish(Duration::from_secs(60));
    assert!(ok, "{out}");
    assert!(
        out.contains("tls=true") && out.contains("every worker finished"),
        "{out}"
    );
}

fn agent(url: &str, extra: &[&str]) -> Proc {
    Proc::start(
        exe()
            .env("ALEXNET_TOKEN", TOKEN)
            .args(["agent", "--coordinator", url, "--threads", "1"])
            .args(["--rejoin-timeout", "5"])
            .args(extra),
    )
}

#[test]
fn an_agent_of_another_job_or_a_rank_taken_twice_is_a_clear_error() {
    let (mut c, url) = coordinator("gamma", &["--max-restarts", "0"]);
    let (ok, out, _) =
        agent(&url, &["--job-id", "delta", "--node-rank", "0"]).finish(Duration::from_secs(30));
    assert!(!ok);
    assert!(
        out.contains("runs job `gamma`") && out.contains("started for job `delta`"),
        "{out}"
    );
    // An agent claiming ranks the job does not have.
    let (ok, out, _) = agent(&url, &["--node-rank", "5"]).finish(Duration::from_secs(30));
    assert!(!ok);
    assert!(
        out.contains("claims rank 5") && out.contains("has 2 ranks"),
        "{out}"
    );
    // The first agent's worker holds rank 0 (waiting for rank 1); a second agent with the same
    // node rank is refused before it starts anything.
    let mut first = agent(&url, &["--job-id", "gamma", "--node-rank", "0"]);
    c.wait_line(Duration::from_secs(30), |l| {
        l.contains("worker joined") && l.contains("rank=0 ")
    });
    let (ok, out, _) =
        agent(&url, &["--job-id", "gamma", "--node-rank", "0"]).finish(Duration::from_secs(30));
    assert!(!ok);
    assert!(
        out.contains("rank 0 is already held by a worker on") && out.contains("same --node-rank"),
        "{out}"
    );
    // SIGTERM stops the first agent and its worker.
    let worker_pid: u32 = {
        let status = exe()
            .env("ALEXNET_TOKEN", TOKEN)
            .args(["status", "--json", "--coordinator", &url])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        v["workers"][0]["pid"].as_u64().unwrap() as u32
    };
    assert!(Path::new(&format!("/proc/{worker_pid}")).exists());
    signal(first.child.id(), "-TERM");
    first.wait_line(Duration::from_secs(15), |l| {
        l.contains("stopping on a signal")
    });
    let (_, out, waited) = first.finish(Duration::from_secs(20));
    assert!(waited < Duration::from_secs(12), "took {waited:?}:\n{out}");
    let gone = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        std::fs::read_to_string(format!("/proc/{worker_pid}/stat"))
            .map(|s| s.contains(") Z "))
            .unwrap_or(true)
    });
    assert!(gone, "the worker (pid {worker_pid}) outlived its agent");
    let _ = c.child.kill();
}

#[test]
fn resuming_a_complete_run_starts_nothing_and_says_so() {
    let dir = scratch("complete");
    run_ok(
        exe()
            .args(["launch", "--steps", "3", "--threads", "1", "--run-dir"])
            .arg(&dir),
    );
    // A coordinator restarted after its job finished (a scheduler's retry) ends at once.
    let t = Instant::now();
    let out = exe()
        .env("ALEXNET_TOKEN", TOKEN)
        .args(["coordinator", "--listen", "127.0.0.1:0", "--resume"])
        .arg(&dir)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("the run is complete"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// CPU workers on one machine check their batch against their share of its memory, so that
/// together they do not take more than is there (`ALEXNET_MEMORY_LIMIT` stands in for a small
/// machine): room for one worker's buffers is not enough for two.
#[test]
fn workers_on_one_machine_check_their_batch_against_their_share_of_its_memory() {
    let dir = scratch("share");
    let launch = |limit: String, run: &str| {
        let out = exe()
            .env("ALEXNET_MEMORY_LIMIT", &limit)
            .args(["launch", "--steps", "1", "--max-restarts", "0"])
            .args(["--peer-timeout", "20", "--run-dir"])
            .arg(dir.join(run))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        (out.status.success(), err)
    };
    let shared = "shared by the job's 2 workers on this machine";
    let (ok, err) = launch("1M".into(), "tiny");
    assert!(!ok && err.contains(shared), "{err}");
    // Each worker's need, as its refusal says (`need 8.1 MiB`).
    let need: f64 = err
        .split("need ")
        .nth(1)
        .and_then(|s| s.split(" MiB").next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no need in MiB in: {err}"));
    let kib = |f: f64| format!("{}K", (need * f * 1024.0) as u64);
    let (ok, err) = launch(kib(1.6), "one");
    assert!(!ok && err.contains(shared), "{err}");
    let (ok, err) = launch(kib(2.4), "both");
    assert!(ok, "{err}");
}

/// `alexnet status --run DIR` watches the README's main job: `launch` keeps its coordinator's
/// address and token (owner-only) in the run folder while it runs, and removes them at the end.
#[test]
fn status_watches_a_launch_through_its_run_folder() {
    let dir = scratch("status").join("run");
    let mut p = Proc::start(
        exe()
            .args(["launch", "--log-every", "1", "--steps", "150", "--run-dir"])
            .arg(&dir),
    );
    p.wait_line(Duration::from_secs(10), |l| {
        l.contains(&format!(
            "watch it with `alexnet status --run {}`",
            dir.display()
        ))
    });
    p.wait_line(Duration::from_secs(60), |l| {
        l.contains(" train ") && l.contains("step=3 ")
    });
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("token"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "the token file is readable by others");
    }
    let out = exe().args(["status", "--run"]).arg(&dir).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let step: u64 = text
        .split("step ")
        .nth(1)
        .and_then(|s| s.split('/').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no step in:\n{text}"));
    assert!(step >= 3 && text.contains("/150"), "{text}");
    assert!(text.contains("running"), "{text}");
    // Started in the run folder, `status` needs no arguments.
    let out = exe().arg("status").current_dir(&dir).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, out, _) = p.finish(Duration::from_secs(120));
    assert!(ok, "{out}");
    assert!(!dir.join("coordinator").exists() && !dir.join("token").exists());
    let out = exe().args(["status", "--run"]).arg(&dir).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("no coordinator serves this run now"),
        "{err}"
    );
}

/// SIGINT (Ctrl-C) stops a launch with a word on what was kept and how to go on.
#[test]
fn an_interrupted_launch_says_how_to_resume() {
    let dir = scratch("sigint").join("run");
    let mut p = Proc::start(
        exe()
            .args(["launch", "--log-every", "1", "--steps", "400", "--run-dir"])
            .arg(&dir),
    );
    p.wait_line(Duration::from_secs(60), |l| {
        l.contains(" train ") && l.contains("step=2 ")
    });
    signal(p.child.id(), "-INT");
    let (ok, out, waited) = p.finish(Duration::from_secs(60));
    assert!(!ok, "{out}");
    assert!(
        out.contains("interrupted")
            && out.contains(&format!("alexnet launch --resume {}", dir.display())),
        "{out}"
    );
    assert!(waited < Duration::from_secs(20), "took {waited:?}");
}

/// The shards of `run`'s newest checkpoint, which must be at `step`.
fn final_shards(run: &Path, step: u64) -> Vec<Vec<u8>> {
    let (dir, m) = alexnet::train::checkpoint::latest(run, None)
        .unwrap()
        .unwrap();
    assert_eq!(m.step, step, "{}", dir.display());
    (0..2)
        .map(|c| std::fs::read(dir.join(alexnet::train::checkpoint::shard_name(c))).unwrap())
        .collect()
}

/// A disk that fills up while training: the checkpoint that meets it stops the job with what
/// to do (no restart is spent on it: each would meet the same wall), every complete
/// checkpoint is kept, and the run resumed once there is room ends exactly as an
/// uninterrupted one.
#[cfg(unix)]
#[test]
fn a_full_disk_stops_the_run_for_an_operator_and_the_resumed_run_is_exact() {
    let dir = scratch("full-disk");
    let run = dir.join("run");
    let job = ["--steps", "24", "--checkpoint-every", "4"];
    // Rank 1's shard of the checkpoint at step 12 is written into /dev/full: ENOSPC, as on a
    // full disk. (The failed write removes the link: the space is "freed" for the resume.)
    let full = alexnet::train::checkpoint::step_dir(&run, 12);
    std::fs::create_dir_all(&full).unwrap();
    std::os::unix::fs::symlink("/dev/full", full.join("column1.safetensors.tmp")).unwrap();
    let p = Proc::start(
        exe()
            .args(["launch", "--log-every", "1", "--peer-timeout", "5"])
            .args(job)
            .arg("--run-dir")
            .arg(&run),
    );
    let (ok, out, _) = p.finish(Duration::from_secs(120));
    assert!(!ok, "{out}");
    assert!(
        out.contains("step-000000012 needs")
            && out.contains(&format!("the disk of the run folder {}", run.display()))
            && out.contains("lower keep_checkpoints")
            && out.contains(&format!("--resume {}", run.display())),
        "{out}"
    );
    assert!(out.contains("restarts unspent"), "{out}");
    assert!(!out.contains("restarting the workers"), "{out}");
    let kept: Vec<u64> = alexnet::train::checkpoint::list(&run)
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, [8, 4], "{out}");
    let out = run_ok(exe().args(["launch", "--resume"]).arg(&run));
    assert!(out.contains("resuming step=8"), "{out}");
    run_ok(
        exe()
            .args(["launch"])
            .args(job)
            .arg("--run-dir")
            .arg(dir.join("straight")),
    );
    assert!(
        final_shards(&run, 24) == final_shards(&dir.join("straight"), 24),
        "the resumed run differs from the uninterrupted one"
    );
}

/// A coordinator stopped for three peer timeouts (a VM pause, a debugger) blames no one: the
/// generation goes on and the run finishes without a restart.
#[test]
fn a_paused_coordinator_blames_no_one() {
    let dir = scratch("pause-coordinator");
    let (p, _) = launch_until_training(&dir, "2", 1, &["--steps", "300", "--max-restarts", "0"]);
    signal(p.child.id(), "-STOP");
    std::thread::sleep(Duration::from_secs(6));
    signal(p.child.id(), "-CONT");
    let (ok, out, _) = p.finish(Duration::from_secs(180));
    assert!(ok, "{out}");
    assert!(
        out.contains("the coordinator itself was not running"),
        "{out}"
    );
    assert!(
        !out.contains("nothing heard from it") && !out.contains("restarting the workers"),
        "{out}"
    );
}

/// A worker that dies while the coordinator is stopped is still named once it runs again.
#[test]
fn a_worker_killed_while_the_coordinator_was_paused_is_named() {
    let dir = scratch("pause-kill");
    let (p, pid) = launch_until_training(&dir, "2", 1, &["--steps", "300", "--max-restarts", "0"]);
    signal(p.child.id(), "-STOP");
    signal(pid, "-KILL");
    std::thread::sleep(Duration::from_secs(6));
    signal(p.child.id(), "-CONT");
    let (ok, out, waited) = p.finish(Duration::from_secs(60));
    assert!(!ok, "{out}");
    assert!(out.contains("first failure: rank 1"), "{out}");
    assert!(waited < Duration::from_secs(20), "took {waited:?}");
}

/// A disk that fills up as the finished run writes its parameters: the job stops with where
/// they still are (the final checkpoint) and how to get them.
#[cfg(unix)]
#[test]
fn a_full_disk_at_the_final_parameters_says_where_they_are() {
    let run = scratch("full-params").join("run");
    std::fs::create_dir_all(run.join("params")).unwrap();
    std::os::unix::fs::symlink("/dev/full", run.join("params/column0.safetensors.tmp")).unwrap();
    let out = exe()
        .args(["launch", "--steps", "4", "--run-dir"])
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("the trained parameters could not be written to")
            && err.contains(&format!("alexnet export --run {}", run.display())),
        "{err}"
    );
    assert!(!err.contains("restarting the workers"), "{err}");
}
