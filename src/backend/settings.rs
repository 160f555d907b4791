//! How a device runs, beyond which device it is: the settings every command that opens a
//! device takes as flags (each with its environment variable), and that a launcher hands its
//! workers on their command line.

/// How the CUDA backend runs its convolutions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ConvPath {
    /// Unfolding (our im2col kernel) plus cuBLAS matrix products.
    #[default]
    Unfold,
    /// cuDNN's convolutions.
    Cudnn,
}

/// How the cuDNN convolutions' algorithms are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AlgoChoice {
    /// Every algorithm run once on this GPU, the fastest taken (PyTorch's `cudnn.benchmark`).
    #[default]
    Timed,
    /// cuDNN's heuristic, from a model of the GPU: nothing runs.
    Heuristic,
}

/// Everything a device is opened with besides its name and thread count.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeviceSettings {
    /// The most memory the job's CPU workers on this machine may take for their buffers
    /// together, in bytes, where the machine has more than the job should use and no control
    /// group says so.
    pub memory_limit: Option<u64>,
    /// GPUs: TF32 tensor cores allowed in matrix products and convolutions (off: strict f32,
    /// results within 1e-4 of the CPU's).
    pub tf32: bool,
    /// GPUs: how convolutions run.
    pub conv: ConvPath,
    /// GPUs with `conv = Cudnn`: how cuDNN's algorithms are chosen.
    pub cudnn_algos: AlgoChoice,
}

impl DeviceSettings {
    /// The flags that give a worker process these settings (only those that differ from the
    /// defaults), so that a launcher's workers run as it was told to, not as their
    /// environment happens to say.
    pub fn worker_args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(limit) = self.memory_limit {
            args.extend(["--memory-limit".into(), limit.to_string()]);
        }
        if self.tf32 {
            args.push("--tf32".into());
        }
        if self.conv != ConvPath::default() {
            args.extend(["--conv".into(), "cudnn".into()]);
        }
        if self.cudnn_algos != AlgoChoice::default() {
            args.extend(["--cudnn-algos".into(), "heuristic".into()]);
        }
        args
    }
}

/// `12G`, `512M`, `1.5G`, `1048576`: bytes, the suffixes binary (and an optional `iB` or `B`
/// after them).
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (number, shift) = match t.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return None,
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let value: f64 = number.trim().parse().ok()?;
    (value.is_finite() && value >= 0.0).then(|| (value * (1u64 << shift) as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_with_binary_suffixes() {
        assert_eq!(parse_size("1048576"), Some(1 << 20));
        assert_eq!(parse_size("12G"), Some(12 << 30));
        assert_eq!(parse_size("512m"), Some(512 << 20));
        assert_eq!(parse_size("1.5GiB"), Some(3 << 29));
        assert_eq!(parse_size(" 64 MB "), Some(64 << 20));
        for bad in ["", "G", "twelve", "12X", "-1G", "NaN"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn workers_get_the_settings_that_differ_from_the_defaults() {
        assert!(DeviceSettings::default().worker_args().is_empty());
        let s = DeviceSettings {
            memory_limit: Some(1 << 20),
            tf32: true,
            conv: ConvPath::Cudnn,
            cudnn_algos: AlgoChoice::Heuristic,
        };
        assert_eq!(
            s.worker_args().join(" "),
            "--memory-limit 1048576 --tf32 --conv cudnn --cudnn-algos heuristic"
        );
    }
}
