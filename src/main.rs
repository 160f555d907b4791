//! `alexnet`: train, benchmark and (later) serve the two-column network.

use alexnet::backend::{Cpu, SgdParams};
use alexnet::comm::Topology;
use alexnet::model::NetConfig;
use alexnet::train::bench;
use alexnet::train::fit::LogMonitor;
use alexnet::train::job::JobConfig;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "alexnet",
    version,
    about = "Train Krizhevsky, Sutskever and Hinton's two-column AlexNet (2012)",
    long_about = "Train Krizhevsky, Sutskever and Hinton's two-column AlexNet (2012).\n\n\
        Each column holds half the kernels of every layer; the columns exchange activations only \
        at conv3, fc6, fc7, fc8 and the logits, as in the paper.\n\n\
        Quick start:\n  alexnet train              trains a narrow network on the carried Fashion-MNIST sample\n  \
        alexnet bench --batch 128  measures training speed of the paper's network on random data\n  \
        alexnet prepare --input DIR --output DIR   prepares an ImageFolder tree (ImageNet) for training"
)]
struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "ALEXNET_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendChoice {
    /// The best backend this build has: the CPU for now (CUDA is not built yet).
    Auto,
    Cpu,
    Cuda,
}

#[derive(Subcommand)]
enum Command {
    /// Train on IDX files (Fashion-MNIST layout) or a prepared dataset, reporting validation error.
    Train(TrainArgs),
    /// Time full training steps (forward, backward, update) on random data.
    Bench(BenchArgs),
    /// Turn an ImageFolder tree into the paper's preprocessed, sharded form.
    ///
    /// Reads root/<class>/<image> (JPEG or PNG, any size, grey or colour) and writes 256x256
    /// RGB images (shorter side to 256, central crop) in shards, with the mean image and the RGB
    /// PCA in dataset.json. Interrupted runs leave nothing that looks complete; rerun to finish.
    Prepare(PrepareArgs),
    /// Time `prepare` on ImageNet-sized JPEGs and the loader on the result.
    BenchData(BenchDataArgs),
}

#[derive(clap::Args)]
struct PrepareArgs {
    /// The ImageFolder tree: one folder per class (e.g. ImageNet's n01440764), images inside.
    #[arg(long)]
    input: PathBuf,
    /// Where the shards and dataset.json go (created if missing).
    #[arg(long)]
    output: PathBuf,
    /// Images per shard (1024 at 256x256 is about 200 MB).
    #[arg(long, default_value_t = 1024)]
    shard_images: usize,
    /// Side of the stored images.
    #[arg(long, default_value_t = 256)]
    side: usize,
    /// Stop at the first file that is not a readable image instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// No progress bar (logs only).
    #[arg(long)]
    no_progress: bool,
}

#[derive(clap::Args)]
struct BenchDataArgs {
    /// JPEGs to make and prepare.
    #[arg(long, default_value_t = 1000)]
    images: usize,
    /// Samples per loader batch.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Photographs to make the JPEGs from (an ImageFolder tree).
    #[arg(long, default_value = "data/sample/imagenet-photos")]
    photos: PathBuf,
    /// Scratch folder (removed afterwards).
    #[arg(long, default_value = "target/bench-data")]
    work: PathBuf,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
}

/// What to train, shared by `train` (one process) and `launch` (workers).
#[derive(clap::Args, Clone)]
struct JobArgs {
    /// The training data: a prepared dataset (`alexnet prepare`, has dataset.json), or a folder
    /// of IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-*), which
    /// also holds the validation set.
    #[arg(long, default_value = "data/sample/fashion-mnist")]
    data: PathBuf,
    /// The prepared validation set, for prepared training data (validated on centre crops).
    #[arg(long)]
    val: Option<PathBuf>,
    /// The network: `demo` (narrow, for 28x28 grey images upscaled to 64), `paper`, or a TOML
    /// file. Default: `demo` for IDX data, `paper` for prepared data.
    #[arg(long)]
    net: Option<String>,
    /// Threads that make batches from prepared data (per worker).
    #[arg(long, default_value_t = 2)]
    loader_threads: usize,
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Stop after this many steps in all (default: run every epoch).
    #[arg(long)]
    steps: Option<u64>,
    /// Samples per step, all replicas together.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Learning rate (the paper: 0.01).
    #[arg(long, default_value_t = 0.01)]
    lr: f32,
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    #[arg(long, default_value_t = 0.0005)]
    weight_decay: f32,
    /// Seeds the parameters, dropout masks and the order of the data.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Log progress every this many steps.
    #[arg(long, default_value_t = 10)]
    log_every: usize,
}

#[derive(clap::Args)]
struct TrainArgs {
    #[command(flatten)]
    job: JobArgs,
    /// Write the trained parameters here (column0.safetensors, column1.safetensors).
    #[arg(long)]
    out: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
}

#[derive(clap::Args)]
struct BenchArgs {
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
    /// Images per step.
    #[arg(long, default_value_t = 128)]
    batch: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// The network: `paper` (default), `demo`, or a TOML file.
    #[arg(long, default_value = "paper")]
    net: String,
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    json: bool,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

/// The narrow network of the default training job: the paper's topology at a quarter to a
/// sixteenth of its widths, for 28x28 grey images upscaled to 64.
fn demo_net() -> NetConfig {
    NetConfig {
        input_size: 64,
        in_channels: 1,
        conv_channels: [32, 64, 96, 96, 64],
        fc_widths: [256, 256],
        classes: 10,
        init_std: 0.03,
        ..NetConfig::default()
    }
}

fn load_net(spec: &str) -> anyhow::Result<NetConfig> {
    let cfg = match spec {
        "paper" => NetConfig::default(),
        "demo" => demo_net(),
        path => {
            let text = std::fs::read_to_string(path).with_context(|| {
                format!("reading network file {path} (or use `paper` or `demo`)")
            })?;
            toml::from_str(&text).with_context(|| format!("network file {path}"))?
        }
    };
    cfg.validate()
        .with_context(|| format!("network `{spec}`"))?;
    Ok(cfg)
}

fn cpu_backend(choice: BackendChoice) -> anyhow::Result<Cpu> {
    match choice {
        BackendChoice::Cpu => {}
        BackendChoice::Auto => {
            tracing::info!("backend auto: this build has no CUDA backend yet, taking the CPU")
        }
        BackendChoice::Cuda => {
            anyhow::bail!("--backend cuda: this build has no CUDA backend yet; use --backend cpu")
        }
    }
    let cpu = Cpu::new();
    tracing::info!(
        backend = alexnet::backend::Backend::name(&cpu),
        "backend ready"
    );
    Ok(cpu)
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Train(a) => train(a),
        Command::Prepare(a) => {
            let opts = alexnet::data::prepare::PrepareOptions {
                side: a.side,
                shard_images: a.shard_images,
                strict: a.strict,
                progress: !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let summary = alexnet::data::prepare::prepare(&a.input, &a.output, &opts)?;
            if !summary.skipped.is_empty() {
                tracing::warn!(
                    skipped = summary.skipped.len(),
                    "some files were skipped (named above; --strict stops instead)"
                );
            }
            Ok(())
        }
        Command::BenchData(a) => {
            let r =
                alexnet::data::bench::run(&resolve_data(&a.photos), &a.work, a.images, a.batch)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                println!("threads                     {}", r.threads);
                println!(
                    "prepare (500x375 JPEG)      {:.0} images/s, {:.0} per core",
                    r.prepare_images_per_s, r.prepare_images_per_s_per_core
                );
                println!(
                    "loader (train views, b{})  {:.0} images/s, {:.0} per core",
                    r.loader_batch, r.loader_images_per_s, r.loader_images_per_s_per_core
                );
                println!(
                    "cores to feed 5,000 img/s   {:.1}",
                    r.loader_cores_for_5000_per_s
                );
            }
            Ok(())
        }
        Command::Bench(a) => {
            let opts = bench::BenchOptions {
                batch: a.batch,
                warmup: a.warmup,
                steps: a.steps,
                net: load_net(&a.net)?,
                seed: a.seed,
            };
            let report = bench::run(cpu_backend(a.backend)?, &opts)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::render(&report));
            }
            Ok(())
        }
    }
}

/// The job the training flags describe, laid out as `topology`.
fn job_from_args(a: &JobArgs, topology: Topology) -> anyhow::Result<JobConfig> {
    let data = resolve_data(&a.data);
    let prepared = data.join(alexnet::data::shards::METADATA_FILE).exists();
    let net = load_net(
        a.net
            .as_deref()
            .unwrap_or(if prepared { "paper" } else { "demo" }),
    )?;
    let job = JobConfig {
        data: absolute(&data),
        val: a.val.as_ref().map(|v| absolute(&resolve_data(v))),
        net,
        epochs: a.epochs,
        batch: a.batch,
        sgd: SgdParams {
            lr: a.lr,
            momentum: a.momentum,
            weight_decay: a.weight_decay,
        },
        seed: a.seed,
        max_steps: a.steps,
        topology,
        loader_threads: a.loader_threads,
    };
    job.validate()?;
    Ok(job)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let job = job_from_args(
        &a.job,
        Topology {
            replicas: 1,
            columns_per_worker: alexnet::model::config::COLUMNS,
        },
    )?;
    let role = alexnet::train::job::Role {
        replica: 0,
        columns: Box::new(alexnet::comm::LocalExchange::default()),
        replicas: None,
    };
    let mut monitor = LogMonitor::new(a.job.log_every as u64, job.net.classes);
    let (net, steps) = alexnet::train::job::run(&job, cpu_backend(a.backend)?, role, &mut monitor)?;
    if let Some(out) = &a.out {
        for path in alexnet::train::job::save_columns(&net, out)? {
            tracing::info!(path = %path.display(), "parameters written");
        }
    }
    match monitor.results.last() {
        Some(last) => tracing::info!(
            epochs = last.epoch,
            steps,
            val_top1_err = format!("{:.3}", last.val_top1_err),
            val_top5_err = format!("{:.3}", last.val_top5_err),
            "done"
        ),
        None => tracing::info!(
            steps,
            "done (stopped before the end of an epoch: no validation)"
        ),
    }
    Ok(())
}

/// The default sample folder is relative to the repository; find it from elsewhere too.
fn resolve_data(path: &Path) -> PathBuf {
    if path.exists() || path.is_absolute() {
        return path.to_path_buf();
    }
    let beside = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    if beside.exists() {
        beside
    } else {
        path.to_path_buf()
    }
}
