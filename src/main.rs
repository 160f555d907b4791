//! `alexnet`: train, benchmark and (later) serve the two-column network.

use alexnet::backend::{selftest, Cpu, Device};
use alexnet::comm::Topology;
use alexnet::coordinator::launch::LaunchOptions;
use alexnet::coordinator::{CoordinatorConfig, Phase, Secret};
use alexnet::model::NetConfig;
use alexnet::train::bench;
use alexnet::train::book::{BookSetup, JobBook};
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
    /// Check the command line (and a job file it names, where it exists), print what would
    /// run, and exit without starting anything. The deployment recipes are checked this way.
    #[arg(long, global = true)]
    dry_run: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum BackendChoice {
    /// CUDA where a driver and a GPU are present, else the CPU (the log says which and why).
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
    /// Check a backend against the CPU reference on fresh random inputs: every op at the
    /// network's shapes, then one whole training step (forward, backward, update); every op
    /// against PyTorch's golden vectors (compiled in); and a short job run as two worker
    /// processes over TCP against one process.
    ///
    /// `--backend cuda` is the GPU check (strict f32 must agree to the tolerance; the TF32
    /// figures are reported beside, not judged; both workers run on GPU 0); `--backend cpu`
    /// checks that the CPU's results do not depend on how its work is split; `auto` checks
    /// the GPU where there is one, the CPU otherwise.
    Selftest(SelftestArgs),
    /// Train across worker processes on this machine: a coordinator here, one worker per device.
    ///
    /// With no arguments: the narrow network of the paper's topology on the carried sample,
    /// its two columns in two CPU worker processes that exchange activations over TCP only at
    /// conv3, fc6, fc7, fc8 and the logits. Logs go to stderr with a rank prefix and to one
    /// file per rank in the run folder.
    Launch(LaunchArgs),
    /// Run the coordinator of a multi-machine job; workers join it with `alexnet worker`.
    Coordinator(CoordinatorArgs),
    /// Run one worker of a job: join the coordinator, train this rank's part, report.
    Worker(WorkerArgs),
    /// Run this host's part of a multi-host job: start its workers, forward their logs,
    /// restart those that fail (they rejoin from the newest checkpoint), stop them on SIGTERM.
    ///
    /// One agent per host, like torchrun per node: with `--node-rank K --workers G` this
    /// host's workers take ranks K*G .. K*G+G-1 (rank 2r+c holds column c of replica r). The
    /// coordinator (`alexnet coordinator --listen 0.0.0.0:50051`) runs on one host; the run
    /// folder must be the same path on every host (shared storage) for checkpoints.
    Agent(AgentArgs),
    /// Show a running job's state: workers, step, loss, speed, ETA.
    Status(StatusArgs),
    /// Top-1 and top-5 error of a trained run (its newest checkpoint) on a dataset.
    Eval(EvalArgs),
    /// The top-5 classes of image files, with probabilities, by a trained run.
    Predict(PredictArgs),
    /// Write a trained run's parameters as one safetensors file, unsplit, with PyTorch's names
    /// and shapes (start another run from it with `--init`).
    Export(ExportArgs),
}

#[derive(clap::Args)]
struct EvalArgs {
    /// The run folder (`launch`/`train --run-dir`).
    #[arg(long)]
    run: PathBuf,
    /// The dataset: IDX files (their t10k set is used) or a prepared dataset with the run's
    /// classes. Default: the run's validation data.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Average the softmax over the paper's ten patches (corners, centre, mirrored).
    #[arg(long)]
    ten_crop: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    batch: usize,
}

#[derive(clap::Args)]
struct PredictArgs {
    /// The run folder.
    #[arg(long)]
    run: PathBuf,
    /// Image files (JPEG or PNG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Classes shown per image.
    #[arg(long, default_value_t = 5)]
    top: usize,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The run folder.
    #[arg(long)]
    run: PathBuf,
    /// The file to write.
    #[arg(long)]
    out: PathBuf,
}

/// How the job is spread over workers, and how long a silent peer is waited for.
#[derive(clap::Args, Clone)]
struct LayoutArgs {
    /// Copies of the pair of columns (data parallelism), each on its part of the batch. [default: 1]
    #[arg(long, env = "ALEXNET_REPLICAS")]
    replicas: Option<usize>,
    /// Columns per worker: 1 (the paper: one column per device) or 2 (a worker holds both). [default: 1]
    #[arg(long)]
    columns_per_worker: Option<usize>,
    /// Seconds without news from a peer (heartbeat, data) before it counts as lost.
    #[arg(long, default_value_t = 60.0, env = "ALEXNET_PEER_TIMEOUT")]
    peer_timeout: f64,
    /// Seconds the first worker waits for the last one to join.
    #[arg(long, default_value_t = 300.0)]
    rendezvous_timeout: f64,
    /// Job name; workers started for another job are refused. Default: job-<unix time>.
    #[arg(long, env = "ALEXNET_JOB_ID")]
    job_id: Option<String>,
    /// Seconds a worker's clock may differ from the coordinator's before it is refused.
    #[arg(long, default_value_t = 60.0, env = "ALEXNET_MAX_CLOCK_SKEW")]
    max_clock_skew: f64,
}

#[derive(clap::Args)]
struct LaunchArgs {
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    layout: LayoutArgs,
    /// Where job.json, rank<N>.log and the trained parameters (params/) go. Default: runs/<job id>.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in this folder from its newest complete checkpoint, in a new
    /// generation (`--epochs` and `--steps` may extend it; nothing else changes).
    #[arg(long, conflicts_with = "run_dir")]
    resume: Option<PathBuf>,
    /// Times the workers are restarted (from the newest checkpoint) after a failure.
    #[arg(long, default_value_t = 3)]
    max_restarts: usize,
    /// Compute threads per worker. Default: the cores divided among the workers.
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    backend: BackendChoice,
}

#[derive(clap::Args)]
struct CoordinatorArgs {
    #[command(flatten)]
    job: JobArgs,
    #[command(flatten)]
    layout: LayoutArgs,
    /// Address to listen on. The default takes connections from this machine only; use
    /// 0.0.0.0:50051 (on a trusted network) for workers on other hosts.
    #[arg(long, default_value = "127.0.0.1:50051", env = "ALEXNET_LISTEN")]
    listen: String,
    /// The run folder (checkpoint manifests, report); workers must see the same path.
    /// Default: runs/<job id>.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in this folder from its newest complete checkpoint.
    #[arg(long, conflicts_with = "run_dir")]
    resume: Option<PathBuf>,
    /// A file holding the job's token (or set ALEXNET_TOKEN). Without either, a random token
    /// is made and written to RUN_DIR/token (readable by its owner only) for the workers.
    #[arg(long, env = "ALEXNET_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Serve the control plane over TLS with this PEM certificate (chain)...
    #[arg(long, requires = "tls_key", env = "ALEXNET_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// ... and this PEM private key.
    #[arg(long, requires = "tls_cert", env = "ALEXNET_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// New generations (from the newest checkpoint, the workers rejoining) allowed after
    /// failures before the job fails.
    #[arg(long, default_value_t = 3, env = "ALEXNET_MAX_RESTARTS")]
    max_restarts: u32,
}

#[derive(clap::Args)]
struct AgentArgs {
    /// The coordinator, as http://host:port (https:// with --tls-ca).
    #[arg(long, env = "ALEXNET_COORDINATOR")]
    coordinator: String,
    /// Only join this job: an agent pointed at another job's coordinator stops with an error.
    #[arg(long, env = "ALEXNET_JOB_ID")]
    job_id: Option<String>,
    /// This host's index among the hosts (0, 1, ...): its workers take ranks
    /// NODE_RANK*WORKERS onwards. Default: whatever ranks are free.
    #[arg(long, env = "ALEXNET_NODE_RANK")]
    node_rank: Option<u32>,
    /// Workers on this host. Default: one per GPU, or 1 without GPUs.
    #[arg(long, env = "ALEXNET_WORKERS")]
    workers: Option<usize>,
    /// `auto`: one worker per GPU where there are GPUs, else CPU workers; `cuda`: GPUs only.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto, env = "ALEXNET_DEVICE")]
    device: BackendChoice,
    /// Compute threads per worker. Default: the cores divided among the workers.
    #[arg(long, env = "ALEXNET_THREADS")]
    threads: Option<usize>,
    /// Worker restarts allowed on this host in all.
    #[arg(long, default_value_t = 3, env = "ALEXNET_MAX_RESTARTS")]
    max_restarts: usize,
    /// Seconds a (re)started worker keeps trying to reach the coordinator: how long this
    /// host may be cut off from it and still rejoin.
    #[arg(long, default_value_t = 300.0, env = "ALEXNET_REJOIN_TIMEOUT")]
    rejoin_timeout: f64,
    /// Seconds this host's clock may differ from the coordinator's.
    #[arg(long, default_value_t = 60.0, env = "ALEXNET_MAX_CLOCK_SKEW")]
    max_clock_skew: f64,
    /// Each rank's log file goes here too (rank<N>.log).
    #[arg(long, env = "ALEXNET_LOG_DIR")]
    log_dir: Option<PathBuf>,
    /// Where replica 0's workers write their trained columns at the end.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A file holding the job's token (or set ALEXNET_TOKEN).
    #[arg(long, env = "ALEXNET_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The authority's PEM certificate, for a coordinator serving TLS.
    #[arg(long, env = "ALEXNET_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The name the coordinator's certificate must carry (default: the URL's host).
    #[arg(long)]
    tls_domain: Option<String>,
}

#[derive(clap::Args)]
struct WorkerArgs {
    /// The coordinator, as http://host:port.
    #[arg(long, env = "ALEXNET_COORDINATOR")]
    coordinator: String,
    /// `cpu`, or `cuda:N` (GPU N; `cuda` is `cuda:0`).
    #[arg(long, default_value = "cpu", env = "ALEXNET_DEVICE")]
    device: String,
    /// Ask for this rank (default: the next free one).
    #[arg(long, env = "ALEXNET_RANK")]
    rank: Option<u32>,
    /// Only join this job.
    #[arg(long, env = "ALEXNET_JOB_ID")]
    job_id: Option<String>,
    /// Only join a job with this configuration hash.
    #[arg(long)]
    config_hash: Option<String>,
    /// Only join this generation of the job.
    #[arg(long)]
    generation: Option<u64>,
    /// Compute threads (default: every core).
    #[arg(long, env = "ALEXNET_THREADS")]
    threads: Option<usize>,
    /// Seconds to keep trying to reach the coordinator.
    #[arg(long, default_value_t = 30.0)]
    connect_timeout: f64,
    /// Write this worker's trained columns here (replica 0 only).
    #[arg(long)]
    out: Option<PathBuf>,
    /// A file holding the job's token (or set ALEXNET_TOKEN); a job with a token refuses
    /// workers without it.
    #[arg(long, env = "ALEXNET_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The PEM certificate of the authority that signed the coordinator's TLS certificate
    /// (use an https:// coordinator URL).
    #[arg(long, env = "ALEXNET_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The name the coordinator's certificate must carry (default: the URL's host).
    #[arg(long)]
    tls_domain: Option<String>,
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The coordinator, as http://host:port.
    #[arg(
        long,
        env = "ALEXNET_COORDINATOR",
        default_value = "http://127.0.0.1:50051"
    )]
    coordinator: String,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
    /// A file holding the job's token (or set ALEXNET_TOKEN).
    #[arg(long, env = "ALEXNET_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// The authority's PEM certificate, for a coordinator serving TLS.
    #[arg(long, env = "ALEXNET_TLS_CA")]
    tls_ca: Option<PathBuf>,
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
struct SelftestArgs {
    #[arg(long, value_enum, default_value_t = BackendChoice::Cuda)]
    backend: BackendChoice,
    /// Largest allowed error, relative to each output's scale.
    #[arg(long, default_value_t = 1e-4)]
    tolerance: f64,
    /// Seeds the random inputs (a fresh one each run by default).
    #[arg(long)]
    seed: Option<u64>,
    /// Images in the whole-network step (the demo network).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Seconds each run of the short job in one and in two worker processes may take.
    #[arg(long, default_value_t = 60.0)]
    process_timeout: f64,
    /// Print the checks as JSON.
    #[arg(long)]
    json: bool,
    /// Fail where cuDNN or NCCL cannot be loaded, rather than skip their checks with a
    /// warning: for a GPU machine that must have them (`scripts/gpu-check.sh` passes it).
    #[arg(long)]
    require_all: bool,
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

/// What to train, shared by `train` (one process), `launch` and `coordinator` (workers).
/// Flags override the job file (`--config`).
#[derive(clap::Args, Clone)]
struct JobArgs {
    /// The job: `demo` (the narrow network on the carried sample: 10 epochs, batch 64), `paper`
    /// (the paper's recipe: its network, batch 128, 90 epochs, lr 0.01 divided by 10 on
    /// plateaus), or a TOML file (see jobs/paper.toml; unknown fields are refused). Default:
    /// `demo` for IDX data, `paper` for prepared data.
    #[arg(long, env = "ALEXNET_CONFIG")]
    config: Option<String>,
    /// The training data: a prepared dataset (`alexnet prepare`, has dataset.json), or a folder
    /// of IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-*), which
    /// also holds the validation set. [default: data/sample/fashion-mnist]
    #[arg(long, env = "ALEXNET_DATA")]
    data: Option<PathBuf>,
    /// The prepared validation set, for prepared training data (validated on centre crops).
    #[arg(long, env = "ALEXNET_VAL")]
    val: Option<PathBuf>,
    /// The network: `demo` (narrow, for 28x28 grey images upscaled to 64), `paper`, or a TOML
    /// file (overrides the job's).
    #[arg(long)]
    net: Option<String>,
    /// Threads that make batches from prepared data (per worker).
    #[arg(long)]
    loader_threads: Option<usize>,
    /// Where training views of prepared data are finished (mirror, mean, colour shift):
    /// `auto` ships bytes to a GPU and finishes them there, and finishes them in the loader
    /// threads on a CPU. The views are the same bits either way. [default: auto]
    #[arg(long, value_enum)]
    augment_on: Option<alexnet::train::job::AugmentOn>,
    /// Epochs to train. [default: the job's; demo 10, paper 90]
    #[arg(long)]
    epochs: Option<usize>,
    /// Stop after this many steps in all (default: run every epoch).
    #[arg(long)]
    steps: Option<u64>,
    /// Samples per step, all replicas together. [default: demo 64, paper 128]
    #[arg(long)]
    batch: Option<usize>,
    /// Initial learning rate. [default: 0.01]
    #[arg(long)]
    lr: Option<f32>,
    /// [default: 0.9]
    #[arg(long)]
    momentum: Option<f32>,
    /// [default: 0.0005]
    #[arg(long)]
    weight_decay: Option<f32>,
    /// Seeds the parameters, dropout masks and the order of the data. [default: 1]
    #[arg(long)]
    seed: Option<u64>,
    /// Checkpoint every this many steps, besides every epoch's end (needs a run folder).
    #[arg(long)]
    checkpoint_every: Option<u64>,
    /// Start from the parameters in this file (`alexnet export` output: unsplit, PyTorch-style).
    #[arg(long)]
    init: Option<PathBuf>,
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
    /// Keep checkpoints, job.json and the report (report.csv, report.svg) in this folder.
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Continue the run in this folder from its newest complete checkpoint.
    #[arg(long, conflicts_with = "run_dir")]
    resume: Option<PathBuf>,
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
    /// Also time as many steps that each upload their input the way training on prepared
    /// images does (views as bytes, finished on the backend), back to back: what the input
    /// costs beside the timed steps, whose input stays where it is. Needs 3 input channels.
    #[arg(long)]
    upload: bool,
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

/// The CPU backend on every core, logged.
fn cpu_ready() -> Cpu {
    let cpu = Cpu::new();
    tracing::info!(
        backend = alexnet::backend::Backend::name(&cpu),
        "backend ready"
    );
    cpu
}

/// The backend `--backend` names: `auto` takes CUDA where a driver and a GPU are present and
/// says which it took and why.
#[cfg(feature = "cuda")]
fn choose_backend(choice: BackendChoice) -> anyhow::Result<Device> {
    use alexnet::backend::cuda::{unavailable, Cuda};
    match choice {
        BackendChoice::Cpu => Ok(Device::Cpu(cpu_ready())),
        BackendChoice::Cuda => Ok(Device::Cuda(Box::new(Cuda::new(0)?))),
        BackendChoice::Auto => match unavailable() {
            None => match Cuda::new(0) {
                Ok(c) => {
                    tracing::info!("backend auto: a GPU is present, taking CUDA");
                    Ok(Device::Cuda(Box::new(c)))
                }
                Err(e) => {
                    tracing::warn!("backend auto: a GPU is present but CUDA did not start ({e:#}): taking the CPU");
                    Ok(Device::Cpu(cpu_ready()))
                }
            },
            Some(why) => {
                tracing::info!("backend auto: {why}: taking the CPU");
                Ok(Device::Cpu(cpu_ready()))
            }
        },
    }
}

#[cfg(not(feature = "cuda"))]
fn choose_backend(choice: BackendChoice) -> anyhow::Result<Device> {
    match choice {
        BackendChoice::Cuda => anyhow::bail!(
            "--backend cuda: this binary was built without the CUDA backend (cargo feature `cuda`); use --backend cpu"
        ),
        BackendChoice::Auto => {
            tracing::info!("backend auto: built without CUDA, taking the CPU")
        }
        BackendChoice::Cpu => {}
    }
    Ok(Device::Cpu(cpu_ready()))
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
    let result = if cli.dry_run {
        dry_run(&cli.command)
    } else {
        run(cli.command, cli.log_format)
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            // A worker's launcher (an agent) tells from the status whether a restart can help.
            match e.downcast_ref::<alexnet::worker::Verdict>() {
                Some(v) => std::process::ExitCode::from(v.exit_code()),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

/// `--dry-run`: what can be checked without starting anything or touching files: the
/// command line (clap has parsed it), coordinator URLs, numbers of seconds, and the job file
/// where it exists here.
fn dry_run(command: &Command) -> anyhow::Result<()> {
    let url = |u: &str| {
        anyhow::ensure!(
            u.starts_with("http://") || u.starts_with("https://"),
            "coordinator URL `{u}` has no scheme: write http://{u} (https:// with TLS)"
        );
        tonic::transport::Endpoint::from_shared(u.to_string())
            .map(|_| ())
            .with_context(|| format!("coordinator URL `{u}` (expected http://host:port)"))
    };
    // The job the flags make, where its file is here: replicas against the batch, widths.
    let job = |j: &JobArgs, l: &LayoutArgs| -> anyhow::Result<()> {
        let here = j
            .config
            .as_deref()
            .is_none_or(|c| matches!(c, "paper" | "demo") || Path::new(c).exists());
        if here {
            job_from_args(j, Some(l))?;
        }
        Ok(())
    };
    let job_file = |j: &JobArgs| -> anyhow::Result<()> {
        match j.config.as_deref() {
            Some(c) if matches!(c, "paper" | "demo") || Path::new(c).exists() => {
                load_job(c)?
                    .validate()
                    .with_context(|| format!("job `{c}`"))?;
                println!("job `{c}`: valid");
            }
            Some(c) => println!("job file {c}: not on this host, not checked"),
            None => {}
        }
        Ok(())
    };
    let (name, layout) = match command {
        Command::Train(a) => {
            job_file(&a.job)?;
            ("train", None)
        }
        Command::Launch(a) => {
            job_file(&a.job)?;
            job(&a.job, &a.layout)?;
            ("launch", Some(&a.layout))
        }
        Command::Coordinator(a) => {
            job_file(&a.job)?;
            job(&a.job, &a.layout)?;
            check_listen(&a.listen).with_context(|| format!("--listen {}", a.listen))?;
            ("coordinator", Some(&a.layout))
        }
        Command::Worker(a) => {
            url(&a.coordinator)?;
            seconds(a.connect_timeout, "--connect-timeout")?;
            ("worker", None)
        }
        Command::Agent(a) => {
            url(&a.coordinator)?;
            anyhow::ensure!(a.workers != Some(0), "--workers must be at least 1");
            seconds(a.rejoin_timeout, "--rejoin-timeout")?;
            seconds(a.max_clock_skew, "--max-clock-skew")?;
            ("agent", None)
        }
        Command::Status(a) => {
            url(&a.coordinator)?;
            ("status", None)
        }
        Command::Bench(_) => ("bench", None),
        Command::Selftest(_) => ("selftest", None),
        Command::Prepare(_) => ("prepare", None),
        Command::BenchData(_) => ("bench-data", None),
        Command::Eval(_) => ("eval", None),
        Command::Predict(_) => ("predict", None),
        Command::Export(_) => ("export", None),
    };
    if let Some(l) = layout {
        seconds(l.peer_timeout, "--peer-timeout")?;
        seconds(l.rendezvous_timeout, "--rendezvous-timeout")?;
        seconds(l.max_clock_skew, "--max-clock-skew")?;
    }
    println!("dry run: `alexnet {name}` is a valid command line; nothing was started");
    Ok(())
}

/// Checks a `host:port` listen address without resolving the name (a pod's or node's name
/// need not resolve where the recipe is checked).
fn check_listen(addr: &str) -> anyhow::Result<()> {
    let (host, port) = addr
        .rsplit_once(':')
        .context("expected host:port, e.g. 0.0.0.0:50051")?;
    port.parse::<u16>()
        .with_context(|| format!("port `{port}` is not a number from 0 to 65535"))?;
    anyhow::ensure!(!host.is_empty(), "no host before the port");
    Ok(())
}

fn run(command: Command, log_format: LogFormat) -> anyhow::Result<()> {
    match command {
        Command::Train(a) => train(a),
        Command::Launch(a) => launch(a, log_format),
        Command::Coordinator(a) => coordinator(a),
        Command::Worker(a) => worker(a),
        Command::Agent(a) => agent(a, log_format),
        Command::Status(a) => status(a),
        Command::Eval(a) => {
            let mut run = alexnet::train::evaluate::load_run(&a.run, Cpu::new())?;
            let hits = alexnet::train::evaluate::evaluate(
                &mut run,
                a.data.as_deref().map(resolve_data).as_deref(),
                a.ten_crop,
                a.batch.max(1),
            )?;
            println!(
                "step {}: top-1 error {:.4}, top-5 error {:.4} on {} images ({})",
                run.manifest.step,
                hits.top1_err(),
                hits.top5_err(),
                hits.samples,
                if a.ten_crop { "ten patches" } else { "centre" }
            );
            Ok(())
        }
        Command::Predict(a) => {
            let mut run = alexnet::train::evaluate::load_run(&a.run, Cpu::new())?;
            let top = alexnet::train::evaluate::predict(&mut run, &a.images, a.top)?;
            for (path, classes) in a.images.iter().zip(top) {
                println!("{}", path.display());
                for (c, name, p) in classes {
                    println!("  {p:>6.3}  {name} ({c})");
                }
            }
            Ok(())
        }
        Command::Export(a) => {
            let run = alexnet::train::evaluate::load_run(&a.run, Cpu::new())?;
            alexnet::train::evaluate::export(&run, &a.out)?;
            tracing::info!(out = %a.out.display(), step = run.manifest.step, "exported");
            Ok(())
        }
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
        Command::Selftest(a) => selftest(a),
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
                println!(
                    "loader, bytes for a GPU     {:.0} images/s, {:.1} cores for 5,000 img/s \
                     ({} bytes per image shipped instead of {})",
                    r.loader_bytes_images_per_s,
                    r.loader_bytes_cores_for_5000_per_s,
                    r.bytes_per_image_bytes,
                    r.bytes_per_image_floats
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
                upload: a.upload,
            };
            let report =
                alexnet::with_device!(choose_backend(a.backend)?, b => bench::run(b, &opts)?);
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", bench::render(&report));
            }
            Ok(())
        }
    }
}

/// The demo job: the narrow network on the carried sample, briefly.
fn demo_job() -> JobConfig {
    JobConfig {
        net: demo_net(),
        epochs: 10,
        batch: 64,
        ..JobConfig::default()
    }
}

fn load_job(spec: &str) -> anyhow::Result<JobConfig> {
    Ok(match spec {
        "paper" => JobConfig::default(),
        "demo" => demo_job(),
        path => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading job file {path} (or use `paper` or `demo`)"))?;
            toml::from_str(&text).with_context(|| format!("job file {path}"))?
        }
    })
}

/// The job the flags describe: the job file (or the default for the data), then each flag
/// given; `layout` overrides the topology.
fn job_from_args(a: &JobArgs, layout: Option<&LayoutArgs>) -> anyhow::Result<JobConfig> {
    let data_flag = a.data.as_ref().map(|d| resolve_data(d));
    let prepared = |d: &Path| d.join(alexnet::data::shards::METADATA_FILE).exists();
    let spec = match (&a.config, &data_flag) {
        (Some(c), _) => c.clone(),
        (None, Some(d)) if prepared(d) => "paper".into(),
        (None, _) => "demo".into(),
    };
    let mut job = load_job(&spec)?;
    if let Some(d) = data_flag {
        job.data = d;
    }
    job.data = absolute(&resolve_data(&job.data));
    if let Some(v) = &a.val {
        job.val = Some(v.clone());
    }
    job.val = job.val.as_ref().map(|v| absolute(&resolve_data(v)));
    if let Some(n) = &a.net {
        job.net = load_net(n)?;
    }
    macro_rules! set {
        ($($flag:ident => $($field:ident).+),* $(,)?) => {
            $(if let Some(v) = a.$flag.clone() { job.$($field).+ = v; })*
        };
    }
    set!(epochs => epochs, batch => batch, lr => sgd.lr, momentum => sgd.momentum,
         weight_decay => sgd.weight_decay, seed => seed, loader_threads => loader_threads,
         checkpoint_every => checkpoint_every, augment_on => augment_on);
    if a.steps.is_some() {
        job.max_steps = a.steps;
    }
    if a.init.is_some() {
        job.init = a.init.as_ref().map(|p| absolute(p));
    }
    if let Some(l) = layout {
        if let Some(r) = l.replicas {
            job.topology.replicas = r;
        }
        if let Some(c) = l.columns_per_worker {
            job.topology.columns_per_worker = c;
        }
    }
    job.validate().with_context(|| format!("job `{spec}`"))?;
    Ok(job)
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// A run folder's job, for `--resume`: only how long to run may change.
fn resumed_job(run_dir: &Path, a: &JobArgs) -> anyhow::Result<JobConfig> {
    let path = run_dir.join("job.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is not a run folder (no job.json to resume)",
            run_dir.display()
        )
    })?;
    let mut job: JobConfig =
        serde_json::from_str(&text).with_context(|| format!("{} is damaged", path.display()))?;
    if let Some(e) = a.epochs {
        job.epochs = e;
    }
    if a.steps.is_some() {
        job.max_steps = a.steps;
    }
    if let Some(n) = a.checkpoint_every {
        job.checkpoint_every = n;
    }
    Ok(job)
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let (mut job, run_dir) = match &a.resume {
        Some(dir) => (resumed_job(dir, &a.job)?, Some(dir.clone())),
        None => (job_from_args(&a.job, None)?, a.run_dir.clone()),
    };
    // One process holds both columns.
    job.topology = Topology {
        replicas: 1,
        columns_per_worker: alexnet::model::config::COLUMNS,
    };
    job.validate()?;
    let resume = match (&a.resume, &run_dir) {
        (Some(_), Some(dir)) => alexnet::train::checkpoint::latest(dir, Some(&job.hash()))?,
        _ => None,
    };
    if a.resume.is_some() && resume.is_none() {
        tracing::warn!("the run folder has no checkpoint yet: starting from the beginning");
    }
    if let Some(dir) = &run_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        alexnet::data::prepare::write_atomic(
            &dir.join("job.json"),
            serde_json::to_string_pretty(&job)?.as_bytes(),
        )?;
    }
    let mut book = JobBook::new(
        BookSetup {
            log_every: a.job.log_every.max(1) as u64,
            classes: job.net.classes,
            schedule: job.schedule,
            lr: job.sgd.lr,
            run_dir: run_dir.clone(),
            keep: job.keep_checkpoints,
            seed: job.seed,
            config_hash: job.hash(),
            generation: resume.as_ref().map(|r| r.1.generation + 1).unwrap_or(0),
        },
        resume.as_ref().map(|r| &r.1),
    );
    let steps = alexnet::with_device!(choose_backend(a.backend)?, backend => {
        let role = alexnet::train::job::Role {
            replica: 0,
            columns: Box::new(alexnet::comm::LocalExchange::default()),
            replicas: None,
            run_dir: run_dir.clone(),
            resume: resume
                .as_ref()
                .map(|(d, m)| (d.clone(), m.step, m.schedule.lr)),
            memory_sharers: 1,
        };
        let (net, steps) = alexnet::train::job::run(&job, backend, role, &mut book)?;
        if let Some(out) = &a.out {
            for path in alexnet::train::job::save_columns(&net, out)? {
                tracing::info!(path = %path.display(), "parameters written");
            }
        }
        steps
    });
    match book.monitor.results.last() {
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

/// The backend `selftest --backend` checks: `auto` takes the GPU where a driver and a device
/// are present, and checks the CPU otherwise (saying so); `cuda` insists on the GPU.
fn selftest_backend(choice: BackendChoice) -> BackendChoice {
    if !matches!(choice, BackendChoice::Auto) {
        return choice;
    }
    #[cfg(feature = "cuda")]
    let why_not = alexnet::backend::cuda::unavailable();
    #[cfg(not(feature = "cuda"))]
    let why_not = Some("this binary was built without the CUDA backend (cargo feature `cuda`)");
    match why_not {
        None => BackendChoice::Cuda,
        Some(why) => {
            tracing::info!("backend auto: {why}: checking the CPU");
            BackendChoice::Cpu
        }
    }
}

/// [`alexnet::backend::selftest::processes`]: this binary's two layouts of a short job, in a
/// scratch folder that is removed afterwards where the check passed (kept for its logs
/// otherwise).
fn selftest_processes(
    backend: &str,
    limit: std::time::Duration,
    tolerance: f64,
) -> anyhow::Result<Vec<selftest::Check>> {
    let exe = std::env::current_exe().context("finding this binary, to run its processes")?;
    let dir = std::env::temp_dir().join(format!("alexnet-selftest-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    tracing::info!(
        backend,
        "running a short job as one process, then as two worker processes"
    );
    let checks = selftest::processes(&exe, backend, &dir, limit, tolerance);
    if checks.iter().all(selftest::Check::passed) {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        tracing::error!(dir = %dir.display(), "the layouts' runs are kept here");
    }
    Ok(checks)
}

fn selftest(a: SelftestArgs) -> anyhow::Result<()> {
    // `--require-all` asks for the GPU: `auto` does not fall back to the CPU then.
    let backend = match (a.backend, a.require_all) {
        (BackendChoice::Auto, true) => BackendChoice::Cuda,
        (choice, _) => selftest_backend(choice),
    };
    anyhow::ensure!(
        !(a.require_all && matches!(backend, BackendChoice::Cpu)),
        "--require-all asks for the GPU's libraries (cuDNN, NCCL): use it with --backend cuda"
    );
    use alexnet::backend::golden;
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    tracing::info!(seed, "selftest inputs (rerun with --seed to repeat)");
    let process_limit = seconds(a.process_timeout, "--process-timeout")?;
    let reference = Cpu::with_threads(1);
    let (checks, informational) = match backend {
        BackendChoice::Cpu => {
            let cpu = Cpu::new();
            let mut checks = selftest::ops(&reference, &cpu, seed, a.tolerance);
            checks.extend(golden::ops(&cpu, a.tolerance)?);
            checks.extend(selftest::network(
                &demo_net(),
                Cpu::with_threads(1),
                Cpu::new(),
                a.batch,
                seed,
                a.tolerance,
            )?);
            checks.extend(selftest_processes("cpu", process_limit, a.tolerance)?);
            (checks, Vec::new())
        }
        #[cfg(feature = "cuda")]
        BackendChoice::Cuda | BackendChoice::Auto => {
            use alexnet::backend::cuda::Cuda;
            let gpu = Cuda::open(0, false)?;
            tracing::info!(backend = %alexnet::backend::Backend::name(&gpu), "checking against the CPU");
            let mut checks = selftest::ops(&reference, &gpu, seed, a.tolerance);
            checks.extend(golden::ops(&gpu, a.tolerance)?);
            checks.push(selftest::finish_views(&gpu, seed)?);
            checks.push(selftest::uploads(&gpu, seed));
            checks.extend(selftest::network(
                &demo_net(),
                Cpu::with_threads(1),
                gpu,
                a.batch,
                seed,
                a.tolerance,
            )?);
            // The cuDNN convolutions (ALEXNET_CONV=cudnn), judged where cuDNN is here.
            if alexnet::backend::cuda::cudnn::present() {
                use alexnet::backend::cuda::ConvPath;
                let dnn = Cuda::open_with(0, false, ConvPath::Cudnn)?;
                let mut more = selftest::ops(&reference, &dnn, seed, a.tolerance);
                more.extend(golden::ops(&dnn, a.tolerance)?);
                more.extend(selftest::network(
                    &demo_net(),
                    Cpu::with_threads(1),
                    dnn,
                    a.batch,
                    seed,
                    a.tolerance,
                )?);
                checks.extend(
                    more.into_iter()
                        .filter(|c| c.what.contains("conv") || c.what.starts_with("network"))
                        .map(|mut c| {
                            c.what = format!("cuDNN: {}", c.what);
                            c
                        }),
                );
            } else if a.require_all {
                tracing::error!("cuDNN cannot be loaded (libcudnn.so.9), and --require-all");
                checks.push(selftest::Check {
                    what: "cuDNN: libcudnn.so.9 loaded".into(),
                    error: f64::INFINITY,
                    tolerance: a.tolerance,
                });
            } else {
                tracing::warn!("cuDNN not checked: libcudnn.so.9 cannot be loaded");
            }
            // NCCL on this GPU: judged where its library is here (multi-GPU jobs need it).
            match alexnet::comm::nccl::check_libraries() {
                Err(e) if a.require_all => {
                    tracing::error!("NCCL: {e:#}, and --require-all");
                    checks.push(selftest::Check {
                        what: "NCCL: libnccl.so loaded".into(),
                        error: f64::INFINITY,
                        tolerance: a.tolerance,
                    });
                }
                Err(e) => tracing::warn!("NCCL not checked: {e:#}"),
                Ok(()) => {
                    let r = alexnet::comm::nccl::one_rank_check(0);
                    if let Err(e) = &r {
                        tracing::error!("NCCL: {e:#}");
                    }
                    checks.push(selftest::Check {
                        what: "NCCL: one-rank all-reduce, one-replica group".into(),
                        error: if r.is_ok() { 0.0 } else { f64::INFINITY },
                        tolerance: a.tolerance,
                    });
                }
            }
            // Last: the processes, which take the most time.
            checks.extend(selftest_processes("cuda", process_limit, a.tolerance)?);
            // TF32 rounds products' inputs to 10 bits: reported, not judged.
            let tf32 = Cuda::open(0, true)?;
            (checks, selftest::ops(&reference, &tf32, seed, 1e-2))
        }
        #[cfg(not(feature = "cuda"))]
        BackendChoice::Cuda | BackendChoice::Auto => {
            anyhow::bail!("this binary was built without the CUDA backend (cargo feature `cuda`)")
        }
    };
    let failed = checks.iter().filter(|c| !c.passed()).count();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "seed": seed, "checks": checks, "tf32": informational, "failed": failed
            }))?
        );
    } else {
        print!("{}", selftest::render(&checks));
        if !informational.is_empty() {
            println!("\nwith TF32 (cuBLAS tensor cores; not judged):");
            print!("{}", selftest::render(&informational));
        }
    }
    anyhow::ensure!(failed == 0, "{failed} checks failed (seed {seed})");
    Ok(())
}

fn seconds(s: f64, what: &str) -> anyhow::Result<std::time::Duration> {
    std::time::Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| anyhow::anyhow!("{what} must be a positive number of seconds, not {s}"))
}

fn job_id_or_new(given: &Option<String>) -> String {
    given.clone().unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("job-{t}")
    })
}

/// The coordinator of a new run, or of the run in `resume` continued from its newest usable
/// checkpoint (in a new generation); returns it with the run folder.
fn coordinator_config(
    job_args: &JobArgs,
    layout: &LayoutArgs,
    run_dir: Option<&PathBuf>,
    resume: Option<&PathBuf>,
) -> anyhow::Result<(CoordinatorConfig, PathBuf)> {
    let peer_timeout = seconds(layout.peer_timeout, "--peer-timeout")?;
    let (job, job_id, run_dir, resume) = match resume {
        Some(dir) => {
            let job = resumed_job(dir, job_args)?;
            let id = std::fs::read_to_string(dir.join("job-id"))
                .map(|s| s.trim().to_string())
                .ok()
                .or_else(|| layout.job_id.clone())
                .unwrap_or_else(|| job_id_or_new(&None));
            let latest = alexnet::train::checkpoint::latest(dir, Some(&job.hash()))?;
            if latest.is_none() {
                tracing::warn!(run_dir = %dir.display(), "no checkpoint yet: the run starts from the beginning");
            }
            (job, id, dir.clone(), latest)
        }
        None => {
            let job = job_from_args(job_args, Some(layout))?;
            let id = job_id_or_new(&layout.job_id);
            let dir = run_dir
                .cloned()
                .unwrap_or_else(|| PathBuf::from("runs").join(&id));
            if !alexnet::train::checkpoint::list(&dir).is_empty() {
                anyhow::bail!(
                    "{} already holds checkpoints of a run: continue it with --resume {}, or choose another --run-dir",
                    dir.display(),
                    dir.display()
                );
            }
            (job, id, dir, None)
        }
    };
    job.validate()?;
    let generation = resume.as_ref().map(|r| r.1.generation + 1).unwrap_or(0);
    Ok((
        CoordinatorConfig {
            job_id,
            job,
            generation,
            peer_timeout,
            heartbeat: (peer_timeout / 10).min(std::time::Duration::from_secs(2)),
            rendezvous_timeout: seconds(layout.rendezvous_timeout, "--rendezvous-timeout")?,
            max_clock_skew: seconds(layout.max_clock_skew, "--max-clock-skew")?,
            restarts_left: 0,
            log_every: job_args.log_every.max(1) as u64,
            run_dir: Some(absolute(&run_dir)),
            resume,
            token: None,
            tls: None,
        },
        run_dir,
    ))
}

/// Writes a file only its owner can read.
fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = std::fs::OpenOptions::new();
    o.write(true).create(true).truncate(true);
    #[cfg(unix)]
    o.mode(0o600);
    let mut f = o
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

/// GPUs a launch or an agent can use: counted through the driver where the CUDA backend is
/// built, else none.
fn usable_gpus() -> usize {
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
fn worker_devices(choice: BackendChoice, what: &str) -> anyhow::Result<Vec<String>> {
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

fn launch(a: LaunchArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let devices = worker_devices(a.backend, "--backend")?;
    let (mut cfg, run_dir) =
        coordinator_config(&a.job, &a.layout, a.run_dir.as_ref(), a.resume.as_ref())?;
    if already_complete(&cfg, &run_dir) {
        return Ok(());
    }
    // A fresh token per launch, handed to the workers in their environment.
    cfg.token = Some(match read_token(None)? {
        Some(t) => t,
        None => Secret::random()?,
    });
    let workers = cfg.job.topology.world_size();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let threads = a.threads.unwrap_or((cores / workers).max(1));
    tracing::info!(
        workers,
        devices = ?devices,
        threads_per_worker = threads,
        "starting the workers"
    );
    let outcome = alexnet::coordinator::launch::run(LaunchOptions {
        coordinator: cfg,
        run_dir: run_dir.clone(),
        threads_per_worker: threads,
        devices,
        exe: std::env::current_exe().context("finding this binary to start workers")?,
        json_logs: log_format == LogFormat::Json,
        max_restarts: a.max_restarts,
    })?;
    report_exchange_share(&outcome.exchange_seconds);
    match (&outcome.phase, &outcome.first_failure) {
        (Phase::Finished, _) => {
            if let Some(last) = outcome.results.last() {
                tracing::info!(
                    epochs = last.epoch,
                    val_top1_err = format!("{:.3}", last.val_top1_err),
                    val_top5_err = format!("{:.3}", last.val_top5_err),
                    restarts = outcome.restarts,
                    run_dir = %run_dir.display(),
                    "done"
                );
            } else {
                tracing::info!(restarts = outcome.restarts, run_dir = %run_dir.display(), "done");
            }
            Ok(())
        }
        (_, Some(first)) => anyhow::bail!("first failure: {first} (logs in {})", run_dir.display()),
        (Phase::Failed { rank, error }, None) => anyhow::bail!(
            "first failure: {}: {error} (logs in {})",
            rank.map(|r| format!("rank {r}"))
                .unwrap_or_else(|| "the coordinator".into()),
            run_dir.display()
        ),
        (p, None) => anyhow::bail!("the job ended as {p:?}"),
    }
}

/// Logs each rank's share of training time spent waiting in the exchanges.
fn report_exchange_share(seconds: &[alexnet::coordinator::ExchangeSeconds]) {
    for s in seconds {
        let (rank, columns, replicas, total) = (s.rank, s.columns, s.replicas, s.train);
        if total > 0.0 {
            tracing::info!(
                rank,
                column_exchange_share = format!("{:.1}%", 100.0 * columns / total),
                replica_exchange_share = format!("{:.1}%", 100.0 * replicas / total),
                train_seconds = format!("{total:.2}"),
                "time in the exchanges"
            );
        }
    }
}

/// The job token from ALEXNET_TOKEN or a file (never from a flag: flags show in `ps`).
fn read_token(file: Option<&Path>) -> anyhow::Result<Option<Secret>> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the token file {}", path.display()))?;
        let t = text.trim();
        anyhow::ensure!(!t.is_empty(), "the token file {} is empty", path.display());
        return Ok(Some(Secret::new(t)));
    }
    Ok(std::env::var("ALEXNET_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(|t| Secret::new(t.trim())))
}

/// Whether the run being resumed is already complete (then there is nothing to start: a
/// coordinator restarted after its job finished must not wait for workers that will not come).
fn already_complete(cfg: &CoordinatorConfig, run_dir: &Path) -> bool {
    let Some((_, m)) = &cfg.resume else {
        return false;
    };
    let done = m.completes(cfg.job.epochs, cfg.job.max_steps);
    if done {
        tracing::info!(
            run_dir = %run_dir.display(),
            step = m.step,
            epochs = cfg.job.epochs,
            "the run is complete: nothing to train (extend it with --epochs or --steps)"
        );
    }
    done
}

fn coordinator(a: CoordinatorArgs) -> anyhow::Result<()> {
    let (mut cfg, run_dir) =
        coordinator_config(&a.job, &a.layout, a.run_dir.as_ref(), a.resume.as_ref())?;
    if already_complete(&cfg, &run_dir) {
        return Ok(());
    }
    alexnet::coordinator::launch::write_run_files(&run_dir, &cfg)?;
    let mut made_token = None;
    cfg.token = match read_token(a.token_file.as_deref())? {
        Some(t) => Some(t),
        None => {
            let t = Secret::random()?;
            let path = run_dir.join("token");
            write_private(&path, t.expose().as_bytes())?;
            made_token = Some(path);
            Some(t)
        }
    };
    if let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) {
        let c = std::fs::read(cert)
            .with_context(|| format!("reading --tls-cert {}", cert.display()))?;
        let k = std::fs::read_to_string(key)
            .with_context(|| format!("reading --tls-key {}", key.display()))?;
        cfg.tls = Some((c, Secret::new(k)));
    }
    let off_loopback = cfg.tls.is_none()
        && !a.listen.starts_with("127.")
        && !a.listen.starts_with("localhost")
        && !a.listen.starts_with("[::1]");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&a.listen)
            .await
            .with_context(|| format!("listening on {} (--listen)", a.listen))?;
        tracing::info!(
            listen = %listener.local_addr()?,
            tls = cfg.tls.is_some(),
            job = %cfg.job_id,
            config = %alexnet::train::job::JobConfig::hash(&cfg.job),
            workers = cfg.job.topology.world_size(),
            "coordinator listening; start the workers with `alexnet worker --coordinator http://THIS_HOST:PORT`"
        );
        if let Some(path) = &made_token {
            tracing::info!(
                file = %path.display(),
                "made a job token: workers need it (ALEXNET_TOKEN_FILE or --token-file)"
            );
        }
        if off_loopback {
            tracing::warn!(
                listen = %a.listen,
                "the control plane is not on loopback and has no TLS: pass --tls-cert and --tls-key on an untrusted network"
            );
        }
        cfg.restarts_left = a.max_restarts;
        let supervisor = alexnet::coordinator::generations::Supervisor::new(cfg)?;
        let (phase, c) = supervisor.serve(listener).await?;
        report_exchange_share(&c.exchange_seconds());
        match phase {
            Phase::Finished => Ok(()),
            Phase::Failed { rank, error } => anyhow::bail!(
                "the job failed: {}: {error}",
                rank.map(|r| format!("rank {r}")).unwrap_or_else(|| "coordinator".into())
            ),
            p => anyhow::bail!("the job ended as {p:?}"),
        }
    })
}

fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    alexnet::worker::run(alexnet::worker::WorkerOptions {
        coordinator: a.coordinator,
        job_id: a.job_id,
        config_hash: a.config_hash,
        generation: a.generation,
        rank: a.rank,
        device: a.device,
        threads: a.threads,
        connect_timeout: seconds(a.connect_timeout, "--connect-timeout")?,
        out: a.out,
        token: read_token(a.token_file.as_deref())?,
        tls_ca: a
            .tls_ca
            .as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("reading --tls-ca {}", p.display())))
            .transpose()?,
        tls_domain: a.tls_domain,
    })
}

/// GPUs this host shows (/dev/nvidia0, /dev/nvidia1, ...).
fn visible_gpus() -> usize {
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

fn agent(a: AgentArgs, log_format: LogFormat) -> anyhow::Result<()> {
    let devices = worker_devices(a.device, "--device")?;
    let on_gpus = devices.iter().any(|d| d.starts_with("cuda"));
    let visible = visible_gpus();
    if !on_gpus && visible > 0 {
        tracing::warn!(
            visible,
            "GPU device files are present but the CUDA backend cannot use them: CPU workers"
        );
    }
    alexnet::agent::run(alexnet::agent::AgentOptions {
        coordinator: a.coordinator,
        job_id: a.job_id,
        node_rank: a.node_rank,
        workers: a.workers.unwrap_or(if on_gpus { devices.len() } else { 1 }),
        devices,
        threads_per_worker: a.threads,
        max_restarts: a.max_restarts,
        rejoin_timeout: seconds(a.rejoin_timeout, "--rejoin-timeout")?,
        max_clock_skew: seconds(a.max_clock_skew, "--max-clock-skew")?,
        token: read_token(a.token_file.as_deref())?,
        tls_ca: a.tls_ca,
        tls_domain: a.tls_domain,
        exe: std::env::current_exe().context("finding this binary to start workers")?,
        json_logs: log_format == LogFormat::Json,
        log_dir: a.log_dir,
        out: a.out,
    })
}

fn status(a: StatusArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let token = read_token(a.token_file.as_deref())?;
    let opts = alexnet::worker::WorkerOptions {
        tls_ca: a
            .tls_ca
            .as_ref()
            .map(|p| std::fs::read(p).with_context(|| format!("reading --tls-ca {}", p.display())))
            .transpose()?,
        ..alexnet::worker::WorkerOptions::client_of(&a.coordinator, token)
    };
    let s = rt.block_on(async {
        let mut client = alexnet::worker::client(&opts).await?;
        anyhow::Ok(
            client
                .status(alexnet::proto::StatusRequest {})
                .await
                .map_err(|s| anyhow::anyhow!("status: {}", s.message()))?
                .into_inner(),
        )
    })?;
    if a.json {
        let workers: Vec<serde_json::Value> = s
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({"rank": w.rank, "host": w.host, "device": w.device, "pid": w.pid,
                    "state": w.state, "step": w.step, "seconds_since_heard": w.seconds_since_heard,
                    "rss_bytes": w.rss_bytes, "error": w.error})
            })
            .collect();
        let v = serde_json::json!({"job_id": s.job_id, "generation": s.generation, "state": s.state,
            "world_size": s.world_size, "step": s.step, "total_steps": s.total_steps, "epoch": s.epoch,
            "loss": s.loss, "images_per_s": s.images_per_s, "eta_seconds": s.eta_seconds,
            "config_hash": s.config_hash, "error": s.error, "workers": workers});
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!(
        "job {} (generation {}, config {}): {}",
        s.job_id, s.generation, s.config_hash, s.state
    );
    if !s.error.is_empty() {
        println!("error: {}", s.error);
    }
    println!(
        "step {}/{}  epoch {}  loss {:.4}  {:.1} images/s  ETA {:.0}s",
        s.step, s.total_steps, s.epoch, s.loss, s.images_per_s, s.eta_seconds
    );
    println!("rank  state     step  heard(s)  rss(MiB)  host / device / pid");
    for w in &s.workers {
        println!(
            "{:>4}  {:<8} {:>5}  {:>8.1}  {:>8}  {} / {} / {}{}",
            w.rank,
            w.state,
            w.step,
            w.seconds_since_heard,
            w.rss_bytes >> 20,
            w.host,
            w.device,
            w.pid,
            if w.error.is_empty() {
                String::new()
            } else {
                format!("  ({})", w.error)
            }
        );
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
