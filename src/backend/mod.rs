//! How ops run: one small trait with explicit forward and backward for every op the network
//! needs, and one module per device.
//!
//! The network is fixed, so there is no autograd: each layer calls its op's forward and, in the
//! backward pass, the matching backward with what the forward kept. Every buffer is a flat `f32`
//! array in NCHW order (or `[rows, features]` for the fully connected part); shapes travel
//! beside it in small geometry structs so that a device backend can launch kernels without
//! inspecting tensors.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod settings;
/// The backends draw dropout masks from the counter-based generator.
pub use crate::rng;

pub use cpu::Cpu;
pub use settings::{AlgoChoice, ConvPath, DeviceSettings};

use crate::data::augment::ByteViews;

/// A backend chosen at run time: the CPU, or a GPU (boxed: the variants differ in size).
pub enum Device {
    Cpu(Cpu),
    #[cfg(feature = "cuda")]
    Cuda(Box<cuda::Cuda>),
}

/// Runs `$body` with `$b` bound to the [`Device`]'s backend, whichever type it is (the code
/// that trains is generic over the backend).
#[macro_export]
macro_rules! with_device {
    ($device:expr, $b:ident => $body:expr) => {
        match $device {
            $crate::backend::Device::Cpu($b) => $body,
            #[cfg(feature = "cuda")]
            $crate::backend::Device::Cuda(boxed) => {
                let $b = *boxed;
                $body
            }
        }
    };
}

impl Device {
    /// `cpu` (with `threads` compute threads; default every core), or `cuda:N` (`cuda` is
    /// `cuda:0`), run as `settings` say. A GPU that cannot start is an error saying why.
    pub fn open(
        spec: &str,
        threads: Option<usize>,
        settings: &DeviceSettings,
    ) -> anyhow::Result<Device> {
        if spec == "cpu" {
            let cpu = match threads {
                Some(n) => Cpu::with_threads(n),
                None => Cpu::new(),
            };
            return Ok(Device::Cpu(cpu.with_memory_limit(settings.memory_limit)));
        }
        let ordinal = match spec.strip_prefix("cuda") {
            Some("") => 0,
            Some(n) => n
                .strip_prefix(':')
                .and_then(|n| n.parse::<usize>().ok())
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "device `{spec}`: expected cpu, cuda or cuda:N (N a GPU's index)"
                    )
                })?,
            None => anyhow::bail!("device `{spec}`: expected cpu, cuda or cuda:N"),
        };
        #[cfg(feature = "cuda")]
        {
            Ok(Device::Cuda(Box::new(cuda::Cuda::new(ordinal, settings)?)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = settings;
            anyhow::bail!(
                "device cuda:{ordinal}: this binary was built without the CUDA backend (cargo feature `cuda`); use the CPU"
            )
        }
    }

    /// How the coordinator should name this device: `cpu`, or `cuda:N` with the GPU's UUID.
    pub fn describe(&self) -> (String, String) {
        match self {
            Device::Cpu(_) => ("cpu".into(), String::new()),
            #[cfg(feature = "cuda")]
            Device::Cuda(c) => (format!("cuda:{}", c.ordinal()), c.uuid()),
        }
    }

    /// The GPU's index, for a CUDA device.
    pub fn cuda_ordinal(&self) -> Option<usize> {
        match self {
            Device::Cpu(_) => None,
            #[cfg(feature = "cuda")]
            Device::Cuda(c) => Some(c.ordinal()),
        }
    }
}

/// A device allocation that did not fit; the message says how much, where, and what was in
/// use. Callers that know which layer asked add that, and what to change.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct OutOfMemory(pub String);

/// Geometry of a 2-D convolution over a batch. Weights are `[out_c, in_c / groups, k, k]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct ConvGeom {
    pub batch: usize,
    pub in_c: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub out_c: usize,
    pub kernel: usize,
    pub stride: usize,
    pub pad: usize,
    pub groups: usize,
}

impl ConvGeom {
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.pad - self.kernel) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.pad - self.kernel) / self.stride + 1
    }
    pub fn in_len(&self) -> usize {
        self.batch * self.in_c * self.in_h * self.in_w
    }
    pub fn out_len(&self) -> usize {
        self.batch * self.out_c * self.out_h() * self.out_w()
    }
    pub fn weight_len(&self) -> usize {
        self.out_c * (self.in_c / self.groups) * self.kernel * self.kernel
    }
    /// Multiply-adds of one forward pass over the batch.
    pub fn forward_macs(&self) -> usize {
        self.out_len() * (self.in_c / self.groups) * self.kernel * self.kernel
    }
}

/// Geometry of max pooling (square window, no padding, the paper's overlapping 3/2 by default).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeom {
    pub batch: usize,
    pub channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub size: usize,
    pub stride: usize,
}

impl PoolGeom {
    pub fn out_h(&self) -> usize {
        (self.in_h - self.size) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.in_w - self.size) / self.stride + 1
    }
    pub fn in_len(&self) -> usize {
        self.batch * self.channels * self.in_h * self.in_w
    }
    pub fn out_len(&self) -> usize {
        self.batch * self.channels * self.out_h() * self.out_w()
    }
}

/// Local response normalisation across channels, in the paper's form:
/// `b[c] = a[c] / (k + alpha * sum_{c' in window(c)} a[c']^2)^beta` (alpha not divided by size).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrnParams {
    /// Channels in the window (odd), centred on the channel being normalised.
    pub size: usize,
    pub alpha: f32,
    pub beta: f32,
    pub k: f32,
}

impl Default for LrnParams {
    fn default() -> Self {
        LrnParams {
            size: 5,
            alpha: 1e-4,
            beta: 0.75,
            k: 2.0,
        }
    }
}

/// Geometry of a channel-wise op over NCHW data: `batch` images of `channels` planes of `plane` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlaneGeom {
    pub batch: usize,
    pub channels: usize,
    pub plane: usize,
}

impl PlaneGeom {
    pub fn len(&self) -> usize {
        self.batch * self.channels * self.plane
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Geometry of a fully connected layer: `y[rows, out] = x[rows, inp] * w[out, inp]^T + b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearGeom {
    pub rows: usize,
    pub inp: usize,
    pub out: usize,
}

/// Which input channels (of a convolution) or features (of a fully connected layer) a partial
/// forward product reads: `[first, first + count)` of the layer's `total`, where `count` is the
/// part's geometry's `in_c` or `inp`.
///
/// A layer whose input is gathered from both columns (conv3, fc6, fc7, fc8) is computed as two
/// such parts, the column's own first: it runs while the other column's part is still crossing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InputPart {
    pub first: usize,
    pub total: usize,
}

impl InputPart {
    /// Checks the lengths of [`Backend::conv2d_forward_part`]'s buffers (`x`, `w`, `b`, `y`),
    /// panicking with the one that does not fit, as the whole ops do.
    pub fn check_conv(&self, g: &ConvGeom, [x, w, b, y]: [usize; 4], accumulate: bool) {
        assert_eq!(g.groups, 1, "a partial convolution has one group");
        let (first, end) = (self.first, self.first + g.in_c);
        assert!(
            end <= self.total,
            "conv: channels {first}..{end} of {}",
            self.total
        );
        assert_eq!(x, g.in_len(), "conv input length");
        let kk = g.kernel * g.kernel;
        assert_eq!(w, g.out_c * self.total * kk, "conv weight length");
        assert!(accumulate || b == g.out_c, "conv bias length");
        assert_eq!(y, g.out_len(), "conv output length");
    }

    /// As [`Self::check_conv`], for [`Backend::linear_forward_part`].
    pub fn check_linear(&self, g: &LinearGeom, [x, w, b, y]: [usize; 4], accumulate: bool) {
        let (first, end) = (self.first, self.first + g.inp);
        assert!(
            end <= self.total,
            "linear: features {first}..{end} of {}",
            self.total
        );
        assert_eq!(x, g.rows * g.inp, "linear input length");
        assert_eq!(w, g.out * self.total, "linear weight length");
        assert!(accumulate || b == g.out, "linear bias length");
        assert_eq!(y, g.rows * g.out, "linear output length");
    }
}

/// The paper's SGD step: `v <- m v - wd lr w - lr g ; w <- w + v`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SgdParams {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

impl Default for SgdParams {
    /// The paper's: lr 0.01, momentum 0.9, weight decay 0.0005.
    fn default() -> Self {
        SgdParams {
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 0.0005,
        }
    }
}

/// Where a block of a dropout layer sits in the whole (unsplit) layer, so that the mask depends
/// only on the seed and on global coordinates: two processes holding the two columns, or
/// replicas holding parts of the batch, draw exactly the mask one process would draw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DropoutKey {
    /// Derived from the run's seed, the layer and the step.
    pub seed: u64,
    /// Global index of the first row (sample) of this block.
    pub row_offset: u64,
    /// Global index of the first feature of this block.
    pub col_offset: u64,
    /// Features per row in the whole layer.
    pub total_cols: u64,
}

/// A CUDA event, by its raw handle (`CUevent`), made by a library that runs its own queue on the
/// backend's device (NCCL's communicator thread): the backend records it on its queue, or makes
/// its queue wait for it, so that the two queues are ordered without the host waiting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueEvent(pub usize);

/// A training step's loss and logits, read back to the host.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReadout {
    pub loss: f32,
    pub logits: Vec<f32>,
}

/// A read queued on a device behind the ops before it ([`Backend::softmax_xent_read`]): the
/// host waits for those ops when it takes the values, not for what was queued after them.
pub trait PendingReadout: Send {
    fn wait(self: Box<Self>) -> StepReadout;
}

/// A readout that is there already (a backend that runs each op as it is called).
pub struct ReadyReadout(pub StepReadout);

impl PendingReadout for ReadyReadout {
    fn wait(self: Box<Self>) -> StepReadout {
        self.0
    }
}

/// The ops of the network, with explicit forward and backward passes.
///
/// Outputs are overwritten unless the name says `accumulate`. A backend owns how buffers live
/// (host memory, device memory); the network only moves them through these calls.
pub trait Backend: Send + Sync {
    /// A flat `f32` buffer in this backend's memory.
    type Buf: Send + Sync;

    /// Human-readable name ("cpu (2 threads, avx512)").
    fn name(&self) -> String;

    fn zeros(&self, len: usize) -> Self::Buf;
    /// [`Backend::zeros`], or an error when the device's memory is full.
    fn try_zeros(&self, len: usize) -> anyhow::Result<Self::Buf> {
        Ok(self.zeros(len))
    }
    /// Waits until every op queued so far has finished (device backends queue them).
    fn synchronize(&self) {}
    /// Device memory in use (bytes, the whole device as its driver reports it), for devices.
    fn device_memory_in_use(&self) -> Option<u64> {
        None
    }
    /// Bytes that new buffers may still take, where allocating does not say so itself: the
    /// CPU's buffers are mapped lazily, so an allocation beyond the machine's memory succeeds
    /// and the process is killed later, when it writes. `None`: allocation fails when memory
    /// runs out (a GPU), or nothing is known.
    fn memory_available(&self) -> Option<u64> {
        None
    }
    fn upload(&self, host: &[f32]) -> Self::Buf;
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    fn buf_len(&self, buf: &Self::Buf) -> usize;
    /// [`Self::upload`] of a vector the caller gives up (the CPU keeps it: no copy).
    fn upload_vec(&self, host: Vec<f32>) -> Self::Buf {
        self.upload(&host)
    }
    /// [`Self::download`] of a buffer the caller gives up (the CPU hands it over: no copy).
    fn download_owned(&self, buf: Self::Buf) -> Vec<f32> {
        self.download(&buf)
    }

    /// The device address of `buf`, for a library that reads or writes it in place on the same
    /// device, ordered by [`Self::record_event`] and [`Self::wait_event`]. `None` where buffers
    /// are host memory (the CPU): such a library cannot use them.
    fn device_address(&self, buf: &Self::Buf) -> Option<u64> {
        let _ = buf;
        None
    }
    /// Records `event` on this backend's queue, behind every op queued so far: it completes when
    /// they have. Only a device backend has a queue (see [`Self::device_address`]).
    fn record_event(&self, event: QueueEvent) -> anyhow::Result<()> {
        let _ = event;
        anyhow::bail!(
            "{} runs each op as it is called: it has no queue to record an event on",
            self.name()
        )
    }
    /// Makes the ops queued after this wait until `event` has completed (on whatever queue it
    /// was recorded), without the host waiting.
    fn wait_event(&self, event: QueueEvent) -> anyhow::Result<()> {
        let _ = event;
        anyhow::bail!(
            "{} runs each op as it is called: it has no queue to make wait",
            self.name()
        )
    }

    /// The float views of views cut from uint8 images (mirror, mean subtraction, colour
    /// shift: see [`ByteViews`]), bit for bit what the loader's `render` makes; `mean` is
    /// `views.mean` in this backend's memory.
    fn finish_views(&self, views: &ByteViews, mean: &Self::Buf) -> anyhow::Result<Self::Buf>;
    /// Whether batches are best shipped as bytes and finished here ([`Self::finish_views`])
    /// rather than finished by the loader's threads: true for a GPU, which then receives a
    /// quarter of the bytes and does the arithmetic in microseconds.
    fn finishes_views(&self) -> bool {
        false
    }

    /// The algorithms this backend chose by timing them on this device (cuDNN's), as JSON
    /// to keep in the run folder: a timed choice may differ from one process to the next, and
    /// with it the last bits of the results; a process that adopts the kept choices
    /// ([`Self::adopt_timed_choices`]) runs the same algorithms. `None` where nothing is
    /// timed.
    fn timed_choices(&self) -> Option<serde_json::Value> {
        None
    }
    /// Takes choices kept by an earlier process ([`Self::timed_choices`]) for the convolutions
    /// not yet planned; returns how many it took. Choices made on another GPU model or cuDNN
    /// version are left (the reason is the error).
    fn adopt_timed_choices(&self, kept: &serde_json::Value) -> anyhow::Result<usize> {
        let _ = kept;
        Ok(0)
    }

    /// `y = conv(x, w) + b`.
    fn conv2d_forward(
        &self,
        g: &ConvGeom,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
    );
    /// Weight and bias gradients (overwritten), and the input gradient when `dx` is given.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_backward(
        &self,
        g: &ConvGeom,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
    );

    /// The input gradient alone, `dx` (overwritten), with the same bits as
    /// [`Backend::conv2d_backward`]'s: the part a column exchange waits for. The weight
    /// gradients then follow with `dx = None`, while the exchange travels.
    fn conv2d_backward_data(&self, g: &ConvGeom, w: &Self::Buf, dy: &Self::Buf, dx: &mut Self::Buf);

    /// Readies what convolutions of geometry `g` need beyond their tensors (on a GPU: the
    /// unfolding buffers, or cuDNN's algorithms and workspace), for the forward pass and, with
    /// `backward`, the backward pass too, so that a batch that does not fit fails when the
    /// network is prepared, naming the layer, not in the middle of a step (an allocation that
    /// fails is an [`OutOfMemory`]). The ops still ready it themselves when called without
    /// this. The CPU needs nothing.
    fn prepare_convolution(&self, g: &ConvGeom, backward: bool) -> anyhow::Result<()> {
        let _ = (g, backward);
        Ok(())
    }

    /// Several convolutions of one input (the columns' conv1, when one process holds both).
    /// The default runs them one by one; a backend may share the work.
    fn conv2d_forward_sets(
        &self,
        g: &ConvGeom,
        x: &Self::Buf,
        ws: &[&Self::Buf],
        bs: &[&Self::Buf],
        ys: &mut [&mut Self::Buf],
    ) {
        for ((w, b), y) in ws.iter().zip(bs).zip(ys.iter_mut()) {
            self.conv2d_forward(g, x, w, b, y);
        }
    }

    /// The part of [`Backend::conv2d_forward`] that input channels `part` contribute: `x` holds
    /// just those channels (`g.in_c` of them; `g` is the part's geometry), `w` is the whole
    /// layer's `[out_c, part.total, k, k]`. Writes `y = part + b`, or adds the part to `y` when
    /// `accumulate` (`b` is then unused). One group only.
    #[allow(clippy::too_many_arguments)]
    fn conv2d_forward_part(
        &self,
        g: &ConvGeom,
        part: InputPart,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
        accumulate: bool,
    );

    /// Backward of [`Backend::conv2d_forward_sets`] without the input gradient.
    fn conv2d_backward_sets(
        &self,
        g: &ConvGeom,
        x: &Self::Buf,
        ws: &[&Self::Buf],
        dys: &[&Self::Buf],
        dws: &mut [&mut Self::Buf],
        dbs: &mut [&mut Self::Buf],
    ) {
        for (((w, dy), dw), db) in ws.iter().zip(dys).zip(dws.iter_mut()).zip(dbs.iter_mut()) {
            self.conv2d_backward(g, x, w, dy, None, dw, db);
        }
    }

    /// `x = max(x, 0)` in place.
    fn relu_forward(&self, x: &mut Self::Buf);
    /// `dy *= (y > 0)` in place, `y` being the ReLU's output.
    fn relu_backward(&self, y: &Self::Buf, dy: &mut Self::Buf);

    /// `y = lrn(x)`; `scale` keeps `k + alpha * sum(x^2)` for the backward pass.
    fn lrn_forward(
        &self,
        g: &PlaneGeom,
        p: &LrnParams,
        x: &Self::Buf,
        y: &mut Self::Buf,
        scale: &mut Self::Buf,
    );
    #[allow(clippy::too_many_arguments)]
    fn lrn_backward(
        &self,
        g: &PlaneGeom,
        p: &LrnParams,
        x: &Self::Buf,
        y: &Self::Buf,
        scale: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
    );

    fn maxpool_forward(&self, g: &PoolGeom, x: &Self::Buf, y: &mut Self::Buf);
    /// Routes each output gradient to the first maximum of its window (found again from `x` and `y`).
    fn maxpool_backward(
        &self,
        g: &PoolGeom,
        x: &Self::Buf,
        y: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
    );

    /// Inverted dropout in place on a `[rows, cols]` block: kept values are scaled by `1 / (1 - p)`.
    fn dropout_forward(
        &self,
        rows: usize,
        cols: usize,
        p: f32,
        key: &DropoutKey,
        x: &mut Self::Buf,
    );
    /// The same mask and scale applied to the gradient, in place.
    fn dropout_backward(
        &self,
        rows: usize,
        cols: usize,
        p: f32,
        key: &DropoutKey,
        dy: &mut Self::Buf,
    );

    fn linear_forward(
        &self,
        g: &LinearGeom,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
    );
    /// The part of [`Backend::linear_forward`] that input features `part` contribute: `x` is
    /// `[rows, g.inp]`, just those features (`g` is the part's geometry), `w` the whole layer's
    /// `[out, part.total]`. Writes `y = part + b`, or adds the part to `y` when `accumulate`
    /// (`b` is then unused).
    #[allow(clippy::too_many_arguments)]
    fn linear_forward_part(
        &self,
        g: &LinearGeom,
        part: InputPart,
        x: &Self::Buf,
        w: &Self::Buf,
        b: &Self::Buf,
        y: &mut Self::Buf,
        accumulate: bool,
    );

    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        g: &LinearGeom,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        dx: Option<&mut Self::Buf>,
        dw: &mut Self::Buf,
        db: &mut Self::Buf,
    );

    /// The input gradient alone, `dx = dy w` (overwritten), with the same bits as
    /// [`Backend::linear_backward`]'s (see [`Backend::conv2d_backward_data`]).
    fn linear_backward_data(
        &self,
        g: &LinearGeom,
        w: &Self::Buf,
        dy: &Self::Buf,
        dx: &mut Self::Buf,
    );

    /// [`Self::softmax_xent`], and the logits, read without holding up what is queued next: a
    /// device copies the loss terms and the logits to page-locked memory behind the softmax,
    /// and the readout waits for that copy only, so that the backward pass is queued (and
    /// runs) before the host waits. The same values, bit for bit, as [`Self::softmax_xent`]
    /// and [`Self::download`].
    fn softmax_xent_read(
        &self,
        rows: usize,
        classes: usize,
        logits: &Self::Buf,
        labels: &[u32],
        dlogits: &mut Self::Buf,
    ) -> Box<dyn PendingReadout> {
        let loss = self.softmax_xent(rows, classes, logits, labels, dlogits);
        let logits = self.download(logits);
        Box::new(ReadyReadout(StepReadout { loss, logits }))
    }

    /// Mean softmax cross-entropy over `rows` rows of `classes` logits; writes its gradient and
    /// returns the loss.
    fn softmax_xent(
        &self,
        rows: usize,
        classes: usize,
        logits: &Self::Buf,
        labels: &[u32],
        dlogits: &mut Self::Buf,
    ) -> f32;

    /// One SGD step on `w` and its momentum `v`, from the gradient `g`.
    fn sgd_update(&self, p: &SgdParams, w: &mut Self::Buf, v: &mut Self::Buf, g: &Self::Buf);

    /// `x *= factor`, element by element (one rounding each: the replicas' mean is their sum
    /// scaled so, on every backend).
    fn scale(&self, x: &mut Self::Buf, factor: f32);

    /// Joins per-sample blocks side by side: `out[n] = parts[0][n] ++ parts[1][n] ++ ...`, each
    /// part holding `rows` blocks of `widths[i]` values. This is the all-gather along channels
    /// (NCHW) or features (`[rows, features]`).
    fn concat_rows(&self, rows: usize, parts: &[&Self::Buf], widths: &[usize], out: &mut Self::Buf);
    /// Takes columns `[offset, offset + width)` of every `total`-wide row of `src` into `dst`,
    /// adding to `dst` when `accumulate` (the reduce-scatter's sum when both halves live here).
    #[allow(clippy::too_many_arguments)]
    fn slice_rows(
        &self,
        rows: usize,
        total: usize,
        offset: usize,
        width: usize,
        src: &Self::Buf,
        dst: &mut Self::Buf,
        accumulate: bool,
    );
}
