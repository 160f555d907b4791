//! Overlapping max pooling, parallel over (image, channel) planes.

use crate::backend::PoolGeom;
use rayon::prelude::*;

pub fn forward(g: &PoolGeom, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), g.in_len(), "maxpool input length");
    assert_eq!(y.len(), g.out_len(), "maxpool output length");
    let (ih, iw, oh, ow) = (g.in_h, g.in_w, g.out_h(), g.out_w());
    y.par_chunks_mut(oh * ow)
        .enumerate()
        .for_each(|(plane, yp)| {
            let xp = &x[plane * ih * iw..][..ih * iw];
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut m = f32::NEG_INFINITY;
                    for ky in 0..g.size {
                        let row = &xp[(oy * g.stride + ky) * iw + ox * g.stride..][..g.size];
                        for &v in row {
                            m = m.max(v);
                        }
                    }
                    yp[oy * ow + ox] = m;
                }
            }
        });
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
            dxp.fill(0.0);
            let xp = &x[plane * ih * iw..][..ih * iw];
            let yp = &y[plane * oh * ow..][..oh * ow];
            let dyp = &dy[plane * oh * ow..][..oh * ow];
            for oy in 0..oh {
                for ox in 0..ow {
                    let m = yp[oy * ow + ox];
                    'window: for ky in 0..g.size {
                        let base = (oy * g.stride + ky) * iw + ox * g.stride;
                        for kx in 0..g.size {
                            if xp[base + kx] == m {
                                dxp[base + kx] += dyp[oy * ow + ox];
                                break 'window;
                            }
                        }
                    }
                }
            }
        });
}
