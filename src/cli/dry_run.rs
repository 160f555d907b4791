//! `--dry-run`: the checks of a command line that need no running job.

use super::plan::{
    check_local_inputs, coordinator_config, job_from_args, load_job, refuse_changes_on_resume,
    resumed_job,
};
use super::{Command, JobArgs, LayoutArgs};
use anyhow::Context;
use std::path::{Path, PathBuf};

/// `--dry-run`: the checks a real start makes, without starting anything: the command line
/// (clap has parsed it, and its value parsers have checked coordinator URLs, listen
/// addresses, counts and seconds), the job the flags make (printed, resolved), and for
/// `train` and `launch`, which run here, the data and an `--init` file. A job file that is not
/// on this host (a deployment recipe checked elsewhere) is named and left unchecked.
pub fn dry_run(command: &Command) -> anyhow::Result<()> {
    let file_here = |j: &JobArgs| {
        j.config
            .as_deref()
            .is_none_or(|c| matches!(c, "paper" | "demo") || Path::new(c).exists())
    };
    let print_job = |job: &alexnet::train::job::JobConfig| -> anyhow::Result<()> {
        println!("the job, resolved:\n{}", serde_json::to_string_pretty(job)?);
        Ok(())
    };
    // A job that runs on this machine: everything a real start checks.
    let local = |j: &JobArgs,
                 l: Option<&LayoutArgs>,
                 run_dir: Option<&PathBuf>,
                 resume: Option<&PathBuf>|
     -> anyhow::Result<()> {
        if !file_here(j) {
            return Ok(());
        }
        let job = match (l, resume) {
            (Some(l), _) => coordinator_config(j, l, run_dir, resume)?.0.job,
            (None, Some(dir)) => {
                refuse_changes_on_resume(dir, j, None)?;
                resumed_job(dir, j)?
            }
            (None, None) => job_from_args(j, None)?,
        };
        check_local_inputs(&job, j, resume.is_some())?;
        print_job(&job)
    };
    // The job the flags make, where its file is here: replicas against the batch, widths.
    let job = |j: &JobArgs, l: &LayoutArgs| -> anyhow::Result<()> {
        if file_here(j) {
            print_job(&job_from_args(j, Some(l))?)?;
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
            local(&a.job, None, a.run_dir.as_ref(), a.resume.as_ref())?;
            "train"
        }
        Command::Launch(a) => {
            super::plan::refuse_elastic_launch(&a.layout)?;
            job_file(&a.job)?;
            local(
                &a.job,
                Some(&a.layout),
                a.run_dir.as_ref(),
                a.resume.as_ref(),
            )?;
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
        Command::Plan(_) => "plan",
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
