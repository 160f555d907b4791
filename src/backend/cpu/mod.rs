//! The CPU backend: the reference for every other backend, and what runs without a GPU.
//!
//! Multi-threaded with rayon; the GEMMs come from the `gemm` crate, which dispatches to
//! AVX-512 or AVX2 kernels at run time.

mod conv;
pub mod gemm;
mod lrn;
pub mod memory;
pub mod peak;
mod pool;

use self::gemm::{sgemm, MatRef, Parallelism};
use super::{
    rng, Backend, ConvGeom, DropoutKey, InputPart, LinearGeom, LrnParams, OutOfMemory, PlaneGeom,
    PoolGeom, SgdParams,
};
use rayon::prelude::*;

/// Items per task when `n` items are split evenly over `threads` tasks.
pub(crate) fn split_even(n: usize, threads: usize) -> usize {
    n.div_ceil(threads.max(1)).max(1)
}

/// Scratch buffers reused across calls (im2col columns, per-task gradient sums). Large
/// allocations come from fresh zeroed pages each time: taking them from here instead spares a
/// page fault per 4 KiB, which costs more than the arithmetic of the cheaper layers.
static SCRATCH: std::sync::Mutex<Vec<Vec<f32>>> = std::sync::Mutex::new(Vec::new());

/// A scratch buffer of `len` values with unspecified contents.
pub(crate) fn take_scratch(len: usize) -> Vec<f32> {
    let mut pool = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    // The smallest buffer that fits, so that big ones stay available for big requests.
    let best = pool
        .iter()
        .enumerate()
        .filter(|(_, v)| v.capacity() >= len)
        .min_by_key(|(_, v)| v.capacity())
        .map(|(i, _)| i);
    let mut v = match best {
        Some(i) => pool.swap_remove(i),
        None => Vec::with_capacity(len),
    };
    drop(pool);
    // New elements (if any) are zero; the rest keep whatever the last user left.
    v.resize(len, 0.0);
    v
}

/// Returns a buffer from [`take_scratch`] for reuse.
pub(crate) fn give_scratch(v: Vec<f32>) {
    let mut pool = SCRATCH.lock().unwrap_or_else(|e| e.into_inner());
    pool.push(v);
    // Bounded: keep the 16 largest, which serve every smaller request too.
    if pool.len() > 16 {
        let smallest = (0..pool.len())
            .min_by_key(|&i| pool[i].capacity())
            .expect("not empty");
        pool.swap_remove(smallest);
    }
}

/// Elementwise work is split into blocks of this many values (big enough to amortise a task).
const BLOCK: usize = 1 << 15;

#[derive(Clone, Debug)]
pub struct Cpu {
    threads: usize,
    /// `--memory-limit`: the most the job's workers on this machine may take, in bytes.
    memory_limit: Option<u64>,
}

impl Default for Cpu {
    fn default() -> Self {
        Cpu::new()
    }
}

impl Cpu {
    /// Uses rayon's global pool (set its size with `RAYON_NUM_THREADS`).
    pub fn new() -> Self {
        Cpu {
            threads: rayon::current_num_threads(),
            memory_limit: None,
        }
    }

    /// Splits each op's work as if for `threads` threads (still run on rayon's pool): tests use
    /// it to cover uneven splits whatever the machine.
    pub fn with_threads(threads: usize) -> Self {
        Cpu {
            threads: threads.max(1),
            memory_limit: None,
        }
    }

    /// Buffers refused beyond `limit` bytes (for all of this machine's workers together), as
    /// well as beyond what the machine and the control group allow.
    pub fn with_memory_limit(self, limit: Option<u64>) -> Self {
        Cpu {
            memory_limit: limit,
            ..self
        }
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    fn gemm_parallelism(&self, flops: usize) -> Parallelism {
        if self.threads > 1 && flops > 1 << 20 {
            Parallelism::Rayon(self.threads)
        } else {
            Parallelism::None
        }
    }
}

/// The widest SIMD the `gemm` kernels will use on this machine.
pub fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return "avx512";
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return "avx2+fma";
        }
    }
    "baseline"
}

impl Backend for Cpu {
    type Buf = Vec<f32>;

    fn name(&self) -> String {
        format!("cpu ({} threads, {})", self.threads, simd_level())
    }

    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    /// [`Backend::zeros`], failing instead of aborting the process where the system refuses
    /// the mapping (a single buffer larger than memory and swap together).
    fn try_zeros(&self, len: usize) -> anyhow::Result<Vec<f32>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let layout = std::alloc::Layout::array::<f32>(len)
            .map_err(|_| OutOfMemory(format!("{len} floats exceed the address space")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<f32>();
        if ptr.is_null() {
            return Err(OutOfMemory(format!(
                "out of memory: the system refused {} MiB more",
                (4 * len) >> 20
            ))
            .into());
        }
        // SAFETY: `ptr` comes from the global allocator with the layout of `len` f32s, which
        // is the layout a Vec<f32> of capacity `len` frees with; all-zero bits are 0.0f32.
        Ok(unsafe { Vec::from_raw_parts(ptr, len, len) })
    }
    fn memory_available(&self) -> Option<u64> {
        memory::available_bytes(self.memory_limit)
    }
    fn upload(&self, host: &[f32]) -> Vec<f32> {
        host.to_vec()
    }
    fn download(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }
    fn upload_vec(&self, host: Vec<f32>) -> Vec<f32> {
        host
    }
    fn download_owned(&self, buf: Vec<f32>) -> Vec<f32> {
        buf
    }
    fn buf_len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }

    fn finish_views(
        &self,
        views: &crate::data::augment::ByteViews,
        mean: &Vec<f32>,
    ) -> anyhow::Result<Vec<f32>> {
        views.check()?;
        let mut out = vec![0.0; views.views() * views.view_len()];
        views.finish_with(mean, &mut out)?;
        Ok(out)
    }

    fn conv2d_forward(
        &self,
        g: &ConvGeom,
        x: &Vec<f32>,
        w: &Vec<f32>,
        b: &Vec<f32>,
        y: &mut Vec<f32>,
    ) {
        conv::forward(g, x, w, b, y, self.threads)
    }

    fn conv2d_backward(
        &self,
        g: &ConvGeom,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        dx: Option<&mut Vec<f32>>,
        dw: &mut Vec<f32>,
        db: &mut Vec<f32>,
    ) {
        conv::backward(
            g,
            x,
            w,
            dy,
            dx.map(|d| d.as_mut_slice()),
            dw,
            db,
            self.threads,
        )
    }

    fn conv2d_backward_data(&self, g: &ConvGeom, w: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) {
        conv::backward_data(g, w, dy, dx)
    }

    fn conv2d_forward_sets(
        &self,
        g: &ConvGeom,
        x: &Vec<f32>,
        ws: &[&Vec<f32>],
        bs: &[&Vec<f32>],
        ys: &mut [&mut Vec<f32>],
    ) {
        let ws: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
        let bs: Vec<&[f32]> = bs.iter().map(|b| b.as_slice()).collect();
        let mut ys: Vec<&mut [f32]> = ys.iter_mut().map(|y| y.as_mut_slice()).collect();
        conv::forward_sets(g, x, &ws, &bs, &mut ys, self.threads)
    }

    fn conv2d_forward_part(
        &self,
        g: &ConvGeom,
        part: InputPart,
        x: &Vec<f32>,
        w: &Vec<f32>,
        b: &Vec<f32>,
        y: &mut Vec<f32>,
        accumulate: bool,
    ) {
        conv::forward_part(g, part, x, w, b, y, accumulate, self.threads)
    }

    fn conv2d_backward_sets(
        &self,
        g: &ConvGeom,
        x: &Vec<f32>,
        ws: &[&Vec<f32>],
        dys: &[&Vec<f32>],
        dws: &mut [&mut Vec<f32>],
        dbs: &mut [&mut Vec<f32>],
    ) {
        let ws: Vec<&[f32]> = ws.iter().map(|w| w.as_slice()).collect();
        let dys: Vec<&[f32]> = dys.iter().map(|d| d.as_slice()).collect();
        let mut dws: Vec<&mut [f32]> = dws.iter_mut().map(|d| d.as_mut_slice()).collect();
        let mut dbs: Vec<&mut [f32]> = dbs.iter_mut().map(|d| d.as_mut_slice()).collect();
        conv::backward_sets(g, x, &ws, &dys, None, &mut dws, &mut dbs, self.threads)
    }

    fn relu_forward(&self, x: &mut Vec<f32>) {
        x.par_chunks_mut(BLOCK)
            .for_each(|c| c.iter_mut().for_each(|v| *v = v.max(0.0)));
    }

    fn relu_backward(&self, y: &Vec<f32>, dy: &mut Vec<f32>) {
        assert_eq!(y.len(), dy.len(), "relu gradient length");
        dy.par_chunks_mut(BLOCK)
            .zip(y.par_chunks(BLOCK))
            .for_each(|(d, y)| {
                d.iter_mut().zip(y).for_each(|(d, &y)| {
                    if y <= 0.0 {
                        *d = 0.0
                    }
                })
            });
    }

    fn lrn_forward(
        &self,
        g: &PlaneGeom,
        p: &LrnParams,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
        scale: &mut Vec<f32>,
    ) {
        lrn::forward(g, p, x, y, scale, self.threads)
    }

    fn lrn_backward(
        &self,
        g: &PlaneGeom,
        p: &LrnParams,
        x: &Vec<f32>,
        y: &Vec<f32>,
        scale: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) {
        lrn::backward(g, p, x, y, scale, dy, dx, self.threads)
    }

    fn maxpool_forward(&self, g: &PoolGeom, x: &Vec<f32>, y: &mut Vec<f32>) {
        pool::forward(g, x, y)
    }

    fn maxpool_backward(
        &self,
        g: &PoolGeom,
        x: &Vec<f32>,
        y: &Vec<f32>,
        dy: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) {
        pool::backward(g, x, y, dy, dx)
    }

    fn dropout_forward(
        &self,
        rows: usize,
        cols: usize,
        p: f32,
        key: &DropoutKey,
        x: &mut Vec<f32>,
    ) {
        apply_dropout(rows, cols, p, key, x)
    }

    fn dropout_backward(
        &self,
        rows: usize,
        cols: usize,
        p: f32,
        key: &DropoutKey,
        dy: &mut Vec<f32>,
    ) {
        // Inverted dropout is linear in its input: the gradient takes the same mask and scale.
        apply_dropout(rows, cols, p, key, dy)
    }

    fn linear_forward(
        &self,
        g: &LinearGeom,
        x: &Vec<f32>,
        w: &Vec<f32>,
        b: &Vec<f32>,
        y: &mut Vec<f32>,
    ) {
        assert_eq!(x.len(), g.rows * g.inp, "linear input length");
        assert_eq!(w.len(), g.out * g.inp, "linear weight length");
        assert_eq!(b.len(), g.out, "linear bias length");
        assert_eq!(y.len(), g.rows * g.out, "linear output length");
        for row in y.chunks_mut(g.out) {
            row.copy_from_slice(b);
        }
        let par = self.gemm_parallelism(g.rows * g.inp * g.out);
        sgemm(
            g.rows,
            g.out,
            g.inp,
            MatRef::rows(x, g.inp),
            MatRef::transposed(w, g.inp),
            y,
            g.out,
            true,
            par,
        );
    }

    fn linear_forward_part(
        &self,
        g: &LinearGeom,
        part: InputPart,
        x: &Vec<f32>,
        w: &Vec<f32>,
        b: &Vec<f32>,
        y: &mut Vec<f32>,
        accumulate: bool,
    ) {
        part.check_linear(g, [x.len(), w.len(), b.len(), y.len()], accumulate);
        if !accumulate {
            for row in y.chunks_mut(g.out) {
                row.copy_from_slice(b);
            }
        }
        let par = self.gemm_parallelism(g.rows * g.inp * g.out);
        // w's part, transposed in place: element (feature i, output o) at o * total + first + i.
        let w_part = MatRef {
            data: &w[part.first..],
            rs: 1,
            cs: part.total,
        };
        sgemm(
            g.rows,
            g.out,
            g.inp,
            MatRef::rows(x, g.inp),
            w_part,
            y,
            g.out,
            true,
            par,
        );
    }

    fn linear_backward(
        &self,
        g: &LinearGeom,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        dx: Option<&mut Vec<f32>>,
        dw: &mut Vec<f32>,
        db: &mut Vec<f32>,
    ) {
        assert_eq!(dy.len(), g.rows * g.out, "linear output gradient length");
        assert_eq!(dw.len(), g.out * g.inp, "linear weight gradient length");
        assert_eq!(db.len(), g.out, "linear bias gradient length");
        // dW [out, inp] = dY^T [out, rows] * X [rows, inp]
        sgemm(
            g.out,
            g.inp,
            g.rows,
            MatRef::transposed(dy, g.out),
            MatRef::rows(x, g.inp),
            dw,
            g.inp,
            false,
            self.gemm_parallelism(g.rows * g.inp * g.out),
        );
        db.fill(0.0);
        for row in dy.chunks(g.out) {
            db.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        if let Some(dx) = dx {
            self.linear_backward_data(g, w, dy, dx);
        }
    }

    fn linear_backward_data(&self, g: &LinearGeom, w: &Vec<f32>, dy: &Vec<f32>, dx: &mut Vec<f32>) {
        assert_eq!(w.len(), g.out * g.inp, "linear weight length");
        assert_eq!(dy.len(), g.rows * g.out, "linear output gradient length");
        assert_eq!(dx.len(), g.rows * g.inp, "linear input gradient length");
        // dX [rows, inp] = dY [rows, out] * W [out, inp]
        sgemm(
            g.rows,
            g.inp,
            g.out,
            MatRef::rows(dy, g.out),
            MatRef::rows(w, g.inp),
            dx,
            g.inp,
            false,
            self.gemm_parallelism(g.rows * g.inp * g.out),
        );
    }

    fn softmax_xent(
        &self,
        rows: usize,
        classes: usize,
        logits: &Vec<f32>,
        labels: &[u32],
        dlogits: &mut Vec<f32>,
    ) -> f32 {
        softmax_xent(rows, classes, logits, labels, dlogits)
    }

    fn sgd_update(&self, p: &SgdParams, w: &mut Vec<f32>, v: &mut Vec<f32>, g: &Vec<f32>) {
        assert!(
            w.len() == v.len() && w.len() == g.len(),
            "sgd buffers differ in length"
        );
        let decay = p.weight_decay * p.lr;
        w.par_chunks_mut(BLOCK)
            .zip(v.par_chunks_mut(BLOCK))
            .zip(g.par_chunks(BLOCK))
            .for_each(|((w, v), g)| {
                for ((w, v), &g) in w.iter_mut().zip(v.iter_mut()).zip(g) {
                    *v = p.momentum * *v - decay * *w - p.lr * g;
                    *w += *v;
                }
            });
    }

    fn scale(&self, x: &mut Vec<f32>, factor: f32) {
        x.par_chunks_mut(BLOCK)
            .for_each(|x| x.iter_mut().for_each(|v| *v *= factor));
    }

    fn concat_rows(&self, rows: usize, parts: &[&Vec<f32>], widths: &[usize], out: &mut Vec<f32>) {
        assert_eq!(parts.len(), widths.len(), "concat: one width per part");
        let total: usize = widths.iter().sum();
        assert_eq!(out.len(), rows * total, "concat output length");
        for (p, &w) in parts.iter().zip(widths) {
            assert_eq!(p.len(), rows * w, "concat part length");
        }
        out.par_chunks_mut(total).enumerate().for_each(|(r, dst)| {
            let mut off = 0;
            for (p, &w) in parts.iter().zip(widths) {
                dst[off..off + w].copy_from_slice(&p[r * w..(r + 1) * w]);
                off += w;
            }
        });
    }

    fn slice_rows(
        &self,
        rows: usize,
        total: usize,
        offset: usize,
        width: usize,
        src: &Vec<f32>,
        dst: &mut Vec<f32>,
        accumulate: bool,
    ) {
        assert!(offset + width <= total, "slice beyond the row");
        assert_eq!(src.len(), rows * total, "slice source length");
        assert_eq!(dst.len(), rows * width, "slice destination length");
        dst.par_chunks_mut(width).enumerate().for_each(|(r, d)| {
            let s = &src[r * total + offset..][..width];
            if accumulate {
                d.iter_mut().zip(s).for_each(|(a, b)| *a += b);
            } else {
                d.copy_from_slice(s);
            }
        });
    }
}

fn apply_dropout(rows: usize, cols: usize, p: f32, key: &DropoutKey, x: &mut [f32]) {
    assert_eq!(x.len(), rows * cols, "dropout block length");
    assert!(
        (0.0..1.0).contains(&p),
        "dropout probability {p} outside [0, 1)"
    );
    if p == 0.0 {
        return;
    }
    let keep_scale = 1.0 / (1.0 - p);
    x.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
        let base = (key.row_offset + r as u64) * key.total_cols + key.col_offset;
        for (c, v) in row.iter_mut().enumerate() {
            *v = if rng::uniform(key.seed, base + c as u64) < p {
                0.0
            } else {
                *v * keep_scale
            };
        }
    });
}

/// Mean cross-entropy of softmax(logits) against `labels`, and its gradient.
pub fn softmax_xent(
    rows: usize,
    classes: usize,
    logits: &[f32],
    labels: &[u32],
    dlogits: &mut [f32],
) -> f32 {
    assert_eq!(logits.len(), rows * classes, "logits length");
    assert_eq!(dlogits.len(), rows * classes, "logits gradient length");
    assert_eq!(labels.len(), rows, "one label per row");
    let mut loss = 0.0f64;
    for ((z, d), &label) in logits
        .chunks(classes)
        .zip(dlogits.chunks_mut(classes))
        .zip(labels)
    {
        let label = label as usize;
        assert!(label < classes, "label {label} outside 0..{classes}");
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f64 = z.iter().map(|&v| ((v - max) as f64).exp()).sum();
        loss += sum.ln() - (z[label] - max) as f64;
        for (dv, &v) in d.iter_mut().zip(z) {
            *dv = (((v - max) as f64).exp() / sum / rows as f64) as f32;
        }
        d[label] -= 1.0 / rows as f32;
    }
    (loss / rows as f64) as f32
}

/// Indices of the `k` largest values of each row, largest first.
pub fn top_k(rows: usize, classes: usize, logits: &[f32], k: usize) -> Vec<Vec<u32>> {
    logits[..rows * classes]
        .chunks(classes)
        .map(|z| {
            let mut idx: Vec<u32> = (0..classes as u32).collect();
            idx.sort_by(|&a, &b| z[b as usize].total_cmp(&z[a as usize]).then(a.cmp(&b)));
            idx.truncate(k);
            idx
        })
        .collect()
}
