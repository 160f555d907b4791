//! `alexnet`: train, benchmark and (later) serve the two-column network.

mod cli;

use clap::Parser;
use cli::{commands, Cli, Command, LogFormat};

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
        cli::dry_run::dry_run(&cli.command)
    } else {
        run(cli.command, cli.log_format)
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            if let Some(alexnet::worker::Verdict::Regroup(_)) = e.downcast_ref() {
                // Not a failure: the world changes and this worker rejoins at once.
                tracing::info!("{}", alexnet::log_fields::error_chain(&e));
            } else {
                tracing::error!("{}", alexnet::log_fields::error_chain(&e));
            }
            // A worker's launcher (an agent) tells from the status whether a restart can help.
            match e.downcast_ref::<alexnet::worker::Verdict>() {
                Some(v) => std::process::ExitCode::from(v.exit_code()),
                None => std::process::ExitCode::FAILURE,
            }
        }
    }
}

fn run(command: Command, log_format: LogFormat) -> anyhow::Result<()> {
    match command {
        Command::Train(a) => commands::train(a),
        Command::Launch(a) => commands::launch(a, log_format),
        Command::Coordinator(a) => commands::coordinator(a),
        Command::Worker(a) => commands::worker(a),
        Command::Agent(a) => commands::agent(a, log_format),
        Command::Status(a) => cli::status::status(a),
        Command::Eval(a) => commands::eval(a),
        Command::Predict(a) => commands::predict(a),
        Command::Export(a) => commands::export(a),
        Command::Prepare(a) => commands::prepare(a),
        Command::Selftest(a) => commands::selftest(a),
        Command::BenchData(a) => commands::bench_data(a),
        Command::Bench(a) => commands::bench(a),
        Command::Plan(a) => commands::plan(a),
    }
}
