//! The command line on bad input: clear errors that name the thing, and a non-zero exit.

use std::process::Command;

fn alexnet(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("alexnet-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_network_that_cannot_be_split_is_refused_by_field() {
    let path = temp_file("odd.toml", "conv_channels = [96, 255, 384, 384, 256]\n");
    let (ok, err) = alexnet(&["bench", "--backend", "cpu", "--net", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("conv_channels[1] (conv2)") && err.contains("two equal columns"),
        "{err}"
    );
}

#[test]
fn unknown_configuration_fields_are_refused() {
    let path = temp_file("typo.toml", "clases = 10\n");
    let (ok, err) = alexnet(&["bench", "--backend", "cpu", "--net", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("clases"), "{err}");
}

#[test]
fn a_missing_data_folder_is_named() {
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--data",
        "/nonexistent/fashion",
    ]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/fashion"), "{err}");
}

/// Without a driver and a GPU, every way of asking for CUDA is a clear error, never a panic;
/// `auto` takes the CPU and says why.
#[cfg(feature = "cuda")]
#[test]
fn cuda_without_a_gpu_fails_cleanly() {
    if alexnet::backend::cuda::unavailable().is_none() {
        eprintln!("a GPU is present: the failure path is not reachable here");
        return;
    }
    for args in [
        &[
            "bench",
            "--backend",
            "cuda",
            "--net",
            "demo",
            "--batch",
            "2",
        ][..],
        &["train", "--backend", "cuda", "--steps", "1"],
        &["selftest", "--backend", "cuda"],
        &["launch", "--backend", "cuda", "--steps", "1"],
        &[
            "worker",
            "--coordinator",
            "http://127.0.0.1:9",
            "--device",
            "cuda:0",
        ],
        &[
            "agent",
            "--coordinator",
            "http://127.0.0.1:9",
            "--device",
            "cuda",
        ],
    ] {
        let (ok, err) = alexnet(args);
        assert!(!ok, "{args:?} succeeded without a GPU");
        assert!(
            (err.contains("cannot start") || err.contains("no usable GPU"))
                && err.contains("cpu")
                && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    let (ok, err) = alexnet(&["bench", "--net", "demo", "--batch", "2", "--steps", "1"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("backend auto") && err.contains("taking the CPU"),
        "{err}"
    );
}

/// `selftest` on the CPU (what `auto` takes without a GPU): the ops against a single thread,
/// PyTorch's golden vectors compiled into the binary, the network, and a short job in two
/// worker processes over TCP against one process, every check passed.
#[test]
fn selftest_on_the_cpu_checks_golden_vectors_and_two_processes() {
    let out = Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args(["selftest", "--backend", "cpu", "--json", "--seed", "5"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["failed"], 0, "{report}");
    let checks = report["checks"].as_array().unwrap();
    let named = |prefix: &str| {
        checks
            .iter()
            .filter(|c| c["what"].as_str().unwrap().starts_with(prefix))
            .count()
    };
    assert_eq!(named("golden "), 27, "{report}");
    assert_eq!(named("two worker processes over TCP (cpu)"), 2, "{report}");
    assert!(named("network step") > 10, "{report}");
}

#[test]
fn a_batch_that_the_replicas_cannot_share_is_refused_before_any_work() {
    let (ok, err) = alexnet(&["launch", "--batch", "63", "--replicas", "2"]);
    assert!(!ok);
    assert!(
        err.contains("batch 63 cannot be split evenly over 2 replicas"),
        "{err}"
    );
}

#[test]
fn a_batch_larger_than_the_training_set_is_refused() {
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--batch",
        "5000",
        "--epochs",
        "1",
    ]);
    assert!(!ok);
    assert!(err.contains("--batch 5000"), "{err}");
}

#[test]
fn prepare_then_train_on_the_prepared_photographs() {
    let dir = std::env::temp_dir().join(format!("alexnet-cli-{}-prepared", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let photos = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample/imagenet-photos");
    let out = dir.join("prepared");
    let (ok, err) = alexnet(&[
        "prepare",
        "--input",
        photos,
        "--output",
        out.to_str().unwrap(),
        "--shard-images",
        "8",
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("prepared images=20"), "{err}");
    let (ok, err) = alexnet(&["train", "--backend", "cpu", "--data", out.to_str().unwrap()]);
    assert!(
        !ok && err.contains("--val"),
        "prepared data without --val: {err}"
    );
    let net = temp_file(
        "tiny.toml",
        "conv_channels = [8, 16, 16, 16, 8]\nfc_widths = [16, 16]\nclasses = 20\n",
    );
    let args = [
        "train",
        "--backend",
        "cpu",
        "--data",
        out.to_str().unwrap(),
        "--val",
        out.to_str().unwrap(),
    ];
    let (ok, err) = alexnet(
        &[
            &args[..],
            &[
                "--net",
                net.to_str().unwrap(),
                "--batch",
                "4",
                "--epochs",
                "1",
                "--run-dir",
                dir.join("run").to_str().unwrap(),
            ],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert!(err.contains("validation epoch=1"), "{err}");
    let run = dir.join("run");
    let run = run.to_str().unwrap();

    // Views finished by the backend from bytes (what a GPU does) train the same bits as views
    // finished by the loader.
    let columns = |augment_on: &str| -> Vec<Vec<u8>> {
        let out = dir.join(format!("columns-{augment_on}"));
        let (ok, err) = alexnet(
            &[
                &args[..],
                &[
                    "--net",
                    net.to_str().unwrap(),
                    "--batch",
                    "4",
                    "--steps",
                    "3",
                    "--augment-on",
                    augment_on,
                    "--out",
                    out.to_str().unwrap(),
                ],
            ]
            .concat(),
        );
        assert!(ok, "{err}");
        let want = if augment_on == "device" {
            "bytes, finished by the backend"
        } else {
            "finished by the loader"
        };
        assert!(err.contains(want), "{augment_on}: {err}");
        (0..2)
            .map(|c| std::fs::read(out.join(format!("column{c}.safetensors"))).unwrap())
            .collect()
    };
    let (host, device) = (columns("host"), columns("device"));
    assert!(
        host == device,
        "parameters differ between --augment-on host and device"
    );

    // The paper's ten patches, averaged.
    let out = Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args(["eval", "--ten-crop", "--batch", "4", "--run", run])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("on 20 images (ten patches)"), "{text}");

    // Predictions are named by the class folders.
    let photo = format!("{photos}/129/imagenet_14_129.jpg");
    let out = Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args(["predict", "--run", run, &photo])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.lines().count(), 6, "{text}");
    assert!(text.lines().nth(1).unwrap().contains('('), "{text}");

    // A dataset with other classes is refused before any work.
    let subset = dir.join("subset");
    for class in ["129", "22"] {
        copy_class(std::path::Path::new(&format!("{photos}/{class}")), &subset);
    }
    let prepared_subset = dir.join("prepared-subset");
    let (ok, err) = alexnet(&[
        "prepare",
        "--input",
        subset.to_str().unwrap(),
        "--output",
        prepared_subset.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, err) = alexnet(&[
        "eval",
        "--run",
        run,
        "--data",
        prepared_subset.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("differ from the run's"), "{err}");

    // The dataset moves: the run keeps what predicting needs, and eval names what is gone.
    let before = Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args(["predict", "--run", run, &photo])
        .output()
        .unwrap()
        .stdout;
    let prepared = dir.join("prepared");
    let moved = dir.join("prepared-moved");
    std::fs::rename(&prepared, &moved).unwrap();
    let (ok, after, err) = alexnet_out(&["predict", "--run", run, &photo], &[]);
    assert!(ok, "{err}");
    assert_eq!(
        after,
        String::from_utf8_lossy(&before),
        "predictions changed"
    );
    let (ok, err) = alexnet(&["eval", "--run", run, "--batch", "4"]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "the run's validation data at {} is gone",
            prepared.display()
        )) && err.contains("pass --data DIR"),
        "{err}"
    );
    let (ok, _, err) = alexnet_out(
        &[
            "eval",
            "--run",
            run,
            "--batch",
            "4",
            "--data",
            moved.to_str().unwrap(),
        ],
        &[],
    );
    assert!(ok, "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A run on IDX files predicts from its run folder alone once its data has moved; what needs
/// the data itself says that it is gone.
#[test]
fn a_run_on_idx_files_predicts_after_its_data_moves() {
    let dir = scratch("idx-moved");
    let data = dir.join("images");
    std::fs::create_dir_all(&data).unwrap();
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample/fashion-mnist");
    for f in std::fs::read_dir(sample).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, data.join(f.file_name().unwrap())).unwrap();
        }
    }
    let run = dir.join("run");
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "2",
        "--data",
        data.to_str().unwrap(),
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(run.join("input.json").is_file() && run.join("input-mean.bin").is_file());
    let photo = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/sample/imagenet-photos/990/imagenet_03_990.jpg"
    );
    let (ok, before, err) = alexnet_out(&["predict", "--run", run.to_str().unwrap(), photo], &[]);
    assert!(ok, "{err}");
    std::fs::rename(&data, dir.join("elsewhere")).unwrap();
    let (ok, after, err) = alexnet_out(&["predict", "--run", run.to_str().unwrap(), photo], &[]);
    assert!(ok, "{err}");
    assert_eq!(before, after);
    let (ok, err) = alexnet(&["eval", "--run", run.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains(&format!("the run's dataset at {} is gone", data.display())),
        "{err}"
    );
}

/// `bench --upload` times steps that upload their input as bytes, beside the timed steps, and
/// refuses a grey network (the views travel as colour bytes) before any step.
#[test]
fn bench_times_steps_that_upload_their_input() {
    let path = temp_file(
        "colour.toml",
        "input_size = 64\nin_channels = 3\nconv_channels = [8, 16, 16, 16, 8]\n\
         fc_widths = [16, 16]\nclasses = 10\n",
    );
    let out = Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args(["bench", "--backend", "cpu", "--net", path.to_str().unwrap()])
        .args(["--batch", "4", "--steps", "2", "--upload", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let uploading = report["uploading_images_per_s"].as_f64();
    assert!(uploading.is_some_and(|v| v > 0.0), "{report}");
    assert!(
        err.contains("steps uploading their input as bytes"),
        "{err}"
    );

    let (ok, err) = alexnet(&["bench", "--backend", "cpu", "--net", "demo", "--upload"]);
    assert!(!ok);
    assert!(
        err.contains("--upload") && err.contains("3 input channels") && !err.contains("timed step"),
        "{err}"
    );
}

/// `bench` on the CPU measures the FMA peak of every SIMD level the CPU runs and states the
/// step's and each multiply-add layer's GFLOP/s as fractions of it, beside the fields it had.
#[test]
fn bench_states_its_speed_as_fractions_of_the_measured_peak() {
    let out = Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args(["bench", "--backend", "cpu", "--net", "demo"])
        .args(["--batch", "2", "--steps", "1", "--warmup", "0", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in ["images_per_s", "gflop_per_s", "step_ms", "fraction_of_peak"] {
        assert!(r[field].as_f64().is_some_and(|v| v > 0.0), "{field}: {r}");
    }
    assert!(
        r["cpu_model"].as_str().is_some_and(|m| !m.is_empty()),
        "{r}"
    );
    let peak = &r["peak"];
    let levels = peak["levels"].as_array().unwrap();
    assert!(!levels.is_empty(), "{r}");
    assert!(levels
        .iter()
        .all(|l| l["gflop_per_s"].as_f64().is_some_and(|v| v > 0.0)));
    assert_eq!(levels[0]["level"], peak["kernels"], "{r}");
    assert_eq!(levels.last().unwrap()["level"], "portable", "{r}");
    let layer = |name: &str| {
        let layers = r["layers"].as_array().unwrap();
        layers.iter().find(|l| l["layer"] == name).unwrap().clone()
    };
    for name in ["conv1", "conv3", "fc6", "fc8"] {
        let l = layer(name);
        assert!(l["share"].as_f64().is_some(), "{l}");
        for field in [
            "forward_gflop_per_s",
            "backward_gflop_per_s",
            "forward_fraction_of_peak",
            "backward_fraction_of_peak",
        ] {
            assert!(
                l[field].as_f64().is_some_and(|v| v > 0.0),
                "{name} {field}: {l}"
            );
        }
    }
    for name in ["lrn1", "pool1", "sgd"] {
        let l = layer(name);
        assert!(
            l["forward_gflop_per_s"].is_null() && l["backward_fraction_of_peak"].is_null(),
            "{l}"
        );
    }
}

/// A fresh scratch folder of this test process.
fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("alexnet-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `train --run-dir` on a folder that holds a run refuses, as `launch` does, instead of
/// mixing two runs' checkpoints; `--resume` continues it.
#[test]
fn train_into_a_folder_that_holds_a_run_is_refused() {
    let dir = scratch("rerun").join("run");
    let run = dir.to_str().unwrap();
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "2",
        "--run-dir",
        run,
    ]);
    assert!(ok, "{err}");
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "2",
        "--run-dir",
        run,
    ]);
    assert!(!ok);
    assert!(
        err.contains("already holds checkpoints of a run")
            && err.contains(&format!("--resume {run}")),
        "{err}"
    );
    let (ok, err) = alexnet(&["train", "--backend", "cpu", "--steps", "3", "--resume", run]);
    assert!(ok, "{err}");
}

/// A resume refuses the flags it cannot honour, by name, instead of running on the run's own.
#[test]
fn a_resume_refuses_flags_it_cannot_change() {
    let dir = scratch("resume-flags").join("run");
    let run = dir.to_str().unwrap();
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "2",
        "--run-dir",
        run,
    ]);
    assert!(ok, "{err}");
    for cmd in ["train", "launch"] {
        let (ok, err) = alexnet(&[
            cmd, "--resume", run, "--batch", "32", "--lr", "0.5", "--net", "paper",
        ]);
        assert!(!ok, "{cmd}: {err}");
        assert!(
            err.contains("--net, --batch, --lr cannot change")
                && err.contains("only --epochs, --steps and --checkpoint-every"),
            "{cmd}: {err}"
        );
    }
}

/// `launch` checks the data and an `--init` file itself, before any worker starts: one
/// error, no restarts.
#[test]
fn launch_checks_data_and_init_before_any_worker_starts() {
    let dir = scratch("launch-inputs");
    let (ok, err) = alexnet(&[
        "launch",
        "--data",
        "/nonexistent/images",
        "--run-dir",
        dir.join("a").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/images"), "{err}");
    assert!(
        !err.contains("[rank") && !err.contains("restarting"),
        "workers were started:\n{err}"
    );
    // Parameters of the demo network, offered to a narrower one.
    let run = dir.join("demo");
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "1",
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let file = dir.join("demo.safetensors");
    let (ok, err) = alexnet(&[
        "export",
        "--run",
        run.to_str().unwrap(),
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let narrow = temp_file(
        "narrow.toml",
        "input_size = 64\nin_channels = 1\nconv_channels = [16, 32, 48, 48, 32]\n\
         fc_widths = [128, 128]\nclasses = 10\n",
    );
    let (ok, err) = alexnet(&[
        "launch",
        "--net",
        narrow.to_str().unwrap(),
        "--init",
        file.to_str().unwrap(),
        "--run-dir",
        dir.join("b").to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains("parameter conv1.weight has shape [32, 1, 11, 11], this network expects [16, 1, 11, 11]")
            && err.contains("pass the same --net"),
        "{err}"
    );
    assert!(!err.contains("[rank"), "workers were started:\n{err}");
}

/// `train` checks where its parameters go before the first step, and its last line says what
/// was kept; checkpoints without a run folder are called out.
#[test]
fn train_checks_its_output_first_and_says_what_it_kept() {
    let dir = scratch("train-out");
    let file = dir.join("a-file");
    std::fs::write(&file, b"").unwrap();
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "1",
        "--out",
        file.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("is a file: --out names a folder"), "{err}");
    assert!(!err.contains(" train "), "it trained first:\n{err}");
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "1",
        "--checkpoint-every",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("--checkpoint-every needs a run folder"),
        "{err}"
    );
    assert!(err.contains("nothing kept: pass --run-dir DIR"), "{err}");
    let out = dir.join("params");
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("parameters in {}", out.display())),
        "{err}"
    );
}

/// `status` names the ways to give it a token, not a worker's.
#[test]
fn status_without_a_token_names_its_own_flags() {
    let dir = scratch("status-token").join("run");
    let mut launch = Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args([
            "launch",
            "--steps",
            "400",
            "--run-dir",
            dir.to_str().unwrap(),
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let address = dir.join("coordinator");
    let t = std::time::Instant::now();
    while !address.exists() && t.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let url = std::fs::read_to_string(&address).unwrap();
    let (ok, err) = alexnet(&["status", "--coordinator", url.trim()]);
    let _ = launch.kill();
    let _ = launch.wait();
    assert!(!ok);
    assert!(
        err.contains("pass --token-file FILE or set ALEXNET_TOKEN")
            && err.contains("alexnet status --run RUN_DIR")
            && !err.contains("give the worker"),
        "{err}"
    );
}

/// The same run as `alexnet` with `args`, with its stdout too.
fn alexnet_out(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_alexnet"))
        .args(args)
        .envs(env.iter().copied())
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A job file with a few fields takes the rest from the job that fits its data (the demo's
/// for IDX files); a channel mismatch names the field to change.
#[test]
fn a_partial_job_file_takes_the_defaults_of_its_data() {
    let lr = temp_file("lr.toml", "[sgd]\nlr = 0.05\n");
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "1",
        "--config",
        lr.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("lr=0.05"), "{err}");
    let rgb = temp_file("rgb.toml", "[net]\nin_channels = 3\n");
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "1",
        "--config",
        rgb.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(err.contains("set `in_channels = 1` under [net]"), "{err}");
}

/// `predict` on several files prints each good one's classes, then names the bad ones and
/// exits non-zero.
#[test]
fn predict_reports_the_good_files_and_names_the_bad_ones() {
    let dir = scratch("predict");
    let run = dir.join("run");
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "1",
        "--run-dir",
        run.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let bad = dir.join("broken.jpg");
    std::fs::write(&bad, b"this is not a JPEG").unwrap();
    let good = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/sample/imagenet-photos/990/imagenet_03_990.jpg"
    );
    let (ok, out, err) = alexnet_out(
        &[
            "predict",
            "--run",
            run.to_str().unwrap(),
            bad.to_str().unwrap(),
            good,
            "--top",
            "2",
        ],
        &[],
    );
    assert!(!ok, "{out}{err}");
    assert!(
        out.contains("imagenet_03_990.jpg") && out.lines().count() == 3,
        "{out}"
    );
    assert!(
        err.contains("1 of 2 images could not be classified") && err.contains("broken.jpg"),
        "{err}"
    );
    let (ok, err) = alexnet(&[
        "predict",
        "--run",
        run.to_str().unwrap(),
        good,
        "--top",
        "0",
    ]);
    assert!(!ok && err.contains("--top"), "{err}");
}

/// `--dry-run` makes the checks of a real start and prints the job it would run.
#[test]
fn a_dry_run_checks_what_a_start_checks() {
    let (ok, err) = alexnet(&["--dry-run", "train", "--batch", "0"]);
    assert!(
        !ok && err.contains("'--batch <BATCH>'") && err.contains("at least 1"),
        "{err}"
    );
    let (ok, err) = alexnet(&["--dry-run", "train", "--data", "/nonexistent/data"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/data (named by --data)"), "{err}");
    let (ok, out, err) = alexnet_out(
        &["--dry-run", "launch", "--steps", "3", "--lr", "0.02"],
        &[],
    );
    assert!(ok, "{err}");
    assert!(
        out.contains("the job, resolved")
            && out.contains("\"lr\": 0.02")
            && out.contains("nothing was started"),
        "{out}"
    );
}

/// Elastic replica ranges that cannot run are refused before anything starts, by name.
#[test]
fn elastic_replica_ranges_that_cannot_run_are_refused() {
    let (ok, err) = alexnet(&["--dry-run", "coordinator", "--replicas", "3:2"]);
    assert!(
        !ok && err.contains("'--replicas <N|MIN:MAX>'")
            && err.contains("the smallest count (3) is above the largest (2)"),
        "{err}"
    );
    let (ok, err) = alexnet(&["--dry-run", "coordinator", "--replicas", "100:128"]);
    assert!(
        !ok && err.contains("batch 64 cannot give each of 100 replicas"),
        "{err}"
    );
    let (ok, err) = alexnet(&["--dry-run", "coordinator", "--replicas", "3:4"]);
    assert!(
        !ok && err.contains("batch 64 cannot be split evenly over 3 replicas")
            && err.contains("a multiple of 12"),
        "{err}"
    );
    let (ok, out, err) = alexnet_out(
        &[
            "--dry-run",
            "coordinator",
            "--replicas",
            "3:4",
            "--batch",
            "48",
        ],
        &[],
    );
    assert!(ok && out.contains("\"elastic\""), "{out}{err}");
    let (ok, err) = alexnet(&["--dry-run", "launch", "--replicas", "2:4"]);
    assert!(
        !ok && err.contains("elastic replicas are for jobs across hosts"),
        "{err}"
    );
}

/// Errors name the flag or the variable the value came from.
#[test]
fn errors_name_the_flag_or_variable_used() {
    let (ok, err) = alexnet(&["train", "--batch", "0"]);
    assert!(
        !ok && err.contains("'--batch <BATCH>'") && !err.contains("job `demo`"),
        "{err}"
    );
    for flag in ["--epochs", "--batch"] {
        let (ok, err) = alexnet(&["train", flag, "0"]);
        assert!(
            !ok && err.contains(flag) && err.contains("at least 1"),
            "{err}"
        );
    }
    let (ok, _, err) = alexnet_out(
        &["train", "--backend", "cpu"],
        &[("ALEXNET_DATA", "/bad/data")],
    );
    assert!(!ok);
    assert!(err.contains("/bad/data (named by ALEXNET_DATA)"), "{err}");
}

/// JSON logs carry numbers as numbers; the resume line reads `lr=0.01`; a launch ends with one
/// summary line with the loss and where the results are.
#[test]
fn logs_carry_numbers_and_runs_end_with_a_summary() {
    let (ok, _, err) = alexnet_out(
        &[
            "--log-format",
            "json",
            "train",
            "--backend",
            "cpu",
            "--steps",
            "2",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let train: serde_json::Value = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["fields"]["message"] == "train")
        .unwrap_or_else(|| panic!("no train line in:\n{err}"));
    for field in ["loss", "top1_err", "images_per_s", "lr", "eta_s"] {
        assert!(train["fields"][field].is_number(), "{field} in {train}");
    }
    let dir = scratch("summary");
    let run = dir.join("run");
    let (ok, err) = alexnet(&["launch", "--steps", "3", "--run-dir", run.to_str().unwrap()]);
    assert!(ok, "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.contains("done")
            && last.contains("loss=")
            && last.contains("steps=3")
            && last.contains(&format!("checkpoints and report in {}", run.display())),
        "{last}"
    );
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "2",
        "--run-dir",
        dir.join("t").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--steps",
        "3",
        "--resume",
        dir.join("t").to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("resuming step=2 lr=0.01 "), "{err}");
}

/// Every flag says what it is, and each command's help shows examples.
#[test]
fn help_describes_every_flag_and_shows_examples() {
    let (ok, out, _) = alexnet_out(&["train", "--help"], &[]);
    assert!(ok);
    assert!(
        out.contains("--momentum <MOMENTUM>\n          SGD momentum"),
        "{out}"
    );
    assert!(
        out.contains("--weight-decay <WEIGHT_DECAY>\n          L2 penalty"),
        "{out}"
    );
    for cmd in [
        "train",
        "launch",
        "prepare",
        "predict",
        "eval",
        "status",
        "bench",
        "worker",
        "agent",
        "coordinator",
        "export",
    ] {
        let (ok, out, _) = alexnet_out(&[cmd, "--help"], &[]);
        assert!(ok && out.contains("Examples:\n  alexnet "), "{cmd}: {out}");
    }
}

/// A `prepare` that fails leaves no empty output behind, and says its decoder's error once.
#[test]
fn a_failed_prepare_leaves_no_empty_output_and_says_its_error_once() {
    let dir = scratch("strict");
    let class = dir.join("in").join("a");
    std::fs::create_dir_all(&class).unwrap();
    std::fs::write(class.join("bad.jpg"), b"\xff\xd8\xff\xe0garbage").unwrap();
    let photo = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/data/sample/imagenet-photos/990/imagenet_03_990.jpg"
    );
    std::fs::copy(photo, class.join("good.jpg")).unwrap();
    let out = dir.join("out");
    let (ok, err) = alexnet(&[
        "prepare",
        "--input",
        dir.join("in").to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
        "--strict",
        "--no-progress",
    ]);
    assert!(!ok);
    assert!(err.contains("bad.jpg") && err.contains("--strict"), "{err}");
    assert_eq!(err.matches("Not enough bytes").count(), 1, "{err}");
    assert!(!out.exists(), "an empty output was left behind");
}

/// A coordinator URL that cannot be one is refused at once, naming what is wrong, instead of
/// being retried until the connect timeout.
#[test]
fn a_coordinator_url_that_cannot_be_one_is_refused_at_once() {
    let t = std::time::Instant::now();
    let (ok, err) = alexnet(&["worker", "--coordinator", "notaurl"]);
    assert!(
        !ok && err.contains("has no scheme: write http://notaurl"),
        "{err}"
    );
    let (ok, err) = alexnet(&["worker", "--coordinator", "ftp://x"]);
    assert!(
        !ok && err.contains("the scheme must be http://") && err.contains("not ftp://"),
        "{err}"
    );
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "{:?}",
        t.elapsed()
    );
}

/// On prepared data the network's classes follow the data unless the job sets them; set, too
/// few or (without --allow-unused-classes) too many are refused by name; top-5 is not
/// reported for 5 classes or fewer.
#[test]
fn classes_follow_prepared_data() {
    let dir = scratch("classes");
    let photos =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/sample/imagenet-photos");
    let mut classes: Vec<_> = std::fs::read_dir(&photos)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    let tree = dir.join("four");
    for class in classes.iter().take(4) {
        copy_class(class, &tree);
    }
    let data = dir.join("prepared");
    let (ok, err) = alexnet(&[
        "prepare",
        "--input",
        tree.to_str().unwrap(),
        "--output",
        data.to_str().unwrap(),
        "--no-progress",
    ]);
    assert!(ok, "{err}");
    let d = data.to_str().unwrap();
    let net = |name: &str, classes: &str| {
        temp_file(
            name,
            &format!("conv_channels = [8, 16, 16, 16, 8]\nfc_widths = [16, 16]\n{classes}"),
        )
    };
    let free = net("free.toml", "");
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--data",
        d,
        "--val",
        d,
        "--net",
        free.to_str().unwrap(),
        "--batch",
        "2",
        "--epochs",
        "1",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("the network's classes follow the data") && err.contains("classes=4"),
        "{err}"
    );
    assert!(
        err.contains("chance_top1_err=0.75") && !err.contains("top5_err"),
        "{err}"
    );
    let two = net("two.toml", "classes = 2\n");
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--data",
        d,
        "--val",
        d,
        "--net",
        two.to_str().unwrap(),
        "--batch",
        "2",
        "--steps",
        "1",
    ]);
    assert!(
        !ok && err.contains("the network has 2 classes")
            && err.contains("has 4: set `classes = 4`"),
        "{err}"
    );
    let many = net("many.toml", "classes = 10\n");
    let args = [
        "train",
        "--backend",
        "cpu",
        "--data",
        d,
        "--val",
        d,
        "--net",
        many.to_str().unwrap(),
        "--batch",
        "2",
        "--steps",
        "1",
    ];
    let (ok, err) = alexnet(&args);
    assert!(
        !ok && err.contains("6 outputs would never be trained")
            && err.contains("--allow-unused-classes"),
        "{err}"
    );
    let (ok, err) = alexnet(&[&args[..], &["--allow-unused-classes"]].concat());
    assert!(ok, "{err}");
}

/// Copies the class folder `class` (its images) into the tree `tree`, under the same name.
fn copy_class(class: &std::path::Path, tree: &std::path::Path) {
    let to = tree.join(class.file_name().unwrap());
    std::fs::create_dir_all(&to).unwrap();
    for f in std::fs::read_dir(class).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
    }
}

/// Images the tests make: `per_class` 24x24 PNGs in each class folder, each class its own
/// colour, each image its own shade.
fn made_tree(dir: &std::path::Path, classes: &[&str], per_class: usize) {
    for (c, class) in classes.iter().enumerate() {
        std::fs::create_dir_all(dir.join(class)).unwrap();
        for i in 0..per_class {
            let colour = [(60 * c) as u8, (10 * i) as u8, (200 - 40 * c) as u8];
            image::RgbImage::from_fn(24, 24, |x, y| {
                let t = ((x + y) % 7) as u8 * 3;
                image::Rgb(colour.map(|v| v.saturating_add(t)))
            })
            .save(dir.join(class).join(format!("{class}{i:02}.png")))
            .unwrap();
        }
    }
}

/// The tensors of a safetensors file, by name.
fn tensors(path: &std::path::Path) -> std::collections::BTreeMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, t)| {
            let values = t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (name, values)
        })
        .collect()
}

/// Fine-tuning: a run on the photographs (20 classes), exported, starts a run on a folder of
/// four classes split by `prepare --val-fraction`; fc8 must be drawn afresh (refused without
/// --reinit, naming it), every other layer starts exactly as exported, frozen layers stay so
/// while the rest train, and another mismatch is refused by name. Then `eval --confusion`
/// and `predict` on a folder.
#[test]
fn fine_tuning_an_exported_run_on_a_split_folder_of_four_classes() {
    let dir = scratch("fine-tune");
    let d = |p: &str| dir.join(p).to_str().unwrap().to_string();
    let photos = concat!(env!("CARGO_MANIFEST_DIR"), "/data/sample/imagenet-photos");
    let net = temp_file(
        "fine-tune-net.toml",
        "input_size = 63\nconv_channels = [8, 16, 16, 16, 8]\nfc_widths = [16, 16]\n",
    );
    let net = net.to_str().unwrap();
    let (ok, err) = alexnet(&[
        "prepare",
        "--input",
        photos,
        "--output",
        &d("photos"),
        "--side",
        "72",
        "--no-progress",
    ]);
    assert!(ok, "{err}");
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--data",
        &d("photos"),
        "--val",
        &d("photos"),
        "--net",
        net,
        "--batch",
        "4",
        "--steps",
        "2",
        "--run-dir",
        &d("base"),
    ]);
    assert!(ok, "{err}");
    let (ok, err) = alexnet(&[
        "export",
        "--run",
        &d("base"),
        "--out",
        &d("base.safetensors"),
    ]);
    assert!(ok, "{err}");

    made_tree(&dir.join("mine"), &["ant", "bee", "cow", "dog"], 8);
    let (ok, err) = alexnet(&[
        "prepare",
        "--input",
        &d("mine"),
        "--output",
        &d("mine-prepared"),
        "--side",
        "72",
        "--val-fraction",
        "0.25",
        "--no-progress",
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("split; validation images per class: ant ") && err.contains("--val"),
        "{err}"
    );
    let (train, val) = (d("mine-prepared/train"), d("mine-prepared/val"));
    let tune = |extra: &[&str]| {
        alexnet(
            &[
                &[
                    "train",
                    "--backend",
                    "cpu",
                    "--data",
                    &train,
                    "--val",
                    &val,
                    "--net",
                    net,
                    "--batch",
                    "4",
                    "--init",
                    &d("base.safetensors"),
                ][..],
                extra,
            ]
            .concat(),
        )
    };
    let (ok, err) = tune(&["--steps", "0"]);
    assert!(
        !ok && err
            .contains("parameter fc8.weight has shape [20, 16], this network expects [4, 16]")
            && err.contains("--reinit fc8"),
        "{err}"
    );
    let (ok, err) = alexnet(&["train", "--backend", "cpu", "--reinit", "fc8"]);
    assert!(!ok && err.contains("--init"), "{err}");
    let (ok, err) = tune(&["--reinit", "fc9"]);
    assert!(!ok && err.contains("`fc9` is not a layer"), "{err}");

    // Nothing trained: every layer but fc8 is the exported one, exactly.
    let (ok, err) = tune(&["--reinit", "fc8", "--steps", "0", "--out", &d("start")]);
    assert!(ok, "{err}");
    let base = tensors(&dir.join("base.safetensors"));
    let halves = |out: &str| -> std::collections::BTreeMap<String, Vec<f32>> {
        let (c0, c1) = (
            tensors(&dir.join(out).join("column0.safetensors")),
            tensors(&dir.join(out).join("column1.safetensors")),
        );
        c0.into_iter()
            .map(|(k, mut v)| {
                v.extend(&c1[&k]);
                (k, v)
            })
            .collect()
    };
    let start = halves("start");
    for (name, values) in &start {
        if name.starts_with("fc8") {
            assert_eq!(
                values.len(),
                if name.ends_with("weight") { 4 * 16 } else { 4 }
            );
        } else {
            assert_eq!(values, &base[name], "{name} is not the exported value");
        }
    }

    // conv1..conv5 frozen: they stay exactly as exported while fc6..fc8 learn.
    let (ok, err) = tune(&[
        "--reinit",
        "fc8",
        "--freeze",
        "conv1..conv5",
        "--epochs",
        "2",
        "--out",
        &d("tuned"),
        "--run-dir",
        &d("tuned-run"),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("frozen: not trained") && err.contains("validation epoch=2"),
        "{err}"
    );
    let tuned = halves("tuned");
    for (name, values) in &tuned {
        if name.starts_with("conv") {
            assert_eq!(values, &base[name], "{name}: a frozen layer moved");
        } else {
            assert_ne!(values, &start[name], "{name} did not learn");
        }
    }

    // Another mismatch is refused by name, --reinit fc8 or not.
    let wide = temp_file(
        "fine-tune-wide.toml",
        "input_size = 63\nconv_channels = [8, 16, 16, 16, 8]\nfc_widths = [32, 16]\n",
    );
    let (ok, err) = alexnet(&[
        "train",
        "--backend",
        "cpu",
        "--data",
        &train,
        "--val",
        &val,
        "--net",
        wide.to_str().unwrap(),
        "--batch",
        "4",
        "--init",
        &d("base.safetensors"),
        "--reinit",
        "fc8",
    ]);
    assert!(
        !ok && err.contains("parameter fc6.weight has shape"),
        "{err}"
    );

    // The confusion matrix: printed, and in the run folder as CSV, a row per class.
    let run = d("tuned-run");
    let (ok, out, err) = alexnet_out(&["eval", "--run", &run, "--confusion", "--batch", "4"], &[]);
    assert!(ok, "{err}");
    let val_images: usize = {
        let meta: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.join("mine-prepared/val/dataset.json")).unwrap(),
        )
        .unwrap();
        meta["images"].as_u64().unwrap() as usize
    };
    assert!(
        out.contains(&format!("on {val_images} images (centre)")),
        "{out}"
    );
    assert!(
        !out.contains("top-5"),
        "four classes have no top-5 error: {out}"
    );
    assert!(
        out.contains("true \\ predicted") && out.contains("confusion.csv"),
        "{out}"
    );
    let csv = std::fs::read_to_string(dir.join("tuned-run/confusion.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "true \\ predicted,ant,bee,cow,dog", "{csv}");
    assert_eq!(lines.len(), 5, "{csv}");
    let counted: usize = lines[1..]
        .iter()
        .flat_map(|l| l.split(',').skip(1).map(|v| v.parse::<usize>().unwrap()))
        .sum();
    assert_eq!(counted, val_images, "{csv}");

    // predict on a folder: every image under it, a line each; --json a JSON object each.
    let (ok, out, err) = alexnet_out(
        &["predict", "--run", &run, "--top", "2", &d("mine/bee")],
        &[],
    );
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 8, "{out}");
    assert!(
        out.lines()
            .all(|l| l.contains("bee") && l.split('\t').count() == 3),
        "{out}"
    );
    let (ok, out, err) = alexnet_out(&["predict", "--run", &run, "--json", &d("mine")], &[]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().count(), 32, "{out}");
    for line in out.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["file"].as_str().unwrap().ends_with(".png"));
        assert_eq!(
            v["top"].as_array().unwrap().len(),
            4,
            "four classes: {line}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `plan` asks for the step time it needs by name, refuses an odd host, and prints a
/// projection labelled as such, the ring's bytes per rank growing to 2 (R - 1) / R of a column's
/// gradients (122 MB for the paper's network).
#[test]
fn plan_projects_larger_runs_and_says_what_it_needs() {
    let (ok, err) = alexnet(&["plan"]);
    assert!(
        !ok && err.contains("--step-ms") && err.contains("--measure"),
        "{err}"
    );
    let (ok, err) = alexnet(&["plan", "--gpus-per-host", "3", "--step-ms", "50"]);
    assert!(!ok && err.contains("--gpus-per-host must be even"), "{err}");
    let (ok, out, err) = alexnet_out(
        &["plan", "--hosts", "1,2,64", "--step-ms", "50", "--json"],
        &[],
    );
    assert!(ok, "{err}");
    let rows: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    let replicas: Vec<u64> = rows
        .iter()
        .map(|r| r["replicas"].as_u64().unwrap())
        .collect();
    assert_eq!(replicas, [4, 8, 256]);
    let bytes: Vec<f64> = rows
        .iter()
        .map(|r| r["replica_bytes"].as_f64().unwrap())
        .collect();
    // 2 (R - 1) / R of about 122 MB: 183, 213, then nearly 244 MB.
    assert!(
        (bytes[1] / bytes[0] - (14.0 / 8.0) / (6.0 / 4.0)).abs() < 1e-6,
        "{bytes:?}"
    );
    assert!(bytes[2] > 2.4e8 && bytes[2] < 2.45e8, "{bytes:?}");
    let (ok, out, _) = alexnet_out(&["plan", "--hosts", "2", "--step-ms", "50"], &[]);
    assert!(
        ok && out.contains("A projection, not a measurement"),
        "{out}"
    );
}
