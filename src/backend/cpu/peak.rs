//! The machine's FMA peak, measured: what `alexnet bench` states its GFLOP/s as fractions of.
//!
//! Machines of one kind differ (an AMD EPYC runs AVX-512 at AVX2's throughput, an Intel Xeon
//! with two 512-bit FMA units at twice it), so the peak is measured on the machine at hand,
//! for every SIMD level the CPU can run, on every thread of rayon's pool at once, as training
//! runs. Each thread runs a loop of independent multiply-adds, enough of them in flight to
//! cover the units' latency; 2 FLOPs per lane each.

use std::hint::black_box;
use std::time::{Duration, Instant};

/// A level of the instruction set the peak is measured at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// 512-bit FMAs (`_mm512_fmadd_ps`).
    Avx512,
    /// 256-bit FMAs (`_mm256_fmadd_ps`).
    Avx2Fma,
    /// Plain `f32` multiply then add, no target features: what code built for the baseline
    /// runs (`f32::mul_add` would call `fmaf` there). The compiler may pack the independent
    /// accumulators into the baseline's vectors (SSE2 on x86-64, NEON on aarch64).
    Portable,
}

impl Level {
    pub fn name(self) -> &'static str {
        match self {
            Level::Avx512 => "avx512",
            Level::Avx2Fma => "avx2+fma",
            Level::Portable => "portable",
        }
    }

    /// The levels this CPU can run, widest first.
    pub fn available() -> Vec<Level> {
        [Level::Avx512, Level::Avx2Fma, Level::Portable]
            .into_iter()
            .filter(|l| l.runs_here())
            .collect()
    }

    /// The level the `gemm` kernels dispatch to here: the widest available (as
    /// [`super::simd_level`] names it).
    pub fn of_kernels() -> Level {
        Level::available()[0]
    }

    fn runs_here(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => std::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Level::Avx2Fma => {
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            }
            Level::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// FLOPs of one iteration of the level's loop.
    fn flops_per_iteration(self) -> u64 {
        match self {
            Level::Avx512 => 2 * 16 * x86::ZMM_ACC as u64,
            Level::Avx2Fma => 2 * 8 * x86::YMM_ACC as u64,
            Level::Portable => 2 * PORTABLE_ACC as u64,
        }
    }

    /// Runs `iterations` of the level's loop on this thread; `None` where the CPU cannot.
    fn run(self, iterations: u64) -> Option<f32> {
        // Slightly below 1 and a small addend: every accumulator stays finite and normal.
        let (m, c) = (black_box(0.999_99f32), black_box(1e-5f32));
        let n = black_box(iterations);
        match self {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 if self.runs_here() => {
                // SAFETY: the CPU has AVX-512F (checked by `runs_here`).
                Some(unsafe { x86::avx512(n, m, c) })
            }
            #[cfg(target_arch = "x86_64")]
            Level::Avx2Fma if self.runs_here() => {
                // SAFETY: the CPU has AVX2 and FMA (checked by `runs_here`).
                Some(unsafe { x86::avx2_fma(n, m, c) })
            }
            Level::Portable => Some(portable(n, m, c)),
            _ => None,
        }
    }
}

/// One level's measured peak.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LevelPeak {
    pub level: Level,
    /// All threads of rayon's pool together.
    pub gflop_per_s: f64,
}

/// The peak of every level this CPU can run, widest first, on all of rayon's threads: the
/// best of 5 runs of 60 ms each per level (the machine may be shared; the best run is the one
/// least disturbed), about a second in all.
pub fn measure() -> Vec<LevelPeak> {
    measure_with(Duration::from_millis(60), 5)
}

/// [`measure`] with `reps` runs of `each` per level.
pub fn measure_with(each: Duration, reps: usize) -> Vec<LevelPeak> {
    let mut peaks: Vec<LevelPeak> = Level::available()
        .into_iter()
        // Narrowest first: the clock drop that wide FMAs may bring lasts a while after them.
        .rev()
        .filter_map(|level| {
            let best = (0..reps.max(1))
                .filter_map(|_| measure_once(level, each))
                .fold(0.0, f64::max);
            (best > 0.0).then_some(LevelPeak {
                level,
                gflop_per_s: best,
            })
        })
        .collect();
    peaks.reverse();
    peaks
}

/// GFLOP/s of `level`'s loop on every thread of rayon's pool at once for about `each`: all
/// threads' FLOPs over the time from the start until the last has finished.
pub fn measure_once(level: Level, each: Duration) -> Option<f64> {
    // About 0.2 ms per chunk at the AVX-512 peak of one core: the deadline is checked between.
    const CHUNK: u64 = 1 << 16;
    level.run(1)?;
    let start = Instant::now();
    let deadline = start + each;
    let iterations: u64 = rayon::broadcast(|_| {
        let mut done = 0;
        while done == 0 || Instant::now() < deadline {
            black_box(level.run(CHUNK));
            done += CHUNK;
        }
        done
    })
    .into_iter()
    .sum();
    let seconds = start.elapsed().as_secs_f64();
    Some((iterations * level.flops_per_iteration()) as f64 / seconds / 1e9)
}

/// Independent accumulators of the portable loop: packed 4 to a vector (SSE2), 8 chains of
/// a multiply and an add keep two units busy through both latencies. More spill registers.
const PORTABLE_ACC: usize = 32;

fn portable(iterations: u64, m: f32, c: f32) -> f32 {
    let mut acc = [1.0f32; PORTABLE_ACC];
    for _ in 0..iterations {
        for a in &mut acc {
            *a = *a * m + c;
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Accumulators in flight: two FMA units of latency 4 need 8; 16 of AVX-512's 32
    /// registers cover longer latencies too.
    pub const ZMM_ACC: usize = 16;
    /// AVX2 has 16 registers: 12 accumulators leave room for the two operands.
    pub const YMM_ACC: usize = 12;

    /// # Safety
    /// The CPU must have AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn avx512(iterations: u64, m: f32, c: f32) -> f32 {
        let (m, c) = (_mm512_set1_ps(m), _mm512_set1_ps(c));
        let mut acc = [_mm512_set1_ps(1.0); ZMM_ACC];
        for _ in 0..iterations {
            for a in &mut acc {
                *a = _mm512_fmadd_ps(*a, m, c);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm512_setzero_ps(), |s, &a| _mm512_add_ps(s, a));
        _mm512_reduce_add_ps(sum)
    }

    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn avx2_fma(iterations: u64, m: f32, c: f32) -> f32 {
        let (m, c) = (_mm256_set1_ps(m), _mm256_set1_ps(c));
        let mut acc = [_mm256_set1_ps(1.0); YMM_ACC];
        for _ in 0..iterations {
            for a in &mut acc {
                *a = _mm256_fmadd_ps(*a, m, c);
            }
        }
        let sum = acc
            .iter()
            .fold(_mm256_setzero_ps(), |s, &a| _mm256_add_ps(s, a));
        let mut lanes = [0.0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
        lanes.iter().sum()
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod x86 {
    // Only the counts, for `flops_per_iteration`'s match: these levels never run here.
    pub const ZMM_ACC: usize = 16;
    pub const YMM_ACC: usize = 12;
}

/// The CPU's model as `/proc/cpuinfo` names it, else the architecture.
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_the_cpu_runs_is_measured_and_positive() {
        let peaks = measure_with(Duration::from_millis(5), 2);
        let levels: Vec<Level> = peaks.iter().map(|p| p.level).collect();
        assert_eq!(levels, Level::available());
        for p in &peaks {
            assert!(p.gflop_per_s.is_finite() && p.gflop_per_s > 0.0, "{p:?}");
        }
        #[cfg(target_arch = "x86_64")]
        {
            let has = |l: Level| levels.contains(&l);
            assert_eq!(has(Level::Avx512), std::is_x86_feature_detected!("avx512f"));
            assert_eq!(
                has(Level::Avx2Fma),
                std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
            );
        }
        assert_eq!(levels.last(), Some(&Level::Portable));
        let kernels = match super::super::simd_level() {
            "avx512" => Level::Avx512,
            "avx2+fma" => Level::Avx2Fma,
            _ => Level::Portable,
        };
        assert_eq!(Level::of_kernels(), kernels);
    }

    #[test]
    fn a_level_the_cpu_lacks_is_not_run() {
        for level in [Level::Avx512, Level::Avx2Fma, Level::Portable] {
            let ran = measure_once(level, Duration::from_millis(1)).is_some();
            assert_eq!(ran, Level::available().contains(&level), "{level:?}");
        }
    }

    #[test]
    fn the_loops_compute_what_they_say() {
        // m = 1/2, c = 1 from 1.0: 1.5 after one step, so the sum is 1.5 per lane.
        assert_eq!(portable(1, 0.5, 1.0), 1.5 * PORTABLE_ACC as f32);
        assert!(!cpu_model().is_empty());
    }
}
