//! Convolution as im2col + GEMM, one image per task.
//!
//! Parallelising over images (each GEMM single-threaded) keeps both cores busy on every layer:
//! the late layers' GEMMs (13x13 outputs) are too small to split well, and per-image tasks need
//! no synchronisation except the final sum of the weight gradients.

use super::gemm::{sgemm, MatRef, Parallelism};
use super::split_even;
use crate::backend::ConvGeom;
use rayon::prelude::*;

/// Sizes of one group's unfolded input: `k_rows = (in_c / groups) * k * k` rows of `pixels` values.
struct Unfold {
    cin_g: usize,
    cout_g: usize,
    k_rows: usize,
    pixels: usize,
    in_img: usize,
    out_img: usize,
}

fn unfold_sizes(g: &ConvGeom) -> Unfold {
    let cin_g = g.in_c / g.groups;
    Unfold {
        cin_g,
        cout_g: g.out_c / g.groups,
        k_rows: cin_g * g.kernel * g.kernel,
        pixels: g.out_h() * g.out_w(),
        in_img: g.in_c * g.in_h * g.in_w,
        out_img: g.out_c * g.out_h() * g.out_w(),
    }
}

/// The output columns `[lo, hi)` whose input column `o * stride + kx - pad` falls inside `0..w`.
fn valid_range(out: usize, w: usize, stride: usize, pad: usize, kx: usize) -> (usize, usize) {
    // o * s + kx - pad >= 0  <=>  o >= ceil((pad - kx) / s)
    let lo = if pad > kx { (pad - kx).div_ceil(stride) } else { 0 };
    // o * s + kx - pad <= w - 1  <=>  o <= (w - 1 + pad - kx) / s
    let hi = if w + pad > kx { ((w - 1 + pad - kx) / stride + 1).min(out) } else { 0 };
    (lo.min(hi), hi)
}

/// Unfolds `cin` planes of `x` (`h x w`) into `col[(c, ky, kx), (oy, ox)]`.
fn im2col(g: &ConvGeom, x: &[f32], cin: usize, col: &mut [f32]) {
    let (h, w, k, s, p) = (g.in_h, g.in_w, g.kernel, g.stride, g.pad);
    let (oh, ow) = (g.out_h(), g.out_w());
    let pixels = oh * ow;
    for c in 0..cin {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((c * k + ky) * k + kx) * pixels..][..pixels];
                let (lo, hi) = valid_range(ow, w, s, p, kx);
                for oy in 0..oh {
                    let dst = &mut row[oy * ow..(oy + 1) * ow];
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy >= h as isize || lo >= hi {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * w..(iy as usize + 1) * w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    let ix0 = lo * s + kx - p;
                    if s == 1 {
                        dst[lo..hi].copy_from_slice(&src[ix0..ix0 + (hi - lo)]);
                    } else {
                        for (d, ix) in dst[lo..hi].iter_mut().zip((ix0..).step_by(s)) {
                            *d = src[ix];
                        }
                    }
                }
            }
        }
    }
}

/// Folds `col` back onto `cin` planes of `dx`, adding overlapping contributions.
fn col2im(g: &ConvGeom, col: &[f32], cin: usize, dx: &mut [f32]) {
    let (h, w, k, s, p) = (g.in_h, g.in_w, g.kernel, g.stride, g.pad);
    let (oh, ow) = (g.out_h(), g.out_w());
    let pixels = oh * ow;
    for c in 0..cin {
        let plane = &mut dx[c * h * w..(c + 1) * h * w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &col[((c * k + ky) * k + kx) * pixels..][..pixels];
                let (lo, hi) = valid_range(ow, w, s, p, kx);
                if lo >= hi {
                    continue;
                }
                for oy in 0..oh {
                    let iy = (oy * s + ky) as isize - p as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * w..(iy as usize + 1) * w];
                    let src = &row[oy * ow..(oy + 1) * ow];
                    let ix0 = lo * s + kx - p;
                    for (o, ix) in (lo..hi).zip((ix0..).step_by(s)) {
                        dst[ix] += src[o];
                    }
                }
            }
        }
    }
}

pub fn forward(g: &ConvGeom, x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], threads: usize) {
    let u = unfold_sizes(g);
    assert_eq!(x.len(), g.in_len(), "conv input length");
    assert_eq!(w.len(), g.weight_len(), "conv weight length");
    assert_eq!(b.len(), g.out_c, "conv bias length");
    assert_eq!(y.len(), g.out_len(), "conv output length");
    let per = split_even(g.batch, threads);
    y.par_chunks_mut(per * u.out_img).enumerate().for_each(|(chunk, ys)| {
        let mut col = vec![0.0f32; u.k_rows * u.pixels];
        for (i, yn) in ys.chunks_mut(u.out_img).enumerate() {
            let xn = &x[(chunk * per + i) * u.in_img..][..u.in_img];
            for (o, plane) in yn.chunks_mut(u.pixels).enumerate() {
                plane.fill(b[o]);
            }
            for gi in 0..g.groups {
                let xg = &xn[gi * u.cin_g * g.in_h * g.in_w..];
                im2col(g, xg, u.cin_g, &mut col);
                sgemm(
                    u.cout_g,
                    u.pixels,
                    u.k_rows,
                    MatRef::rows(&w[gi * u.cout_g * u.k_rows..][..u.cout_g * u.k_rows], u.k_rows),
                    MatRef::rows(&col, u.pixels),
                    &mut yn[gi * u.cout_g * u.pixels..][..u.cout_g * u.pixels],
                    u.pixels,
                    true,
                    Parallelism::None,
                );
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    g: &ConvGeom,
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    db: &mut [f32],
    threads: usize,
) {
    let u = unfold_sizes(g);
    assert_eq!(x.len(), g.in_len(), "conv input length");
    assert_eq!(dy.len(), g.out_len(), "conv output gradient length");
    assert_eq!(dw.len(), g.weight_len(), "conv weight gradient length");
    assert_eq!(db.len(), g.out_c, "conv bias gradient length");
    let per = split_even(g.batch, threads);
    let chunks = g.batch.div_ceil(per);
    let dx_chunks: Vec<Option<&mut [f32]>> = match dx {
        Some(d) => {
            assert_eq!(d.len(), g.in_len(), "conv input gradient length");
            d.chunks_mut(per * u.in_img).map(Some).collect()
        }
        None => (0..chunks).map(|_| None).collect(),
    };
    // Each task sums the weight and bias gradients of its images; the partial sums are added
    // at the end, in chunk order so that the result does not depend on scheduling.
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx_chunks
        .into_par_iter()
        .enumerate()
        .map(|(chunk, mut dxs)| {
            let mut dw_part = vec![0.0f32; dw.len()];
            let mut db_part = vec![0.0f32; g.out_c];
            let mut col = vec![0.0f32; u.k_rows * u.pixels];
            let first = chunk * per;
            let count = per.min(g.batch - first);
            for i in 0..count {
                let n = first + i;
                let xn = &x[n * u.in_img..][..u.in_img];
                let dyn_ = &dy[n * u.out_img..][..u.out_img];
                for (o, plane) in dyn_.chunks(u.pixels).enumerate() {
                    db_part[o] += plane.iter().sum::<f32>();
                }
                let mut dxn = dxs.as_deref_mut().map(|d| {
                    let d = &mut d[i * u.in_img..][..u.in_img];
                    d.fill(0.0);
                    d
                });
                for gi in 0..g.groups {
                    let dyg = &dyn_[gi * u.cout_g * u.pixels..][..u.cout_g * u.pixels];
                    let plane_off = gi * u.cin_g * g.in_h * g.in_w;
                    im2col(g, &xn[plane_off..], u.cin_g, &mut col);
                    // dW_g += dY_g [cout_g, P] * col^T [P, K]
                    sgemm(
                        u.cout_g,
                        u.k_rows,
                        u.pixels,
                        MatRef::rows(dyg, u.pixels),
                        MatRef::transposed(&col, u.pixels),
                        &mut dw_part[gi * u.cout_g * u.k_rows..][..u.cout_g * u.k_rows],
                        u.k_rows,
                        true,
                        Parallelism::None,
                    );
                    if let Some(dxn) = dxn.as_deref_mut() {
                        // dcol [K, P] = W_g^T [K, cout_g] * dY_g [cout_g, P]
                        let wg = &w[gi * u.cout_g * u.k_rows..][..u.cout_g * u.k_rows];
                        sgemm(
                            u.k_rows,
                            u.pixels,
                            u.cout_g,
                            MatRef::transposed(wg, u.k_rows),
                            MatRef::rows(dyg, u.pixels),
                            &mut col,
                            u.pixels,
                            false,
                            Parallelism::None,
                        );
                        col2im(g, &col, u.cin_g, &mut dxn[plane_off..]);
                    }
                }
            }
            (dw_part, db_part)
        })
        .collect();
    dw.fill(0.0);
    db.fill(0.0);
    for (dw_part, db_part) in partials {
        dw.par_iter_mut().zip(dw_part.par_iter()).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&db_part).for_each(|(a, b)| *a += b);
    }
}
