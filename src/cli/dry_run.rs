//! `--dry-run`: the checks of a command line that need no running job.

use super::plan::{job_from_args, load_job};
use super::{Command, JobArgs, LayoutArgs};
use anyhow::Context;
use std::path::Path;

/// `--dry-run`: what can be checked without starting anything or touching files: the
/// command line (clap has parsed it, and its value parsers have checked coordinator URLs,
/// listen addresses and numbers of seconds), and the job file where it exists here.
pub fn dry_run(command: &Command) -> anyhow::Result<()> {
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
    let name = match command {
        Command::Train(a) => {
            job_file(&a.job)?;
            "train"
        }
        Command::Launch(a) => {
            job_file(&a.job)?;
            job(&a.job, &a.layout)?;
            "launch"
        }
        Command::Coordinator(a) => {
            job_file(&a.job)?;
            job(&a.job, &a.layout)?;
            "coordinator"
        }
        Command::Worker(_) => "worker",
        Command::Agent(_) => "agent",
        Command::Status(_) => "status",
        Command::Bench(_) => "bench",
        Command::Selftest(_) => "selftest",
        Command::Prepare(_) => "prepare",
        Command::BenchData(_) => "bench-data",
        Command::Eval(_) => "eval",
        Command::Predict(_) => "predict",
        Command::Export(_) => "export",
    };
    println!("dry run: `alexnet {name}` is a valid command line; nothing was started");
    Ok(())
}
