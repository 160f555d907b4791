//! Overlapping max pooling, parallel over (image, channel) planes.
//!
//! The forward pass is separable: the maximum over each row's windows first (every input row
//! serves up to two output rows), then over the window's rows, elementwise, which vectorises.
//! The per-plane kernels are compiled for AVX-512 and AVX2 as well as the baseline.

use crate::backend::PoolGeom;
use multiversion::multiversion;
use rayon::prelude::*;

/// One plane; `rows` is scratch of `in_h * out_w` values.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw+avx2+fma",
    "x86_64+avx2+fma"
))]
fn forward_plane(g: &PoolGeom, x: &[f32], y: &mut [f32], rows: &mut [f32]) {
    let (iw, oh, ow) = (g.in_w, g.out_h(), g.out_w());
    let used_rows = (oh - 1) * g.stride + g.size;
    for r in 0..used_rows {
        let src = &x[r * iw..(r + 1) * iw];
        let dst = &mut rows[r * ow..(r + 1) * ow];
        for (ox, d) in dst.iter_mut().enumerate() {
            let win = &src[ox * g.stride..ox * g.stride + g.size];
            *d = win.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        }
    }
    for oy in 0..oh {
        let out = &mut y[oy * ow..(oy + 1) * ow];
        out.copy_from_slice(&rows[oy * g.stride * ow..][..ow]);
        for ky in 1..g.size {
            let r = &rows[(oy * g.stride + ky) * ow..][..ow];
            out.iter_mut().zip(r).for_each(|(o, &v)| *o = o.max(v));
        }
    }
}

pub fn forward(g: &PoolGeom, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), g.in_len(), "maxpool input length");
    assert_eq!(y.len(), g.out_len(), "maxpool output length");
    let (ih, iw, oh, ow) = (g.in_h, g.in_w, g.out_h(), g.out_w());
    y.par_chunks_mut(oh * ow).enumerate().for_each_init(
        || vec![0.0f32; ih * ow],
        |rows, (plane, yp)| forward_plane(g, &x[plane * ih * iw..][..ih * iw], yp, rows),
    );
}

/// One plane of the backward pass.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw+avx2+fma",
    "x86_64+avx2+fma"
))]
fn backward_plane(g: &PoolGeom, x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (iw, oh, ow) = (g.in_w, g.out_h(), g.out_w());
    dx.fill(0.0);
    for oy in 0..oh {
        for ox in 0..ow {
            let m = y[oy * ow + ox];
            'window: for ky in 0..g.size {
                let base = (oy * g.stride + ky) * iw + ox * g.stride;
                for kx in 0..g.size {
                    if x[base + kx] == m {
                        dx[base + kx] += dy[oy * ow + ox];
                        break 'window;
                    }
                }
            }
        }
    }
}

/// Each output's gradient goes to the first input of its window (row-major) equal to the
/// maximum, as in PyTorch and cuDNN.
pub fn backward(g: &PoolGeom, x: &[f32], y: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert_eq!(x.len(), g.in_len(), "maxpool input length");
    assert_eq!(y.len(), g.out_len(), "maxpool output length");
    assert_eq!(dy.len(), g.out_len(), "maxpool output gradient length");
    assert_eq!(dx.len(), g.in_len(), "maxpool input gradient length");
    let (ih, iw, oh, ow) = (g.in_h, g.in_w, g.out_h(), g.out_w());
    dx.par_chunks_mut(ih * iw)
        .enumerate()
        .for_each(|(plane, dxp)| {
            let out = plane * oh * ow..(plane + 1) * oh * ow;
            backward_plane(
                g,
                &x[plane * ih * iw..][..ih * iw],
                &y[out.clone()],
                &dy[out],
                dxp,
            );
        });
}
