//! The CUDA backend: our kernels (`kernels/*.cu`, compiled by NVRTC at start for the GPU in
//! use) for LRN, pooling, ReLU, dropout, softmax cross-entropy, bias gradients, SGD and the
//! column exchange's copies; cuBLAS for the fully connected layers and for convolution as
//! unfolding (im2col) plus matrix products.
//!
//! Everything runs on one stream, in order, so a buffer is never read before it is written.
//! The driver, NVRTC and cuBLAS are loaded at run time: a machine without them gets an error
//! that says what is missing, never a crash. cuBLAS runs in strict f32 unless TF32 is asked
//! for (`--tf32`), so results match the CPU backend to 1e-4.

pub mod cudnn;
mod cudnn_find;
pub mod kernels;
mod staging;

use super::{
    Backend, ByteViews, ConvGeom, DeviceSettings, DropoutKey, InputPart, LinearGeom, LrnParams,
    OutOfMemory, PlaneGeom, PoolGeom, SgdParams,
};
use cudarc::cublas::{
    sys::cublasOperation_t as Op, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig,
};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut,
    DeviceRepr, DriverError, LaunchConfig, PinnedHostSlice, PushKernelArg,
};
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

/// The CUDA version this build's libraries (cuBLAS 13, NVRTC 13, cuDNN for CUDA 13) and the
/// PTX that NVRTC 13 writes need of the driver, as `cuDriverGetVersion` counts it.
const CUDA_VERSION_NEEDED: i32 = 13000;
/// The oldest GPUs NVRTC 13 compiles for: compute capability 7.5 (Turing).
const OLDEST_GPU: (i32, i32) = (7, 5);

/// Why the CUDA backend cannot start here, or `None` when a driver and a device are present.
pub fn unavailable() -> Option<String> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Some(
            "no NVIDIA driver on this machine (libcuda.so.1 cannot be loaded)".to_string(),
        );
    }
    let mut version = 0;
    // SAFETY: the library is present; the call only writes the version.
    let answered = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    if answered == cudarc::driver::sys::CUresult::CUDA_SUCCESS && version < CUDA_VERSION_NEEDED {
        return Some(format!(
            "the NVIDIA driver supports CUDA up to {}.{}, and this build needs CUDA {}.{} \
             (driver 580 or newer): update the driver",
            version / 1000,
            version % 1000 / 10,
            CUDA_VERSION_NEEDED / 1000,
            CUDA_VERSION_NEEDED % 1000 / 10,
        ));
    }
    match CudaContext::device_count() {
        Ok(0) => Some("the NVIDIA driver sees no GPU".to_string()),
        Ok(_) => None,
        Err(e) => Some(format!("the NVIDIA driver does not answer: {e:?}")),
    }
}

/// Keeps memory freed on the GPU in its default stream-ordered pool for reuse. The pool's
/// release threshold is 0 by default, so the driver takes back every freed byte at each
/// synchronisation and the next step allocates it again; with the threshold at its maximum
/// the pool only grows to the largest step's needs. Without stream-ordered allocation (the
/// driver says so) cudarc allocates synchronously and there is no pool to set.
fn keep_freed_memory(ctx: &CudaContext) -> Result<(), DriverError> {
    use cudarc::driver::{result, sys};
    if !ctx.has_async_alloc() {
        return Ok(());
    }
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the device comes from a context that is open; `CU_MEMPOOL_ATTR_RELEASE_THRESHOLD`
    // takes a pointer to a `cuuint64_t`, which `threshold` is and which outlives the call.
    unsafe {
        let pool = result::device::get_default_mem_pool(ctx.cu_device())?;
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
}

/// The CUDA version the driver supports (13000 for 13.0), or `None` without a driver.
pub fn driver_version() -> Option<i32> {
    // SAFETY: only tries to open the library.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return None;
    }
    let mut version = 0;
    // SAFETY: the library is present; the call only writes the version.
    let answered = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    (answered == cudarc::driver::sys::CUresult::CUDA_SUCCESS).then_some(version)
}

/// GPUs the driver sees (0 without a driver).
pub fn device_count() -> usize {
    if unavailable().is_some() {
        return 0;
    }
    CudaContext::device_count()
        .map(|n| n.max(0) as usize)
        .unwrap_or(0)
}

/// The GPU an allocation failed on, for messages.
#[derive(Clone, Debug)]
struct DeviceInfo {
    name: String,
    ordinal: usize,
}

pub struct Cuda {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// cuBLAS and cuDNN's handles panic when they fail to destroy themselves, which they do
    /// after a GPU fault: a second panic while the first unwinds aborts the process before
    /// the worker reports. So they are dropped by hand, and left alone while a panic unwinds
    /// (see `Drop`).
    blas: ManuallyDrop<CudaBlas>,
    functions: HashMap<&'static str, CudaFunction>,
    device: DeviceInfo,
    tf32: bool,
    /// The unfolding path's scratch buffers, grown on demand and kept between steps.
    unfolding: Mutex<Unfolding>,
    /// Most floats of unfolded images per pass ([`MAX_COLUMNS`] unless a test lowers it).
    max_columns: usize,
    /// Per-row losses of the softmax (f64, as on the CPU).
    row_loss: Mutex<Option<CudaSlice<f64>>>,
    /// Page-locked buffers the loss terms and logits are read back through.
    readback: Arc<Mutex<Vec<Readback>>>,
    /// cuDNN for the convolutions, when chosen (`ConvPath::Cudnn`); dropped by hand, as `blas`.
    dnn: ManuallyDrop<Option<cudnn::DnnCell>>,
    /// Pinned buffers that uploads pass through, so that they do not wait for the GPU.
    staging: Mutex<staging::Staging>,
}

/// The unfolding path's scratch: one buffer of each kind serves every layer, in turn (one
/// stream runs the ops in order), sized for the largest.
#[derive(Default)]
struct Unfolding {
    /// Unfolded images (im2col's output, or the input gradient before col2im folds it).
    columns: Option<CudaSlice<f32>>,
    /// A pass's output gradient regrouped channel-major, for the weight gradient.
    gradients: Option<CudaSlice<f32>>,
}

/// How im2col lays out the unfolded images (see `kernels/im2col.cu`).
#[derive(Clone, Copy)]
enum ColumnLayout {
    /// `[images][rows, pixels]`: one product per image (forward pass, input gradient).
    ByImage,
    /// `[rows][images, pixels]`: one product over a pass's images and pixels together (weight
    /// gradient).
    ByRow,
}

pub use super::settings::ConvPath;

/// Threads per block of the elementwise kernels.
const THREADS: u32 = 256;
/// Most floats the convolution's unfolding buffer may hold (1 GiB).
const MAX_COLUMNS: usize = 1 << 28;

/// One thread per element (most of our kernels are not grid-stride loops, so the grid must
/// cover every element: up to 2^31 - 1 blocks).
fn grid(n: usize) -> LaunchConfig {
    let blocks = u32::try_from(n.div_ceil(THREADS as usize).max(1))
        .ok()
        .filter(|&b| b < (1 << 31))
        .unwrap_or_else(|| panic!("CUDA: {n} elements exceed one launch's grid"));
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Row-major `c[m, n] = op(a) op(b) + beta c` as column-major cuBLAS sees it,
/// `c^T = op(b)^T op(a)^T`: its A is our `b`, its B our `a`. `ta`/`tb`: whether `a` is stored
/// `[k, m]` / `b` stored `[n, k]`; `(lda, ldb)`: how far apart `a`'s and `b`'s stored rows are
/// ([`dense_strides`] unless a matrix is a block of columns of a wider one).
fn gemm_config(
    ta: bool,
    tb: bool,
    (m, n, k): (usize, usize, usize),
    (lda, ldb): (usize, usize),
    beta: f32,
) -> GemmConfig<f32> {
    let op = |t: bool| if t { Op::CUBLAS_OP_T } else { Op::CUBLAS_OP_N };
    GemmConfig {
        transa: op(tb),
        transb: op(ta),
        m: n as i32,
        n: m as i32,
        k: k as i32,
        alpha: 1.0f32,
        lda: ldb as i32,
        ldb: lda as i32,
        beta,
        ldc: n as i32,
    }
}

/// The row strides of a dense `a` and `b` in [`gemm_config`]'s product.
fn dense_strides(ta: bool, tb: bool, (m, n, k): (usize, usize, usize)) -> (usize, usize) {
    (if ta { m } else { k }, if tb { k } else { n })
}

/// [`gemm_config`] for `count` row-major products: product `i` reads `a` at `i * stride_a`, `b`
/// at `i * stride_b` and writes `c` at `i * stride_c`. As in `gemm_config`, cuBLAS's A is our
/// `b` and its B our `a`, so their strides swap too.
fn batched_config(
    ta: bool,
    tb: bool,
    mnk: (usize, usize, usize),
    lds: (usize, usize),
    (stride_a, stride_b, stride_c): (usize, usize, usize),
    beta: f32,
    count: usize,
) -> StridedBatchedConfig<f32> {
    StridedBatchedConfig {
        gemm: gemm_config(ta, tb, mnk, lds, beta),
        batch_size: count as i32,
        stride_a: stride_b as i64,
        stride_b: stride_a as i64,
        stride_c: stride_c as i64,
    }
}

/// One block of `THREADS` per item (softmax rows, bias channels).
fn per_item(items: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (items.max(1) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Panics with what failed: the Backend trait's ops cannot fail on the CPU, and on a GPU a
/// failed launch means a bug or a lost device, which ends the worker with this message.
fn check<T, E: std::fmt::Debug>(r: Result<T, E>, what: &str) -> T {
    r.unwrap_or_else(|e| panic!("CUDA: {what} failed: {e:?}"))
}

/// cuDNN's timed choices as the run folder keeps them: valid for one GPU model, cuDNN version
/// and math setting.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeptChoices {
    gpu: String,
    cudnn: usize,
    tf32: bool,
    convolutions: Vec<KeptChoice>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeptChoice {
    geometry: super::ConvGeom,
    chosen: cudnn::Chosen,
}

/// The mean of a step's per-row losses, summed in row order in f64 (as on the CPU).
fn mean_loss(losses: &[f64]) -> f32 {
    (losses.iter().sum::<f64>() / losses.len() as f64) as f32
}

/// Page-locked buffers a step's loss terms and logits are copied into, reused step after step.
struct Readback {
    losses: PinnedHostSlice<f64>,
    logits: PinnedHostSlice<f32>,
    /// Recorded after the copies into them.
    copied: CudaEvent,
}

impl Drop for Readback {
    /// The driver frees page-locked memory at once, even under a copy still writing it: the
    /// last copy is waited for first (a readout dropped unread, a pool entry replaced).
    fn drop(&mut self) {
        let _ = self.copied.synchronize();
    }
}

/// A step's loss and logits on their way to the host (see `Backend::softmax_xent_read`).
struct CudaReadout {
    bufs: Option<Readback>,
    rows: usize,
    logits: usize,
    pool: Arc<Mutex<Vec<Readback>>>,
}

impl crate::backend::PendingReadout for CudaReadout {
    fn wait(mut self: Box<Self>) -> crate::backend::StepReadout {
        let bufs = self.bufs.take().expect("read once");
        check(bufs.copied.synchronize(), "waiting for the loss and logits");
        // The slices' own events are never recorded: these do not wait.
        let losses = check(bufs.losses.as_slice(), "reading the losses");
        let loss = mean_loss(&losses[..self.rows]);
        let logits = check(bufs.logits.as_slice(), "reading the logits")[..self.logits].to_vec();
        self.pool.lock().unwrap().push(bufs);
        crate::backend::StepReadout { loss, logits }
    }
}

impl Drop for CudaReadout {
    fn drop(&mut self) {
        // Not read (the step failed): the buffers go back to the pool (a later copy into them
        // is queued behind this one; freeing them waits for it, see `Readback`).
        if let Some(bufs) = self.bufs.take() {
            if let Ok(mut pool) = self.pool.lock() {
                pool.push(bufs);
            }
        }
    }
}

impl Drop for Cuda {
    fn drop(&mut self) {
        // A fault may also come back as an error (a failed exchange, a synchronisation): the
        // stream then refuses to synchronise.
        if std::thread::panicking() || self.stream.synchronize().is_err() {
            // A GPU op failed (`check`): the device may be in a sticky fault state, where the
            // handles' destroy calls fail and panic again. Left to the process's exit, which
            // the caller is heading for (the worker reports the failure first).
            tracing::warn!(
                gpu = self.device.ordinal,
                "leaving cuBLAS and cuDNN's handles to the process's exit after a GPU failure"
            );
            return;
        }
        // SAFETY: dropped once, here; neither is used again.
        unsafe {
            ManuallyDrop::drop(&mut self.dnn);
            ManuallyDrop::drop(&mut self.blas);
        }
    }
}

impl Cuda {
    /// Starts the backend on GPU `ordinal`: a context, a stream, cuBLAS, every kernel
    /// compiled for this GPU's architecture, and the convolutions, TF32 and cuDNN's algorithm
    /// choice as `settings` say.
    pub fn new(ordinal: usize, settings: &DeviceSettings) -> anyhow::Result<Self> {
        let (tf32, conv) = (settings.tf32, settings.conv);
        if let Some(why) = unavailable() {
            anyhow::bail!(
                "the CUDA backend cannot start: {why}; use the CPU (--backend cpu, or --device cpu for a worker)"
            );
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow::anyhow!("opening GPU {ordinal}: {e:?}"))?;
        // The stream made below puts the context in multi-stream mode, where cudarc records an
        // event per allocation and waits on and records one per kernel argument. None is needed:
        // every kernel, copy, cuBLAS and cuDNN call and free of this backend's buffers is queued
        // on that one stream, so the stream itself orders them, and the host reads a buffer
        // only after synchronising it. The one other stream that touches these buffers, NCCL's
        // (`comm::nccl`), is ordered against this one by explicit events: it starts after an
        // event recorded here behind the buffer's last write, and this stream waits for its
        // `done` event before reading, reusing or freeing the buffer.
        // SAFETY: called before any allocation; the ordering above is cudarc's contract (no use
        // on another stream before the allocation or after the free, no concurrent writes from
        // two streams).
        unsafe { ctx.disable_event_tracking() };
        if let Err(e) = keep_freed_memory(&ctx) {
            tracing::warn!(
                ordinal,
                "could not raise the memory pool's release threshold ({e:?}): freed GPU \
                 memory goes back to the driver at each synchronisation, which is slower"
            );
        }
        let name = ctx.name().unwrap_or_else(|_| "an NVIDIA GPU".into());
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| anyhow::anyhow!("reading GPU {ordinal}'s compute capability: {e:?}"))?;
        anyhow::ensure!(
            (major, minor) >= OLDEST_GPU,
            "GPU {ordinal} ({name}) has compute capability {major}.{minor}, and CUDA 13 builds \
             for {}.{} (Turing) or newer: use another GPU (--device cuda:N), or the CPU \
             (--backend cpu)",
            OLDEST_GPU.0,
            OLDEST_GPU.1
        );
        let stream = ctx
            .new_stream()
            .map_err(|e| anyhow::anyhow!("creating a stream on GPU {ordinal}: {e:?}"))?;
        let blas = CudaBlas::new(stream.clone()).map_err(|e| {
            anyhow::anyhow!("starting cuBLAS (libcublas.so.13 on LD_LIBRARY_PATH?): {e:?}")
        })?;
        // SAFETY: sets the math mode of the handle this struct owns.
        unsafe {
            use cudarc::cublas::sys::{cublasMath_t, cublasSetMathMode};
            // The default math mode uses no TF32 for f32 products.
            let mode = if tf32 {
                cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
            } else {
                cublasMath_t::CUBLAS_DEFAULT_MATH
            };
            cublasSetMathMode(*blas.handle(), mode)
                .result()
                .map_err(|e| anyhow::anyhow!("setting cuBLAS's math mode: {e:?}"))?;
        }
        // Machine code for this GPU, not PTX: the driver refuses PTX from an NVRTC newer than
        // itself, and a CUBIN loads on any driver of NVRTC's major version.
        let arch = kernels::sm_name(major, minor);
        let (nvrtc, driver) = (kernels::nvrtc_version(), driver_version());
        let mut functions = HashMap::new();
        for (file, source, names) in kernels::SOURCES {
            let ptx = kernels::compile_once(file, source, arch)?;
            let module = ctx.load_module(ptx).map_err(|e| {
                let versions = match (nvrtc, driver) {
                    (Some(n), Some(d)) => {
                        kernels::nvrtc_newer_than_driver(n, d).unwrap_or_else(|| {
                            format!(
                                "NVRTC {}.{}, driver's CUDA {}",
                                n.0,
                                n.1,
                                kernels::cuda_version_text(d)
                            )
                        })
                    }
                    _ => "NVRTC's or the driver's version unknown".to_string(),
                };
                anyhow::anyhow!("loading {file} on GPU {ordinal}: {e:?} ({versions})")
            })?;
            for &f in names.iter() {
                let func = module
                    .load_function(f)
                    .map_err(|e| anyhow::anyhow!("{file} has no kernel `{f}`: {e:?}"))?;
                functions.insert(f, func);
            }
        }
        let dnn = match conv {
            ConvPath::Unfold => None,
            ConvPath::Cudnn => Some(cudnn::DnnCell(Mutex::new(cudnn::Dnn::new(
                stream.clone(),
                tf32,
                settings.cudnn_algos,
            )?))),
        };
        tracing::info!(
            gpu = %name,
            ordinal,
            arch,
            nvrtc = ?nvrtc,
            driver_cuda = driver.map(kernels::cuda_version_text),
            tf32,
            ?conv,
            kernels = functions.len(),
            "CUDA backend ready"
        );
        Ok(Cuda {
            ctx,
            stream,
            blas: ManuallyDrop::new(blas),
            functions,
            device: DeviceInfo { name, ordinal },
            tf32,
            unfolding: Mutex::new(Unfolding::default()),
            max_columns: MAX_COLUMNS,
            row_loss: Mutex::new(None),
            readback: Arc::default(),
            dnn: ManuallyDrop::new(dnn),
            staging: Mutex::new(staging::Staging::default()),
        })
    }

    /// Queues the softmax and its loss terms (one f64 per row, in the returned buffer).
    fn queue_softmax_xent(
        &self,
        rows: usize,
        classes: usize,
        logits: &CudaSlice<f32>,
        labels: &[u32],
        dlogits: &mut CudaSlice<f32>,
    ) -> std::sync::MutexGuard<'_, Option<CudaSlice<f64>>> {
        assert_eq!(logits.len(), rows * classes, "logits length");
        assert_eq!(dlogits.len(), rows * classes, "logits gradient length");
        assert_eq!(labels.len(), rows, "one label per row");
        if let Some(&bad) = labels.iter().find(|&&l| l as usize >= classes) {
            panic!("label {bad} outside 0..{classes}");
        }
        let dev_labels = check(self.to_gpu(labels), "copying labels");
        let mut guard = self.row_loss.lock().unwrap();
        if guard.as_ref().is_none_or(|b| b.len() < rows) {
            *guard = Some(check(
                self.stream.alloc_zeros::<f64>(rows),
                "allocating row losses",
            ));
        }
        let loss_buf = guard.as_mut().unwrap();
        let (r, c) = (rows as i32, classes as i32);
        let mut l = self.stream.launch_builder(self.f("softmax_xent"));
        l.arg(logits)
            .arg(&dev_labels)
            .arg(&mut *dlogits)
            .arg(&mut *loss_buf)
            .arg(&r)
            .arg(&c);
        // SAFETY: argument types and order match kernels/softmax.cu.
        check(unsafe { l.launch(per_item(rows)) }, "softmax_xent");
        drop(l);
        guard
    }

    /// Queues a copy of the first `host.len()` values of `src` into `host`, page-locked memory
    /// that is read only after an event recorded behind the copy.
    fn copy_into_pinned<T: DeviceRepr>(&self, src: &CudaSlice<T>, host: &mut [T], what: &str) {
        assert!(
            host.len() <= src.len(),
            "{what}: more values than the buffer holds"
        );
        let (ptr, _) = src.device_ptr(&self.stream);
        // SAFETY: `host` is page-locked and holds no more values than `src`, from its start;
        // the caller reads it only after an event recorded behind this copy.
        let r = unsafe {
            cudarc::driver::result::memcpy_dtoh_async(host, ptr, self.stream.cu_stream())
        };
        check(r, what);
    }

    /// Page-locked buffers for `rows` loss terms and `logits` logits, cached for reading (not
    /// write-combined: the host reads them).
    fn readback_buffers(&self, rows: usize, logits: usize) -> Result<Readback, DriverError> {
        // SAFETY: the buffers are written by the copies of `softmax_xent_read` and read only
        // after their events.
        unsafe {
            Ok(Readback {
                losses: self.ctx.alloc_pinned_with_flags::<f64>(rows, 0)?,
                logits: self.ctx.alloc_pinned_with_flags::<f32>(logits, 0)?,
                // Waited for while the backward pass runs: a blocking wait, not a spinning one.
                copied: self.ctx.new_event(Some(
                    cudarc::driver::sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC,
                ))?,
            })
        }
    }

    /// The same backend with the convolutions unfolded at most `floats` floats at a time, so
    /// that a small test splits a batch into several passes (a last one shorter) as the
    /// paper's layers do at large batches.
    pub fn with_unfolding_limit(mut self, floats: usize) -> Self {
        self.max_columns = floats.max(1);
        self
    }

    /// The GPU's index.
    pub fn ordinal(&self) -> usize {
        self.device.ordinal
    }

    /// The GPU's UUID, hex (empty if the driver does not say).
    pub fn uuid(&self) -> String {
        self.ctx
            .uuid()
            .map(|u| {
                u.bytes
                    .iter()
                    .map(|b| format!("{:02x}", *b as u8))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn f(&self, name: &str) -> &CudaFunction {
        self.functions
            .get(name)
            .unwrap_or_else(|| panic!("kernel `{name}` was not loaded"))
    }

    /// Memory in use and in all on this GPU, in bytes.
    pub fn memory(&self) -> (usize, usize) {
        let (free, total) = self.ctx.mem_get_info().unwrap_or((0, 0));
        (total - free, total)
    }

    /// Allocates `len` zeros, or says how much did not fit where.
    pub fn try_zeros(&self, len: usize) -> anyhow::Result<CudaSlice<f32>> {
        if len == 0 {
            return self
                .stream
                .null::<f32>()
                .map_err(|e| anyhow::anyhow!("GPU {}: {e:?}", self.device.ordinal));
        }
        self.stream.alloc_zeros::<f32>(len).map_err(|e| {
            use cudarc::driver::sys::CUresult;
            if e.0 != CUresult::CUDA_ERROR_OUT_OF_MEMORY {
                return anyhow::anyhow!(
                    "allocating {} MiB on GPU {}: {e:?}",
                    (4 * len) >> 20,
                    self.device.ordinal
                );
            }
            let (used, total) = self.memory();
            anyhow::Error::new(OutOfMemory(format!(
                "out of memory on GPU {} ({}): {} MiB more did not fit ({} of {} MiB in use): {e:?}",
                self.device.ordinal,
                self.device.name,
                (4 * len) >> 20,
                used >> 20,
                total >> 20
            )))
        })
    }

    /// Waits for everything queued so far (for timing).
    pub fn synchronize(&self) -> anyhow::Result<()> {
        self.stream
            .synchronize()
            .map_err(|e| anyhow::anyhow!("GPU {}: {e:?}", self.device.ordinal))
    }

    /// A copy of `host` on the GPU, queued behind the stream's work through a pinned staging
    /// buffer ([`staging`]), or copied directly where pinned memory is refused.
    fn to_gpu<T: DeviceRepr + bytemuck::NoUninit>(
        &self,
        host: &[T],
    ) -> Result<CudaSlice<T>, DriverError> {
        if let Some(buf) = self.staging.lock().unwrap().upload(&self.stream, host)? {
            return Ok(buf);
        }
        self.stream.clone_htod(host)
    }

    /// Row-major `c[m, n] = op(a) op(b) + beta c`, through column-major cuBLAS as
    /// `c^T = op(b)^T op(a)^T`. `ta`/`tb`: whether `a` is stored `[k, m]` / `b` stored `[n, k]`.
    #[allow(clippy::too_many_arguments)]
    fn gemm_rm<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        ta: bool,
        tb: bool,
        m: usize,
        n: usize,
        k: usize,
        a: &A,
        b: &B,
        beta: f32,
        c: &mut C,
    ) {
        let lds = dense_strides(ta, tb, (m, n, k));
        self.gemm_rm_ld(ta, tb, (m, n, k), lds, a, b, beta, c)
    }

    /// [`Self::gemm_rm`] with `a`'s and `b`'s stored rows `lds` apart.
    #[allow(clippy::too_many_arguments)]
    fn gemm_rm_ld<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        ta: bool,
        tb: bool,
        mnk: (usize, usize, usize),
        lds: (usize, usize),
        a: &A,
        b: &B,
        beta: f32,
        c: &mut C,
    ) {
        // cuBLAS calls do not make the context current (kernel launches and copies do): this
        // thread may not have run one yet.
        check(self.ctx.bind_to_thread(), "binding the CUDA context");
        let cfg = gemm_config(ta, tb, mnk, lds, beta);
        // SAFETY: the shapes and strides match the buffers' lengths, which the callers check.
        check(unsafe { self.blas.gemm(cfg, b, a, c) }, "cuBLAS sgemm");
    }

    /// [`Self::gemm_rm_ld`] for `count` products at once: product `i` reads `a` at
    /// `i * stride_a`, `b` at `i * stride_b` and writes `c` at `i * stride_c` (a stride of 0
    /// shares a matrix).
    #[allow(clippy::too_many_arguments)]
    fn gemm_rm_batched<A: DevicePtr<f32>, B: DevicePtr<f32>, C: DevicePtrMut<f32>>(
        &self,
        ta: bool,
        tb: bool,
        mnk: (usize, usize, usize),
        lds: (usize, usize),
        (a, stride_a): (&A, usize),
        (b, stride_b): (&B, usize),
        beta: f32,
        (c, stride_c): (&mut C, usize),
        count: usize,
    ) {
        check(self.ctx.bind_to_thread(), "binding the CUDA context");
        let strides = (stride_a, stride_b, stride_c);
        let cfg = batched_config(ta, tb, mnk, lds, strides, beta, count);
        // SAFETY: the callers' slices hold every product's matrices at these strides.
        check(
            unsafe { self.blas.gemm_strided_batched(cfg, b, a, c) },
            "cuBLAS strided batched sgemm",
        );
    }

    /// The unfolding scratch, with at least `columns` floats of unfolded images and `gradients`
    /// of regrouped output gradients.
    fn try_unfolding(
        &self,
        columns: usize,
        gradients: usize,
    ) -> anyhow::Result<std::sync::MutexGuard<'_, Unfolding>> {
        let mut guard = self.unfolding.lock().unwrap();
        let u = &mut *guard;
        for (buf, len) in [(&mut u.columns, columns), (&mut u.gradients, gradients)] {
            if len > 0 && buf.as_ref().is_none_or(|c| c.len() < len) {
                *buf = None;
                *buf = Some(self.try_zeros(len)?);
            }
        }
        Ok(guard)
    }

    /// [`Self::try_unfolding`] inside an op, which cannot return an error: the network
    /// reserves the scratch before its first step ([`Backend::prepare_convolution`]), so this
    /// fails only for ops called on their own.
    fn unfolding(&self, columns: usize, gradients: usize) -> std::sync::MutexGuard<'_, Unfolding> {
        self.try_unfolding(columns, gradients)
            .unwrap_or_else(|e| panic!("convolution's unfolding buffers: {e:#}"))
    }

    /// The unfolding scratch a convolution of geometry `g` needs: a pass's unfolded images,
    /// and its output gradient regrouped for the weight gradient.
    fn unfolding_lens(&self, g: &ConvGeom) -> (usize, usize) {
        let pass = self.images_per_pass(g);
        let per = (g.in_c / g.groups) * g.kernel * g.kernel * g.out_h() * g.out_w();
        (
            pass * per,
            pass * (g.out_c / g.groups) * g.out_h() * g.out_w(),
        )
    }

    /// Images per unfolding pass, so that the buffer stays under `max_columns` floats.
    fn images_per_pass(&self, g: &ConvGeom) -> usize {
        let per_image = (g.in_c / g.groups) * g.kernel * g.kernel * g.out_h() * g.out_w();
        (self.max_columns / per_image.max(1)).clamp(1, g.batch.max(1))
    }

    /// The unfolding kernels' shape arguments for group `grp` of images `n0..n0 + nb`: the
    /// first image's offset in the batch, the span from it to the end of the last one's group,
    /// and (images, image stride, in_c, in_h, in_w, k, stride, pad, out_h, out_w).
    #[allow(clippy::type_complexity)]
    fn unfold_args(
        g: &ConvGeom,
        n0: usize,
        nb: usize,
        grp: usize,
    ) -> (usize, usize, (i32, i64, [i32; 8])) {
        let cin = g.in_c / g.groups;
        let group_len = cin * g.in_h * g.in_w;
        let image = g.in_c * g.in_h * g.in_w;
        let start = n0 * image + grp * group_len;
        let span = (nb - 1) * image + group_len;
        let dims = [
            cin as i32,
            g.in_h as i32,
            g.in_w as i32,
            g.kernel as i32,
            g.stride as i32,
            g.pad as i32,
            g.out_h() as i32,
            g.out_w() as i32,
        ];
        (start, span, (nb as i32, image as i64, dims))
    }

    /// Where group `grp`'s outputs of images `n0..n0 + nb` lie in a convolution's output: the
    /// first one's offset, and the span to the end of the last one's.
    fn output_span(g: &ConvGeom, n0: usize, nb: usize, grp: usize) -> (usize, usize) {
        let (plane, cout) = (g.out_h() * g.out_w(), g.out_c / g.groups);
        let start = (n0 * g.out_c + grp * cout) * plane;
        (start, ((nb - 1) * g.out_c + cout) * plane)
    }

    /// Unfolds group `grp` of images `n0..n0+nb` into `col` (`[nb][K, P]` or `[K][nb, P]`, as
    /// `layout` says), in one launch.
    #[allow(clippy::too_many_arguments)]
    fn im2col(
        &self,
        g: &ConvGeom,
        x: &CudaSlice<f32>,
        n0: usize,
        nb: usize,
        grp: usize,
        layout: ColumnLayout,
        col: &mut CudaSlice<f32>,
    ) {
        let plane = g.out_h() * g.out_w();
        let rows = (g.in_c / g.groups) * g.kernel * g.kernel;
        let per = rows * plane;
        let (col_image, col_row) = match layout {
            ColumnLayout::ByImage => (per as i64, plane as i64),
            ColumnLayout::ByRow => (plane as i64, (nb * plane) as i64),
        };
        let (start, span, (images, image, d)) = Self::unfold_args(g, n0, nb, grp);
        let xv = x.slice(start..start + span);
        let mut cv = col.slice_mut(0..nb * per);
        let mut l = self.stream.launch_builder(self.f("im2col"));
        l.arg(&xv)
            .arg(&mut cv)
            .arg(&images)
            .arg(&image)
            .arg(&col_image)
            .arg(&col_row);
        for v in &d {
            l.arg(v);
        }
        // SAFETY: argument types and order match kernels/im2col.cu; the views hold what the
        // kernel reads and writes.
        check(unsafe { l.launch(grid(nb * per)) }, "im2col");
    }

    /// Folds `col` (`[nb][K, P]`, input gradients in unfolded form) back into group `grp` of
    /// images `n0..n0+nb` of `dx`, overwriting it, in one launch.
    fn col2im(
        &self,
        g: &ConvGeom,
        col: &CudaSlice<f32>,
        n0: usize,
        nb: usize,
        grp: usize,
        dx: &mut CudaSlice<f32>,
    ) {
        let per = (g.in_c / g.groups) * g.kernel * g.kernel * g.out_h() * g.out_w();
        let (start, span, (images, image, d)) = Self::unfold_args(g, n0, nb, grp);
        let cv = col.slice(0..nb * per);
        let mut dxv = dx.slice_mut(start..start + span);
        let mut l = self.stream.launch_builder(self.f("col2im"));
        l.arg(&cv).arg(&mut dxv).arg(&images).arg(&image);
        for v in &d {
            l.arg(v);
        }
        // SAFETY: as in `im2col`.
        let threads = nb * (g.in_c / g.groups) * g.in_h * g.in_w;
        check(unsafe { l.launch(grid(threads)) }, "col2im");
    }
}

impl Cuda {
    /// `y[n, c, :] = b[c]`: a convolution's output, before its products add to it.
    fn broadcast_channels(&self, g: &ConvGeom, b: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
        let plane = g.out_h() * g.out_w();
        let (n, c, p) = (g.batch as i64, g.out_c as i32, plane as i32);
        let mut l = self.stream.launch_builder(self.f("broadcast_channels"));
        l.arg(&mut *y).arg(b).arg(&n).arg(&c).arg(&p);
        // SAFETY: argument types and order match kernels/elementwise.cu.
        check(unsafe { l.launch(grid(g.out_len())) }, "broadcast_channels");
    }

    /// `y[r, :] = b`: a linear layer's output, before its product adds to it.
    fn broadcast_rows(&self, g: &LinearGeom, b: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
        let (r, o) = (g.rows as i64, g.out as i32);
        let mut l = self.stream.launch_builder(self.f("broadcast_rows"));
        l.arg(&mut *y).arg(b).arg(&r).arg(&o);
        // SAFETY: argument types and order match kernels/elementwise.cu.
        check(unsafe { l.launch(grid(g.rows * g.out)) }, "broadcast_rows");
    }

    /// `y += conv(x, w)` by unfolding, per group and pass of images: `y_i[cout, P] +=
    /// w_g[cout, K] col_i[K, P]`. The kernels' rows of `K` weights lie `w_rs` apart in `w`:
    /// `K` when `w` is the layer's own, more when it is a block of input channels of a wider
    /// layer's weights.
    fn unfolded_forward(
        &self,
        g: &ConvGeom,
        x: &CudaSlice<f32>,
        w: &CudaView<'_, f32>,
        w_rs: usize,
        y: &mut CudaSlice<f32>,
    ) {
        let plane = g.out_h() * g.out_w();
        let (cout, cin) = (g.out_c / g.groups, g.in_c / g.groups);
        let kk = cin * g.kernel * g.kernel;
        let per = kk * plane;
        let pass = self.images_per_pass(g);
        let mut guard = self.unfolding(per * pass, 0);
        let col = guard.columns.as_mut().unwrap();
        for n0 in (0..g.batch).step_by(pass) {
            let nb = pass.min(g.batch - n0);
            for grp in 0..g.groups {
                self.im2col(g, x, n0, nb, grp, ColumnLayout::ByImage, col);
                let wg = w.slice(grp * cout * w_rs..);
                let (start, span) = Self::output_span(g, n0, nb, grp);
                let mut yv = y.slice_mut(start..start + span);
                let cv = col.slice(0..nb * per);
                // The nb images in one call.
                self.gemm_rm_batched(
                    false,
                    false,
                    (cout, plane, kk),
                    (w_rs, plane),
                    (&wg, 0),
                    (&cv, per),
                    1.0,
                    (&mut yv, g.out_c * plane),
                    nb,
                );
            }
        }
    }

    /// A convolution's weight gradient by unfolding: per group and pass of `nb` images,
    /// `dw[cout, K] (+)= dy[cout, nb P] col[K, nb P]^T`, one product that sums over the pass's
    /// images and pixels together (the images unfolded row-major, `[K][nb, P]`, and the output
    /// gradient regrouped channel-major, `[cout][nb, P]`), not one small product per image.
    fn conv_weight_grads(
        &self,
        g: &ConvGeom,
        x: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dw: &mut CudaSlice<f32>,
    ) {
        let (cout, cin) = (g.out_c / g.groups, g.in_c / g.groups);
        let plane = g.out_h() * g.out_w();
        let kk = cin * g.kernel * g.kernel;
        let pass = self.images_per_pass(g);
        let (columns, gradients) = self.unfolding_lens(g);
        let mut guard = self.unfolding(columns, gradients);
        let scratch = &mut *guard;
        let col = scratch.columns.as_mut().unwrap();
        let dyt = scratch.gradients.as_mut().unwrap();
        for n0 in (0..g.batch).step_by(pass) {
            let nb = pass.min(g.batch - n0);
            for grp in 0..g.groups {
                self.im2col(g, x, n0, nb, grp, ColumnLayout::ByRow, col);
                let (start, span) = Self::output_span(g, n0, nb, grp);
                let dyv = dy.slice(start..start + span);
                let mut dytv = dyt.slice_mut(0..nb * cout * plane);
                {
                    let (outer, middle, inner) = (nb as i64, cout as i32, plane as i32);
                    let a_stride = (g.out_c * plane) as i64;
                    let mut l = self.stream.launch_builder(self.f("swap_outer"));
                    l.arg(&mut dytv)
                        .arg(&dyv)
                        .arg(&outer)
                        .arg(&middle)
                        .arg(&inner)
                        .arg(&a_stride);
                    // SAFETY: argument types and order match kernels/elementwise.cu; `dyv`
                    // spans the last image's group, `dytv` holds nb * cout * plane floats.
                    check(unsafe { l.launch(grid(nb * cout * plane)) }, "swap_outer");
                }
                let cv = col.slice(0..kk * nb * plane);
                let mut dwg = dw.slice_mut(grp * cout * kk..(grp + 1) * cout * kk);
                let beta = if n0 == 0 { 0.0 } else { 1.0 };
                self.gemm_rm(
                    false,
                    true,
                    cout,
                    kk,
                    nb * plane,
                    &dytv,
                    &cv,
                    beta,
                    &mut dwg,
                );
            }
        }
    }
}

impl Backend for Cuda {
    type Buf = CudaSlice<f32>;

    fn name(&self) -> String {
        format!(
            "cuda:{} ({}{}{})",
            self.device.ordinal,
            self.device.name,
            if self.dnn.is_some() { ", cuDNN" } else { "" },
            if self.tf32 { ", TF32" } else { "" }
        )
    }

    fn zeros(&self, len: usize) -> CudaSlice<f32> {
        Cuda::try_zeros(self, len).unwrap_or_else(|e| panic!("{e:#}"))
    }

    fn try_zeros(&self, len: usize) -> anyhow::Result<CudaSlice<f32>> {
        Cuda::try_zeros(self, len)
    }

    fn synchronize(&self) {
        check(self.stream.synchronize(), "waiting for the GPU");
    }

    fn device_memory_in_use(&self) -> Option<u64> {
        Some(self.memory().0 as u64)
    }

    fn upload(&self, host: &[f32]) -> CudaSlice<f32> {
        if host.is_empty() {
            return self.zeros(0);
        }
        check(self.to_gpu(host), "copying to the GPU")
    }

    fn download(&self, buf: &CudaSlice<f32>) -> Vec<f32> {
        if buf.is_empty() {
            return Vec::new();
        }
        check(self.stream.clone_dtoh(buf), "copying from the GPU")
    }

    fn buf_len(&self, buf: &CudaSlice<f32>) -> usize {
        buf.len()
    }

    fn timed_choices(&self) -> Option<serde_json::Value> {
        let dnn = self.dnn.as_ref()?;
        let choices = dnn.0.lock().unwrap().choices();
        let kept = KeptChoices {
            gpu: self.device.name.clone(),
            cudnn: cudarc::cudnn::result::get_version(),
            tf32: self.tf32,
            convolutions: (choices.into_iter())
                .map(|(geometry, chosen)| KeptChoice { geometry, chosen })
                .collect(),
        };
        serde_json::to_value(kept).ok()
    }

    fn adopt_timed_choices(&self, kept: &serde_json::Value) -> anyhow::Result<usize> {
        let Some(dnn) = self.dnn.as_ref() else {
            return Ok(0);
        };
        let kept: KeptChoices = serde_json::from_value(kept.clone())
            .map_err(|e| anyhow::anyhow!("not a list of cuDNN choices: {e}"))?;
        let here = (
            &self.device.name,
            cudarc::cudnn::result::get_version(),
            self.tf32,
        );
        anyhow::ensure!(
            (&kept.gpu, kept.cudnn, kept.tf32) == here,
            "made on {} with cuDNN {} (TF32 {}), and this is {} with cuDNN {} (TF32 {})",
            kept.gpu,
            kept.cudnn,
            kept.tf32,
            here.0,
            here.1,
            here.2
        );
        let entries = (kept.convolutions.into_iter()).map(|k| (k.geometry, k.chosen));
        Ok(dnn.0.lock().unwrap().adopt(entries))
    }

    fn device_address(&self, buf: &CudaSlice<f32>) -> Option<u64> {
        // Event tracking is off (see `new`): the guard that comes with the pointer does nothing,
        // and the caller orders its use with `record_event` and `wait_event`.
        Some(buf.device_ptr(&self.stream).0)
    }

    fn record_event(&self, event: crate::backend::QueueEvent) -> anyhow::Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow::anyhow!("binding GPU {}: {e:?}", self.ordinal()))?;
        // SAFETY: the caller's event was made in this device's primary context (the one this
        // stream belongs to) and outlives the call.
        unsafe { cudarc::driver::result::event::record(event.0 as _, self.stream.cu_stream()) }
            .map_err(|e| anyhow::anyhow!("recording a CUDA event on GPU {}: {e:?}", self.ordinal()))
    }

    fn wait_event(&self, event: crate::backend::QueueEvent) -> anyhow::Result<()> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| anyhow::anyhow!("binding GPU {}: {e:?}", self.ordinal()))?;
        // SAFETY: as in `record_event`; a wait captures the event's state now, so the event may
        // be recorded again afterwards.
        unsafe {
            cudarc::driver::result::stream::wait_event(
                self.stream.cu_stream(),
                event.0 as _,
                cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .map_err(|e| {
            anyhow::anyhow!(
                "making GPU {}'s stream wait for an event: {e:?}",
                self.ordinal()
            )
        })
    }

    fn finishes_views(&self) -> bool {
        true
    }

    fn finish_views(
        &self,
        views: &ByteViews,
        mean: &CudaSlice<f32>,
    ) -> anyhow::Result<CudaSlice<f32>> {
        views.check()?;
        anyhow::ensure!(
            mean.len() == views.mean.len(),
            "finishing views: a mean of {} values on the GPU, {} on the host",
            mean.len(),
            views.mean.len()
        );
        let n = views.views() * views.view_len();
        if n == 0 {
            return self.try_zeros(0);
        }
        let pixels = (self.to_gpu(&views.pixels))
            .map_err(|e| anyhow::anyhow!("copying a batch of {n} bytes to the GPU: {e:?}"))?;
        let crops: Vec<i32> = (views.crops.iter())
            .flat_map(|c| [c.x0 as i32, c.y0 as i32, c.flip as i32])
            .collect();
        let shifts: Vec<f32> = views.shifts.iter().flatten().copied().collect();
        let crops = check(self.to_gpu(&crops), "copying crops to the GPU");
        let shifts = check(self.to_gpu(&shifts), "copying colour shifts to the GPU");
        let mut out = self.try_zeros(n)?;
        let count = views.views() as i32;
        let (side, out_side) = (views.side as i32, views.out_side as i32);
        let mut l = self.stream.launch_builder(self.f("finish_views"));
        l.arg(&pixels)
            .arg(mean)
            .arg(&crops)
            .arg(&shifts)
            .arg(&mut out)
            .arg(&count)
            .arg(&side)
            .arg(&out_side);
        // SAFETY: argument types and order match kernels/augment.cu; `check` above bounds
        // every index the kernel forms.
        check(unsafe { l.launch(grid(n)) }, "finish_views");
        Ok(out)
    }

    fn prepare_convolution(&self, g: &ConvGeom, backward: bool) -> anyhow::Result<()> {
        if let Some(dnn) = &*self.dnn {
            return dnn.0.lock().unwrap().prepare(g, backward);
        }
        let (columns, gradients) = self.unfolding_lens(g);
        // The regrouped output gradients serve the weight gradient only.
        self.try_unfolding(columns, if backward { gradients } else { 0 })
            .map(drop)
    }

    fn conv2d_forward(
        &self,
        g: &ConvGeom,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) {
        assert_eq!(x.len(), g.in_len(), "conv input length");
        assert_eq!(w.len(), g.weight_len(), "conv weight length");
        assert_eq!(b.len(), g.out_c, "conv bias length");
        assert_eq!(y.len(), g.out_len(), "conv output length");
        self.broadcast_channels(g, b, y);
        if let Some(dnn) = &*self.dnn {
            check(dnn.0.lock().unwrap().forward(g, x, w, y), "cuDNN forward");
            return;
        }
        let kk = g.in_c / g.groups * g.kernel * g.kernel;
        self.unfolded_forward(g, x, &w.slice(..), kk, y);
    }

    fn conv2d_forward_part(
        &self,
        g: &ConvGeom,
        part: InputPart,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        accumulate: bool,
    ) {
        part.check_conv(g, [x.len(), w.len(), b.len(), y.len()], accumulate);
        let kk = g.kernel * g.kernel;
        if !accumulate {
            self.broadcast_channels(g, b, y);
        }
        if let Some(dnn) = &*self.dnn {
            // cuDNN reads dense filters: the part's block of every kernel, copied out (conv3's
            // half of one column is under 1 MiB, a few microseconds).
            // SAFETY: `slice_rows` below writes all of it before the convolution reads it.
            let mut w_part = check(
                unsafe { self.stream.alloc::<f32>(g.weight_len()) },
                "allocating conv3's block of weights",
            );
            let (row, first) = (part.total * kk, part.first * kk);
            self.slice_rows(g.out_c, row, first, g.in_c * kk, w, &mut w_part, false);
            check(
                dnn.0.lock().unwrap().forward(g, x, &w_part, y),
                "cuDNN forward",
            );
            return;
        }
        let w_part = w.slice(part.first * kk..);
        self.unfolded_forward(g, x, &w_part, part.total * kk, y);
    }

    fn conv2d_backward(
        &self,
        g: &ConvGeom,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: Option<&mut CudaSlice<f32>>,
        dw: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) {
        assert_eq!(x.len(), g.in_len(), "conv input length");
        assert_eq!(w.len(), g.weight_len(), "conv weight length");
        assert_eq!(dy.len(), g.out_len(), "conv output gradient length");
        assert_eq!(dw.len(), g.weight_len(), "conv weight gradient length");
        assert_eq!(db.len(), g.out_c, "conv bias gradient length");
        let plane = g.out_h() * g.out_w();
        {
            let (n, c, p) = (g.batch as i32, g.out_c as i32, plane as i32);
            let mut l = self.stream.launch_builder(self.f("bias_grad_channels"));
            l.arg(dy).arg(&mut *db).arg(&n).arg(&c).arg(&p);
            // SAFETY: argument types and order match kernels/bias.cu.
            check(unsafe { l.launch(per_item(g.out_c)) }, "bias_grad_channels");
        }
        if let Some(dnn) = &*self.dnn {
            check(
                dnn.0.lock().unwrap().backward_filter(g, x, dy, dw),
                "cuDNN backward filter",
            );
        } else {
            self.conv_weight_grads(g, x, dy, dw);
        }
        if let Some(dx) = dx {
            self.conv2d_backward_data(g, w, dy, dx);
        }
    }

    fn conv2d_backward_data(
        &self,
        g: &ConvGeom,
        w: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) {
        assert_eq!(w.len(), g.weight_len(), "conv weight length");
        assert_eq!(dy.len(), g.out_len(), "conv output gradient length");
        assert_eq!(dx.len(), g.in_len(), "conv input gradient length");
        if let Some(dnn) = &*self.dnn {
            check(
                dnn.0.lock().unwrap().backward_data(g, w, dy, dx),
                "cuDNN backward data",
            );
            return;
        }
        let (cout, cin) = (g.out_c / g.groups, g.in_c / g.groups);
        let plane = g.out_h() * g.out_w();
        let kk = cin * g.kernel * g.kernel;
        let per = kk * plane;
        let pass = self.images_per_pass(g);
        let mut guard = self.unfolding(per * pass, 0);
        let col = guard.columns.as_mut().unwrap();
        for n0 in (0..g.batch).step_by(pass) {
            let nb = pass.min(g.batch - n0);
            for grp in 0..g.groups {
                // The unfolded input gradients dcol_i[K, P] = w[cout, K]^T dy_i[cout, P] of the
                // nb images in one call, then folded back in one launch.
                let wg = w.slice(grp * cout * kk..(grp + 1) * cout * kk);
                let (start, span) = Self::output_span(g, n0, nb, grp);
                let dyv = dy.slice(start..start + span);
                let mut cv = col.slice_mut(0..nb * per);
                self.gemm_rm_batched(
                    true,
                    false,
                    (kk, plane, cout),
                    dense_strides(true, false, (kk, plane, cout)),
                    (&wg, 0),
                    (&dyv, g.out_c * plane),
                    0.0,
                    (&mut cv, per),
                    nb,
                );
                self.col2im(g, col, n0, nb, grp, dx);
            }
        }
    }

    fn relu_forward(&self, x: &mut CudaSlice<f32>) {
        let n = x.len() as i64;
        let mut l = self.stream.launch_builder(self.f("relu_forward"));
        l.arg(&mut *x).arg(&n);
        // SAFETY: argument types and order match kernels/elementwise.cu.
        check(unsafe { l.launch(grid(n as usize)) }, "relu_forward");
    }

    fn relu_backward(&self, y: &CudaSlice<f32>, dy: &mut CudaSlice<f32>) {
        assert_eq!(y.len(), dy.len(), "relu gradient length");
        let n = y.len() as i64;
        let mut l = self.stream.launch_builder(self.f("relu_backward"));
        l.arg(y).arg(&mut *dy).arg(&n);
        // SAFETY: argument types and order match kernels/elementwise.cu.
        check(unsafe { l.launch(grid(n as usize)) }, "relu_backward");
    }

    fn lrn_forward(
        &self,
        g: &PlaneGeom,
        p: &LrnParams,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        scale: &mut CudaSlice<f32>,
    ) {
        for (len, what) in [
            (x.len(), "input"),
            (y.len(), "output"),
            (scale.len(), "scale"),
        ] {
            assert_eq!(len, g.len(), "lrn {what} length");
        }
        let (b, c, pl, size) = (
            g.batch as i32,
            g.channels as i32,
            g.plane as i32,
            p.size as i32,
        );
        let mut l = self.stream.launch_builder(self.f("lrn_forward"));
        l.arg(x)
            .arg(&mut *y)
            .arg(&mut *scale)
            .arg(&b)
            .arg(&c)
            .arg(&pl)
            .arg(&size)
            .arg(&p.alpha)
            .arg(&p.beta)
            .arg(&p.k);
        // SAFETY: argument types and order match kernels/lrn.cu.
        check(unsafe { l.launch(grid(g.batch * g.plane)) }, "lrn_forward");
    }

    fn lrn_backward(
        &self,
        g: &PlaneGeom,
        p: &LrnParams,
        x: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        scale: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) {
        for (len, what) in [
            (x.len(), "input"),
            (y.len(), "output"),
            (scale.len(), "scale"),
            (dy.len(), "output gradient"),
            (dx.len(), "input gradient"),
        ] {
            assert_eq!(len, g.len(), "lrn {what} length");
        }
        let (b, c, pl, size) = (
            g.batch as i32,
            g.channels as i32,
            g.plane as i32,
            p.size as i32,
        );
        let mut l = self.stream.launch_builder(self.f("lrn_backward"));
        l.arg(x)
            .arg(y)
            .arg(scale)
            .arg(dy)
            .arg(&mut *dx)
            .arg(&b)
            .arg(&c)
            .arg(&pl)
            .arg(&size)
            .arg(&p.alpha)
            .arg(&p.beta);
        // SAFETY: argument types and order match kernels/lrn.cu.
        check(unsafe { l.launch(grid(g.batch * g.plane)) }, "lrn_backward");
    }

    fn maxpool_forward(&self, g: &PoolGeom, x: &CudaSlice<f32>, y: &mut CudaSlice<f32>) {
        assert_eq!(x.len(), g.in_len(), "maxpool input length");
        assert_eq!(y.len(), g.out_len(), "maxpool output length");
        let planes = (g.batch * g.channels) as i64;
        let d = [g.in_h, g.in_w, g.out_h(), g.out_w(), g.size, g.stride].map(|v| v as i32);
        let mut l = self.stream.launch_builder(self.f("maxpool_forward"));
        l.arg(x).arg(&mut *y).arg(&planes);
        for v in &d {
            l.arg(v);
        }
        // SAFETY: argument types and order match kernels/pool.cu.
        check(unsafe { l.launch(grid(g.out_len())) }, "maxpool_forward");
    }

    fn maxpool_backward(
        &self,
        g: &PoolGeom,
        x: &CudaSlice<f32>,
        y: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) {
        assert_eq!(x.len(), g.in_len(), "maxpool input length");
        assert_eq!(y.len(), g.out_len(), "maxpool output length");
        assert_eq!(dy.len(), g.out_len(), "maxpool output gradient length");
        assert_eq!(dx.len(), g.in_len(), "maxpool input gradient length");
        let planes = (g.batch * g.channels) as i64;
        let d = [g.in_h, g.in_w, g.out_h(), g.out_w(), g.size, g.stride].map(|v| v as i32);
        let mut l = self.stream.launch_builder(self.f("maxpool_backward"));
        l.arg(x).arg(y).arg(dy).arg(&mut *dx).arg(&planes);
        for v in &d {
            l.arg(v);
        }
        // SAFETY: argument types and order match kernels/pool.cu.
        check(unsafe { l.launch(grid(g.in_len())) }, "maxpool_backward");
    }

    fn dropout_forward(
        &self,
        rows: usize,
        cols: usize,
        p: f32,
        key: &DropoutKey,
        x: &mut CudaSlice<f32>,
    ) {
        assert_eq!(x.len(), rows * cols, "dropout block length");
        assert!(
            (0.0..1.0).contains(&p),
            "dropout probability {p} outside [0, 1)"
        );
        if p == 0.0 {
            return;
        }
        let (r, c) = (rows as i64, cols as i32);
        let mut l = self.stream.launch_builder(self.f("dropout"));
        l.arg(&mut *x)
            .arg(&r)
            .arg(&c)
            .arg(&p)
            .arg(&key.seed)
            .arg(&key.row_offset)
            .arg(&key.col_offset)
            .arg(&key.total_cols);
        // SAFETY: argument types and order match kernels/dropout.cu.
        check(unsafe { l.launch(grid(rows * cols)) }, "dropout");
    }

    fn dropout_backward(
        &self,
        rows: usize,
        cols: usize,
        p: f32,
        key: &DropoutKey,
        dy: &mut CudaSlice<f32>,
    ) {
        // Inverted dropout is linear in its input: the gradient takes the same mask and scale.
        self.dropout_forward(rows, cols, p, key, dy)
    }

    fn linear_forward(
        &self,
        g: &LinearGeom,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
    ) {
        assert_eq!(x.len(), g.rows * g.inp, "linear input length");
        assert_eq!(w.len(), g.out * g.inp, "linear weight length");
        assert_eq!(b.len(), g.out, "linear bias length");
        assert_eq!(y.len(), g.rows * g.out, "linear output length");
        self.broadcast_rows(g, b, y);
        // y[rows, out] += x[rows, inp] w[out, inp]^T
        self.gemm_rm(false, true, g.rows, g.out, g.inp, x, w, 1.0, y);
    }

    fn linear_forward_part(
        &self,
        g: &LinearGeom,
        part: InputPart,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        accumulate: bool,
    ) {
        part.check_linear(g, [x.len(), w.len(), b.len(), y.len()], accumulate);
        if !accumulate {
            self.broadcast_rows(g, b, y);
        }
        // y[rows, out] += x[rows, inp] w[out, first..first + inp]^T, w's rows `total` apart.
        let w_part = w.slice(part.first..);
        let mnk = (g.rows, g.out, g.inp);
        self.gemm_rm_ld(false, true, mnk, (g.inp, part.total), x, &w_part, 1.0, y);
    }

    fn linear_backward(
        &self,
        g: &LinearGeom,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: Option<&mut CudaSlice<f32>>,
        dw: &mut CudaSlice<f32>,
        db: &mut CudaSlice<f32>,
    ) {
        assert_eq!(x.len(), g.rows * g.inp, "linear input length");
        assert_eq!(w.len(), g.out * g.inp, "linear weight length");
        assert_eq!(dy.len(), g.rows * g.out, "linear output gradient length");
        assert_eq!(dw.len(), g.out * g.inp, "linear weight gradient length");
        assert_eq!(db.len(), g.out, "linear bias gradient length");
        // dw[out, inp] = dy[rows, out]^T x[rows, inp]
        self.gemm_rm(true, false, g.out, g.inp, g.rows, dy, x, 0.0, dw);
        {
            let (r, o) = (g.rows as i32, g.out as i32);
            let mut l = self.stream.launch_builder(self.f("bias_grad_rows"));
            l.arg(dy).arg(&mut *db).arg(&r).arg(&o);
            // SAFETY: argument types and order match kernels/bias.cu.
            check(unsafe { l.launch(per_item(g.out)) }, "bias_grad_rows");
        }
        if let Some(dx) = dx {
            self.linear_backward_data(g, w, dy, dx);
        }
    }

    fn linear_backward_data(
        &self,
        g: &LinearGeom,
        w: &CudaSlice<f32>,
        dy: &CudaSlice<f32>,
        dx: &mut CudaSlice<f32>,
    ) {
        assert_eq!(w.len(), g.out * g.inp, "linear weight length");
        assert_eq!(dy.len(), g.rows * g.out, "linear output gradient length");
        assert_eq!(dx.len(), g.rows * g.inp, "linear input gradient length");
        // dx[rows, inp] = dy[rows, out] w[out, inp]
        self.gemm_rm(false, false, g.rows, g.inp, g.out, dy, w, 0.0, dx);
    }

    fn softmax_xent(
        &self,
        rows: usize,
        classes: usize,
        logits: &CudaSlice<f32>,
        labels: &[u32],
        dlogits: &mut CudaSlice<f32>,
    ) -> f32 {
        let mut guard = self.queue_softmax_xent(rows, classes, logits, labels, dlogits);
        let loss_buf = guard.as_mut().expect("allocated");
        let losses = check(
            self.stream.clone_dtoh(&loss_buf.slice(0..rows)),
            "copying losses",
        );
        mean_loss(&losses)
    }

    fn softmax_xent_read(
        &self,
        rows: usize,
        classes: usize,
        logits: &CudaSlice<f32>,
        labels: &[u32],
        dlogits: &mut CudaSlice<f32>,
    ) -> Box<dyn crate::backend::PendingReadout> {
        let pool = self.readback.clone();
        let taken = pool.lock().unwrap().pop();
        let mut bufs = match taken {
            Some(b) if b.losses.len() >= rows && b.logits.len() >= logits.len() => b,
            // None yet, or too small (a larger batch): a larger pair replaces it.
            _ => match self.readback_buffers(rows, logits.len()) {
                Ok(b) => b,
                Err(e) => {
                    tracing::warn!(
                        error = ?e,
                        "page-locked memory refused: the loss is read back before the backward \
                         pass is queued"
                    );
                    let loss = self.softmax_xent(rows, classes, logits, labels, dlogits);
                    let logits = self.download(logits);
                    let readout = crate::backend::StepReadout { loss, logits };
                    return Box::new(crate::backend::ReadyReadout(readout));
                }
            },
        };
        let guard = self.queue_softmax_xent(rows, classes, logits, labels, dlogits);
        let loss_buf = guard.as_ref().expect("allocated");
        // Queued behind the softmax, with an event after them that the readout waits for.
        // (cudarc's `memcpy_dtoh` copies the whole destination: the buffers may be larger.)
        let losses = &mut check(bufs.losses.as_mut_slice(), "page-locked memory")[..rows];
        self.copy_into_pinned(loss_buf, losses, "copying losses");
        let host = &mut check(bufs.logits.as_mut_slice(), "page-locked memory")[..logits.len()];
        self.copy_into_pinned(logits, host, "copying logits");
        check(
            bufs.copied.record(&self.stream),
            "recording the readout's event",
        );
        Box::new(CudaReadout {
            bufs: Some(bufs),
            rows,
            logits: logits.len(),
            pool,
        })
    }

    fn sgd_update(
        &self,
        p: &SgdParams,
        w: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
    ) {
        assert!(
            w.len() == v.len() && w.len() == g.len(),
            "sgd buffers differ in length"
        );
        let decay = p.weight_decay * p.lr;
        let n = w.len() as i64;
        let mut l = self.stream.launch_builder(self.f("sgd_update"));
        l.arg(&mut *w)
            .arg(&mut *v)
            .arg(g)
            .arg(&p.lr)
            .arg(&p.momentum)
            .arg(&decay)
            .arg(&n);
        // SAFETY: argument types and order match kernels/elementwise.cu.
        check(unsafe { l.launch(grid(n as usize)) }, "sgd_update");
    }

    fn scale(&self, x: &mut CudaSlice<f32>, factor: f32) {
        let n = x.len() as i64;
        if n == 0 {
            return;
        }
        let mut l = self.stream.launch_builder(self.f("scale"));
        l.arg(&mut *x).arg(&factor).arg(&n);
        // SAFETY: argument types and order match kernels/elementwise.cu.
        check(unsafe { l.launch(grid(n as usize)) }, "scale");
    }

    fn concat_rows(
        &self,
        rows: usize,
        parts: &[&CudaSlice<f32>],
        widths: &[usize],
        out: &mut CudaSlice<f32>,
    ) {
        assert_eq!(parts.len(), widths.len(), "concat: one width per part");
        let total: usize = widths.iter().sum();
        assert_eq!(out.len(), rows * total, "concat output length");
        let mut offset = 0;
        for (p, &w) in parts.iter().zip(widths) {
            assert_eq!(p.len(), rows * w, "concat part length");
            let (r, t, o, wd) = (rows as i64, total as i32, offset as i32, w as i32);
            let mut l = self.stream.launch_builder(self.f("copy_into_rows"));
            l.arg(&mut *out).arg(*p).arg(&r).arg(&t).arg(&o).arg(&wd);
            // SAFETY: argument types and order match kernels/elementwise.cu.
            check(unsafe { l.launch(grid(rows * w)) }, "copy_into_rows");
            offset += w;
        }
    }

    fn slice_rows(
        &self,
        rows: usize,
        total: usize,
        offset: usize,
        width: usize,
        src: &CudaSlice<f32>,
        dst: &mut CudaSlice<f32>,
        accumulate: bool,
    ) {
        assert!(offset + width <= total, "slice beyond the row");
        assert_eq!(src.len(), rows * total, "slice source length");
        assert_eq!(dst.len(), rows * width, "slice destination length");
        let (r, t, o, w, acc) = (
            rows as i64,
            total as i32,
            offset as i32,
            width as i32,
            accumulate as i32,
        );
        let mut l = self.stream.launch_builder(self.f("slice_rows"));
        l.arg(&mut *dst)
            .arg(src)
            .arg(&r)
            .arg(&t)
            .arg(&o)
            .arg(&w)
            .arg(&acc);
        // SAFETY: argument types and order match kernels/elementwise.cu.
        check(unsafe { l.launch(grid(rows * width)) }, "slice_rows");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::rng;

    fn random(seed: u64, len: usize) -> Vec<f32> {
        let key = rng::key(seed, "cuBLAS configuration test");
        (0..len)
            .map(|i| rng::uniform(key, i as u64) - 0.5)
            .collect()
    }

    /// cuBLAS's column-major `sgemmStridedBatched`, by its definition: for each product `p`,
    /// `C_p = alpha op(A_p) op(B_p) + beta C_p`, element `(i, j)` of a matrix with leading
    /// dimension `ld` at `i + j * ld`. It refuses leading dimensions that cuBLAS refuses
    /// (`CUBLAS_STATUS_INVALID_VALUE`), and reads or writes past a slice's end panic, as
    /// cuBLAS would fault there.
    fn reference_sgemm(cfg: &StridedBatchedConfig<f32>, a: &[f32], b: &[f32], c: &mut [f32]) {
        let g = &cfg.gemm;
        let (m, n, k) = (g.m as usize, g.n as usize, g.k as usize);
        let ta = g.transa == Op::CUBLAS_OP_T;
        let tb = g.transb == Op::CUBLAS_OP_T;
        let (lda, ldb, ldc) = (g.lda as usize, g.ldb as usize, g.ldc as usize);
        assert!(
            lda >= (if ta { k } else { m }).max(1),
            "lda {lda} too small"
        );
        assert!(
            ldb >= (if tb { n } else { k }).max(1),
            "ldb {ldb} too small"
        );
        assert!(ldc >= m.max(1), "ldc {ldc} too small");
        for p in 0..cfg.batch_size as usize {
            let (oa, ob, oc) = (
                p * cfg.stride_a as usize,
                p * cfg.stride_b as usize,
                p * cfg.stride_c as usize,
            );
            for j in 0..n {
                for i in 0..m {
                    let mut sum = 0.0f64;
                    for l in 0..k {
                        let av = a[oa + if ta { l + i * lda } else { i + l * lda }];
                        let bv = b[ob + if tb { j + l * ldb } else { l + j * ldb }];
                        sum += av as f64 * bv as f64;
                    }
                    let cv = &mut c[oc + i + j * ldc];
                    let before = if g.beta == 0.0 { 0.0 } else { g.beta * *cv };
                    *cv = g.alpha * sum as f32 + before;
                }
            }
        }
    }

    /// The row-major product `c[m, n] = op(a) op(b) + beta c` by loops, `a` stored `[k, m]` if
    /// `ta` (else `[m, k]`), `b` stored `[n, k]` if `tb` (else `[k, n]`).
    #[allow(clippy::too_many_arguments)]
    fn row_major(
        ta: bool,
        tb: bool,
        (m, n, k): (usize, usize, usize),
        a: &[f32],
        b: &[f32],
        beta: f32,
        c: &mut [f32],
    ) {
        for i in 0..m {
            for j in 0..n {
                let mut sum = 0.0f64;
                for l in 0..k {
                    let av = a[if ta { l * m + i } else { i * k + l }];
                    let bv = b[if tb { j * k + l } else { l * n + j }];
                    sum += av as f64 * bv as f64;
                }
                c[i * n + j] = sum as f32 + beta * c[i * n + j];
            }
        }
    }

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{what}: [{i}] {g} vs {w}"
            );
        }
    }

    /// `gemm_rm` hands cuBLAS our `b` as its A and our `a` as its B: every transposition and
    /// leading dimension must give the row-major product, with beta 0, 1 and in between (the
    /// linear layers and the weight gradients use all four transpositions between them).
    #[test]
    fn cublas_configurations_compute_row_major_products() {
        let mut seed = 0;
        for (m, n, k) in [(3, 5, 7), (1, 4, 2), (6, 1, 3), (4, 4, 1)] {
            for ta in [false, true] {
                for tb in [false, true] {
                    for beta in [0.0, 1.0, 0.5] {
                        seed += 1;
                        let (a, b) = (random(seed, m * k), random(seed + 1000, k * n));
                        let c0 = random(seed + 2000, m * n);
                        let mut want = c0.clone();
                        row_major(ta, tb, (m, n, k), &a, &b, beta, &mut want);
                        let (mnk, lds) = ((m, n, k), dense_strides(ta, tb, (m, n, k)));
                        let cfg = batched_config(ta, tb, mnk, lds, (0, 0, 0), beta, 1);
                        let mut got = c0.clone();
                        reference_sgemm(&cfg, &b, &a, &mut got);
                        let what = format!("ta={ta} tb={tb} m={m} n={n} k={k} beta={beta}");
                        assert_close(&got, &want, &what);
                    }
                }
            }
        }
    }

    /// The batched products of the unfolding convolution, with the offsets and spans the
    /// backend slices (`output_span`): forward `y_i[cout, P] += w_g[cout, K] col_i[K, P]` into
    /// one group's channels of every image, and backward data
    /// `dcol_i[K, P] = w_g[cout, K]^T dy_i[cout, P]`, for each group of a two-group layer.
    #[test]
    fn batched_configurations_match_the_unfolding_convolutions_products() {
        let g = ConvGeom {
            batch: 3,
            in_c: 4,
            in_h: 5,
            in_w: 5,
            out_c: 6,
            kernel: 3,
            stride: 1,
            pad: 1,
            groups: 2,
        };
        let (cout, cin, plane) = (g.out_c / g.groups, g.in_c / g.groups, g.out_h() * g.out_w());
        let kk = cin * g.kernel * g.kernel;
        let per = kk * plane;
        let w = random(1, g.weight_len());
        let (n0, nb) = (1, 2);
        for grp in 0..g.groups {
            let wg = &w[grp * cout * kk..(grp + 1) * cout * kk];
            let (start, span) = Cuda::output_span(&g, n0, nb, grp);

            // Forward, accumulating onto the bias already broadcast into y.
            let col = random(2, nb * per);
            let y0 = random(3, g.out_len());
            let mut want = y0.clone();
            for i in 0..nb {
                let at = ((n0 + i) * g.out_c + grp * cout) * plane;
                let out = &mut want[at..at + cout * plane];
                row_major(
                    false,
                    false,
                    (cout, plane, kk),
                    wg,
                    &col[i * per..],
                    1.0,
                    out,
                );
            }
            let cfg = batched_config(
                false,
                false,
                (cout, plane, kk),
                (kk, plane),
                (0, per, g.out_c * plane),
                1.0,
                nb,
            );
            let mut got = y0.clone();
            reference_sgemm(&cfg, &col, wg, &mut got[start..start + span]);
            assert_close(&got, &want, &format!("forward, group {grp}"));

            // Backward data, overwriting the unfolded gradients.
            let dy = random(4, g.out_len());
            let mut want = vec![0.0; nb * per];
            for i in 0..nb {
                let at = ((n0 + i) * g.out_c + grp * cout) * plane;
                let dyi = &dy[at..at + cout * plane];
                let out = &mut want[i * per..(i + 1) * per];
                row_major(true, false, (kk, plane, cout), wg, dyi, 0.0, out);
            }
            let cfg = batched_config(
                true,
                false,
                (kk, plane, cout),
                dense_strides(true, false, (kk, plane, cout)),
                (0, g.out_c * plane, per),
                0.0,
                nb,
            );
            let mut got = vec![f32::NAN; nb * per];
            reference_sgemm(&cfg, &dy[start..start + span], wg, &mut got);
            assert_close(&got, &want, &format!("backward data, group {grp}"));
        }
    }

    /// The partial forward products of a layer whose input is gathered from both columns read
    /// their block of the weights in place: `linear_forward_part`'s
    /// `y[rows, out] += x[rows, inp] w[out, first..first + inp]^T` with `w`'s rows `total` apart,
    /// and the unfolding `conv2d_forward_part`'s `y_i[cout, P] += w[cout, first K..] col_i[K, P]`
    /// with the kernels' rows `total K` apart, each against the product of the block copied out.
    #[test]
    fn column_block_products_read_their_block_of_the_weights() {
        let (rows, out, total) = (5, 6, 11);
        for (first, inp) in [(0, 4), (4, 7), (3, 5)] {
            let w = random(10 + first as u64, out * total);
            let block: Vec<f32> = (0..out)
                .flat_map(|o| w[o * total + first..o * total + first + inp].to_vec())
                .collect();
            let x = random(20, rows * inp);
            let y0 = random(30, rows * out);
            let mut want = y0.clone();
            row_major(false, true, (rows, out, inp), &x, &block, 1.0, &mut want);
            let cfg = batched_config(
                false,
                true,
                (rows, out, inp),
                (inp, total),
                (0, 0, 0),
                1.0,
                1,
            );
            let mut got = y0.clone();
            reference_sgemm(&cfg, &w[first..], &x, &mut got);
            assert_close(&got, &want, &format!("linear, features {first}+{inp}"));
        }

        let g = ConvGeom {
            batch: 3,
            in_c: 2,
            in_h: 5,
            in_w: 5,
            out_c: 4,
            kernel: 3,
            stride: 1,
            pad: 1,
            groups: 1,
        };
        let (plane, kk) = (g.out_h() * g.out_w(), g.in_c * g.kernel * g.kernel);
        let per = kk * plane;
        let (first, total) = (3, 7);
        let w_rs = total * g.kernel * g.kernel;
        let w = random(40, g.out_c * w_rs);
        let w_first = first * g.kernel * g.kernel;
        let block: Vec<f32> = (0..g.out_c)
            .flat_map(|o| w[o * w_rs + w_first..o * w_rs + w_first + kk].to_vec())
            .collect();
        let (n0, nb) = (1, 2);
        let col = random(50, nb * per);
        let y0 = random(60, g.out_len());
        let mut want = y0.clone();
        for i in 0..nb {
            let at = (n0 + i) * g.out_c * plane;
            let out = &mut want[at..at + g.out_c * plane];
            row_major(
                false,
                false,
                (g.out_c, plane, kk),
                &block,
                &col[i * per..],
                1.0,
                out,
            );
        }
        let cfg = batched_config(
            false,
            false,
            (g.out_c, plane, kk),
            (w_rs, plane),
            (0, per, g.out_c * plane),
            1.0,
            nb,
        );
        let (start, span) = Cuda::output_span(&g, n0, nb, 0);
        let mut got = y0.clone();
        reference_sgemm(&cfg, &col, &w[w_first..], &mut got[start..start + span]);
        assert_close(&got, &want, "convolution, channels 3+2 of 7");
    }

    /// The per-item kernels (softmax rows, bias gradients) size their shared reduction arrays
    /// with their own `#define THREADS` and halve it in their reductions: the block that
    /// `per_item` launches must be exactly that size, and a power of two.
    #[test]
    fn per_item_blocks_match_the_kernels_shared_arrays() {
        assert!(THREADS.is_power_of_two());
        assert_eq!(per_item(3).block_dim, (THREADS, 1, 1));
        let mut seen = 0;
        for (file, source, _) in kernels::SOURCES {
            for line in source.lines() {
                if let Some(n) = line.trim().strip_prefix("#define THREADS ") {
                    assert_eq!(
                        n.trim().parse::<u32>().ok(),
                        Some(THREADS),
                        "{file}: {line}"
                    );
                    seen += 1;
                }
            }
        }
        assert!(seen >= 2, "the softmax and bias kernels define THREADS");
    }
}
