//! The comparisons of a backend against the CPU reference: every op at the network's shapes,
//! one whole training step, views finished from bytes, and uploads.

use super::{scaled_error, Check};
use crate::backend::{
    rng, Backend, ConvGeom, DropoutKey, InputPart, LinearGeom, LrnParams, PlaneGeom, PoolGeom,
    SgdParams,
};
use crate::data::augment::{self, cut, ByteViews, Crop};

/// Random normal values of scale `std`, stream `label`.
fn randn(seed: u64, label: &str, len: usize, std: f32) -> Vec<f32> {
    let key = rng::key(seed, label);
    (0..len as u64).map(|i| std * rng::normal(key, i)).collect()
}

struct Pair<'a, R: Backend, T: Backend> {
    r: &'a R,
    t: &'a T,
    tol: f64,
    checks: Vec<Check>,
}

impl<R: Backend, T: Backend> Pair<'_, R, T> {
    fn up(&self, v: &[f32]) -> (R::Buf, T::Buf) {
        (self.r.upload(v), self.t.upload(v))
    }
    fn zeros(&self, n: usize) -> (R::Buf, T::Buf) {
        (self.r.zeros(n), self.t.zeros(n))
    }
    fn compare(&mut self, what: &str, bufs: &(R::Buf, T::Buf)) {
        let reference = self.r.download(&bufs.0);
        let tested = self.t.download(&bufs.1);
        self.checks.push(Check {
            what: what.to_string(),
            error: scaled_error(&tested, &reference),
            tolerance: self.tol,
        });
    }
}

/// The convolutions of the paper's columns, at a small batch and input.
fn conv_shapes() -> Vec<(&'static str, ConvGeom)> {
    let g = |batch, in_c, side, out_c, kernel, stride, pad, groups| ConvGeom {
        batch,
        in_c,
        in_h: side,
        in_w: side,
        out_c,
        kernel,
        stride,
        pad,
        groups,
    };
    vec![
        (
            "conv 11x11 stride 4 pad 2 (conv1)",
            g(4, 3, 67, 48, 11, 4, 2, 1),
        ),
        ("conv 5x5 pad 2 (conv2)", g(4, 48, 13, 64, 5, 1, 2, 1)),
        ("conv 3x3 pad 1 (conv3..5)", g(4, 96, 7, 96, 3, 1, 1, 1)),
        ("conv 3x3 pad 1, 2 groups", g(3, 32, 9, 48, 3, 1, 1, 2)),
    ]
}

/// Every op of `tested` against `reference` on fresh random inputs drawn from `seed`.
pub fn ops<R: Backend, T: Backend>(reference: &R, tested: &T, seed: u64, tol: f64) -> Vec<Check> {
    let mut p = Pair {
        r: reference,
        t: tested,
        tol,
        checks: Vec::new(),
    };
    for (name, g) in conv_shapes() {
        let x = p.up(&randn(seed, "x", g.in_len(), 1.0));
        let w = p.up(&randn(seed, "w", g.weight_len(), 0.1));
        let b = p.up(&randn(seed, "b", g.out_c, 0.1));
        let dy = p.up(&randn(seed, "dy", g.out_len(), 1.0));
        let mut y = p.zeros(g.out_len());
        p.r.conv2d_forward(&g, &x.0, &w.0, &b.0, &mut y.0);
        p.t.conv2d_forward(&g, &x.1, &w.1, &b.1, &mut y.1);
        p.compare(&format!("{name}: forward"), &y);
        let (mut dx, mut dw, mut db) = (
            p.zeros(g.in_len()),
            p.zeros(g.weight_len()),
            p.zeros(g.out_c),
        );
        p.r.conv2d_backward(&g, &x.0, &w.0, &dy.0, Some(&mut dx.0), &mut dw.0, &mut db.0);
        p.t.conv2d_backward(&g, &x.1, &w.1, &dy.1, Some(&mut dx.1), &mut dw.1, &mut db.1);
        p.compare(&format!("{name}: input gradient"), &dx);
        p.compare(&format!("{name}: weight gradient"), &dw);
        p.compare(&format!("{name}: bias gradient"), &db);
        // The input gradient alone, as the network computes it before a column exchange.
        let mut dx = p.zeros(g.in_len());
        p.r.conv2d_backward_data(&g, &w.0, &dy.0, &mut dx.0);
        p.t.conv2d_backward_data(&g, &w.1, &dy.1, &mut dx.1);
        p.compare(&format!("{name}: input gradient alone"), &dx);
        // The forward pass in two parts of the input channels, as conv3 runs (one group).
        if g.groups == 1 && g.in_c % 2 == 0 {
            let half = ConvGeom {
                in_c: g.in_c / 2,
                ..g
            };
            let mut y = p.up(&randn(seed, "stale y", g.out_len(), 1.0));
            for i in 0..2 {
                let xi = p.up(&randn(seed, &format!("x part {i}"), half.in_len(), 1.0));
                let part = InputPart {
                    first: i * half.in_c,
                    total: g.in_c,
                };
                p.r.conv2d_forward_part(&half, part, &xi.0, &w.0, &b.0, &mut y.0, i > 0);
                p.t.conv2d_forward_part(&half, part, &xi.1, &w.1, &b.1, &mut y.1, i > 0);
            }
            p.compare(&format!("{name}: forward in two parts of its input"), &y);
        }
    }
    {
        let g = PlaneGeom {
            batch: 4,
            channels: 48,
            plane: 15 * 15,
        };
        let lrn = LrnParams::default();
        // Post-ReLU activations of the paper's scale, where the normaliser matters.
        let xs: Vec<f32> = randn(seed, "lrn.x", g.len(), 30.0)
            .into_iter()
            .map(|v| v.max(0.0))
            .collect();
        let x = p.up(&xs);
        let dy = p.up(&randn(seed, "lrn.dy", g.len(), 1.0));
        let (mut y, mut s) = (p.zeros(g.len()), p.zeros(g.len()));
        p.r.lrn_forward(&g, &lrn, &x.0, &mut y.0, &mut s.0);
        p.t.lrn_forward(&g, &lrn, &x.1, &mut y.1, &mut s.1);
        p.compare("lrn (paper's): forward", &y);
        let mut dx = p.zeros(g.len());
        p.r.lrn_backward(&g, &lrn, &x.0, &y.0, &s.0, &dy.0, &mut dx.0);
        p.t.lrn_backward(&g, &lrn, &x.1, &y.1, &s.1, &dy.1, &mut dx.1);
        p.compare("lrn (paper's): input gradient", &dx);
    }
    {
        let g = PoolGeom {
            batch: 4,
            channels: 24,
            in_h: 27,
            in_w: 27,
            size: 3,
            stride: 2,
        };
        let xs = randn(seed, "pool.x", g.in_len(), 1.0);
        let x = p.up(&xs);
        let dy = p.up(&randn(seed, "pool.dy", g.out_len(), 1.0));
        let mut y = p.zeros(g.out_len());
        p.r.maxpool_forward(&g, &x.0, &mut y.0);
        p.t.maxpool_forward(&g, &x.1, &mut y.1);
        p.compare("max pool 3/2: forward", &y);
        let mut dx = p.zeros(g.in_len());
        p.r.maxpool_backward(&g, &x.0, &y.0, &dy.0, &mut dx.0);
        p.t.maxpool_backward(&g, &x.1, &y.1, &dy.1, &mut dx.1);
        p.compare("max pool 3/2: input gradient", &dx);
        // Ties (ReLU zeros): the first maximum of each window takes the gradient on both.
        let ties: Vec<f32> = xs.iter().map(|v| v.max(0.0).round()).collect();
        let x = p.up(&ties);
        p.r.maxpool_forward(&g, &x.0, &mut y.0);
        p.t.maxpool_forward(&g, &x.1, &mut y.1);
        p.r.maxpool_backward(&g, &x.0, &y.0, &dy.0, &mut dx.0);
        p.t.maxpool_backward(&g, &x.1, &y.1, &dy.1, &mut dx.1);
        p.compare("max pool 3/2 with ties: input gradient", &dx);
    }
    {
        let n = 10_007;
        let xs = randn(seed, "relu.x", n, 1.0);
        let mut x = p.up(&xs);
        p.r.relu_forward(&mut x.0);
        p.t.relu_forward(&mut x.1);
        p.compare("relu: forward", &x);
        let mut dy = p.up(&randn(seed, "relu.dy", n, 1.0));
        p.r.relu_backward(&x.0, &mut dy.0);
        p.t.relu_backward(&x.1, &mut dy.1);
        p.compare("relu: gradient", &dy);
    }
    {
        let (rows, cols) = (16, 300);
        let key = DropoutKey {
            seed: rng::key(seed, "dropout"),
            row_offset: 32,
            col_offset: 300,
            total_cols: 600,
        };
        let mut x = p.up(&randn(seed, "dropout.x", rows * cols, 1.0));
        p.r.dropout_forward(rows, cols, 0.5, &key, &mut x.0);
        p.t.dropout_forward(rows, cols, 0.5, &key, &mut x.1);
        p.compare("dropout 0.5 (mask keyed by global position)", &x);
        let mut dy = p.up(&randn(seed, "dropout.dy", rows * cols, 1.0));
        p.r.dropout_backward(rows, cols, 0.5, &key, &mut dy.0);
        p.t.dropout_backward(rows, cols, 0.5, &key, &mut dy.1);
        p.compare("dropout 0.5: gradient", &dy);
    }
    {
        let g = LinearGeom {
            rows: 16,
            inp: 576,
            out: 200,
        };
        let x = p.up(&randn(seed, "fc.x", g.rows * g.inp, 1.0));
        let w = p.up(&randn(seed, "fc.w", g.out * g.inp, 0.05));
        let b = p.up(&randn(seed, "fc.b", g.out, 0.1));
        let dy = p.up(&randn(seed, "fc.dy", g.rows * g.out, 1.0));
        let mut y = p.zeros(g.rows * g.out);
        p.r.linear_forward(&g, &x.0, &w.0, &b.0, &mut y.0);
        p.t.linear_forward(&g, &x.1, &w.1, &b.1, &mut y.1);
        p.compare("linear: forward", &y);
        let (mut dx, mut dw, mut db) = (
            p.zeros(g.rows * g.inp),
            p.zeros(g.out * g.inp),
            p.zeros(g.out),
        );
        p.r.linear_backward(&g, &x.0, &w.0, &dy.0, Some(&mut dx.0), &mut dw.0, &mut db.0);
        p.t.linear_backward(&g, &x.1, &w.1, &dy.1, Some(&mut dx.1), &mut dw.1, &mut db.1);
        p.compare("linear: input gradient", &dx);
        p.compare("linear: weight gradient", &dw);
        p.compare("linear: bias gradient", &db);
        let mut dx = p.zeros(g.rows * g.inp);
        p.r.linear_backward_data(&g, &w.0, &dy.0, &mut dx.0);
        p.t.linear_backward_data(&g, &w.1, &dy.1, &mut dx.1);
        p.compare("linear: input gradient alone", &dx);
        // The forward pass in two parts of the input features, as fc6, fc7 and fc8 run.
        let half = LinearGeom {
            inp: g.inp / 2,
            ..g
        };
        let mut y = p.up(&randn(seed, "fc.stale y", g.rows * g.out, 1.0));
        for i in 0..2 {
            let xi = p.up(&randn(
                seed,
                &format!("fc.x part {i}"),
                g.rows * half.inp,
                1.0,
            ));
            let part = InputPart {
                first: i * half.inp,
                total: g.inp,
            };
            p.r.linear_forward_part(&half, part, &xi.0, &w.0, &b.0, &mut y.0, i > 0);
            p.t.linear_forward_part(&half, part, &xi.1, &w.1, &b.1, &mut y.1, i > 0);
        }
        p.compare("linear: forward in two parts of its input", &y);
    }
    {
        let (rows, classes) = (32, 1000);
        let z = p.up(&randn(seed, "logits", rows * classes, 3.0));
        let labels: Vec<u32> = (0..rows as u64)
            .map(|i| (rng::mix64(seed ^ i) % classes as u64) as u32)
            .collect();
        let mut d = p.zeros(rows * classes);
        let lr = p.r.softmax_xent(rows, classes, &z.0, &labels, &mut d.0);
        let lt = p.t.softmax_xent(rows, classes, &z.1, &labels, &mut d.1);
        p.compare("softmax cross-entropy: gradient", &d);
        p.checks.push(Check {
            what: "softmax cross-entropy: loss".into(),
            error: scaled_error(&[lt], &[lr]),
            tolerance: tol,
        });
        // Read back behind the op (page-locked copies, an event), twice so that the second
        // reuses the buffers: the same loss and logits, bit for bit, as the direct read.
        for round in 0..2 {
            let mut dt = p.t.zeros(rows * classes);
            let readout = p.t.softmax_xent_read(rows, classes, &z.1, &labels, &mut dt);
            let got = readout.wait();
            let same = got.loss.to_bits() == lt.to_bits() && got.logits == p.t.download(&z.1);
            p.checks.push(Check {
                what: format!("softmax cross-entropy: loss and logits read back queued ({round})"),
                error: if same { 0.0 } else { f64::INFINITY },
                tolerance: tol,
            });
        }
    }
    {
        let n = 4099;
        let sgd = SgdParams::default();
        let mut w = p.up(&randn(seed, "sgd.w", n, 0.1));
        let mut v = p.up(&randn(seed, "sgd.v", n, 0.01));
        let g = p.up(&randn(seed, "sgd.g", n, 0.1));
        p.r.sgd_update(&sgd, &mut w.0, &mut v.0, &g.0);
        p.t.sgd_update(&sgd, &mut w.1, &mut v.1, &g.1);
        p.compare("sgd: weights", &w);
        p.compare("sgd: momentum", &v);
    }
    {
        let rows = 8;
        let (a, b) = (
            p.up(&randn(seed, "cat.a", rows * 5, 1.0)),
            p.up(&randn(seed, "cat.b", rows * 7, 1.0)),
        );
        let mut out = p.zeros(rows * 12);
        p.r.concat_rows(rows, &[&a.0, &b.0], &[5, 7], &mut out.0);
        p.t.concat_rows(rows, &[&a.1, &b.1], &[5, 7], &mut out.1);
        p.compare("concat rows (all-gather)", &out);
        let mut part = p.up(&randn(seed, "slice.d", rows * 7, 1.0));
        p.r.slice_rows(rows, 12, 5, 7, &out.0, &mut part.0, true);
        p.t.slice_rows(rows, 12, 5, 7, &out.1, &mut part.1, true);
        p.compare("slice rows, accumulating (reduce-scatter)", &part);
    }
    p.checks
}

/// One training step of the network `cfg` (both columns in one process) from the same
/// parameters on `reference` and `tested`: the loss and every parameter after the update.
pub fn network<R: Backend, T: Backend>(
    cfg: &crate::model::NetConfig,
    reference: R,
    tested: T,
    batch: usize,
    seed: u64,
    tol: f64,
) -> anyhow::Result<Vec<Check>> {
    use crate::comm::LocalExchange;
    use crate::model::Network;
    let mut a = Network::new(
        cfg.clone(),
        reference,
        Box::new(LocalExchange::default()),
        seed,
    )?;
    let mut b = Network::new(
        cfg.clone(),
        tested,
        Box::new(LocalExchange::default()),
        seed,
    )?;
    let x = randn(seed, "network.x", a.input_len(batch), 30.0);
    let labels: Vec<u32> = (0..batch as u64)
        .map(|i| (rng::mix64(seed ^ i) % cfg.classes as u64) as u32)
        .collect();
    let sgd = SgdParams::default();
    let (xa, xb) = (a.backend.upload(&x), b.backend.upload(&x));
    let ra = crate::train::train_step(&mut a, &xa, &labels, 0, &sgd)?;
    let rb = crate::train::train_step(&mut b, &xb, &labels, 0, &sgd)?;
    let mut checks = vec![Check {
        what: format!("network step (batch {batch}): loss"),
        error: scaled_error(&[rb.loss], &[ra.loss]),
        tolerance: tol,
    }];
    // The step moved each parameter by lr * (gradient + decay) + momentum: compare the move,
    // which is what the forward and backward passes computed.
    let init = Network::new(
        cfg.clone(),
        crate::backend::Cpu::with_threads(1),
        Box::new(LocalExchange::default()),
        seed,
    )?;
    for (((_, pa), (_, pb)), (c, p0)) in a.params().zip(b.params()).zip(init.params()) {
        let w0 = init.backend.download(&p0.value);
        let moved = |w: Vec<f32>| -> Vec<f32> { w.iter().zip(&w0).map(|(w, w0)| w - w0).collect() };
        let (ma, mb) = (
            moved(a.backend.download(&pa.value)),
            moved(b.backend.download(&pb.value)),
        );
        checks.push(Check {
            what: format!("network step: update of column {c} {}", pa.name),
            error: scaled_error(&mb, &ma),
            tolerance: tol,
        });
    }
    Ok(checks)
}

/// Random views in bytes: images of side 40 cut to 32, the first two at fixed crops (one plain,
/// one mirrored, off the diagonal), the rest at random, with random colour shifts.
pub fn random_byte_views(seed: u64, views: usize) -> (ByteViews, Vec<u8>) {
    let (side, out) = (40, 32);
    let key = rng::key(seed, "augment.images");
    let images: Vec<u8> = (0..(views * 3 * side * side) as u64)
        .map(|i| (rng::mix64(key ^ i) & 0xff) as u8)
        .collect();
    let mean: Vec<f32> = randn(seed, "augment.mean", 3 * side * side, 20.0)
        .into_iter()
        .map(|v| v + 120.0)
        .collect();
    let crops: Vec<Crop> = [(1, 5, false), (6, 2, true)]
        .into_iter()
        .chain((2..views).map(|n| {
            let h = rng::mix64(seed ^ (n as u64) << 8);
            (
                h as usize % (side - out + 1),
                (h >> 16) as usize % (side - out + 1),
                h >> 40 & 1 == 1,
            )
        }))
        .take(views)
        .map(|(x0, y0, flip)| Crop { x0, y0, flip })
        .collect();
    let shifts: Vec<[f32; 3]> = (0..views)
        .map(|n| {
            let v = randn(seed, &format!("augment.shift{n}"), 3, 10.0);
            [v[0], v[1], v[2]]
        })
        .collect();
    let per = 3 * out * out;
    let mut pixels = vec![0u8; views * per];
    for (n, (dst, &c)) in pixels.chunks_mut(per).zip(&crops).enumerate() {
        cut(
            &images[n * 3 * side * side..][..3 * side * side],
            side,
            c,
            out,
            dst,
        );
    }
    let views = ByteViews {
        side,
        out_side: out,
        pixels,
        crops,
        shifts,
        mean: mean.into(),
    };
    (views, images)
}

/// A backend's views finished from bytes (on a GPU: on the device) against the loader's
/// `data::augment::render` of the whole images, on random images, crops, mirrors and shifts.
/// Exact (tolerance 0): a subtraction and an addition round the same everywhere, and a run
/// must not depend on where its views were finished.
pub fn finish_views<B: Backend>(backend: &B, seed: u64) -> anyhow::Result<Check> {
    let (views, images) = random_byte_views(seed, 6);
    let (side, out, per) = (views.side, views.out_side, views.view_len());
    let mut want = vec![0.0f32; views.views() * per];
    for (n, view) in want.chunks_mut(per).enumerate() {
        let image = &images[n * 3 * side * side..][..3 * side * side];
        augment::render(
            image,
            &views.mean,
            side,
            views.crops[n],
            views.shifts[n],
            out,
            view,
        );
    }
    let mean = backend.upload(&views.mean);
    let got = backend.download(&backend.finish_views(&views, &mean)?);
    Ok(Check {
        what: "training views finished from uint8 (exact)".into(),
        error: scaled_error(&got, &want),
        tolerance: 0.0,
    })
}

/// Uploads back to back, more of them and larger than a device's staging pool holds at once
/// (so that its buffers are reused, waited for and replaced while copies are in flight), then
/// read back: every value must arrive exactly.
pub fn uploads<B: Backend>(backend: &B, seed: u64) -> Check {
    // Floats: from one value to 6 Mi (24 MiB), small and large in turn, twice over.
    const SIZES: [usize; 12] = [
        1,
        1000,
        1 << 20,
        7,
        6 << 20,
        3,
        1 << 18,
        5 << 20,
        2,
        1 << 20,
        4 << 20,
        123_457,
    ];
    let key = rng::key(seed, "selftest.uploads");
    let hosts: Vec<Vec<f32>> = (0..2 * SIZES.len())
        .map(|u| {
            let k = rng::subkey(key, u as u64);
            (0..SIZES[u % SIZES.len()] as u64)
                .map(|i| rng::normal(k, i))
                .collect()
        })
        .collect();
    let bufs: Vec<B::Buf> = hosts.iter().map(|h| backend.upload(h)).collect();
    let error = (hosts.iter().zip(&bufs))
        .map(|(h, b)| scaled_error(&backend.download(b), h))
        .fold(0.0, f64::max);
    Check {
        what: "24 uploads back to back, read back (exact)".into(),
        error,
        tolerance: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;
    use crate::selftest::render;

    #[test]
    fn uploads_arrive_exactly() {
        let check = uploads(&Cpu::new(), 3);
        assert!(check.passed(), "{}", render(&[check]));
    }

    #[test]
    fn the_cpu_passes_against_itself_with_another_work_split() {
        let checks = ops(&Cpu::with_threads(1), &Cpu::with_threads(3), 7, 1e-5);
        let failed: Vec<_> = checks.iter().filter(|c| !c.passed()).collect();
        assert!(failed.is_empty(), "{}", render(&checks));
        assert!(checks.len() > 25);
    }
}
