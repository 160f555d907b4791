//! Helpers shared by the integration tests: golden files, random data, error measures.
#![allow(dead_code)]

pub mod process;

use std::path::PathBuf;

pub use alexnet::selftest::golden::{rel_err, Golden};

/// Golden files read from the tree, or from `ALEXNET_GOLDEN_DIR` where the test binary runs
/// away from its source tree (the GPU check).
pub trait GoldenFile {
    fn load(name: &str) -> Golden;
}

impl GoldenFile for Golden {
    fn load(name: &str) -> Golden {
        let dir = std::env::var_os("ALEXNET_GOLDEN_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden"));
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Golden::parse(name, &bytes).unwrap()
    }
}

#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f64) {
    let e = rel_err(got, want);
    assert!(e < tol, "{what}: relative error {e:.3e} exceeds {tol:.0e}");
}

/// Fresh pseudo-random values in [-1, 1) (a small LCG: tests need variety, not quality).
pub fn random(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Checks an analytic gradient against central differences of `f` at `samples` coordinates of
/// `x`. `f` is a scalar function of the input; `grad` its claimed gradient.
#[track_caller]
pub fn check_finite_diff(
    what: &str,
    x: &[f32],
    grad: &[f32],
    samples: usize,
    eps: f32,
    tol: f64,
    f: impl Fn(&[f32]) -> f64,
) {
    assert_eq!(x.len(), grad.len());
    let step = (x.len() / samples).max(1);
    let mut worst = 0.0f64;
    let mut checked = 0;
    for i in (0..x.len()).step_by(step).take(samples) {
        let mut xp = x.to_vec();
        xp[i] += eps;
        let fp = f(&xp);
        xp[i] -= 2.0 * eps;
        let fm = f(&xp);
        let numeric = (fp - fm) / (2.0 * eps as f64);
        let analytic = grad[i] as f64;
        let err = (numeric - analytic).abs() / (numeric.abs().max(analytic.abs()).max(1e-2));
        worst = worst.max(err);
        assert!(
            err < tol,
            "{what}: d/dx[{i}] analytic {analytic:.6e} vs numeric {numeric:.6e} (rel {err:.2e})"
        );
        checked += 1;
    }
    assert!(checked > 0, "{what}: nothing checked");
}

/// `sum(y * r)`, the scalar whose gradient with respect to `y` is `r`.
pub fn dot(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(a, b)| *a as f64 * *b as f64).sum()
}

/// The CUDA backend on GPU 0, or `None` (with a note) where there is none; with
/// `ALEXNET_REQUIRE_GPU=1` (the prepared GPU check) a missing GPU is a failure instead.
#[cfg(feature = "cuda")]
#[allow(dead_code)]
pub fn gpu() -> Option<alexnet::backend::cuda::Cuda> {
    gpu_here().then(|| {
        alexnet::backend::cuda::Cuda::new(0, &Default::default())
            .expect("starting the CUDA backend")
    })
}

/// Whether there is a GPU to check (see [`gpu`]).
#[cfg(feature = "cuda")]
fn gpu_here() -> bool {
    if let Some(why) = alexnet::backend::cuda::unavailable() {
        assert!(
            std::env::var("ALEXNET_REQUIRE_GPU").is_err(),
            "ALEXNET_REQUIRE_GPU is set but {why}"
        );
        eprintln!("no GPU ({why}): CUDA checks skipped");
        return false;
    }
    true
}

/// [`gpu`] with the convolutions on cuDNN (their algorithms timed, as in training), or `None`
/// where there is no GPU or no cuDNN; with `ALEXNET_REQUIRE_GPU=1` either is a failure.
#[cfg(feature = "cuda")]
#[allow(dead_code)]
pub fn gpu_cudnn() -> Option<alexnet::backend::cuda::Cuda> {
    if !gpu_here() {
        return None;
    }
    if !alexnet::backend::cuda::cudnn::present() {
        assert!(
            std::env::var("ALEXNET_REQUIRE_GPU").is_err(),
            "ALEXNET_REQUIRE_GPU is set but cuDNN (libcudnn.so.9) cannot be loaded"
        );
        eprintln!("no cuDNN: its checks skipped");
        return None;
    }
    let cudnn = alexnet::backend::DeviceSettings {
        conv: alexnet::backend::ConvPath::Cudnn,
        ..Default::default()
    };
    Some(alexnet::backend::cuda::Cuda::new(0, &cudnn).expect("starting cuDNN"))
}
