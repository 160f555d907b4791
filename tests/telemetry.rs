//! What a run shows the tools people watch runs with, read by those tools: TensorBoard's own
//! event reader (`scripts/tensorboard-scalars.py`), `promtool check metrics`, and a real
//! Prometheus server scraping a live run. CI installs them (`.ci/run`); elsewhere a test
//! whose tool is missing says so and passes, unless ALEXNET_REQUIRE_TELEMETRY_TOOLS is set.

mod common;

use common::process::Proc;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn exe() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_alexnet"));
    c.env("NO_COLOR", "1").env_remove("RUST_LOG");
    c
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("alexnet-tele-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Whether `probe` runs; a missing tool fails the test where CI requires it.
fn have(tool: &str, probe: &mut Command) -> bool {
    let ok = probe
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("ALEXNET_REQUIRE_TELEMETRY_TOOLS").is_none(),
            "{tool} is required here (ALEXNET_REQUIRE_TELEMETRY_TOOLS) but missing"
        );
        eprintln!("skipped: {tool} is not installed");
    }
    ok
}

/// `key=value` fields of a text log line.
fn fields(line: &str) -> BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pid_of(line: &str) -> u32 {
    fields(line)["pid"].parse().unwrap()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET: (status line, headers and body).
fn http_get(port: u16, path: &str, accept: Option<&str>) -> (String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{accept}\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (head.to_string(), body.to_string())
}

type Scalars = BTreeMap<String, Vec<(i64, f64)>>;

fn read_scalars(folder: &Path) -> Scalars {
    let out = Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/scripts/tensorboard-scalars.py"
        ))
        .arg(folder)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "TensorBoard could not read {}: {}",
        folder.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["scalars"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tag, points)| {
            let points = points
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
                .collect();
            (tag.clone(), points)
        })
        .collect()
}

/// A worker killed mid-run: the curves TensorBoard reads have every tag, each step once and
/// in order, and the values the logs gave for those steps (the restarted run's, where a step
/// was trained twice).
#[test]
fn tensorboard_reads_what_the_logs_say_also_across_a_restart() {
    if !have(
        "the tensorboard Python package",
        Command::new("python3").args(["-c", "import tensorboard"]),
    ) {
        return;
    }
    let dir = scratch("tb");
    let run = dir.join("run");
    let mut p = Proc::start(
        exe()
            .args(["launch", "--steps", "60", "--checkpoint-every", "8"])
            .args(["--log-every", "4", "--peer-timeout", "5", "--run-dir"])
            .arg(&run),
    );
    let joined = p.wait_line(Duration::from_secs(60), |l| {
        l.contains("worker joined") && l.contains("rank=1 ")
    });
    p.wait_line(Duration::from_secs(90), |l| {
        l.contains("checkpoint complete step=16")
    });
    assert!(Command::new("kill")
        .args(["-KILL", &pid_of(&joined).to_string()])
        .status()
        .unwrap()
        .success());
    let (ok, out, _) = p.finish(Duration::from_secs(180));
    assert!(ok, "the run did not recover:\n{out}");
    assert!(out.contains("restarting the workers"), "{out}");
    assert!(
        !out.contains("serving Prometheus metrics"),
        "metrics served without --metrics-listen:\n{out}"
    );

    // What the logs say, the restarted generation's word last.
    let mut logged: BTreeMap<&str, BTreeMap<i64, f64>> = BTreeMap::new();
    for line in out.lines() {
        let f = fields(line);
        let Some(step) = f.get("step").and_then(|s| s.parse::<i64>().ok()) else {
            continue;
        };
        let pairs: &[(&str, &str)] = if line.contains(" train ") {
            &[
                ("loss", "train/loss"),
                ("top1_err", "train/top1_error"),
                ("top5_err", "train/top5_error"),
                ("images_per_s", "train/images_per_second"),
                ("lr", "train/learning_rate"),
                ("eta_s", "train/eta_seconds"),
            ]
        } else {
            continue;
        };
        for (key, tag) in pairs {
            if let Some(v) = f.get(*key).and_then(|v| v.parse::<f64>().ok()) {
                logged.entry(tag).or_default().insert(step, v);
            }
        }
    }
    // The validation line has no step: it follows the epoch's last step (46 here).
    let val = out
        .lines()
        .rfind(|l| l.contains(" validation ") && l.contains("epoch=1 "))
        .map(fields)
        .unwrap_or_else(|| panic!("no validation logged:\n{out}"));

    let scalars = read_scalars(&run.join("tensorboard"));
    let mut tags: Vec<&str> = logged.keys().copied().collect();
    tags.extend([
        "validation/loss",
        "validation/top1_error",
        "validation/top5_error",
        "epoch/train_loss",
        "epoch/seconds",
        "epoch/images_per_second",
    ]);
    for rank in 0..2 {
        for what in [
            "column_share",
            "replica_share",
            "column_bytes_per_step",
            "replica_bytes_per_step",
        ] {
            tags.push(Box::leak(
                format!("exchange/rank{rank}/{what}").into_boxed_str(),
            ));
        }
    }
    for tag in &tags {
        let points = scalars
            .get(*tag)
            .unwrap_or_else(|| panic!("no {tag} in {:?}", scalars.keys()));
        assert!(
            points.windows(2).all(|w| w[0].0 < w[1].0),
            "{tag}: a step twice or backwards: {points:?}"
        );
    }
    for (tag, steps) in &logged {
        let got: BTreeMap<i64, f64> = scalars[*tag].iter().copied().collect();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            steps.keys().collect::<Vec<_>>(),
            "{tag}: TensorBoard's steps are not the logged ones"
        );
        for (step, want) in steps {
            let have = got[step];
            // The log rounds (4 decimals for the loss, 3 for errors, 1 for images/s, whole
            // seconds for the ETA); TensorBoard keeps f32.
            let tol = match *tag {
                "train/loss" => 6e-5,
                "train/images_per_second" => 0.051 + 1e-6 * want.abs(),
                "train/eta_seconds" => 0.51,
                "train/learning_rate" => 1e-6 * want.abs(),
                _ => 6e-4,
            };
            assert!(
                (have - want).abs() <= tol,
                "{tag} at step {step}: TensorBoard has {have}, the log says {want}"
            );
        }
    }
    let at = |tag: &str| scalars[tag].last().copied().unwrap();
    for (tag, key, tol) in [
        ("validation/loss", "val_loss", 6e-5),
        ("validation/top1_error", "val_top1_err", 6e-4),
        ("validation/top5_error", "val_top5_err", 6e-4),
        ("epoch/train_loss", "train_loss", 6e-5),
    ] {
        let (step, v) = at(tag);
        let want: f64 = val[key].parse().unwrap();
        assert_eq!(step, 46, "{tag} is not at the epoch's last step");
        assert!(
            (v - want).abs() <= tol,
            "{tag}: {v} against the log's {want}"
        );
    }
    // The column exchange moves the same bytes every training step (an interval with the
    // validation moves its activations too); a single replica moves none.
    for rank in 0..2 {
        let tag = format!("exchange/rank{rank}/column_bytes_per_step");
        let bytes: Vec<&(i64, f64)> = scalars[&tag].iter().filter(|p| p.0 <= 46).collect();
        assert!(
            bytes[0].1 > 0.0 && bytes.iter().all(|b| b.1 == bytes[0].1),
            "{tag}: {bytes:?}"
        );
    }
    assert!(scalars["exchange/rank1/replica_bytes_per_step"]
        .iter()
        .all(|p| p.1 == 0.0));
    let _ = std::fs::remove_dir_all(dir);
}

/// A live run's `/metrics`: promtool accepts it, and a real Prometheus server that scrapes it
/// answers a PromQL query for the current step.
#[test]
fn prometheus_scrapes_a_live_run() {
    if !have("promtool", Command::new("promtool").arg("--version"))
        || !have("prometheus", Command::new("prometheus").arg("--version"))
    {
        return;
    }
    let dir = scratch("prom");
    let port = free_port();
    let mut p = Proc::start(
        exe()
            .args(["launch", "--steps", "400", "--log-every", "4"])
            .args(["--metrics-listen", &port.to_string(), "--run-dir"])
            .arg(dir.join("run")),
    );
    p.wait_line(Duration::from_secs(60), |l| {
        l.contains(&format!(
            "serving Prometheus metrics at http://127.0.0.1:{port}/metrics"
        ))
    });
    p.wait_line(Duration::from_secs(90), |l| {
        l.contains(" train ") && l.contains("step=8 ")
    });

    let (head, body) = http_get(port, "/metrics", None);
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(!body.contains("token"), "{body}");
    // The launch's own agent is served beside the job.
    assert!(
        body.contains("alexnet_agent_worker_running{") && body.contains("alexnet_worker_up{"),
        "{body}"
    );
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    let (head, body) = http_get(
        port,
        "/metrics",
        Some("application/openmetrics-text; version=1.0.0"),
    );
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "{body}");

    // A Prometheus server scraping the run every second.
    let web = free_port();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: alexnet\n    \
             static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let mut server = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let body = TcpStream::connect(("127.0.0.1", web))
            .ok()
            .map(|_| http_get(web, "/api/v1/query?query=alexnet_step", None).1);
        let v: Option<serde_json::Value> = body.and_then(|b| serde_json::from_str(&b).ok());
        let result = v
            .as_ref()
            .and_then(|v| v["data"]["result"].as_array().cloned());
        if let Some(r) = result.filter(|r| !r.is_empty()) {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had alexnet_step: {v:?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let _ = server.kill();
    let _ = server.wait();
    let step: f64 = answer[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!((8.0..=400.0).contains(&step), "{answer:?}");
    assert_eq!(answer[0]["metric"]["job"], "alexnet", "{answer:?}");
    assert!(
        answer[0]["metric"]["job_id"].as_str().is_some(),
        "{answer:?}"
    );
    let _ = p.child.kill();
    let _ = p.child.wait();
    let _ = std::fs::remove_dir_all(dir);
}

/// Bad input: a taken port is an error naming it, a bad address is refused by the parser, and
/// an unwritable tensorboard/ folder costs the run nothing but a warning.
#[test]
fn a_taken_metrics_port_fails_by_name_and_an_unwritable_tensorboard_folder_only_warns() {
    let dir = scratch("bad");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = exe()
        .args(["launch", "--steps", "2", "--metrics-listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--run-dir")
        .arg(dir.join("taken"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("--metrics-listen 127.0.0.1:{port}"))
            && err.contains("another process listens there"),
        "{err}"
    );
    let out = exe()
        .args(["launch", "--steps", "2", "--metrics-listen", "somewhere"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("expected host:port"),
        "{err}"
    );

    // A file where the folder should be: the run finishes, with a warning.
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    std::fs::write(run.join("tensorboard"), b"not a folder").unwrap();
    let out = exe()
        .args(["launch", "--steps", "3", "--run-dir"])
        .arg(&run)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("TensorBoard's event files will not be written"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// The metrics the recipes in deploy/ may name (alert rules, the dashboard: checked by
/// scripts/check-deploy.py) are exactly those the exporters serve.
#[test]
fn the_recipes_name_only_metrics_that_exist() {
    use alexnet::telemetry::prometheus::*;
    let job = encode_job(&JobSnapshot {
        job_id: "j".into(),
        state: "running",
        train: Some((1.0, 0.5, Some(0.25))),
        validation: Some((1.0, 0.5, Some(0.25))),
        checkpoint_age_s: Some(1.0),
        ranks: vec![RankSnapshot::default()],
        ..Default::default()
    });
    let agent = encode_agent(&AgentSnapshot {
        workers: vec![AgentWorker::default()],
        restarts_left: Some(1),
        ..Default::default()
    });
    let served: std::collections::BTreeSet<String> = classic_text(&(job + &agent))
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect();
    // scripts/check-deploy.py holds every recipe (rules, dashboard, scrape configuration) to
    // its list of names; the list is the exporters' own.
    let script = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/check-deploy.py"
    ))
    .unwrap();
    let start = script
        .find("\nMETRICS = {")
        .expect("METRICS in check-deploy.py");
    let block = &script[start..start + script[start..].find("\n}").unwrap()];
    let listed: std::collections::BTreeSet<String> = block
        .lines()
        .filter_map(|l| l.trim().strip_prefix('"'))
        .filter_map(|l| l.split('"').next())
        .map(str::to_string)
        .collect();
    assert_eq!(
        listed, served,
        "check-deploy.py's METRICS and the exporters' metrics differ"
    );
}

/// `status --watch` follows a live run frame by frame and ends when the run does.
#[test]
fn status_watch_follows_the_run_to_its_end() {
    let dir = scratch("watch");
    let run = dir.join("run");
    let mut p = Proc::start(
        exe()
            .args(["launch", "--steps", "40", "--log-every", "2", "--run-dir"])
            .arg(&run),
    );
    p.wait_line(Duration::from_secs(90), |l| {
        l.contains(" train ") && l.contains("step=2 ")
    });
    let watch = exe()
        .args(["status", "--watch", "--interval", "1", "--run"])
        .arg(&run)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&watch.stdout);
    assert!(
        watch.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&watch.stderr)
    );
    let frames = out.matches("redrawn every 1s").count();
    assert!(frames >= 2, "{out}");
    assert!(out.contains("ETA ") && out.contains("% "), "{out}");
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("1      0/1")),
        "no row for rank 1:\n{out}"
    );
    let last = out
        .trim_end()
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    assert!(
        out.contains("): finished")
            || last.contains("the run has ended")
            || last.contains("the job has ended (step 40 of 40)"),
        "{out}"
    );
    let (ok, log, _) = p.finish(Duration::from_secs(60));
    assert!(ok, "{log}");
    let _ = std::fs::remove_dir_all(dir);
}
