//! Convolutions through cuDNN: forward, backward data and backward filter, grouped, NCHW.
//! Chosen with `ALEXNET_CONV=cudnn` (the default is unfolding plus cuBLAS) until it has been
//! checked and timed on a GPU beside the unfolding path; `selftest` and `scripts/gpu-check.sh`
//! run both.
//!
//! Strict f32 uses cuDNN's FMA math (no tensor cores); with TF32 allowed, its default math.
//! The backward algorithms are deterministic ones (see [`deterministic_filter`]).

use super::super::ConvGeom;
use cudarc::cudnn::{
    sys, ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, Cudnn,
    FilterDescriptor, TensorDescriptor,
};
use cudarc::driver::{CudaSlice, CudaStream};
use std::sync::Arc;

/// Whether cuDNN (libcudnn.so.9) can be loaded.
pub fn present() -> bool {
    // SAFETY: only tries to open the library.
    unsafe { sys::is_culib_present() }
}

/// A cuDNN handle with its workspace. Not Send by cudarc's choice (cuDNN handles must not be
/// used by two threads at once): the backend keeps it in a [`DnnCell`].
pub struct Dnn {
    handle: Arc<Cudnn>,
    stream: Arc<CudaStream>,
    workspace: Option<CudaSlice<u8>>,
    tf32: bool,
}

impl Drop for Dnn {
    fn drop(&mut self) {
        // cudarc destroys the handle without making the context current.
        let _ = self.stream.context().bind_to_thread();
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

type Descriptors = (
    TensorDescriptor<f32>,
    FilterDescriptor<f32>,
    TensorDescriptor<f32>,
    ConvDescriptor<f32>,
);

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

impl Dnn {
    pub fn new(stream: Arc<CudaStream>, tf32: bool) -> anyhow::Result<Dnn> {
        anyhow::ensure!(
            present(),
            "cuDNN (libcudnn.so.9) cannot be loaded: put its lib folder on LD_LIBRARY_PATH, or \
             leave ALEXNET_CONV unset for the unfolding path"
        );
        let handle = Cudnn::new(stream.clone()).map_err(|e| err("handle", e))?;
        Ok(Dnn {
            handle,
            stream,
            workspace: None,
            tf32,
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

    fn descriptors(&self, g: &ConvGeom) -> anyhow::Result<Descriptors> {
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
        conv.set_math_type(if self.tf32 {
            sys::cudnnMathType_t::CUDNN_DEFAULT_MATH
        } else {
            sys::cudnnMathType_t::CUDNN_FMA_MATH
        })
        .map_err(|e| err("math type", e))?;
        Ok((x, w, y, conv))
    }

    /// The workspace, at least `bytes` long (`None` for none).
    fn workspace(&mut self, bytes: usize) -> anyhow::Result<Option<&mut CudaSlice<u8>>> {
        if bytes == 0 {
            return Ok(None);
        }
        if self.workspace.as_ref().is_none_or(|w| w.len() < bytes) {
            self.workspace = None;
            self.workspace = Some(self.stream.alloc_zeros::<u8>(bytes).map_err(|e| {
                anyhow::anyhow!(
                    "out of GPU memory for cuDNN's workspace ({} MiB): {e:?}",
                    bytes >> 20
                )
            })?);
        }
        Ok(self.workspace.as_mut())
    }

    /// `y += conv(x, w)` (the bias is already in `y`).
    pub fn forward(
        &mut self,
        g: &ConvGeom,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) -> anyhow::Result<()> {
        self.bind()?;
        let (xd, wd, yd, cd) = self.descriptors(g)?;
        let op = ConvForward {
            conv: &cd,
            x: &xd,
            w: &wd,
            y: &yd,
        };
        let algo = op
            .pick_algorithm()
            .map_err(|e| err("forward algorithm", e))?;
        let bytes = op
            .get_workspace_size(algo)
            .map_err(|e| err("forward workspace", e))?;
        let ws = self.workspace(bytes)?;
        // SAFETY: the buffers' lengths match the descriptors (checked by the caller).
        unsafe { op.launch(algo, ws, (1.0f32, 1.0f32), x, w, y) }
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
        self.bind()?;
        let (xd, wd, yd, cd) = self.descriptors(g)?;
        let op = ConvBackwardFilter {
            conv: &cd,
            x: &xd,
            dw: &wd,
            dy: &yd,
        };
        let picked = op
            .pick_algorithm()
            .map_err(|e| err("backward filter algorithm", e))?;
        let (algo, bytes) = deterministic(picked, deterministic_filter(picked), |a| {
            op.get_workspace_size(a)
        })
        .map_err(|e| err("backward filter workspace", e))?;
        let ws = self.workspace(bytes)?;
        // SAFETY: as in `forward`.
        unsafe { op.launch(algo, ws, (1.0f32, 0.0f32), x, dw, dy) }
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
        self.bind()?;
        let (xd, wd, yd, cd) = self.descriptors(g)?;
        let op = ConvBackwardData {
            conv: &cd,
            dx: &xd,
            w: &wd,
            dy: &yd,
        };
        let picked = op
            .pick_algorithm()
            .map_err(|e| err("backward data algorithm", e))?;
        let (algo, bytes) = deterministic(picked, deterministic_data(picked), |a| {
            op.get_workspace_size(a)
        })
        .map_err(|e| err("backward data workspace", e))?;
        let ws = self.workspace(bytes)?;
        // SAFETY: as in `forward`.
        unsafe { op.launch(algo, ws, (1.0f32, 0.0f32), dx, w, dy) }
            .map_err(|e| err("convolution backward data", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cudnnConvolutionBwdDataAlgo_t as Data;
    use sys::cudnnConvolutionBwdFilterAlgo_t as Filter;

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
}
