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

#[test]
fn cuda_without_a_cuda_backend_fails_cleanly() {
    let (ok, err) = alexnet(&["bench", "--backend", "cuda"]);
    assert!(!ok);
    assert!(
        err.contains("--backend cuda") && !err.contains("panicked"),
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
            ],
        ]
        .concat(),
    );
    assert!(ok, "{err}");
    assert!(err.contains("validation epoch=1"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
