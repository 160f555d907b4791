//! The network's layers as the paper draws them: stages that each column runs on its own maps
//! ([`ColumnStage`]: convolution, ReLU, LRN, max-pooling), and the layers that read both
//! columns ([`ColumnParallel`]: conv3, fc6, fc7, fc8), which own the exchange of their input.
//!
//! A layer holds, for every column this process holds, what its forward pass keeps for the
//! backward pass and (training) its gradients; the parameters stay in the [`Column`]s, where
//! checkpoints read them, and a layer finds its own by name.

use super::params::Column;
use super::profile::{Pass, Profile};
use crate::backend::{
    Backend, ConvGeom, DropoutKey, InputPart, LinearGeom, LrnParams, PlaneGeom, PoolGeom,
};
use crate::comm::ColumnExchange;
use crate::model::config::COLUMNS;
use crate::rng;

/// What to change when a batch does not fit.
pub(super) const TOO_LARGE: &str =
    "lower --batch, or spread the job over more devices (--replicas)";

/// A buffer of the network's, or an error naming what did not fit and at which batch size.
pub(super) fn alloc<B: Backend>(
    b: &B,
    what: &str,
    batch: usize,
    len: usize,
) -> anyhow::Result<B::Buf> {
    b.try_zeros(len).map_err(|e| {
        anyhow::anyhow!(
            "the {what} ({} MiB) at batch {batch} does not fit: {e:#}; {TOO_LARGE}",
            (4 * len) >> 20
        )
    })
}

/// What keys a training step's dropout masks: the run's seed, the step, and where this
/// process's samples sit in the global batch (replicas draw disjoint rows of one mask).
#[derive(Clone, Copy, Debug)]
pub(super) struct DropoutKeys {
    pub p: f32,
    pub seed: u64,
    pub step: u64,
    pub row_offset: u64,
}

impl DropoutKeys {
    fn key(&self, layer: &str, column: usize, g: &LinearGeom) -> DropoutKey {
        DropoutKey {
            seed: rng::subkey(rng::key(self.seed, layer), self.step),
            row_offset: self.row_offset,
            col_offset: (column * g.out) as u64,
            total_cols: (COLUMNS * g.out) as u64,
        }
    }
}

/// One column's buffers of one layer at one batch size.
pub(super) struct ColumnBufs<B: Backend> {
    /// The convolution's or product's output, after ReLU (and dropout).
    y: B::Buf,
    /// LRN's output, and the scale it keeps for the backward pass.
    lrn: Option<(B::Buf, B::Buf)>,
    /// Max-pooling's output.
    pool: Option<B::Buf>,
    /// Training only: every backward op overwrites its output, so they need no clearing, and
    /// keeping them between steps spares the allocator and the page faults of several hundred
    /// MB per step.
    grads: Option<ColumnGrads<B>>,
}

/// Gradients of the tensors of [`ColumnBufs`], and a column-parallel layer's share of its
/// gathered input's gradient (before the reduce-scatter sums the columns' shares).
struct ColumnGrads<B: Backend> {
    dy: B::Buf,
    dlrn: Option<B::Buf>,
    dpool: Option<B::Buf>,
    dgathered: Option<B::Buf>,
}

impl<B: Backend> ColumnBufs<B> {
    /// The layer's output: what the next layer reads.
    fn output(&self) -> &B::Buf {
        (self.pool.as_ref())
            .or(self.lrn.as_ref().map(|l| &l.0))
            .unwrap_or(&self.y)
    }

    fn grads(&mut self) -> &mut ColumnGrads<B> {
        self.grads.as_mut().expect("gradients prepared")
    }

    /// The output, and its gradient (where the next layer writes its input gradient).
    fn output_and_grad(&mut self) -> (&B::Buf, &mut B::Buf) {
        let g = self.grads.as_mut().expect("gradients prepared");
        let dout = (g.dpool.as_mut()).or(g.dlrn.as_mut()).unwrap_or(&mut g.dy);
        let out = (self.pool.as_ref())
            .or(self.lrn.as_ref().map(|l| &l.0))
            .unwrap_or(&self.y);
        (out, dout)
    }

    fn bytes(&self, b: &B) -> usize {
        let mut bufs = vec![&self.y];
        bufs.extend(self.lrn.iter().flat_map(|(y, s)| [y, s]));
        bufs.extend(&self.pool);
        if let Some(g) = &self.grads {
            bufs.push(&g.dy);
            bufs.extend(g.dlrn.iter().chain(&g.dpool).chain(&g.dgathered));
        }
        4 * bufs.iter().map(|x| b.buf_len(x)).sum::<usize>()
    }
}

/// What every layer offers the network around it.
pub(super) trait Layer<B: Backend> {
    fn name(&self) -> &'static str;
    fn columns(&self) -> &[ColumnBufs<B>];
    fn columns_mut(&mut self) -> &mut [ColumnBufs<B>];
    /// Allocates the backward pass's buffers (the forward pass's are made with the layer).
    fn alloc_grads(&mut self, b: &B, batch: usize) -> anyhow::Result<()>;
    /// Bytes of the buffers it holds beyond the columns' (the gathered tensors).
    fn shared_bytes(&self, b: &B) -> usize;

    /// Every held column's output, in the columns' order.
    fn outputs<'a>(&'a self) -> Vec<&'a B::Buf>
    where
        B: 'a,
    {
        self.columns().iter().map(ColumnBufs::output).collect()
    }

    /// Every held column's output and its gradient, which the next layer's backward pass writes.
    fn outputs_and_grads<'a>(&'a mut self) -> (Vec<&'a B::Buf>, Vec<&'a mut B::Buf>)
    where
        B: 'a,
    {
        self.columns_mut()
            .iter_mut()
            .map(ColumnBufs::output_and_grad)
            .unzip()
    }

    fn bytes(&self, b: &B) -> usize {
        self.columns().iter().map(|c| c.bytes(b)).sum::<usize>() + self.shared_bytes(b)
    }

    /// A kept tensor of held column `at` by its name (`conv2`, `lrn2`, `pool2`).
    fn tensor<'a>(&'a self, at: usize, name: &str) -> Option<&'a B::Buf>
    where
        B: 'a,
    {
        let c = self.columns().get(at)?;
        if name == self.name() {
            return Some(&c.y);
        }
        let suffix = self.name().strip_prefix("conv")?;
        match name.strip_suffix(suffix)? {
            "lrn" => c.lrn.as_ref().map(|l| &l.0),
            "pool" => c.pool.as_ref(),
            _ => None,
        }
    }
}

/// LRN after a stage's ReLU.
#[derive(Clone, Copy, Debug)]
pub(super) struct Lrn {
    pub name: &'static str,
    /// One column's channels.
    pub geom: PlaneGeom,
    pub params: LrnParams,
    /// Over the whole layer's channels (both columns held here) rather than each column's.
    pub across: bool,
}

impl Lrn {
    /// The whole layer's geometry, and one column's values per image.
    fn whole(&self) -> (PlaneGeom, usize) {
        let half = self.geom;
        let whole = PlaneGeom {
            channels: half.channels * COLUMNS,
            ..half
        };
        (whole, half.channels * half.plane)
    }
}

/// What a [`ColumnStage`] reads.
pub(super) enum Input<'a, B: Backend> {
    /// The same tensor for every column (conv1: the image): one call can share its unfolding.
    Shared(&'a B::Buf),
    /// Each held column's own block: the previous layer's output.
    Own(Vec<&'a B::Buf>),
}

/// A stage that each column runs on its own maps: convolution and ReLU, then LRN and
/// max-pooling where the paper has them (conv1, conv2, conv4, conv5).
pub(super) struct ColumnStage<B: Backend> {
    name: &'static str,
    conv: ConvGeom,
    lrn: Option<Lrn>,
    pool: Option<(&'static str, PoolGeom)>,
    cols: Vec<ColumnBufs<B>>,
}

impl<B: Backend> ColumnStage<B> {
    /// The stage with its forward buffers for `columns` held columns.
    pub fn new(
        b: &B,
        name: &'static str,
        conv: ConvGeom,
        lrn: Option<Lrn>,
        pool: Option<(&'static str, PoolGeom)>,
        columns: usize,
    ) -> anyhow::Result<Self> {
        let batch = conv.batch;
        let cols = (0..columns)
            .map(|_| {
                Ok(ColumnBufs {
                    y: alloc(b, &format!("{name} output"), batch, conv.out_len())?,
                    lrn: match &lrn {
                        Some(l) => Some((
                            alloc(b, &format!("{} output", l.name), batch, l.geom.len())?,
                            alloc(b, &format!("{} scale", l.name), batch, l.geom.len())?,
                        )),
                        None => None,
                    },
                    pool: match &pool {
                        Some((p, g)) => Some(alloc(b, &format!("{p} output"), batch, g.out_len())?),
                        None => None,
                    },
                    grads: None,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(ColumnStage {
            name,
            conv,
            lrn,
            pool,
            cols,
        })
    }

    pub fn forward(&mut self, b: &B, prof: &mut Profile, x: Input<'_, B>, params: &[Column<B>]) {
        {
            let _t = prof.time(b, self.name, Pass::Forward);
            match x {
                Input::Shared(x) => {
                    let (ws, bs): (Vec<_>, Vec<_>) = (params.iter())
                        .map(|c| c.weight_and_bias(self.name))
                        .map(|(w, bias)| (&w.value, &bias.value))
                        .unzip();
                    let mut ys: Vec<_> = self.cols.iter_mut().map(|c| &mut c.y).collect();
                    b.conv2d_forward_sets(&self.conv, x, &ws, &bs, &mut ys);
                }
                Input::Own(xs) => {
                    for ((c, x), p) in self.cols.iter_mut().zip(xs).zip(params) {
                        let (w, bias) = p.weight_and_bias(self.name);
                        b.conv2d_forward(&self.conv, x, &w.value, &bias.value, &mut c.y);
                    }
                }
            }
            for c in &mut self.cols {
                b.relu_forward(&mut c.y);
            }
        }
        if let Some(lrn) = &self.lrn {
            let _t = prof.time(b, lrn.name, Pass::Forward);
            lrn_forward(b, lrn, &mut self.cols);
        }
        if let Some((name, g)) = &self.pool {
            let _t = prof.time(b, name, Pass::Forward);
            for c in &mut self.cols {
                let x = c.lrn.as_ref().map(|l| &l.0).unwrap_or(&c.y);
                b.maxpool_forward(g, x, c.pool.as_mut().expect("pooling stage"));
            }
        }
    }

    /// The weight gradients (unless the layer is frozen: `weights` false), and the input
    /// gradient into `dx` where one is given (none for conv1, whose input is the image, nor
    /// above a frozen stack of layers that nothing below needs to learn from).
    pub fn backward(
        &mut self,
        b: &B,
        prof: &mut Profile,
        x: Input<'_, B>,
        dx: Option<Vec<&mut B::Buf>>,
        params: &mut [Column<B>],
        weights: bool,
    ) {
        if let Some((name, g)) = &self.pool {
            let _t = prof.time(b, name, Pass::Backward);
            for c in &mut self.cols {
                let ColumnBufs {
                    y,
                    lrn,
                    pool,
                    grads,
                } = c;
                let g_ = grads.as_mut().expect("gradients prepared");
                let (x, dx) = match (lrn.as_ref(), g_.dlrn.as_mut()) {
                    (Some(l), Some(dl)) => (&l.0, dl),
                    _ => (&*y, &mut g_.dy),
                };
                let (out, dout) = (pool.as_ref().expect("pooled"), g_.dpool.as_ref());
                b.maxpool_backward(g, x, out, dout.expect("pooled"), dx);
            }
        }
        if let Some(lrn) = &self.lrn {
            let _t = prof.time(b, lrn.name, Pass::Backward);
            lrn_backward(b, lrn, &mut self.cols);
        }
        let _t = prof.time(b, self.name, Pass::Backward);
        for c in &mut self.cols {
            let ColumnBufs { y, grads, .. } = c;
            b.relu_backward(y, &mut grads.as_mut().expect("gradients prepared").dy);
        }
        if !weights {
            // Frozen: only the input gradient, for the layers below.
            let Some(dx) = dx else { return };
            for ((c, dxi), p) in self.cols.iter().zip(dx).zip(params.iter()) {
                let (w, _) = p.weight_and_bias(self.name);
                let dy = &c.grads.as_ref().expect("gradients prepared").dy;
                b.conv2d_backward_data(&self.conv, &w.value, dy, dxi);
            }
            return;
        }
        match x {
            Input::Shared(x) => {
                let dys: Vec<&B::Buf> = (self.cols.iter())
                    .map(|c| &c.grads.as_ref().expect("gradients prepared").dy)
                    .collect();
                let (mut ws, mut dws, mut dbs) = (Vec::new(), Vec::new(), Vec::new());
                for p in params.iter_mut() {
                    let (w, bias) = p.weight_and_bias_mut(self.name);
                    ws.push(&w.value);
                    dws.push(&mut w.grad);
                    dbs.push(&mut bias.grad);
                }
                b.conv2d_backward_sets(&self.conv, x, &ws, &dys, &mut dws, &mut dbs);
            }
            Input::Own(xs) => {
                let mut dx = dx.map(Vec::into_iter);
                for ((c, x), p) in self.cols.iter_mut().zip(xs).zip(params) {
                    let (w, bias) = p.weight_and_bias_mut(self.name);
                    let dxi = dx.as_mut().and_then(Iterator::next);
                    let dy = &c.grads().dy;
                    b.conv2d_backward(
                        &self.conv,
                        x,
                        &w.value,
                        dy,
                        dxi,
                        &mut w.grad,
                        &mut bias.grad,
                    );
                }
            }
        }
    }
}

impl<B: Backend> Layer<B> for ColumnStage<B> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn columns(&self) -> &[ColumnBufs<B>] {
        &self.cols
    }
    fn columns_mut(&mut self) -> &mut [ColumnBufs<B>] {
        &mut self.cols
    }
    fn alloc_grads(&mut self, b: &B, batch: usize) -> anyhow::Result<()> {
        for c in &mut self.cols {
            c.grads = Some(ColumnGrads {
                dy: alloc(
                    b,
                    &format!("{} gradient", self.name),
                    batch,
                    self.conv.out_len(),
                )?,
                dlrn: match &self.lrn {
                    Some(l) => Some(alloc(
                        b,
                        &format!("{} gradient", l.name),
                        batch,
                        l.geom.len(),
                    )?),
                    None => None,
                },
                dpool: match &self.pool {
                    Some((p, g)) => Some(alloc(b, &format!("{p} gradient"), batch, g.out_len())?),
                    None => None,
                },
                dgathered: None,
            });
        }
        Ok(())
    }
    fn shared_bytes(&self, _: &B) -> usize {
        0
    }
}

/// LRN on every held column: each column alone (the paper), or over the whole layer's channels
/// (`across`: both columns are held here).
fn lrn_forward<B: Backend>(b: &B, lrn: &Lrn, cols: &mut [ColumnBufs<B>]) {
    if !lrn.across {
        for c in cols {
            let (y, s) = c.lrn.as_mut().expect("LRN stage");
            b.lrn_forward(&lrn.geom, &lrn.params, &c.y, y, s);
        }
        return;
    }
    let (whole, width) = lrn.whole();
    let rows = lrn.geom.batch;
    let x = gather_rows(
        b,
        rows,
        width,
        whole.len(),
        cols.iter().map(|c| &c.y).collect(),
    );
    let (mut y, mut s) = (b.zeros(whole.len()), b.zeros(whole.len()));
    b.lrn_forward(&whole, &lrn.params, &x, &mut y, &mut s);
    for (i, c) in cols.iter_mut().enumerate() {
        let (yc, sc) = c.lrn.as_mut().expect("LRN stage");
        b.slice_rows(rows, COLUMNS * width, i * width, width, &y, yc, false);
        b.slice_rows(rows, COLUMNS * width, i * width, width, &s, sc, false);
    }
}

/// The input gradient of LRN for every held column, from its output gradient.
fn lrn_backward<B: Backend>(b: &B, lrn: &Lrn, cols: &mut [ColumnBufs<B>]) {
    if !lrn.across {
        for c in cols {
            let ColumnBufs {
                y, lrn: l, grads, ..
            } = c;
            let (ly, s) = l.as_ref().expect("LRN stage");
            let g = grads.as_mut().expect("gradients prepared");
            let dl = g.dlrn.as_ref().expect("LRN stage");
            b.lrn_backward(&lrn.geom, &lrn.params, y, ly, s, dl, &mut g.dy);
        }
        return;
    }
    let (whole, width) = lrn.whole();
    let rows = lrn.geom.batch;
    let gather = |parts: Vec<&B::Buf>| gather_rows(b, rows, width, whole.len(), parts);
    let x = gather(cols.iter().map(|c| &c.y).collect());
    let y = gather(
        cols.iter()
            .map(|c| &c.lrn.as_ref().expect("LRN").0)
            .collect(),
    );
    let s = gather(
        cols.iter()
            .map(|c| &c.lrn.as_ref().expect("LRN").1)
            .collect(),
    );
    let d = gather(
        (cols.iter())
            .map(|c| c.grads.as_ref().and_then(|g| g.dlrn.as_ref()).expect("LRN"))
            .collect(),
    );
    let mut dx = b.zeros(whole.len());
    b.lrn_backward(&whole, &lrn.params, &x, &y, &s, &d, &mut dx);
    for (i, c) in cols.iter_mut().enumerate() {
        let dy = &mut c.grads().dy;
        b.slice_rows(rows, COLUMNS * width, i * width, width, &dx, dy, false);
    }
}

/// The columns' `[rows, width]` blocks side by side in a new buffer of `len` values.
fn gather_rows<B: Backend>(
    b: &B,
    rows: usize,
    width: usize,
    len: usize,
    parts: Vec<&B::Buf>,
) -> B::Buf {
    let mut out = b.zeros(len);
    b.concat_rows(rows, &parts, &[width; COLUMNS], &mut out);
    out
}

/// The product of a [`ColumnParallel`] layer: one column's output units over the whole input.
#[derive(Clone, Copy, Debug)]
pub(super) enum Product {
    Conv(ConvGeom),
    Linear(LinearGeom),
}

impl Product {
    fn out_len(&self) -> usize {
        match self {
            Product::Conv(g) => g.out_len(),
            Product::Linear(g) => g.rows * g.out,
        }
    }
}

/// A layer that reads both columns' blocks of its input: conv3 (pool2), fc6 (pool5), fc7 (fc6)
/// and fc8 (fc7); Megatron-LM's column-parallel layer. Its input is all-gathered into
/// `gathered` (which the weight gradients read), and its product taken in two parts
/// ([`InputPart`]): each column's own block first, while the other column's block is still
/// crossing, then the other's. Backward, the input gradient goes first, so that its
/// reduce-scatter travels while the weight gradients are computed.
pub(super) struct ColumnParallel<B: Backend> {
    name: &'static str,
    product: Product,
    relu: bool,
    /// Dropout on the output while training (fc6, fc7).
    dropout: bool,
    /// Per-sample values of one column's block of the input.
    width: usize,
    /// The input, both columns' blocks side by side.
    gathered: B::Buf,
    /// `gather_output` layers (fc8): the output, both columns' halves side by side (the logits).
    output: Option<B::Buf>,
    cols: Vec<ColumnBufs<B>>,
}

impl<B: Backend> ColumnParallel<B> {
    /// The layer with its forward buffers for `columns` held columns; `gather_output` also
    /// gathers its output (fc8: the logits, which every process needs whole).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        b: &B,
        name: &'static str,
        product: Product,
        relu: bool,
        dropout: bool,
        gather_output: bool,
        columns: usize,
    ) -> anyhow::Result<Self> {
        let (batch, in_len) = match product {
            Product::Conv(g) => (g.batch, g.in_len()),
            Product::Linear(g) => (g.rows, g.rows * g.inp),
        };
        let cols = (0..columns)
            .map(|_| {
                Ok(ColumnBufs {
                    y: alloc(b, &format!("{name} output"), batch, product.out_len())?,
                    lrn: None,
                    pool: None,
                    grads: None,
                })
            })
            .collect::<anyhow::Result<_>>()?;
        let what = format!("{name} input (both columns)");
        let gathered = alloc(b, &what, batch, in_len)?;
        let output = match gather_output {
            true => Some(alloc(b, "logits", batch, COLUMNS * product.out_len())?),
            false => None,
        };
        Ok(ColumnParallel {
            name,
            product,
            relu,
            dropout,
            width: in_len / batch / COLUMNS,
            gathered,
            output,
            cols,
        })
    }

    fn batch(&self) -> usize {
        match self.product {
            Product::Conv(g) => g.batch,
            Product::Linear(g) => g.rows,
        }
    }

    /// One column's output units per sample.
    fn out_width(&self) -> usize {
        self.product.out_len() / self.batch()
    }

    /// The gathered output (`gather_output` layers) of the last forward pass.
    pub fn gathered_output(&self) -> Option<&B::Buf> {
        self.output.as_ref()
    }

    /// Starts the all-gather of `x` (the held columns' blocks), computes each column's part
    /// that reads its own block while the other's travels, then waits and adds the parts that
    /// read the other columns' blocks, in column order. Every column adds its parts in that
    /// order whether the other column is held here or not, so one process holding both
    /// columns and two processes holding one each train the same bits.
    pub fn forward(
        &mut self,
        b: &B,
        prof: &mut Profile,
        exchange: &mut dyn ColumnExchange<B>,
        x: Vec<&B::Buf>,
        params: &[Column<B>],
        dropout: Option<&DropoutKeys>,
    ) -> anyhow::Result<()> {
        let (batch, width) = (self.batch(), self.width);
        {
            let _t = prof.time(b, "exchange", Pass::Forward);
            exchange.start_all_gather(b, batch, width, &x)?;
        }
        for (i, p) in params.iter().enumerate() {
            let _t = prof.time(b, self.name, Pass::Forward);
            let (w, bias) = p.weight_and_bias(self.name);
            let y = &mut self.cols[i].y;
            part(
                self.product,
                b,
                &w.value,
                &bias.value,
                p.index,
                x[i],
                y,
                false,
            );
        }
        let remote = {
            let _t = prof.time(b, "exchange", Pass::Forward);
            exchange.finish_all_gather(b, batch, width, &x, &mut self.gathered)?
        };
        let held: Vec<usize> = params.iter().map(|c| c.index).collect();
        let elsewhere: Vec<usize> = (0..COLUMNS).filter(|c| !held.contains(c)).collect();
        anyhow::ensure!(
            remote.len() == elsewhere.len(),
            "the column exchange returned {} blocks for the {} columns held elsewhere",
            remote.len(),
            elsewhere.len()
        );
        for (i, p) in params.iter().enumerate() {
            let _t = prof.time(b, self.name, Pass::Forward);
            let (w, bias) = p.weight_and_bias(self.name);
            let y = &mut self.cols[i].y;
            for from in (0..COLUMNS).filter(|&c| c != p.index) {
                let block = match held.iter().position(|&c| c == from) {
                    Some(j) => x[j],
                    None => {
                        &remote[elsewhere
                            .iter()
                            .position(|&c| c == from)
                            .expect("elsewhere")]
                    }
                };
                part(self.product, b, &w.value, &bias.value, from, block, y, true);
            }
        }
        if self.relu || self.dropout {
            let _t = prof.time(b, self.name, Pass::Forward);
            for (c, p) in self.cols.iter_mut().zip(params) {
                if self.relu {
                    b.relu_forward(&mut c.y);
                }
                if let (true, Some(keys), Product::Linear(g)) =
                    (self.dropout, dropout, self.product)
                {
                    let key = keys.key(self.name, p.index, &g);
                    b.dropout_forward(batch, g.out, keys.p, &key, &mut c.y);
                }
            }
        }
        let out_width = self.out_width();
        if let Some(out) = &mut self.output {
            let _t = prof.time(b, "exchange", Pass::Forward);
            let ys: Vec<&B::Buf> = self.cols.iter().map(|c| &c.y).collect();
            exchange.all_gather(b, batch, out_width, &ys, out)?;
        }
        Ok(())
    }

    /// The first half of the backward pass: the input gradient (each held column's share),
    /// the start of its reduce-scatter, and the weight gradients while the blocks travel.
    /// `doutput` is the gathered output's gradient (`gather_output` layers: the logits').
    /// [`Self::finish_backward`] takes the summed input gradient. `weights` false (a frozen
    /// layer) leaves the weight gradients out; `data` false (nothing below learns) the input
    /// gradient and its exchange.
    #[allow(clippy::too_many_arguments)]
    pub fn start_backward(
        &mut self,
        b: &B,
        prof: &mut Profile,
        exchange: &mut dyn ColumnExchange<B>,
        params: &mut [Column<B>],
        doutput: Option<&B::Buf>,
        dropout: Option<&DropoutKeys>,
        weights: bool,
        data: bool,
    ) -> anyhow::Result<()> {
        let (batch, out) = (self.batch(), self.out_width());
        for (c, p) in self.cols.iter_mut().zip(params.iter()) {
            let _t = prof.time(b, self.name, Pass::Backward);
            let ColumnBufs { y, grads, .. } = c;
            let g = grads.as_mut().expect("gradients prepared");
            if let Some(d) = doutput {
                b.slice_rows(
                    batch,
                    COLUMNS * out,
                    p.index * out,
                    out,
                    d,
                    &mut g.dy,
                    false,
                );
            }
            if let (true, Some(keys), Product::Linear(lg)) = (self.dropout, dropout, self.product) {
                let key = keys.key(self.name, p.index, &lg);
                b.dropout_backward(batch, lg.out, keys.p, &key, &mut g.dy);
            }
            if self.relu {
                // Dropout keeps the sign of what it keeps, and where it dropped the gradient is
                // already zero: the ReLU's mask can be read off the post-dropout output.
                b.relu_backward(y, &mut g.dy);
            }
            if !data {
                continue;
            }
            let (w, _) = p.weight_and_bias(self.name);
            let dgathered = g.dgathered.as_mut().expect("column-parallel layer");
            match &self.product {
                Product::Conv(cg) => b.conv2d_backward_data(cg, &w.value, &g.dy, dgathered),
                Product::Linear(lg) => b.linear_backward_data(lg, &w.value, &g.dy, dgathered),
            }
        }
        if data {
            let _t = prof.time(b, "exchange", Pass::Backward);
            let full = self.dgathered();
            exchange.start_reduce_scatter(b, batch, self.width, &full)?;
        }
        if !weights {
            return Ok(());
        }
        for (c, p) in self.cols.iter_mut().zip(params.iter_mut()) {
            let _t = prof.time(b, self.name, Pass::Backward);
            let (w, bias) = p.weight_and_bias_mut(self.name);
            let dy = &c.grads().dy;
            match &self.product {
                Product::Conv(cg) => {
                    let x = &self.gathered;
                    b.conv2d_backward(cg, x, &w.value, dy, None, &mut w.grad, &mut bias.grad)
                }
                Product::Linear(lg) => {
                    let x = &self.gathered;
                    b.linear_backward(lg, x, &w.value, dy, None, &mut w.grad, &mut bias.grad)
                }
            }
        }
        Ok(())
    }

    /// Waits for the reduce-scatter that [`Self::start_backward`] started and writes each held
    /// column's summed input gradient into `dx` (the previous layer's output gradients).
    pub fn finish_backward(
        &mut self,
        b: &B,
        prof: &mut Profile,
        exchange: &mut dyn ColumnExchange<B>,
        mut dx: Vec<&mut B::Buf>,
    ) -> anyhow::Result<()> {
        let _t = prof.time(b, "exchange", Pass::Backward);
        let (batch, width) = (self.batch(), self.width);
        let full = self.dgathered();
        exchange.finish_reduce_scatter(b, batch, width, &full, &mut dx)
    }

    fn dgathered(&self) -> Vec<&B::Buf> {
        (self.cols.iter())
            .map(|c| {
                let g = c.grads.as_ref().expect("gradients prepared");
                g.dgathered.as_ref().expect("column-parallel layer")
            })
            .collect()
    }
}

/// `y = part + bias`, or `y += part` when `accumulate`: the part of the product that reads
/// column `from`'s block `x`.
#[allow(clippy::too_many_arguments)]
fn part<B: Backend>(
    product: Product,
    b: &B,
    w: &B::Buf,
    bias: &B::Buf,
    from: usize,
    x: &B::Buf,
    y: &mut B::Buf,
    acc: bool,
) {
    match product {
        Product::Conv(g) => {
            let gp = ConvGeom {
                in_c: g.in_c / COLUMNS,
                ..g
            };
            let part = InputPart {
                first: from * gp.in_c,
                total: COLUMNS * gp.in_c,
            };
            b.conv2d_forward_part(&gp, part, x, w, bias, y, acc)
        }
        Product::Linear(g) => {
            let gp = LinearGeom {
                inp: g.inp / COLUMNS,
                ..g
            };
            let part = InputPart {
                first: from * gp.inp,
                total: COLUMNS * gp.inp,
            };
            b.linear_forward_part(&gp, part, x, w, bias, y, acc)
        }
    }
}

impl<B: Backend> Layer<B> for ColumnParallel<B> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn columns(&self) -> &[ColumnBufs<B>] {
        &self.cols
    }
    fn columns_mut(&mut self) -> &mut [ColumnBufs<B>] {
        &mut self.cols
    }
    fn alloc_grads(&mut self, b: &B, batch: usize) -> anyhow::Result<()> {
        let in_len = b.buf_len(&self.gathered);
        for c in &mut self.cols {
            c.grads = Some(ColumnGrads {
                dy: alloc(
                    b,
                    &format!("{} gradient", self.name),
                    batch,
                    self.product.out_len(),
                )?,
                dlrn: None,
                dpool: None,
                dgathered: Some(alloc(
                    b,
                    &format!("{} input gradient", self.name),
                    batch,
                    in_len,
                )?),
            });
        }
        Ok(())
    }
    fn shared_bytes(&self, b: &B) -> usize {
        4 * (b.buf_len(&self.gathered) + self.output.as_ref().map_or(0, |o| b.buf_len(o)))
    }
}
