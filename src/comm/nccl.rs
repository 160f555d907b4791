//! Blocks of f32 between two GPUs over NCCL, in place in device memory: the data plane of
//! columns (and replicas) on CUDA devices.
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
//! **In place on the device.** A block is never copied to the host: the link sends this
//! column's block from where the backend keeps it and receives the partner's into a buffer the
//! backend allocated; the group sums a gradient bucket in place. NCCL's communicator, the CUDA
//! context and its stream are tied to the thread that uses them, so a communicator owns a
//! thread that holds all three, with a stream of its own beside the backend's compute stream.
//! One swap goes:
//!
//! 1. the compute thread allocates the receiving buffer on the compute stream and records the
//!    slot's `ready` event there, behind the kernels that produced the block to send, then
//!    hands the thread the two device addresses (a channel message; nothing waits);
//! 2. the communicator's thread makes its stream wait for `ready`, queues `ncclSend` and
//!    `ncclRecv` in one group, records the slot's `done` event behind them and answers that
//!    the transfer is queued;
//! 3. when the layer needs the partner's block, the compute thread takes that answer and makes
//!    the compute stream wait for `done`; the kernels it queues next read the block once it
//!    has arrived. The host never waits for the transfer itself.
//!
//! Several transfers may be in flight (the replicas' gradient buckets), each in a slot of its
//! own (`SLOTS` of them), taken back in order.
//!
//! **Bounded waits.** Every wait has the job's peer timeout, as on the TCP data plane: the
//! communicator is created non-blocking and polled, and the thread watches the transfers in
//! flight while no job comes; one still running past the timeout, or an error the
//! communicator reports, makes the thread abort the communicator (`ncclCommAbort`), which ends
//! the pending transfers, so their `done` events complete and a host wait on the compute
//! stream (the loss, a download) returns. The failure is reported at the next call; a
//! communicator that failed once stays failed.
//!
//! **In step, checked once per step.** Where the TCP frame carries a header per block, a
//! device transfer carries none (reading one would need a host round trip per block). Instead
//! [`BufLink::settle`] and [`BufReduce::settle`], called before the SGD step uses what the
//! exchanges brought (and at the end of an evaluation pass), wait for every transfer so far
//! and exchange a few check words: for a pair, the transfers made and the values sent and due,
//! which the partner must mirror; for a group, 1 and the transfer count, which must sum to the
//! rank count and its multiple. Ranks that fell out of step, or disagree on a block's size,
//! stop there with an error that names the peer. (A size mismatch within a step usually shows
//! first as a transfer that never completes: the timeout.)
//!
//! A worker may run two communicators at once on its GPU: the replica group averages one
//! layer's gradients while the columns swap the blocks of the layers below. NCCL supports
//! concurrent communicators on one device only as far as their kernels can run side by side;
//! should they ever stall each other, the timeouts turn the stall into an error. (A lock around
//! all NCCL calls would not help: it can deadlock across ranks.) Not yet seen on hardware: no
//! check here has had several GPUs. The order of the steps above is tested without a GPU over
//! a scripted device and compute stream.
//!
//! CUDA's driver (`libcuda.so`) and NCCL (`libnccl.so`) are loaded when first needed, so the
//! binary builds and runs without them; a missing library is an error that says where to look.

use super::tcp::PeerError;
use super::{BufLink, BufReduce, Traffic};
use crate::backend::{Backend, QueueEvent};
use anyhow::{anyhow, bail, Context};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr, DriverError};
use cudarc::nccl::{result as nccl, sys};
use std::collections::VecDeque;
use std::ffi::{c_int, c_void, CStr};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
    /// A pair of columns (send and receive), rather than a group of replicas (all-reduce).
    pair: bool,
    id: [u8; 128],
    timeout: Duration,
    peers: Peers,
}

/// Transfers that may be in flight at once on one communicator, each with its own pair of
/// events: `ready`, recorded on the compute stream once the block to send is there (and the
/// block to receive into is allocated); `done`, recorded on the communicator's stream once the
/// transfer has completed. A step's column swaps go one at a time, and its gradient buckets
/// are six.
const SLOTS: usize = 16;

/// The events of a communicator's slots by raw handle (made on its thread, in the device's
/// primary context, which the backend's stream shares), and `check`, after the step check.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Events {
    ready: Vec<QueueEvent>,
    done: Vec<QueueEvent>,
    check: QueueEvent,
}

/// A transfer queued on the communicator's stream, in place in device memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    /// Sends `n_out` words at `src` to the other rank of a pair and receives `n_in` into `dst`.
    Swap {
        src: u64,
        n_out: usize,
        dst: u64,
        n_in: usize,
    },
    /// Sums `n` words at `buf` over every rank, in place.
    AllReduce { buf: u64, n: usize },
}

/// Words of the step check (see [`Engine::check_words`]).
const CHECK_WORDS: usize = 4;
/// Marks a pair's step check, like the TCP frame's `"AXF1"`.
const CHECK_MAGIC: &[u8; 4] = b"AXN2";

/// What the communicator's thread does on the device: the CUDA and NCCL calls, kept apart
/// ([`CommOnThread`] makes them) so that the order of its steps, its timeouts and its checks
/// are tested over a scripted device without a GPU.
trait CommDevice {
    /// The communicator's state (`ncclInProgress` while a group is being set up).
    fn state(&self) -> anyhow::Result<sys::ncclResult_t>;
    /// Makes the communicator's stream wait for `event` (recorded on the compute stream).
    fn wait(&self, event: QueueEvent) -> anyhow::Result<()>;
    /// Queues `op`'s NCCL calls on the communicator's stream.
    fn queue(&self, op: Op) -> anyhow::Result<()>;
    /// Queues the step check: `words` sent to the other rank of a pair, or summed over the
    /// group (the stream is idle).
    fn queue_check(&mut self, words: [f32; CHECK_WORDS]) -> anyhow::Result<()>;
    /// The check's answer, once complete.
    fn read_check(&self) -> anyhow::Result<[f32; CHECK_WORDS]>;
    /// Records `event` on the communicator's stream.
    fn record(&self, event: QueueEvent) -> anyhow::Result<()>;
    /// Whether the stream has passed `event`.
    fn is_complete(&self, event: QueueEvent) -> anyhow::Result<bool>;
    /// Aborts the communicator: pending transfers end (their `done` events complete), and it
    /// stays failed. Idempotent.
    fn abort(&mut self);
    /// Ends a communicator that did not fail, letting what is in flight reach the peers.
    fn finalize(&mut self);
}

/// The communicator's thread's state over a [`CommDevice`]: queues transfers, watches those in
/// flight against the timeout, and checks once per step that the ranks are in step.
struct Engine<D: CommDevice> {
    dev: D,
    events: Events,
    /// A pair (send and receive) rather than a group (all-reduce), and the group's size.
    pair: bool,
    nranks: usize,
    peers: Peers,
    timeout: Duration,
    /// Transfers queued and not yet seen complete: their slot and when they were queued.
    in_flight: VecDeque<(usize, Instant)>,
    /// Transfers queued so far, and the words they sent and received: the step check.
    ops: u64,
    words_out: u64,
    words_in: u64,
    /// Why the communicator failed, and whether a peer is to blame: every later job is
    /// answered with it.
    failed: Option<(String, bool)>,
}

impl<D: CommDevice> Engine<D> {
    fn new(dev: D, events: Events, setup: &Setup) -> Self {
        Engine {
            dev,
            events,
            pair: setup.pair,
            nranks: setup.nranks,
            peers: setup.peers.clone(),
            timeout: setup.timeout,
            in_flight: VecDeque::new(),
            ops: 0,
            words_out: 0,
            words_in: 0,
            failed: None,
        }
    }

    /// Runs `f` unless the communicator failed earlier; remembers its failure.
    fn run(&mut self, f: impl FnOnce(&mut Self) -> anyhow::Result<()>) -> anyhow::Result<()> {
        if let Some((why, by_peer)) = &self.failed {
            let message = format!(
                "the NCCL communicator with {} failed earlier: {why}",
                self.peers.who
            );
            return Err(if *by_peer {
                self.peers.error(message)
            } else {
                anyhow!(message)
            });
        }
        let r = f(self);
        if let Err(e) = &r {
            self.dev.abort();
            let by_peer = e.downcast_ref::<PeerError>().is_some();
            self.failed = Some((format!("{e:#}"), by_peer));
        }
        r
    }

    /// The error of a communicator that reported `code`: blamed on the peer where NCCL says a
    /// peer or the network failed, on this process otherwise.
    fn failed_with(&self, code: sys::ncclResult_t) -> anyhow::Error {
        let who = &self.peers.who;
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

    fn timed_out(&self) -> anyhow::Error {
        self.peers.error(format!(
            "{} sent nothing over NCCL for {:?}: stopped, cut off, or sending blocks of another \
             size (the limit is the job's peer timeout)",
            self.peers.who, self.timeout
        ))
    }

    /// Queues `op` in slot `slot`: the communicator's stream waits for the compute stream's
    /// `ready` event, runs the transfer, and records `done`, which the compute stream waits for
    /// before it reads the result. Returns once all three are queued (a non-blocking group
    /// may take a moment to be set up); the transfer itself is watched by [`Self::poll`].
    fn queue(&mut self, slot: usize, op: Op) -> anyhow::Result<()> {
        anyhow::ensure!(slot < SLOTS, "slot {slot} of {SLOTS}");
        let started = Instant::now();
        self.dev.wait(self.events.ready[slot])?;
        self.dev.queue(op)?;
        let done = self.events.done[slot];
        let dev = &self.dev;
        match poll_completion(
            started,
            self.timeout,
            || dev.state(),
            || dev.record(done),
            || Ok(true),
        )? {
            Waited::Done => {}
            Waited::Failed(code) => return Err(self.failed_with(code)),
            Waited::TimedOut => return Err(self.timed_out()),
        }
        self.in_flight.push_back((slot, Instant::now()));
        self.ops += 1;
        let (out, inn) = match op {
            Op::Swap { n_out, n_in, .. } => (n_out, n_in),
            Op::AllReduce { n, .. } => (n, n),
        };
        self.words_out += out as u64;
        self.words_in += inn as u64;
        Ok(())
    }

    /// Drops the transfers that have completed, oldest first; an error if the communicator
    /// failed or the oldest still running was queued longer than the timeout ago.
    fn poll(&mut self) -> anyhow::Result<()> {
        use sys::ncclResult_t::{ncclInProgress, ncclSuccess};
        while let Some(&(slot, queued)) = self.in_flight.front() {
            match self.dev.state()? {
                ncclSuccess | ncclInProgress => {}
                code => return Err(self.failed_with(code)),
            }
            if self.dev.is_complete(self.events.done[slot])? {
                self.in_flight.pop_front();
                continue;
            }
            if queued.elapsed() > self.timeout {
                return Err(self.timed_out());
            }
            break;
        }
        Ok(())
    }

    /// The step check's words. A pair: the magic, the transfers so far, the words sent and
    /// the words due (each modulo 2^32), which the other rank must mirror. A group: 1, the
    /// transfers so far and the words summed so far (both modulo [`check_modulus`]), which sum
    /// to the rank count and its multiples when every rank is at the same point.
    fn check_words(&self) -> [f32; CHECK_WORDS] {
        let bits = |v: u64| f32::from_bits(v as u32);
        if self.pair {
            [
                f32::from_bits(u32::from_le_bytes(*CHECK_MAGIC)),
                bits(self.ops),
                bits(self.words_out),
                bits(self.words_in),
            ]
        } else {
            let m = check_modulus(self.nranks);
            [1.0, (self.ops % m) as f32, (self.words_out % m) as f32, 0.0]
        }
    }

    /// Whether the check's answer `got` says the ranks are in step.
    fn verify(&self, got: [f32; CHECK_WORDS]) -> anyhow::Result<()> {
        let who = &self.peers.who;
        if self.pair {
            let word = |i: usize| got[i].to_bits();
            if word(0) != u32::from_le_bytes(*CHECK_MAGIC) {
                return Err(self.peers.error(format!(
                    "{who} answered the step check over NCCL with a malformed block"
                )));
            }
            if word(1) != self.ops as u32 {
                return Err(self.peers.error(format!(
                    "{who} made {} transfers over NCCL where this rank made {}: the ranks are \
                     out of step",
                    word(1),
                    self.ops as u32
                )));
            }
            if word(2) != self.words_in as u32 || word(3) != self.words_out as u32 {
                return Err(self.peers.error(format!(
                    "{who} sent {} values over NCCL where {} were due here, and expected {} \
                     where {} went (modulo 2^32): do both run the same network and batch?",
                    word(2),
                    self.words_in as u32,
                    word(3),
                    self.words_out as u32
                )));
            }
        } else {
            let n = self.nranks as f32;
            let [_, seq, words, _] = self.check_words();
            if got[..2] != [n, n * seq] {
                return Err(self.peers.error(format!(
                    "the ranks of the NCCL all-reduce with {who} are out of step ({} transfers \
                     here; the check words summed to {:?}, not {:?})",
                    self.ops,
                    &got[..2],
                    [n, n * seq]
                )));
            }
            if got[2] != n * words {
                return Err(self.peers.error(format!(
                    "the ranks of the NCCL all-reduce with {who} summed buckets of other sizes \
                     (the check word of the values summed came to {}, not {}): do all run the \
                     same network?",
                    got[2],
                    n * words
                )));
            }
        }
        Ok(())
    }

    /// Waits until every transfer queued so far has completed, then checks with the other
    /// ranks that they are in step: once per step, so that no transfer needs a host round
    /// trip of its own.
    fn settle(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            self.poll()?;
            if self.in_flight.is_empty() {
                break;
            }
            pause(started);
        }
        self.dev.queue_check(self.check_words())?;
        let (dev, check) = (&self.dev, self.events.check);
        match poll_completion(
            Instant::now(),
            self.timeout,
            || dev.state(),
            || dev.record(check),
            || dev.is_complete(check),
        )? {
            Waited::Done => {}
            Waited::Failed(code) => return Err(self.failed_with(code)),
            Waited::TimedOut => return Err(self.timed_out()),
        }
        let got = self.dev.read_check()?;
        self.verify(got)
    }
}

/// The modulus of the sequence word, so that the sum over `nranks` ranks, and every partial sum
/// on the way in whatever order NCCL adds, is an integer below 2^24, exact in f32.
fn check_modulus(nranks: usize) -> u64 {
    let ceil_log2 = usize::BITS - nranks.max(1).saturating_sub(1).leading_zeros();
    1 << 24u32.saturating_sub(ceil_log2).max(1)
}

/// What the communicator's thread is asked to do.
#[derive(Debug)]
enum Job {
    Queue { slot: usize, op: Op },
    Settle,
}

enum FromThread {
    /// Started: the slots' events.
    Ready(anyhow::Result<Events>),
    /// A [`Job::Queue`] is queued (or failed).
    Queued(anyhow::Result<()>),
    /// A [`Job::Settle`] found every transfer complete and the ranks in step (or not).
    Settled(anyhow::Result<()>),
}

/// How often the thread looks at the transfers in flight while no job comes.
const POLL_EVERY: Duration = Duration::from_micros(500);

/// The communicator's thread: starts the device with `start`, then runs jobs and watches the
/// transfers in flight until the owner drops its end. After a failure (the communicator
/// aborted, which ends what was in flight) it answers every job with that failure, and keeps
/// the events alive until the owner is gone: the compute stream may still name them. A clean
/// end finalizes the communicator, so that what is in flight reaches the peers.
fn serve<D: CommDevice>(
    start: impl FnOnce() -> anyhow::Result<(D, Events)>,
    setup: &Setup,
    jobs: Receiver<Job>,
    out: Sender<FromThread>,
) {
    let mut engine = match guarded("starting NCCL", start) {
        Ok((dev, events)) => {
            let _ = out.send(FromThread::Ready(Ok(events.clone())));
            Engine::new(dev, events, setup)
        }
        Err(e) => {
            let _ = out.send(FromThread::Ready(Err(e)));
            return;
        }
    };
    loop {
        let watching = !engine.in_flight.is_empty() && engine.failed.is_none();
        let job = if watching {
            match jobs.recv_timeout(POLL_EVERY) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    let _ = engine.run(|e| guarded("watching NCCL transfers", || e.poll()));
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            }
        } else {
            match jobs.recv() {
                Ok(job) => job,
                Err(_) => break,
            }
        };
        let reply = match job {
            Job::Queue { slot, op } => FromThread::Queued(
                engine.run(|e| guarded("queueing a NCCL transfer", || e.queue(slot, op))),
            ),
            Job::Settle => FromThread::Settled(
                engine.run(|e| guarded("settling the NCCL transfers", || e.settle())),
            ),
        };
        if out.send(reply).is_err() {
            break;
        }
    }
    if engine.failed.is_none() {
        engine.dev.finalize();
    } else {
        engine.dev.abort();
    }
}

/// The owner's end of a communicator's thread (NCCL's communicator, the CUDA context and its
/// stream are tied to the thread that uses them), every wait bounded.
struct Communicator {
    jobs: Option<Sender<Job>>,
    replies: Receiver<FromThread>,
    thread: Option<JoinHandle<()>>,
    events: Events,
    peers: Peers,
    timeout: Duration,
    /// [`Job::Queue`]s whose answer has not been taken yet.
    unanswered: usize,
    /// Why the communicator failed, and whether a peer was to blame: it stays failed.
    broken: Option<(String, bool)>,
    /// The thread did not answer in time: a CUDA or NCCL call hangs, so dropping does not
    /// wait for it.
    hung: bool,
}

impl Communicator {
    /// Starts the thread, which makes its device with `start`; fails if that has not happened
    /// within `setup.timeout` (the other ranks joining) and a grace.
    fn spawn<D: CommDevice + 'static>(
        setup: Setup,
        thread_name: String,
        start: impl FnOnce(&Setup) -> anyhow::Result<(D, Events)> + Send + 'static,
    ) -> anyhow::Result<Communicator> {
        let (jobs, job_rx) = channel();
        let (reply_tx, replies) = channel();
        let (peers, timeout) = (setup.peers.clone(), setup.timeout);
        let thread = std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || serve(|| start(&setup), &setup, job_rx, reply_tx))
            .context("starting the NCCL communicator's thread")?;
        let mut c = Communicator {
            jobs: Some(jobs),
            replies,
            thread: Some(thread),
            events: Events {
                ready: Vec::new(),
                done: Vec::new(),
                check: QueueEvent(0),
            },
            peers,
            timeout,
            unanswered: 0,
            broken: None,
            hung: false,
        };
        let wait = timeout.saturating_add(STARTUP_GRACE);
        match c.replies.recv_timeout(wait) {
            Ok(FromThread::Ready(Ok(events))) => {
                anyhow::ensure!(
                    events.ready.len() == SLOTS && events.done.len() == SLOTS,
                    "the NCCL communicator's thread made {} and {} events for {SLOTS} slots",
                    events.ready.len(),
                    events.done.len()
                );
                c.events = events;
                Ok(c)
            }
            Ok(FromThread::Ready(Err(e))) => Err(e),
            Ok(_) => bail!("the NCCL communicator's thread answered out of turn"),
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

    /// Joins the communicator of `setup.id` on a GPU.
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
        Self::spawn(setup, thread_name, CommOnThread::start)
    }

    fn fail(&mut self, e: anyhow::Error) -> anyhow::Error {
        let by_peer = e.downcast_ref::<PeerError>().is_some();
        self.broken = Some((format!("{e:#}"), by_peer));
        e
    }

    /// An error if the communicator failed earlier: checked before anything is queued on the
    /// compute stream for it.
    fn usable(&self) -> anyhow::Result<()> {
        match &self.broken {
            None => Ok(()),
            Some((why, by_peer)) => {
                let message = format!(
                    "the NCCL communicator with {} failed earlier: {why}",
                    self.peers.who
                );
                Err(if *by_peer {
                    self.peers.error(message)
                } else {
                    anyhow!(message)
                })
            }
        }
    }

    fn send(&mut self, job: Job) -> anyhow::Result<()> {
        self.usable()?;
        if self.jobs.as_ref().is_none_or(|j| j.send(job).is_err()) {
            let e = anyhow!(
                "the NCCL communicator's thread for {} is gone",
                self.peers.who
            );
            return Err(self.fail(e));
        }
        Ok(())
    }

    /// The thread's next answer, waited for no longer than the timeout and a grace (the
    /// thread bounds its own waits: past this, a CUDA or NCCL call hangs).
    fn reply(&mut self) -> anyhow::Result<FromThread> {
        self.reply_within(self.timeout.saturating_add(SWAP_GRACE))
    }

    fn reply_within(&mut self, limit: Duration) -> anyhow::Result<FromThread> {
        self.usable()?;
        match (self.replies).recv_timeout(limit) {
            Ok(reply) => Ok(reply),
            Err(RecvTimeoutError::Timeout) => {
                self.hung = true;
                let e = self.peers.error(format!(
                    "{} sent nothing over NCCL for {:?}: stopped or cut off (and aborting the \
                     communicator hangs too)",
                    self.peers.who, self.timeout
                ));
                Err(self.fail(e))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let e = anyhow!(
                    "the NCCL communicator's thread for {} ended unexpectedly",
                    self.peers.who
                );
                Err(self.fail(e))
            }
        }
    }

    /// Records slot `slot`'s `ready` event on the compute queue `q`, behind what produced the
    /// transfer's input, and hands the thread the transfer.
    fn hand_over(&mut self, q: &dyn ComputeQueue, slot: usize, op: Op) -> anyhow::Result<()> {
        self.usable()?;
        q.record(self.events.ready[slot])?;
        self.send(Job::Queue { slot, op })?;
        self.unanswered += 1;
        Ok(())
    }

    /// Makes the compute queue `q` wait for the oldest transfer handed over (in `slot`) once
    /// the thread has queued it.
    fn take_back(&mut self, q: &dyn ComputeQueue, slot: usize) -> anyhow::Result<()> {
        self.queued()?;
        q.wait(self.events.done[slot])
    }

    /// Waits until the oldest transfer handed over is queued on the device (its `done` event
    /// recorded): not for the transfer itself.
    fn queued(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.unanswered > 0, "no NCCL transfer was handed over");
        let reply = self.reply()?;
        self.unanswered -= 1;
        match reply {
            FromThread::Queued(Ok(())) => Ok(()),
            FromThread::Queued(Err(e)) => Err(self.fail(e)),
            _ => {
                let e = anyhow!("the NCCL communicator's thread answered out of turn");
                Err(self.fail(e))
            }
        }
    }

    /// Waits until every transfer so far has completed and the ranks are in step.
    fn settle(&mut self) -> anyhow::Result<()> {
        self.send(Job::Settle)?;
        while self.unanswered > 0 {
            self.queued()?;
        }
        // The thread may take the timeout for the last transfer, then again for the check.
        let limit = (2 * self.timeout).saturating_add(SWAP_GRACE);
        match self.reply_within(limit)? {
            FromThread::Settled(Ok(())) => Ok(()),
            FromThread::Settled(Err(e)) => Err(self.fail(e)),
            _ => {
                let e = anyhow!("the NCCL communicator's thread answered out of turn");
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

/// The compute side of the ordering: the backend's queue, where the owner records `ready`
/// events and waits for `done` ones. Apart so that the order is tested with a script.
trait ComputeQueue {
    fn record(&self, event: QueueEvent) -> anyhow::Result<()>;
    fn wait(&self, event: QueueEvent) -> anyhow::Result<()>;
}

/// A backend's queue.
struct OnBackend<'a, B: Backend>(&'a B);

impl<B: Backend> ComputeQueue for OnBackend<'_, B> {
    fn record(&self, event: QueueEvent) -> anyhow::Result<()> {
        self.0.record_event(event)
    }
    fn wait(&self, event: QueueEvent) -> anyhow::Result<()> {
        self.0.wait_event(event)
    }
}

/// Where `buf` lives on the device, or why NCCL cannot move it.
fn address<B: Backend>(backend: &B, buf: &B::Buf) -> anyhow::Result<u64> {
    backend.device_address(buf).ok_or_else(|| {
        anyhow!(
            "NCCL moves device memory, and the {} backend's buffers are not on a GPU",
            backend.name()
        )
    })
}

/// The ordering of a pair's swaps, one at a time: the compute stream records `ready` before
/// the transfer is handed over and waits for `done` when the caller takes the block.
struct PairCore {
    comm: Communicator,
    /// The slot of the swap in flight.
    in_flight: Option<usize>,
    next_slot: usize,
    traffic: Traffic,
}

impl PairCore {
    fn start(&mut self, q: &dyn ComputeQueue, op: Op) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.in_flight.is_none(),
            "a column swap was started while the last one was still in flight"
        );
        let slot = self.next_slot;
        self.comm.hand_over(q, slot, op)?;
        self.next_slot = (slot + 1) % SLOTS;
        self.in_flight = Some(slot);
        if let Op::Swap { n_out, n_in, .. } = op {
            self.traffic.sent_bytes += 4 * n_out as u64;
            self.traffic.received_bytes += 4 * n_in as u64;
        }
        self.traffic.messages += 1;
        Ok(())
    }

    fn finish(&mut self, q: &dyn ComputeQueue) -> anyhow::Result<()> {
        let slot = (self.in_flight.take()).context("no column swap is in flight")?;
        self.comm.take_back(q, slot)
    }
}

/// One end of a two-rank NCCL communicator, carrying blocks between this column and its
/// partner on another GPU (of this machine or another), in place in device memory: the
/// communicator's stream reads this column's block where the backend keeps it and writes the
/// partner's into a buffer the backend allocated, ordered against the compute stream by
/// events; the host waits for nothing but the thread queueing the transfer.
pub struct NcclLink<B: Backend> {
    core: PairCore,
    peer_rank: usize,
    /// The buffer the swap in flight receives into.
    theirs: Option<B::Buf>,
}

impl<B: Backend> NcclLink<B> {
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
    ) -> anyhow::Result<Self> {
        if my_rank_in_pair > 1 {
            bail!("a NCCL pair has ranks 0 and 1, not {my_rank_in_pair}");
        }
        let setup = Setup {
            device: device_ordinal,
            rank: my_rank_in_pair,
            nranks: 2,
            pair: true,
            id,
            timeout,
            peers: Peers {
                who: format!("rank {peer_global_rank}"),
                blame: Some(peer_global_rank),
            },
        };
        let comm = Communicator::start(setup, format!("nccl-rank{peer_global_rank}"))?;
        Ok(NcclLink {
            core: PairCore {
                comm,
                in_flight: None,
                next_slot: 0,
                traffic: Traffic::default(),
            },
            peer_rank: peer_global_rank,
            theirs: None,
        })
    }

    pub fn peer_rank(&self) -> usize {
        self.peer_rank
    }
}

impl<B: Backend> BufLink<B> for NcclLink<B> {
    fn start_swap(&mut self, backend: &B, mine: &B::Buf, expect: usize) -> anyhow::Result<()> {
        let n_out = backend.buf_len(mine);
        if n_out.max(expect) > i32::MAX as usize {
            bail!(
                "a block of more than {} values cannot cross a NCCL link",
                i32::MAX
            );
        }
        // Allocated on the compute stream before `ready` is recorded: the transfer writes it
        // only after the allocation.
        let theirs = backend.try_zeros(expect)?;
        let op = Op::Swap {
            src: address(backend, mine)?,
            n_out,
            dst: address(backend, &theirs)?,
            n_in: expect,
        };
        self.core.start(&OnBackend(backend), op)?;
        self.theirs = Some(theirs);
        Ok(())
    }

    fn finish_swap(&mut self, backend: &B) -> anyhow::Result<B::Buf> {
        anyhow::ensure!(self.theirs.is_some(), "no column swap is in flight");
        // On failure the buffer stays here: NCCL may still write it (see `Drop`).
        self.core.finish(&OnBackend(backend))?;
        Ok(self.theirs.take().expect("checked above"))
    }

    fn settle(&mut self) -> anyhow::Result<()> {
        self.core.comm.settle()
    }

    fn traffic(&self) -> Traffic {
        // The step checks' words, and nothing per block.
        self.core.traffic
    }
}

impl<B: Backend> Drop for NcclLink<B> {
    /// A buffer still in flight when the communicator failed may still be written by a NCCL
    /// kernel that the compute stream never waited for: it is left allocated rather than
    /// handed back to the memory pool (the process is about to stop anyway).
    fn drop(&mut self) {
        if let Some(theirs) = self.theirs.take() {
            std::mem::forget(theirs);
        }
    }
}

/// The ordering of a group's all-reduces, several in flight: each bucket's slot, oldest first.
struct GroupCore {
    comm: Communicator,
    in_flight: VecDeque<usize>,
    next_slot: usize,
    replicas: usize,
    traffic: Traffic,
}

impl GroupCore {
    fn submit(&mut self, q: &dyn ComputeQueue, buf: u64, n: usize) -> anyhow::Result<()> {
        // A slot's events are used again only once the bucket that had them was taken back.
        anyhow::ensure!(
            self.in_flight.len() < SLOTS,
            "more than {SLOTS} gradient buckets in flight"
        );
        let slot = self.next_slot;
        self.comm.hand_over(q, slot, Op::AllReduce { buf, n })?;
        self.next_slot = (slot + 1) % SLOTS;
        self.in_flight.push_back(slot);
        // A ring all-reduce sends and receives 2 (n - 1) / n of the buffer per rank.
        let r = self.replicas as u64;
        let moved = 4 * n as u64 * 2 * (r - 1) / r;
        self.traffic.sent_bytes += moved;
        self.traffic.received_bytes += moved;
        self.traffic.messages += 1;
        Ok(())
    }

    fn take(&mut self, q: &dyn ComputeQueue) -> anyhow::Result<()> {
        let slot = (self.in_flight.pop_front()).context("no gradient bucket is in flight")?;
        self.comm.take_back(q, slot)
    }
}

/// The replicas of one column position on GPUs, averaging their gradient buckets with NCCL's
/// all-reduce (ring or tree, over NVLink, PCIe or InfiniBand), in place in device memory: the
/// sum on the communicator's stream, then `1 / replicas` on the compute stream.
pub struct NcclReplicaGroup<B: Backend> {
    core: GroupCore,
    buckets: VecDeque<B::Buf>,
}

impl<B: Backend> NcclReplicaGroup<B> {
    /// Joins the communicator of `id` (from [`unique_id`] on replica 0) as replica `me` of the
    /// replicas on global ranks `ranks` (by replica), on CUDA device `device_ordinal`. Fails
    /// if the others have not joined within `timeout`, which also bounds every reduction.
    pub fn new(
        device_ordinal: usize,
        me: usize,
        ranks: &[usize],
        id: [u8; 128],
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let others: Vec<usize> = (ranks.iter().enumerate())
            .filter(|&(r, _)| r != me)
            .map(|(_, &rank)| rank)
            .collect();
        let list = others.iter().map(|r| r.to_string()).collect::<Vec<_>>();
        let setup = Setup {
            device: device_ordinal,
            rank: me,
            nranks: ranks.len(),
            pair: false,
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
            core: GroupCore {
                comm,
                in_flight: VecDeque::new(),
                next_slot: 0,
                replicas: ranks.len(),
                traffic: Traffic::default(),
            },
            buckets: VecDeque::new(),
        })
    }
}

impl<B: Backend> BufReduce<B> for NcclReplicaGroup<B> {
    fn replicas(&self) -> usize {
        self.core.replicas
    }

    fn submit(
        &mut self,
        backend: &B,
        bucket: B::Buf,
        _layout: Vec<super::Segment>,
    ) -> anyhow::Result<()> {
        // NCCL sums each value in an order of its own choosing (the same on every rank).
        let n = backend.buf_len(&bucket);
        self.core
            .submit(&OnBackend(backend), address(backend, &bucket)?, n)?;
        self.buckets.push_back(bucket);
        Ok(())
    }

    fn take_next(&mut self, backend: &B) -> anyhow::Result<B::Buf> {
        anyhow::ensure!(!self.buckets.is_empty(), "no gradient bucket is in flight");
        // On failure the bucket stays here: NCCL may still write it (see `Drop`).
        self.core.take(&OnBackend(backend))?;
        let mut bucket = self.buckets.pop_front().expect("checked above");
        backend.scale(&mut bucket, 1.0 / self.core.replicas as f32);
        Ok(bucket)
    }

    fn settle(&mut self) -> anyhow::Result<()> {
        self.core.comm.settle()
    }

    fn traffic(&self) -> Traffic {
        self.core.traffic
    }
}

impl<B: Backend> Drop for NcclReplicaGroup<B> {
    /// As [`NcclLink`]'s: buckets still in flight are left allocated.
    fn drop(&mut self) {
        for bucket in self.buckets.drain(..) {
            std::mem::forget(bucket);
        }
    }
}

/// The communicator's thread's device: the communicator, its stream, the slots' events and
/// the step check's buffers. Fields drop in this order: the communicator is aborted (or was
/// finalized) before the buffers, the events and the stream go.
struct CommOnThread {
    comm: RawComm,
    check_out: CudaSlice<f32>,
    check_in: CudaSlice<f32>,
    /// Kept alive while the raw handles in [`Events`] are in use.
    _events: Vec<CudaEvent>,
    stream: Arc<CudaStream>,
    _ctx: Arc<CudaContext>,
    rank: usize,
    pair: bool,
}

impl CommOnThread {
    fn start(s: &Setup) -> anyhow::Result<(CommOnThread, Events)> {
        // The device's primary context: the one the backend's stream and buffers belong to.
        let ctx = CudaContext::new(s.device).cuda(&format!("opening CUDA device {}", s.device))?;
        // Every use of this stream's buffers is ordered by hand (the check's, by the one
        // stream; the backend's, by the slots' events).
        // SAFETY: no buffer of this context is used on another stream without an event.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().cuda("creating a CUDA stream")?;
        let check_out =
            (stream.alloc_zeros::<f32>(CHECK_WORDS)).cuda("allocating device memory")?;
        let check_in = (stream.alloc_zeros::<f32>(CHECK_WORDS)).cuda("allocating device memory")?;
        let events = (0..2 * SLOTS + 1)
            .map(|_| ctx.new_event(None).cuda("creating a CUDA event"))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let raw = |e: &CudaEvent| QueueEvent(e.cu_event() as usize);
        let handles = Events {
            ready: events[..SLOTS].iter().map(raw).collect(),
            done: events[SLOTS..2 * SLOTS].iter().map(raw).collect(),
            check: raw(&events[2 * SLOTS]),
        };
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
        let device = CommOnThread {
            comm,
            check_out,
            check_in,
            _events: events,
            stream,
            _ctx: ctx,
            rank: s.rank,
            pair: s.pair,
        };
        Ok((device, handles))
    }

    /// Sends `n_out` words at `src` to the other rank and receives `n_in` into `dst`, as one
    /// group (both directions at once).
    fn swap(&self, src: u64, n_out: usize, dst: u64, n_in: usize) -> anyhow::Result<()> {
        let f32_type = sys::ncclDataType_t::ncclFloat32;
        let stream = self.stream.cu_stream() as sys::cudaStream_t;
        let (comm, peer) = (self.comm.0, 1 - self.rank as c_int);
        // SAFETY: the caller's buffers hold `n_out` and `n_in` words and live until the
        // compute stream has passed the slot's `done` event (the exchange keeps them); the
        // communicator is live. The group is ended whatever the calls return.
        let (sent, received, ended) = unsafe {
            nccl::group_start().map_err(|e| nccl_error("ncclGroupStart", e))?;
            let sent = nccl::send(src as *const c_void, n_out, f32_type, peer, comm, stream);
            let received = nccl::recv(dst as *mut c_void, n_in, f32_type, peer, comm, stream);
            (sent, received, nccl::group_end())
        };
        for (what, r) in [
            ("ncclSend", sent),
            ("ncclRecv", received),
            ("ncclGroupEnd", ended),
        ] {
            r.map_err(|e| nccl_error(&format!("{what} with {}", self.peers_who()), e))?;
        }
        Ok(())
    }

    fn all_reduce(&self, src: u64, dst: u64, n: usize) -> anyhow::Result<()> {
        // SAFETY: both buffers hold `n` words and live until the transfer has completed (as in
        // `swap`); in place where they are the same, which NCCL allows.
        let r = unsafe {
            nccl::all_reduce(
                src as *const c_void,
                dst as *mut c_void,
                n,
                sys::ncclDataType_t::ncclFloat32,
                sys::ncclRedOp_t::ncclSum,
                self.comm.0,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        };
        r.map(drop)
            .map_err(|e| nccl_error(&format!("ncclAllReduce with {}", self.peers_who()), e))
    }

    fn peers_who(&self) -> &'static str {
        if self.pair {
            "the other column"
        } else {
            "the other replicas"
        }
    }
}

impl CommDevice for CommOnThread {
    fn state(&self) -> anyhow::Result<sys::ncclResult_t> {
        self.comm.state()
    }

    fn wait(&self, event: QueueEvent) -> anyhow::Result<()> {
        // SAFETY: the event is one of this thread's, alive; the stream is this thread's.
        unsafe {
            cudarc::driver::result::stream::wait_event(
                self.stream.cu_stream(),
                event.0 as cudarc::driver::sys::CUevent,
                cudarc::driver::sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
            )
        }
        .cuda("making the NCCL stream wait for the compute stream")
    }

    fn queue(&self, op: Op) -> anyhow::Result<()> {
        match op {
            Op::Swap {
                src,
                n_out,
                dst,
                n_in,
            } => self.swap(src, n_out, dst, n_in),
            Op::AllReduce { buf, n } => self.all_reduce(buf, buf, n),
        }
    }

    fn queue_check(&mut self, words: [f32; CHECK_WORDS]) -> anyhow::Result<()> {
        // The stream is idle (every transfer has completed): the copy returns at once.
        (self.stream.memcpy_htod(&words, &mut self.check_out))
            .cuda("copying the step check to the GPU")?;
        let src = self.check_out.device_ptr(&self.stream).0;
        let dst = self.check_in.device_ptr(&self.stream).0;
        if self.pair {
            self.swap(src, CHECK_WORDS, dst, CHECK_WORDS)
        } else {
            self.all_reduce(src, dst, CHECK_WORDS)
        }
    }

    fn read_check(&self) -> anyhow::Result<[f32; CHECK_WORDS]> {
        let mut got = [0f32; CHECK_WORDS];
        (self.stream.memcpy_dtoh(&self.check_in, &mut got))
            .cuda("copying the step check from the GPU")?;
        Ok(got)
    }

    fn record(&self, event: QueueEvent) -> anyhow::Result<()> {
        // SAFETY: as in `wait`.
        unsafe {
            cudarc::driver::result::event::record(
                event.0 as cudarc::driver::sys::CUevent,
                self.stream.cu_stream(),
            )
        }
        .cuda("recording a CUDA event")
    }

    fn is_complete(&self, event: QueueEvent) -> anyhow::Result<bool> {
        // SAFETY: as in `wait`.
        match unsafe {
            cudarc::driver::result::event::query(event.0 as cudarc::driver::sys::CUevent)
        } {
            Ok(()) => Ok(true),
            Err(DriverError(cudarc::driver::sys::CUresult::CUDA_ERROR_NOT_READY)) => Ok(false),
            Err(e) => Err(anyhow!("the NCCL transfer: {e}")),
        }
    }

    fn abort(&mut self) {
        self.comm.abort();
    }

    fn finalize(&mut self) {
        self.comm.finalize(FINALIZE_LIMIT);
    }
}

/// The link and the group move between threads with their exchanges; their threads keep what
/// cannot.
const _: () = {
    fn send<T: Send>() {}
    let _ = send::<NcclLink<crate::backend::Cpu>>;
    let _ = send::<NcclReplicaGroup<crate::backend::Cpu>>;
};

/// How long each part of [`one_rank_check`] may take: a communicator of one rank on one GPU
/// needs well under a second.
const ONE_RANK_LIMIT: Duration = Duration::from_secs(15);

/// A NCCL communicator of one rank on GPU `device`: made, used for an all-reduce of a known
/// block (which must come back unchanged), and dropped; then a [`NcclReplicaGroup`] of one
/// replica on `backend`'s buffers (the GPU's), the same way. The selftest's check that NCCL and
/// the driver work together on this machine, and that the group's events, slots and step
/// check do.
pub fn one_rank_check<B: Backend>(backend: &B, device: usize) -> anyhow::Result<()> {
    check_libraries()?;
    // cudarc's communicator blocks in its calls: it runs on a thread of its own, waited for
    // with a limit (and left behind if it hangs), so that the selftest always reports. The
    // group bounds its own waits.
    let (done, result) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("nccl-check".into())
        .spawn(move || {
            let _ = done.send(one_rank_comm(device));
        })
        .map_err(|e| anyhow!("starting the NCCL check's thread: {e}"))?;
    let limit = ONE_RANK_LIMIT + Duration::from_secs(5);
    match result.recv_timeout(limit) {
        Ok(r) => r?,
        Err(RecvTimeoutError::Timeout) => {
            bail!("the one-rank NCCL check did not finish in {limit:?}: a NCCL or CUDA call hangs")
        }
        Err(RecvTimeoutError::Disconnected) => {
            bail!("the one-rank NCCL check's thread ended without a result")
        }
    }
    one_replica_group(backend, device)
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

/// The replicas' group of one replica on the backend's buffers: a mean over one replica is
/// the bucket itself, for two buckets in flight at once, twice (the second round at the next
/// step check).
fn one_replica_group<B: Backend>(backend: &B, device: usize) -> anyhow::Result<()> {
    let mut group = NcclReplicaGroup::<B>::new(device, 0, &[0], unique_id()?, ONE_RANK_LIMIT)?;
    for round in 0..2 {
        let hosts: Vec<Vec<f32>> = (0..2)
            .map(|b| {
                (0..1031 + b)
                    .map(|i| (i * (round + 3 + b)) as f32 - 99.5)
                    .collect()
            })
            .collect();
        for host in &hosts {
            let layout = super::replica::whole(host.len());
            group.submit(backend, backend.upload(host), layout)?;
        }
        for (b, host) in hosts.iter().enumerate() {
            let back = backend.download(&group.take_next(backend)?);
            anyhow::ensure!(
                &back == host,
                "a one-replica NCCL mean changed bucket {b} in round {round} (first difference \
                 at {:?})",
                back.iter().zip(host).position(|(a, b)| a != b)
            );
        }
        group.settle()?;
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
        let e = NcclLink::<crate::backend::Cpu>::new(0, 0, 1, [7; 128], Duration::from_secs(1))
            .err()
            .expect("no driver or NCCL here");
        assert!(format!("{e:#}").contains("LD_LIBRARY_PATH"), "{e:#}");
    }

    #[test]
    fn replica_group_without_driver_or_nccl_is_an_error() {
        if has_gpu() {
            return;
        }
        let e = NcclReplicaGroup::<crate::backend::Cpu>::new(
            0,
            1,
            &[4, 6, 8],
            [7; 128],
            Duration::from_secs(1),
        )
        .err()
        .expect("no driver or NCCL here");
        assert!(format!("{e:#}").contains("LD_LIBRARY_PATH"), "{e:#}");
        let e = NcclReplicaGroup::<crate::backend::Cpu>::new(
            0,
            3,
            &[4, 6, 8],
            [7; 128],
            Duration::from_secs(1),
        )
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
        assert!(
            NcclLink::<crate::backend::Cpu>::new(0, 2, 1, [7; 128], Duration::from_secs(1))
                .is_err()
        );
        let e = NcclLink::<crate::backend::Cpu>::new(0, 0, 1, [0; 128], Duration::from_secs(1))
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

    /// A scripted device and compute queue writing one log, for the order of a transfer's
    /// steps across the two streams.
    mod scripted {
        use super::*;
        use std::sync::Mutex;

        pub type Log = Arc<Mutex<Vec<String>>>;
        /// How the other ranks answer the step check, from the words this rank sent.
        pub type Answer = fn([f32; CHECK_WORDS]) -> [f32; CHECK_WORDS];

        pub fn events() -> Events {
            Events {
                ready: (0..SLOTS).map(|i| QueueEvent(100 + i)).collect(),
                done: (0..SLOTS).map(|i| QueueEvent(200 + i)).collect(),
                check: QueueEvent(999),
            }
        }

        pub fn name(e: QueueEvent) -> String {
            match e.0 {
                999 => "check".into(),
                n if n >= 200 => format!("done{}", n - 200),
                n => format!("ready{}", n - 100),
            }
        }

        /// The device: transfers complete at once unless `stuck`; the step check is answered
        /// by `answer` from the words sent.
        pub struct Device {
            pub log: Log,
            pub stuck: bool,
            pub answer: Answer,
            pub sent: [f32; CHECK_WORDS],
            pub aborted: bool,
        }

        impl Device {
            fn note(&self, what: String) {
                self.log.lock().unwrap().push(what);
            }
        }

        impl CommDevice for Device {
            fn state(&self) -> anyhow::Result<sys::ncclResult_t> {
                Ok(sys::ncclResult_t::ncclSuccess)
            }
            fn wait(&self, e: QueueEvent) -> anyhow::Result<()> {
                self.note(format!("comm waits {}", name(e)));
                Ok(())
            }
            fn queue(&self, op: Op) -> anyhow::Result<()> {
                self.note(match op {
                    Op::Swap {
                        src,
                        n_out,
                        dst,
                        n_in,
                    } => {
                        format!("comm swaps {n_out} at {src} for {n_in} into {dst}")
                    }
                    Op::AllReduce { buf, n } => format!("comm sums {n} at {buf}"),
                });
                Ok(())
            }
            fn queue_check(&mut self, words: [f32; CHECK_WORDS]) -> anyhow::Result<()> {
                self.note("comm queues the step check".into());
                self.sent = words;
                Ok(())
            }
            fn read_check(&self) -> anyhow::Result<[f32; CHECK_WORDS]> {
                Ok((self.answer)(self.sent))
            }
            fn record(&self, e: QueueEvent) -> anyhow::Result<()> {
                self.note(format!("comm records {}", name(e)));
                Ok(())
            }
            fn is_complete(&self, e: QueueEvent) -> anyhow::Result<bool> {
                Ok(!self.stuck || e == QueueEvent(999))
            }
            fn abort(&mut self) {
                if !self.aborted {
                    self.note("comm aborts".into());
                }
                self.aborted = true;
            }
            fn finalize(&mut self) {
                self.note("comm finalizes".into());
            }
        }

        pub struct Compute(pub Log);

        impl ComputeQueue for Compute {
            fn record(&self, e: QueueEvent) -> anyhow::Result<()> {
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("compute records {}", name(e)));
                Ok(())
            }
            fn wait(&self, e: QueueEvent) -> anyhow::Result<()> {
                self.0
                    .lock()
                    .unwrap()
                    .push(format!("compute waits {}", name(e)));
                Ok(())
            }
        }

        /// An in-step partner's answer to a pair's check: the same transfers, its words sent
        /// being the words due here and the other way round.
        pub fn mirror(w: [f32; CHECK_WORDS]) -> [f32; CHECK_WORDS] {
            [w[0], w[1], w[3], w[2]]
        }

        /// A communicator over a scripted device: a pair, or a group of `nranks`.
        pub fn communicator(
            log: &Log,
            nranks: usize,
            stuck: bool,
            answer: Answer,
            timeout: Duration,
        ) -> Communicator {
            let setup = Setup {
                device: 0,
                rank: 0,
                nranks,
                pair: nranks == 2,
                id: [7; 128],
                timeout,
                peers: Peers {
                    who: "rank 5".into(),
                    blame: Some(5),
                },
            };
            let log = log.clone();
            Communicator::spawn(setup, "nccl-test".into(), move |_| {
                let dev = Device {
                    log,
                    stuck,
                    answer,
                    sent: [0.0; CHECK_WORDS],
                    aborted: false,
                };
                Ok((dev, events()))
            })
            .unwrap()
        }

        pub fn take(log: &Log) -> Vec<String> {
            std::mem::take(&mut *log.lock().unwrap())
        }
    }

    fn pair(comm: Communicator) -> PairCore {
        PairCore {
            comm,
            in_flight: None,
            next_slot: 0,
            traffic: Traffic::default(),
        }
    }

    #[test]
    fn a_swap_is_ordered_by_events_across_the_two_streams() {
        let log = scripted::Log::default();
        let q = scripted::Compute(log.clone());
        let comm =
            scripted::communicator(&log, 2, false, scripted::mirror, Duration::from_secs(30));
        let mut core = pair(comm);
        for (i, (n_out, n_in)) in [(3usize, 4usize), (5, 5)].into_iter().enumerate() {
            let op = Op::Swap {
                src: 10 + i as u64,
                n_out,
                dst: 20 + i as u64,
                n_in,
            };
            core.start(&q, op).unwrap();
            assert!(core.start(&q, op).is_err(), "one swap at a time");
            core.finish(&q).unwrap();
            assert_eq!(
                scripted::take(&log),
                [
                    // The block to send is there (and the one to receive into allocated).
                    format!("compute records ready{i}"),
                    // The transfer starts only once the compute stream has got there.
                    format!("comm waits ready{i}"),
                    format!(
                        "comm swaps {n_out} at {} for {n_in} into {}",
                        10 + i,
                        20 + i
                    ),
                    format!("comm records done{i}"),
                    // The compute stream reads the block only after it has arrived.
                    format!("compute waits done{i}"),
                ]
            );
        }
        let t = core.traffic;
        assert_eq!((t.sent_bytes, t.received_bytes, t.messages), (32, 36, 2));
        // Once per step, behind every transfer: the ranks check they are in step.
        core.comm.settle().unwrap();
        assert_eq!(
            scripted::take(&log),
            ["comm queues the step check", "comm records check"]
        );
        drop(core);
        assert_eq!(scripted::take(&log), ["comm finalizes"]);
    }

    #[test]
    fn buckets_in_flight_take_their_own_slots_and_come_back_in_order() {
        let log = scripted::Log::default();
        let q = scripted::Compute(log.clone());
        let n_ranks = |w: [f32; CHECK_WORDS]| [3.0 * w[0], 3.0 * w[1], 3.0 * w[2], 0.0];
        let comm = scripted::communicator(&log, 3, false, n_ranks, Duration::from_secs(30));
        let mut core = GroupCore {
            comm,
            in_flight: VecDeque::new(),
            next_slot: 0,
            replicas: 3,
            traffic: Traffic::default(),
        };
        for step in 0..3 {
            for b in 0..6u64 {
                core.submit(&q, 40 + b, 300).unwrap();
            }
            for _ in 0..6 {
                core.take(&q).unwrap();
            }
            core.comm.settle().unwrap();
            let log = scripted::take(&log);
            let slot = |b: usize| (6 * step + b) % SLOTS;
            for b in 0..6 {
                let at = |what: String| {
                    log.iter()
                        .position(|l| *l == what)
                        .unwrap_or_else(|| panic!("{what} missing from {log:#?}"))
                };
                let s = slot(b);
                let recorded = at(format!("compute records ready{s}"));
                let waited = at(format!("comm waits ready{s}"));
                let summed = at(format!("comm sums 300 at {}", 40 + b));
                let done = at(format!("comm records done{s}"));
                let read = at(format!("compute waits done{s}"));
                assert!(
                    recorded < waited && waited < summed && summed < done && done < read,
                    "{log:#?}"
                );
                if b > 0 {
                    // Buckets are reduced and taken back in the order they went.
                    assert!(at(format!("comm records done{}", slot(b - 1))) < done);
                    assert!(at(format!("compute waits done{}", slot(b - 1))) < read);
                }
            }
            assert_eq!(
                log[log.len() - 2..],
                ["comm queues the step check", "comm records check"]
            );
        }
        // A ring all-reduce moves 2 (n - 1) / n of each bucket.
        assert_eq!(core.traffic.sent_bytes, 18 * 4 * 300 * 2 * 2 / 3);
        // More buckets in flight than slots: refused before anything is queued.
        for b in 0..SLOTS as u64 {
            core.submit(&q, b, 1).unwrap();
        }
        let e = core.submit(&q, 99, 1).unwrap_err();
        assert!(format!("{e}").contains("buckets in flight"), "{e}");
        let recorded = |log: &scripted::Log| {
            let log = log.lock().unwrap();
            log.iter()
                .filter(|l| l.starts_with("compute records"))
                .count()
        };
        assert_eq!(recorded(&log), SLOTS);
    }

    #[test]
    fn a_transfer_that_never_completes_is_aborted_without_the_owner_asking() {
        let log = scripted::Log::default();
        let q = scripted::Compute(log.clone());
        let timeout = Duration::from_millis(60);
        let comm = scripted::communicator(&log, 2, true, scripted::mirror, timeout);
        let mut core = pair(comm);
        let op = Op::Swap {
            src: 1,
            n_out: 2,
            dst: 3,
            n_in: 2,
        };
        core.start(&q, op).unwrap();
        core.finish(&q).unwrap();
        // The compute stream waits for `done`, which only the abort releases: the thread aborts
        // the communicator by itself once the timeout has passed, so that a host wait on the
        // compute stream (the loss, a download) cannot hang.
        let started = Instant::now();
        while !log.lock().unwrap().iter().any(|l| l == "comm aborts") {
            assert!(started.elapsed() < Duration::from_secs(10), "never aborted");
            std::thread::sleep(Duration::from_millis(5));
        }
        let e = core.comm.settle().unwrap_err();
        assert_eq!(
            e.downcast_ref::<PeerError>().map(|p| p.rank),
            Some(5),
            "{e:#}"
        );
        assert!(format!("{e:#}").contains("sent nothing over NCCL"), "{e:#}");
        // Failed for good: nothing more is recorded on the compute stream for it.
        scripted::take(&log);
        let again = core.start(&q, op).unwrap_err();
        assert!(format!("{again:#}").contains("failed earlier"), "{again:#}");
        assert_eq!(again.downcast_ref::<PeerError>().map(|p| p.rank), Some(5));
        drop(core);
        assert!(scripted::take(&log).is_empty(), "aborted, not finalized");
    }

    #[test]
    fn ranks_out_of_step_are_caught_at_the_step_check() {
        let swap = Op::Swap {
            src: 1,
            n_out: 6,
            dst: 2,
            n_in: 4,
        };
        let cases: [(scripted::Answer, &str); 3] = [
            // The partner made one transfer more.
            (
                |w| [w[0], f32::from_bits(w[1].to_bits() + 1), w[3], w[2]],
                "out of step",
            ),
            // The partner sent blocks of other sizes.
            (|w| [w[0], w[1], w[2], w[3]], "the same network and batch"),
            (|w| [0.0, w[1], w[3], w[2]], "malformed"),
        ];
        for (answer, says) in cases {
            let log = scripted::Log::default();
            let q = scripted::Compute(log.clone());
            let comm = scripted::communicator(&log, 2, false, answer, Duration::from_secs(30));
            let mut core = pair(comm);
            core.start(&q, swap).unwrap();
            core.finish(&q).unwrap();
            let e = core.comm.settle().unwrap_err();
            assert!(format!("{e}").contains(says), "{e}");
            assert_eq!(e.downcast_ref::<PeerError>().map(|p| p.rank), Some(5));
            assert!(log.lock().unwrap().iter().any(|l| l == "comm aborts"));
        }
        // A group whose check words do not sum to the rank count and its multiples: a rank
        // missing a transfer, a rank summing buckets of another size.
        let group: [(scripted::Answer, &str); 2] = [
            (|w| [2.0 * w[0], 2.0 * w[1], 2.0 * w[2], 0.0], "out of step"),
            (
                |w| [3.0 * w[0], 3.0 * w[1], 3.0 * w[2] - 5.0, 0.0],
                "other sizes",
            ),
        ];
        for (answer, says) in group {
            let log = scripted::Log::default();
            let q = scripted::Compute(log.clone());
            let comm = scripted::communicator(&log, 3, false, answer, Duration::from_secs(30));
            let mut core = GroupCore {
                comm,
                in_flight: VecDeque::new(),
                next_slot: 0,
                replicas: 3,
                traffic: Traffic::default(),
            };
            core.submit(&q, 1, 8).unwrap();
            core.take(&q).unwrap();
            let e = core.comm.settle().unwrap_err();
            assert!(format!("{e}").contains(says), "{e}");
        }
    }
}
