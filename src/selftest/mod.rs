//! `alexnet selftest`: a backend against the CPU reference, on fresh random inputs. Every op
//! at the network's shapes (strides, pads, groups, the paper's LRN, overlapping pooling,
//! dropout keyed like the CPU's), then the whole network: one training step (forward,
//! backward, SGD) from the same parameters, the loss and every parameter compared.
//!
//! The error of a check is `max |tested - reference| / max |reference|` over the output:
//! relative to the output's scale, so that values that should be near zero do not dominate.
//!
//! A module of its own, above the backends: it drives them with the model, the training step
//! and this binary's processes, which the backends themselves do not depend on.

mod checks;
pub mod golden;
mod processes;

pub use checks::{finish_views, network, ops, random_byte_views, uploads};
pub use processes::processes;

use serde::Serialize;

/// One compared output.
#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub what: String,
    pub error: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.error <= self.tolerance
    }
}

/// `max |a - b| / max |b|` (0 for two empty or all-zero outputs that agree).
pub fn scaled_error(a: &[f32], reference: &[f32]) -> f64 {
    assert_eq!(
        a.len(),
        reference.len(),
        "compared outputs differ in length"
    );
    let scale = reference
        .iter()
        .fold(0.0f64, |m, &v| m.max((v as f64).abs()));
    let diff = a.iter().zip(reference).fold(0.0f64, |m, (&x, &y)| {
        m.max(if x.is_nan() || y.is_nan() {
            f64::INFINITY
        } else {
            (x as f64 - y as f64).abs()
        })
    });
    if diff == 0.0 {
        0.0
    } else {
        diff / scale.max(1e-30)
    }
}

/// The checks as a table for people; the last line says whether all passed.
pub fn render(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.what.len()).max().unwrap_or(0);
    let mut out = String::new();
    for c in checks {
        out.push_str(&format!(
            "{:<width$}  {:>9.2e}  {}\n",
            c.what,
            c.error,
            if c.passed() { "ok" } else { "FAIL" }
        ));
    }
    let failed = checks.iter().filter(|c| !c.passed()).count();
    out.push_str(&format!(
        "{} checks, {} failed (tolerance {:.0e}: of each output's largest value against the \
         CPU, of its L2 norm against PyTorch's golden vectors)\n",
        checks.len(),
        failed,
        checks.first().map(|c| c.tolerance).unwrap_or(0.0)
    ));
    out
}

/// The backend a selftest checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Cpu,
    Cuda,
}

/// What `alexnet selftest` was asked for.
pub struct Options {
    /// `None`: the GPU where a driver and a device are present, else the CPU (saying so).
    pub backend: Option<Target>,
    /// Largest allowed error, relative to each output's scale.
    pub tolerance: f64,
    /// Seeds the random inputs (a fresh one when `None`).
    pub seed: Option<u64>,
    /// Images in the whole-network step.
    pub batch: usize,
    /// The network of the whole-network step.
    pub net: crate::model::NetConfig,
    /// How long each run of the short job in one and in two worker processes may take.
    pub process_timeout: std::time::Duration,
    /// Print the checks as JSON.
    pub json: bool,
    /// Fail where cuDNN or NCCL cannot be loaded, rather than skip their checks.
    pub require_all: bool,
}

/// The backend `auto` checks: the GPU where a driver and a device are present, and the CPU
/// otherwise (saying so).
fn auto_target() -> Target {
    #[cfg(feature = "cuda")]
    let why_not = crate::backend::cuda::unavailable();
    #[cfg(not(feature = "cuda"))]
    let why_not = Some("this binary was built without the CUDA backend (cargo feature `cuda`)");
    match why_not {
        None => Target::Cuda,
        Some(why) => {
            tracing::info!("backend auto: {why}: checking the CPU");
            Target::Cpu
        }
    }
}

/// Runs every check on the backend `opts` names, prints them, and fails where any failed.
pub fn run(opts: &Options) -> anyhow::Result<()> {
    use crate::backend::Cpu;
    // `--require-all` asks for the GPU: `auto` does not fall back to the CPU then.
    let backend = match (opts.backend, opts.require_all) {
        (None, true) => Target::Cuda,
        (None, false) => auto_target(),
        (Some(t), _) => t,
    };
    anyhow::ensure!(
        !(opts.require_all && backend == Target::Cpu),
        "--require-all asks for the GPU's libraries (cuDNN, NCCL): use it with --backend cuda"
    );
    let seed = opts.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    tracing::info!(seed, "selftest inputs (rerun with --seed to repeat)");
    let tolerance = opts.tolerance;
    let reference = Cpu::with_threads(1);
    let (checks, informational) = match backend {
        Target::Cpu => {
            let cpu = Cpu::new();
            let mut checks = ops(&reference, &cpu, seed, tolerance);
            checks.extend(golden::ops(&cpu, tolerance)?);
            checks.extend(network(
                &opts.net,
                Cpu::with_threads(1),
                Cpu::new(),
                opts.batch,
                seed,
                tolerance,
            )?);
            checks.extend(processes::in_scratch(
                "cpu",
                opts.process_timeout,
                tolerance,
            )?);
            (checks, Vec::new())
        }
        #[cfg(feature = "cuda")]
        Target::Cuda => gpu_checks(opts, seed, &reference)?,
        #[cfg(not(feature = "cuda"))]
        Target::Cuda => {
            anyhow::bail!("this binary was built without the CUDA backend (cargo feature `cuda`)")
        }
    };
    let failed = checks.iter().filter(|c| !c.passed()).count();
    if opts.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "seed": seed, "checks": checks, "tf32": informational, "failed": failed
            }))?
        );
    } else {
        print!("{}", render(&checks));
        if !informational.is_empty() {
            println!("\nwith TF32 (cuBLAS tensor cores; not judged):");
            print!("{}", render(&informational));
        }
    }
    anyhow::ensure!(failed == 0, "{failed} checks failed (seed {seed})");
    Ok(())
}

/// The GPU's checks (judged), and its ops with TF32 (reported beside, not judged).
#[cfg(feature = "cuda")]
fn gpu_checks(
    opts: &Options,
    seed: u64,
    reference: &crate::backend::Cpu,
) -> anyhow::Result<(Vec<Check>, Vec<Check>)> {
    use crate::backend::cuda::Cuda;
    use crate::backend::{ConvPath, Cpu, DeviceSettings};
    let tolerance = opts.tolerance;
    // Strict f32 on the unfolding path, whatever the flags say: the path every check judges.
    let gpu = Cuda::new(0, &DeviceSettings::default())?;
    tracing::info!(backend = %crate::backend::Backend::name(&gpu), "checking against the CPU");
    let mut checks = ops(reference, &gpu, seed, tolerance);
    checks.extend(golden::ops(&gpu, tolerance)?);
    checks.push(finish_views(&gpu, seed)?);
    checks.push(uploads(&gpu, seed));
    checks.extend(network(
        &opts.net,
        Cpu::with_threads(1),
        gpu,
        opts.batch,
        seed,
        tolerance,
    )?);
    // The cuDNN convolutions (`--conv cudnn`), judged where cuDNN is here.
    if crate::backend::cuda::cudnn::present() {
        let cudnn = DeviceSettings {
            conv: ConvPath::Cudnn,
            ..DeviceSettings::default()
        };
        let dnn = Cuda::new(0, &cudnn)?;
        let mut more = ops(reference, &dnn, seed, tolerance);
        more.extend(golden::ops(&dnn, tolerance)?);
        more.extend(network(
            &opts.net,
            Cpu::with_threads(1),
            dnn,
            opts.batch,
            seed,
            tolerance,
        )?);
        checks.extend(
            more.into_iter()
                .filter(|c| c.what.contains("conv") || c.what.starts_with("network"))
                .map(|mut c| {
                    c.what = format!("cuDNN: {}", c.what);
                    c
                }),
        );
    } else if opts.require_all {
        tracing::error!("cuDNN cannot be loaded (libcudnn.so.9), and --require-all");
        checks.push(Check {
            what: "cuDNN: libcudnn.so.9 loaded".into(),
            error: f64::INFINITY,
            tolerance,
        });
    } else {
        tracing::warn!("cuDNN not checked: libcudnn.so.9 cannot be loaded");
    }
    // NCCL on this GPU: judged where its library is here (multi-GPU jobs need it).
    match crate::comm::nccl::check_libraries() {
        Err(e) if opts.require_all => {
            tracing::error!("NCCL: {e:#}, and --require-all");
            checks.push(Check {
                what: "NCCL: libnccl.so loaded".into(),
                error: f64::INFINITY,
                tolerance,
            });
        }
        Err(e) => tracing::warn!("NCCL not checked: {e:#}"),
        Ok(()) => {
            let r = Cuda::new(0, &DeviceSettings::default())
                .and_then(|gpu| crate::comm::nccl::one_rank_check(&gpu, 0));
            if let Err(e) = &r {
                tracing::error!("NCCL: {e:#}");
            }
            checks.push(Check {
                what: "NCCL: one-rank all-reduce, one-replica group on device buffers".into(),
                error: if r.is_ok() { 0.0 } else { f64::INFINITY },
                tolerance,
            });
        }
    }
    // Last: the processes, which take the most time.
    checks.extend(processes::in_scratch(
        "cuda",
        opts.process_timeout,
        tolerance,
    )?);
    // TF32 rounds products' inputs to 10 bits: reported, not judged.
    let tf32 = Cuda::new(
        0,
        &DeviceSettings {
            tf32: true,
            ..DeviceSettings::default()
        },
    )?;
    Ok((checks, ops(reference, &tf32, seed, 1e-2)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_output_is_caught() {
        assert_eq!(scaled_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((scaled_error(&[1.0, 2.1], &[1.0, 2.0]) - 0.05).abs() < 1e-6);
        assert!(scaled_error(&[f32::NAN], &[1.0]).is_infinite());
    }
}
