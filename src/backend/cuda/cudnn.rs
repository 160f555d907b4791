//! Convolutions through cuDNN: forward, backward data and backward filter, grouped, NCHW.
//! Chosen with `--conv cudnn` (the default is unfolding plus cuBLAS) until it has been
//! checked and timed on a GPU beside the unfolding path; `selftest` and `scripts/gpu-check.sh`
//! run both.
//!
//! Strict f32 uses cuDNN's FMA math (no tensor cores); with TF32 allowed, its default math,
//! and each pass then runs in the math type its timed algorithm was timed in (one descriptor
//! per pass), as PyTorch's search does.
//! Each convolution's algorithms are timed on the GPU once ([`super::cudnn_find`]), the fastest
//! taken (`--cudnn-algos heuristic`: cuDNN's heuristic instead); the backward ones are
//! deterministic ones (see [`deterministic_filter`]).

use super::super::{ConvGeom, OutOfMemory};
use super::cudnn_find::{self, TimingHandle};
use cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn,
    FilterDescriptor, TensorDescriptor,
};
use cudarc::driver::{CudaSlice, CudaStream};
use std::collections::HashMap;
use std::sync::Arc;

/// Whether cuDNN (libcudnn.so.9) can be loaded.
pub fn present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { sys::is_culib_present() }
}

pub use crate::backend::settings::AlgoChoice;

/// One convolution's choice, each pass's algorithm and math type as cuDNN numbers them: what
/// the run folder keeps, so that a resumed or restarted process runs the same algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Chosen {
    pub forward: u32,
    pub filter: u32,
    pub data: u32,
    /// The forward, backward filter and backward data passes' math types.
    pub math: [u32; 3],
}

/// cuDNN's enums from the numbers [`Chosen`] keeps; `None` outside their range.
macro_rules! from_number {
    ($name:ident, $t:ty, $count:expr) => {
        fn $name(n: u32) -> Option<$t> {
            // SAFETY: the enum is `repr(u32)` with every value in `0..count` a variant.
            (n < $count as u32).then(|| unsafe { std::mem::transmute::<u32, $t>(n) })
        }
    };
}
from_number!(
    forward_algo,
    sys::cudnnConvolutionFwdAlgo_t,
    sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT
);
from_number!(
    filter_algo,
    sys::cudnnConvolutionBwdFilterAlgo_t,
    sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT
);
from_number!(
    data_algo,
    sys::cudnnConvolutionBwdDataAlgo_t,
    sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT
);
from_number!(
    math_type,
    sys::cudnnMathType_t,
    sys::cudnnMathType_t::CUDNN_FMA_MATH as u32 + 1
);

/// A [`Chosen`] as cuDNN's types: each pass's algorithm and math type.
type Decoded = (
    (sys::cudnnConvolutionFwdAlgo_t, sys::cudnnMathType_t),
    (sys::cudnnConvolutionBwdFilterAlgo_t, sys::cudnnMathType_t),
    (sys::cudnnConvolutionBwdDataAlgo_t, sys::cudnnMathType_t),
);

impl Chosen {
    fn decode(&self) -> Option<Decoded> {
        Some((
            (forward_algo(self.forward)?, math_type(self.math[0])?),
            (filter_algo(self.filter)?, math_type(self.math[1])?),
            (data_algo(self.data)?, math_type(self.math[2])?),
        ))
    }
}

/// A cuDNN handle with its convolutions' plans and their workspace. Not Send by cudarc's choice (cuDNN handles must not be
/// used by two threads at once): the backend keeps it in a [`DnnCell`].
pub struct Dnn {
    /// The timing's own handle (see [`cudnn_find`]), while the algorithms are timed; dropped
    /// before `stream`, whose stream it runs on.
    timing: Option<TimingHandle>,
    handle: Arc<Cudnn>,
    stream: Arc<CudaStream>,
    /// Each convolution's plan, by geometry (a new batch size is a new geometry).
    plans: HashMap<ConvGeom, Plan>,
    /// One workspace, as large as the largest plan needs: the passes run one at a time.
    workspace: Option<CudaSlice<u8>>,
    tf32: bool,
    /// Choices kept by an earlier process, used instead of timing (see [`Chosen`]).
    adopted: HashMap<ConvGeom, Chosen>,
}

impl Drop for Dnn {
    fn drop(&mut self) {
        // cudarc destroys the handle without making the context current. A bind first reports
        // (and clears) any error that earlier asynchronous work left, without binding: the
        // second binds.
        let ctx = self.stream.context();
        if ctx.bind_to_thread().is_err() {
            let _ = ctx.bind_to_thread();
        }
    }
}

/// [`Dnn`] behind a mutex: one thread at a time uses the handle and its descriptors, which
/// is what cuDNN asks of its users.
pub struct DnnCell(pub std::sync::Mutex<Dnn>);

// SAFETY: every use of the handle goes through the mutex, so no two threads use it at once;
// cuDNN handles may move between threads.
unsafe impl Send for DnnCell {}
// SAFETY: as above.
unsafe impl Sync for DnnCell {}

/// What one convolution's three passes need, found once per geometry: cuDNN's descriptors,
/// the algorithms (the backward ones deterministic) and the workspace each pass needs.
/// Finding them costs a heuristic query per pass, and a step runs every convolution three
/// times per column: they are kept, not found again each call.
struct Plan {
    x: TensorDescriptor<f32>,
    w: FilterDescriptor<f32>,
    y: TensorDescriptor<f32>,
    /// One convolution descriptor per pass (forward, backward filter, backward data): each
    /// carries the math type its algorithm was timed in.
    conv: [ConvDescriptor<f32>; 3],
    forward: sys::cudnnConvolutionFwdAlgo_t,
    filter: sys::cudnnConvolutionBwdFilterAlgo_t,
    data: sys::cudnnConvolutionBwdDataAlgo_t,
    /// Workspace bytes of the forward pass, and of all three passes.
    forward_bytes: usize,
    any_bytes: usize,
    /// What was chosen, as the run folder keeps it.
    chosen: Chosen,
    /// Whether the algorithms were timed here or adopted (the heuristic's are not kept).
    keep: bool,
}

fn err(what: &str, e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow::anyhow!("cuDNN {what}: {e:?}")
}

/// cuDNN's backward algorithms 0 (data and filter) and 3 (filter) add into their outputs with
/// atomics, so their sums change order from run to run; the heuristic may pick them. They are
/// replaced by algorithm 1, which sums in a fixed order: a run then repeats itself bit for bit,
/// resumes exactly and trains the same parameters whatever finishes the views, as on the
/// unfolding path (whose kernels use no atomics).
fn deterministic_filter(
    a: sys::cudnnConvolutionBwdFilterAlgo_t,
) -> sys::cudnnConvolutionBwdFilterAlgo_t {
    use sys::cudnnConvolutionBwdFilterAlgo_t::*;
    match a {
        CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0 | CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3 => {
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1
        }
        other => other,
    }
}

/// See [`deterministic_filter`].
fn deterministic_data(a: sys::cudnnConvolutionBwdDataAlgo_t) -> sys::cudnnConvolutionBwdDataAlgo_t {
    use sys::cudnnConvolutionBwdDataAlgo_t::*;
    match a {
        CUDNN_CONVOLUTION_BWD_DATA_ALGO_0 => CUDNN_CONVOLUTION_BWD_DATA_ALGO_1,
        other => other,
    }
}

/// The deterministic replacement `wanted` of the heuristic's `picked` algorithm and its
/// workspace bytes; `picked` (with a warning) where cuDNN does not support the replacement for
/// this convolution.
fn deterministic<A: Copy + PartialEq + std::fmt::Debug, E: std::fmt::Debug>(
    picked: A,
    wanted: A,
    workspace: impl Fn(A) -> Result<usize, E>,
) -> Result<(A, usize), E> {
    if wanted != picked {
        match workspace(wanted) {
            Ok(bytes) => return Ok((wanted, bytes)),
            Err(e) => tracing::warn!(
                ?picked,
                ?wanted,
                error = ?e,
                "cuDNN does not support the deterministic algorithm here: this convolution's \
                 gradients may differ in their last bits from run to run"
            ),
        }
    }
    Ok((picked, workspace(picked)?))
}

/// A pass's algorithm and its workspace bytes: the one timing chose (`timed`), or else (also
/// where cuDNN will not size its workspace) the heuristic's pick, replaced by its
/// deterministic counterpart where cuDNN supports that.
fn choose<A: Copy + PartialEq + std::fmt::Debug, E: std::fmt::Debug>(
    timed: Option<A>,
    pick: impl FnOnce() -> Result<A, E>,
    replacement: impl Fn(A) -> A,
    workspace: impl Fn(A) -> Result<usize, E>,
) -> Result<(A, usize), E> {
    if let Some(a) = timed {
        match workspace(a) {
            Ok(bytes) => return Ok((a, bytes)),
            Err(e) => tracing::warn!(
                algorithm = ?a,
                error = ?e,
                "cuDNN will not size the workspace of the algorithm its timing chose: the \
                 heuristic's choice instead"
            ),
        }
    }
    let picked = pick()?;
    deterministic(picked, replacement(picked), workspace)
}

impl Dnn {
    pub fn new(stream: Arc<CudaStream>, tf32: bool, algos: AlgoChoice) -> anyhow::Result<Dnn> {
        anyhow::ensure!(
            present(),
            "cuDNN (libcudnn.so.9) cannot be loaded: put its lib folder on LD_LIBRARY_PATH, or \
             use --conv unfold for the unfolding path"
        );
        let handle = Cudnn::new(stream.clone()).map_err(|e| err("handle", e))?;
        let timing = match algos {
            AlgoChoice::Heuristic => None,
            AlgoChoice::Timed => TimingHandle::new(&stream)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, "cuDNN's algorithms will come from its heuristic")
                })
                .ok(),
        };
        Ok(Dnn {
            timing,
            handle,
            stream,
            plans: HashMap::new(),
            workspace: None,
            tf32,
            adopted: HashMap::new(),
        })
    }

    /// cuDNN's calls do not make the context current (kernel launches do): this thread may not
    /// have run one yet.
    fn bind(&self) -> anyhow::Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| err("binding the CUDA context", e))
    }

    /// The plan of `g`: kept choices (where `use_kept`), else timed, else the heuristic's.
    /// `None` where the kept choice needs more workspace than this run can spare now.
    fn new_plan(&self, g: &ConvGeom, use_kept: bool) -> anyhow::Result<Option<Plan>> {
        // cuDNN's 4-d descriptors count a tensor's elements in 32 bits.
        let largest = g.in_len().max(g.out_len());
        anyhow::ensure!(
            largest <= i32::MAX as usize,
            "cuDNN cannot describe this convolution at batch {}: one of its tensors holds {largest} \
             values, beyond cuDNN's 2^31 - 1; lower --batch, or use --conv unfold for the \
             unfolding path",
            g.batch
        );
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let i = |v: usize| v as i32;
        let x = self
            .handle
            .create_4d_tensor::<f32>(nchw, [i(g.batch), i(g.in_c), i(g.in_h), i(g.in_w)])
            .map_err(|e| err("input descriptor", e))?;
        let w = self
            .handle
            .create_4d_filter::<f32>(
                nchw,
                [i(g.out_c), i(g.in_c / g.groups), i(g.kernel), i(g.kernel)],
            )
            .map_err(|e| err("filter descriptor", e))?;
        let y = self
            .handle
            .create_4d_tensor::<f32>(nchw, [i(g.batch), i(g.out_c), i(g.out_h()), i(g.out_w())])
            .map_err(|e| err("output descriptor", e))?;
        let describe = |math: sys::cudnnMathType_t| -> anyhow::Result<ConvDescriptor<f32>> {
            let mut conv = self
                .handle
                .create_conv2d::<f32>(
                    [i(g.pad); 2],
                    [i(g.stride); 2],
                    [1, 1],
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                )
                .map_err(|e| err("convolution descriptor", e))?;
            conv.set_group_count(i(g.groups))
                .map_err(|e| err("group count", e))?;
            conv.set_math_type(math).map_err(|e| err("math type", e))?;
            Ok(conv)
        };
        let math = if self.tf32 {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        };
        // Choices kept by an earlier process replace the timing (and the heuristic).
        let adopted = (self.adopted.get(g)).filter(|_| use_kept).and_then(|c| {
            let decoded = c.decode().filter(|(f, w, d)| {
                [f.1, w.1, d.1]
                    .iter()
                    .all(|&m| cudnn_find::allowed_math(math, m))
            });
            if decoded.is_none() {
                tracing::warn!(
                    ?g,
                    ?c,
                    "a kept cuDNN choice names no algorithm, or a math type this run does not \
                     allow: timing instead"
                );
            }
            decoded
        });
        let timing = self.timing.as_ref().filter(|_| adopted.is_none());
        let timed = timing.and_then(|h| {
            cudnn_find::find(h, g, math)
                .inspect_err(|e| {
                    tracing::warn!(error = %e, ?g, "this convolution's algorithms come from cuDNN's heuristic")
                })
                .ok()
        });
        // Workspace beyond half the free memory is not worth an algorithm: the batch's
        // activations need it more.
        let max_bytes = self
            .stream
            .context()
            .mem_get_info()
            .map(|(free, _)| free / 2)
            .unwrap_or(usize::MAX);

        // Each pass's winner, with the math type it was timed in: its descriptor is set to
        // that type (with TF32 allowed, tensor-op math may win one pass and not another);
        // without a winner, the pass runs in `math` with the heuristic's algorithm.
        fn won<A: Copy>(t: Option<cudnn_find::Timing<A>>) -> Option<(A, sys::cudnnMathType_t)> {
            t.map(|t| (t.algo, t.math))
        }
        let forward_won = (adopted.map(|a| a.0)).or_else(|| {
            won((timed.as_ref()).and_then(|t| cudnn_find::fastest(&t.forward, false, max_bytes)))
        });
        let filter_won = (adopted.map(|a| a.1)).or_else(|| {
            won((timed.as_ref()).and_then(|t| cudnn_find::fastest(&t.filter, true, max_bytes)))
        });
        let data_won = (adopted.map(|a| a.2)).or_else(|| {
            won((timed.as_ref()).and_then(|t| cudnn_find::fastest(&t.data, true, max_bytes)))
        });
        let maths = [
            forward_won.map_or(math, |t| t.1),
            filter_won.map_or(math, |t| t.1),
            data_won.map_or(math, |t| t.1),
        ];
        let conv = [
            describe(maths[0])?,
            describe(maths[1])?,
            describe(maths[2])?,
        ];
        let fwd = ConvForward {
            conv: &conv[0],
            x: &x,
            w: &w,
            y: &y,
        };
        let bwd_filter = ConvBackwardFilter {
            conv: &conv[1],
            x: &x,
            dw: &w,
            dy: &y,
        };
        let bwd_data = ConvBackwardData {
            conv: &conv[2],
            dx: &x,
            w: &w,
            dy: &y,
        };
        let (forward, forward_bytes) = choose(
            forward_won.map(|t| t.0),
            || fwd.pick_algorithm(),
            |a| a,
            |a| fwd.get_workspace_size(a),
        )
        .map_err(|e| err("forward algorithm", e))?;
        let (filter, filter_bytes) = choose(
            filter_won.map(|t| t.0),
            || bwd_filter.pick_algorithm(),
            deterministic_filter,
            |a| bwd_filter.get_workspace_size(a),
        )
        .map_err(|e| err("backward filter algorithm", e))?;
        let (data, data_bytes) = choose(
            data_won.map(|t| t.0),
            || bwd_data.pick_algorithm(),
            deterministic_data,
            |a| bwd_data.get_workspace_size(a),
        )
        .map_err(|e| err("backward data algorithm", e))?;
        let any_bytes = forward_bytes.max(filter_bytes).max(data_bytes);
        if adopted.is_some() && any_bytes > max_bytes {
            tracing::warn!(
                ?g,
                workspace_mib = any_bytes >> 20,
                free_half_mib = max_bytes >> 20,
                "the kept cuDNN choice needs more workspace than this run can spare: timing instead"
            );
            return Ok(None);
        }
        tracing::debug!(
            ?g,
            timed = timed.is_some(),
            ?forward,
            ?filter,
            ?data,
            ?maths,
            adopted = adopted.is_some(),
            workspace_mib = forward_bytes.max(filter_bytes).max(data_bytes) >> 20,
            "cuDNN convolution planned"
        );
        Ok(Some(Plan {
            x,
            w,
            y,
            conv,
            forward,
            filter,
            data,
            forward_bytes,
            any_bytes: forward_bytes.max(filter_bytes).max(data_bytes),
            chosen: Chosen {
                forward: forward as u32,
                filter: filter as u32,
                data: data as u32,
                math: maths.map(|m| m as u32),
            },
            keep: adopted.is_some() || timed.is_some(),
        }))
    }

    /// Every planned convolution's choice that was timed here or adopted, by geometry.
    pub fn choices(&self) -> Vec<(ConvGeom, Chosen)> {
        let mut all: Vec<(ConvGeom, Chosen)> = (self.plans.iter())
            .filter(|(_, p)| p.keep)
            .map(|(g, p)| (*g, p.chosen))
            .collect();
        all.sort_by_key(|(g, _)| format!("{g:?}"));
        all
    }

    /// Takes kept choices for convolutions not planned yet; returns how many. None under
    /// `--cudnn-algos heuristic`, whose choice is the same in every process anyway.
    pub fn adopt(&mut self, kept: impl IntoIterator<Item = (ConvGeom, Chosen)>) -> usize {
        if self.timing.is_none() {
            return 0;
        }
        let mut n = 0;
        for (g, c) in kept {
            if !self.plans.contains_key(&g) {
                self.adopted.insert(g, c);
                n += 1;
            }
        }
        n
    }

    /// Finds the plan of `g` (once) and grows the workspace to what its forward pass needs
    /// and, with `backward`, its backward passes too, so that a convolution that does not fit
    /// fails here, before a step starts, when the network prepares its layers.
    pub fn prepare(&mut self, g: &ConvGeom, backward: bool) -> anyhow::Result<()> {
        self.bind()?;
        if !self.plans.contains_key(g) {
            let plan = match self.new_plan(g, true)? {
                Some(plan) => plan,
                None => (self.new_plan(g, false)?).expect("a plan without kept choices"),
            };
            self.plans.insert(*g, plan);
        }
        let plan = &self.plans[g];
        let bytes = if backward {
            plan.any_bytes
        } else {
            plan.forward_bytes
        };
        if bytes > 0 && self.workspace.as_ref().is_none_or(|w| w.len() < bytes) {
            self.workspace = None;
            self.workspace = Some(self.stream.alloc_zeros::<u8>(bytes).map_err(|e| {
                anyhow::Error::new(OutOfMemory(format!(
                    "out of GPU memory for cuDNN's workspace ({} MiB): {e:?}",
                    bytes >> 20
                )))
            })?);
        }
        Ok(())
    }

    /// The plan of `g` and the workspace, prepared for the forward pass or all passes.
    fn ready(
        &mut self,
        g: &ConvGeom,
        backward: bool,
    ) -> anyhow::Result<(&Plan, Option<&mut CudaSlice<u8>>)> {
        self.prepare(g, backward)?;
        Ok((&self.plans[g], self.workspace.as_mut()))
    }

    /// `y += conv(x, w)` (the bias is already in `y`).
    pub fn forward(
        &mut self,
        g: &ConvGeom,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> anyhow::Result<()> {
        let (p, ws) = self.ready(g, false)?;
        let op = ConvForward {
            conv: &p.conv[0],
            x: &p.x,
            w: &p.w,
            y: &p.y,
        };
        // SAFETY: the buffers' lengths match the descriptors (checked by the caller).
        unsafe { op.launch(p.forward, ws, (1.0f32, 1.0f32), x, w, y) }
            .map_err(|e| err("convolution forward", e))
    }

    /// `dw = conv_backward_filter(x, dy)`.
    pub fn backward_filter(
        &mut self,
        g: &ConvGeom,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
    ) -> anyhow::Result<()> {
        let (p, ws) = self.ready(g, true)?;
        let op = ConvBackwardFilter {
            conv: &p.conv[1],
            x: &p.x,
            dw: &p.w,
            dy: &p.y,
        };
        // SAFETY: as in `forward`.
        unsafe { op.launch(p.filter, ws, (1.0f32, 0.0f32), x, dw, dy) }
            .map_err(|e| err("convolution backward filter", e))
    }

    /// `dx = conv_backward_data(w, dy)`.
    pub fn backward_data(
        &mut self,
        g: &ConvGeom,
        w: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) -> anyhow::Result<()> {
        let (p, ws) = self.ready(g, true)?;
        let op = ConvBackwardData {
            conv: &p.conv[2],
            dx: &p.x,
            w: &p.w,
            dy: &p.y,
        };
        // SAFETY: as in `forward`.
        unsafe { op.launch(p.data, ws, (1.0f32, 0.0f32), dx, w, dy) }
            .map_err(|e| err("convolution backward data", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cudnnConvolutionBwdDataAlgo_t as Data;
    use sys::cudnnConvolutionBwdFilterAlgo_t as Filter;

    #[test]
    fn kept_choices_decode_to_cudnns_enums_and_nothing_else() {
        let c = Chosen {
            forward: 7,
            filter: 1,
            data: 5,
            math: [1, 3, 0],
        };
        let (f, w, d) = c.decode().unwrap();
        assert_eq!(
            f,
            (
                sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_WINOGRAD_NONFUSED,
                sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH
            )
        );
        assert_eq!(
            w,
            (
                Filter::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
                sys::cudnnMathType_t::CUDNN_FMA_MATH
            )
        );
        assert_eq!(d.1, sys::cudnnMathType_t::CUDNN_DEFAULT_MATH);
        assert_eq!(d.0 as u32, 5);
        // The counts themselves, and beyond, name no algorithm; a math type past FMA none.
        for bad in [
            Chosen { forward: 8, ..c },
            Chosen {
                filter: Filter::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as u32,
                ..c
            },
            Chosen {
                data: Data::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as u32,
                ..c
            },
            Chosen {
                math: [0, 4, 0],
                ..c
            },
        ] {
            assert!(bad.decode().is_none(), "{bad:?}");
        }
        // What the run folder holds reads back as written.
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Chosen>(&json).unwrap(), c);
    }

    #[test]
    fn atomic_backward_algorithms_are_replaced_where_supported() {
        use Filter::*;
        assert_eq!(
            deterministic_filter(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0),
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1
        );
        assert_eq!(
            deterministic_filter(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3),
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1
        );
        assert_eq!(
            deterministic_filter(CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT),
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT
        );
        assert_eq!(
            deterministic_data(Data::CUDNN_CONVOLUTION_BWD_DATA_ALGO_0),
            Data::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1
        );
        let (a0, a1) = (
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
        );
        // Supported: the replacement and its workspace.
        let sizes = |a: Filter| -> Result<usize, String> { Ok(if a == a1 { 7 } else { 3 }) };
        assert_eq!(deterministic(a0, a1, sizes), Ok((a1, 7)));
        // Not supported: the heuristic's pick stands.
        let unsupported = |a: Filter| -> Result<usize, String> {
            if a == a1 {
                Err("no".into())
            } else {
                Ok(3)
            }
        };
        assert_eq!(deterministic(a0, a1, unsupported), Ok((a0, 3)));
        // Nothing to replace, and a failure of the pick itself is the caller's error.
        let failing = |_: Filter| -> Result<usize, String> { Err("bad".into()) };
        assert_eq!(deterministic(a1, a1, failing), Err("bad".to_string()));
    }

    #[test]
    fn a_timed_algorithm_stands_and_the_heuristics_is_made_deterministic() {
        use Filter::*;
        let (a0, a1, fft) = (
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
            CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
        );
        let sizes = |a: Filter| -> Result<usize, String> { Ok(if a == fft { 9 } else { 4 }) };
        let unused = || -> Result<Filter, String> { panic!("the heuristic is not asked") };
        let no_fft = |a: Filter| -> Result<usize, String> {
            if a == fft {
                Err("not sized".into())
            } else {
                Ok(4)
            }
        };
        let heuristic = || -> Result<Filter, String> { Ok(a0) };
        // Where cuDNN will not size the timed choice's workspace, the heuristic's stands.
        assert_eq!(
            choose(Some(fft), heuristic, deterministic_filter, no_fft),
            Ok((a1, 4))
        );
        assert_eq!(
            choose(Some(fft), unused, deterministic_filter, sizes),
            Ok((fft, 9))
        );
        let heuristic = || -> Result<Filter, String> { Ok(a0) };
        assert_eq!(
            choose(None, heuristic, deterministic_filter, sizes),
            Ok((a1, 4))
        );
        let failing = || -> Result<Filter, String> { Err("no algorithm".into()) };
        assert_eq!(
            choose(None, failing, deterministic_filter, sizes),
            Err("no algorithm".to_string())
        );
    }
}
