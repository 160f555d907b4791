//! What each command does, from its parsed arguments.

use super::devices::{choose_backend, visible_gpus, worker_devices};
use super::plan::{
    already_complete, check_local_inputs, coordinator_config, demo_net, fresh_run_dir,
    job_from_args, load_net, refuse_changes_on_resume, refuse_elastic_launch, resolve_data,
    resumed_job, writable_output_dir,
};
use super::*;
use alexnet::auth::{read_token, write_private};
use alexnet::backend::Cpu;
use alexnet::comm::Topology;
use alexnet::coordinator::{Phase, Secret};
use alexnet::launch::LaunchOptions;
use alexnet::train::bench;
use alexnet::train::book::{BookSetup, JobBook};
use anyhow::Context;

pub fn train(a: TrainArgs) -> anyhow::Result<()> {
    let (mut job, run_dir) = match &a.resume {
        Some(dir) => {
            refuse_changes_on_resume(dir, &a.job, None)?;
            (resumed_job(dir, &a.job)?, Some(dir.clone()))
        }
        None => {
            if let Some(dir) = &a.run_dir {
                fresh_run_dir(dir)?;
            }
            (job_from_args(&a.job, None)?, a.run_dir.clone())
        }
    };
    check_local_inputs(&job, &a.job, a.resume.is_some())?;
    if let Some(out) = &a.out {
        writable_output_dir(out, "--out")?;
    }
    if run_dir.is_none() && job.checkpoint_every > 0 {
        tracing::warn!(
            "--checkpoint-every needs a run folder: no checkpoints are kept (pass --run-dir DIR)"
        );
    }
    // One process holds both columns.
    job.topology = Topology {
        replicas: 1,
        columns_per_worker: alexnet::model::config::COLUMNS,
        elastic: None,
    };
    job.validate()?;
    let resume = match (&a.resume, &run_dir) {
        (Some(_), Some(dir)) => alexnet::train::checkpoint::latest(dir, Some(&job.hash()))?,
        _ => None,
    };
    if a.resume.is_some() && resume.is_none() {
        tracing::warn!("the run folder has no checkpoint yet: starting from the beginning");
    }
    if let (Some(_), Some(dir)) = (&a.resume, &run_dir) {
        alexnet::train::checkpoint::remove_incomplete(dir);
    }
    if let Some(dir) = &run_dir {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        alexnet::files::write_atomic(
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
    let steps = alexnet::with_device!(choose_backend(a.backend, &a.device_settings.settings())?, backend => {
        let role = alexnet::train::job::Role {
            replica: 0,
            columns: Box::new(alexnet::comm::LocalExchange::default()),
            replicas: None,
            run_dir: run_dir.clone(),
            resume: resume
                .as_ref()
                .map(|(dir, m)| alexnet::train::job::ResumeFrom {
                    dir: dir.clone(),
                    step: m.step,
                    lr: m.schedule.lr,
                }),
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
    // The last line says what was kept, and where.
    let kept = match (&a.out, &run_dir) {
        (Some(out), Some(dir)) => format!(
            "parameters in {}, checkpoints and report in {}",
            out.display(),
            dir.display()
        ),
        (Some(out), None) => format!("parameters in {}", out.display()),
        (None, Some(dir)) => format!("checkpoints and report in {}", dir.display()),
        (None, None) => {
            "nothing kept: pass --run-dir DIR (checkpoints, report) or --out DIR (parameters)"
                .to_string()
        }
    };
    match book.history.last() {
        Some(last) => tracing::info!(
            epochs = last.epoch,
            steps,
            train_loss = alexnet::log_fields::rounded(last.train_loss as f64, 4),
            val_top1_err = alexnet::log_fields::rounded(last.val_top1_err, 3),
            val_top5_err =
                (job.net.classes > 5).then(|| alexnet::log_fields::rounded(last.val_top5_err, 3)),
            "done; {kept}"
        ),
        None => tracing::info!(
            steps,
            "done (stopped before the end of an epoch: no validation); {kept}"
        ),
    }
    Ok(())
}

pub fn selftest(a: SelftestArgs) -> anyhow::Result<()> {
    use alexnet::selftest::Target;
    alexnet::selftest::run(&alexnet::selftest::Options {
        backend: match a.backend {
            BackendChoice::Auto => None,
            BackendChoice::Cpu => Some(Target::Cpu),
            BackendChoice::Cuda => Some(Target::Cuda),
        },
        tolerance: a.tolerance,
        seed: a.seed,
        batch: a.batch,
        net: demo_net(),
        process_timeout: a.process_timeout,
        json: a.json,
        require_all: a.require_all,
    })
}

pub fn launch(a: LaunchArgs, log_format: LogFormat) -> anyhow::Result<()> {
    refuse_elastic_launch(&a.layout)?;
    let devices = worker_devices(a.backend, "--backend")?;
    let (mut cfg, run_dir) =
        coordinator_config(&a.job, &a.layout, a.run_dir.as_ref(), a.resume.as_ref())?;
    if already_complete(&cfg, &run_dir) {
        return Ok(());
    }
    if a.resume.is_some() {
        alexnet::train::checkpoint::remove_incomplete(&run_dir);
    }
    // What no restart can fix fails here, once, before any worker starts.
    check_local_inputs(&cfg.job, &a.job, cfg.resume.is_some())?;
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
    let cfg_classes = cfg.job.net.classes;
    let outcome = alexnet::launch::run(LaunchOptions {
        coordinator: cfg,
        run_dir: run_dir.clone(),
        threads_per_worker: threads,
        devices,
        exe: std::env::current_exe().context("finding this binary to start workers")?,
        json_logs: log_format == LogFormat::Json,
        max_restarts: a.max_restarts,
        settings: a.device_settings.settings(),
        metrics_listen: a.metrics.metrics_listen,
    })?;
    report_exchange_share(&outcome.exchange_seconds);
    if outcome.stopped {
        return Err(alexnet::worker::Verdict::Stopped(format!(
            "interrupted; the run folder keeps its newest complete checkpoint: continue with \
             `alexnet launch --resume {}`",
            run_dir.display()
        ))
        .into());
    }
    match (&outcome.phase, &outcome.first_failure) {
        (Phase::Finished, _) => {
            finished_summary(
                cfg_classes,
                outcome.last_step,
                outcome.results.last(),
                outcome.restarts,
                &run_dir,
            );
            Ok(())
        }
        (_, Some(first)) => anyhow::bail!("first failure: {first} (logs in {})", run_dir.display()),
        (Phase::Failed { rank, error, .. }, None) => anyhow::bail!(
            "first failure: {}: {error} (logs in {})",
            rank.map(|r| format!("rank {r}"))
                .unwrap_or_else(|| "the coordinator".into()),
            run_dir.display()
        ),
        (p, None) => anyhow::bail!("the job ended as {p:?}"),
    }
}

/// The last line of a job that finished: steps, loss, validation errors where an epoch
/// ended, restarts, and where the results are.
pub fn finished_summary(
    classes: usize,
    last_step: Option<(u64, f32)>,
    last_epoch: Option<&alexnet::train::checkpoint::EpochRecord>,
    restarts: usize,
    run_dir: &std::path::Path,
) {
    let (steps, loss) = last_step.unwrap_or((0, f32::NAN));
    let loss = alexnet::log_fields::rounded(loss as f64, 4);
    match last_epoch {
        Some(e) => tracing::info!(
            steps,
            loss,
            epochs = e.epoch,
            val_top1_err = alexnet::log_fields::rounded(e.val_top1_err, 3),
            val_top5_err = (classes > 5).then(|| alexnet::log_fields::rounded(e.val_top5_err, 3)),
            restarts,
            "done; parameters in {}, checkpoints and report in {}",
            run_dir.join("params").display(),
            run_dir.display()
        ),
        None => tracing::info!(
            steps,
            loss,
            restarts,
            "done (stopped before the end of an epoch: no validation); parameters in {}, \
             checkpoints and report in {}",
            run_dir.join("params").display(),
            run_dir.display()
        ),
    }
}

/// Logs each rank's share of training time spent waiting in the exchanges.
pub fn report_exchange_share(seconds: &[alexnet::coordinator::ExchangeSeconds]) {
    for s in seconds {
        let (rank, columns, replicas, total) = (s.rank, s.columns, s.replicas, s.train);
        if total > 0.0 {
            tracing::info!(
                rank,
                column_exchange_share_pct =
                    alexnet::log_fields::rounded(100.0 * columns / total, 1),
                replica_exchange_share_pct =
                    alexnet::log_fields::rounded(100.0 * replicas / total, 1),
                train_seconds = alexnet::log_fields::rounded(total, 2),
                "time in the exchanges"
            );
        }
    }
}

pub fn coordinator(a: CoordinatorArgs) -> anyhow::Result<()> {
    let (mut cfg, run_dir) =
        coordinator_config(&a.job, &a.layout, a.run_dir.as_ref(), a.resume.as_ref())?;
    if already_complete(&cfg, &run_dir) {
        return Ok(());
    }
    if a.resume.is_some() {
        alexnet::train::checkpoint::remove_incomplete(&run_dir);
    }
    alexnet::coordinator::write_run_files(&run_dir, &cfg)?;
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
        cfg.tls = Some(alexnet::coordinator::TlsIdentity {
            cert_pem: c,
            key_pem: Secret::new(k),
        });
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
        // Where `alexnet status --run RUN_DIR` on this host finds it.
        let bound = listener.local_addr()?;
        let here = if bound.ip().is_unspecified() {
            std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), bound.port())
        } else {
            bound
        };
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        let _address =
            alexnet::launch::RunAddress::write(&run_dir, &format!("{scheme}://{here}"), None)?;
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
        cfg.rejoin_timeout = a.rejoin_timeout;
        let classes = cfg.job.net.classes;
        let first_generation = cfg.generation;
        let supervisor = alexnet::coordinator::generations::Supervisor::new(cfg)?;
        if let Some(addr) = a.metrics.metrics_listen {
            let s = supervisor.clone();
            alexnet::telemetry::prometheus::serve(addr, std::sync::Arc::new(move || s.metrics()))?;
        }
        let (phase, c) = supervisor.serve(listener).await?;
        report_exchange_share(&c.exchange_seconds());
        match phase {
            Phase::Finished => {
                finished_summary(classes, c.last_step(), c.results().last(), (c.generation() - first_generation) as usize, &run_dir);
                Ok(())
            }
            Phase::Failed { rank, error, .. } => anyhow::bail!(
                "the job failed: {}: {error}",
                rank.map(|r| format!("rank {r}")).unwrap_or_else(|| "coordinator".into())
            ),
            p => anyhow::bail!("the job ended as {p:?}"),
        }
    })
}

pub fn worker(a: WorkerArgs) -> anyhow::Result<()> {
    alexnet::worker::run(alexnet::worker::WorkerOptions {
        coordinator: a.coordinator,
        job_id: a.job_id,
        config_hash: a.config_hash,
        generation: a.generation,
        rank: a.rank,
        device: a.device,
        threads: a.threads,
        settings: a.device_settings.settings(),
        connect_timeout: a.connect_timeout,
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

pub fn agent(a: AgentArgs, log_format: LogFormat) -> anyhow::Result<()> {
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
        config_hash: None,
        node_rank: a.node_rank,
        workers: a.workers.unwrap_or(if on_gpus { devices.len() } else { 1 }),
        devices,
        threads_per_worker: a.threads,
        max_restarts: Some(a.max_restarts),
        rejoin_timeout: a.rejoin_timeout,
        max_clock_skew: a.max_clock_skew,
        token: read_token(a.token_file.as_deref())?,
        tls_ca: a.tls_ca,
        tls_domain: a.tls_domain,
        exe: std::env::current_exe().context("finding this binary to start workers")?,
        json_logs: log_format == LogFormat::Json,
        log_dir: a.log_dir,
        out: a.out,
        settings: a.device_settings.settings(),
        metrics_listen: a.metrics.metrics_listen,
        board: None,
    })
}

/// Top-1 and top-5 error of a trained run on a dataset, and with --confusion its matrix.
pub fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let csv = a
        .confusion_csv
        .clone()
        .unwrap_or_else(|| a.run.join("confusion.csv"));
    if a.confusion {
        // Checked before the evaluation, so that a bad path does not cost it.
        let parent = csv.parent().filter(|p| !p.as_os_str().is_empty());
        anyhow::ensure!(
            parent.is_none_or(|p| p.is_dir()),
            "--confusion-csv {}: its folder does not exist",
            csv.display()
        );
    }
    let mut run = alexnet::train::evaluate::load_run(&a.run, Cpu::new())?;
    let result = alexnet::train::evaluate::evaluate(
        &mut run,
        a.data.as_deref().map(resolve_data).as_deref(),
        a.ten_crop,
        a.batch.max(1),
    )?;
    let hits = result.hits;
    // With 5 outputs or fewer every label is among the top 5: no top-5 error to report.
    let top5 = if run.job.net.classes > 5 {
        format!(", top-5 error {:.4}", hits.top5_err())
    } else {
        String::new()
    };
    println!(
        "step {}: top-1 error {:.4}{top5} on {} images ({})",
        run.manifest.step,
        hits.top1_err(),
        hits.samples,
        if a.ten_crop { "ten patches" } else { "centre" }
    );
    if a.confusion {
        print!("{}", result.confusion.render());
        alexnet::files::write_atomic(&csv, result.confusion.to_csv().as_bytes())?;
        println!("confusion matrix written to {}", csv.display());
    }
    Ok(())
}

/// Image files with the folders among them opened: every image under a folder, sorted.
fn images_of(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let found = alexnet::data::prepare::images_under(p)?;
            anyhow::ensure!(
                !found.is_empty(),
                "{} holds no images (.jpg, .jpeg, .png)",
                p.display()
            );
            out.extend(found);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

/// The top classes of image files by a trained run.
pub fn predict(a: PredictArgs) -> anyhow::Result<()> {
    let mut run = alexnet::train::evaluate::load_run(&a.run, Cpu::new())?;
    let one_line = a.images.iter().any(|p| p.is_dir());
    let images = images_of(&a.images)?;
    // Each file on its own: a bad one is named at the end and does not cost the others.
    let mut bad = Vec::new();
    let results = alexnet::train::evaluate::predict(&mut run, &images, a.top)?;
    for (path, result) in images.iter().zip(results) {
        match result {
            Ok(top) if a.json => {
                let top: Vec<_> = top
                    .iter()
                    .map(|(c, name, p)| serde_json::json!({"class": c, "name": name, "p": p}))
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"file": path.display().to_string(), "top": top})
                );
            }
            Ok(top) if one_line => {
                let classes: Vec<String> = top
                    .iter()
                    .map(|(_, name, p)| format!("{name} {p:.3}"))
                    .collect();
                println!("{}\t{}", path.display(), classes.join("\t"));
            }
            Ok(top) => {
                println!("{}", path.display());
                for (c, name, p) in top {
                    println!("  {p:>6.3}  {name} ({c})");
                }
            }
            Err(e) => {
                let why = alexnet::log_fields::error_chain(&e);
                if a.json {
                    println!(
                        "{}",
                        serde_json::json!({"file": path.display().to_string(), "error": why})
                    );
                }
                tracing::error!("{why}");
                bad.push(path.display().to_string());
            }
        }
    }
    anyhow::ensure!(
        bad.is_empty(),
        "{} of {} images could not be classified: {}",
        bad.len(),
        images.len(),
        bad.join(", ")
    );
    Ok(())
}

/// A trained run's parameters as one unsplit file.
pub fn export(a: ExportArgs) -> anyhow::Result<()> {
    let run = alexnet::train::evaluate::load_run(&a.run, Cpu::new())?;
    alexnet::train::evaluate::export(&run, &a.out)?;
    tracing::info!(out = %a.out.display(), step = run.manifest.step, "exported");
    Ok(())
}

/// An ImageFolder tree in the preprocessed, sharded form.
pub fn prepare(a: PrepareArgs) -> anyhow::Result<()> {
    let opts = alexnet::data::prepare::PrepareOptions {
        side: a.side,
        shard_images: a.shard_images,
        strict: a.strict,
        progress: !a.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        val_split: a
            .val_fraction
            .map(|fraction| alexnet::data::prepare::ValSplit {
                fraction,
                seed: a.seed,
            }),
        labels: a.labels.clone(),
        class_names: a.class_names.clone(),
    };
    let summary = alexnet::data::prepare::prepare(&a.input, &a.output, &opts)?;
    if !summary.skipped.is_empty() {
        tracing::warn!(
            skipped = summary.skipped.len(),
            "some files were skipped (named above; --strict stops instead)"
        );
    }
    if summary.val.is_some() {
        let (train, val) = (a.output.join("train"), a.output.join("val"));
        tracing::info!(
            "train with --data {} --val {}",
            train.display(),
            val.display()
        );
    }
    Ok(())
}

/// `prepare` and the loader timed.
pub fn bench_data(a: BenchDataArgs) -> anyhow::Result<()> {
    let r = alexnet::data::bench::run(&resolve_data(&a.photos), &a.work, a.images, a.batch)?;
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

/// Training steps timed on random data.
pub fn plan(a: PlanArgs) -> anyhow::Result<()> {
    use alexnet::train::scaling;
    let net = load_net(&a.net)?;
    let compute_ms = match (a.step_ms, a.measure) {
        (Some(ms), _) => ms,
        (None, true) => {
            let device = choose_backend(a.backend, &a.device_settings.settings())?;
            let opts = bench::BenchOptions {
                batch: a.batch,
                warmup: 1,
                steps: 3,
                net: net.clone(),
                seed: 1,
                upload: false,
                cpu_peak: false,
            };
            let report = alexnet::with_device!(device, b => bench::run(b, &opts)?);
            tracing::info!(
                backend = %report.backend,
                step_ms = alexnet::log_fields::rounded(report.step_ms, 1),
                "measured the whole network on one device; a pair of them takes half"
            );
            report.step_ms / 2.0
        }
        (None, false) => anyhow::bail!(
            "give a pair's step time without exchanges with --step-ms MS (at --batch {} \
             images), or --measure to time it on this machine's device",
            a.batch
        ),
    };
    let rows = (a.hosts.iter())
        .map(|&hosts| {
            let cluster = scaling::Cluster {
                hosts,
                gpus_per_host: a.gpus_per_host,
                link_bits: a.link * 1e9,
                nvlink_bits: a.nvlink * 1e9,
                nvlink_latency: a.latency_us * 1e-6 / 4.0,
                link_latency: a.latency_us * 1e-6,
                reduce: a.reduce.into(),
            };
            scaling::project(&net, a.batch, compute_ms, &cluster)
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "A projection, not a measurement: {} GPUs a host, {} Gbit/s between hosts, {} Gbit/s \
             NVLink, {:.1} ms a step for a pair at {} images per replica",
            a.gpus_per_host, a.link, a.nvlink, compute_ms, a.batch
        );
        print!("{}", scaling::render(&rows));
    }
    Ok(())
}

pub fn bench(a: BenchArgs) -> anyhow::Result<()> {
    let net = load_net(&a.net)?;
    let device = choose_backend(a.backend, &a.device_settings.settings())?;
    let opts = bench::BenchOptions {
        batch: a.batch,
        warmup: a.warmup,
        steps: a.steps,
        net,
        seed: a.seed,
        upload: a.upload,
        cpu_peak: matches!(device, alexnet::backend::Device::Cpu(_)),
    };
    let report = alexnet::with_device!(device, b => bench::run(b, &opts)?);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", bench::render(&report));
    }
    Ok(())
}
