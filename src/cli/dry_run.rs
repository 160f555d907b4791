//! `--dry-run`: the checks of a command line that need no running job.

use super::plan::{job_from_args, load_job};
use super::{seconds, Command, JobArgs, LayoutArgs};
use anyhow::Context;
use std::path::Path;

/// `--dry-run`: what can be checked without starting anything or touching files: the
/// command line (clap has parsed it), coordinator URLs, numbers of seconds, and the job file
/// where it exists here.
pub fn dry_run(command: &Command) -> anyhow::Result<()> {
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
pub fn check_listen(addr: &str) -> anyhow::Result<()> {
    let (host, port) = addr
        .rsplit_once(':')
        .context("expected host:port, e.g. 0.0.0.0:50051")?;
    port.parse::<u16>()
        .with_context(|| format!("port `{port}` is not a number from 0 to 65535"))?;
    anyhow::ensure!(!host.is_empty(), "no host before the port");
    Ok(())
}
