//! Counter-based random numbers: every draw is a pure function of (key, index).
//!
//! Parameters, dropout masks and augmentation must come out the same whether one process holds
//! the whole network or two processes hold one column each, and whether the run was resumed or
//! not. A stateful generator would tie the numbers to the order of the calls; hashing global
//! coordinates ties them to what they are for. The hash is SplitMix64's finaliser, which passes
//! BigCrush when fed a counter and is cheap enough to run once per dropout element. A GPU kernel
//! computes the same function.

/// SplitMix64 finaliser of `x`.
#[inline(always)]
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A stream key from a seed and a label (a layer name, say), so that streams do not overlap.
pub fn key(seed: u64, label: &str) -> u64 {
    label.bytes().fold(mix64(seed), |h, b| mix64(h ^ b as u64))
}

/// Derives a sub-key (a step, an epoch) from a key.
#[inline]
pub fn subkey(key: u64, n: u64) -> u64 {
    mix64(key ^ mix64(n.wrapping_add(0x632B_E59B_D9B4_E019)))
}

/// Uniform in [0, 1) with 24 bits, the `index`-th draw of stream `key`.
#[inline(always)]
pub fn uniform(key: u64, index: u64) -> f32 {
    (mix64(key ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03)) >> 40) as f32
        * (1.0 / (1u64 << 24) as f32)
}

/// Standard normal, the `index`-th draw of stream `key` (Box-Muller on two 32-bit halves).
#[inline]
pub fn normal(key: u64, index: u64) -> f32 {
    let h = mix64(key ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    // (0, 1] so that the logarithm stays finite.
    let u1 = ((h >> 32) as f64 + 1.0) / 4_294_967_296.0;
    let u2 = (h & 0xFFFF_FFFF) as f64 / 4_294_967_296.0;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_is_spread_over_the_unit_interval() {
        let n = 200_000u64;
        let mut buckets = [0usize; 10];
        let mut sum = 0.0f64;
        for i in 0..n {
            let u = uniform(7, i);
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
            sum += u as f64;
        }
        assert!((sum / n as f64 - 0.5).abs() < 0.005);
        for b in buckets {
            assert!((b as f64 / n as f64 - 0.1).abs() < 0.005, "{buckets:?}");
        }
    }

    #[test]
    fn normal_has_zero_mean_and_unit_variance() {
        let n = 200_000u64;
        let (mut s, mut s2) = (0.0f64, 0.0f64);
        for i in 0..n {
            let z = normal(11, i) as f64;
            s += z;
            s2 += z * z;
        }
        let mean = s / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((s2 / n as f64 - mean * mean - 1.0).abs() < 0.02);
    }

    #[test]
    fn streams_differ_by_label_and_subkey() {
        assert_ne!(key(1, "fc6"), key(1, "fc7"));
        assert_ne!(subkey(key(1, "fc6"), 0), subkey(key(1, "fc6"), 1));
    }
}
