//! The two-column network: forward, backward and the SGD step, over any backend and any split
//! of the columns between processes.
//!
//! The network is the paper's list of layers ([`super::layers`]): stages that each held column
//! runs on its own maps, and column-parallel layers (conv3, fc6, fc7, fc8) that read both
//! columns through the [`ColumnExchange`]. A batch goes through them as
//!
//! ```text
//!  image ─┬─ conv1 ─ lrn1 ─ pool1 ─ conv2 ─ lrn2 ─ pool2 ─┐ all-gather ┌ conv3 ─ conv4 ─ conv5 ─ pool5 ─┐
//!         └─ (the other column, here or in another process) ┘ (pool2)  └ (both columns' maps)          │
//!    all-gather (pool5) ─ fc6 ─ all-gather ─ fc7 ─ all-gather ─ fc8 ─ all-gather ─ logits
//! ```
//!
//! and back: each column-parallel layer computes its input gradient first and starts the
//! reduce-scatter that sums it over the columns, computes its weight gradients while the blocks
//! travel, and hands them to the other replicas (data parallelism) before it waits.

use super::config::{NetConfig, Sides, COLUMNS};
use super::layers::{
    ColumnParallel, ColumnStage, DropoutKeys, Input, Layer, Lrn, Product, TOO_LARGE,
};
use super::params::init_column;
pub use super::params::{Column, Param};
use super::profile::Pass;
pub use super::profile::Profile;
use super::shapes::{Geoms, MAX_BATCH};
use crate::backend::{Backend, OutOfMemory, SgdParams};
use crate::comm::{BufReduce, ColumnExchange, Segment, Traffic};
use crate::files::human_bytes;

/// Training (dropout on, keyed by the step) or evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train { step: u64 },
    Eval,
}

/// Readies the convolutions' working memory (forward, or forward and backward) for `g`'s
/// batch, or names the layer that did not fit. conv3's forward pass runs in parts.
fn prepare_convolutions<B: Backend>(b: &B, g: &Geoms, backward: bool) -> anyhow::Result<()> {
    let conv3_part = crate::backend::ConvGeom {
        in_c: g.conv[2].in_c / COLUMNS,
        ..g.conv[2]
    };
    let whole = g
        .conv
        .iter()
        .enumerate()
        .map(|(i, c)| (i + 1, *c, backward));
    for (layer, conv, backward) in whole.chain([(3, conv3_part, false)]) {
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

/// The network's layers at one batch size, with their buffers.
struct Layers<B: Backend> {
    batch: usize,
    conv1: ColumnStage<B>,
    conv2: ColumnStage<B>,
    conv3: ColumnParallel<B>,
    conv4: ColumnStage<B>,
    conv5: ColumnStage<B>,
    fc6: ColumnParallel<B>,
    fc7: ColumnParallel<B>,
    fc8: ColumnParallel<B>,
    /// Whether the backward pass's buffers are allocated.
    training: bool,
}

impl<B: Backend> Layers<B> {
    /// The layers of `cfg` at `g`'s batch size for `columns` held columns, with the forward
    /// pass's buffers (in the order the pass uses them: the first that does not fit is named).
    fn new(b: &B, cfg: &NetConfig, g: &Geoms, columns: usize) -> anyhow::Result<Self> {
        let lrn = |name, i: usize| {
            Some(Lrn {
                name,
                geom: g.lrn[i],
                params: cfg.lrn,
                across: cfg.lrn_across_columns,
            })
        };
        let stage =
            |name, i: usize, lrn, pool| ColumnStage::new(b, name, g.conv[i], lrn, pool, columns);
        let parallel = |name, product, relu, dropout, gather_output| {
            ColumnParallel::new(b, name, product, relu, dropout, gather_output, columns)
        };
        Ok(Layers {
            batch: g.batch,
            conv1: stage("conv1", 0, lrn("lrn1", 0), Some(("pool1", g.pool[0])))?,
            conv2: stage("conv2", 1, lrn("lrn2", 1), Some(("pool2", g.pool[1])))?,
            conv3: parallel("conv3", Product::Conv(g.conv[2]), true, false, false)?,
            conv4: stage("conv4", 3, None, None)?,
            conv5: stage("conv5", 4, None, Some(("pool5", g.pool[2])))?,
            fc6: parallel("fc6", Product::Linear(g.fc[0]), true, true, false)?,
            fc7: parallel("fc7", Product::Linear(g.fc[1]), true, true, false)?,
            fc8: parallel("fc8", Product::Linear(g.fc[2]), false, false, true)?,
            training: false,
        })
    }

    /// Every layer, from the input to the logits.
    fn all(&self) -> [&dyn Layer<B>; 8] {
        [
            &self.conv1,
            &self.conv2,
            &self.conv3,
            &self.conv4,
            &self.conv5,
            &self.fc6,
            &self.fc7,
            &self.fc8,
        ]
    }

    /// Allocates the backward pass's buffers, from the logits down (in the order the pass
    /// uses them).
    fn alloc_grads(&mut self, b: &B) -> anyhow::Result<()> {
        let batch = self.batch;
        let down: [&mut dyn Layer<B>; 8] = [
            &mut self.fc8,
            &mut self.fc7,
            &mut self.fc6,
            &mut self.conv5,
            &mut self.conv4,
            &mut self.conv3,
            &mut self.conv2,
            &mut self.conv1,
        ];
        for layer in down {
            layer.alloc_grads(b, batch)?;
        }
        self.training = true;
        Ok(())
    }

    fn bytes(&self, b: &B) -> usize {
        self.all().iter().map(|l| l.bytes(b)).sum()
    }
}

/// The other replicas of this process's columns, and the gradient buckets handed to them
/// during the backward pass, by layer, in the order they were handed over.
struct Replicas<B: Backend> {
    group: Box<dyn BufReduce<B>>,
    buckets: Vec<&'static [&'static str]>,
    /// Each held parameter's position among all the held columns' parameters, in order (the
    /// same on every replica): the layout the ring reduction assigns values by.
    positions: std::collections::HashMap<(usize, String), u64>,
}

impl<B: Backend> Replicas<B> {
    /// Hands the finished gradients of `layers` (every held column's, packed into one bucket)
    /// to the other replicas, to be averaged while the backward pass goes on below them.
    fn submit(
        replicas: &mut Option<Replicas<B>>,
        b: &B,
        prof: &mut Profile,
        columns: &[Column<B>],
        layers: &'static [&'static str],
    ) -> anyhow::Result<()> {
        let Some(r) = replicas else {
            return Ok(());
        };
        let _t = prof.time(b, "replicas", Pass::Backward);
        let mut parts = Vec::new();
        let mut layout = Vec::new();
        for col in columns {
            for layer in layers {
                let (w, bias) = col.weight_and_bias(layer);
                for p in [w, bias] {
                    parts.push(&p.grad);
                    let at = r.positions[&(col.index, p.name.clone())];
                    layout.push(Segment { at, len: p.len() });
                }
            }
        }
        let widths: Vec<usize> = parts.iter().map(|p| b.buf_len(p)).collect();
        let mut bucket = b.try_zeros(widths.iter().sum())?;
        b.concat_rows(1, &parts, &widths, &mut bucket);
        r.group.submit(b, bucket, layout)?;
        r.buckets.push(layers);
        Ok(())
    }
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
    replicas: Option<Replicas<B>>,
    /// The layers at the batch size of the last pass.
    layers: Option<Layers<B>>,
    /// The mode of the last forward pass: the backward pass must undo the same dropout.
    last_mode: Option<Mode>,
    /// Processes whose buffers come out of the same memory as this one's, itself included
    /// ([`Network::share_memory`]).
    memory_sharers: usize,
    /// Layers that do not learn, in [`super::params::LAYERS`] order ([`Self::freeze`]).
    frozen: [bool; 8],
    pub profile: Profile,
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
            layers: None,
            last_mode: None,
            memory_sharers: 1,
            frozen: [false; 8],
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
        self.prepare(batch, true)
    }

    /// The layers at `batch`, with the forward pass's buffers allocated and, with `backward`,
    /// the backward pass's too (evaluation never allocates gradients).
    fn prepare(&mut self, batch: usize, backward: bool) -> anyhow::Result<()> {
        // The buffers' bytes that this call keeps; it adds the rest.
        let kept = match &self.layers {
            Some(l) if l.batch == batch && (!backward || l.training) => return Ok(()),
            Some(l) if l.batch == batch => self.buffer_bytes(),
            _ => {
                self.prepare_forward(batch)?;
                0
            }
        };
        if backward {
            let g = Geoms::new(&self.cfg, &self.sides, batch);
            prepare_convolutions(&self.backend, &g, true)?;
            let layers = self.layers.as_mut().expect("prepared");
            if let Err(e) = layers.alloc_grads(&self.backend) {
                // Nothing half-made: the next call starts over.
                self.drop_buffers();
                return Err(e);
            }
        }
        self.check_memory(batch, kept)
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
        self.layers = None;
    }

    /// Allocates the forward pass's buffers at `batch`, dropping those of another batch size
    /// first (so that the two are never held at once, and a failure leaves nothing half-made:
    /// the next call starts over).
    fn prepare_forward(&mut self, batch: usize) -> anyhow::Result<()> {
        self.drop_buffers();
        let g = Geoms::new(&self.cfg, &self.sides, batch);
        prepare_convolutions(&self.backend, &g, false)?;
        self.layers = Some(Layers::new(
            &self.backend,
            &self.cfg,
            &g,
            self.columns.len(),
        )?);
        Ok(())
    }

    /// What keys the dropout masks of a pass in `mode` (none when evaluating).
    fn dropout_keys(&self, mode: Mode) -> Option<DropoutKeys> {
        match mode {
            Mode::Train { step } => Some(DropoutKeys {
                p: self.cfg.dropout,
                seed: self.seed,
                step,
                row_offset: self.sample_offset,
            }),
            Mode::Eval => None,
        }
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
        self.prepare(batch, matches!(mode, Mode::Train { .. }))?;
        let keys = self.dropout_keys(mode);
        let keys = keys.as_ref();
        let Network {
            backend: b,
            columns: cols,
            exchange,
            layers,
            profile: p,
            last_mode,
            ..
        } = self;
        let ex = &mut **exchange;
        let Layers {
            conv1,
            conv2,
            conv3,
            conv4,
            conv5,
            fc6,
            fc7,
            fc8,
            ..
        } = layers.as_mut().expect("prepared");

        // conv1 and conv2: each column on its own maps (conv1's all read the image).
        conv1.forward(b, p, Input::Shared(x), cols);
        conv2.forward(b, p, Input::Own(conv1.outputs()), cols);
        // conv3 reads both columns' pool2 maps; conv4 and conv5 each column's own.
        conv3.forward(b, p, ex, conv2.outputs(), cols, keys)?;
        conv4.forward(b, p, Input::Own(conv3.outputs()), cols);
        conv5.forward(b, p, Input::Own(conv4.outputs()), cols);
        // fc6, fc7 and fc8 read both columns; fc8's halves of the logits are gathered.
        fc6.forward(b, p, ex, conv5.outputs(), cols, keys)?;
        fc7.forward(b, p, ex, fc6.outputs(), cols, keys)?;
        fc8.forward(b, p, ex, fc7.outputs(), cols, keys)?;
        // An evaluation's logits are read next: its exchanges must have arrived whole. (A
        // training pass settles them with the backward pass's, before the SGD step.)
        if mode == Mode::Eval {
            ex.settle()?;
        }

        *last_mode = Some(mode);
        Ok(fc8.gathered_output().expect("fc8 gathers its output"))
    }

    /// A kept activation of the last forward pass of held column `column` (`conv5` is conv5
    /// after its ReLU, `pool5` its pooled maps, `lrn1`, `fc8` ...), for inspection and tests.
    pub fn activation(&self, column: usize, name: &str) -> Option<Vec<f32>> {
        let at = self.columns.iter().position(|c| c.index == column)?;
        let layers = self.layers.as_ref()?;
        let buf = layers.all().into_iter().find_map(|l| l.tensor(at, name))?;
        Some(self.backend.download(buf))
    }

    /// The gathered logits of the last forward pass.
    pub fn logits(&self) -> Option<&B::Buf> {
        self.layers.as_ref()?.fc8.gathered_output()
    }

    /// Back-propagates `dlogits` (`[batch, classes]`, the same in every process) through the
    /// last forward pass, leaving every parameter's gradient in its `grad`. `x` is that pass's
    /// input again (passed rather than kept, to spare a copy of the batch).
    pub fn backward(&mut self, x: &B::Buf, dlogits: &B::Buf) -> anyhow::Result<()> {
        let mode = self.prepare_backward(x, dlogits)?;
        let keys = self.dropout_keys(mode);
        let keys = keys.as_ref();
        let Network {
            backend: b,
            columns: cols,
            exchange,
            layers,
            profile: p,
            replicas,
            frozen,
            ..
        } = self;
        let ex = &mut **exchange;
        let Layers {
            conv1,
            conv2,
            conv3,
            conv4,
            conv5,
            fc6,
            fc7,
            fc8,
            ..
        } = layers.as_mut().expect("prepared");

        // Frozen layers compute no weight gradients, and below the lowest layer that learns
        // nothing is computed at all (layer i in LAYERS order: conv1 is 0, fc8 is 7).
        let frozen = *frozen;
        let lowest = frozen.iter().position(|f| !f).expect("a layer learns");
        let learns = |i: usize| !frozen[i];
        let below = |i: usize| lowest < i;

        // fc8, fc7, fc6: each starts its input gradient's reduce-scatter, computes its weight
        // gradients while the blocks travel and hands them to the replicas, then takes the sum.
        fc8.start_backward(b, p, ex, cols, Some(dlogits), keys, learns(7), below(7))?;
        if learns(7) {
            Replicas::submit(replicas, b, p, cols, &["fc8"])?;
        }
        if !below(7) {
            return Ok(());
        }
        fc8.finish_backward(b, p, ex, fc7.outputs_and_grads().1)?;
        fc7.start_backward(b, p, ex, cols, None, keys, learns(6), below(6))?;
        if learns(6) {
            Replicas::submit(replicas, b, p, cols, &["fc7"])?;
        }
        if !below(6) {
            return Ok(());
        }
        fc7.finish_backward(b, p, ex, fc6.outputs_and_grads().1)?;
        fc6.start_backward(b, p, ex, cols, None, keys, learns(5), below(5))?;
        if learns(5) {
            Replicas::submit(replicas, b, p, cols, &["fc6"])?;
        }
        if !below(5) {
            return Ok(());
        }
        fc6.finish_backward(b, p, ex, conv5.outputs_and_grads().1)?;
        // pool5 .. conv4 on each column's own maps, then conv3 over both columns' pool2 maps.
        const CONV345: &[&str] = &["conv3", "conv4", "conv5"];
        let (x4, dx4) = conv4.outputs_and_grads();
        conv5.backward(
            b,
            p,
            Input::Own(x4),
            below(4).then_some(dx4),
            cols,
            learns(4),
        );
        if !below(4) {
            return Replicas::submit(replicas, b, p, cols, CONV345);
        }
        let (x3, dx3) = conv3.outputs_and_grads();
        conv4.backward(
            b,
            p,
            Input::Own(x3),
            below(3).then_some(dx3),
            cols,
            learns(3),
        );
        if !below(3) {
            return Replicas::submit(replicas, b, p, cols, CONV345);
        }
        conv3.start_backward(b, p, ex, cols, None, keys, learns(2), below(2))?;
        Replicas::submit(replicas, b, p, cols, CONV345)?;
        if !below(2) {
            return Ok(());
        }
        conv3.finish_backward(b, p, ex, conv2.outputs_and_grads().1)?;
        // pool2 .. conv1, each column on its own maps.
        let (x1, dx1) = conv1.outputs_and_grads();
        conv2.backward(
            b,
            p,
            Input::Own(x1),
            below(1).then_some(dx1),
            cols,
            learns(1),
        );
        if learns(1) {
            Replicas::submit(replicas, b, p, cols, &["conv2"])?;
        }
        if !below(1) {
            return Ok(());
        }
        conv1.backward(b, p, Input::Shared(x), None, cols, true);
        Replicas::submit(replicas, b, p, cols, &["conv1"])?;
        Ok(())
    }

    /// Stops training `layers` (names from [`super::params::LAYERS`]): no weight gradients,
    /// no update, and no backward pass at all below the lowest layer that still learns (what
    /// PyTorch's `requires_grad_(False)` on the lower layers comes to). Every layer frozen is
    /// refused: nothing would train.
    pub fn freeze(&mut self, layers: &[String]) -> anyhow::Result<()> {
        let mut frozen = [false; 8];
        for name in layers {
            let i = super::params::LAYERS
                .iter()
                .position(|l| l == name)
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "no layer {name} to freeze: the layers are {}",
                        super::params::LAYERS.join(", ")
                    )
                })?;
            frozen[i] = true;
        }
        anyhow::ensure!(
            frozen.iter().any(|f| !f),
            "every layer is frozen: nothing would train (leave at least fc8 out of --freeze)"
        );
        self.frozen = frozen;
        Ok(())
    }

    /// Whether `layer` is frozen ([`Self::freeze`]).
    pub fn is_frozen(&self, layer: &str) -> bool {
        super::params::LAYERS
            .iter()
            .position(|l| *l == layer)
            .is_some_and(|i| self.frozen[i])
    }

    /// Checks that a backward pass can follow the last forward pass with these tensors, and
    /// readies its buffers; returns the forward pass's mode.
    fn prepare_backward(&mut self, x: &B::Buf, dlogits: &B::Buf) -> anyhow::Result<Mode> {
        let (batch, mode) = match (&self.layers, self.last_mode) {
            (Some(l), Some(mode)) => (l.batch, mode),
            _ => anyhow::bail!("backward called before forward"),
        };
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
        if self
            .replicas
            .as_ref()
            .is_some_and(|r| !r.buckets.is_empty())
        {
            anyhow::bail!(
                "backward called while the last step's gradients are still being averaged"
            );
        }
        Ok(mode)
    }

    /// One SGD step on every parameter this process holds, from the last backward pass.
    pub fn sgd_step(&mut self, sgd: &SgdParams) {
        let _t = self.profile.time(&self.backend, "sgd", Pass::Backward);
        let frozen = self.frozen;
        for col in &mut self.columns {
            for p in &mut col.params {
                let layer = p.name.split('.').next().unwrap_or_default();
                let at = super::params::LAYERS.iter().position(|l| *l == layer);
                if at.is_some_and(|i| frozen[i]) {
                    continue;
                }
                self.backend
                    .sgd_update(sgd, &mut p.value, &mut p.momentum, &p.grad);
            }
        }
    }

    /// Makes this network replica `replica` of a data-parallel group whose replicas each take
    /// `batch_per_replica` consecutive samples of the global batch: dropout masks follow the
    /// samples' global positions, the backward pass hands each layer's gradients to `group`
    /// as soon as they are final, and [`Self::sync_replicas`] takes them back averaged.
    pub fn join_replicas(
        &mut self,
        group: Box<dyn BufReduce<B>>,
        replica: usize,
        batch_per_replica: usize,
    ) -> anyhow::Result<()> {
        self.sample_offset = (replica * batch_per_replica) as u64;
        let mut positions = std::collections::HashMap::new();
        let mut at = 0u64;
        for col in &self.columns {
            for p in &col.params {
                positions.insert((col.index, p.name.clone()), at);
                at += p.len() as u64;
            }
        }
        self.replicas = Some(Replicas {
            group,
            buckets: Vec::new(),
            positions,
        });
        Ok(())
    }

    /// What crossed to the other replicas so far.
    pub fn replica_traffic(&self) -> Traffic {
        self.replicas
            .as_ref()
            .map(|r| r.group.traffic())
            .unwrap_or_default()
    }

    /// Waits for the gradient buckets that the backward pass handed to the other replicas and
    /// puts them back averaged (between the backward pass and the SGD step), then makes sure
    /// that every exchange of the step completed ([`Self::settle_exchanges`]).
    pub fn sync_replicas(&mut self) -> anyhow::Result<()> {
        if let Some(r) = self.replicas.as_mut() {
            let b = &self.backend;
            let _t = self.profile.time(b, "replicas", Pass::Backward);
            for layers in std::mem::take(&mut r.buckets) {
                let bucket = r.group.take_next(b)?;
                let total = b.buf_len(&bucket);
                let mut at = 0;
                for col in &mut self.columns {
                    for layer in layers {
                        let (w, bias) = col.weight_and_bias_mut(layer);
                        for p in [w, bias] {
                            let n = p.len();
                            anyhow::ensure!(at + n <= total, "a gradient bucket came back resized");
                            b.slice_rows(1, total, at, n, &bucket, &mut p.grad, false);
                            at += n;
                        }
                    }
                }
                anyhow::ensure!(at == total, "a gradient bucket came back resized");
            }
        }
        self.settle_exchanges()
    }

    /// Waits until every exchange with the other column and the other replicas so far is known
    /// to have completed in step: a device exchange queues its transfers and learns only later
    /// whether they arrived (see [`crate::comm::BufLink::settle`]). Before anything is made of
    /// a pass's results.
    pub fn settle_exchanges(&mut self) -> anyhow::Result<()> {
        self.exchange.settle()?;
        if let Some(r) = self.replicas.as_mut() {
            r.group.settle()?;
        }
        Ok(())
    }

    /// What crossed to the other column so far.
    pub fn column_traffic(&self) -> Traffic {
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
        self.load_unsplit_some(|name| lookup(name).map(Some))
    }

    /// [`Self::load_unsplit`] for the parameters the lookup answers; one it answers `None`
    /// keeps its value (a layer drawn afresh for fine-tuning).
    pub fn load_unsplit_some(
        &mut self,
        lookup: impl Fn(&str) -> anyhow::Result<Option<(Vec<usize>, Vec<f32>)>>,
    ) -> anyhow::Result<()> {
        for col in &mut self.columns {
            for p in &mut col.params {
                let Some((shape, data)) = lookup(&p.name)? else {
                    continue;
                };
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
        self.layers.as_ref().map_or(0, |l| l.bytes(&self.backend))
    }
}
