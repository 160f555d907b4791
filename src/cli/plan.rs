//! Planning a run: the job a command line describes (job file, then flags), a resumed run's
//! job, and the coordinator of a new or resumed run with its run folder.

use super::{JobArgs, LayoutArgs};
use alexnet::coordinator::CoordinatorConfig;
use alexnet::model::NetConfig;
use alexnet::train::job::JobConfig;
use anyhow::Context;
use std::path::{Path, PathBuf};

/// The narrow network of the default training job (`--net demo`).
pub fn demo_net() -> NetConfig {
    NetConfig::demo()
}

pub fn load_net(spec: &str) -> anyhow::Result<NetConfig> {
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

/// The demo job: the narrow network on the carried sample, briefly.
pub fn demo_job() -> JobConfig {
    JobConfig {
        net: demo_net(),
        epochs: 10,
        batch: 64,
        ..JobConfig::default()
    }
}

pub fn load_job(spec: &str) -> anyhow::Result<JobConfig> {
    load_job_for(spec, None)
}

/// The job `spec` names (`paper`, `demo` or a TOML file). A file's missing fields take the
/// defaults that fit its data (`data_flag`, else the file's `data`, else the carried
/// sample): the demo job's for IDX files, the paper's otherwise.
pub fn load_job_for(spec: &str, data_flag: Option<&Path>) -> anyhow::Result<JobConfig> {
    Ok(match spec {
        "paper" => JobConfig::default(),
        "demo" => demo_job(),
        path => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading job file {path} (or use `paper` or `demo`)"))?;
            // Parsed alone first: unknown fields and wrong types get TOML's own errors, with
            // the line and a caret.
            let alone: JobConfig =
                toml::from_str(&text).with_context(|| format!("job file {path}"))?;
            let given: toml::Table =
                toml::from_str(&text).with_context(|| format!("job file {path}"))?;
            let data = match (data_flag, given.contains_key("data")) {
                (Some(d), _) => d.to_path_buf(),
                (None, true) => alone.data.clone(),
                (None, false) => demo_job().data,
            };
            let data = resolve_data(&data);
            let idx = data.is_dir() && !data.join(alexnet::data::shards::METADATA_FILE).exists();
            if !idx {
                return Ok(alone);
            }
            let mut merged = toml::Table::try_from(demo_job()).context("the demo job as TOML")?;
            merge_tables(&mut merged, given);
            merged
                .try_into()
                .with_context(|| format!("job file {path} over the demo job's defaults"))?
        }
    })
}

/// `over`'s values in `base`, tables merged key by key.
fn merge_tables(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge_tables(b, o),
            (_, v) => {
                base.insert(key, v);
            }
        }
    }
}

/// The job the flags describe: the job file (or the default for the data), then each flag
/// given; `layout` overrides the topology.
pub fn job_from_args(a: &JobArgs, layout: Option<&LayoutArgs>) -> anyhow::Result<JobConfig> {
    let data_flag = a.data.as_ref().map(|d| resolve_data(d));
    let prepared = |d: &Path| d.join(alexnet::data::shards::METADATA_FILE).exists();
    let spec = match (&a.config, &data_flag) {
        (Some(c), _) => c.clone(),
        (None, Some(d)) if prepared(d) => "paper".into(),
        (None, _) => "demo".into(),
    };
    let mut job = load_job_for(&spec, data_flag.as_deref())?;
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
    if let Some(layers) = &a.reinit {
        job.reinit = layers.0.clone();
    }
    if let Some(layers) = &a.freeze {
        job.freeze = layers.0.clone();
    }
    if let Some(l) = layout {
        if let Some(r) = l.replicas {
            job.topology.replicas = r.max;
            job.topology.elastic = (r.min < r.max).then_some(r);
        }
        if let Some(c) = l.columns_per_worker {
            job.topology.columns_per_worker = c;
        }
    }
    let explicit = sets_classes_of_net(a.net.as_deref())? || sets_classes_of_job(&spec)?;
    classes_from_data(&mut job, explicit, a.allow_unused_classes)?;
    job.validate().with_context(|| format!("job `{spec}`"))?;
    Ok(job)
}

/// Whether the `--net` file sets `classes` (the named networks do not: they take the data's).
fn sets_classes_of_net(net: Option<&str>) -> anyhow::Result<bool> {
    match net {
        None | Some("paper") | Some("demo") => Ok(false),
        Some(path) => {
            let table: toml::Table = toml::from_str(&std::fs::read_to_string(path)?)
                .with_context(|| format!("network file {path}"))?;
            Ok(table.contains_key("classes"))
        }
    }
}

/// Whether the job file sets `classes` under `[net]`.
fn sets_classes_of_job(spec: &str) -> anyhow::Result<bool> {
    if matches!(spec, "paper" | "demo") {
        return Ok(false);
    }
    let table: toml::Table = toml::from_str(&std::fs::read_to_string(spec)?)
        .with_context(|| format!("job file {spec}"))?;
    Ok(table
        .get("net")
        .and_then(|n| n.as_table())
        .is_some_and(|n| n.contains_key("classes")))
}

/// For prepared data here: the network's classes are the dataset's (rounded up to even: fc8
/// is split over the two columns) unless the job sets them; set, they must cover the data,
/// and more than it has are refused unless `allow_unused`.
fn classes_from_data(
    job: &mut JobConfig,
    explicit: bool,
    allow_unused: bool,
) -> anyhow::Result<()> {
    let meta_path = job.data.join(alexnet::data::shards::METADATA_FILE);
    let Ok(text) = std::fs::read(&meta_path) else {
        return Ok(());
    };
    let meta: alexnet::data::shards::Metadata = serde_json::from_slice(&text)
        .with_context(|| format!("reading {}", meta_path.display()))?;
    let n = meta.classes.len();
    let fitted = n.max(2).next_multiple_of(2);
    if !explicit {
        if job.net.classes != fitted {
            tracing::info!(
                classes = fitted,
                data_classes = n,
                "the network's classes follow the data{}",
                if fitted != n {
                    " (one more output than classes: fc8 is split over the two columns)"
                } else {
                    ""
                }
            );
        }
        job.net.classes = fitted;
        return Ok(());
    }
    anyhow::ensure!(
        job.net.classes >= n,
        "the network has {} classes (`classes` in the job or --net file), the data in {} has {n}: \
         set `classes = {fitted}`, or remove it to follow the data",
        job.net.classes,
        job.data.display()
    );
    anyhow::ensure!(
        job.net.classes <= fitted || allow_unused,
        "the network has {} classes (`classes` in the job or --net file), the data in {} has \
         {n}: {} outputs would never be trained. Remove `classes` to follow the data, or pass \
         --allow-unused-classes to keep them",
        job.net.classes,
        job.data.display(),
        job.net.classes - n
    );
    Ok(())
}

/// Where the job's data folder was named: the flag, its environment variable, the job file, or
/// the default, so that an error about it names what the user actually wrote.
pub fn data_source(a: &JobArgs) -> String {
    match (&a.data, &a.config) {
        (Some(d), _) => {
            let from_env = std::env::var_os("ALEXNET_DATA").is_some_and(|v| Path::new(&v) == d)
                && !std::env::args().any(|arg| arg == "--data" || arg.starts_with("--data="));
            if from_env {
                "ALEXNET_DATA".into()
            } else {
                "--data".into()
            }
        }
        (None, Some(c)) if !matches!(c.as_str(), "paper" | "demo") => {
            format!("`data` in the job file {c}")
        }
        (None, _) => "the default data folder (no --data given)".into(),
    }
}

/// Checks what a start on this machine needs before anything runs: the job's data (the error
/// naming where the folder came from) and an `--init` file's shapes.
pub fn check_local_inputs(job: &JobConfig, a: &JobArgs, resuming: bool) -> anyhow::Result<()> {
    let source = if resuming {
        "the run's job.json".to_string()
    } else {
        data_source(a)
    };
    alexnet::train::job::check_data(job).with_context(|| {
        format!(
            "the training data {} (named by {source})",
            job.data.display()
        )
    })?;
    if let (Some(init), false) = (&job.init, resuming) {
        alexnet::train::job::check_init(init, &job.net, &job.reinit)?;
    }
    Ok(())
}

pub fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The flags of `a` that would change what a step computes, by name: a resumed run keeps
/// its job, so these are refused rather than silently ignored.
fn fixed_by_resume(a: &JobArgs, layout: Option<&LayoutArgs>) -> Vec<&'static str> {
    let mut given = Vec::new();
    macro_rules! check {
        ($($field:ident => $flag:literal),* $(,)?) => {
            $(if a.$field.is_some() { given.push($flag); })*
        };
    }
    check!(config => "--config", data => "--data", val => "--val", net => "--net",
           batch => "--batch", lr => "--lr", momentum => "--momentum",
           weight_decay => "--weight-decay", seed => "--seed", init => "--init",
           augment_on => "--augment-on", loader_threads => "--loader-threads",
           reinit => "--reinit", freeze => "--freeze");
    if let Some(l) = layout {
        if l.replicas.is_some() {
            given.push("--replicas");
        }
        if l.columns_per_worker.is_some() {
            given.push("--columns-per-worker");
        }
    }
    given
}

/// Refuses elastic replicas where every worker is this host's: `alexnet launch` has no host
/// to lose or to wait for.
pub fn refuse_elastic_launch(layout: &LayoutArgs) -> anyhow::Result<()> {
    if let Some(r) = layout.replicas.filter(|r| r.min < r.max) {
        anyhow::bail!(
            "--replicas {r}: elastic replicas are for jobs across hosts, whose hosts may be lost \
             and come back (`alexnet coordinator --replicas {r}` with an `alexnet agent` per \
             host); `alexnet launch` runs every worker here: give one count, e.g. --replicas {}",
            r.max
        );
    }
    Ok(())
}

/// Refuses flags that a resumed run cannot change, naming them.
pub fn refuse_changes_on_resume(
    run_dir: &Path,
    a: &JobArgs,
    layout: Option<&LayoutArgs>,
) -> anyhow::Result<()> {
    let given = fixed_by_resume(a, layout);
    anyhow::ensure!(
        given.is_empty(),
        "--resume {} continues the run with the job it was started with: {} cannot change \
         (only --epochs, --steps and --checkpoint-every may); start a new run (--run-dir) to \
         train with other settings, or --init from an exported run to start from its parameters",
        run_dir.display(),
        given.join(", ")
    );
    Ok(())
}

/// A folder for a new run: refused if it already holds a run's checkpoints (mixing two runs'
/// checkpoints in one folder would leave neither usable).
pub fn fresh_run_dir(dir: &Path) -> anyhow::Result<()> {
    if !alexnet::train::checkpoint::list(dir).is_empty() {
        anyhow::bail!(
            "{} already holds checkpoints of a run: continue it with --resume {}, or choose another --run-dir",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// A folder to write trained parameters into, checked before the first step so that a bad
/// path does not cost the training: created if missing, and written to once.
pub fn writable_output_dir(dir: &Path, flag: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        !dir.exists() || dir.is_dir(),
        "{flag} {} is a file: {flag} names a folder (column0.safetensors and \
         column1.safetensors go in it)",
        dir.display()
    );
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{flag} {}: cannot create the folder", dir.display()))?;
    let probe = dir.join(format!(".alexnet-write-check-{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("{flag} {}: cannot write there", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// A run folder's job, for `--resume`: only how long to run may change.
pub fn resumed_job(run_dir: &Path, a: &JobArgs) -> anyhow::Result<JobConfig> {
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

pub fn job_id_or_new(given: &Option<String>) -> String {
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
pub fn coordinator_config(
    job_args: &JobArgs,
    layout: &LayoutArgs,
    run_dir: Option<&PathBuf>,
    resume: Option<&PathBuf>,
) -> anyhow::Result<(CoordinatorConfig, PathBuf)> {
    let peer_timeout = layout.peer_timeout;
    let (job, job_id, run_dir, resume) = match resume {
        Some(dir) => {
            refuse_changes_on_resume(dir, job_args, Some(layout))?;
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
            fresh_run_dir(&dir)?;
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
            rendezvous_timeout: layout.rendezvous_timeout,
            max_clock_skew: layout.max_clock_skew,
            restarts_left: 0,
            rejoin_timeout: layout.rendezvous_timeout,
            log_every: job_args.log_every.max(1) as u64,
            run_dir: Some(absolute(&run_dir)),
            resume,
            token: None,
            tls: None,
        },
        run_dir,
    ))
}

/// Whether the run being resumed is already complete (then there is nothing to start: a
/// coordinator restarted after its job finished must not wait for workers that will not come).
pub fn already_complete(cfg: &CoordinatorConfig, run_dir: &Path) -> bool {
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

/// The default sample folder is relative to the repository; find it from elsewhere too.
pub fn resolve_data(path: &Path) -> PathBuf {
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
