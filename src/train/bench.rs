//! `alexnet bench`: images/s of full training steps on random data, where the time goes per
//! layer, and peak memory.

use super::train_step;
use crate::backend::cpu::peak;
use crate::backend::{Backend, SgdParams};
use crate::comm::LocalExchange;
use crate::model::network::Profile;
use crate::model::params::parameter_count;
use crate::model::shapes::{layer_flops_per_image, train_flops_per_image};
use crate::model::{NetConfig, Network};
use crate::rng;
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub batch: usize,
    pub warmup: usize,
    pub steps: usize,
    pub net: NetConfig,
    pub seed: u64,
    /// Also time steps that upload their input, as training does ([`uploading_steps`]).
    pub upload: bool,
    /// Measure the CPU's FMA peak ([`peak::measure`]) and state the GFLOP/s as fractions of
    /// it: for the CPU backend (a GPU's work is not bounded by the CPU's peak).
    pub cpu_peak: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct LayerTime {
    pub layer: String,
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// Of the summed per-layer time.
    pub share: f64,
    /// Achieved, counting the layer's FLOPs ([`layer_flops_per_image`]); none for layers
    /// without multiply-adds (LRN, pooling, the exchange, SGD).
    pub forward_gflop_per_s: Option<f64>,
    pub backward_gflop_per_s: Option<f64>,
    /// Of [`Peak::gflop_per_s`].
    pub forward_fraction_of_peak: Option<f64>,
    pub backward_fraction_of_peak: Option<f64>,
}

/// The CPU's FMA peak, measured in the same run on every compute thread.
#[derive(Clone, Debug, Serialize)]
pub struct Peak {
    pub threads: usize,
    /// Every level the CPU runs, widest first.
    pub levels: Vec<PeakLevel>,
    /// The level the run's GEMM kernels dispatch to: the widest the CPU runs.
    pub kernels: String,
    /// The peak fractions are stated against: that of `kernels`, the highest level measured.
    pub gflop_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct PeakLevel {
    pub level: String,
    pub gflop_per_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub batch: usize,
    pub steps: usize,
    pub parameters: usize,
    /// Median over the timed steps.
    pub step_ms: f64,
    pub images_per_s: f64,
    /// Achieved, counting [`train_flops_per_image`].
    pub gflop_per_s: f64,
    /// `/proc/cpuinfo`'s model name, else the architecture.
    pub cpu_model: String,
    /// On the CPU backend; none on a GPU.
    pub peak: Option<Peak>,
    /// `gflop_per_s` of the peak.
    pub fraction_of_peak: Option<f64>,
    /// Per step, averaged over the timed steps (on a device, over up to 5 more steps that
    /// wait for the device after every layer, so that each layer's time is its own).
    pub layers: Vec<LayerTime>,
    /// Bytes the network keeps between steps (parameters, gradients, momenta, activations).
    pub network_bytes: usize,
    /// The process's peak resident memory (Linux `VmHWM`), when known.
    pub peak_rss_bytes: Option<u64>,
    /// Device memory in use after the timed steps (GPU backends).
    pub device_memory_bytes: Option<u64>,
    /// With `--upload`: images/s of steps that each upload their input as training does
    /// ([`uploading_steps`]).
    pub uploading_images_per_s: Option<f64>,
}

/// Peak resident set size of this process, from `/proc/self/status`.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

pub fn run<B: Backend>(backend: B, opts: &BenchOptions) -> anyhow::Result<BenchReport> {
    anyhow::ensure!(opts.batch > 0, "--batch must be at least 1");
    anyhow::ensure!(opts.steps > 0, "--steps must be at least 1");
    anyhow::ensure!(
        !opts.upload || opts.net.in_channels == 3,
        "--upload ships colour views as bytes: the network needs 3 input channels, not {}",
        opts.net.in_channels
    );
    let name = backend.name();
    let mut net = Network::new(
        opts.net.clone(),
        backend,
        Box::new(LocalExchange::default()),
        opts.seed,
    )?;
    // A batch that does not fit fails now, naming the layer, before the input is made.
    net.reserve(opts.batch)?;
    let classes = opts.net.classes;
    // Mean-subtracted pixel-like values, fixed labels: the speed does not depend on them.
    let key = rng::key(opts.seed, "bench.input");
    let host: Vec<f32> = (0..net.input_len(opts.batch) as u64)
        .map(|i| 50.0 * rng::normal(key, i))
        .collect();
    let x = net.backend.upload(&host);
    drop(host);
    let labels: Vec<u32> = (0..opts.batch as u64)
        .map(|i| (rng::mix64(i ^ opts.seed) % classes as u64) as u32)
        .collect();
    let sgd = SgdParams {
        lr: 0.01,
        momentum: 0.9,
        weight_decay: 0.0005,
    };
    for step in 0..opts.warmup {
        let t = Instant::now();
        train_step(&mut net, &x, &labels, step as u64, &sgd)?;
        net.backend.synchronize();
        tracing::info!(step, ms = %format!("{:.1}", t.elapsed().as_secs_f64() * 1e3), "warm-up step");
    }
    net.profile = Default::default();
    let mut times = Vec::with_capacity(opts.steps);
    for step in 0..opts.steps {
        let t = Instant::now();
        let r = train_step(&mut net, &x, &labels, (opts.warmup + step) as u64, &sgd)?;
        // A device queues the update: the step ends when it has run.
        net.backend.synchronize();
        let ms = t.elapsed().as_secs_f64() * 1e3;
        tracing::info!(
            step,
            ms = %format!("{ms:.1}"),
            images_per_s = %format!("{:.1}", opts.batch as f64 / ms * 1e3),
            loss = %format!("{:.4}", r.loss),
            "timed step"
        );
        times.push(ms);
    }
    times.sort_by(f64::total_cmp);
    let step_ms = times[times.len() / 2];
    let uploading_images_per_s = if opts.upload {
        let first = (opts.warmup + opts.steps) as u64;
        Some(uploading_steps(&mut net, opts, &labels, &sgd, first)?)
    } else {
        None
    };
    // A device (one that reports its memory) queues its ops: the timed steps' per-layer times
    // are the times to queue them. A few more steps, waiting for the device after every
    // layer, give each layer's own time; the images/s above stay those of unbroken steps.
    let mut profiled = opts.steps;
    if net.backend.device_memory_in_use().is_some() {
        profiled = opts.steps.min(5);
        net.profile = Profile {
            synchronize: true,
            ..Default::default()
        };
        for step in 0..profiled {
            let at = (opts.warmup + opts.steps + step) as u64;
            train_step(&mut net, &x, &labels, at, &sgd)?;
        }
        net.profile.synchronize = false;
    }
    // After the steps, so that a network that does not fit fails without waiting for it.
    let peak = opts.cpu_peak.then(measure_peak);
    let fraction = |gflop_per_s: f64| peak.as_ref().map(|p| gflop_per_s / p.gflop_per_s);
    let per_step = |d: std::time::Duration| d.as_secs_f64() * 1e3 / profiled as f64;
    let total: f64 = net
        .profile
        .layers
        .iter()
        .map(|l| per_step(l.forward) + per_step(l.backward))
        .sum();
    let layer_flops = layer_flops_per_image(&opts.net)?;
    // The profile times both columns' work of a layer (one process holds both), as the
    // FLOPs count it.
    let rate = |flops: u64, ms: f64| {
        (flops > 0 && ms > 0.0).then(|| flops as f64 * opts.batch as f64 / (ms * 1e-3) / 1e9)
    };
    let layers = net
        .profile
        .layers
        .iter()
        .map(|l| {
            let f = layer_flops.iter().find(|f| f.layer == l.layer);
            let forward = rate(f.map_or(0, |f| f.forward), per_step(l.forward));
            let backward = rate(f.map_or(0, |f| f.backward), per_step(l.backward));
            LayerTime {
                layer: l.layer.to_string(),
                forward_ms: per_step(l.forward),
                backward_ms: per_step(l.backward),
                share: (per_step(l.forward) + per_step(l.backward)) / total.max(1e-12),
                forward_gflop_per_s: forward,
                backward_gflop_per_s: backward,
                forward_fraction_of_peak: forward.and_then(fraction),
                backward_fraction_of_peak: backward.and_then(fraction),
            }
        })
        .collect();
    let flops = train_flops_per_image(&opts.net)?;
    let gflop_per_s = flops as f64 * opts.batch as f64 / (step_ms * 1e-3) / 1e9;
    Ok(BenchReport {
        backend: name,
        batch: opts.batch,
        steps: opts.steps,
        parameters: parameter_count(&net.cfg, &net.sides),
        step_ms,
        images_per_s: opts.batch as f64 / step_ms * 1e3,
        gflop_per_s,
        cpu_model: peak::cpu_model(),
        fraction_of_peak: fraction(gflop_per_s),
        peak,
        layers,
        network_bytes: net.resident_bytes(),
        peak_rss_bytes: peak_rss_bytes(),
        device_memory_bytes: net.backend.device_memory_in_use(),
        uploading_images_per_s,
    })
}

/// The CPU's peak at every level it runs, on rayon's threads (those the CPU backend computes
/// on); fractions are of the level the GEMM kernels use.
fn measure_peak() -> Peak {
    let levels = peak::measure();
    let kernels = peak::Level::of_kernels();
    let gflop_per_s = levels
        .iter()
        .find(|l| l.level == kernels)
        .map_or(f64::NAN, |l| l.gflop_per_s);
    tracing::info!(
        gflop_per_s = %format!("{gflop_per_s:.1}"),
        level = kernels.name(),
        "FMA peak measured"
    );
    Peak {
        threads: rayon::current_num_threads(),
        levels: levels
            .iter()
            .map(|l| PeakLevel {
                level: l.level.name().to_string(),
                gflop_per_s: l.gflop_per_s,
            })
            .collect(),
        kernels: kernels.name().to_string(),
        gflop_per_s,
    }
}

/// Images/s of `opts.steps` steps that each upload their input the way training on prepared
/// images does: a batch of views as bytes (the paper's 224 cut from 256, or the network's input
/// side from 8/7 of it), their crops and colour shifts, finished on the backend against the
/// mean image. The steps run back to back and the backend is waited for once, at the end, so
/// that a device may queue a step's upload behind the previous step's work, as in training;
/// the gap to the images/s of the timed steps is what the input costs.
fn uploading_steps<B: Backend>(
    net: &mut Network<B>,
    opts: &BenchOptions,
    labels: &[u32],
    sgd: &SgdParams,
    first_step: u64,
) -> anyhow::Result<f64> {
    use crate::data::augment::{ByteViews, Crop};
    use crate::data::loader::Pixels;
    let side = net.cfg.input_size;
    let stored = side + side / 7;
    let key = rng::key(opts.seed, "bench.upload");
    let mean: std::sync::Arc<[f32]> = (0..3 * stored * stored)
        .map(|i| 110.0 + 40.0 * rng::uniform(key, i as u64))
        .collect();
    // Two batches in turn, so that no upload repeats the one before it.
    let batches: Vec<Pixels> = (0..2u64)
        .map(|b| {
            let k = rng::subkey(key, b + 1);
            let draw = |i: u64, n: usize| (rng::mix64(k ^ i) % n as u64) as usize;
            Pixels::Bytes(ByteViews {
                side: stored,
                out_side: side,
                pixels: (0..opts.batch * 3 * side * side)
                    .map(|i| rng::mix64(k.wrapping_add(i as u64)) as u8)
                    .collect(),
                crops: (0..opts.batch as u64)
                    .map(|v| Crop {
                        x0: draw(3 * v, stored - side + 1),
                        y0: draw(3 * v + 1, stored - side + 1),
                        flip: draw(3 * v + 2, 2) == 1,
                    })
                    .collect(),
                shifts: (0..opts.batch as u64)
                    .map(|v| [0, 1, 2].map(|c| 10.0 * rng::normal(k, 3 * v + c)))
                    .collect(),
                mean: mean.clone(),
            })
        })
        .collect();
    let mut uploader = super::fit::BatchUploader::default();
    // One untimed step: the mean image goes up once per dataset, and the first uploads set up
    // what later ones reuse.
    let x = uploader.upload(&net.backend, &batches[0])?;
    train_step(net, &x, labels, first_step, sgd)?;
    net.backend.synchronize();
    let t = Instant::now();
    for step in 0..opts.steps {
        let x = uploader.upload(&net.backend, &batches[(step + 1) % 2])?;
        train_step(net, &x, labels, first_step + 1 + step as u64, sgd)?;
    }
    net.backend.synchronize();
    let images_per_s = (opts.batch * opts.steps) as f64 / t.elapsed().as_secs_f64();
    tracing::info!(
        images_per_s = %format!("{images_per_s:.1}"),
        steps = opts.steps,
        "steps uploading their input as bytes"
    );
    Ok(images_per_s)
}

/// The report as a table for people.
pub fn render(r: &BenchReport) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let gib = |b: f64| b / (1u64 << 30) as f64;
    let _ = writeln!(s, "backend        {}", r.backend);
    let _ = writeln!(s, "cpu            {}", r.cpu_model);
    let _ = writeln!(s, "parameters     {}", r.parameters);
    let _ = writeln!(
        s,
        "batch          {} ({} timed steps, median)",
        r.batch, r.steps
    );
    let _ = writeln!(s, "step           {:.1} ms", r.step_ms);
    let of_peak =
        |f: Option<f64>| f.map_or(String::new(), |f| format!(", {:.1}% of peak", 100.0 * f));
    let _ = writeln!(
        s,
        "throughput     {:.1} images/s ({:.0} GFLOP/s{})",
        r.images_per_s,
        r.gflop_per_s,
        of_peak(r.fraction_of_peak)
    );
    match &r.peak {
        Some(p) => {
            let levels: Vec<String> = (p.levels.iter())
                .map(|l| format!("{} {:.1}", l.level, l.gflop_per_s))
                .collect();
            let _ = writeln!(
                s,
                "FMA peak       {} GFLOP/s ({} threads; the kernels use {})",
                levels.join(", "),
                p.threads,
                p.kernels
            );
            let _ = writeln!(
                s,
                "               peak used for fractions: the highest level measured, {} {:.1} GFLOP/s",
                p.kernels, p.gflop_per_s
            );
        }
        None => {
            let _ = writeln!(
                s,
                "FMA peak       not measured (the backend is not the CPU: no fractions of peak)"
            );
        }
    }
    let _ = writeln!(s, "network memory {:.2} GiB", gib(r.network_bytes as f64));
    if let Some(p) = r.peak_rss_bytes {
        let _ = writeln!(s, "peak RSS       {:.2} GiB", gib(p as f64));
    }
    if let Some(u) = r.uploading_images_per_s {
        let _ = writeln!(
            s,
            "with uploads   {u:.1} images/s (each step's input uploaded as bytes and finished \
             there, steps back to back)"
        );
    }
    if let Some(d) = r.device_memory_bytes {
        let _ = writeln!(s, "GPU memory     {:.2} GiB in use", gib(d as f64));
        let _ = writeln!(
            s,
            "(per-layer times below: from up to 5 more steps that wait for the GPU after each layer)"
        );
    }
    let _ = writeln!(
        s,
        "\n{:<10} {:>10} {:>11} {:>7} {:>12} {:>8} {:>12} {:>8}",
        "layer", "fwd ms", "bwd ms", "share", "fwd GFLOP/s", "of peak", "bwd GFLOP/s", "of peak"
    );
    let rate = |g: Option<f64>| g.map_or(String::new(), |g| format!("{g:.1}"));
    let pct = |f: Option<f64>| f.map_or(String::new(), |f| format!("{:.1}%", 100.0 * f));
    for l in &r.layers {
        let line = format!(
            "{:<10} {:>10.1} {:>11.1} {:>6.1}% {:>12} {:>8} {:>12} {:>8}",
            l.layer,
            l.forward_ms,
            l.backward_ms,
            100.0 * l.share,
            rate(l.forward_gflop_per_s),
            pct(l.forward_fraction_of_peak),
            rate(l.backward_gflop_per_s),
            pct(l.backward_fraction_of_peak)
        );
        let _ = writeln!(s, "{}", line.trim_end());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::shapes::forward_macs_per_image;

    #[test]
    fn paper_forward_is_724_million_multiply_adds() {
        let macs = forward_macs_per_image(&NetConfig::default()).unwrap();
        assert_eq!(macs / 100_000, 7244, "{macs}");
        let flops = train_flops_per_image(&NetConfig::default()).unwrap();
        // 3 x 724,406,816 less conv1's 105,415,200, 2 FLOPs each: the 4.136 GFLOP of the reference.
        assert_eq!(flops, 4_135_610_496);
    }

    fn report(peak: Option<Peak>) -> BenchReport {
        let measured = peak.is_some();
        let layer = |name: &str, g: Option<f64>| LayerTime {
            layer: name.into(),
            forward_ms: 1.0,
            backward_ms: 2.0,
            share: 0.5,
            forward_gflop_per_s: g,
            backward_gflop_per_s: g,
            forward_fraction_of_peak: g.filter(|_| measured).map(|_| 0.25),
            backward_fraction_of_peak: g.filter(|_| measured).map(|_| 0.5),
        };
        BenchReport {
            backend: "cpu".into(),
            batch: 2,
            steps: 1,
            parameters: 1,
            step_ms: 3.0,
            images_per_s: 666.7,
            gflop_per_s: 10.0,
            cpu_model: "Some CPU".into(),
            fraction_of_peak: measured.then_some(0.1),
            peak,
            layers: vec![layer("conv1", Some(25.0)), layer("pool1", None)],
            network_bytes: 0,
            peak_rss_bytes: None,
            device_memory_bytes: None,
            uploading_images_per_s: None,
        }
    }

    /// A table row's fields.
    fn row(table: &str, name: &str) -> Vec<String> {
        let line = table.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn the_table_states_fractions_of_the_measured_peak() {
        let peak = Peak {
            threads: 2,
            levels: vec![
                PeakLevel {
                    level: "avx2+fma".into(),
                    gflop_per_s: 100.0,
                },
                PeakLevel {
                    level: "portable".into(),
                    gflop_per_s: 20.0,
                },
            ],
            kernels: "avx2+fma".into(),
            gflop_per_s: 100.0,
        };
        let table = render(&report(Some(peak)));
        assert!(table.contains("cpu            Some CPU"), "{table}");
        assert!(table.contains("(10 GFLOP/s, 10.0% of peak)"), "{table}");
        assert!(
            table.contains(
                "avx2+fma 100.0, portable 20.0 GFLOP/s (2 threads; the kernels use avx2+fma)"
            ),
            "{table}"
        );
        assert!(table.contains("peak used for fractions: the highest level measured"));
        assert_eq!(
            row(&table, "conv1")[4..],
            ["25.0", "25.0%", "25.0", "50.0%"]
        );
        // No multiply-adds: no rate, no fraction.
        assert_eq!(row(&table, "pool1").len(), 4);

        let table = render(&report(None));
        assert!(table.contains("FMA peak       not measured"), "{table}");
        assert!(!table.contains("% of peak"), "{table}");
        assert_eq!(row(&table, "conv1").len(), 4 + 2);
    }
}
