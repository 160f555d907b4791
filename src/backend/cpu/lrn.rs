//! Local response normalisation, forward and backward each as one fused pass per image.
//!
//! For each output plane the window's squares are summed straight from the (cache-resident)
//! input planes, so the op reads and writes each full tensor once; PyTorch's version makes
//! several full-tensor passes (pad, square, pool, pow, multiply), which is why LRN dominates its
//! CPU step.

use super::{give_scratch, split_even, take_scratch};
use crate::backend::{LrnParams, PlaneGeom};
use rayon::prelude::*;

/// `s^-beta`, with the paper's beta = 0.75 as two square roots instead of `powf`.
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
    let half = p.size / 2;
    let three_quarters = p.beta == 0.75;
    let per = split_even(g.batch, threads);
    y.par_chunks_mut(per * img)
        .zip(scale.par_chunks_mut(per * img))
        .enumerate()
        .for_each(|(chunk, (ys, ss))| {
            for (i, (yn, sn)) in ys.chunks_mut(img).zip(ss.chunks_mut(img)).enumerate() {
                let xn = &x[(chunk * per + i) * img..][..img];
                for c in 0..g.channels {
                    let sc = &mut sn[c * g.plane..][..g.plane];
                    sc.fill(0.0);
                    for j in window(c, g.channels, half) {
                        let xj = &xn[j * g.plane..][..g.plane];
                        sc.iter_mut().zip(xj).for_each(|(s, &v)| *s += v * v);
                    }
                    let xc = &xn[c * g.plane..][..g.plane];
                    let yc = &mut yn[c * g.plane..][..g.plane];
                    for ((s, yv), &xv) in sc.iter_mut().zip(yc.iter_mut()).zip(xc) {
                        *s = p.k + p.alpha * *s;
                        *yv = xv * pow_neg_beta(*s, p.beta, three_quarters);
                    }
                }
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
    let half = p.size / 2;
    let three_quarters = p.beta == 0.75;
    let coeff = -2.0 * p.alpha * p.beta;
    let per = split_even(g.batch, threads);
    dx.par_chunks_mut(per * img)
        .enumerate()
        .for_each(|(chunk, dxs)| {
            // t = dy * y / s for every channel of one image, reused by the windows around it.
            let mut t = take_scratch(img);
            for (i, dxn) in dxs.chunks_mut(img).enumerate() {
                let off = (chunk * per + i) * img;
                let (xn, yn, sn, dyn_) = (
                    &x[off..][..img],
                    &y[off..][..img],
                    &scale[off..][..img],
                    &dy[off..][..img],
                );
                for (((tv, &d), &yv), &s) in t.iter_mut().zip(dyn_).zip(yn).zip(sn) {
                    *tv = d * yv / s;
                }
                for c in 0..g.channels {
                    let dxc = &mut dxn[c * g.plane..][..g.plane];
                    dxc.fill(0.0);
                    for j in window(c, g.channels, half) {
                        let tj = &t[j * g.plane..][..g.plane];
                        dxc.iter_mut().zip(tj).for_each(|(a, &b)| *a += b);
                    }
                    let r = c * g.plane..(c + 1) * g.plane;
                    for (((a, &xv), &d), &s) in dxc
                        .iter_mut()
                        .zip(&xn[r.clone()])
                        .zip(&dyn_[r.clone()])
                        .zip(&sn[r])
                    {
                        *a = d * pow_neg_beta(s, p.beta, three_quarters) + coeff * xv * *a;
                    }
                }
            }
            give_scratch(t);
        });
}
