//! A run from start to finish with real processes: train, use the result (eval, predict,
//! export, import), and survive the coordinator being killed.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn exe() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_alexnet"));
    c.env("NO_COLOR", "1").env_remove("RUST_LOG");
    c
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("alexnet-run-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs to completion; returns (stdout, stderr), asserting success.
fn run_ok(cmd: &mut Command) -> (String, String) {
    let out = cmd.output().unwrap();
    let (so, se) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{se}");
    (so, se)
}

fn tensors(path: &Path) -> std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    alexnet::train::checkpoint::read_tensors(&bytes, path).unwrap()
}

#[test]
fn a_trained_run_evaluates_predicts_exports_and_seeds_another() {
    let dir = scratch("use");
    let run = dir.join("run");
    run_ok(
        exe()
            .args(["launch", "--epochs", "3", "--run-dir"])
            .arg(&run),
    );
    // The report: a row per epoch, and the chart.
    let csv = std::fs::read_to_string(run.join("report.csv")).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(std::fs::read_to_string(run.join("report.svg"))
        .unwrap()
        .contains("<polyline"));
    let png = image::open(run.join("report.png")).unwrap();
    assert!(png.width() > 0 && png.height() > 0);

    // Well below chance (0.9 top-1 error on 10 classes) after 3 epochs of the demo.
    let (out, _) = run_ok(exe().args(["eval", "--run"]).arg(&run));
    let err: f64 = out
        .split("top-1 error ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(err < 0.6, "top-1 error {err} after 3 epochs:\n{out}");
    let (_, err_text) = {
        let o = exe()
            .args(["eval", "--ten-crop", "--run"])
            .arg(&run)
            .output()
            .unwrap();
        assert!(!o.status.success());
        (
            String::new(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert!(
        err_text.contains("--ten-crop needs prepared data"),
        "{err_text}"
    );

    // Predict: a training image of the sample, written as a PNG.
    let set = alexnet::data::idx::read_fashion_mnist_dir(Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/sample/fashion-mnist"
    )))
    .unwrap()
    .0;
    let png = dir.join("item.png");
    image::GrayImage::from_raw(28, 28, set.image(0).to_vec())
        .unwrap()
        .save(&png)
        .unwrap();
    let (out, _) = run_ok(exe().args(["predict", "--run"]).arg(&run).arg(&png));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 6, "{out}");
    let probs: Vec<f32> = lines[1..]
        .iter()
        .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(probs.windows(2).all(|w| w[0] >= w[1]) && probs.iter().sum::<f32>() <= 1.0001);
    assert!(
        alexnet::train::sample::FASHION_MNIST_CLASSES
            .iter()
            .any(|c| lines[1].contains(c)),
        "{out}"
    );

    // Export: unsplit, PyTorch names and shapes; a new run imports it exactly.
    let exported = dir.join("exported.safetensors");
    run_ok(
        exe()
            .args(["export", "--run"])
            .arg(&run)
            .arg("--out")
            .arg(&exported),
    );
    let t = tensors(&exported);
    assert_eq!(t["conv1.weight"].0, vec![32, 1, 11, 11]);
    assert_eq!(
        t["conv2.weight"].0,
        vec![64, 16, 5, 5],
        "grouped: [out, in / 2, k, k]"
    );
    assert_eq!(t["fc8.weight"].0, vec![10, 256]);
    let seeded = dir.join("seeded");
    run_ok(
        exe()
            .args(["train", "--steps", "1", "--lr", "1e-30", "--momentum", "0"])
            .args(["--weight-decay", "0", "--init"])
            .arg(&exported)
            .arg("--out")
            .arg(&seeded),
    );
    let col1 = tensors(&seeded.join("column1.safetensors"));
    let (shape, values) = &col1["conv3.weight"];
    let whole = &t["conv3.weight"].1;
    let half = values.len();
    assert_eq!(shape[0] * 2, t["conv3.weight"].0[0]);
    assert_eq!(
        &whole[half..],
        &values[..],
        "column 1 holds the second half of the rows"
    );
}

#[test]
fn a_killed_coordinator_is_resumed_and_the_run_finishes_as_if_uninterrupted() {
    let dir = scratch("coordinator");
    let run = dir.join("run");
    let mut child = exe()
        .args([
            "launch",
            "--steps",
            "40",
            "--checkpoint-every",
            "4",
            "--log-every",
            "1",
        ])
        .args(["--max-restarts", "0", "--peer-timeout", "5", "--run-dir"])
        .arg(&run)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(l);
        }
    });
    let mut pids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let l = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .expect("the run did not reach its second checkpoint");
        if l.contains("worker joined") {
            pids.push(
                l.split("pid=")
                    .nth(1)
                    .unwrap()
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .to_string(),
            );
        }
        if l.contains("checkpoint complete step=8") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    // The workers notice that the coordinator is gone and stop.
    let gone = |pid: &str| {
        !Command::new("kill")
            .args(["-0", pid])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let t = Instant::now();
    while !pids.iter().all(|p| gone(p)) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "workers outlived their coordinator"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, out) = run_ok(exe().args(["launch", "--resume"]).arg(&run));
    assert!(out.contains("resuming step="), "{out}");
    let straight = dir.join("straight");
    run_ok(
        exe()
            .args([
                "launch",
                "--steps",
                "40",
                "--checkpoint-every",
                "4",
                "--run-dir",
            ])
            .arg(&straight),
    );
    let a = alexnet::train::checkpoint::latest(&run, None)
        .unwrap()
        .unwrap();
    let b = alexnet::train::checkpoint::latest(&straight, None)
        .unwrap()
        .unwrap();
    assert_eq!((a.1.step, b.1.step), (40, 40));
    for c in 0..2 {
        let name = alexnet::train::checkpoint::shard_name(c);
        assert!(
            std::fs::read(a.0.join(&name)).unwrap() == std::fs::read(b.0.join(&name)).unwrap(),
            "column {c} differs from the uninterrupted run"
        );
    }
}
