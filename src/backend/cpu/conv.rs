//! Convolution as im2col + GEMM, one image per task.
//!
//! Parallelising over images (each GEMM single-threaded) keeps both cores busy on every layer:
//! the late layers' GEMMs (13x13 outputs) are too small to split well, and per-image tasks need
//! no synchronisation except the final sum of the weight gradients.
//!
//! The unfolded input is made in blocks of rows small enough to stay in the L2 cache: each
//! block is written, multiplied and (backward) folded back before the next, instead of a whole
//! image's unfolding (several MB) making a round trip through memory.

use super::gemm::{sgemm, MatRef, Parallelism};
use super::{give_scratch, split_even, take_scratch};
use crate::backend::{ConvGeom, InputPart};
use multiversion::multiversion;
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
    let lo = if pad > kx {
        (pad - kx).div_ceil(stride)
    } else {
        0
    };
    // o * s + kx - pad <= w - 1  <=>  o <= (w - 1 + pad - kx) / s
    let hi = if w + pad > kx {
        ((w - 1 + pad - kx) / stride + 1).min(out)
    } else {
        0
    };
    (lo.min(hi), hi)
}

/// Rows `k` of one group's unfolded input gradient, `dcol[k, P] = W_g[:, k]^T dY_g` (`wg`:
/// `[m, k_rows]`, `dyg`: `[m, P]`, `m` the stacked sets' kernels), folded into the group's
/// input planes `dxg` (added). Shared by the fused and the input-only backward passes, so that
/// both round alike.
fn fold_input_gradient(
    g: &ConvGeom,
    u: &Unfold,
    wg: &[f32],
    dyg: &[f32],
    k: std::ops::Range<usize>,
    colb: &mut [f32],
    dxg: &mut [f32],
) {
    let m = dyg.len() / u.pixels;
    let wt = MatRef {
        data: &wg[k.start..],
        rs: 1,
        cs: u.k_rows,
    };
    sgemm(
        k.len(),
        u.pixels,
        m,
        wt,
        MatRef::rows(dyg, u.pixels),
        colb,
        u.pixels,
        false,
        Parallelism::None,
    );
    col2im(g, colb, k, dxg);
}

/// The input gradient alone (`dx`, overwritten): the part of the backward pass that the column
/// exchange waits for, so that the weight gradients ([`backward`] without `dx`) can be computed
/// while it travels. The same products and folding, block by block, as [`backward_sets`]
/// makes for one weight set, so the bits are the same; images run in parallel, each on its own.
pub fn backward_data(g: &ConvGeom, w: &[f32], dy: &[f32], dx: &mut [f32]) {
    let u = unfold_sizes(g);
    assert_eq!(w.len(), g.weight_len(), "conv weight length");
    assert_eq!(dy.len(), g.out_len(), "conv output gradient length");
    assert_eq!(dx.len(), g.in_len(), "conv input gradient length");
    let kb = block_rows(&u);
    let per = BACKWARD_LEAF_IMAGES;
    dx.par_chunks_mut(per * u.in_img)
        .enumerate()
        .for_each(|(chunk, dxs)| {
            let mut col = take_scratch(kb * u.pixels);
            let mut dyg = take_scratch(u.cout_g * u.pixels);
            for (i, dxn) in dxs.chunks_mut(u.in_img).enumerate() {
                let n = chunk * per + i;
                dxn.fill(0.0);
                for gi in 0..g.groups {
                    let start = n * u.out_img + gi * u.cout_g * u.pixels;
                    dyg.copy_from_slice(&dy[start..start + u.cout_g * u.pixels]);
                    let plane_off = gi * u.cin_g * g.in_h * g.in_w;
                    let wg = &w[gi * u.cout_g * u.k_rows..][..u.cout_g * u.k_rows];
                    for k0 in (0..u.k_rows).step_by(kb) {
                        let k1 = (k0 + kb).min(u.k_rows);
                        let colb = &mut col[..(k1 - k0) * u.pixels];
                        let dxg = &mut dxn[plane_off..];
                        fold_input_gradient(g, &u, wg, &dyg, k0..k1, colb, dxg);
                    }
                }
            }
            give_scratch(col);
            give_scratch(dyg);
        });
}

/// Images per leaf of the backward pass's summation tree (see [`backward_sets`]).
const BACKWARD_LEAF_IMAGES: usize = 4;

type Leaf<'a> = (usize, Option<&'a mut [f32]>);

/// Runs `leaf` on every item and adds the results in a fixed binary tree (the left subtree
/// always a power of two), in parallel where the tree branches.
fn tree_sum<'a, F>(leaf: &F, mut items: Vec<Leaf<'a>>) -> (Vec<f32>, Vec<f32>)
where
    F: Fn(usize, Option<&'a mut [f32]>) -> (Vec<f32>, Vec<f32>) + Sync,
{
    if items.len() == 1 {
        let (chunk, dx) = items.pop().expect("one item");
        return leaf(chunk, dx);
    }
    let right = items.split_off(items.len().next_power_of_two() / 2);
    let ((mut dw, mut db), (dw_r, db_r)) =
        rayon::join(|| tree_sum(leaf, items), || tree_sum(leaf, right));
    dw.iter_mut().zip(&dw_r).for_each(|(a, b)| *a += b);
    db.iter_mut().zip(&db_r).for_each(|(a, b)| *a += b);
    give_scratch(dw_r);
    (dw, db)
}

/// Tasks per call: a few per thread, so that a thread slowed by the rest of the machine does not
/// hold the others up at the end of every layer.
fn tasks(threads: usize) -> usize {
    2 * threads
}

/// Rows of the unfolded input per block: about 1 MiB, which keeps each block in the L2 cache
/// from its unfolding to its GEMM (and back through col2im), while leaving the GEMM a depth it
/// runs well at (conv1 at 64 KiB blocks, 21 rows deep, ran 25% slower).
fn block_rows(u: &Unfold) -> usize {
    (262_144 / u.pixels).max(16).min(u.k_rows)
}

/// Unfolds rows `rows` of `col[(c, ky, kx), (oy, ox)]` from the planes of `x` (`h x w`) into
/// `col`, which holds just those rows.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw+avx2+fma",
    "x86_64+avx2+fma"
))]
fn im2col(g: &ConvGeom, x: &[f32], rows: std::ops::Range<usize>, col: &mut [f32]) {
    let (h, w, k, s, p) = (g.in_h, g.in_w, g.kernel, g.stride, g.pad);
    let (oh, ow) = (g.out_h(), g.out_w());
    for (r, row) in rows.zip(col.chunks_mut(oh * ow)) {
        let (c, ky, kx) = (r / (k * k), (r / k) % k, r % k);
        let plane = &x[c * h * w..(c + 1) * h * w];
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

/// Folds rows `rows` of `col` back onto the planes of `dx`, adding overlapping contributions.
#[multiversion(targets(
    "x86_64+avx512f+avx512vl+avx512dq+avx512bw+avx2+fma",
    "x86_64+avx2+fma"
))]
fn col2im(g: &ConvGeom, col: &[f32], rows: std::ops::Range<usize>, dx: &mut [f32]) {
    let (h, w, k, s, p) = (g.in_h, g.in_w, g.kernel, g.stride, g.pad);
    let (oh, ow) = (g.out_h(), g.out_w());
    for (r, row) in rows.zip(col.chunks(oh * ow)) {
        let (c, ky, kx) = (r / (k * k), (r / k) % k, r % k);
        let plane = &mut dx[c * h * w..(c + 1) * h * w];
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
            if s == 1 {
                dst[ix0..ix0 + (hi - lo)]
                    .iter_mut()
                    .zip(&src[lo..hi])
                    .for_each(|(d, v)| *d += v);
            } else {
                for (o, ix) in (lo..hi).zip((ix0..).step_by(s)) {
                    dst[ix] += src[o];
                }
            }
        }
    }
}

/// The weight sets stacked per group, `[groups][sets * cout_g, k_rows]`: the rows of one GEMM.
/// One set is already in that layout.
fn stack_sets<'a>(g: &ConvGeom, u: &Unfold, ws: &[&'a [f32]]) -> std::borrow::Cow<'a, [f32]> {
    if ws.len() == 1 {
        return std::borrow::Cow::Borrowed(ws[0]);
    }
    let block = u.cout_g * u.k_rows;
    (0..g.groups)
        .flat_map(|gi| {
            ws.iter()
                .flat_map(move |w| w[gi * block..(gi + 1) * block].iter().copied())
        })
        .collect::<Vec<f32>>()
        .into()
}

pub fn forward(g: &ConvGeom, x: &[f32], w: &[f32], b: &[f32], y: &mut [f32], threads: usize) {
    forward_sets(g, x, &[w], &[b], &mut [y], threads)
}

/// The part of a convolution that input channels `part` contribute (see
/// [`crate::backend::Backend::conv2d_forward_part`]): `g` is the part's geometry, `x` holds its
/// channels, `w` is the whole layer's. The weights' rows are read in place, `part.total * k * k`
/// apart, from column `part.first * k * k`.
#[allow(clippy::too_many_arguments)]
pub fn forward_part(
    g: &ConvGeom,
    part: InputPart,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    y: &mut [f32],
    accumulate: bool,
    threads: usize,
) {
    part.check_conv(g, [x.len(), w.len(), b.len(), y.len()], accumulate);
    let kk = g.kernel * g.kernel;
    let rows = WeightRows {
        data: std::borrow::Cow::Borrowed(&w[part.first * kk..]),
        stride: part.total * kk,
    };
    let bs = [b];
    forward_rows(
        g,
        x,
        rows,
        (!accumulate).then_some(&bs[..]),
        &mut [y],
        threads,
    )
}

/// Several convolutions of the same input (the two columns' conv1): the input is unfolded once
/// and the weight sets are stacked into one GEMM, whose larger M runs the kernel at a better
/// rate (conv1's 48 rows per column are too few for AVX-512 tiles).
pub fn forward_sets(
    g: &ConvGeom,
    x: &[f32],
    ws: &[&[f32]],
    bs: &[&[f32]],
    ys: &mut [&mut [f32]],
    threads: usize,
) {
    let u = unfold_sizes(g);
    let sets = ws.len();
    assert!(
        sets > 0 && bs.len() == sets && ys.len() == sets,
        "conv: one bias and one output per weight set"
    );
    for w in ws {
        assert_eq!(w.len(), g.weight_len(), "conv weight length");
    }
    let rows = WeightRows {
        data: stack_sets(g, &u, ws),
        stride: u.k_rows,
    };
    forward_rows(g, x, rows, Some(bs), ys, threads)
}

/// The weight sets of a forward pass, stacked: per group, `[sets * cout_g]` rows `stride` apart,
/// each holding the `k_rows` weights of one kernel from its start.
struct WeightRows<'a> {
    data: std::borrow::Cow<'a, [f32]>,
    stride: usize,
}

/// The forward pass of [`forward_sets`]: `ys = conv(x, w) + bs`, or `ys += conv(x, w)` without
/// biases.
fn forward_rows(
    g: &ConvGeom,
    x: &[f32],
    w: WeightRows,
    bs: Option<&[&[f32]]>,
    ys: &mut [&mut [f32]],
    threads: usize,
) {
    let u = unfold_sizes(g);
    let sets = ys.len();
    assert_eq!(x.len(), g.in_len(), "conv input length");
    for (set, y) in ys.iter().enumerate() {
        if let Some(bs) = bs {
            assert_eq!(bs[set].len(), g.out_c, "conv bias length");
        }
        assert_eq!(y.len(), g.out_len(), "conv output length");
    }
    let m = sets * u.cout_g;
    let (stacked, w_rs) = (&w.data, w.stride);
    let per = split_even(g.batch, tasks(threads));
    let chunks = g.batch.div_ceil(per);
    // Each task gets its images' output blocks of every set.
    let mut outs: Vec<Vec<&mut [f32]>> = (0..chunks).map(|_| Vec::with_capacity(sets)).collect();
    for y in ys.iter_mut() {
        for (chunk, block) in y.chunks_mut(per * u.out_img).enumerate() {
            outs[chunk].push(block);
        }
    }
    outs.into_par_iter()
        .enumerate()
        .for_each(|(chunk, mut ys)| {
            let kb = block_rows(&u);
            let mut col = take_scratch(kb * u.pixels);
            // The GEMM's output, [m, P]: the sets' rows together, spread to their outputs after.
            let mut acc = take_scratch(m * u.pixels);
            for i in 0..ys[0].len() / u.out_img {
                let xn = &x[(chunk * per + i) * u.in_img..][..u.in_img];
                for gi in 0..g.groups {
                    let xg = &xn[gi * u.cin_g * g.in_h * g.in_w..];
                    let wg = &stacked[gi * m * w_rs..];
                    for k0 in (0..u.k_rows).step_by(kb) {
                        let k1 = (k0 + kb).min(u.k_rows);
                        let colb = &mut col[..(k1 - k0) * u.pixels];
                        im2col(g, xg, k0..k1, colb);
                        let a = MatRef {
                            data: &wg[k0..],
                            rs: w_rs,
                            cs: 1,
                        };
                        sgemm(
                            m,
                            u.pixels,
                            k1 - k0,
                            a,
                            MatRef::rows(colb, u.pixels),
                            &mut acc,
                            u.pixels,
                            k0 > 0,
                            Parallelism::None,
                        );
                    }
                    for (set, y) in ys.iter_mut().enumerate() {
                        let yg = &mut y[i * u.out_img + gi * u.cout_g * u.pixels..]
                            [..u.cout_g * u.pixels];
                        let src = &acc[set * u.cout_g * u.pixels..][..u.cout_g * u.pixels];
                        for (o, (dst, src)) in yg
                            .chunks_mut(u.pixels)
                            .zip(src.chunks(u.pixels))
                            .enumerate()
                        {
                            match bs {
                                Some(bs) => {
                                    let bias = bs[set][gi * u.cout_g + o];
                                    dst.iter_mut().zip(src).for_each(|(d, v)| *d = v + bias);
                                }
                                None => dst.iter_mut().zip(src).for_each(|(d, v)| *d += v),
                            }
                        }
                    }
                }
            }
            give_scratch(col);
            give_scratch(acc);
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
    backward_sets(g, x, &[w], &[dy], dx, &mut [dw], &mut [db], threads)
}

/// Backward pass of [`forward_sets`]: each set's weight and bias gradients, and (when asked)
/// the input gradient summed over the sets.
#[allow(clippy::too_many_arguments)]
pub fn backward_sets(
    g: &ConvGeom,
    x: &[f32],
    ws: &[&[f32]],
    dys: &[&[f32]],
    dx: Option<&mut [f32]>,
    dws: &mut [&mut [f32]],
    dbs: &mut [&mut [f32]],
    // The split of the backward pass is fixed by the batch, not by the threads (see tree_sum).
    _threads: usize,
) {
    let u = unfold_sizes(g);
    let sets = ws.len();
    assert!(
        sets > 0 && dys.len() == sets && dws.len() == sets && dbs.len() == sets,
        "conv: one of each per weight set"
    );
    assert_eq!(x.len(), g.in_len(), "conv input length");
    for i in 0..sets {
        assert_eq!(ws[i].len(), g.weight_len(), "conv weight length");
        assert_eq!(dys[i].len(), g.out_len(), "conv output gradient length");
        assert_eq!(dws[i].len(), g.weight_len(), "conv weight gradient length");
        assert_eq!(dbs[i].len(), g.out_c, "conv bias gradient length");
    }
    let m = sets * u.cout_g;
    let stacked = stack_sets(g, &u, ws);
    let per = BACKWARD_LEAF_IMAGES;
    let chunks = g.batch.div_ceil(per);
    let dx_chunks: Vec<Option<&mut [f32]>> = match dx {
        Some(d) => {
            assert_eq!(d.len(), g.in_len(), "conv input gradient length");
            d.chunks_mut(per * u.in_img).map(Some).collect()
        }
        None => (0..chunks).map(|_| None).collect(),
    };
    // Stacked like the weights: [groups][m, k_rows].
    let wlen = g.groups * m * u.k_rows;
    // Each leaf sums the weight and bias gradients of its few images; the leaves' sums are
    // added in a fixed binary tree over the batch. The result depends neither on the thread
    // count nor on scheduling, and replicas holding power-of-two parts of the batch hold
    // whole subtrees: the layouts of a job compute the same sums.
    let leaf = |chunk: usize, mut dxs: Option<&mut [f32]>| -> (Vec<f32>, Vec<f32>) {
        let mut dw_part = take_scratch(wlen);
        dw_part.fill(0.0);
        let mut db_part = vec![0.0f32; sets * g.out_c];
        let kb = block_rows(&u);
        let mut col = take_scratch(kb * u.pixels);
        // One group's output gradient of every set, [m, P].
        let mut dyg = take_scratch(m * u.pixels);
        let first = chunk * per;
        for i in 0..per.min(g.batch - first) {
            let n = first + i;
            let xn = &x[n * u.in_img..][..u.in_img];
            for (set, dy) in dys.iter().enumerate() {
                for (o, plane) in dy[n * u.out_img..][..u.out_img]
                    .chunks(u.pixels)
                    .enumerate()
                {
                    db_part[set * g.out_c + o] += plane.iter().sum::<f32>();
                }
            }
            let mut dxn = dxs.as_deref_mut().map(|d| {
                let d = &mut d[i * u.in_img..][..u.in_img];
                d.fill(0.0);
                d
            });
            for gi in 0..g.groups {
                let start = n * u.out_img + gi * u.cout_g * u.pixels;
                for (set, dy) in dys.iter().enumerate() {
                    dyg[set * u.cout_g * u.pixels..][..u.cout_g * u.pixels]
                        .copy_from_slice(&dy[start..start + u.cout_g * u.pixels]);
                }
                let plane_off = gi * u.cin_g * g.in_h * g.in_w;
                let wg = &stacked[gi * m * u.k_rows..][..m * u.k_rows];
                for k0 in (0..u.k_rows).step_by(kb) {
                    let k1 = (k0 + kb).min(u.k_rows);
                    let colb = &mut col[..(k1 - k0) * u.pixels];
                    im2col(g, &xn[plane_off..], k0..k1, colb);
                    // dW_g[:, k0..k1] += dY_g [m, P] * col_block^T [P, kb]
                    sgemm(
                        m,
                        k1 - k0,
                        u.pixels,
                        MatRef::rows(&dyg, u.pixels),
                        MatRef::transposed(colb, u.pixels),
                        &mut dw_part[gi * m * u.k_rows + k0..],
                        u.k_rows,
                        true,
                        Parallelism::None,
                    );
                    if let Some(dxn) = dxn.as_deref_mut() {
                        // The sets' contributions summed, folded back while the block is
                        // still in cache.
                        let dxg = &mut dxn[plane_off..];
                        fold_input_gradient(g, &u, wg, &dyg, k0..k1, colb, dxg);
                    }
                }
            }
        }
        give_scratch(col);
        give_scratch(dyg);
        (dw_part, db_part)
    };
    let items: Vec<(usize, Option<&mut [f32]>)> = dx_chunks.into_iter().enumerate().collect();
    let (dw_sum, db_sum) = tree_sum(&leaf, items);
    // Unstack: set `s`, group `gi` is rows [s * cout_g, (s + 1) * cout_g) of group block `gi`.
    let block = u.cout_g * u.k_rows;
    for (set, (dw, db)) in dws.iter_mut().zip(dbs.iter_mut()).enumerate() {
        for gi in 0..g.groups {
            dw[gi * block..(gi + 1) * block]
                .copy_from_slice(&dw_sum[(gi * m + set * u.cout_g) * u.k_rows..][..block]);
        }
        db.copy_from_slice(&db_sum[set * g.out_c..(set + 1) * g.out_c]);
    }
    give_scratch(dw_sum);
}
