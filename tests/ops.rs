//! Every op against PyTorch's golden vectors, and every backward pass against finite
//! differences. The checks are generic over the backend and stamped out once per device.

mod common;

use alexnet::backend::{
    Backend, ConvGeom, DropoutKey, InputPart, LinearGeom, LrnParams, PlaneGeom, PoolGeom,
};
use common::*;

const GOLDEN_TOL: f64 = 1e-4;

/// PyTorch's outputs for the op `file` was computed for, against `b`'s (the checks
/// `alexnet selftest` runs on the compiled-in copies).
fn golden<B: Backend>(b: &B, file: &str) {
    let checks = alexnet::selftest::golden::check(b, &Golden::load(file), GOLDEN_TOL);
    assert!(!checks.is_empty(), "{file}: nothing checked");
    for c in checks {
        assert!(
            c.passed(),
            "{}: relative error {:.3e} exceeds {:.0e}",
            c.what,
            c.error,
            c.tolerance
        );
    }
}

// ---- finite differences on small random shapes ----

const FD_TOL: f64 = 2e-2;

fn conv_finite_diff<B: Backend>(b: &B) {
    for (stride, pad, groups, kernel) in [(1, 1, 1, 3), (2, 1, 2, 3), (3, 2, 1, 5)] {
        let geom = ConvGeom {
            batch: 2,
            in_c: 4,
            in_h: 9,
            in_w: 8,
            out_c: 6,
            kernel,
            stride,
            pad,
            groups,
        };
        let what = format!("conv k{kernel} s{stride} p{pad} g{groups}");
        let (x, w, bias) = (
            random(geom.in_len(), 1),
            random(geom.weight_len(), 2),
            random(geom.out_c, 3),
        );
        let r = random(geom.out_len(), 4);
        let fwd = |x: &[f32], w: &[f32], bias: &[f32]| {
            let mut y = b.zeros(geom.out_len());
            b.conv2d_forward(&geom, &b.upload(x), &b.upload(w), &b.upload(bias), &mut y);
            dot(&b.download(&y), &r)
        };
        let (mut dx, mut dw, mut db) = (
            b.zeros(geom.in_len()),
            b.zeros(geom.weight_len()),
            b.zeros(geom.out_c),
        );
        b.conv2d_backward(
            &geom,
            &b.upload(&x),
            &b.upload(&w),
            &b.upload(&r),
            Some(&mut dx),
            &mut dw,
            &mut db,
        );
        check_finite_diff(
            &format!("{what} dx"),
            &x,
            &b.download(&dx),
            40,
            1e-2,
            FD_TOL,
            |x| fwd(x, &w, &bias),
        );
        check_finite_diff(
            &format!("{what} dw"),
            &w,
            &b.download(&dw),
            40,
            1e-2,
            FD_TOL,
            |w| fwd(&x, w, &bias),
        );
        check_finite_diff(
            &format!("{what} db"),
            &bias,
            &b.download(&db),
            6,
            1e-2,
            FD_TOL,
            |bi| fwd(&x, &w, bi),
        );
    }
}

fn linear_finite_diff<B: Backend>(b: &B) {
    let geom = LinearGeom {
        rows: 3,
        inp: 11,
        out: 5,
    };
    let (x, w, bias, r) = (random(33, 5), random(55, 6), random(5, 7), random(15, 8));
    let fwd = |x: &[f32], w: &[f32], bias: &[f32]| {
        let mut y = b.zeros(15);
        b.linear_forward(&geom, &b.upload(x), &b.upload(w), &b.upload(bias), &mut y);
        dot(&b.download(&y), &r)
    };
    let (mut dx, mut dw, mut db) = (b.zeros(33), b.zeros(55), b.zeros(5));
    b.linear_backward(
        &geom,
        &b.upload(&x),
        &b.upload(&w),
        &b.upload(&r),
        Some(&mut dx),
        &mut dw,
        &mut db,
    );
    check_finite_diff("linear dx", &x, &b.download(&dx), 33, 1e-2, FD_TOL, |x| {
        fwd(x, &w, &bias)
    });
    check_finite_diff("linear dw", &w, &b.download(&dw), 55, 1e-2, FD_TOL, |w| {
        fwd(&x, w, &bias)
    });
    check_finite_diff(
        "linear db",
        &bias,
        &b.download(&db),
        5,
        1e-2,
        FD_TOL,
        |bi| fwd(&x, &w, bi),
    );
}

fn lrn_finite_diff<B: Backend>(b: &B) {
    // A strong alpha and large inputs so that the normalisation term matters in the gradient.
    for p in [
        LrnParams {
            size: 5,
            alpha: 0.05,
            beta: 0.75,
            k: 2.0,
        },
        LrnParams {
            size: 3,
            alpha: 0.1,
            beta: 0.6,
            k: 1.0,
        },
    ] {
        let geom = PlaneGeom {
            batch: 2,
            channels: 7,
            plane: 6,
        };
        let x: Vec<f32> = random(geom.len(), 9).iter().map(|v| 3.0 * v).collect();
        let r = random(geom.len(), 10);
        let fwd = |x: &[f32]| {
            let (mut y, mut s) = (b.zeros(geom.len()), b.zeros(geom.len()));
            b.lrn_forward(&geom, &p, &b.upload(x), &mut y, &mut s);
            dot(&b.download(&y), &r)
        };
        let (mut y, mut s, mut dx) = (
            b.zeros(geom.len()),
            b.zeros(geom.len()),
            b.zeros(geom.len()),
        );
        let xb = b.upload(&x);
        b.lrn_forward(&geom, &p, &xb, &mut y, &mut s);
        b.lrn_backward(&geom, &p, &xb, &y, &s, &b.upload(&r), &mut dx);
        check_finite_diff(
            &format!("lrn {p:?} dx"),
            &x,
            &b.download(&dx),
            84,
            1e-3,
            FD_TOL,
            fwd,
        );
    }
}

fn maxpool_finite_diff<B: Backend>(b: &B) {
    let geom = PoolGeom {
        batch: 2,
        channels: 3,
        in_h: 9,
        in_w: 7,
        size: 3,
        stride: 2,
    };
    let x = random(geom.in_len(), 11);
    let r = random(geom.out_len(), 12);
    let fwd = |x: &[f32]| {
        let mut y = b.zeros(geom.out_len());
        b.maxpool_forward(&geom, &b.upload(x), &mut y);
        dot(&b.download(&y), &r)
    };
    let (mut y, mut dx) = (b.zeros(geom.out_len()), b.zeros(geom.in_len()));
    let xb = b.upload(&x);
    b.maxpool_forward(&geom, &xb, &mut y);
    b.maxpool_backward(&geom, &xb, &y, &b.upload(&r), &mut dx);
    check_finite_diff(
        "maxpool dx",
        &x,
        &b.download(&dx),
        geom.in_len(),
        1e-4,
        FD_TOL,
        fwd,
    );
}

fn relu_finite_diff<B: Backend>(b: &B) {
    // Keep inputs away from the kink so that the difference quotient is defined.
    let x: Vec<f32> = random(50, 13)
        .iter()
        .map(|v| if v.abs() < 0.05 { 0.5 } else { *v })
        .collect();
    let r = random(50, 14);
    let fwd = |x: &[f32]| {
        let mut y = b.upload(x);
        b.relu_forward(&mut y);
        dot(&b.download(&y), &r)
    };
    let mut y = b.upload(&x);
    b.relu_forward(&mut y);
    let mut d = b.upload(&r);
    b.relu_backward(&y, &mut d);
    check_finite_diff("relu dx", &x, &b.download(&d), 50, 1e-2, FD_TOL, fwd);
}

fn dropout_finite_diff<B: Backend>(b: &B) {
    let key = DropoutKey {
        seed: 77,
        row_offset: 3,
        col_offset: 4,
        total_cols: 20,
    };
    let (rows, cols, p) = (4, 10, 0.5);
    let x = random(rows * cols, 15);
    let r = random(rows * cols, 16);
    let fwd = |x: &[f32]| {
        let mut y = b.upload(x);
        b.dropout_forward(rows, cols, p, &key, &mut y);
        dot(&b.download(&y), &r)
    };
    let mut d = b.upload(&r);
    b.dropout_backward(rows, cols, p, &key, &mut d);
    let d = b.download(&d);
    check_finite_diff("dropout dx", &x, &d, 40, 1e-2, FD_TOL, fwd);
    let kept = d.iter().filter(|v| **v != 0.0).count();
    assert!((10..=30).contains(&kept), "dropout 0.5 kept {kept} of 40");
}

/// A block keyed by its offsets draws exactly its part of the whole layer's mask: what lets two
/// processes (columns, replicas) drop what one process would.
fn dropout_blocks_match_the_whole<B: Backend>(b: &B) {
    let (rows, cols, p, seed) = (6, 10, 0.5, 91);
    let whole_key = DropoutKey {
        seed,
        row_offset: 0,
        col_offset: 0,
        total_cols: cols as u64,
    };
    let x = random(rows * cols, 19);
    let mut whole = b.upload(&x);
    b.dropout_forward(rows, cols, p, &whole_key, &mut whole);
    let whole = b.download(&whole);
    // Two column halves of the lower three rows.
    for (c0, width) in [(0usize, 4usize), (4, 6)] {
        let block: Vec<f32> = (3..6)
            .flat_map(|r| x[r * cols + c0..r * cols + c0 + width].to_vec())
            .collect();
        let key = DropoutKey {
            seed,
            row_offset: 3,
            col_offset: c0 as u64,
            total_cols: cols as u64,
        };
        let mut got = b.upload(&block);
        b.dropout_forward(3, width, p, &key, &mut got);
        let want: Vec<f32> = (3..6)
            .flat_map(|r| whole[r * cols + c0..r * cols + c0 + width].to_vec())
            .collect();
        assert_eq!(b.download(&got), want, "block at column {c0}");
    }
}

fn softmax_finite_diff<B: Backend>(b: &B) {
    let (rows, classes) = (3, 7);
    let z: Vec<f32> = random(rows * classes, 17).iter().map(|v| 4.0 * v).collect();
    let labels = [0u32, 6, 3];
    let f = |z: &[f32]| {
        let mut d = b.zeros(rows * classes);
        b.softmax_xent(rows, classes, &b.upload(z), &labels, &mut d) as f64
    };
    let mut d = b.zeros(rows * classes);
    b.softmax_xent(rows, classes, &b.upload(&z), &labels, &mut d);
    check_finite_diff("softmax dlogits", &z, &b.download(&d), 21, 1e-2, FD_TOL, f);
}

/// Direct convolution in f64: y, and for an output gradient dy: dx, dw, db.
fn naive_conv(g: &ConvGeom, x: &[f32], w: &[f32], bias: &[f32], dy: &[f32]) -> [Vec<f32>; 4] {
    let (oh, ow, k) = (g.out_h(), g.out_w(), g.kernel);
    let (cin_g, cout_g) = (g.in_c / g.groups, g.out_c / g.groups);
    let mut y = vec![0.0f64; g.out_len()];
    let (mut dx, mut dw, mut db) = (
        vec![0.0f64; g.in_len()],
        vec![0.0f64; g.weight_len()],
        vec![0.0f64; g.out_c],
    );
    for n in 0..g.batch {
        for o in 0..g.out_c {
            let gi = o / cout_g;
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((n * g.out_c + o) * oh + oy) * ow + ox;
                    let mut acc = bias[o] as f64;
                    db[o] += dy[yi] as f64;
                    for c in 0..cin_g {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                                let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                                if iy < 0
                                    || ix < 0
                                    || iy >= g.in_h as isize
                                    || ix >= g.in_w as isize
                                {
                                    continue;
                                }
                                let xi = ((n * g.in_c + gi * cin_g + c) * g.in_h + iy as usize)
                                    * g.in_w
                                    + ix as usize;
                                let wi = ((o * cin_g + c) * k + ky) * k + kx;
                                acc += x[xi] as f64 * w[wi] as f64;
                                dx[xi] += dy[yi] as f64 * w[wi] as f64;
                                dw[wi] += dy[yi] as f64 * x[xi] as f64;
                            }
                        }
                    }
                    y[yi] = acc;
                }
            }
        }
    }
    let f = |v: Vec<f64>| v.into_iter().map(|a| a as f32).collect();
    [f(y), f(dx), f(dw), f(db)]
}

/// Against direct convolution, on batches that split unevenly over the threads and layers
/// whose unfolding takes several blocks.
fn conv_matches_direct<B: Backend>(b: &B) {
    let cases = [
        ConvGeom {
            batch: 5,
            in_c: 3,
            in_h: 35,
            in_w: 33,
            out_c: 8,
            kernel: 11,
            stride: 4,
            pad: 2,
            groups: 1,
        },
        ConvGeom {
            batch: 3,
            in_c: 32,
            in_h: 13,
            in_w: 13,
            out_c: 12,
            kernel: 5,
            stride: 1,
            pad: 2,
            groups: 2,
        },
        ConvGeom {
            batch: 7,
            in_c: 64,
            in_h: 9,
            in_w: 9,
            out_c: 6,
            kernel: 3,
            stride: 1,
            pad: 1,
            groups: 1,
        },
    ];
    for (i, geom) in cases.into_iter().enumerate() {
        let (x, w, bias, dy) = (
            random(geom.in_len(), 40 + i as u64),
            random(geom.weight_len(), 50),
            random(geom.out_c, 60),
            random(geom.out_len(), 70),
        );
        let [y_ref, dx_ref, dw_ref, db_ref] = naive_conv(&geom, &x, &w, &bias, &dy);
        let (xb, wb) = (b.upload(&x), b.upload(&w));
        let mut y = b.zeros(geom.out_len());
        b.conv2d_forward(&geom, &xb, &wb, &b.upload(&bias), &mut y);
        let (mut dx, mut dw, mut db) = (
            b.zeros(geom.in_len()),
            b.zeros(geom.weight_len()),
            b.zeros(geom.out_c),
        );
        b.conv2d_backward(
            &geom,
            &xb,
            &wb,
            &b.upload(&dy),
            Some(&mut dx),
            &mut dw,
            &mut db,
        );
        assert_close(&format!("case {i} y"), &b.download(&y), &y_ref, 1e-5);
        assert_close(&format!("case {i} dx"), &b.download(&dx), &dx_ref, 1e-5);
        assert_close(&format!("case {i} dw"), &b.download(&dw), &dw_ref, 1e-5);
        assert_close(&format!("case {i} db"), &b.download(&db), &db_ref, 1e-5);
    }
}

/// A layer computed in parts of its input channels or features (as conv3, fc6, fc7 and fc8 are,
/// one part per column) equals the layer computed whole: the first part writes the output and
/// the bias over whatever was there, the others add to it. Uneven parts, and parts in any order.
fn parts_sum_to_the_whole<B: Backend>(b: &B) {
    let whole = ConvGeom {
        batch: 3,
        in_c: 10,
        in_h: 9,
        in_w: 9,
        out_c: 6,
        kernel: 3,
        stride: 1,
        pad: 1,
        groups: 1,
    };
    let strided = ConvGeom {
        in_c: 7,
        in_h: 15,
        in_w: 15,
        kernel: 5,
        stride: 2,
        pad: 2,
        ..whole
    };
    for (geom, splits) in [
        (whole, vec![(0, 4), (4, 10)]),
        (whole, vec![(5, 10), (0, 5)]),
        (strided, vec![(3, 4), (0, 3), (4, 7)]),
    ] {
        let (x, w, bias) = (
            random(geom.in_len(), 81),
            random(geom.weight_len(), 82),
            random(geom.out_c, 83),
        );
        let (wb, bb) = (b.upload(&w), b.upload(&bias));
        let mut want = b.zeros(geom.out_len());
        b.conv2d_forward(&geom, &b.upload(&x), &wb, &bb, &mut want);
        let mut got = b.upload(&random(geom.out_len(), 84));
        let plane = geom.in_h * geom.in_w;
        for (i, &(lo, hi)) in splits.iter().enumerate() {
            let part_geom = ConvGeom {
                in_c: hi - lo,
                ..geom
            };
            let x_part: Vec<f32> = x
                .chunks(geom.in_c * plane)
                .flat_map(|image| image[lo * plane..hi * plane].to_vec())
                .collect();
            let part = InputPart {
                first: lo,
                total: geom.in_c,
            };
            let xb = b.upload(&x_part);
            b.conv2d_forward_part(&part_geom, part, &xb, &wb, &bb, &mut got, i > 0);
        }
        let what = format!("conv {}x{} in parts {splits:?}", geom.kernel, geom.kernel);
        assert_close(&what, &b.download(&got), &b.download(&want), 1e-5);
    }

    let geom = LinearGeom {
        rows: 5,
        inp: 13,
        out: 7,
    };
    let (x, w, bias) = (
        random(geom.rows * geom.inp, 91),
        random(geom.out * geom.inp, 92),
        random(geom.out, 93),
    );
    let (wb, bb) = (b.upload(&w), b.upload(&bias));
    let mut want = b.zeros(geom.rows * geom.out);
    b.linear_forward(&geom, &b.upload(&x), &wb, &bb, &mut want);
    for splits in [vec![(0, 6), (6, 13)], vec![(9, 13), (0, 2), (2, 9)]] {
        let mut got = b.upload(&random(geom.rows * geom.out, 94));
        for (i, &(lo, hi)) in splits.iter().enumerate() {
            let part_geom = LinearGeom {
                inp: hi - lo,
                ..geom
            };
            let x_part: Vec<f32> = x
                .chunks(geom.inp)
                .flat_map(|row| row[lo..hi].to_vec())
                .collect();
            let part = InputPart {
                first: lo,
                total: geom.inp,
            };
            let xb = b.upload(&x_part);
            b.linear_forward_part(&part_geom, part, &xb, &wb, &bb, &mut got, i > 0);
        }
        let what = format!("linear in parts {splits:?}");
        assert_close(&what, &b.download(&got), &b.download(&want), 1e-5);
    }
}

/// The shared-input convolution (both columns' conv1 at once) equals the convolutions run apart.
fn conv_sets_match_single<B: Backend>(b: &B) {
    let geom = ConvGeom {
        batch: 3,
        in_c: 3,
        in_h: 19,
        in_w: 19,
        out_c: 4,
        kernel: 11,
        stride: 4,
        pad: 2,
        groups: 1,
    };
    let x = b.upload(&random(geom.in_len(), 30));
    let ws: Vec<B::Buf> = (0..2)
        .map(|i| b.upload(&random(geom.weight_len(), 31 + i)))
        .collect();
    let bs: Vec<B::Buf> = (0..2)
        .map(|i| b.upload(&random(geom.out_c, 33 + i)))
        .collect();
    let dys: Vec<B::Buf> = (0..2)
        .map(|i| b.upload(&random(geom.out_len(), 35 + i)))
        .collect();
    let (mut y0, mut y1) = (b.zeros(geom.out_len()), b.zeros(geom.out_len()));
    b.conv2d_forward_sets(
        &geom,
        &x,
        &[&ws[0], &ws[1]],
        &[&bs[0], &bs[1]],
        &mut [&mut y0, &mut y1],
    );
    let (mut dw0, mut dw1, mut db0, mut db1) = (
        b.zeros(geom.weight_len()),
        b.zeros(geom.weight_len()),
        b.zeros(4),
        b.zeros(4),
    );
    b.conv2d_backward_sets(
        &geom,
        &x,
        &[&ws[0], &ws[1]],
        &[&dys[0], &dys[1]],
        &mut [&mut dw0, &mut dw1],
        &mut [&mut db0, &mut db1],
    );
    for (i, (y, (dw, db))) in [(&y0, (&dw0, &db0)), (&y1, (&dw1, &db1))]
        .into_iter()
        .enumerate()
    {
        let mut want = b.zeros(geom.out_len());
        b.conv2d_forward(&geom, &x, &ws[i], &bs[i], &mut want);
        assert_close(
            &format!("set {i} y"),
            &b.download(y),
            &b.download(&want),
            1e-6,
        );
        let (mut wdw, mut wdb) = (b.zeros(geom.weight_len()), b.zeros(4));
        b.conv2d_backward(&geom, &x, &ws[i], &dys[i], None, &mut wdw, &mut wdb);
        assert_close(
            &format!("set {i} dw"),
            &b.download(dw),
            &b.download(&wdw),
            1e-6,
        );
        assert_close(
            &format!("set {i} db"),
            &b.download(db),
            &b.download(&wdb),
            1e-6,
        );
    }
}

/// The input gradient alone (`*_backward_data`, which the network sends to the other column
/// before it computes the weight gradients) and the weight gradients alone (`dx = None`) are
/// bit for bit the fused backward pass's, on batches that span several of the CPU's summation
/// leaves, grouped or not, and against PyTorch's golden input gradient.
fn backward_split_equals_fused<B: Backend>(b: &B) {
    let same = |what: &str, got: &B::Buf, want: &B::Buf| {
        let (got, want) = (b.download(got), b.download(want));
        assert_eq!(got.len(), want.len(), "{what}: length");
        let differ = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits());
        assert_eq!(
            differ.count(),
            0,
            "{what}: the split pass differs from the fused one"
        );
    };
    // The last: 1,600 unfolded rows of 169 pixels, more than the CPU folds in one block.
    for (batch, in_c, in_h, in_w, groups, kernel, stride, pad) in [
        (9, 4, 11, 10, 2, 3, 1, 1),
        (5, 4, 11, 10, 1, 5, 2, 2),
        (1, 4, 11, 10, 1, 3, 1, 0),
        (2, 64, 13, 13, 1, 5, 1, 2),
    ] {
        let geom = ConvGeom {
            batch,
            in_c,
            in_h,
            in_w,
            out_c: 6,
            kernel,
            stride,
            pad,
            groups,
        };
        let what = format!("conv batch {batch} in {in_c} k{kernel} s{stride} p{pad} g{groups}");
        let (x, w, dy) = (
            b.upload(&random(geom.in_len(), 61)),
            b.upload(&random(geom.weight_len(), 62)),
            b.upload(&random(geom.out_len(), 63)),
        );
        let (mut dx, mut dw, mut db) = (
            b.zeros(geom.in_len()),
            b.zeros(geom.weight_len()),
            b.zeros(geom.out_c),
        );
        b.conv2d_backward(&geom, &x, &w, &dy, Some(&mut dx), &mut dw, &mut db);
        // Stale values in the outputs must be overwritten, not added to.
        let mut dx_alone = b.upload(&random(geom.in_len(), 64));
        b.conv2d_backward_data(&geom, &w, &dy, &mut dx_alone);
        let (mut dw_alone, mut db_alone) = (
            b.upload(&random(geom.weight_len(), 65)),
            b.upload(&random(geom.out_c, 66)),
        );
        b.conv2d_backward(&geom, &x, &w, &dy, None, &mut dw_alone, &mut db_alone);
        same(&format!("{what} dx"), &dx_alone, &dx);
        same(&format!("{what} dw"), &dw_alone, &dw);
        same(&format!("{what} db"), &db_alone, &db);
    }
    let geom = LinearGeom {
        rows: 7,
        inp: 13,
        out: 9,
    };
    let (x, w, dy) = (
        b.upload(&random(7 * 13, 67)),
        b.upload(&random(9 * 13, 68)),
        b.upload(&random(7 * 9, 69)),
    );
    let (mut dx, mut dw, mut db) = (b.zeros(7 * 13), b.zeros(9 * 13), b.zeros(9));
    b.linear_backward(&geom, &x, &w, &dy, Some(&mut dx), &mut dw, &mut db);
    let mut dx_alone = b.upload(&random(7 * 13, 70));
    b.linear_backward_data(&geom, &w, &dy, &mut dx_alone);
    let (mut dw_alone, mut db_alone) = (b.zeros(9 * 13), b.zeros(9));
    b.linear_backward(&geom, &x, &w, &dy, None, &mut dw_alone, &mut db_alone);
    same("linear dx", &dx_alone, &dx);
    same("linear dw", &dw_alone, &dw);
    same("linear db", &db_alone, &db);

    for file in [
        "conv_5x5_p2_groups2.safetensors",
        "conv_11x11_s4_p2.safetensors",
    ] {
        let g = Golden::load(file);
        let geom = g.conv_geom();
        let mut dx = b.zeros(geom.in_len());
        b.conv2d_backward_data(
            &geom,
            &b.upload(g.get("w")),
            &b.upload(g.get("dy")),
            &mut dx,
        );
        assert_close(
            &format!("{file} dx alone"),
            &b.download(&dx),
            g.get("dx"),
            GOLDEN_TOL,
        );
    }
    let g = Golden::load("linear.safetensors");
    let geom = g.linear_geom();
    let mut dx = b.zeros(geom.rows * geom.inp);
    b.linear_backward_data(
        &geom,
        &b.upload(g.get("w")),
        &b.upload(g.get("dy")),
        &mut dx,
    );
    assert_close("linear dx alone", &b.download(&dx), g.get("dx"), GOLDEN_TOL);
}

fn concat_and_slice<B: Backend>(b: &B) {
    let (a, c) = (
        b.upload(&[1.0, 2.0, 3.0, 4.0]),
        b.upload(&[5.0, 6.0, 7.0, 8.0, 9.0, 10.0]),
    );
    let mut out = b.zeros(10);
    b.concat_rows(2, &[&a, &c], &[2, 3], &mut out);
    assert_eq!(
        b.download(&out),
        vec![1.0, 2.0, 5.0, 6.0, 7.0, 3.0, 4.0, 8.0, 9.0, 10.0]
    );
    let mut back = b.zeros(6);
    b.slice_rows(2, 5, 2, 3, &out, &mut back, false);
    assert_eq!(b.download(&back), vec![5.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
    b.slice_rows(2, 5, 2, 3, &out, &mut back, true);
    assert_eq!(b.download(&back), vec![10.0, 12.0, 14.0, 16.0, 18.0, 20.0]);
}

/// Views finished from bytes equal the loader's float views bit for bit, and views whose
/// parts disagree are refused before anything reaches the device.
fn finish_views_exactly<B: Backend>(b: &B) {
    for seed in [3, 4] {
        let check = alexnet::selftest::finish_views(b, seed).unwrap();
        assert!(check.passed(), "{}: error {:e}", check.what, check.error);
    }
    let (mut views, _) = alexnet::selftest::random_byte_views(5, 3);
    let mean = b.upload(&views.mean);
    views.crops[1].x0 = views.side;
    let e = b
        .finish_views(&views, &mean)
        .err()
        .expect("a crop outside its image");
    assert!(
        format!("{e:#}").contains("leaves the 40-pixel image"),
        "{e:#}"
    );
}

macro_rules! backend_tests {
    ($device:ident, $make:expr) => {
        mod $device {
            use super::*;
            #[test]
            fn golden_conv_11x11_s4_p2() {
                let Some(b) = $make else { return };
                golden(&b, "conv_11x11_s4_p2.safetensors")
            }
            #[test]
            fn golden_conv_3x3_p1() {
                let Some(b) = $make else { return };
                golden(&b, "conv_3x3_p1.safetensors")
            }
            #[test]
            fn golden_conv_5x5_p2_groups2() {
                let Some(b) = $make else { return };
                golden(&b, "conv_5x5_p2_groups2.safetensors")
            }
            #[test]
            fn golden_linear() {
                let Some(b) = $make else { return };
                golden(&b, "linear.safetensors")
            }
            #[test]
            fn golden_lrn_paper() {
                let Some(b) = $make else { return };
                golden(&b, "lrn_paper.safetensors")
            }
            #[test]
            fn golden_lrn_strong() {
                let Some(b) = $make else { return };
                golden(&b, "lrn_strong.safetensors")
            }
            #[test]
            fn golden_maxpool() {
                let Some(b) = $make else { return };
                golden(&b, "maxpool_3_s2.safetensors")
            }
            #[test]
            fn golden_softmax_xent() {
                let Some(b) = $make else { return };
                golden(&b, "softmax_xent.safetensors")
            }
            #[test]
            fn golden_sgd() {
                let Some(b) = $make else { return };
                golden(&b, "sgd_paper.safetensors")
            }
            #[test]
            fn finite_diff_conv() {
                let Some(b) = $make else { return };
                conv_finite_diff(&b)
            }
            #[test]
            fn finite_diff_linear() {
                let Some(b) = $make else { return };
                linear_finite_diff(&b)
            }
            #[test]
            fn finite_diff_lrn() {
                let Some(b) = $make else { return };
                lrn_finite_diff(&b)
            }
            #[test]
            fn finite_diff_maxpool() {
                let Some(b) = $make else { return };
                maxpool_finite_diff(&b)
            }
            #[test]
            fn finite_diff_relu() {
                let Some(b) = $make else { return };
                relu_finite_diff(&b)
            }
            #[test]
            fn finite_diff_dropout() {
                let Some(b) = $make else { return };
                dropout_finite_diff(&b)
            }
            #[test]
            fn dropout_blocks_equal_their_part_of_the_layer() {
                let Some(b) = $make else { return };
                dropout_blocks_match_the_whole(&b)
            }
            #[test]
            fn finite_diff_softmax_xent() {
                let Some(b) = $make else { return };
                softmax_finite_diff(&b)
            }
            #[test]
            fn conv_matches_direct_convolution() {
                let Some(b) = $make else { return };
                conv_matches_direct(&b)
            }
            #[test]
            fn conv_sets_equal_separate_convs() {
                let Some(b) = $make else { return };
                conv_sets_match_single(&b)
            }
            #[test]
            fn backward_split_in_data_and_weights_equals_fused() {
                let Some(b) = $make else { return };
                backward_split_equals_fused(&b)
            }
            #[test]
            fn layers_in_parts_of_their_input_equal_the_whole() {
                let Some(b) = $make else { return };
                parts_sum_to_the_whole(&b)
            }
            #[test]
            fn concat_and_slice_rows() {
                let Some(b) = $make else { return };
                concat_and_slice(&b)
            }
            #[test]
            fn views_finished_from_bytes_exactly() {
                let Some(b) = $make else { return };
                finish_views_exactly(&b)
            }
        }
    };
}

backend_tests!(cpu, Some(alexnet::backend::Cpu::new()));
// The same ops with the work split three ways: uneven splits of every batch above.
backend_tests!(cpu_split3, Some(alexnet::backend::Cpu::with_threads(3)));
// On a GPU (the prepared GPU check runs these; without a GPU they pass without checking
// unless ALEXNET_REQUIRE_GPU=1).
#[cfg(feature = "cuda")]
backend_tests!(cuda, gpu());
// The same with the convolutions on cuDNN, whose timed algorithms (FFT, Winograd, ...) round
// differently from a direct sum: the golden vectors and finite differences judge them too.
#[cfg(feature = "cuda")]
backend_tests!(cuda_cudnn, gpu_cudnn());

/// The convolutions on a GPU with the unfolding limited, so that a batch runs in several
/// passes and the weight gradient adds up across them, as the paper's layers do at large
/// batches. The direct convolution's cases at 50,000 floats a pass: passes of 2, 2 and 1 images
/// (groups 1), and of one image (groups 2; groups 1); at 140,000: one pass, passes of 2 and 1
/// (groups 2), and of 3, 3 and 1 (groups 1). The other checks run at the lower limit.
#[cfg(feature = "cuda")]
#[test]
fn cuda_convolutions_in_several_unfolding_passes() {
    for limit in [50_000, 140_000] {
        let Some(b) = gpu().map(|b| b.with_unfolding_limit(limit)) else {
            return;
        };
        conv_matches_direct(&b);
    }
    let Some(b) = gpu().map(|b| b.with_unfolding_limit(50_000)) else {
        return;
    };
    for file in [
        "conv_11x11_s4_p2.safetensors",
        "conv_3x3_p1.safetensors",
        "conv_5x5_p2_groups2.safetensors",
    ] {
        golden(&b, file);
    }
    conv_finite_diff(&b);
    conv_sets_match_single(&b);
    backward_split_equals_fused(&b);
    // Parts of one or two images a pass (under 5,000 floats), against the whole in several.
    if let Some(b) = gpu().map(|b| b.with_unfolding_limit(5_000)) {
        parts_sum_to_the_whole(&b);
    }
}
