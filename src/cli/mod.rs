//! The command line: what each command accepts, as clap parses it.
//!
//! These modules belong to the binary rather than the library: they turn flags into the
//! library's configurations and calls, and nothing else uses them.
//!
//! - [`plan`]: the job, the coordinator and the run folder a command line describes.
//! - [`devices`]: which backend and which devices the workers take.
//! - [`commands`]: what each command does.
//! - [`dry_run`]: the checks of `--dry-run`.
//! - [`status`]: `alexnet status`.

pub mod commands;
pub mod devices;
pub mod dry_run;
pub mod plan;
pub mod status;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

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
pub struct Cli {
    /// Log format: human-readable text or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "ALEXNET_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Check the command line (and a job file it names, where it exists), print what would
    /// run, and exit without starting anything. The deployment recipes are checked this way.
    #[arg(long, global = true)]
    pub dry_run: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BackendChoice {
    /// CUDA where a driver and a GPU are present, else the CPU (the log says which and why).
    Auto,
    Cpu,
    Cuda,
}

/// How the devices run, for every command that opens one (and handed to a launcher's workers
/// on their command line).
#[derive(clap::Args, Clone, Debug)]
#[command(next_help_heading = "Device settings")]
pub struct DeviceArgs {
    /// The most memory the job's CPU workers on this machine may take for their buffers
    /// together (bytes, or with K, M, G or T: 12G), where the machine has more than the job
    /// should use and no container limit says so. A batch that does not fit is refused up
    /// front. Default: what the machine and its control group have free.
    #[arg(long, value_name = "SIZE", value_parser = memory_size, env = "ALEXNET_MEMORY_LIMIT")]
    pub memory_limit: Option<u64>,
    /// GPUs: allow TF32 tensor cores in matrix products and convolutions (faster; inputs
    /// rounded to 10 bits). Default: strict f32, within 1e-4 of the CPU.
    #[arg(long, env = "ALEXNET_TF32")]
    pub tf32: bool,
    /// GPUs: how convolutions run: `unfold` (im2col and cuBLAS) or `cudnn`.
    #[arg(long, value_enum, default_value_t = alexnet::backend::ConvPath::Unfold, env = "ALEXNET_CONV")]
    pub conv: alexnet::backend::ConvPath,
    /// GPUs with `--conv cudnn`: `timed` runs each algorithm once and takes the fastest
    /// (PyTorch's cudnn.benchmark); `heuristic` takes cuDNN's guess and times nothing.
    #[arg(long, value_enum, default_value_t = alexnet::backend::AlgoChoice::Timed, env = "ALEXNET_CUDNN_ALGOS")]
    pub cudnn_algos: alexnet::backend::AlgoChoice,
}

impl DeviceArgs {
    pub fn settings(&self) -> alexnet::backend::DeviceSettings {
        alexnet::backend::DeviceSettings {
            memory_limit: self.memory_limit,
            tf32: self.tf32,
            conv: self.conv,
            cudnn_algos: self.cudnn_algos,
        }
    }
}

#[derive(Subcommand)]
pub enum Command {
    /// Train on IDX files (Fashion-MNIST layout) or a prepared dataset, reporting validation error.
    #[command(
        after_help = "Examples:\n  alexnet train                                         the demo network on the carried sample\n  alexnet train --steps 200 --run-dir runs/try1          keep checkpoints and the report\n  alexnet train --resume runs/try1 --epochs 20           continue it, longer\n  alexnet train --data /data/prepared/train --val /data/prepared/val --out params\n  alexnet train --data mine/train --val mine/val --init imagenet.safetensors --reinit fc8 --freeze conv1..conv5   fine-tune"
    )]
    Train(TrainArgs),
    /// Time full training steps (forward, backward, update) on random data.
    #[command(
        after_help = "Examples:\n  alexnet bench --batch 128                    the paper's network, training steps\n  alexnet bench --net demo --batch 64 --json   the demo network, as JSON\n  alexnet bench --backend cuda --conv cudnn    the GPU, convolutions on cuDNN"
    )]
    Bench(BenchArgs),
    /// Project a run larger than this machine: images/s, the exchanges' share of the step and
    /// the bytes per rank, for pairs of GPUs replicated over hosts (a model, not a measurement).
    ///
    /// Each replica's two columns run on two GPUs of one host; hosts hold gpus-per-host / 2
    /// replicas. From a pair's step time without exchanges (--step-ms, or --measure on this
    /// machine's device), the columns' exchange over NVLink at the layer shapes' bytes, and the
    /// replicas' ring over the hosts' links, overlapped with compute as the runtime does it.
    /// The model is spelled out in src/train/scaling.rs.
    #[command(after_help = "Examples:
  alexnet plan --hosts 1,2,4,8,16,64 --link 100 --step-ms 60   the paper's network, 8 GPUs a host
  alexnet plan --hosts 4 --gpus-per-host 2 --link 25 --measure   time a step here first
  alexnet plan --hosts 8 --link 400 --step-ms 60 --json")]
    Plan(PlanArgs),
    /// Turn an ImageFolder tree into the paper's preprocessed, sharded form.
    ///
    /// Reads root/<class>/<image> (JPEG or PNG, any size, grey or colour) and writes 256x256
    /// RGB images (shorter side to 256, central crop) in shards, with the mean image and the RGB
    /// PCA in dataset.json. Interrupted runs leave nothing that looks complete; rerun to finish.
    #[command(
        after_help = "Examples:\n  alexnet prepare --input ~/photos --output data/photos\n  alexnet prepare --input ~/photos --output data/photos --val-fraction 0.2   train/ and val/\n  alexnet prepare --input imagenet/ILSVRC/Data/CLS-LOC/val --labels LOC_val_solution.csv --class-names LOC_synset_mapping.txt --output /data/prepared/val\n  alexnet prepare --input /data/imagenet/train --output /data/prepared/train\n  alexnet prepare --input /data/imagenet/val --output /data/prepared/val"
    )]
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
    #[command(
        after_help = "Examples:\n  alexnet selftest                      the GPU where there is one, else the CPU\n  alexnet selftest --backend cuda --json"
    )]
    Selftest(SelftestArgs),
    /// Train across worker processes on this machine: a coordinator here, one worker per device.
    ///
    /// With no arguments: the narrow network of the paper's topology on the carried sample,
    /// its two columns in two CPU worker processes that exchange activations over TCP only at
    /// conv3, fc6, fc7, fc8 and the logits. Logs go to stderr with a rank prefix and to one
    /// file per rank in the run folder.
    #[command(
        after_help = "Examples:\n  alexnet launch                                     the demo job, 2 CPU workers\n  alexnet launch --replicas 2 --batch 128           2 replicas x 2 columns = 4 workers\n  alexnet launch --config jobs/paper.toml --data /data/prepared/train --val /data/prepared/val\n  alexnet launch --resume runs/job-1796666779 --epochs 20\n  alexnet status --run runs/job-1796666779          watch it from another terminal"
    )]
    Launch(LaunchArgs),
    /// Run the coordinator of a multi-machine job; workers join it with `alexnet worker`.
    #[command(
        after_help = "Examples:\n  alexnet coordinator --listen 0.0.0.0:50051 --replicas 2 --run-dir /shared/runs/r1\n  alexnet coordinator --listen 0.0.0.0:50051 --replicas 3:4 --batch 96 --rejoin-timeout 120   elastic: goes on with 3 if a host is lost\n  alexnet coordinator --resume /shared/runs/r1"
    )]
    Coordinator(CoordinatorArgs),
    /// Run one worker of a job: join the coordinator, train this rank's part, report.
    #[command(
        after_help = "Examples:\n  alexnet worker --coordinator http://head:50051 --token-file /shared/runs/r1/token\n  alexnet worker --coordinator http://head:50051 --device cuda:1 --rank 3"
    )]
    Worker(WorkerArgs),
    /// Run this host's part of a multi-host job: start its workers, forward their logs,
    /// restart those that fail (they rejoin from the newest checkpoint), stop them on SIGTERM.
    ///
    /// One agent per host, like torchrun per node: with `--node-rank K --workers G` this
    /// host's workers take ranks K*G .. K*G+G-1 (rank 2r+c holds column c of replica r). The
    /// coordinator (`alexnet coordinator --listen 0.0.0.0:50051`) runs on one host; the run
    /// folder must be the same path on every host (shared storage) for checkpoints.
    #[command(
        after_help = "Examples:\n  alexnet agent --coordinator http://head:50051 --node-rank 0 --workers 2 --token-file token\n  alexnet agent --coordinator http://head:50051 --node-rank 1 --device cuda"
    )]
    Agent(AgentArgs),
    /// Show a running job's state: workers, step, loss, speed, ETA.
    #[command(
        after_help = "Examples:\n  alexnet status --run runs/job-1796666779     a run started by `alexnet launch`\n  alexnet status                               the one live run under ./runs\n  alexnet status --coordinator http://head:50051 --token-file token --json\n  alexnet status --watch                       redraw every 2 s until the job ends"
    )]
    Status(StatusArgs),
    /// Top-1 and top-5 error of a trained run (its newest checkpoint) on a dataset.
    #[command(
        after_help = "Examples:\n  alexnet eval --run runs/job-1796666779\n  alexnet eval --run runs/job-1796666779 --data /data/prepared/val --ten-crop\n  alexnet eval --run runs/job-1796666779 --confusion      the matrix, and RUN/confusion.csv"
    )]
    Eval(EvalArgs),
    /// The top-5 classes of image files, with probabilities, by a trained run.
    #[command(
        after_help = "Examples:\n  alexnet predict --run runs/job-1796666779 cat.jpg dog.png\n  alexnet predict --run runs/job-1796666779 --top 3 photos/*.jpg\n  alexnet predict --run runs/job-1796666779 --top 1 photos/      every image under it, a line each\n  alexnet predict --run runs/job-1796666779 --json photos/ > predictions.jsonl"
    )]
    Predict(PredictArgs),
    /// Write a trained run's parameters as one safetensors file, unsplit, with PyTorch's names
    /// and shapes (start another run from it with `--init`).
    #[command(
        after_help = "Examples:\n  alexnet export --run runs/job-1796666779 --out model.safetensors\n  alexnet launch --init model.safetensors            start another run from it"
    )]
    Export(ExportArgs),
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// The run folder (`launch`/`train --run-dir`).
    #[arg(long)]
    pub run: PathBuf,
    /// The dataset: IDX files (their t10k set is used) or a prepared dataset with the run's
    /// classes. Default: the run's validation data.
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Average the softmax over the paper's ten patches (corners, centre, mirrored).
    #[arg(long)]
    pub ten_crop: bool,
    /// Images per forward pass.
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    /// Also print the confusion matrix (rows: true classes, columns: predicted) and write
    /// it to confusion.csv in the run folder (or to --confusion-csv).
    #[arg(long)]
    pub confusion: bool,
    /// Where --confusion writes its CSV file. [default: RUN/confusion.csv]
    #[arg(long, value_name = "FILE", requires = "confusion")]
    pub confusion_csv: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct PredictArgs {
    /// The run folder.
    #[arg(long)]
    pub run: PathBuf,
    /// Image files (JPEG or PNG), or folders: a folder stands for every image under it
    /// (sorted), each on one line.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
    /// Classes shown per image.
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub top: usize,
    /// One JSON object per image and line: {"file", "top": [{"class", "name", "p"}]} (a file
    /// that could not be read: {"file", "error"}).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The run folder.
    #[arg(long)]
    pub run: PathBuf,
    /// The file to write.
    #[arg(long)]
    pub out: PathBuf,
}

/// How the job is spread over workers, and how long a silent peer is waited for.
#[derive(clap::Args, Clone)]
pub struct LayoutArgs {
    /// Copies of the pair of columns (data parallelism), each on its part of the batch:
    /// N, or MIN:MAX for elastic replicas (`alexnet coordinator` only): each generation runs
    /// with as many whole replicas as have joined when the rendezvous (or, after a host is
    /// lost, --rejoin-timeout) ends, at least MIN; a host that comes back joins at the next
    /// checkpoint. Every count in the range must divide --batch. [default: 1]
    #[arg(long, env = "ALEXNET_REPLICAS", value_name = "N|MIN:MAX")]
    pub replicas: Option<alexnet::comm::ReplicaRange>,
    /// Columns per worker: 1 (the paper: one column per device) or 2 (a worker holds both). [default: 1]
    #[arg(long)]
    pub columns_per_worker: Option<usize>,
    /// Seconds without news from a peer (heartbeat, data) before it counts as lost.
    #[arg(long, default_value = "60", value_parser = seconds, env = "ALEXNET_PEER_TIMEOUT")]
    pub peer_timeout: Duration,
    /// Seconds the first worker waits for the last one to join.
    #[arg(long, default_value = "300", value_parser = seconds)]
    pub rendezvous_timeout: Duration,
    /// Job name; workers started for another job are refused. Default: job-<unix time>.
    #[arg(long, env = "ALEXNET_JOB_ID")]
    pub job_id: Option<String>,
    /// Seconds a worker's clock may differ from the coordinator's before it is refused.
    #[arg(long, default_value = "60", value_parser = seconds, env = "ALEXNET_MAX_CLOCK_SKEW")]
    pub max_clock_skew: Duration,
}

/// Prometheus's view of the process.
#[derive(clap::Args, Clone, Debug)]
pub struct MetricsArgs {
    /// Serve Prometheus metrics at http://ADDR/metrics (off by default). A bare port listens
    /// on loopback (9401: 127.0.0.1:9401); 0.0.0.0:9401 lets a Prometheus elsewhere scrape
    /// it. Conventional ports: 9401 for a coordinator or a launch, 9402 for an agent.
    #[arg(long, env = "ALEXNET_METRICS_LISTEN", value_parser = metrics_address, value_name = "ADDR")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(clap::Args)]
pub struct LaunchArgs {
    #[command(flatten)]
    pub job: JobArgs,
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Where job.json, rank<N>.log and the trained parameters (params/) go. Default: runs/<job id>.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in this folder from its newest complete checkpoint, in a new
    /// generation (`--epochs` and `--steps` may extend it; nothing else changes).
    #[arg(long, conflicts_with = "run_dir")]
    pub resume: Option<PathBuf>,
    /// Times the workers are restarted (from the newest checkpoint) after a failure.
    #[arg(long, default_value_t = 3)]
    pub max_restarts: usize,
    /// Compute threads per worker. Default: the cores divided among the workers.
    #[arg(long)]
    pub threads: Option<usize>,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    #[command(flatten)]
    pub device_settings: DeviceArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(clap::Args)]
pub struct CoordinatorArgs {
    #[command(flatten)]
    pub job: JobArgs,
    #[command(flatten)]
    pub layout: LayoutArgs,
    /// Address to listen on. The default takes connections from this machine only; use
    /// 0.0.0.0:50051 (on a trusted network) for workers on other hosts.
    #[arg(long, default_value = "127.0.0.1:50051", env = "ALEXNET_LISTEN", value_parser = listen_address)]
    pub listen: String,
    /// The run folder (checkpoint manifests, report); workers must see the same path.
    /// Default: runs/<job id>.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in this folder from its newest complete checkpoint.
    #[arg(long, conflicts_with = "run_dir")]
    pub resume: Option<PathBuf>,
    /// A file holding the job's token (or set ALEXNET_TOKEN). Without either, a random token
    /// is made and written to RUN_DIR/token (readable by its owner only) for the workers.
    #[arg(long, env = "ALEXNET_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Serve the control plane over TLS with this PEM certificate (chain)...
    #[arg(long, requires = "tls_key", env = "ALEXNET_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// ... and this PEM private key.
    #[arg(long, requires = "tls_cert", env = "ALEXNET_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// New generations (from the newest checkpoint, the workers rejoining) allowed after
    /// failures before the job fails.
    #[arg(long, default_value_t = 3, env = "ALEXNET_MAX_RESTARTS")]
    pub max_restarts: u32,
    /// Elastic replicas (--replicas MIN:MAX): seconds a generation after a failure waits for
    /// every replica to rejoin before it goes on with the whole ones that did (at least MIN).
    #[arg(long, default_value = "60", value_parser = seconds, env = "ALEXNET_REJOIN_TIMEOUT")]
    pub rejoin_timeout: Duration,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(clap::Args)]
pub struct AgentArgs {
    /// The coordinator, as http://host:port (https:// with --tls-ca).
    #[arg(long, env = "ALEXNET_COORDINATOR", value_parser = coordinator_url)]
    pub coordinator: String,
    /// Only join this job: an agent pointed at another job's coordinator stops with an error.
    #[arg(long, env = "ALEXNET_JOB_ID")]
    pub job_id: Option<String>,
    /// This host's index among the hosts (0, 1, ...): its workers take ranks
    /// NODE_RANK*WORKERS onwards. Default: whatever ranks are free.
    #[arg(long, env = "ALEXNET_NODE_RANK")]
    pub node_rank: Option<u32>,
    /// Workers on this host. Default: one per GPU, or 1 without GPUs.
    #[arg(long, env = "ALEXNET_WORKERS", value_parser = at_least_one)]
    pub workers: Option<usize>,
    /// `auto`: one worker per GPU where there are GPUs, else CPU workers; `cuda`: GPUs only.
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto, env = "ALEXNET_DEVICE")]
    pub device: BackendChoice,
    /// Compute threads per worker. Default: the cores divided among the workers.
    #[arg(long, env = "ALEXNET_THREADS")]
    pub threads: Option<usize>,
    /// Worker restarts allowed on this host in all.
    #[arg(long, default_value_t = 3, env = "ALEXNET_MAX_RESTARTS")]
    pub max_restarts: usize,
    /// Seconds a (re)started worker keeps trying to reach the coordinator: how long this
    /// host may be cut off from it and still rejoin.
    #[arg(long, default_value = "300", value_parser = seconds, env = "ALEXNET_REJOIN_TIMEOUT")]
    pub rejoin_timeout: Duration,
    /// Seconds this host's clock may differ from the coordinator's.
    #[arg(long, default_value = "60", value_parser = seconds, env = "ALEXNET_MAX_CLOCK_SKEW")]
    pub max_clock_skew: Duration,
    /// Each rank's log file goes here too (rank<N>.log).
    #[arg(long, env = "ALEXNET_LOG_DIR")]
    pub log_dir: Option<PathBuf>,
    /// Where replica 0's workers write their trained columns at the end.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A file holding the job's token (or set ALEXNET_TOKEN).
    #[arg(long, env = "ALEXNET_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The authority's PEM certificate, for a coordinator serving TLS.
    #[arg(long, env = "ALEXNET_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The name the coordinator's certificate must carry (default: the URL's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
    #[command(flatten)]
    pub device_settings: DeviceArgs,
    #[command(flatten)]
    pub metrics: MetricsArgs,
}

#[derive(clap::Args)]
pub struct WorkerArgs {
    /// The coordinator, as http://host:port.
    #[arg(long, env = "ALEXNET_COORDINATOR", value_parser = coordinator_url)]
    pub coordinator: String,
    /// `cpu`, or `cuda:N` (GPU N; `cuda` is `cuda:0`).
    #[arg(long, default_value = "cpu", env = "ALEXNET_DEVICE")]
    pub device: String,
    /// Ask for this rank (default: the next free one).
    #[arg(long, env = "ALEXNET_RANK")]
    pub rank: Option<u32>,
    /// Only join this job.
    #[arg(long, env = "ALEXNET_JOB_ID")]
    pub job_id: Option<String>,
    /// Only join a job with this configuration hash.
    #[arg(long)]
    pub config_hash: Option<String>,
    /// Only join this generation of the job.
    #[arg(long)]
    pub generation: Option<u64>,
    /// Compute threads (default: every core).
    #[arg(long, env = "ALEXNET_THREADS")]
    pub threads: Option<usize>,
    /// Seconds to keep trying to reach the coordinator.
    #[arg(long, default_value = "30", value_parser = seconds)]
    pub connect_timeout: Duration,
    /// Write this worker's trained columns here (replica 0 only).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// A file holding the job's token (or set ALEXNET_TOKEN); a job with a token refuses
    /// workers without it.
    #[arg(long, env = "ALEXNET_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The PEM certificate of the authority that signed the coordinator's TLS certificate
    /// (use an https:// coordinator URL).
    #[arg(long, env = "ALEXNET_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// The name the coordinator's certificate must carry (default: the URL's host).
    #[arg(long)]
    pub tls_domain: Option<String>,
    #[command(flatten)]
    pub device_settings: DeviceArgs,
}

#[derive(clap::Args)]
pub struct StatusArgs {
    /// The run folder of a live run (`alexnet launch` or `alexnet coordinator` keep its
    /// address and token there while it runs). Default: the current folder if it is one, or
    /// the one live run under ./runs.
    #[arg(long, conflicts_with = "coordinator")]
    pub run: Option<PathBuf>,
    /// The coordinator, as http://host:port, for a run whose folder is not here.
    /// [default: http://127.0.0.1:50051]
    #[arg(long, env = "ALEXNET_COORDINATOR", value_parser = coordinator_url)]
    pub coordinator: Option<String>,
    /// Print the status as JSON.
    #[arg(long, conflicts_with = "watch")]
    pub json: bool,
    /// Redraw every --interval seconds (the job's progress bar with ETA, a row per rank)
    /// until the job ends or Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// Seconds between redraws with --watch.
    #[arg(long, default_value = "2", value_parser = seconds, requires = "watch")]
    pub interval: Duration,
    /// A file holding the job's token (or set ALEXNET_TOKEN).
    #[arg(long, env = "ALEXNET_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// The authority's PEM certificate, for a coordinator serving TLS.
    #[arg(long, env = "ALEXNET_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct PrepareArgs {
    /// The ImageFolder tree: one folder per class (e.g. ImageNet's n01440764), images inside.
    #[arg(long)]
    pub input: PathBuf,
    /// Where the shards and dataset.json go (created if missing).
    #[arg(long)]
    pub output: PathBuf,
    /// Images per shard (1024 at 256x256 is about 200 MB).
    #[arg(long, default_value_t = 1024)]
    pub shard_images: usize,
    /// Side of the stored images.
    #[arg(long, default_value_t = 256)]
    pub side: usize,
    /// Stop at the first file that is not a readable image instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// No progress bar (logs only).
    #[arg(long)]
    pub no_progress: bool,
    /// Split the input into OUTPUT/train and OUTPUT/val: this share of each class's images
    /// goes to val/ (0.1: a tenth). Whether an image goes is a function of its path under
    /// --input and --seed alone, so adding images never moves the others; val/ takes the
    /// training part's mean image and RGB PCA.
    #[arg(long, value_name = "F")]
    pub val_fraction: Option<f64>,
    /// A label file for a flat folder of images in --input: ILSVRC-2012's
    /// LOC_val_solution.csv (header `ImageId,PredictionString`; the class is the prediction
    /// string's first word) or `file,class` lines. Images it does not name are skipped.
    #[arg(long, value_name = "FILE")]
    pub labels: Option<PathBuf>,
    /// The classes' human names, kept in dataset.json and shown by `predict` and `eval`:
    /// LOC_synset_mapping.txt (`n01440764 tench, Tinca tinca`: a class, then its name). With
    /// --labels, the classes are all of this file's, sorted as class folders are, so that a
    /// validation set lacking a class still lines up with its training set.
    #[arg(long, value_name = "FILE")]
    pub class_names: Option<PathBuf>,
    /// Seeds the --val-fraction split (another seed, another split).
    #[arg(long, default_value_t = 1, requires = "val_fraction")]
    pub seed: u64,
}

#[derive(clap::Args)]
pub struct SelftestArgs {
    #[arg(long, value_enum, default_value_t = BackendChoice::Cuda)]
    pub backend: BackendChoice,
    /// Largest allowed error, relative to each output's scale.
    #[arg(long, default_value_t = 1e-4)]
    pub tolerance: f64,
    /// Seeds the random inputs (a fresh one each run by default).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Images in the whole-network step (the demo network).
    #[arg(long, default_value_t = 8)]
    pub batch: usize,
    /// Seconds each run of the short job in one and in two worker processes may take.
    #[arg(long, default_value = "60", value_parser = seconds)]
    pub process_timeout: Duration,
    /// Print the checks as JSON.
    #[arg(long)]
    pub json: bool,
    /// Fail where cuDNN or NCCL cannot be loaded, rather than skip their checks with a
    /// warning: for a GPU machine that must have them (`scripts/gpu-check.sh` passes it).
    #[arg(long)]
    pub require_all: bool,
}

#[derive(clap::Args)]
pub struct BenchDataArgs {
    /// JPEGs to make and prepare.
    #[arg(long, default_value_t = 1000)]
    pub images: usize,
    /// Samples per loader batch.
    #[arg(long, default_value_t = 128)]
    pub batch: usize,
    /// Photographs to make the JPEGs from (an ImageFolder tree).
    #[arg(long, default_value = "data/sample/imagenet-photos")]
    pub photos: PathBuf,
    /// Scratch folder (removed afterwards).
    #[arg(long, default_value = "target/bench-data")]
    pub work: PathBuf,
    /// Print the report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

/// What to train, shared by `train` (one process), `launch` and `coordinator` (workers).
/// Flags override the job file (`--config`).
#[derive(clap::Args, Clone)]
pub struct JobArgs {
    /// The job: `demo` (the narrow network on the carried sample: 10 epochs, batch 64), `paper`
    /// (the paper's recipe: its network, batch 128, 90 epochs, lr 0.01 divided by 10 on
    /// plateaus), or a TOML file (see jobs/paper.toml; unknown fields are refused). Default:
    /// `demo` for IDX data, `paper` for prepared data.
    #[arg(long, env = "ALEXNET_CONFIG")]
    pub config: Option<String>,
    /// The training data: a prepared dataset (`alexnet prepare`, has dataset.json), or a folder
    /// of IDX files (train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-*), which
    /// also holds the validation set. [default: data/sample/fashion-mnist]
    #[arg(long, env = "ALEXNET_DATA")]
    pub data: Option<PathBuf>,
    /// The prepared validation set, for prepared training data (validated on centre crops).
    #[arg(long, env = "ALEXNET_VAL")]
    pub val: Option<PathBuf>,
    /// The network: `demo` (narrow, for 28x28 grey images upscaled to 64), `paper`, or a TOML
    /// file (overrides the job's).
    #[arg(long)]
    pub net: Option<String>,
    /// Threads that make batches from prepared data (per worker).
    #[arg(long)]
    pub loader_threads: Option<usize>,
    /// Where training views of prepared data are finished (mirror, mean, colour shift):
    /// `auto` ships bytes to a GPU and finishes them there, and finishes them in the loader
    /// threads on a CPU. The views are the same bits either way. [default: auto]
    #[arg(long, value_enum)]
    pub augment_on: Option<alexnet::train::job::AugmentOn>,
    /// Epochs to train. [default: the job's; demo 10, paper 90]
    #[arg(long, value_parser = at_least_one)]
    pub epochs: Option<usize>,
    /// Stop after this many steps in all (default: run every epoch). 0 trains nothing: with
    /// --out, the initial parameters are written.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Samples per step, all replicas together. [default: demo 64, paper 128]
    #[arg(long, value_parser = at_least_one)]
    pub batch: Option<usize>,
    /// Initial learning rate. [default: 0.01]
    #[arg(long)]
    pub lr: Option<f32>,
    /// SGD momentum: the share of the last update carried into the next. [default: 0.9]
    #[arg(long)]
    pub momentum: Option<f32>,
    /// L2 penalty on the weights, added to their gradients times this. [default: 0.0005]
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Seeds the parameters, dropout masks and the order of the data. [default: 1]
    #[arg(long)]
    pub seed: Option<u64>,
    /// Checkpoint every this many steps, besides every epoch's end (needs a run folder).
    #[arg(long)]
    pub checkpoint_every: Option<u64>,
    /// Start from the parameters in this file (`alexnet export` output: unsplit, PyTorch-style).
    #[arg(long)]
    pub init: Option<PathBuf>,
    /// With --init: layers drawn afresh at this network's shape instead of taken from the
    /// file (fine-tuning on new classes: `fc8`; a list or range: `fc7,fc8`, `fc6..fc8`).
    /// Other layers must match the file's shapes.
    #[arg(long, value_name = "LAYERS", value_parser = layer_list, requires = "init")]
    pub reinit: Option<LayerList>,
    /// Layers not trained: no weight gradients, no update, no backward pass below the lowest
    /// layer that learns (fine-tuning on little data: `conv1..conv5`).
    #[arg(long, value_name = "LAYERS", value_parser = layer_list)]
    pub freeze: Option<LayerList>,
    /// Log progress every this many steps.
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    /// Accept a network with more classes than the prepared data has (the network's
    /// `classes` set explicitly): its extra outputs are never trained, which is only of use
    /// to keep a run's shape for data that will gain those classes later.
    #[arg(long)]
    pub allow_unused_classes: bool,
}

#[derive(clap::Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// Write the trained parameters here (column0.safetensors, column1.safetensors).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Keep checkpoints, job.json and the report (report.csv, .svg, .png) in this folder.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
    /// Continue the run in this folder from its newest complete checkpoint.
    #[arg(long, conflicts_with = "run_dir")]
    pub resume: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    #[command(flatten)]
    pub device_settings: DeviceArgs,
}

#[derive(clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    /// Images per step.
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    pub batch: usize,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 5, value_parser = at_least_one)]
    pub steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// The network: `paper` (default), `demo`, or a TOML file.
    #[arg(long, default_value = "paper")]
    pub net: String,
    /// Print the report as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Also time as many steps that each upload their input the way training on prepared
    /// images does (views as bytes, finished on the backend), back to back: what the input
    /// costs beside the timed steps, whose input stays where it is. Needs 3 input channels.
    #[arg(long)]
    pub upload: bool,
    #[command(flatten)]
    pub device_settings: DeviceArgs,
}

#[derive(clap::Args)]
pub struct PlanArgs {
    /// Hosts, or a comma-separated list of host counts (one line each).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,64", value_parser = at_least_one)]
    pub hosts: Vec<usize>,
    /// GPUs per host (even: a replica's two columns sit on two GPUs of one host).
    #[arg(long, default_value_t = 8, value_parser = at_least_one)]
    pub gpus_per_host: usize,
    /// Network between hosts, Gbit/s per host and direction.
    #[arg(long, default_value_t = 100.0, value_parser = positive)]
    pub link: f64,
    /// Link between two GPUs of a host, Gbit/s per direction (H100 NVLink: 3600).
    #[arg(long, default_value_t = 3600.0, value_parser = positive)]
    pub nvlink: f64,
    /// Latency of one message between hosts, microseconds (within a host: a quarter of it).
    #[arg(long, default_value_t = 20.0)]
    pub latency_us: f64,
    /// A pair's step time without exchanges, ms, at --batch images (both columns, one per GPU).
    #[arg(long, value_parser = positive, conflicts_with = "measure")]
    pub step_ms: Option<f64>,
    /// Measure the step time here instead: `bench` on this machine's device (the whole
    /// network on one device), halved for a pair of them.
    #[arg(long)]
    pub measure: bool,
    /// Images per replica and step.
    #[arg(long, default_value_t = 128, value_parser = at_least_one)]
    pub batch: usize,
    /// The network: `paper` (default), `demo`, or a TOML file.
    #[arg(long, default_value = "paper")]
    pub net: String,
    /// How the replicas average: `ring` (the runtime's default from 3 replicas) or
    /// `all-to-all` (ALEXNET_REPLICA_REDUCE=all-to-all), to compare the two.
    #[arg(long, value_enum, default_value_t = ReduceChoice::Ring)]
    pub reduce: ReduceChoice,
    /// Print the projections as JSON on stdout instead of a table.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value_t = BackendChoice::Auto)]
    pub backend: BackendChoice,
    #[command(flatten)]
    pub device_settings: DeviceArgs,
}

/// How the replicas average, as `alexnet plan --reduce` names it.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ReduceChoice {
    Ring,
    AllToAll,
}

impl From<ReduceChoice> for alexnet::comm::ReduceAlgorithm {
    fn from(r: ReduceChoice) -> Self {
        match r {
            ReduceChoice::Ring => alexnet::comm::ReduceAlgorithm::Ring,
            ReduceChoice::AllToAll => alexnet::comm::ReduceAlgorithm::AllToAll,
        }
    }
}

/// A positive, finite number.
fn positive(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if v.is_finite() && v > 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a positive number, not {v}"))
    }
}

/// A flag's number of seconds: positive and finite.
fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|e| format!("{e}"))?;
    Duration::try_from_secs_f64(v)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("must be a positive number of seconds, not {v}"))
}

/// A coordinator's URL: a scheme, then what tonic takes as an endpoint.
fn coordinator_url(u: &str) -> Result<String, String> {
    if let Some((scheme, _)) = u.split_once("://") {
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "coordinator URL `{u}`: the scheme must be http:// (https:// with TLS), not {scheme}://"
            ));
        }
    } else {
        return Err(format!(
            "coordinator URL `{u}` has no scheme: write http://{u} (https:// with TLS)"
        ));
    }
    tonic::transport::Endpoint::from_shared(u.to_string())
        .map(|_| u.to_string())
        .map_err(|e| format!("coordinator URL `{u}` (expected http://host:port): {e}"))
}

/// A `host:port` listen address, checked without resolving the name (a pod's or node's name
/// need not resolve where a recipe is checked).
fn listen_address(addr: &str) -> Result<String, String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or("expected host:port, e.g. 0.0.0.0:50051")?;
    port.parse::<u16>()
        .map_err(|e| format!("port `{port}` is not a number from 0 to 65535: {e}"))?;
    if host.is_empty() {
        return Err("no host before the port".into());
    }
    Ok(addr.to_string())
}

/// Where `/metrics` is served: host:port, or a bare port on loopback.
fn metrics_address(addr: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = addr.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    addr.parse().map_err(|e| {
        format!("expected host:port (an IP address, e.g. 127.0.0.1:9401) or a port: {e}")
    })
}

/// A size in bytes: a number, or one with a binary K, M, G or T suffix.
fn memory_size(s: &str) -> Result<u64, String> {
    alexnet::backend::settings::parse_size(s).ok_or_else(|| {
        format!("`{s}` is not a size: bytes, or a number with K, M, G or T (12G, 512M)")
    })
}

/// Layers a flag names, in the network's order.
#[derive(Clone, Debug)]
pub struct LayerList(pub Vec<String>);

/// Layer names and ranges (`fc8`, `conv1..conv5`), checked.
fn layer_list(s: &str) -> Result<LayerList, String> {
    alexnet::model::params::parse_layers(s).map(LayerList)
}

/// A count that must be at least 1.
fn at_least_one(s: &str) -> Result<usize, String> {
    match s.parse::<usize>().map_err(|e| format!("{e}"))? {
        0 => Err("must be at least 1".into()),
        n => Ok(n),
    }
}
