//! Starting a worker process: the one way `alexnet launch` and `alexnet agent` do it. The
//! worker dies with its launcher (parent-death signal), receives the job's token in its
//! environment, and its output lines reach the launcher's stderr with a rank prefix, its own
//! log file, and the launcher's memory of its last error.

use crate::auth::Secret;
use anyhow::Context;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Everything a worker process is started with.
#[derive(Clone, Debug)]
pub struct WorkerSpec {
    /// The binary to start (this one).
    pub exe: PathBuf,
    pub json_logs: bool,
    pub coordinator: String,
    pub device: String,
    pub threads: usize,
    /// How the device runs: given as flags, not left to the worker's environment.
    pub settings: crate::backend::DeviceSettings,
    /// The rank to ask for; `None`: the coordinator picks.
    pub rank: Option<u32>,
    pub job_id: Option<String>,
    pub config_hash: Option<String>,
    /// How long the worker keeps trying to reach the coordinator (`None`: its default).
    pub connect_timeout: Option<Duration>,
    /// Where replica 0's workers write their columns.
    pub out: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_domain: Option<String>,
    pub token: Option<Secret>,
    /// The prefix of its log lines: its rank, or `#N` while the coordinator has not given it
    /// one.
    pub label: String,
    /// Its log file, appended to (kept across restarts).
    pub log_file: Option<PathBuf>,
}

impl WorkerSpec {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.exe);
        if self.json_logs {
            cmd.args(["--log-format", "json"]);
        }
        cmd.args([
            "worker",
            "--coordinator",
            &self.coordinator,
            "--device",
            &self.device,
        ])
        .args(["--threads", &self.threads.to_string()])
        .args(self.settings.worker_args());
        if let Some(t) = self.connect_timeout {
            cmd.args(["--connect-timeout", &t.as_secs_f64().to_string()]);
        }
        if let Some(r) = self.rank {
            cmd.args(["--rank", &r.to_string()]);
        }
        if let Some(j) = &self.job_id {
            cmd.args(["--job-id", j]);
        }
        if let Some(h) = &self.config_hash {
            cmd.args(["--config-hash", h]);
        }
        if let Some(out) = &self.out {
            cmd.arg("--out").arg(out);
        }
        if let Some(ca) = &self.tls_ca {
            cmd.arg("--tls-ca").arg(ca);
        }
        if let Some(d) = &self.tls_domain {
            cmd.args(["--tls-domain", d]);
        }
        crate::auth::pass_to_child(&mut cmd, &self.token);
        cmd
    }
}

/// Starts the worker `spec` describes; its output is forwarded (see the module's note) and
/// its error lines are remembered in `last_error`.
pub fn spawn_worker(
    spec: &WorkerSpec,
    last_error: Arc<Mutex<Option<String>>>,
) -> anyhow::Result<Child> {
    let log = match &spec.log_file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("opening the log file {}", path.display()))?;
            Some(Arc::new(Mutex::new(f)))
        }
        None => None,
    };
    let mut cmd = spec.command();
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; it makes the worker end with its launcher even
        // when the launcher is killed without a chance to stop it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!(
                "starting the worker of rank {} from {}",
                spec.label,
                spec.exe.display()
            )
        })?;
    if let Some(err) = child.stderr.take() {
        forward_lines(spec.label.clone(), err, log.clone(), last_error.clone());
    }
    if let Some(out) = child.stdout.take() {
        forward_lines(spec.label.clone(), out, log, last_error);
    }
    Ok(child)
}

/// Copies a child's output lines to this process's stderr with a rank prefix, and to its log
/// file; remembers its last error line.
pub fn forward_lines(
    label: String,
    from: impl std::io::Read + Send + 'static,
    log: Option<Arc<Mutex<std::fs::File>>>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    // In JSON lines a known rank is a number, a worker still waiting for one a string.
    let json_label = match label.parse::<u32>() {
        Ok(n) => n.to_string(),
        Err(_) => format!("\"{label}\""),
    };
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(from).lines() {
            let Ok(line) = line else { return };
            if line.contains(" ERROR ") || line.contains("\"level\":\"ERROR\"") {
                *last_error.lock().unwrap() = Some(line.clone());
            }
            if let Some(log) = &log {
                let _ = writeln!(log.lock().unwrap(), "{line}");
            }
            match line.strip_prefix('{') {
                // A JSON line stays one JSON object, with the rank as its first field.
                Some(rest) => eprintln!("{{\"rank\":{json_label},{rest}"),
                None => eprintln!("[rank {label}] {line}"),
            }
        }
    });
}

/// Sends SIGTERM to a child (std only has SIGKILL).
pub fn terminate(child: &Child) {
    // SAFETY: kill(2) with a pid this process started and has not yet reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorkerSpec {
        WorkerSpec {
            exe: "alexnet".into(),
            json_logs: true,
            coordinator: "http://127.0.0.1:9".into(),
            device: "cuda:1".into(),
            threads: 3,
            settings: crate::backend::DeviceSettings {
                tf32: true,
                conv: crate::backend::ConvPath::Cudnn,
                ..Default::default()
            },
            rank: Some(2),
            job_id: Some("alpha".into()),
            config_hash: None,
            connect_timeout: Some(Duration::from_millis(1500)),
            out: None,
            tls_ca: None,
            tls_domain: Some("localhost".into()),
            token: Some(Secret::new("t0ken")),
            label: "2".into(),
            log_file: None,
        }
    }

    #[test]
    fn a_worker_gets_its_place_on_the_command_line_and_its_token_in_the_environment() {
        let cmd = spec().command();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(line.starts_with("--log-format json worker --coordinator http://127.0.0.1:9"));
        for part in [
            "--device cuda:1",
            "--threads 3",
            "--connect-timeout 1.5",
            "--rank 2",
            "--job-id alpha",
            "--tls-domain localhost",
            "--tf32 --conv cudnn",
        ] {
            assert!(line.contains(part), "{part} in {line}");
        }
        assert!(
            !line.contains("t0ken") && !line.contains("--config-hash"),
            "{line}"
        );
        let env: Vec<_> = cmd.get_envs().collect();
        assert!(env.contains(&("ALEXNET_TOKEN".as_ref(), Some("t0ken".as_ref()))));
        assert!(env.contains(&("ALEXNET_TOKEN_FILE".as_ref(), None)));
    }
}
