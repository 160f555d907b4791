//! cuDNN's convolution algorithms timed on this GPU (`cudnnFindConvolution*Algorithm`), as
//! PyTorch's `cudnn.benchmark` and Caffe do, rather than taken from cuDNN's heuristic, which
//! picks from a model of the GPU and may not be the fastest here.
//!
//! cudarc runs the convolutions but keeps its descriptors' handles private, so the timing
//! makes descriptors of its own, with the same shape, mode, group count and math type as the
//! ones the convolution runs with (`cudnn.rs`); only the algorithms found here travel
//! there. Any failure here leaves the heuristic's choice in place.

use super::super::ConvGeom;
use cudarc::cudnn::{result, sys};
use cudarc::driver::CudaStream;
use std::sync::Arc;

/// What cuDNN measured for one algorithm.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Timing<A> {
    pub algo: A,
    /// Whether the algorithm ran, in strict f32 with FMA math as asked (cuDNN lists the ones it
    /// could not run too).
    pub ran: bool,
    pub ms: f32,
    /// Its workspace, bytes.
    pub bytes: usize,
    /// Whether it sums in a fixed order (no atomics), so that a run repeats itself bit for bit.
    pub deterministic: bool,
    /// The math type it was timed in (with TF32 allowed, cuDNN may time an algorithm in
    /// tensor-op math): the pass runs in it, as PyTorch's search sets it after timing.
    pub math: sys::cudnnMathType_t,
}

/// The fastest algorithm that ran, fits in `max_bytes` of workspace and, where `deterministic`
/// is asked for, sums in a fixed order; `None` if none qualifies.
pub fn fastest<A: Copy>(
    timings: &[Timing<A>],
    deterministic: bool,
    max_bytes: usize,
) -> Option<Timing<A>> {
    timings
        .iter()
        .filter(|t| t.ran && t.bytes <= max_bytes && (t.deterministic || !deterministic))
        .min_by(|a, b| a.ms.total_cmp(&b.ms))
        .copied()
}

/// The three passes' algorithms, as cuDNN timed them.
#[derive(Debug)]
pub struct Found {
    pub forward: Vec<Timing<sys::cudnnConvolutionFwdAlgo_t>>,
    pub filter: Vec<Timing<sys::cudnnConvolutionBwdFilterAlgo_t>>,
    pub data: Vec<Timing<sys::cudnnConvolutionBwdDataAlgo_t>>,
}

fn err(what: &str, e: impl std::fmt::Debug) -> anyhow::Error {
    anyhow::anyhow!("cuDNN, timing the algorithms: {what}: {e:?}")
}

/// A cuDNN handle of our own on the convolutions' stream, for the timing only.
pub struct TimingHandle(sys::cudnnHandle_t);

impl TimingHandle {
    pub fn new(stream: &Arc<CudaStream>) -> anyhow::Result<TimingHandle> {
        let handle = TimingHandle(result::create_handle().map_err(|e| err("handle", e))?);
        // SAFETY: the handle was just created; the stream outlives it (the backend holds both,
        // and drops the timing handle first: it is a field of `Dnn`, which holds the stream).
        unsafe { result::set_stream(handle.0, stream.cu_stream() as *mut _) }
            .map_err(|e| err("stream", e))?;
        Ok(handle)
    }
}

impl Drop for TimingHandle {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once.
        let _ = unsafe { result::destroy_handle(self.0) };
    }
}

/// One convolution's descriptors, destroyed when dropped.
struct Descriptors {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each was created in `describe` (a null one, left by a failure there, is
        // skipped), and is destroyed once.
        unsafe {
            if !self.x.is_null() {
                let _ = result::destroy_tensor_descriptor(self.x);
            }
            if !self.y.is_null() {
                let _ = result::destroy_tensor_descriptor(self.y);
            }
            if !self.w.is_null() {
                let _ = result::destroy_filter_descriptor(self.w);
            }
            if !self.conv.is_null() {
                let _ = result::destroy_convolution_descriptor(self.conv);
            }
        }
    }
}

/// The descriptors of `g` as `cudnn.rs` makes them through cudarc: NCHW f32 tensors, the
/// filter `[out_c, in_c / groups, k, k]`, cross-correlation with f32 compute, the group count,
/// and `math`.
fn describe(g: &ConvGeom, math: sys::cudnnMathType_t) -> anyhow::Result<Descriptors> {
    let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
    let f32_ = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;
    let i = |v: usize| v as i32;
    let mut d = Descriptors {
        x: std::ptr::null_mut(),
        w: std::ptr::null_mut(),
        y: std::ptr::null_mut(),
        conv: std::ptr::null_mut(),
    };
    d.x = result::create_tensor_descriptor().map_err(|e| err("input descriptor", e))?;
    d.y = result::create_tensor_descriptor().map_err(|e| err("output descriptor", e))?;
    d.w = result::create_filter_descriptor().map_err(|e| err("filter descriptor", e))?;
    d.conv =
        result::create_convolution_descriptor().map_err(|e| err("convolution descriptor", e))?;
    // SAFETY: the descriptors were just created and are not yet destroyed.
    unsafe {
        result::set_tensor4d_descriptor(
            d.x,
            nchw,
            f32_,
            [i(g.batch), i(g.in_c), i(g.in_h), i(g.in_w)],
        )
        .map_err(|e| err("input descriptor", e))?;
        result::set_tensor4d_descriptor(
            d.y,
            nchw,
            f32_,
            [i(g.batch), i(g.out_c), i(g.out_h()), i(g.out_w())],
        )
        .map_err(|e| err("output descriptor", e))?;
        result::set_filter4d_descriptor(
            d.w,
            f32_,
            nchw,
            [i(g.out_c), i(g.in_c / g.groups), i(g.kernel), i(g.kernel)],
        )
        .map_err(|e| err("filter descriptor", e))?;
        result::set_convolution2d_descriptor(
            d.conv,
            i(g.pad),
            i(g.pad),
            i(g.stride),
            i(g.stride),
            1,
            1,
            sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
            f32_,
        )
        .map_err(|e| err("convolution descriptor", e))?;
        result::set_convolution_group_count(d.conv, i(g.groups))
            .map_err(|e| err("group count", e))?;
        result::set_convolution_math_type(d.conv, math).map_err(|e| err("math type", e))?;
    }
    Ok(d)
}

/// Whether a pass asked to run in `asked` may run in `timed`: strict f32 (FMA math) only in
/// FMA math; with TF32 allowed (default math), default or tensor-op math, never the mode that
/// may also convert the data down to half precision.
pub fn allowed_math(asked: sys::cudnnMathType_t, timed: sys::cudnnMathType_t) -> bool {
    use sys::cudnnMathType_t::*;
    match asked {
        CUDNN_FMA_MATH => timed == CUDNN_FMA_MATH,
        _ => matches!(timed, CUDNN_DEFAULT_MATH | CUDNN_TENSOR_OP_MATH),
    }
}

/// Runs one of cuDNN's `cudnnFind...Algorithm` calls (`$call` given the count asked for, where
/// to write the count returned and where to write the results) with room for all `$count`
/// algorithms, and reads its results as [`Timing`]s. In strict f32 (`$math` is FMA math), an
/// entry timed in another math type does not count as run.
///
/// Safety: called in an unsafe block; `$perf` must be the call's result type, for which all
/// zero bits are a valid value.
macro_rules! find_pass {
    ($perf:ty, $count:expr, $math:expr, $what:expr, $call:expr) => {{
        let mut returned: i32 = 0;
        let mut perf: [$perf; $count] = std::mem::zeroed();
        ($call)($count as i32, &mut returned, perf.as_mut_ptr())
            .result()
            .map_err(|e| err($what, e))?;
        perf[..(returned.max(0) as usize).min($count)]
            .iter()
            .map(|p| Timing {
                algo: p.algo,
                ran: p.status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS
                    && allowed_math($math, p.mathType),
                ms: p.time,
                bytes: p.memory,
                deterministic: p.determinism == sys::cudnnDeterminism_t::CUDNN_DETERMINISTIC,
                math: p.mathType,
            })
            .collect::<Vec<_>>()
    }};
}

/// Times every algorithm of the three passes of `g` on this GPU, with `math` as the
/// convolution will run. cuDNN allocates the tensors and the largest workspace it tries
/// itself, and waits for the GPU: this runs once per geometry, when the network prepares.
pub fn find(h: &TimingHandle, g: &ConvGeom, math: sys::cudnnMathType_t) -> anyhow::Result<Found> {
    use sys::{
        cudnnConvolutionBwdDataAlgoPerf_t as DataPerf,
        cudnnConvolutionBwdFilterAlgoPerf_t as FilterPerf,
        cudnnConvolutionFwdAlgoPerf_t as FwdPerf,
    };
    let d = describe(g, math)?;
    // As many results as cuDNN has algorithms; cudarc's own queries use these counts too.
    const FORWARD: usize =
        sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize;
    const FILTER: usize =
        sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as usize;
    const DATA: usize =
        sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as usize;
    // SAFETY: all-zero perf structs are valid (status success, algorithm 0, ...); cuDNN fills
    // at most the requested count and says how many it filled; the descriptors and the handle
    // are live, and each call takes them in the order its C signature gives.
    unsafe {
        let forward = find_pass!(FwdPerf, FORWARD, math, "forward", |n, r, p| {
            sys::cudnnFindConvolutionForwardAlgorithm(h.0, d.x, d.w, d.conv, d.y, n, r, p)
        });
        let filter = find_pass!(FilterPerf, FILTER, math, "backward filter", |n, r, p| {
            sys::cudnnFindConvolutionBackwardFilterAlgorithm(h.0, d.x, d.y, d.conv, d.w, n, r, p)
        });
        let data = find_pass!(DataPerf, DATA, math, "backward data", |n, r, p| {
            sys::cudnnFindConvolutionBackwardDataAlgorithm(h.0, d.w, d.y, d.conv, d.x, n, r, p)
        });
        Ok(Found {
            forward,
            filter,
            data,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(algo: u8, ran: bool, ms: f32, bytes: usize, deterministic: bool) -> Timing<u8> {
        Timing {
            algo,
            ran,
            ms,
            bytes,
            deterministic,
            math: sys::cudnnMathType_t::CUDNN_FMA_MATH,
        }
    }

    #[test]
    fn the_fastest_algorithm_that_ran_fits_and_repeats_is_chosen() {
        let timings = [
            t(0, true, 3.0, 0, true),
            t(1, false, 0.1, 0, true),      // did not run
            t(2, true, 1.0, 1 << 30, true), // too much workspace
            t(3, true, 1.5, 100, false),    // atomics
            t(4, true, 2.0, 100, true),
        ];
        // Not sorted by time: the choice does not rely on cuDNN's order.
        let algo = |t: Option<Timing<u8>>| t.map(|t| t.algo);
        assert_eq!(algo(fastest(&timings, true, 1 << 20)), Some(4));
        assert_eq!(algo(fastest(&timings, false, 1 << 20)), Some(3));
        assert_eq!(algo(fastest(&timings, false, 1 << 30)), Some(2));
        assert_eq!(fastest(&timings[1..2], false, 1 << 30), None);
        assert_eq!(fastest::<u8>(&[], false, 1 << 30), None);
        // Strict f32 runs in FMA math only; TF32 never in the mode that may convert to half.
        use sys::cudnnMathType_t::*;
        assert!(allowed_math(CUDNN_FMA_MATH, CUDNN_FMA_MATH));
        assert!(!allowed_math(CUDNN_FMA_MATH, CUDNN_DEFAULT_MATH));
        assert!(allowed_math(CUDNN_DEFAULT_MATH, CUDNN_TENSOR_OP_MATH));
        assert!(!allowed_math(
            CUDNN_DEFAULT_MATH,
            CUDNN_TENSOR_OP_MATH_ALLOW_CONVERSION
        ));
        // The winner comes with the math type it was timed in.
        let mut tensor_op = timings;
        tensor_op[4].math = sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH;
        let won = fastest(&tensor_op, true, 1 << 20).unwrap();
        assert_eq!(
            (won.algo, won.math),
            (4, sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH)
        );
    }
}
