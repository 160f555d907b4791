//! Finding devices: the backend `--backend` names, and the devices of a launch's or an
//! agent's workers.

use super::BackendChoice;
use alexnet::backend::{Cpu, Device, DeviceSettings};

/// The CPU backend on every core, logged.
pub fn cpu_ready(settings: &DeviceSettings) -> Cpu {
    let cpu = Cpu::new().with_memory_limit(settings.memory_limit);
    tracing::info!(
        backend = alexnet::backend::Backend::name(&cpu),
        "backend ready"
    );
    cpu
}

/// The backend `--backend` names: `auto` takes CUDA where a driver and a GPU are present and
/// says which it took and why.
#[cfg(feature = "cuda")]
pub fn choose_backend(choice: BackendChoice, settings: &DeviceSettings) -> anyhow::Result<Device> {
    use alexnet::backend::cuda::{unavailable, Cuda};
    match choice {
        BackendChoice::Cpu => Ok(Device::Cpu(cpu_ready(settings))),
        BackendChoice::Cuda => Ok(Device::Cuda(Box::new(Cuda::new(0, settings)?))),
        BackendChoice::Auto => match unavailable() {
            None => match Cuda::new(0, settings) {
                Ok(c) => {
                    tracing::info!("backend auto: a GPU is present, taking CUDA");
                    Ok(Device::Cuda(Box::new(c)))
                }
                Err(e) => {
                    tracing::warn!("backend auto: a GPU is present but CUDA did not start ({e:#}): taking the CPU");
                    Ok(Device::Cpu(cpu_ready(settings)))
                }
            },
            Some(why) => {
                tracing::info!("backend auto: {why}: taking the CPU");
                Ok(Device::Cpu(cpu_ready(settings)))
            }
        },
    }
}

#[cfg(not(feature = "cuda"))]
pub fn choose_backend(choice: BackendChoice, settings: &DeviceSettings) -> anyhow::Result<Device> {
    match choice {
        BackendChoice::Cuda => anyhow::bail!(
            "--backend cuda: this binary was built without the CUDA backend (cargo feature `cuda`); use --backend cpu"
        ),
        BackendChoice::Auto => {
            tracing::info!("backend auto: built without CUDA, taking the CPU")
        }
        BackendChoice::Cpu => {}
    }
    Ok(Device::Cpu(cpu_ready(settings)))
}

/// GPUs a launch or an agent can use: counted through the driver where the CUDA backend is
/// built, else none.
pub fn usable_gpus() -> usize {
    #[cfg(feature = "cuda")]
    {
        alexnet::backend::cuda::device_count()
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// The devices of a launch's or an agent's workers, for `--backend`/`--device`.
pub fn worker_devices(choice: BackendChoice, what: &str) -> anyhow::Result<Vec<String>> {
    let gpus = usable_gpus();
    match choice {
        BackendChoice::Cpu => Ok(vec!["cpu".into()]),
        BackendChoice::Cuda if gpus == 0 => anyhow::bail!(
            "{what} cuda: no usable GPU here ({}); use {what} cpu",
            if cfg!(feature = "cuda") {
                "no NVIDIA driver or device"
            } else {
                "this binary was built without the CUDA backend"
            }
        ),
        BackendChoice::Cuda => Ok((0..gpus).map(|g| format!("cuda:{g}")).collect()),
        BackendChoice::Auto if gpus > 0 => {
            tracing::info!(
                gpus,
                "{what} auto: GPUs found, one worker per GPU (round robin)"
            );
            Ok((0..gpus).map(|g| format!("cuda:{g}")).collect())
        }
        BackendChoice::Auto => {
            tracing::info!("{what} auto: no usable GPU, CPU workers");
            Ok(vec!["cpu".into()])
        }
    }
}

/// GPUs this host shows (/dev/nvidia0, /dev/nvidia1, ...).
pub fn visible_gpus() -> usize {
    std::fs::read_dir("/dev")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n.strip_prefix("nvidia")
                        .is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
                })
                .count()
        })
        .unwrap_or(0)
}
