//! Blocks of f32 between two GPUs over NCCL: the data plane of columns on CUDA devices.
//!
//! NCCL moves data between GPUs over NVLink, PCIe peer-to-peer or InfiniBand without a trip
//! through the host's network stack, which is what the columns of a network on two GPUs want:
//! they swap activations and gradients several times per step. A link is a communicator of two
//! ranks (this column and its partner), created from a unique id that column 0 makes with
//! [`unique_id`] and the coordinator relays to column 1.
//!
//! The replicas of one column position on GPUs average their gradients the same way, with
//! NCCL's all-reduce in a communicator of all the replicas ([`NcclReplicaGroup`]), whose id
//! replica 0 makes.
//!
//! **Current limitation:** [`Link::swap`] and [`ReplicaReduce::all_reduce_mean`] take and
//! return host memory, so a block is staged through the host: copied to the device, moved by
//! NCCL, copied back. Until the CUDA backend hands device buffers to the exchanges directly,
//! NCCL saves the network hop of TCP, not the two copies across PCIe.
//!
//! NCCL's communicator, the CUDA context and the stream are tied to the thread that uses them,
//! so a communicator owns a thread that holds all three, and the link or group talks to it
//! over channels. Every wait has the job's peer timeout, as on the TCP data plane: the
//! communicator is created non-blocking and polled, each transfer is polled until its event
//! completes, and when the deadline passes the thread aborts the communicator
//! (`ncclCommAbort`), which ends the pending transfers, so that a dead or silent peer is an
//! error, not a hang. A communicator that failed once stays failed.
//!
//! A worker may run two communicators at once on its GPU: the replica group averages one
//! layer's gradients on its thread while the training thread swaps the columns' blocks of the
//! layers below (`OverlappedReduce`). NCCL supports concurrent communicators on one device only
//! as far as their kernels can run side by side; should they ever stall each other, the
//! timeouts turn the stall into an error. (A lock around all NCCL calls would not help: it can
//! deadlock across ranks.) Not yet seen on hardware: no check here has had several GPUs.
//!
//! Like the TCP frame, every block carries a 16-byte header (magic, sequence, value count) in
//! front of its values, so that ranks that fell out of step, or disagree on a block's size,
//! stop with an error that names the peer rather than silently swapping the wrong data.
//!
//! CUDA's driver (`libcuda.so`) and NCCL (`libnccl.so`) are loaded when first needed, so the
//! binary builds and runs without them; a missing library is an error that says where to look.

use super::tcp::PeerError;
use super::{Link, ReplicaReduce, Traffic};
use anyhow::{anyhow, bail, Context};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DriverError,
};
use cudarc::nccl::{result as nccl, sys};
use std::ffi::{c_int, c_void, CStr};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Marks the header of a block, like the TCP frame's `"AXF1"`.
const BLOCK_MAGIC: &[u8; 4] = b"AXN1";
/// Header words (f32-sized) in front of every block: magic, sequence (two words), value count.
const HEADER: usize = 4;
/// Bytes of a header.
const HEADER_BYTES: u64 = 4 * HEADER as u64;
/// How long the caller waits for the link's thread beyond the peer timeout while it aborts the
/// communicator. Past this, a CUDA or NCCL call itself hangs.
const SWAP_GRACE: Duration = Duration::from_secs(10);
/// As [`SWAP_GRACE`], at creation, which also initialises the driver and the CUDA context.
const STARTUP_GRACE: Duration = Duration::from_secs(60);
/// `NCCL_VERSION(2, 30, 0)`: the version of the `nccl.h` behind cudarc's bindings, which NCCL
/// reads from the config to know which of its fields the caller set.
const NCCL_HEADER_VERSION: u32 = 2 * 10_000 + 30 * 100;
/// `NCCL_CONFIG_UNDEF_INT`: leave the field to NCCL's default.
const UNDEF: c_int = c_int::MIN;

/// Checks that the CUDA driver and NCCL can be loaded: cudarc panics when it needs a library
/// it cannot find, so this runs before anything else touches them.
/// Whether the CUDA driver and NCCL can be loaded here (an error saying which is missing).
pub fn check_libraries() -> anyhow::Result<()> {
    // SAFETY: only tries to dlopen the candidate names, with no other effect.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!(
            "the NVIDIA driver library (libcuda.so.1) cannot be loaded: NCCL needs a GPU and its \
             driver (is the driver installed, and its directory on LD_LIBRARY_PATH?)"
        );
    }
    // SAFETY: as above.
    if !unsafe { sys::is_culib_present() } {
        bail!(
            "libnccl.so cannot be loaded: install NCCL and put the directory holding libnccl.so on \
             LD_LIBRARY_PATH (the loader looks for libnccl.so, not libnccl.so.2: where there is \
             only libnccl.so.2, as in the nvidia-nccl wheels, add a libnccl.so link to it)"
        );
    }
    Ok(())
}

/// The text of a panic caught at the edge of cudarc (a library or symbol it could not load).
fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning a panic inside cudarc into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> anyhow::Result<T>) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(anyhow!("{what}: {}", panic_message(p))))
}

/// NCCL's description of `code`, and of the last error it logged.
fn describe(code: sys::ncclResult_t) -> String {
    // SAFETY: both return NUL-terminated strings: a static one, and NCCL's process-wide last
    // error (its argument is ignored), copied at once. Another communicator's thread may write
    // that buffer meanwhile, so the second text may be torn or be another communicator's; it
    // is only added to a message.
    unsafe {
        let text = |p: *const std::ffi::c_char| {
            (!p.is_null()).then(|| CStr::from_ptr(p).to_string_lossy().into_owned())
        };
        let name = text(sys::ncclGetErrorString(code)).unwrap_or_else(|| format!("{code:?}"));
        match text(sys::ncclGetLastError(std::ptr::null_mut())) {
            Some(last) if !last.is_empty() => format!("{name} ({last})"),
            _ => name,
        }
    }
}

fn nccl_error(what: &str, e: nccl::NcclError) -> anyhow::Error {
    anyhow!("{what}: {}", describe(e.0))
}

/// CUDA errors, described at once: formatting a [`DriverError`] later calls into the driver,
/// which may be gone (or missing the symbol) by then.
trait CudaResult<T> {
    fn cuda(self, what: &str) -> anyhow::Result<T>;
}

impl<T> CudaResult<T> for Result<T, DriverError> {
    fn cuda(self, what: &str) -> anyhow::Result<T> {
        self.map_err(|e| anyhow!("{what}: {e}"))
    }
}

fn peer_error(rank: usize, message: String) -> anyhow::Error {
    PeerError { rank, message }.into()
}

/// A NCCL unique id, made by column 0 and relayed by the coordinator to column 1, which both
/// pass to [`NcclLink::new`]. Fails (never panics) where the CUDA driver or NCCL is missing.
///
/// The id holds the address of a bootstrap listener that NCCL starts in the calling process,
/// so the process that calls this must stay up until both ranks have joined: column 0's
/// worker, not the coordinator.
pub fn unique_id() -> anyhow::Result<[u8; 128]> {
    check_libraries()?;
    let id = guarded("ncclGetUniqueId", || {
        nccl::get_uniqueid().map_err(|e| nccl_error("ncclGetUniqueId", e))
    })?;
    Ok(id.internal.map(|c| c as u8))
}

/// The header of block `seq` of `count` values, as f32 words.
fn header(seq: u64, count: usize) -> [f32; HEADER] {
    [
        f32::from_bits(u32::from_le_bytes(*BLOCK_MAGIC)),
        f32::from_bits(seq as u32),
        f32::from_bits((seq >> 32) as u32),
        f32::from_bits(count as u32),
    ]
}

/// Checks a received header against the block that was due. The count check catches a peer
/// that sends a block of another size only where NCCL delivers it: a send and a receive of
/// different counts are an error NCCL need not report, and most often the receive just never
/// completes, which the swap reports when the peer timeout runs out.
fn check_header(h: &[f32; HEADER], peer: usize, seq: u64, expect: usize) -> anyhow::Result<()> {
    if h[0].to_bits() != u32::from_le_bytes(*BLOCK_MAGIC) {
        return Err(peer_error(
            peer,
            format!("rank {peer} sent a malformed block header over NCCL"),
        ));
    }
    let got_seq = h[1].to_bits() as u64 | (h[2].to_bits() as u64) << 32;
    if got_seq != seq {
        return Err(peer_error(
            peer,
            format!(
                "rank {peer} sent block {got_seq} over NCCL where block {seq} was due: the ranks \
                 are out of step"
            ),
        ));
    }
    let count = h[3].to_bits() as usize;
    if count != expect {
        return Err(peer_error(
            peer,
            format!(
                "rank {peer} sent {count} values over NCCL where {expect} were due: do both run \
                 the same network and batch?"
            ),
        ));
    }
    Ok(())
}

/// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: calls return at once and the communicator's
/// state is polled, so that every wait can have a deadline.
fn nonblocking_config() -> sys::ncclConfig_t {
    sys::ncclConfig_t {
        size: std::mem::size_of::<sys::ncclConfig_t>(),
        magic: 0xcafe_beef,
        version: NCCL_HEADER_VERSION,
        blocking: 0,
        cgaClusterSize: UNDEF,
        minCTAs: UNDEF,
        maxCTAs: UNDEF,
        netName: std::ptr::null(),
        splitShare: UNDEF,
        trafficClass: UNDEF,
        commName: std::ptr::null(),
        collnetEnable: UNDEF,
        CTAPolicy: UNDEF,
        shrinkShare: UNDEF,
        nvlsCTAs: UNDEF,
        nChannelsPerNetPeer: UNDEF,
        nvlinkCentricSched: UNDEF,
        graphUsageMode: UNDEF,
        numRmaCtx: UNDEF,
        maxP2pPeers: UNDEF,
    }
}

/// Waits a little between polls: yields at first, so that short swaps return quickly, then
/// sleeps, so that a long wait for a slow peer does not burn a core.
fn pause(since: Instant) {
    if since.elapsed() < Duration::from_millis(5) {
        std::thread::yield_now();
    } else {
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// How a wait for a communicator's queued work ended.
#[derive(Debug, PartialEq)]
enum Waited {
    Done,
    /// The communicator reported this error (the caller aborts it, or drops it: a drop aborts).
    Failed(sys::ncclResult_t),
    /// The work did not complete within the timeout (the caller aborts the communicator).
    TimedOut,
}

/// Polls until work queued on a communicator has completed, never past `timeout` from
/// `started`. First the communicator's `state` leaves `ncclInProgress` (a non-blocking group
/// may still be connecting to its peers); then `mark` records an event behind the work on its
/// stream, and `complete` says when the stream has passed it. An error `state` ends the wait
/// in either phase. Kept apart from the CUDA and NCCL calls so that the timeout and failure
/// paths are tested without a GPU.
fn poll_completion(
    started: Instant,
    timeout: Duration,
    mut state: impl FnMut() -> anyhow::Result<sys::ncclResult_t>,
    mark: impl FnOnce() -> anyhow::Result<()>,
    mut complete: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Waited> {
    use sys::ncclResult_t::{ncclInProgress, ncclSuccess};
    loop {
        match state()? {
            ncclSuccess => break,
            ncclInProgress => {}
            code => return Ok(Waited::Failed(code)),
        }
        if started.elapsed() > timeout {
            return Ok(Waited::TimedOut);
        }
        pause(started);
    }
    mark()?;
    while !complete()? {
        match state()? {
            ncclSuccess | ncclInProgress => {}
            code => return Ok(Waited::Failed(code)),
        }
        if started.elapsed() > timeout {
            return Ok(Waited::TimedOut);
        }
        pause(started);
    }
    Ok(Waited::Done)
}

/// How long a communicator that ends cleanly may take to finish what is in flight before it is
/// aborted instead (under [`Communicator`]'s wait for its thread).
const FINALIZE_LIMIT: Duration = Duration::from_secs(5);

/// Whether a communicator's failure code says that a peer (or the network to it) failed, rather
/// than this process: only then is the failure blamed on the peer. `ncclSystemError` is a
/// system call that failed here (a too small `/dev/shm` in a container, sockets, memory).
fn peer_failure(code: sys::ncclResult_t) -> bool {
    code == sys::ncclResult_t::ncclRemoteError
}

/// A communicator, aborted when dropped (abort, unlike destroy, never waits for the peer); one
/// that ends cleanly is finalized first ([`RawComm::finalize`]).
struct RawComm(sys::ncclComm_t);

impl RawComm {
    /// The communicator's state: `ncclInProgress` while an initialisation or a group is still
    /// being set up, `ncclSuccess` when ready, an error once something failed.
    fn state(&self) -> anyhow::Result<sys::ncclResult_t> {
        let mut state = sys::ncclResult_t::ncclSuccess;
        // SAFETY: `self.0` is a live communicator and `state` a valid out-pointer.
        unsafe { sys::ncclCommGetAsyncError(self.0, &mut state) }
            .result()
            .map_err(|e| nccl_error("ncclCommGetAsyncError", e))?;
        Ok(state)
    }

    /// Ends the communicator cleanly: NCCL first finishes every operation still in flight (over
    /// a network, the last chunks of a send may still be leaving after this rank's kernel has
    /// finished, and an abort would cut them off from the peer's last receive), then it is
    /// destroyed. Past `limit`, or on an error, it is aborted instead.
    fn finalize(&mut self, limit: Duration) {
        if self.0.is_null() {
            return;
        }
        let started = Instant::now();
        // SAFETY: `self.0` is a live communicator, used by this thread only.
        let r = unsafe { sys::ncclCommFinalize(self.0) };
        if !matches!(
            r,
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
        ) {
            tracing::warn!(
                "ncclCommFinalize: {}; aborting the communicator",
                describe(r)
            );
            return self.abort();
        }
        loop {
            match self.state() {
                Ok(sys::ncclResult_t::ncclSuccess) => break,
                Ok(sys::ncclResult_t::ncclInProgress) if started.elapsed() < limit => {
                    pause(started)
                }
                Ok(sys::ncclResult_t::ncclInProgress) => {
                    tracing::warn!(
                        ?limit,
                        "NCCL did not finish in time; aborting the communicator"
                    );
                    return self.abort();
                }
                Ok(code) => {
                    tracing::warn!(
                        "finishing NCCL: {}; aborting the communicator",
                        describe(code)
                    );
                    return self.abort();
                }
                Err(e) => {
                    tracing::warn!("finishing NCCL: {e:#}; aborting the communicator");
                    return self.abort();
                }
            }
        }
        // SAFETY: finalized, and not used again. (NCCL may still wait here for the other ranks
        // on this machine to free theirs; `Communicator`'s drop waits only so long.)
        let r = unsafe { sys::ncclCommDestroy(self.0) };
        self.0 = std::ptr::null_mut();
        if r != sys::ncclResult_t::ncclSuccess {
            tracing::warn!("ncclCommDestroy: {}", describe(r));
        }
    }

    fn abort(&mut self) {
        if !self.0.is_null() {
            // SAFETY: `self.0` is a live communicator; it is not used again.
            if let Err(e) = unsafe { nccl::comm_abort(self.0) } {
                tracing::warn!("ncclCommAbort: {}", describe(e.0));
            }
            self.0 = std::ptr::null_mut();
        }
    }
}

impl Drop for RawComm {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Who a communicator's other ranks are, for messages, and which one a failure blames.
#[derive(Clone, Debug)]
struct Peers {
    /// "rank 3", "the replicas on ranks 1, 3 and 5".
    who: String,
    /// The global rank a failure of the communicator is blamed on: the partner of a pair, the
    /// other replica of two; none in a larger group (the failed rank reports itself).
    blame: Option<usize>,
}

impl Peers {
    fn error(&self, message: String) -> anyhow::Error {
        match self.blame {
            Some(rank) => peer_error(rank, message),
            None => anyhow!(message),
        }
    }
}

/// What a communicator's thread needs to start.
struct Setup {
    device: usize,
    /// This process's rank in the communicator, and the communicator's size.
    rank: usize,
    nranks: usize,
    id: [u8; 128],
    timeout: Duration,
    peers: Peers,
}

/// Words in front of an all-reduced block: 1 and the sequence number (modulo
/// [`check_modulus`]), which sum to the rank count and to rank count x sequence when every
/// rank is at the same block.
const CHECK_WORDS: usize = 2;

/// The communicator's thread: the communicator and what it runs on. Fields drop in this order:
/// the communicator is aborted before the buffers and the stream go.
struct CommOnThread {
    comm: RawComm,
    send: CudaSlice<f32>,
    recv: CudaSlice<f32>,
    done: CudaEvent,
    stream: Arc<CudaStream>,
    _ctx: Arc<CudaContext>,
    rank: usize,
    nranks: usize,
    peers: Peers,
    timeout: Duration,
    seq_out: u64,
    seq_in: u64,
}

impl CommOnThread {
    fn start(s: &Setup) -> anyhow::Result<CommOnThread> {
        let ctx = CudaContext::new(s.device).cuda(&format!("opening CUDA device {}", s.device))?;
        // One stream carries every copy and transfer, in order, so cudarc need not track the
        // buffers' uses with events.
        // SAFETY: no buffer of this context is used on another stream.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().cuda("creating a CUDA stream")?;
        let send = stream
            .alloc_zeros::<f32>(HEADER)
            .cuda("allocating device memory")?;
        let recv = stream
            .alloc_zeros::<f32>(HEADER)
            .cuda("allocating device memory")?;
        let done = ctx.new_event(None).cuda("creating a CUDA event")?;
        let version = nccl::get_nccl_version().map_err(|e| nccl_error("ncclGetVersion", e))?;

        let who = &s.peers.who;
        let id = sys::ncclUniqueId {
            internal: s.id.map(|b| b as std::ffi::c_char),
        };
        let mut config = nonblocking_config();
        let mut comm = RawComm(std::ptr::null_mut());
        let started = Instant::now();
        // SAFETY: valid out-pointer and config; the CUDA context is current on this thread.
        let init = unsafe {
            nccl::comm_init_rank_config(
                &mut comm.0,
                s.nranks as c_int,
                id,
                s.rank as c_int,
                &mut config,
            )
        };
        if let Err(e) = init {
            return Err(nccl_error(
                &format!("creating the NCCL communicator with {who}"),
                e,
            ));
        }
        if comm.0.is_null() {
            bail!("ncclCommInitRankConfig returned no communicator");
        }
        // Set up once the communicator leaves `ncclInProgress` (nothing is queued on a stream).
        match poll_completion(started, s.timeout, || comm.state(), || Ok(()), || Ok(true))? {
            Waited::Done => {}
            Waited::Failed(code) if peer_failure(code) => {
                return Err(s.peers.error(format!(
                    "creating the NCCL communicator with {who} failed: {}",
                    describe(code)
                )))
            }
            Waited::Failed(code) => bail!(
                "creating the NCCL communicator with {who} failed in this process: {}",
                describe(code)
            ),
            Waited::TimedOut => {
                comm.abort();
                return Err(s.peers.error(format!(
                    "{who} did not join the NCCL communicator within {:?}: stopped, cut off, or \
                     holding another unique id",
                    s.timeout
                )));
            }
        }
        tracing::info!(
            peers = %who,
            device = s.device,
            "NCCL {}.{}.{} communicator of {} ranks up in {:?}",
            version / 10_000,
            version % 10_000 / 100,
            version % 100,
            s.nranks,
            started.elapsed()
        );
        Ok(CommOnThread {
            comm,
            send,
            recv,
            done,
            stream,
            _ctx: ctx,
            rank: s.rank,
            nranks: s.nranks,
            peers: s.peers.clone(),
            timeout: s.timeout,
            seq_out: 0,
            seq_in: 0,
        })
    }

    /// Grows the device buffers to hold `send` and `recv` words. The stream is idle here.
    fn reserve(&mut self, send: usize, recv: usize) -> anyhow::Result<()> {
        if self.send.len() < send {
            let bytes = 4 * send;
            self.send = (self.stream.alloc_zeros::<f32>(send))
                .cuda(&format!("allocating {bytes} bytes of device memory"))?;
        }
        if self.recv.len() < recv {
            let bytes = 4 * recv;
            self.recv = (self.stream.alloc_zeros::<f32>(recv))
                .cuda(&format!("allocating {bytes} bytes of device memory"))?;
        }
        Ok(())
    }

    /// The error of a transfer that failed on the communicator, after aborting it: blamed on
    /// the peer where NCCL says a peer or the network failed, on this process otherwise.
    fn failed(&mut self, code: sys::ncclResult_t) -> anyhow::Error {
        let who = self.peers.who.clone();
        self.comm.abort();
        if peer_failure(code) {
            self.peers.error(format!(
                "the NCCL communicator with {who} failed: {} (a peer has probably failed, see \
                 its log)",
                describe(code)
            ))
        } else {
            anyhow!(
                "the NCCL communicator with {who} failed in this process: {}",
                describe(code)
            )
        }
    }

    fn timed_out(&mut self) -> anyhow::Error {
        self.comm.abort();
        self.peers.error(format!(
            "{} sent nothing over NCCL for {:?}: stopped, cut off, or sending blocks of another \
             size (the limit is the job's peer timeout)",
            self.peers.who, self.timeout
        ))
    }

    /// Aborts the communicator if a just-queued NCCL call failed.
    fn queued<'a>(
        &mut self,
        calls: impl IntoIterator<Item = (&'a str, Result<nccl::NcclStatus, nccl::NcclError>)>,
    ) -> anyhow::Result<()> {
        for (what, r) in calls {
            if let Err(e) = r {
                self.comm.abort();
                return Err(nccl_error(&format!("{what} with {}", self.peers.who), e));
            }
        }
        Ok(())
    }

    /// Waits, polling, until what was queued on the stream has completed ([`poll_completion`]);
    /// aborts the communicator where it failed or the timeout passed.
    fn wait(&mut self, started: Instant) -> anyhow::Result<()> {
        let (comm, done, stream) = (&self.comm, &self.done, &self.stream);
        let waited = poll_completion(
            started,
            self.timeout,
            || comm.state(),
            || done.record(stream).cuda("recording a CUDA event"),
            || done.try_is_complete().cuda("the NCCL transfer"),
        )?;
        match waited {
            Waited::Done => Ok(()),
            Waited::Failed(code) => Err(self.failed(code)),
            Waited::TimedOut => Err(self.timed_out()),
        }
    }

    /// Sends `mine` to the other rank of a pair and receives its block of `expect` values.
    fn swap(&mut self, mine: &[f32], expect: usize) -> anyhow::Result<Vec<f32>> {
        let started = Instant::now();
        if mine.len().max(expect) > u32::MAX as usize {
            bail!(
                "a block of more than {} values cannot cross a NCCL link",
                u32::MAX
            );
        }
        let (n_out, n_in) = (HEADER + mine.len(), HEADER + expect);
        self.reserve(n_out, n_in)?;
        let stream = self.stream.clone();
        let head = header(self.seq_out, mine.len());
        (stream.memcpy_htod(&head, &mut self.send.slice_mut(..HEADER)))
            .cuda("copying a block to the device")?;
        (stream.memcpy_htod(mine, &mut self.send.slice_mut(HEADER..n_out)))
            .cuda("copying a block to the device")?;

        let f32_type = sys::ncclDataType_t::ncclFloat32;
        let cu_stream = stream.cu_stream() as sys::cudaStream_t;
        let (comm, peer) = (self.comm.0, 1 - self.rank as c_int);
        // No event tracking (see `start`): the guards that come with the pointers do nothing.
        let src = self.send.device_ptr(&stream).0;
        let dst = self.recv.device_ptr_mut(&stream).0;
        // SAFETY: the buffers hold `n_out` and `n_in` words and outlive the transfer (this
        // function waits for it, or aborts the communicator, before returning); the
        // communicator is live. The group is ended whatever the calls return.
        let (sent, received, ended) = unsafe {
            nccl::group_start().map_err(|e| nccl_error("ncclGroupStart", e))?;
            let sent = nccl::send(src as *const c_void, n_out, f32_type, peer, comm, cu_stream);
            let received = nccl::recv(dst as *mut c_void, n_in, f32_type, peer, comm, cu_stream);
            (sent, received, nccl::group_end())
        };
        self.queued([
            ("ncclSend", sent),
            ("ncclRecv", received),
            ("ncclGroupEnd", ended),
        ])?;
        self.wait(started)?;

        // The stream is idle: these copies return at once.
        let mut head = [0f32; HEADER];
        (stream.memcpy_dtoh(&self.recv.slice(..HEADER), &mut head))
            .cuda("copying a block from the device")?;
        let peer_rank = self.peers.blame.unwrap_or(0);
        if let Err(e) = check_header(&head, peer_rank, self.seq_in, expect) {
            self.comm.abort();
            return Err(e);
        }
        let mut theirs = vec![0f32; expect];
        (stream.memcpy_dtoh(&self.recv.slice(HEADER..n_in), &mut theirs))
            .cuda("copying a block from the device")?;
        self.seq_out += 1;
        self.seq_in += 1;
        Ok(theirs)
    }

    /// `data` = the sum over every rank of its `data`, the same bits on every rank (NCCL
    /// reduces each element once and hands the result to all).
    fn all_reduce_sum(&mut self, data: &mut [f32]) -> anyhow::Result<()> {
        let started = Instant::now();
        let n = CHECK_WORDS + data.len();
        self.reserve(n, n)?;
        let stream = self.stream.clone();
        let seq = (self.seq_out % check_modulus(self.nranks)) as f32;
        (stream.memcpy_htod(&[1.0, seq], &mut self.send.slice_mut(..CHECK_WORDS)))
            .cuda("copying a block to the device")?;
        (stream.memcpy_htod(&*data, &mut self.send.slice_mut(CHECK_WORDS..n)))
            .cuda("copying a block to the device")?;
        let cu_stream = stream.cu_stream() as sys::cudaStream_t;
        let src = self.send.device_ptr(&stream).0;
        let dst = self.recv.device_ptr_mut(&stream).0;
        // SAFETY: both buffers hold `n` words and outlive the reduction (waited for, or the
        // communicator aborted, below); the communicator is live.
        let reduced = unsafe {
            nccl::all_reduce(
                src as *const c_void,
                dst as *mut c_void,
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm.0,
                cu_stream,
            )
        };
        self.queued([("ncclAllReduce", reduced)])?;
        self.wait(started)?;
        let mut check = [0f32; CHECK_WORDS];
        (stream.memcpy_dtoh(&self.recv.slice(..CHECK_WORDS), &mut check))
            .cuda("copying a block from the device")?;
        let ranks = self.nranks as f32;
        if check != [ranks, ranks * seq] {
            self.comm.abort();
            return Err(self.peers.error(format!(
                "the ranks of the NCCL all-reduce with {} are out of step (block {} here; the \
                 check words summed to {check:?}, not {:?})",
                self.peers.who,
                self.seq_out,
                [ranks, ranks * seq]
            )));
        }
        (stream.memcpy_dtoh(&self.recv.slice(CHECK_WORDS..n), data))
            .cuda("copying a block from the device")?;
        self.seq_out += 1;
        Ok(())
    }
}

/// The modulus of the sequence word, so that the sum over `nranks` ranks, and every partial sum
/// on the way in whatever order NCCL adds, is an integer below 2^24, exact in f32.
fn check_modulus(nranks: usize) -> u64 {
    let ceil_log2 = usize::BITS - nranks.max(1).saturating_sub(1).leading_zeros();
    1 << 24u32.saturating_sub(ceil_log2).max(1)
}

/// What the communicator's thread is asked to do; the block comes back with the answer, for
/// reuse.
enum Job {
    Swap { mine: Vec<f32>, expect: usize },
    AllReduceSum { data: Vec<f32> },
}

enum FromThread {
    Ready(anyhow::Result<()>),
    /// The answer (the peer's block, or the sum), and the block that was sent.
    Done(anyhow::Result<Vec<f32>>, Vec<f32>),
}

/// The communicator's thread: starts the communicator, then runs jobs until it is dropped or a
/// job fails. Then it ends the communicator: finalized after clean work (so that what is still
/// in flight reaches the peers), aborted after a failure (which may have left it mid-transfer:
/// a failed communicator stays failed).
fn run(setup: Setup, jobs: Receiver<Job>, out: Sender<FromThread>) {
    let mut thread = match guarded("starting NCCL", || CommOnThread::start(&setup)) {
        Ok(w) => {
            let _ = out.send(FromThread::Ready(Ok(())));
            w
        }
        Err(e) => {
            let _ = out.send(FromThread::Ready(Err(e)));
            return;
        }
    };
    while let Ok(job) = jobs.recv() {
        let reply = match job {
            Job::Swap { mine, expect } => {
                let r = guarded("NCCL swap", || thread.swap(&mine, expect));
                FromThread::Done(r, mine)
            }
            Job::AllReduceSum { mut data } => {
                let r = guarded("NCCL all-reduce", || thread.all_reduce_sum(&mut data));
                match r {
                    Ok(()) => FromThread::Done(Ok(Vec::new()), data),
                    Err(e) => FromThread::Done(Err(e), data),
                }
            }
        };
        let failed = matches!(reply, FromThread::Done(Err(_), _));
        if failed {
            thread.comm.abort();
        }
        if out.send(reply).is_err() || failed {
            break;
        }
    }
    // Aborted already after a failure, when this does nothing.
    thread.comm.finalize(FINALIZE_LIMIT);
}

/// A NCCL communicator run by its own thread (NCCL's communicator, the CUDA context and the
/// stream are tied to the thread that uses them), which this talks to over channels, every
/// wait bounded.
struct Communicator {
    jobs: Option<Sender<Job>>,
    replies: Receiver<FromThread>,
    thread: Option<JoinHandle<()>>,
    peers: Peers,
    timeout: Duration,
    /// Why the communicator failed, and whether a peer was to blame: it stays failed.
    broken: Option<(String, bool)>,
    /// The thread did not answer in time: a CUDA or NCCL call hangs, so dropping does not
    /// wait for it.
    hung: bool,
}

impl Communicator {
    /// Joins the communicator of `id` as `setup.rank` of `setup.nranks`; fails if the others
    /// have not joined within `setup.timeout`.
    fn start(setup: Setup, thread_name: String) -> anyhow::Result<Communicator> {
        if setup.nranks < 1 || setup.rank >= setup.nranks {
            bail!(
                "rank {} of a NCCL communicator of {} ranks does not exist",
                setup.rank,
                setup.nranks
            );
        }
        if setup.id.iter().all(|&b| b == 0) {
            bail!("the NCCL unique id is empty: the first rank makes it with unique_id()");
        }
        check_libraries()?;
        let (jobs, job_rx) = channel();
        let (reply_tx, replies) = channel();
        let (peers, timeout) = (setup.peers.clone(), setup.timeout);
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || run(setup, job_rx, reply_tx))
            .context("starting the NCCL communicator's thread")?;
        let mut c = Communicator {
            jobs: Some(jobs),
            replies,
            thread: Some(thread),
            peers,
            timeout,
            broken: None,
            hung: false,
        };
        let wait = timeout.saturating_add(STARTUP_GRACE);
        match c.replies.recv_timeout(wait) {
            Ok(FromThread::Ready(Ok(()))) => Ok(c),
            Ok(FromThread::Ready(Err(e))) => Err(e),
            Ok(FromThread::Done(..)) => {
                bail!("the NCCL communicator's thread answered out of turn")
            }
            Err(RecvTimeoutError::Timeout) => {
                c.hung = true;
                Err(c.peers.error(format!(
                    "the NCCL communicator with {} did not start within {wait:?}: a CUDA or NCCL \
                     call hangs",
                    c.peers.who
                )))
            }
            Err(RecvTimeoutError::Disconnected) => {
                bail!("the NCCL communicator's thread ended while starting")
            }
        }
    }

    fn fail(&mut self, e: anyhow::Error) -> anyhow::Error {
        let by_peer = e.downcast_ref::<PeerError>().is_some();
        self.broken = Some((format!("{e:#}"), by_peer));
        e
    }

    /// Runs `job` on the thread: the answer and the block sent, or why it failed.
    fn call(&mut self, job: Job) -> anyhow::Result<(Vec<f32>, Vec<f32>)> {
        let who = self.peers.who.clone();
        if let Some((why, by_peer)) = &self.broken {
            let message = format!("the NCCL communicator with {who} failed earlier: {why}");
            return Err(if *by_peer {
                self.peers.error(message)
            } else {
                anyhow!(message)
            });
        }
        let sent = self.jobs.as_ref().is_some_and(|j| j.send(job).is_ok());
        if !sent {
            let e = anyhow!("the NCCL communicator's thread for {who} is gone");
            return Err(self.fail(e));
        }
        match (self.replies).recv_timeout(self.timeout.saturating_add(SWAP_GRACE)) {
            Ok(FromThread::Done(Ok(answer), block)) => Ok((answer, block)),
            Ok(FromThread::Done(Err(e), _)) => Err(self.fail(e)),
            Ok(FromThread::Ready(_)) => {
                let e = anyhow!("the NCCL communicator's thread answered out of turn");
                Err(self.fail(e))
            }
            Err(RecvTimeoutError::Timeout) => {
                self.hung = true;
                let e = self.peers.error(format!(
                    "{who} sent nothing over NCCL for {:?}: stopped or cut off (and aborting the \
                     communicator hangs too)",
                    self.timeout
                ));
                Err(self.fail(e))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let e = anyhow!("the NCCL communicator's thread for {who} ended unexpectedly");
                Err(self.fail(e))
            }
        }
    }
}

impl Drop for Communicator {
    /// Ends the thread, which finalizes (or, after a failure, aborts) the communicator and frees
    /// the device buffers. Waits for it briefly, unless it is known to hang.
    fn drop(&mut self) {
        self.jobs = None;
        if self.hung {
            return;
        }
        let deadline = Instant::now() + SWAP_GRACE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.replies.recv_timeout(left) {
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    if let Some(t) = self.thread.take() {
                        let _ = t.join();
                    }
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {
                    tracing::warn!(
                        peers = %self.peers.who,
                        "the NCCL communicator's thread did not end within {SWAP_GRACE:?}; \
                         leaving it"
                    );
                    return;
                }
            }
        }
    }
}

/// One end of a two-rank NCCL communicator, carrying blocks between this column and its
/// partner on another GPU (of this machine or another).
pub struct NcclLink {
    comm: Communicator,
    peer_rank: usize,
    /// The last block sent, returned by the thread, whose allocation the next swap reuses.
    spare: Vec<f32>,
    traffic: Traffic,
}

impl NcclLink {
    /// Joins the communicator of `id` (from [`unique_id`] on column 0) as rank
    /// `my_rank_in_pair` (0 or 1) on CUDA device `device_ordinal`; `peer_global_rank` names the
    /// partner in messages. Fails if the partner has not joined within `timeout`, which also
    /// bounds every later swap.
    pub fn new(
        device_ordinal: usize,
        my_rank_in_pair: usize,
        peer_global_rank: usize,
        id: [u8; 128],
        timeout: Duration,
    ) -> anyhow::Result<NcclLink> {
        if my_rank_in_pair > 1 {
            bail!("a NCCL pair has ranks 0 and 1, not {my_rank_in_pair}");
        }
        let setup = Setup {
            device: device_ordinal,
            rank: my_rank_in_pair,
            nranks: 2,
            id,
            timeout,
            peers: Peers {
                who: format!("rank {peer_global_rank}"),
                blame: Some(peer_global_rank),
            },
        };
        let comm = Communicator::start(setup, format!("nccl-rank{peer_global_rank}"))?;
        Ok(NcclLink {
            comm,
            peer_rank: peer_global_rank,
            spare: Vec::new(),
            traffic: Traffic::default(),
        })
    }

    pub fn peer_rank(&self) -> usize {
        self.peer_rank
    }
}

impl Link for NcclLink {
    fn swap(&mut self, mine: &[f32], expect: usize) -> anyhow::Result<Vec<f32>> {
        let mut block = std::mem::take(&mut self.spare);
        block.clear();
        block.extend_from_slice(mine);
        let (theirs, spare) = self.comm.call(Job::Swap {
            mine: block,
            expect,
        })?;
        self.spare = spare;
        self.traffic.sent_bytes += 4 * mine.len() as u64;
        self.traffic.received_bytes += 4 * expect as u64;
        self.traffic.messages += 1;
        self.traffic.overhead_bytes += HEADER_BYTES;
        Ok(theirs)
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }
}

/// The replicas of one column position on GPUs, averaging their gradients with NCCL's
/// all-reduce (ring or tree, over NVLink, PCIe or InfiniBand) instead of TCP. Like
/// [`NcclLink`], it stages each buffer through the host.
pub struct NcclReplicaGroup {
    comm: Communicator,
    replicas: usize,
    spare: Vec<f32>,
    traffic: Traffic,
}

impl NcclReplicaGroup {
    /// Joins the communicator of `id` (from [`unique_id`] on replica 0) as replica `me` of the
    /// replicas on global ranks `ranks` (by replica), on CUDA device `device_ordinal`. Fails
    /// if the others have not joined within `timeout`, which also bounds every reduction.
    pub fn new(
        device_ordinal: usize,
        me: usize,
        ranks: &[usize],
        id: [u8; 128],
        timeout: Duration,
    ) -> anyhow::Result<NcclReplicaGroup> {
        let others: Vec<usize> = (ranks.iter().enumerate())
            .filter(|&(r, _)| r != me)
            .map(|(_, &rank)| rank)
            .collect();
        let list = others.iter().map(|r| r.to_string()).collect::<Vec<_>>();
        let setup = Setup {
            device: device_ordinal,
            rank: me,
            nranks: ranks.len(),
            id,
            timeout,
            peers: Peers {
                who: match others.len() {
                    0 => "no other replica".to_string(),
                    1 => format!("the replica on rank {}", list[0]),
                    _ => format!("the replicas on ranks {}", list.join(", ")),
                },
                blame: (others.len() == 1).then(|| others[0]),
            },
        };
        let comm = Communicator::start(setup, "nccl-replicas".into())?;
        Ok(NcclReplicaGroup {
            comm,
            replicas: ranks.len(),
            spare: Vec::new(),
            traffic: Traffic::default(),
        })
    }
}

impl ReplicaReduce for NcclReplicaGroup {
    fn replicas(&self) -> usize {
        self.replicas
    }

    fn all_reduce_mean(&mut self, data: &mut [f32]) -> anyhow::Result<()> {
        let mut block = std::mem::take(&mut self.spare);
        block.clear();
        block.extend_from_slice(data);
        let (_, sum) = self.comm.call(Job::AllReduceSum { data: block })?;
        let scale = 1.0 / self.replicas as f32;
        data.iter_mut().zip(&sum).for_each(|(d, s)| *d = s * scale);
        self.spare = sum;
        // A ring all-reduce sends and receives 2 (n - 1) / n of the buffer per rank.
        let n = self.replicas as u64;
        let moved = 4 * (CHECK_WORDS + data.len()) as u64 * 2 * (n - 1) / n;
        self.traffic.sent_bytes += moved;
        self.traffic.received_bytes += moved;
        self.traffic.messages += 1;
        Ok(())
    }

    fn traffic(&self) -> Traffic {
        self.traffic
    }
}

/// The link and the group move between threads with their exchanges; their threads keep what
/// cannot.
const _: () = {
    fn send<T: Send>() {}
    let _ = send::<NcclLink>;
    let _ = send::<NcclReplicaGroup>;
};

/// How long each part of [`one_rank_check`] may take: a communicator of one rank on one GPU
/// needs well under a second.
const ONE_RANK_LIMIT: Duration = Duration::from_secs(15);

/// A NCCL communicator of one rank on GPU `device`: made, used for an all-reduce of a known
/// block (which must come back unchanged), and dropped; then a [`NcclReplicaGroup`] of one
/// replica, the same way. The selftest's check that NCCL and the driver work together on this
/// machine, and that the group's plumbing does.
pub fn one_rank_check(device: usize) -> anyhow::Result<()> {
    check_libraries()?;
    // cudarc's communicator blocks in its calls, and the group waits for a hung CUDA call
    // longer than the selftest may take: both parts run on a thread of their own, waited for
    // with a limit (and left behind if they hang), so that the selftest always reports.
    let (done, result) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("nccl-check".into())
        .spawn(move || {
            let _ = done.send(one_rank_comm(device).and_then(|()| one_replica_group(device)));
        })
        .map_err(|e| anyhow!("starting the NCCL check's thread: {e}"))?;
    let limit = 2 * ONE_RANK_LIMIT + Duration::from_secs(5);
    match result.recv_timeout(limit) {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) => {
            bail!("the one-rank NCCL check did not finish in {limit:?}: a NCCL or CUDA call hangs")
        }
        Err(RecvTimeoutError::Disconnected) => {
            bail!("the one-rank NCCL check's thread ended without a result")
        }
    }
}

/// A communicator of one rank (cudarc's, blocking): made, used for an all-reduce of a known
/// block, which must come back unchanged, and dropped.
fn one_rank_comm(device: usize) -> anyhow::Result<()> {
    use cudarc::nccl::safe::{Comm, Id, ReduceOp};
    guarded("the one-rank NCCL check", || {
        let ctx = CudaContext::new(device).cuda(&format!("opening CUDA device {device}"))?;
        let stream = ctx.new_stream().cuda("creating a CUDA stream")?;
        let id = Id::new().map_err(|e| nccl_error("ncclGetUniqueId", e))?;
        let comm = Comm::from_rank(stream.clone(), 0, 1, id)
            .map_err(|e| nccl_error("ncclCommInitRank (one rank)", e))?;
        let host: Vec<f32> = (0..4099).map(|i| i as f32 * 0.5 - 7.0).collect();
        let send = stream.clone_htod(&host).cuda("copying to the GPU")?;
        let mut recv = stream
            .alloc_zeros::<f32>(host.len())
            .cuda("allocating device memory")?;
        comm.all_reduce(&send, &mut recv, &ReduceOp::Sum)
            .map_err(|e| nccl_error("ncclAllReduce (one rank)", e))?;
        let back = stream.clone_dtoh(&recv).cuda("copying from the GPU")?;
        anyhow::ensure!(
            back == host,
            "a one-rank all-reduce changed its block (first difference at {:?})",
            back.iter().zip(&host).position(|(a, b)| a != b)
        );
        Ok(())
    })
}

/// The replicas' group of one replica, through its thread, check words and host staging: a
/// mean over one replica is the block itself, twice (the second at the next sequence number).
fn one_replica_group(device: usize) -> anyhow::Result<()> {
    let mut group = NcclReplicaGroup::new(device, 0, &[0], unique_id()?, ONE_RANK_LIMIT)?;
    for round in 0..2 {
        let host: Vec<f32> = (0..1031).map(|i| (i * (round + 3)) as f32 - 99.5).collect();
        let mut data = host.clone();
        group.all_reduce_mean(&mut data)?;
        anyhow::ensure!(
            data == host,
            "a one-replica NCCL mean changed its block in round {round} (first difference at \
             {:?})",
            data.iter().zip(&host).position(|(a, b)| a != b)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn has_gpu() -> bool {
        check_libraries().is_ok()
    }

    #[test]
    fn unique_id_without_driver_or_nccl_is_an_error() {
        if has_gpu() {
            return;
        }
        let e = unique_id().expect_err("no driver or NCCL here");
        let msg = format!("{e:#}");
        eprintln!("{msg}");
        assert!(
            msg.contains("libnccl") || msg.contains("driver"),
            "unexpected message: {msg}"
        );
        assert!(msg.contains("LD_LIBRARY_PATH"), "{msg}");
    }

    #[test]
    fn link_without_driver_or_nccl_is_an_error() {
        if has_gpu() {
            return;
        }
        let e = NcclLink::new(0, 0, 1, [7; 128], Duration::from_secs(1))
            .err()
            .expect("no driver or NCCL here");
        assert!(format!("{e:#}").contains("LD_LIBRARY_PATH"), "{e:#}");
    }

    #[test]
    fn replica_group_without_driver_or_nccl_is_an_error() {
        if has_gpu() {
            return;
        }
        let e = NcclReplicaGroup::new(0, 1, &[4, 6, 8], [7; 128], Duration::from_secs(1))
            .err()
            .expect("no driver or NCCL here");
        assert!(format!("{e:#}").contains("LD_LIBRARY_PATH"), "{e:#}");
        let e = NcclReplicaGroup::new(0, 3, &[4, 6, 8], [7; 128], Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(
            format!("{e}").contains("rank 3 of a NCCL communicator of 3"),
            "{e}"
        );
    }

    #[test]
    fn check_words_sum_exactly_for_any_group() {
        for nranks in [1usize, 2, 3, 16, 17, 18, 32, 64, 1000] {
            let m = check_modulus(nranks);
            let seq = (m - 1) as f32;
            assert!(nranks as u64 * (m - 1) < 1 << 24, "{nranks} ranks");
            // The worst case, added one rank at a time.
            let sum = (0..nranks).fold(0f32, |s, _| s + seq);
            assert_eq!(sum, nranks as f32 * seq, "{nranks} ranks");
        }
        assert_eq!(check_modulus(2), 1 << 23);
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(NcclLink::new(0, 2, 1, [7; 128], Duration::from_secs(1)).is_err());
        let e = NcclLink::new(0, 0, 1, [0; 128], Duration::from_secs(1))
            .err()
            .unwrap();
        assert!(format!("{e}").contains("unique id"), "{e}");
    }

    use sys::ncclResult_t::{ncclInProgress, ncclRemoteError, ncclSuccess};

    /// [`poll_completion`] over scripted answers: `states` in turn (the last one repeated),
    /// the stream complete after `busy` polls (never, for `None`). Returns how it ended, and
    /// whether the event was recorded.
    fn poll(
        states: &[sys::ncclResult_t],
        busy: Option<usize>,
        timeout: Duration,
    ) -> (Waited, bool) {
        let (mut i, mut polls, mut marked) = (0, 0, false);
        let waited = poll_completion(
            Instant::now(),
            timeout,
            || {
                let s = states[i.min(states.len() - 1)];
                i += 1;
                Ok(s)
            },
            || {
                marked = true;
                Ok(())
            },
            || {
                polls += 1;
                Ok(busy.is_some_and(|b| polls > b))
            },
        )
        .unwrap();
        (waited, marked)
    }

    #[test]
    fn a_wait_ends_when_the_group_is_set_up_and_the_stream_has_passed() {
        let long = Duration::from_secs(30);
        let (w, marked) = poll(
            &[ncclInProgress, ncclInProgress, ncclSuccess],
            Some(3),
            long,
        );
        assert_eq!(w, Waited::Done);
        assert!(marked);
        assert_eq!(poll(&[ncclSuccess], Some(0), long), (Waited::Done, true));
    }

    #[test]
    fn a_failed_communicator_ends_the_wait_in_either_phase() {
        let long = Duration::from_secs(30);
        // While the group is still being set up: the event is never recorded.
        let (w, marked) = poll(&[ncclInProgress, ncclRemoteError], Some(0), long);
        assert_eq!(w, Waited::Failed(ncclRemoteError));
        assert!(!marked);
        // While the transfer runs: a peer that dies mid-transfer.
        let (w, marked) = poll(&[ncclSuccess, ncclSuccess, ncclRemoteError], None, long);
        assert_eq!(w, Waited::Failed(ncclRemoteError));
        assert!(marked);
    }

    #[test]
    fn a_wait_that_never_completes_times_out_in_either_phase() {
        let timeout = Duration::from_millis(40);
        for (states, busy) in [
            // A peer that never joins the group.
            (&[ncclInProgress][..], Some(0)),
            // A transfer that never finishes (a peer that stopped sending).
            (&[ncclSuccess][..], None),
        ] {
            let started = Instant::now();
            let (w, _) = poll(states, busy, timeout);
            assert_eq!(w, Waited::TimedOut, "{states:?}");
            let took = started.elapsed();
            assert!(took >= timeout && took < Duration::from_secs(5), "{took:?}");
        }
    }

    #[test]
    fn an_error_asking_the_state_is_returned() {
        let e = poll_completion(
            Instant::now(),
            Duration::from_secs(30),
            || anyhow::bail!("ncclCommGetAsyncError: invalid argument"),
            || Ok(()),
            || Ok(true),
        )
        .unwrap_err();
        assert!(format!("{e}").contains("ncclCommGetAsyncError"), "{e}");
    }

    #[test]
    fn headers_round_trip_and_name_the_peer() {
        let h = header((1 << 40) | 3, 12);
        check_header(&h, 5, (1 << 40) | 3, 12).unwrap();
        let e = check_header(&h, 5, 4, 12).unwrap_err();
        assert_eq!(e.downcast_ref::<PeerError>().unwrap().rank, 5);
        assert!(format!("{e}").contains("out of step"), "{e}");
        let e = check_header(&h, 5, (1 << 40) | 3, 13).unwrap_err();
        assert!(format!("{e}").contains("12 values"), "{e}");
        let mut bad = h;
        bad[0] = 0.0;
        assert!(check_header(&bad, 5, (1 << 40) | 3, 12).is_err());
    }
}
