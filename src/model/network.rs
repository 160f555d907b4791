//! The two-column network: forward, backward and the SGD step, over any backend and any split
//! of the columns between processes.
//!
//! Each stage between two exchange points runs column by column on the columns this process
//! holds; at the exchange points the [`ColumnExchange`] gathers the halves (forward) or sums and
//! scatters the gradients (backward). This is Megatron-LM's column-parallel layer: every layer
//! that reads "both" columns is an all-gather of its input followed by a layer that computes
//! only its own block of output units. That layer's forward product is taken in two parts of
//! its input ([`ReadsBoth`]), so that the part reading the column's own block runs while the
//! other column's block is on its way.

use super::config::{
    NetConfig, Sides, COLUMNS, CONV_KERNEL, CONV_PAD, CONV_STRIDE, POOL_SIZE, POOL_STRIDE,
};
use super::params::{init_column, Param};
use crate::backend::{
    rng, Backend, ConvGeom, DropoutKey, InputPart, LinearGeom, LrnParams, OutOfMemory, PlaneGeom,
    PoolGeom, SgdParams,
};
use crate::comm::ColumnExchange;
use std::time::{Duration, Instant};

/// Training (dropout on, keyed by the step) or evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train { step: u64 },
    Eval,
}

/// Where the time of forward and backward passes goes, per layer (the benchmark's table).
#[derive(Clone, Debug, Default)]
pub struct Profile {
    /// (layer, forward, backward), in the order layers first ran.
    pub layers: Vec<(&'static str, Duration, Duration)>,
    /// Wait for the backend at the end of every layer. A device queues its ops, so without
    /// this a layer's time is the time to queue it, and the wait lands on whichever layer
    /// next reads a result on the host; with it, each layer's time is its own, at the cost of
    /// the waits (the benchmark times its steps without, then profiles a few with).
    pub synchronize: bool,
}

impl Profile {
    fn add<B: Backend>(&mut self, b: &B, layer: &'static str, backward: bool, since: Instant) {
        if self.synchronize {
            b.synchronize();
        }
        let d = since.elapsed();
        let entry = match self.layers.iter_mut().find(|e| e.0 == layer) {
            Some(e) => e,
            None => {
                self.layers.push((layer, Duration::ZERO, Duration::ZERO));
                self.layers.last_mut().unwrap()
            }
        };
        if backward {
            entry.2 += d
        } else {
            entry.1 += d
        }
    }
}

/// Geometry of every op of one column for a batch size.
#[derive(Clone, Copy, Debug)]
struct Geoms {
    batch: usize,
    conv: [ConvGeom; 5],
    lrn: [PlaneGeom; 2],
    pool: [PoolGeom; 3],
    fc: [LinearGeom; 3],
}

impl Geoms {
    fn new(cfg: &NetConfig, s: &Sides, batch: usize) -> Self {
        let h = |n: usize| n / COLUMNS;
        let c = cfg.conv_channels;
        let conv = |i: usize, in_c: usize, side: usize, out_c: usize| ConvGeom {
            batch,
            in_c,
            in_h: side,
            in_w: side,
            out_c,
            kernel: CONV_KERNEL[i],
            stride: CONV_STRIDE[i],
            pad: CONV_PAD[i],
            groups: 1,
        };
        let pool = |channels: usize, side: usize| PoolGeom {
            batch,
            channels,
            in_h: side,
            in_w: side,
            size: POOL_SIZE,
            stride: POOL_STRIDE,
        };
        Geoms {
            batch,
            conv: [
                conv(0, cfg.in_channels, s.input, h(c[0])),
                conv(1, h(c[0]), s.pool1, h(c[1])),
                conv(2, c[1], s.pool2, h(c[2])),
                conv(3, h(c[2]), s.conv3, h(c[3])),
                conv(4, h(c[3]), s.conv3, h(c[4])),
            ],
            lrn: [
                PlaneGeom {
                    batch,
                    channels: h(c[0]),
                    plane: s.conv1 * s.conv1,
                },
                PlaneGeom {
                    batch,
                    channels: h(c[1]),
                    plane: s.conv2 * s.conv2,
                },
            ],
            pool: [
                pool(h(c[0]), s.conv1),
                pool(h(c[1]), s.conv2),
                pool(h(c[4]), s.conv3),
            ],
            fc: [
                LinearGeom {
                    rows: batch,
                    inp: cfg.fc6_inputs(s),
                    out: h(cfg.fc_widths[0]),
                },
                LinearGeom {
                    rows: batch,
                    inp: cfg.fc_widths[0],
                    out: h(cfg.fc_widths[1]),
                },
                LinearGeom {
                    rows: batch,
                    inp: cfg.fc_widths[1],
                    out: h(cfg.classes),
                },
            ],
        }
    }

    /// conv3's part that reads one column's pool2 maps ([`ReadsBoth`]).
    fn conv3_part(&self) -> ConvGeom {
        ConvGeom {
            in_c: self.conv[2].in_c / COLUMNS,
            ..self.conv[2]
        }
    }

    /// Fully connected layer `i`'s part that reads one column's features.
    fn fc_part(&self, i: usize) -> LinearGeom {
        LinearGeom {
            inp: self.fc[i].inp / COLUMNS,
            ..self.fc[i]
        }
    }

    /// Per-sample widths of the exchanged tensors (one column's half): pool2, pool5, fc6, fc7, fc8.
    fn exchange_widths(&self) -> [usize; 5] {
        let p = |g: &PoolGeom| g.channels * g.out_h() * g.out_w();
        [
            p(&self.pool[1]),
            p(&self.pool[2]),
            self.fc[0].out,
            self.fc[1].out,
            self.fc[2].out,
        ]
    }
}

/// Features per sample that one column contributes at each exchange point (pool2, pool5, fc6,
/// fc7, logits).
pub fn exchange_widths(cfg: &NetConfig) -> anyhow::Result<[usize; 5]> {
    let sides = cfg.validate()?;
    Ok(Geoms::new(cfg, &sides, 1).exchange_widths())
}

/// The largest batch one process runs (larger ones are split over replicas or steps).
pub const MAX_BATCH: usize = 1 << 16;

/// Multiply-adds of one image's forward pass through the whole network (both columns).
pub fn forward_macs_per_image(cfg: &NetConfig) -> anyhow::Result<u64> {
    let g = Geoms::new(cfg, &cfg.validate()?, 1);
    let conv: usize = g.conv.iter().map(|c| c.forward_macs()).sum();
    let fc: usize = g.fc.iter().map(|f| f.inp * f.out).sum();
    Ok((COLUMNS * (conv + fc)) as u64)
}

/// FLOPs of one image's training step: forward, input gradients and weight gradients (3x the
/// forward's multiply-adds, less conv1's input gradient, which nothing needs), 2 FLOPs each.
pub fn train_flops_per_image(cfg: &NetConfig) -> anyhow::Result<u64> {
    let g = Geoms::new(cfg, &cfg.validate()?, 1);
    let conv1 = (COLUMNS * g.conv[0].forward_macs()) as u64;
    Ok(2 * (3 * forward_macs_per_image(cfg)? - conv1))
}

/// What one column's forward pass keeps for its backward pass.
struct ColumnActs<B: Backend> {
    /// conv1 after ReLU, its LRN, the LRN's scale, pool1; the same for conv2.
    a1: B::Buf,
    l1: B::Buf,
    s1: B::Buf,
    p1: B::Buf,
    a2: B::Buf,
    l2: B::Buf,
    s2: B::Buf,
    p2: B::Buf,
    /// conv3..conv5 after ReLU, pool5.
    a3: B::Buf,
    a4: B::Buf,
    a5: B::Buf,
    p5: B::Buf,
    /// fc6, fc7 after ReLU and dropout; fc8's half of the logits.
    h6: B::Buf,
    h7: B::Buf,
    z8: B::Buf,
}

/// The gathered tensors: the inputs of conv3, fc6, fc7, fc8 and the logits.
struct Gathered<B: Backend> {
    g2: B::Buf,
    g5: B::Buf,
    g6: B::Buf,
    g7: B::Buf,
    logits: B::Buf,
}

/// One column's gradient buffers, kept between steps: every backward op overwrites its output,
/// so they need no clearing, and reusing them spares the allocator and the page faults of
/// several hundred MB per step.
struct ColumnGrads<B: Backend> {
    /// Gradients of this column's own tensors (same shapes as in [`ColumnActs`]).
    dz8: B::Buf,
    dh7: B::Buf,
    dh6: B::Buf,
    dp5: B::Buf,
    da5: B::Buf,
    da4: B::Buf,
    da3: B::Buf,
    dp2: B::Buf,
    dl2: B::Buf,
    da2: B::Buf,
    dp1: B::Buf,
    dl1: B::Buf,
    da1: B::Buf,
    /// This column's contribution to the gradients of the gathered tensors, before the
    /// reduce-scatter sums the columns' contributions.
    dg7: B::Buf,
    dg6: B::Buf,
    dg5: B::Buf,
    dg2: B::Buf,
}

/// What to change when a batch does not fit.
/// Bytes for people: MiB below a GiB, GiB above.
fn human_bytes(b: u64) -> String {
    if b < 1 << 30 {
        format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
    } else {
        format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64)
    }
}

const TOO_LARGE: &str = "lower --batch, or spread the job over more devices (--replicas)";

/// A buffer of the network's, or an error naming what did not fit and at which batch size.
fn alloc<B: Backend>(b: &B, what: &str, batch: usize, len: usize) -> anyhow::Result<B::Buf> {
    b.try_zeros(len).map_err(|e| {
        anyhow::anyhow!(
            "the {what} ({} MiB) at batch {batch} does not fit: {e:#}; {TOO_LARGE}",
            (4 * len) >> 20
        )
    })
}

/// Readies the convolutions' working memory (forward, or forward and backward) for `g`'s
/// batch, or names the layer that did not fit. conv3's forward pass runs in parts.
fn prepare_convolutions<B: Backend>(b: &B, g: &Geoms, backward: bool) -> anyhow::Result<()> {
    let whole = g
        .conv
        .iter()
        .enumerate()
        .map(|(i, c)| (i + 1, *c, backward));
    for (layer, conv, backward) in whole.chain([(3, g.conv3_part(), false)]) {
        b.prepare_convolution(&conv, backward).map_err(|e| {
            let batch = g.batch;
            if e.downcast_ref::<OutOfMemory>().is_some() {
                anyhow::anyhow!(
                    "conv{layer}'s working memory at batch {batch} does not fit: {e:#}; {TOO_LARGE}"
                )
            } else {
                anyhow::anyhow!("preparing conv{layer} at batch {batch}: {e:#}")
            }
        })?;
    }
    Ok(())
}

impl<B: Backend> ColumnGrads<B> {
    fn new(b: &B, g: &Geoms) -> anyhow::Result<Self> {
        let w = g.exchange_widths();
        let batch = g.batch;
        Ok(ColumnGrads {
            dz8: alloc(b, "fc8 gradient", batch, batch * w[4])?,
            dh7: alloc(b, "fc7 gradient", batch, batch * w[3])?,
            dh6: alloc(b, "fc6 gradient", batch, batch * w[2])?,
            dp5: alloc(b, "pool5 gradient", batch, batch * w[1])?,
            da5: alloc(b, "conv5 gradient", batch, g.conv[4].out_len())?,
            da4: alloc(b, "conv4 gradient", batch, g.conv[3].out_len())?,
            da3: alloc(b, "conv3 gradient", batch, g.conv[2].out_len())?,
            dp2: alloc(b, "pool2 gradient", batch, batch * w[0])?,
            dl2: alloc(b, "lrn2 gradient", batch, g.lrn[1].len())?,
            da2: alloc(b, "conv2 gradient", batch, g.lrn[1].len())?,
            dp1: alloc(b, "pool1 gradient", batch, g.pool[0].out_len())?,
            dl1: alloc(b, "lrn1 gradient", batch, g.lrn[0].len())?,
            da1: alloc(b, "conv1 gradient", batch, g.lrn[0].len())?,
            dg7: alloc(b, "fc8 input gradient", batch, batch * g.fc[2].inp)?,
            dg6: alloc(b, "fc7 input gradient", batch, batch * g.fc[1].inp)?,
            dg5: alloc(b, "fc6 input gradient", batch, batch * g.fc[0].inp)?,
            dg2: alloc(b, "conv3 input gradient", batch, g.conv[2].in_len())?,
        })
    }

    /// Output and input gradient of LRN `i`.
    fn lrn_mut(&mut self, i: usize) -> (&mut B::Buf, &mut B::Buf) {
        if i == 0 {
            (&mut self.dl1, &mut self.da1)
        } else {
            (&mut self.dl2, &mut self.da2)
        }
    }

    fn bufs(&self) -> [&B::Buf; 17] {
        [
            &self.dz8, &self.dh7, &self.dh6, &self.dp5, &self.da5, &self.da4, &self.da3, &self.dp2,
            &self.dl2, &self.da2, &self.dp1, &self.dl1, &self.da1, &self.dg7, &self.dg6, &self.dg5,
            &self.dg2,
        ]
    }
}

/// One column of the network: its parameters and what its last forward pass kept.
pub struct Column<B: Backend> {
    pub index: usize,
    /// In [`super::params::LAYERS`] order, weight then bias.
    pub params: Vec<Param<B>>,
    acts: Option<ColumnActs<B>>,
}

impl<B: Backend> ColumnActs<B> {
    /// Input, output and scale of LRN `i` (0: after conv1, 1: after conv2).
    fn lrn(&self, i: usize) -> (&B::Buf, &B::Buf, &B::Buf) {
        if i == 0 {
            (&self.a1, &self.l1, &self.s1)
        } else {
            (&self.a2, &self.l2, &self.s2)
        }
    }
    fn lrn_mut(&mut self, i: usize) -> (&B::Buf, &mut B::Buf, &mut B::Buf) {
        if i == 0 {
            (&self.a1, &mut self.l1, &mut self.s1)
        } else {
            (&self.a2, &mut self.l2, &mut self.s2)
        }
    }
}

/// LRN `i` on every held column: each column alone (the paper), or over the whole layer's
/// channels (`lrn_across_columns`, only when this process holds both columns).
fn lrn_forward_all<B: Backend>(
    b: &B,
    g: &Geoms,
    p: &LrnParams,
    across: bool,
    i: usize,
    cols: &mut [Column<B>],
) {
    if !across {
        for col in cols {
            let (x, y, s) = col.acts.as_mut().expect("prepared").lrn_mut(i);
            b.lrn_forward(&g.lrn[i], p, x, y, s);
        }
        return;
    }
    let (half, whole, width) = whole_layer(g, i);
    let gather = |pick: &dyn Fn(&ColumnActs<B>) -> &B::Buf| {
        let parts: Vec<&B::Buf> = cols
            .iter()
            .map(|c| pick(c.acts.as_ref().expect("prepared")))
            .collect();
        let mut out = b.zeros(whole.len());
        b.concat_rows(half.batch, &parts, &[width; COLUMNS], &mut out);
        out
    };
    let x = gather(&|a| a.lrn(i).0);
    let (mut y, mut s) = (b.zeros(whole.len()), b.zeros(whole.len()));
    b.lrn_forward(&whole, p, &x, &mut y, &mut s);
    for (c, col) in cols.iter_mut().enumerate() {
        let (_, yc, sc) = col.acts.as_mut().expect("prepared").lrn_mut(i);
        b.slice_rows(half.batch, COLUMNS * width, c * width, width, &y, yc, false);
        b.slice_rows(half.batch, COLUMNS * width, c * width, width, &s, sc, false);
    }
}

/// The input gradient of LRN `i` for every held column, from the output gradient in its
/// workspace (`dl1`/`dl2` into `da1`/`da2`).
fn lrn_backward_all<B: Backend>(
    b: &B,
    g: &Geoms,
    p: &LrnParams,
    across: bool,
    i: usize,
    cols: &[Column<B>],
    ws: &mut [ColumnGrads<B>],
) {
    if !across {
        for (col, w) in cols.iter().zip(ws.iter_mut()) {
            let (x, y, s) = col.acts.as_ref().expect("forward ran").lrn(i);
            let (dy, dx) = w.lrn_mut(i);
            b.lrn_backward(&g.lrn[i], p, x, y, s, dy, dx);
        }
        return;
    }
    let (half, whole, width) = whole_layer(g, i);
    let gather = |parts: Vec<&B::Buf>| {
        let mut out = b.zeros(whole.len());
        b.concat_rows(half.batch, &parts, &[width; COLUMNS], &mut out);
        out
    };
    let acts: Vec<(&B::Buf, &B::Buf, &B::Buf)> = cols
        .iter()
        .map(|c| c.acts.as_ref().expect("forward ran").lrn(i))
        .collect();
    let x = gather(acts.iter().map(|a| a.0).collect());
    let y = gather(acts.iter().map(|a| a.1).collect());
    let s = gather(acts.iter().map(|a| a.2).collect());
    let d = gather(ws.iter_mut().map(|w| &*w.lrn_mut(i).0).collect());
    let mut dx = b.zeros(whole.len());
    b.lrn_backward(&whole, p, &x, &y, &s, &d, &mut dx);
    for (c, w) in ws.iter_mut().enumerate() {
        b.slice_rows(
            half.batch,
            COLUMNS * width,
            c * width,
            width,
            &dx,
            w.lrn_mut(i).1,
            false,
        );
    }
}

/// Starts summing, for each held column's half, the gradients that the columns computed for a
/// gathered tensor (`pick`: the workspace's full-width gradient); [`finish_reduce_scatter`]
/// takes the sums. In between, the caller computes the layer's weight gradients.
fn start_reduce_scatter<B: Backend>(
    b: &B,
    exchange: &mut dyn ColumnExchange<B>,
    rows: usize,
    width: usize,
    ws: &[ColumnGrads<B>],
    pick: impl Fn(&ColumnGrads<B>) -> &B::Buf,
) -> anyhow::Result<()> {
    let full: Vec<&B::Buf> = ws.iter().map(pick).collect();
    exchange.start_reduce_scatter(b, rows, width, &full)
}

/// The sums of [`start_reduce_scatter`]: `pick` names the same full-width gradient and the
/// half it lands in.
fn finish_reduce_scatter<B: Backend>(
    b: &B,
    exchange: &mut dyn ColumnExchange<B>,
    rows: usize,
    width: usize,
    ws: &mut [ColumnGrads<B>],
    pick: impl Fn(&mut ColumnGrads<B>) -> (&B::Buf, &mut B::Buf),
) -> anyhow::Result<()> {
    let (full, mut halves): (Vec<&B::Buf>, Vec<&mut B::Buf>) = ws.iter_mut().map(pick).unzip();
    exchange.finish_reduce_scatter(b, rows, width, &full, &mut halves)
}

/// Hands the finished gradients of `layers` (ascending, every held column's) to the other
/// replicas, to be averaged while the backward pass goes on below them (data parallelism).
fn submit_bucket<B: Backend>(
    b: &B,
    columns: &[Column<B>],
    layers: &'static [usize],
    group: Option<&mut crate::comm::OverlappedReduce>,
    buckets: &mut Vec<&'static [usize]>,
    prof: &mut Profile,
) -> anyhow::Result<()> {
    let Some(group) = group else {
        return Ok(());
    };
    let t = Instant::now();
    let mut host = Vec::new();
    for col in columns {
        for &layer in layers {
            for p in &col.params[2 * layer..2 * layer + 2] {
                host.extend(b.download(&p.grad));
            }
        }
    }
    group.submit(host)?;
    buckets.push(layers);
    prof.add(b, "replicas", true, t);
    Ok(())
}

/// The weight and bias of parameter layer `layer` (0 = conv1 .. 7 = fc8).
fn weight_and_bias<B: Backend>(
    params: &mut [Param<B>],
    layer: usize,
) -> (&mut Param<B>, &mut Param<B>) {
    let (w, rest) = params[2 * layer..].split_at_mut(1);
    (&mut w[0], &mut rest[0])
}

/// One column's LRN geometry, the whole layer's, and one column's values per image.
fn whole_layer(g: &Geoms, i: usize) -> (PlaneGeom, PlaneGeom, usize) {
    let half = g.lrn[i];
    (
        half,
        PlaneGeom {
            channels: half.channels * COLUMNS,
            ..half
        },
        half.channels * half.plane,
    )
}

/// The network as one process holds it: one or both columns, and the exchange to the rest.
pub struct Network<B: Backend> {
    pub cfg: NetConfig,
    pub sides: Sides,
    pub backend: B,
    pub columns: Vec<Column<B>>,
    exchange: Box<dyn ColumnExchange<B>>,
    seed: u64,
    /// Global index of this process's first sample in the global batch (data parallelism).
    pub sample_offset: u64,
    /// The other replicas of this process's columns, whose gradients are averaged with these
    /// while the backward pass goes on.
    replicas: Option<crate::comm::OverlappedReduce>,
    /// The layers of each gradient bucket being averaged, in the order they were submitted.
    buckets: Vec<&'static [usize]>,
    geoms: Option<Geoms>,
    gathered: Option<Gathered<B>>,
    /// One gradient workspace per held column.
    grads: Option<Vec<ColumnGrads<B>>>,
    /// The mode of the last forward pass: the backward pass must undo the same dropout.
    last_mode: Option<Mode>,
    /// Processes whose buffers come out of the same memory as this one's, itself included
    /// ([`Network::share_memory`]).
    memory_sharers: usize,
    pub profile: Profile,
}

/// A layer that reads both columns' blocks of its input: conv3 (pool2), fc6 (pool5), fc7 (fc6)
/// and fc8 (fc7). It is computed in two parts ([`InputPart`]): each column's own block first,
/// while the other column's block is still crossing, then the other's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReadsBoth {
    Conv3,
    Fc6,
    Fc7,
    Fc8,
}

impl ReadsBoth {
    fn name(self) -> &'static str {
        match self {
            ReadsBoth::Conv3 => "conv3",
            ReadsBoth::Fc6 => "fc6",
            ReadsBoth::Fc7 => "fc7",
            ReadsBoth::Fc8 => "fc8",
        }
    }

    /// The layer's weight in a column's parameters (its bias follows).
    fn param(self) -> usize {
        match self {
            ReadsBoth::Conv3 => 4,
            ReadsBoth::Fc6 => 10,
            ReadsBoth::Fc7 => 12,
            ReadsBoth::Fc8 => 14,
        }
    }

    /// A column's block of the layer's input.
    fn input<B: Backend>(self, a: &ColumnActs<B>) -> &B::Buf {
        match self {
            ReadsBoth::Conv3 => &a.p2,
            ReadsBoth::Fc6 => &a.p5,
            ReadsBoth::Fc7 => &a.h6,
            ReadsBoth::Fc8 => &a.h7,
        }
    }

    /// A column's block of the layer's input, and its output.
    fn input_output<B: Backend>(self, a: &mut ColumnActs<B>) -> (&B::Buf, &mut B::Buf) {
        match self {
            ReadsBoth::Conv3 => (&a.p2, &mut a.a3),
            ReadsBoth::Fc6 => (&a.p5, &mut a.h6),
            ReadsBoth::Fc7 => (&a.h6, &mut a.h7),
            ReadsBoth::Fc8 => (&a.h7, &mut a.z8),
        }
    }

    fn output<B: Backend>(self, a: &mut ColumnActs<B>) -> &mut B::Buf {
        self.input_output(a).1
    }

    /// `y = part + b`, or `y += part` when `accumulate`: the part of the layer of column
    /// `params` that reads column `from`'s block `x`.
    #[allow(clippy::too_many_arguments)]
    fn part<B: Backend>(
        self,
        b: &B,
        g: &Geoms,
        params: &[Param<B>],
        from: usize,
        x: &B::Buf,
        y: &mut B::Buf,
        accumulate: bool,
    ) {
        let (w, bias) = (&params[self.param()].value, &params[self.param() + 1].value);
        let fc = match self {
            ReadsBoth::Conv3 => None,
            ReadsBoth::Fc6 => Some(0),
            ReadsBoth::Fc7 => Some(1),
            ReadsBoth::Fc8 => Some(2),
        };
        match fc {
            None => {
                let gp = g.conv3_part();
                let part = InputPart {
                    first: from * gp.in_c,
                    total: COLUMNS * gp.in_c,
                };
                b.conv2d_forward_part(&gp, part, x, w, bias, y, accumulate)
            }
            Some(fc) => {
                let gp = g.fc_part(fc);
                let part = InputPart {
                    first: from * gp.inp,
                    total: COLUMNS * gp.inp,
                };
                b.linear_forward_part(&gp, part, x, w, bias, y, accumulate)
            }
        }
    }
}

/// Runs a [`ReadsBoth`] layer of every held column, with the all-gather of its input into
/// `gathered` (which the backward pass reads): starts the gather, computes each column's part
/// that reads its own block while the other column's block travels, then waits for the
/// gather and adds the parts that read the other columns' blocks, in column order. Every
/// column adds its parts in that order whether the other column is held here or not, so one
/// process holding both columns and two processes holding one each train the same bits.
#[allow(clippy::too_many_arguments)]
fn reads_both<B: Backend>(
    b: &B,
    g: &Geoms,
    layer: ReadsBoth,
    width: usize,
    exchange: &mut dyn ColumnExchange<B>,
    columns: &mut [Column<B>],
    gathered: &mut B::Buf,
    prof: &mut Profile,
) -> anyhow::Result<()> {
    let t = Instant::now();
    let blocks: Vec<&B::Buf> = columns
        .iter()
        .map(|c| layer.input(c.acts.as_ref().expect("prepared")))
        .collect();
    exchange.start_all_gather(b, g.batch, width, &blocks)?;
    prof.add(b, "exchange", false, t);

    for col in columns.iter_mut() {
        let t = Instant::now();
        let (x, y) = layer.input_output(col.acts.as_mut().expect("prepared"));
        layer.part(b, g, &col.params, col.index, x, y, false);
        prof.add(b, layer.name(), false, t);
    }

    let t = Instant::now();
    let blocks: Vec<&B::Buf> = columns
        .iter()
        .map(|c| layer.input(c.acts.as_ref().expect("prepared")))
        .collect();
    let remote = exchange.finish_all_gather(b, g.batch, width, &blocks, gathered)?;
    prof.add(b, "exchange", false, t);
    let held: Vec<usize> = columns.iter().map(|c| c.index).collect();
    let elsewhere: Vec<usize> = (0..COLUMNS).filter(|c| !held.contains(c)).collect();
    anyhow::ensure!(
        remote.len() == elsewhere.len(),
        "the column exchange returned {} blocks for the {} columns held elsewhere",
        remote.len(),
        elsewhere.len()
    );

    for i in 0..columns.len() {
        let t = Instant::now();
        let (before, rest) = columns.split_at_mut(i);
        let (me, after) = rest.split_first_mut().expect("in range");
        for from in (0..COLUMNS).filter(|&c| c != me.index) {
            let x = match before.iter().chain(after.iter()).find(|c| c.index == from) {
                Some(c) => layer.input(c.acts.as_ref().expect("prepared")),
                None => {
                    &remote[elsewhere
                        .iter()
                        .position(|&c| c == from)
                        .expect("elsewhere")]
                }
            };
            let y = layer.output(me.acts.as_mut().expect("prepared"));
            layer.part(b, g, &me.params, from, x, y, true);
        }
        prof.add(b, layer.name(), false, t);
    }
    Ok(())
}

fn dropout_key(
    seed: u64,
    layer: &str,
    step: u64,
    row_offset: u64,
    column: usize,
    g: &LinearGeom,
) -> DropoutKey {
    DropoutKey {
        seed: rng::subkey(rng::key(seed, layer), step),
        row_offset,
        col_offset: (column * g.out) as u64,
        total_cols: (COLUMNS * g.out) as u64,
    }
}

impl<B: Backend> Network<B> {
    /// A network holding the columns the exchange names, initialised from `seed` as in the paper.
    pub fn new(
        cfg: NetConfig,
        backend: B,
        exchange: Box<dyn ColumnExchange<B>>,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let sides = cfg.validate()?;
        anyhow::ensure!(
            !cfg.lrn_across_columns || exchange.local_columns().len() == COLUMNS,
            "invalid network configuration: lrn_across_columns: normalising across the columns needs both columns in one \
             process (the columns exchange nothing before conv3); set it to false or hold both columns here"
        );
        let columns = exchange
            .local_columns()
            .iter()
            .map(|&index| Column {
                index,
                params: init_column(&backend, &cfg, &sides, index, seed),
                acts: None,
            })
            .collect();
        Ok(Network {
            cfg,
            sides,
            backend,
            columns,
            exchange,
            seed,
            sample_offset: 0,
            replicas: None,
            buckets: Vec::new(),
            geoms: None,
            gathered: None,
            grads: None,
            last_mode: None,
            memory_sharers: 1,
            profile: Profile::default(),
        })
    }

    /// Values of the input: `[batch, in_channels, input_size, input_size]`.
    pub fn input_len(&self, batch: usize) -> usize {
        batch * self.cfg.in_channels * self.sides.input * self.sides.input
    }

    /// Allocates everything a step at `batch` needs (activations, gradients, the
    /// convolutions' working memory), or says which layer did not fit: a caller may ask
    /// before it spends time on the first batch's data. The first step does it otherwise.
    pub fn reserve(&mut self, batch: usize) -> anyhow::Result<()> {
        anyhow::ensure!(
            batch > 0 && batch <= MAX_BATCH,
            "batch {batch} is outside the supported 1..={MAX_BATCH}"
        );
        self.prepare(batch, true).map(drop)
    }

    /// The geometry at `batch`, with the forward pass's buffers allocated and, with
    /// `backward`, the backward pass's too (evaluation never allocates gradients).
    fn prepare(&mut self, batch: usize, backward: bool) -> anyhow::Result<Geoms> {
        // The buffers' bytes that this call keeps; it adds the rest.
        let (g, kept) = match self.geoms.filter(|g| g.batch == batch) {
            Some(g) if !backward || self.grads.is_some() => return Ok(g),
            Some(g) => (g, self.buffer_bytes()),
            None => (self.prepare_forward(batch)?, 0),
        };
        if backward {
            prepare_convolutions(&self.backend, &g, true)?;
            self.grads = Some(
                self.columns
                    .iter()
                    .map(|_| ColumnGrads::new(&self.backend, &g))
                    .collect::<anyhow::Result<_>>()?,
            );
        }
        self.check_memory(batch, kept)?;
        Ok(g)
    }

    /// Refuses the buffers just allocated (all but `kept` bytes of them) where the backend
    /// knows that they cannot all be backed by memory (the CPU's are mapped lazily: without
    /// this, the process would be killed at the first step that writes them). Drops every
    /// buffer then, so that a later call starts over.
    fn check_memory(&mut self, batch: usize, kept: usize) -> anyhow::Result<()> {
        let Some(available) = self.backend.memory_available() else {
            return Ok(());
        };
        // Processes on the same memory check at about the same time, before any of them has
        // touched its buffers (which the system maps lazily): each counts on its share only.
        let share = available / self.memory_sharers as u64;
        let added = (self.buffer_bytes() - kept) as u64;
        if added <= share {
            return Ok(());
        }
        self.drop_buffers();
        let what = if kept > 0 {
            "the network's gradients"
        } else {
            "the network's buffers (activations, and gradients for training)"
        };
        let room = if self.memory_sharers > 1 {
            format!(
                "this worker's share is {} ({} of memory available here, the system's or its \
                 container's limit, shared by the job's {} workers on this machine)",
                human_bytes(share),
                human_bytes(available),
                self.memory_sharers
            )
        } else {
            format!(
                "{} of memory are available here (the system's, or its container's limit)",
                human_bytes(available)
            )
        };
        anyhow::bail!(
            "{what} at batch {batch} need {}, and {room}: {TOO_LARGE}",
            human_bytes(added)
        )
    }

    /// Declares that `processes` processes (this one included) take their buffers from the
    /// same memory, as CPU workers on one host do: the memory check before the first step
    /// gives this one its share. 1 by default.
    pub fn share_memory(&mut self, processes: usize) {
        self.memory_sharers = processes.max(1);
    }

    /// Frees every buffer of a batch size: the next `prepare` starts over.
    fn drop_buffers(&mut self) {
        self.geoms = None;
        self.grads = None;
        self.gathered = None;
        for col in &mut self.columns {
            col.acts = None;
        }
    }

    /// Allocates the forward pass's buffers at `batch`, dropping those of another batch size
    /// first (so that the two are never held at once, and a failure leaves nothing half-made:
    /// the next call starts over).
    fn prepare_forward(&mut self, batch: usize) -> anyhow::Result<Geoms> {
        self.drop_buffers();
        let g = Geoms::new(&self.cfg, &self.sides, batch);
        let b = &self.backend;
        prepare_convolutions(b, &g, false)?;
        for col in &mut self.columns {
            col.acts = Some(ColumnActs {
                a1: alloc(b, "conv1 output", batch, g.conv[0].out_len())?,
                l1: alloc(b, "lrn1 output", batch, g.lrn[0].len())?,
                s1: alloc(b, "lrn1 scale", batch, g.lrn[0].len())?,
                p1: alloc(b, "pool1 output", batch, g.pool[0].out_len())?,
                a2: alloc(b, "conv2 output", batch, g.conv[1].out_len())?,
                l2: alloc(b, "lrn2 output", batch, g.lrn[1].len())?,
                s2: alloc(b, "lrn2 scale", batch, g.lrn[1].len())?,
                p2: alloc(b, "pool2 output", batch, g.pool[1].out_len())?,
                a3: alloc(b, "conv3 output", batch, g.conv[2].out_len())?,
                a4: alloc(b, "conv4 output", batch, g.conv[3].out_len())?,
                a5: alloc(b, "conv5 output", batch, g.conv[4].out_len())?,
                p5: alloc(b, "pool5 output", batch, g.pool[2].out_len())?,
                h6: alloc(b, "fc6 output", batch, batch * g.fc[0].out)?,
                h7: alloc(b, "fc7 output", batch, batch * g.fc[1].out)?,
                z8: alloc(b, "fc8 output", batch, batch * g.fc[2].out)?,
            });
        }
        let w = g.exchange_widths();
        self.gathered = Some(Gathered {
            g2: alloc(
                b,
                "conv3 input (both columns)",
                batch,
                batch * COLUMNS * w[0],
            )?,
            g5: alloc(b, "fc6 input (both columns)", batch, batch * COLUMNS * w[1])?,
            g6: alloc(b, "fc7 input (both columns)", batch, batch * COLUMNS * w[2])?,
            g7: alloc(b, "fc8 input (both columns)", batch, batch * COLUMNS * w[3])?,
            logits: alloc(b, "logits", batch, batch * COLUMNS * w[4])?,
        });
        self.geoms = Some(g);
        Ok(g)
    }

    /// Runs the network on `x` and returns the gathered logits `[batch, classes]`.
    pub fn forward(&mut self, x: &B::Buf, batch: usize, mode: Mode) -> anyhow::Result<&B::Buf> {
        anyhow::ensure!(
            self.backend.buf_len(x) == self.input_len(batch),
            "input holds {} values, the network expects {} ({batch} x {} x {} x {})",
            self.backend.buf_len(x),
            self.input_len(batch),
            self.cfg.in_channels,
            self.sides.input,
            self.sides.input
        );
        anyhow::ensure!(
            batch > 0 && batch <= MAX_BATCH,
            "batch {batch} is outside the supported 1..={MAX_BATCH}"
        );
        // Until this pass has run to its end, no backward may follow.
        self.last_mode = None;
        let g = self.prepare(batch, matches!(mode, Mode::Train { .. }))?;
        let widths = g.exchange_widths();
        let (lrn, self_lrn_across) = (self.cfg.lrn, self.cfg.lrn_across_columns);
        let (dropout, seed, row_offset) = (self.cfg.dropout, self.seed, self.sample_offset);
        let Network {
            backend: b,
            columns,
            exchange,
            gathered,
            profile: prof,
            last_mode,
            ..
        } = self;
        let gath = gathered.as_mut().expect("prepared");

        // conv1 .. pool2: each column on its own maps.
        let across = self_lrn_across;
        // conv1 of every held column reads the same image: one call lets the backend share the
        // unfolding of the input and run one larger GEMM.
        let t = Instant::now();
        let (mut ws, mut bs, mut ys) = (Vec::new(), Vec::new(), Vec::new());
        for col in columns.iter_mut() {
            ws.push(&col.params[0].value);
            bs.push(&col.params[1].value);
            ys.push(&mut col.acts.as_mut().expect("prepared").a1);
        }
        b.conv2d_forward_sets(&g.conv[0], x, &ws, &bs, &mut ys);
        for y in ys {
            b.relu_forward(y);
        }
        prof.add(b, "conv1", false, t);
        let t = Instant::now();
        lrn_forward_all(b, &g, &lrn, across, 0, columns);
        prof.add(b, "lrn1", false, t);
        for col in columns.iter_mut() {
            let a = col.acts.as_mut().expect("prepared");
            let t = Instant::now();
            b.maxpool_forward(&g.pool[0], &a.l1, &mut a.p1);
            prof.add(b, "pool1", false, t);
            let t = Instant::now();
            b.conv2d_forward(
                &g.conv[1],
                &a.p1,
                &col.params[2].value,
                &col.params[3].value,
                &mut a.a2,
            );
            b.relu_forward(&mut a.a2);
            prof.add(b, "conv2", false, t);
        }
        let t = Instant::now();
        lrn_forward_all(b, &g, &lrn, across, 1, columns);
        prof.add(b, "lrn2", false, t);
        for col in columns.iter_mut() {
            let a = col.acts.as_mut().expect("prepared");
            let t = Instant::now();
            b.maxpool_forward(&g.pool[1], &a.l2, &mut a.p2);
            prof.add(b, "pool2", false, t);
        }
        // conv3 (reads both) .. pool5.
        let exchange = &mut **exchange;
        reads_both(
            b,
            &g,
            ReadsBoth::Conv3,
            widths[0],
            exchange,
            columns,
            &mut gath.g2,
            prof,
        )?;
        for col in columns.iter_mut() {
            let a = col.acts.as_mut().expect("prepared");
            let p = &col.params;
            let t = Instant::now();
            b.relu_forward(&mut a.a3);
            prof.add(b, "conv3", false, t);
            let t = Instant::now();
            b.conv2d_forward(&g.conv[3], &a.a3, &p[6].value, &p[7].value, &mut a.a4);
            b.relu_forward(&mut a.a4);
            prof.add(b, "conv4", false, t);
            let t = Instant::now();
            b.conv2d_forward(&g.conv[4], &a.a4, &p[8].value, &p[9].value, &mut a.a5);
            b.relu_forward(&mut a.a5);
            prof.add(b, "conv5", false, t);
            let t = Instant::now();
            b.maxpool_forward(&g.pool[2], &a.a5, &mut a.p5);
            prof.add(b, "pool5", false, t);
        }

        // fc6 and fc7 (read both), each followed by ReLU and dropout.
        for (fc, layer) in [(0usize, ReadsBoth::Fc6), (1, ReadsBoth::Fc7)] {
            let gathered = if fc == 0 { &mut gath.g5 } else { &mut gath.g6 };
            reads_both(
                b,
                &g,
                layer,
                widths[1 + fc],
                exchange,
                columns,
                gathered,
                prof,
            )?;
            for col in columns.iter_mut() {
                let index = col.index;
                let t = Instant::now();
                let h = layer.output(col.acts.as_mut().expect("prepared"));
                b.relu_forward(h);
                if let Mode::Train { step } = mode {
                    let key = dropout_key(seed, layer.name(), step, row_offset, index, &g.fc[fc]);
                    b.dropout_forward(batch, g.fc[fc].out, dropout, &key, h);
                }
                prof.add(b, layer.name(), false, t);
            }
        }

        // fc8: each column computes its half of the classes; the logits are gathered.
        reads_both(
            b,
            &g,
            ReadsBoth::Fc8,
            widths[3],
            exchange,
            columns,
            &mut gath.g7,
            prof,
        )?;
        let t = Instant::now();
        let parts: Vec<&B::Buf> = columns
            .iter()
            .map(|c| &c.acts.as_ref().unwrap().z8)
            .collect();
        exchange.all_gather(b, batch, widths[4], &parts, &mut gath.logits)?;
        prof.add(b, "exchange", false, t);
        *last_mode = Some(mode);
        Ok(&gath.logits)
    }

    /// A kept activation of the last forward pass of held column `column` (`conv5` is conv5
    /// after its ReLU, `pool5` its pooled maps, ...), for inspection and tests.
    pub fn activation(&self, column: usize, name: &str) -> Option<Vec<f32>> {
        let a = self
            .columns
            .iter()
            .find(|c| c.index == column)?
            .acts
            .as_ref()?;
        let buf = match name {
            "conv1" => &a.a1,
            "lrn1" => &a.l1,
            "pool1" => &a.p1,
            "conv2" => &a.a2,
            "lrn2" => &a.l2,
            "pool2" => &a.p2,
            "conv3" => &a.a3,
            "conv4" => &a.a4,
            "conv5" => &a.a5,
            "pool5" => &a.p5,
            "fc6" => &a.h6,
            "fc7" => &a.h7,
            "fc8" => &a.z8,
            _ => return None,
        };
        Some(self.backend.download(buf))
    }

    /// The gathered logits of the last forward pass.
    pub fn logits(&self) -> Option<&B::Buf> {
        self.gathered.as_ref().map(|g| &g.logits)
    }

    /// Back-propagates `dlogits` (`[batch, classes]`, the same in every process) through the
    /// last forward pass, leaving every parameter's gradient in its `grad`. `x` is that pass's
    /// input again (passed rather than kept, to spare a copy of the batch).
    pub fn backward(&mut self, x: &B::Buf, dlogits: &B::Buf) -> anyhow::Result<()> {
        let (g, mode) = match (self.geoms, self.last_mode) {
            (Some(g), Some(mode)) => (g, mode),
            _ => anyhow::bail!("backward called before forward"),
        };
        let batch = g.batch;
        // After an evaluation pass, the gradients are not there yet.
        self.prepare(batch, true)?;
        anyhow::ensure!(
            self.backend.buf_len(x) == self.input_len(batch) && self.backend.buf_len(dlogits) == batch * self.cfg.classes,
            "backward: the input ({} values) and the logits' gradient ({} values) do not match the last forward \
             pass (batch {batch}: {} and {})",
            self.backend.buf_len(x),
            self.backend.buf_len(dlogits),
            self.input_len(batch),
            batch * self.cfg.classes
        );
        let widths = g.exchange_widths();
        let (lrn, across) = (self.cfg.lrn, self.cfg.lrn_across_columns);
        let (dropout, seed, row_offset) = (self.cfg.dropout, self.seed, self.sample_offset);
        if self.replicas.as_ref().is_some_and(|r| r.pending() > 0) {
            anyhow::bail!(
                "backward called while the last step's gradients are still being averaged"
            );
        }
        self.buckets.clear();
        let Network {
            backend: b,
            columns,
            exchange,
            gathered,
            grads,
            profile: prof,
            replicas,
            buckets,
            ..
        } = self;
        let gath = gathered.as_ref().expect("prepared");
        let ws = grads.as_mut().expect("prepared");
        // Hands the finished gradients of `layers` to the other replicas, if any.
        let mut submit = |columns: &[Column<B>], prof: &mut Profile, layers: &'static [usize]| {
            submit_bucket(b, columns, layers, replicas.as_mut(), buckets, prof)
        };

        // Where the columns exchange (the inputs of fc8, fc7, fc6 and conv3), each layer's
        // input gradient is computed first and sent on its way; the weight gradients, which
        // the exchange does not touch, are computed while it travels.

        // fc8: each column's half of dlogits; the input gradient is summed over the columns.
        for (col, w) in columns.iter_mut().zip(ws.iter_mut()) {
            let t = Instant::now();
            b.slice_rows(
                batch,
                COLUMNS * g.fc[2].out,
                col.index * g.fc[2].out,
                g.fc[2].out,
                dlogits,
                &mut w.dz8,
                false,
            );
            let (wp, _) = weight_and_bias(&mut col.params, 7);
            b.linear_backward_data(&g.fc[2], &wp.value, &w.dz8, &mut w.dg7);
            prof.add(b, "fc8", true, t);
        }
        let t = Instant::now();
        start_reduce_scatter(b, exchange.as_mut(), batch, widths[3], ws, |w| &w.dg7)?;
        prof.add(b, "exchange", true, t);
        for (col, w) in columns.iter_mut().zip(ws.iter_mut()) {
            let t = Instant::now();
            let (wp, bp) = weight_and_bias(&mut col.params, 7);
            b.linear_backward(
                &g.fc[2],
                &gath.g7,
                &wp.value,
                &w.dz8,
                None,
                &mut wp.grad,
                &mut bp.grad,
            );
            prof.add(b, "fc8", true, t);
        }
        submit(columns, prof, &[7])?;
        let t = Instant::now();
        finish_reduce_scatter(b, exchange.as_mut(), batch, widths[3], ws, |w| {
            (&w.dg7, &mut w.dh7)
        })?;
        prof.add(b, "exchange", true, t);

        // fc7, then fc6: undo dropout and ReLU on the half, then the layer.
        for (fc, name) in [(1usize, "fc7"), (0, "fc6")] {
            let input = if fc == 0 { &gath.g5 } else { &gath.g6 };
            for (col, w) in columns.iter_mut().zip(ws.iter_mut()) {
                let t = Instant::now();
                let a = col.acts.as_ref().expect("forward ran");
                let (h, dh, dfull) = if fc == 0 {
                    (&a.h6, &mut w.dh6, &mut w.dg5)
                } else {
                    (&a.h7, &mut w.dh7, &mut w.dg6)
                };
                if let Mode::Train { step } = mode {
                    let key = dropout_key(seed, name, step, row_offset, col.index, &g.fc[fc]);
                    b.dropout_backward(batch, g.fc[fc].out, dropout, &key, dh);
                }
                // Dropout keeps the sign of what it keeps, and where it dropped the gradient is
                // already zero: the ReLU's mask can be read off the post-dropout output.
                b.relu_backward(h, dh);
                let (wp, _) = weight_and_bias(&mut col.params, 5 + fc);
                b.linear_backward_data(&g.fc[fc], &wp.value, dh, dfull);
                prof.add(b, name, true, t);
            }
            let width = if fc == 1 { widths[2] } else { widths[1] };
            let t = Instant::now();
            start_reduce_scatter(b, exchange.as_mut(), batch, width, ws, |w| {
                if fc == 1 {
                    &w.dg6
                } else {
                    &w.dg5
                }
            })?;
            prof.add(b, "exchange", true, t);
            for (col, w) in columns.iter_mut().zip(ws.iter()) {
                let t = Instant::now();
                let dh = if fc == 0 { &w.dh6 } else { &w.dh7 };
                let (wp, bp) = weight_and_bias(&mut col.params, 5 + fc);
                b.linear_backward(
                    &g.fc[fc],
                    input,
                    &wp.value,
                    dh,
                    None,
                    &mut wp.grad,
                    &mut bp.grad,
                );
                prof.add(b, name, true, t);
            }
            submit(columns, prof, if fc == 1 { &[6] } else { &[5] })?;
            let t = Instant::now();
            if fc == 1 {
                finish_reduce_scatter(b, exchange.as_mut(), batch, width, ws, |w| {
                    (&w.dg6, &mut w.dh6)
                })?;
            } else {
                finish_reduce_scatter(b, exchange.as_mut(), batch, width, ws, |w| {
                    (&w.dg5, &mut w.dp5)
                })?;
            }
            prof.add(b, "exchange", true, t);
        }

        // pool5 .. conv3, whose input gradient is over both columns' pool2 maps.
        for (col, w) in columns.iter_mut().zip(ws.iter_mut()) {
            let a = col.acts.as_ref().expect("forward ran");
            let t = Instant::now();
            b.maxpool_backward(&g.pool[2], &a.a5, &a.p5, &w.dp5, &mut w.da5);
            prof.add(b, "pool5", true, t);
            // conv5, conv4: undo the ReLU on the output gradient, then the layer.
            for (layer, name) in [(4usize, "conv5"), (3, "conv4")] {
                let t = Instant::now();
                let (y, dy, x, dx) = match layer {
                    4 => (&a.a5, &mut w.da5, &a.a4, &mut w.da4),
                    _ => (&a.a4, &mut w.da4, &a.a3, &mut w.da3),
                };
                b.relu_backward(y, dy);
                let (wp, bp) = weight_and_bias(&mut col.params, layer);
                b.conv2d_backward(
                    &g.conv[layer],
                    x,
                    &wp.value,
                    dy,
                    Some(dx),
                    &mut wp.grad,
                    &mut bp.grad,
                );
                prof.add(b, name, true, t);
            }
            // conv3: its input gradient first, for the exchange.
            let t = Instant::now();
            b.relu_backward(&a.a3, &mut w.da3);
            let (wp, _) = weight_and_bias(&mut col.params, 2);
            b.conv2d_backward_data(&g.conv[2], &wp.value, &w.da3, &mut w.dg2);
            prof.add(b, "conv3", true, t);
        }
        let t = Instant::now();
        start_reduce_scatter(b, exchange.as_mut(), batch, widths[0], ws, |w| &w.dg2)?;
        prof.add(b, "exchange", true, t);
        for (col, w) in columns.iter_mut().zip(ws.iter()) {
            let t = Instant::now();
            let (wp, bp) = weight_and_bias(&mut col.params, 2);
            b.conv2d_backward(
                &g.conv[2],
                &gath.g2,
                &wp.value,
                &w.da3,
                None,
                &mut wp.grad,
                &mut bp.grad,
            );
            prof.add(b, "conv3", true, t);
        }
        submit(columns, prof, &[2, 3, 4])?;
        let t = Instant::now();
        finish_reduce_scatter(b, exchange.as_mut(), batch, widths[0], ws, |w| {
            (&w.dg2, &mut w.dp2)
        })?;
        prof.add(b, "exchange", true, t);

        // pool2 .. conv1, each column on its own maps.
        for (col, w) in columns.iter().zip(ws.iter_mut()) {
            let a = col.acts.as_ref().expect("forward ran");
            let t = Instant::now();
            b.maxpool_backward(&g.pool[1], &a.l2, &a.p2, &w.dp2, &mut w.dl2);
            prof.add(b, "pool2", true, t);
        }
        let t = Instant::now();
        lrn_backward_all(b, &g, &lrn, across, 1, columns, ws);
        prof.add(b, "lrn2", true, t);
        for (col, w) in columns.iter_mut().zip(ws.iter_mut()) {
            let a = col.acts.as_ref().expect("forward ran");
            let t = Instant::now();
            b.relu_backward(&a.a2, &mut w.da2);
            let (wp, bp) = weight_and_bias(&mut col.params, 1);
            b.conv2d_backward(
                &g.conv[1],
                &a.p1,
                &wp.value,
                &w.da2,
                Some(&mut w.dp1),
                &mut wp.grad,
                &mut bp.grad,
            );
            prof.add(b, "conv2", true, t);
            let t = Instant::now();
            b.maxpool_backward(&g.pool[0], &a.l1, &a.p1, &w.dp1, &mut w.dl1);
            prof.add(b, "pool1", true, t);
        }
        submit(columns, prof, &[1])?;
        let t = Instant::now();
        lrn_backward_all(b, &g, &lrn, across, 0, columns, ws);
        prof.add(b, "lrn1", true, t);
        let t = Instant::now();
        let (mut wv, mut dys, mut dws, mut dbs) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (col, w) in columns.iter_mut().zip(ws.iter_mut()) {
            b.relu_backward(&col.acts.as_ref().expect("forward ran").a1, &mut w.da1);
            let (wp, bp) = weight_and_bias(&mut col.params, 0);
            wv.push(&wp.value);
            dws.push(&mut wp.grad);
            dbs.push(&mut bp.grad);
            dys.push(&w.da1);
        }
        b.conv2d_backward_sets(&g.conv[0], x, &wv, &dys, &mut dws, &mut dbs);
        prof.add(b, "conv1", true, t);
        submit(columns, prof, &[0])?;
        Ok(())
    }

    /// One SGD step on every parameter this process holds, from the last backward pass.
    pub fn sgd_step(&mut self, sgd: &SgdParams) {
        let t = Instant::now();
        for col in &mut self.columns {
            for p in &mut col.params {
                self.backend
                    .sgd_update(sgd, &mut p.value, &mut p.momentum, &p.grad);
            }
        }
        self.profile.add(&self.backend, "sgd", true, t);
    }

    /// Makes this network replica `replica` of a data-parallel group whose replicas each take
    /// `batch_per_replica` consecutive samples of the global batch: dropout masks follow the
    /// samples' global positions, the backward pass hands each layer's gradients to `group`
    /// as soon as they are final, and [`Self::sync_replicas`] takes them back averaged.
    pub fn join_replicas(
        &mut self,
        group: Box<dyn crate::comm::ReplicaReduce>,
        replica: usize,
        batch_per_replica: usize,
    ) -> anyhow::Result<()> {
        self.sample_offset = (replica * batch_per_replica) as u64;
        self.replicas = Some(crate::comm::OverlappedReduce::new(group)?);
        Ok(())
    }

    /// What crossed to the other replicas so far.
    pub fn replica_traffic(&self) -> crate::comm::Traffic {
        self.replicas
            .as_ref()
            .map(|r| r.traffic())
            .unwrap_or_default()
    }

    /// Waits for the gradient buckets that the backward pass handed to the other replicas and
    /// puts them back averaged (between the backward pass and the SGD step; nothing without
    /// replicas).
    pub fn sync_replicas(&mut self) -> anyhow::Result<()> {
        let Some(group) = self.replicas.as_mut() else {
            return Ok(());
        };
        let t = Instant::now();
        let b = &self.backend;
        for layers in std::mem::take(&mut self.buckets) {
            let host = group.take_next()?;
            let mut at = 0;
            for col in &mut self.columns {
                for &layer in layers {
                    for p in &mut col.params[2 * layer..2 * layer + 2] {
                        let n = p.len();
                        p.grad = b.upload(&host[at..at + n]);
                        at += n;
                    }
                }
            }
            anyhow::ensure!(at == host.len(), "a gradient bucket came back resized");
        }
        self.profile.add(&self.backend, "replicas", true, t);
        Ok(())
    }

    /// What crossed to the other column so far.
    pub fn column_traffic(&self) -> crate::comm::Traffic {
        self.exchange.traffic()
    }

    /// Parameters held by this process, column by column.
    pub fn params(&self) -> impl Iterator<Item = (usize, &Param<B>)> {
        self.columns
            .iter()
            .flat_map(|c| c.params.iter().map(move |p| (c.index, p)))
    }

    /// Replaces the parameters of every held column with their rows of unsplit tensors, looked up
    /// by name (`conv1.weight`, ...), as PyTorch lays them out.
    pub fn load_unsplit(
        &mut self,
        lookup: impl Fn(&str) -> anyhow::Result<(Vec<usize>, Vec<f32>)>,
    ) -> anyhow::Result<()> {
        for col in &mut self.columns {
            for p in &mut col.params {
                let (shape, data) = lookup(&p.name)?;
                let mut want = p.shape.clone();
                want[0] *= COLUMNS;
                // Grouped convolutions store [out, in / groups, k, k]: the same as a column's slice.
                anyhow::ensure!(
                    shape == want,
                    "parameter {} has shape {:?}, this network expects {:?}",
                    p.name,
                    shape,
                    want
                );
                p.value = self
                    .backend
                    .upload(super::params::column_rows(&data, want[0], col.index));
            }
        }
        Ok(())
    }

    /// The gradient of a parameter over the whole layer (both columns), when this process holds both.
    pub fn unsplit_grad(&self, name: &str) -> Option<Vec<f32>> {
        if self.columns.len() != COLUMNS {
            return None;
        }
        let mut out = Vec::new();
        for col in &self.columns {
            out.extend(
                self.backend
                    .download(&col.params.iter().find(|p| p.name == name)?.grad),
            );
        }
        Some(out)
    }

    /// Bytes of every buffer the network keeps between steps (parameters, gradients, momenta,
    /// activations).
    pub fn resident_bytes(&self) -> usize {
        let params: usize = (self.columns.iter())
            .map(|col| col.params.iter().map(|p| 3 * p.len()).sum::<usize>())
            .sum();
        4 * params + self.buffer_bytes()
    }

    /// Bytes of the buffers a batch size needs: activations, gathered tensors, gradients.
    fn buffer_bytes(&self) -> usize {
        let b = &self.backend;
        let mut n = 0;
        for col in &self.columns {
            if let Some(a) = &col.acts {
                for buf in [
                    &a.a1, &a.l1, &a.s1, &a.p1, &a.a2, &a.l2, &a.s2, &a.p2, &a.a3, &a.a4, &a.a5,
                    &a.p5, &a.h6, &a.h7, &a.z8,
                ] {
                    n += b.buf_len(buf);
                }
            }
        }
        if let Some(g) = &self.gathered {
            n += [&g.g2, &g.g5, &g.g6, &g.g7, &g.logits]
                .iter()
                .map(|x| b.buf_len(x))
                .sum::<usize>();
        }
        for w in self.grads.iter().flatten() {
            n += w.bufs().iter().map(|x| b.buf_len(x)).sum::<usize>();
        }
        n * 4
    }
}
