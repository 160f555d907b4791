//! Local response normalisation, forward and backward each as one fused pass per image.
//!
//! For each output plane the window's squares are summed straight from the (cache-resident)
//! input planes, so the op reads and writes each full tensor once; PyTorch's version makes
//! several full-tensor passes (pad, square, pool, pow, multiply), which is why LRN dominates its
//! CPU step. The per-image kernels are compiled for AVX-512 and AVX2 as well as the baseline,
//! and the best one the CPU has is picked at run time.

use super::{give_scratch, split_even, take_scratch};
use crate::backend::{LrnParams, PlaneGeom};
use multiversion::multiversion;
use rayon::prelude::*;

/// `s^-beta`, with the paper's beta = 0.75 as two square roots instead of `powf` (which does
/// not vectorise).
#[inline(always)]
fn pow_neg_beta(s: f32, beta: f32, three_quarters: bool) -> f32 {
    if three_quarters {
        1.0 / (s * s.sqrt()).sqrt()
    } else {
        s.powf(-beta)
    }
}

fn window(c: usize, channels: usize, half: usize) -> std::ops::Range<usize> {
    c.saturating_sub(half)..(c + half + 1).min(channels)
}

/// One image: `x`, `y`, `scale` hold `channels` planes of `plane` values.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw+avx2+fma",
    "x86_64+avx2+fma"
))]
fn forward_image(
    p: &LrnParams,
    channels: usize,
    plane: usize,
    x: &[f32],
    y: &mut [f32],
    scale: &mut [f32],
) {
    let half = p.size / 2;
    let three_quarters = p.beta == 0.75;
    for c in 0..channels {
        let sc = &mut scale[c * plane..][..plane];
        sc.fill(0.0);
        for j in window(c, channels, half) {
            let xj = &x[j * plane..][..plane];
            sc.iter_mut().zip(xj).for_each(|(s, &v)| *s += v * v);
        }
        let xc = &x[c * plane..][..plane];
        let yc = &mut y[c * plane..][..plane];
        for ((s, yv), &xv) in sc.iter_mut().zip(yc.iter_mut()).zip(xc) {
            *s = p.k + p.alpha * *s;
            *yv = xv * pow_neg_beta(*s, p.beta, three_quarters);
        }
    }
}

/// One image of the backward pass; `t` is scratch of the image's size.
#[allow(clippy::too_many_arguments)]
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw+avx2+fma",
    "x86_64+avx2+fma"
))]
fn backward_image(
    p: &LrnParams,
    channels: usize,
    plane: usize,
    x: &[f32],
    y: &[f32],
    scale: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    t: &mut [f32],
) {
    let half = p.size / 2;
    let three_quarters = p.beta == 0.75;
    let coeff = -2.0 * p.alpha * p.beta;
    // t = dy * y / s for every channel, reused by the windows around it.
    for (((tv, &d), &yv), &s) in t.iter_mut().zip(dy).zip(y).zip(scale) {
        *tv = d * yv / s;
    }
    for c in 0..channels {
        let dxc = &mut dx[c * plane..][..plane];
        dxc.fill(0.0);
        for j in window(c, channels, half) {
            let tj = &t[j * plane..][..plane];
            dxc.iter_mut().zip(tj).for_each(|(a, &b)| *a += b);
        }
        let r = c * plane..(c + 1) * plane;
        for (((a, &xv), &d), &s) in dxc
            .iter_mut()
            .zip(&x[r.clone()])
            .zip(&dy[r.clone()])
            .zip(&scale[r])
        {
            *a = d * pow_neg_beta(s, p.beta, three_quarters) + coeff * xv * *a;
        }
    }
}

pub fn forward(
    g: &PlaneGeom,
    p: &LrnParams,
    x: &[f32],
    y: &mut [f32],
    scale: &mut [f32],
    threads: usize,
) {
    assert_eq!(x.len(), g.len(), "lrn input length");
    assert_eq!(y.len(), g.len(), "lrn output length");
    assert_eq!(scale.len(), g.len(), "lrn scale length");
    let img = g.channels * g.plane;
    let per = split_even(g.batch, threads);
    y.par_chunks_mut(per * img)
        .zip(scale.par_chunks_mut(per * img))
        .enumerate()
        .for_each(|(chunk, (ys, ss))| {
            for (i, (yn, sn)) in ys.chunks_mut(img).zip(ss.chunks_mut(img)).enumerate() {
                let xn = &x[(chunk * per + i) * img..][..img];
                forward_image(p, g.channels, g.plane, xn, yn, sn);
            }
        });
}

/// `dx[c] = dy[c] s[c]^-beta - 2 alpha beta x[c] sum_{c' in window(c)} dy[c'] y[c'] / s[c']`
/// (the window is symmetric, so `c` is in the window of `c'` exactly when `c'` is in its own).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: &PlaneGeom,
    p: &LrnParams,
    x: &[f32],
    y: &[f32],
    scale: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    threads: usize,
) {
    for (buf, what) in [
        (x, "input"),
        (y, "output"),
        (scale, "scale"),
        (dy, "output gradient"),
    ] {
        assert_eq!(buf.len(), g.len(), "lrn {what} length");
    }
    assert_eq!(dx.len(), g.len(), "lrn input gradient length");
    let img = g.channels * g.plane;
    let per = split_even(g.batch, threads);
    dx.par_chunks_mut(per * img)
        .enumerate()
        .for_each(|(chunk, dxs)| {
            let mut t = take_scratch(img);
            for (i, dxn) in dxs.chunks_mut(img).enumerate() {
                let r = (chunk * per + i) * img..(chunk * per + i + 1) * img;
                backward_image(
                    p,
                    g.channels,
                    g.plane,
                    &x[r.clone()],
                    &y[r.clone()],
                    &scale[r.clone()],
                    &dy[r],
                    dxn,
                    &mut t,
                );
            }
            give_scratch(t);
        });
}
