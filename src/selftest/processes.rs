//! The short job run as this binary's processes, in its two layouts, and compared.

use super::Check;
use crate::data::idx;
use crate::rng;

/// What [`processes`] runs: two workers, one column each, exchanging over TCP, against one
/// process holding both columns, for `STEPS` steps of the default network on small synthetic
/// images (written beside the runs, so the check needs nothing but the binary).
const STEPS: usize = 5;

/// The two layouts of a job on `backend` (`cpu` or `cuda`), each a process of `exe`:
/// `alexnet train` with both columns in one process, and `alexnet launch` with one worker
/// process per column exchanging over TCP (for `cuda`, both workers on GPU 0: the children
/// see that GPU alone, so the pair cannot take NCCL). Each column's parameters after the
/// steps are compared, as their move from the initial parameters: the error is
/// `max |two - one| / max |one - initial|`. Every failure (a run that fails or overruns
/// `limit`, parameters that differ in name or shape, or did not move) is a failed check, never
/// an error that would lose the other checks; its reason is in the error log.
pub fn processes(
    exe: &std::path::Path,
    backend: &str,
    dir: &std::path::Path,
    limit: std::time::Duration,
    tol: f64,
) -> Vec<Check> {
    let what = format!("two worker processes over TCP ({backend}), {STEPS} steps");
    match run_layouts(exe, backend, dir, limit) {
        Ok(params) => compare_layouts(&what, &params, tol).unwrap_or_else(|e| {
            tracing::error!("{what}: {e:#}");
            vec![Check {
                what: format!("{what}: the layouts' parameters compared"),
                error: f64::INFINITY,
                tolerance: tol,
            }]
        }),
        Err((run, e)) => {
            tracing::error!("{what}: {run}: {e:#}");
            vec![Check {
                what: format!("{what}: {run} ran"),
                error: f64::INFINITY,
                tolerance: tol,
            }]
        }
    }
}

/// Both columns' parameters, by name, of the runs [`processes`] compares: initial, one
/// process, two workers. An error names the run.
type LayoutParams = [Vec<crate::train::job::NamedTensors>; 3];

fn run_layouts(
    exe: &std::path::Path,
    backend: &str,
    dir: &std::path::Path,
    limit: std::time::Duration,
) -> Result<LayoutParams, (&'static str, anyhow::Error)> {
    use anyhow::Context;
    let data = dir.join("data");
    write_idx_sample(&data, 64, 16)
        .context("writing the synthetic images")
        .map_err(|e| ("the data", e))?;
    let steps = STEPS.to_string();
    // Explicit layout: a job file or an ALEXNET_* setting in the environment must not change
    // what is compared (two workers and one replica, this backend's default convolutions).
    let runs = [
        ("train", "initial", vec!["--steps", "0", "--out"], "initial"),
        (
            "train",
            "one process",
            vec!["--steps", &steps, "--out"],
            "one",
        ),
        (
            "launch",
            "two workers",
            vec![
                "--steps",
                &steps,
                "--replicas",
                "1",
                "--peer-timeout",
                "30",
                "--run-dir",
            ],
            "two",
        ),
    ];
    let mut params = Vec::new();
    for (command, name, args, out) in runs {
        let mut cmd = std::process::Command::new(exe);
        cmd.arg(command)
            .args(["--backend", backend, "--batch", "16", "--data"])
            .arg(&data)
            .args(args)
            .arg(dir.join(out));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ALEXNET_") {
                cmd.env_remove(key);
            }
        }
        if backend == "cuda" {
            cmd.env("CUDA_VISIBLE_DEVICES", "0");
        }
        let log = dir.join(format!("{command}-{name}.log").replace(' ', "-"));
        run_bounded(&mut cmd, limit, &log).map_err(|e| (name, e))?;
        let out = match command {
            "launch" => dir.join(out).join("params"),
            _ => dir.join(out),
        };
        let columns = (0..2)
            .map(|c| {
                crate::train::job::load_column_file(&out.join(format!("column{c}.safetensors")))
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(|e| (name, e))?;
        params.push(columns);
    }
    Ok(params.try_into().expect("three runs"))
}

fn compare_layouts(what: &str, params: &LayoutParams, tol: f64) -> anyhow::Result<Vec<Check>> {
    let [initial, one, two] = params;
    // Differences over non-finite values are infinite, whatever the values.
    let gap = |a: f32, b: f32| {
        let d = (a as f64 - b as f64).abs();
        if d.is_finite() {
            d
        } else {
            f64::INFINITY
        }
    };
    let mut checks = Vec::new();
    for c in 0..2 {
        let (p0, p1, p2) = (&initial[c], &one[c], &two[c]);
        anyhow::ensure!(
            p0.len() == p1.len() && p1.len() == p2.len(),
            "column {c} holds {}, {} and {} parameters in the initial, one-process and \
             two-worker runs",
            p0.len(),
            p1.len(),
            p2.len()
        );
        let (mut diff, mut moved, mut worst) = (0.0f64, 0.0f64, String::new());
        for ((t0, t1), t2) in p0.iter().zip(p1).zip(p2) {
            anyhow::ensure!(
                (t0.0 == t1.0 && t1.0 == t2.0) && (t0.1 == t1.1 && t1.1 == t2.1),
                "column {c}'s parameters differ between the runs: {} {:?}, {} {:?}, {} {:?}",
                t0.0,
                t0.1,
                t1.0,
                t1.1,
                t2.0,
                t2.1
            );
            let d =
                t1.2.iter()
                    .zip(&t2.2)
                    .fold(0.0f64, |m, (&a, &b)| m.max(gap(a, b)));
            let m =
                t0.2.iter()
                    .zip(&t1.2)
                    .fold(0.0f64, |m, (&a, &b)| m.max(gap(a, b)));
            if d > diff {
                worst = t1.0.clone();
            }
            diff = diff.max(d);
            moved = moved.max(m);
        }
        // Parameters that did not move would pass any comparison: a run that trained nothing.
        anyhow::ensure!(
            moved > 0.0 && moved.is_finite(),
            "column {c}'s parameters moved by {moved} in {STEPS} steps"
        );
        let error = if diff == 0.0 { 0.0 } else { diff / moved };
        let at = if worst.is_empty() {
            String::new()
        } else {
            format!(" (largest in {worst})")
        };
        checks.push(Check {
            what: format!("{what}: column {c}'s parameters{at}"),
            error,
            tolerance: tol,
        });
    }
    Ok(checks)
}

/// Runs `cmd` to completion within `limit`, its standard error to `log`. The command runs in a
/// process group of its own, so that past the limit its children (`launch`'s workers) are
/// stopped with it: asked first (SIGTERM), then killed. An error holds the log's last lines.
fn run_bounded(
    cmd: &mut std::process::Command,
    limit: std::time::Duration,
    log: &std::path::Path,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let group = child.id() as libc::pid_t;
    let signal_group = |sig| {
        // SAFETY: signals the process group that `child` leads (created above).
        unsafe { libc::kill(-group, sig) };
    };
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() <= limit => std::thread::sleep(Duration::from_millis(50)),
            // Overran, or cannot be watched: stopped either way.
            waited => {
                signal_group(libc::SIGTERM);
                let asked = Instant::now();
                while asked.elapsed() < Duration::from_secs(3) {
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                signal_group(libc::SIGKILL);
                let _ = child.wait();
                waited.with_context(|| format!("watching {:?}", cmd.get_program()))?;
                break None;
            }
        }
    };
    let tail = || {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    };
    match status {
        Some(s) if s.success() => Ok(()),
        Some(s) => anyhow::bail!("{s}; the end of {}:\n{}", log.display(), tail()),
        None => anyhow::bail!(
            "still running after {limit:?}, stopped; the end of {}:\n{}",
            log.display(),
            tail()
        ),
    }
}

/// `train` and `t10k` IDX files (uncompressed) of random 28x28 images, labels 0..9 in turn.
fn write_idx_sample(dir: &std::path::Path, train: usize, test: usize) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (split, n) in [("train", train), ("t10k", test)] {
        let key = rng::key(n as u64, split);
        let pixels: Vec<u8> = (0..(n * 28 * 28) as u64)
            .map(|i| (rng::mix64(key ^ i) >> 56) as u8)
            .collect();
        let labels: Vec<u8> = (0..n).map(|i| (i % 10) as u8).collect();
        let (images, labels) = (
            idx::encode_images(28, 28, &pixels),
            idx::encode_labels(&labels),
        );
        std::fs::write(dir.join(format!("{split}-images-idx3-ubyte")), images)?;
        std::fs::write(dir.join(format!("{split}-labels-idx1-ubyte")), labels)?;
    }
    Ok(())
}

/// [`processes`] of this binary, in a scratch folder that is removed afterwards where the
/// check passed (kept for its logs otherwise).
pub(super) fn in_scratch(
    backend: &str,
    limit: std::time::Duration,
    tolerance: f64,
) -> anyhow::Result<Vec<Check>> {
    use anyhow::Context;
    let exe = std::env::current_exe().context("finding this binary, to run its processes")?;
    let dir = std::env::temp_dir().join(format!("alexnet-selftest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    tracing::info!(
        backend,
        "running a short job as one process, then as two worker processes"
    );
    let checks = processes(&exe, backend, &dir, limit, tolerance);
    if checks.iter().all(Check::passed) {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        tracing::error!(dir = %dir.display(), "the layouts' runs are kept here");
    }
    Ok(checks)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selftest::render;

    fn layouts(two_last: f32) -> LayoutParams {
        let column = |w: f32, last: f32| {
            vec![
                ("a".to_string(), vec![2], vec![w, 1.0]),
                ("b".to_string(), vec![1], vec![last]),
            ]
        };
        [
            vec![column(0.0, 0.0), column(0.0, 0.0)],
            vec![column(0.5, 0.5), column(0.5, 0.5)],
            vec![column(0.5, two_last), column(0.5, two_last)],
        ]
    }

    #[test]
    fn the_layouts_compare_by_move_and_refuse_what_cannot_be_compared() {
        let checks = compare_layouts("t", &layouts(0.5), 1e-4).unwrap();
        assert!(checks.iter().all(|c| c.error == 0.0), "{}", render(&checks));
        // 0.5 moved, 0.25 apart: half the move, in `b`.
        let checks = compare_layouts("t", &layouts(0.25), 1e-4).unwrap();
        assert_eq!(checks[0].error, 0.5);
        assert!(
            checks[0].what.contains("largest in b"),
            "{}",
            checks[0].what
        );
        assert!(
            compare_layouts("t", &layouts(f32::INFINITY), 1e-4).unwrap()[0]
                .error
                .is_infinite()
        );
        // A parameter missing at the end of one run, another shape, or nothing moved.
        let mut short = layouts(0.5);
        short[2][1].pop();
        assert!(compare_layouts("t", &short, 1e-4).is_err());
        let mut reshaped = layouts(0.5);
        reshaped[2][0][0].1 = vec![1, 2];
        assert!(compare_layouts("t", &reshaped, 1e-4).is_err());
        let mut still = layouts(0.5);
        still[1] = still[0].clone();
        still[2] = still[0].clone();
        assert!(compare_layouts("t", &still, 1e-4).is_err());
    }

    #[test]
    fn a_run_past_its_limit_is_stopped_with_its_children() {
        let dir = std::env::temp_dir().join(format!("alexnet-bounded-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let pid_file = dir.join("child.pid");
        let mut cmd = std::process::Command::new("sh");
        cmd.arg("-c").arg(format!(
            "sleep 60 & echo $! > {}; echo started >&2; wait",
            pid_file.display()
        ));
        let started = std::time::Instant::now();
        let e = run_bounded(
            &mut cmd,
            std::time::Duration::from_millis(300),
            &dir.join("run.log"),
        )
        .unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let msg = format!("{e:#}");
        assert!(
            msg.contains("still running") && msg.contains("started"),
            "{msg}"
        );
        // The shell's child went with it.
        let pid: i32 = std::fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        // Gone, or a zombie that nobody has reaped yet (its parent, the shell, was stopped).
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let alive = stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'));
        assert!(!alive, "the child {pid} outlived the stopped run");
        let mut failing = std::process::Command::new("sh");
        failing.arg("-c").arg("echo broken >&2; exit 3");
        let e = run_bounded(
            &mut failing,
            std::time::Duration::from_secs(10),
            &dir.join("f.log"),
        );
        let msg = format!("{:#}", e.unwrap_err());
        assert!(
            msg.contains("exit status: 3") && msg.contains("broken"),
            "{msg}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
