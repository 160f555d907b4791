//! Host-to-GPU copies through page-locked (pinned) staging buffers of our own.
//!
//! A copy from ordinary, pageable memory may wait for all the work queued on the stream before
//! it: the driver stages it through pinned memory of its own, and it may first synchronise
//! with the stream. At the start of a step that work is the previous step's backward pass, so
//! the host would wait for the GPU to drain, and the GPU then wait while the host copied the
//! batch and queued the next forward pass. Copied into one of these buffers first, the
//! transfer is queued behind that work like a kernel and the call returns at once.
//!
//! A buffer is used again only once the copy out of it has finished (an event recorded after
//! each copy says when): the four uploads a step makes (the batch's bytes, its crops and
//! colour shifts, the labels) each find a free buffer, and the pool stays at that size. A
//! buffer no upload has used for [`STALE_AFTER`] uploads is released (the parameters' uploads
//! at start-up fill the pool, and page-locked memory is taken from the whole machine).

use bytemuck::NoUninit;
use cudarc::driver::{
    result, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, DriverError,
    PinnedHostSlice,
};
use std::sync::Arc;

/// Most buffers in the pool: past this, an upload waits for the oldest copy to finish.
const MAX_BUFFERS: usize = 8;
/// Buffers grow in steps of this, so that batches of slightly different sizes share them.
const GRANULE: usize = 1 << 20;
/// Larger uploads copy directly: they are one-off (parameters, a checkpoint), and the pool
/// stays under `MAX_BUFFERS` times this (256 MiB) of page-locked memory. A batch of 128
/// views as bytes is 19 MiB.
const MAX_STAGED: usize = 32 << 20;

/// Uploads after which a free buffer that none of them used is released: a step makes four
/// (thirteen when the other column is in another process: its blocks arrive as uploads too),
/// so the buffers only start-up needed go within some 16 steps, and a buffer every step uses is
/// never stale.
const STALE_AFTER: u64 = 64;

/// The pool, as [`pick`] sees it: one entry per buffer.
#[derive(Clone, Copy, Debug)]
pub struct BufferState {
    pub capacity: usize,
    /// Whether the copy out of it has finished.
    pub free: bool,
    /// When it was last used (a counter): the oldest is waited for when all are busy.
    pub used: u64,
}

/// Which buffer an upload of some bytes takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// Buffer `i`: free and large enough.
    Use(usize),
    /// Buffer `i` is free but too small: a larger one replaces it.
    Replace(usize),
    /// A new buffer.
    Add,
    /// Every buffer is busy and the pool is full: wait for buffer `i` (the oldest), then use it.
    Wait(usize),
}

/// The buffer for an upload of `bytes`: the smallest free one that holds it; else a new one
/// while the pool has room; else the largest free one, replaced by a larger; else the oldest
/// busy one, once its copy has finished.
pub fn pick(buffers: &[BufferState], bytes: usize, max: usize) -> Pick {
    let free = || buffers.iter().enumerate().filter(|(_, b)| b.free);
    if let Some((i, _)) = free()
        .filter(|(_, b)| b.capacity >= bytes)
        .min_by_key(|(_, b)| b.capacity)
    {
        return Pick::Use(i);
    }
    if buffers.len() < max {
        return Pick::Add;
    }
    if let Some((i, _)) = free().max_by_key(|(_, b)| b.capacity) {
        return Pick::Replace(i);
    }
    let oldest = (buffers.iter().enumerate())
        .min_by_key(|(_, b)| b.used)
        .map_or(0, |(i, _)| i);
    Pick::Wait(oldest)
}

/// The free buffers that no upload has used since `clock - horizon` (`clock` counts the
/// uploads), which the pool releases; in decreasing order, to be removed one by one.
pub fn stale(buffers: &[BufferState], clock: u64, horizon: u64) -> Vec<usize> {
    let mut old: Vec<usize> = (buffers.iter().enumerate())
        .filter(|(_, b)| b.free && b.used + horizon < clock)
        .map(|(i, _)| i)
        .collect();
    old.reverse();
    old
}

struct Buffer {
    host: PinnedHostSlice<u8>,
    /// Recorded on the stream after each copy out of `host`.
    copied: CudaEvent,
    used: u64,
}

/// The staging buffers of one stream.
#[derive(Default)]
pub struct Staging {
    buffers: Vec<Buffer>,
    clock: u64,
    /// Pinned memory was refused once (a container's limits, say): uploads copy
    /// from the caller's memory from then on.
    refused: bool,
}

impl Staging {
    /// A copy of `host` on the GPU, queued on `stream` through a staging buffer; `None` where
    /// pinned memory is refused here or `host` is over [`MAX_STAGED`], and the caller copies
    /// directly.
    pub fn upload<T: DeviceRepr + NoUninit>(
        &mut self,
        stream: &Arc<CudaStream>,
        host: &[T],
    ) -> Result<Option<CudaSlice<T>>, DriverError> {
        let bytes = std::mem::size_of_val(host);
        if self.refused || bytes == 0 || bytes > MAX_STAGED {
            return Ok(None);
        }
        let states = (self.buffers.iter())
            .map(|b| {
                Ok(BufferState {
                    capacity: b.host.len(),
                    // An event never recorded is complete.
                    free: b.copied.try_is_complete()?,
                    used: b.used,
                })
            })
            .collect::<Result<Vec<_>, DriverError>>()?;
        // The buffer to use (none: a new one), and whether it must be (re)made to hold `bytes`.
        let (slot, make) = match pick(&states, bytes, MAX_BUFFERS) {
            Pick::Use(i) => (Some(i), false),
            Pick::Replace(i) => (Some(i), true),
            Pick::Add => (None, true),
            Pick::Wait(i) => {
                self.buffers[i].copied.synchronize()?;
                (Some(i), self.buffers[i].host.len() < bytes)
            }
        };
        let i = match (slot, make) {
            (Some(i), false) => i,
            (slot, _) => {
                let Some(made) = self.new_buffer(stream, bytes)? else {
                    return Ok(None);
                };
                match slot {
                    Some(i) => {
                        self.buffers[i] = made;
                        i
                    }
                    None => {
                        self.buffers.push(made);
                        self.buffers.len() - 1
                    }
                }
            }
        };
        self.clock += 1;
        let Buffer {
            host: pinned,
            copied,
            used,
        } = &mut self.buffers[i];
        *used = self.clock;
        // The copy out of this buffer has finished (`pick` chose a free one, or waited); the
        // slice's own event is never recorded, so this does not wait.
        let staged = &mut pinned.as_mut_slice()?[..bytes];
        staged.copy_from_slice(bytemuck::cast_slice(host));
        // SAFETY: the copy below fills all of it before the stream's next work reads it.
        let mut dst = unsafe { stream.alloc::<T>(host.len()) }?;
        {
            let (ptr, _written) = dst.device_ptr_mut(stream);
            // SAFETY: `dst` holds `bytes` bytes; `staged` is pinned and is not written again
            // until `copied`, recorded next, has completed.
            unsafe { result::memcpy_htod_async(ptr, &*staged, stream.cu_stream()) }?;
        }
        copied.record(stream)?;
        self.release_stale(&states);
        Ok(Some(dst))
    }

    /// Releases the buffers that were free before this upload (`before`: the pool as it was,
    /// index for index; a buffer added since is at the end) and that no upload has used for
    /// [`STALE_AFTER`] uploads. After the pick, so that a stale buffer this upload wanted is
    /// used rather than freed and pinned again (both synchronous calls).
    fn release_stale(&mut self, before: &[BufferState]) {
        let now: Vec<BufferState> = (before.iter().zip(&self.buffers))
            .map(|(state, b)| BufferState {
                used: b.used,
                ..*state
            })
            .collect();
        for i in stale(&now, self.clock, STALE_AFTER) {
            // Its last copy had completed (it was free): the memory can go at once.
            let gone = self.buffers.remove(i);
            tracing::debug!(
                mib = gone.host.len() >> 20,
                buffers = self.buffers.len(),
                "pinned staging buffer released, unused for {STALE_AFTER} uploads"
            );
        }
    }

    /// A buffer of at least `bytes`, or `None` (and no more tries) where pinned memory is
    /// refused.
    fn new_buffer(
        &mut self,
        stream: &Arc<CudaStream>,
        bytes: usize,
    ) -> Result<Option<Buffer>, DriverError> {
        let capacity = bytes.div_ceil(GRANULE) * GRANULE;
        // An error that earlier asynchronous work left behind surfaces here, as itself, not
        // as a refusal of pinned memory below (cudarc reports such errors at the next bind).
        stream.context().bind_to_thread()?;
        // SAFETY: the buffer is written before each copy reads it.
        match unsafe { stream.context().alloc_pinned::<u8>(capacity) } {
            Ok(host) => {
                tracing::debug!(
                    mib = capacity >> 20,
                    buffers = self.buffers.len() + 1,
                    "pinned staging buffer"
                );
                Ok(Some(Buffer {
                    host,
                    copied: stream.context().new_event(None)?,
                    used: 0,
                }))
            }
            Err(e) => {
                tracing::warn!(
                    mib = capacity >> 20,
                    error = ?e,
                    "page-locked memory refused: uploads to the GPU copy from pageable memory \
                     from now on, which waits for the GPU's queued work (slower steps)"
                );
                self.refused = true;
                Ok(None)
            }
        }
    }
}

impl Drop for Staging {
    /// The driver frees page-locked memory at once, and promises no wait for a copy still
    /// reading it: each buffer's last copy is waited for first.
    fn drop(&mut self) {
        for b in &self.buffers {
            let _ = b.copied.synchronize();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(capacity: usize, free: bool, used: u64) -> BufferState {
        BufferState {
            capacity,
            free,
            used,
        }
    }

    #[test]
    fn an_upload_takes_the_smallest_free_buffer_that_holds_it() {
        let pool = [b(8, true, 1), b(4, true, 2), b(2, true, 3), b(16, false, 4)];
        assert_eq!(pick(&pool, 3, 8), Pick::Use(1));
        assert_eq!(pick(&pool, 8, 8), Pick::Use(0));
        // Only a busy buffer holds it: a new one while there is room.
        assert_eq!(pick(&pool, 12, 8), Pick::Add);
        assert_eq!(pick(&[], 1, 8), Pick::Add);
    }

    #[test]
    fn a_full_pool_replaces_a_free_buffer_or_waits_for_the_oldest() {
        let pool = [b(8, true, 5), b(4, true, 2), b(16, false, 4)];
        // Full, and no free buffer holds 12: the largest free one is replaced.
        assert_eq!(pick(&pool, 12, 3), Pick::Replace(0));
        let busy = [b(8, false, 5), b(4, false, 2), b(16, false, 4)];
        assert_eq!(pick(&busy, 1, 3), Pick::Wait(1));
        assert_eq!(pick(&busy, 1, 4), Pick::Add);
    }

    #[test]
    fn free_buffers_unused_for_the_horizon_are_released() {
        let pool = [
            b(8, true, 1),
            b(4, false, 2),
            b(2, true, 40),
            b(16, true, 3),
        ];
        // At upload 50 with a horizon of 45: buffers 0 and 3 (last used at 1 and 3); buffer 1
        // is as old but its copy has not finished.
        assert_eq!(stale(&pool, 50, 45), vec![3, 0]);
        assert_eq!(stale(&pool, 46, 45), Vec::<usize>::new());
        assert_eq!(stale(&[], 100, 1), Vec::<usize>::new());
    }

    /// A step's uploads in steady state: four per step, each step's copies finished by the
    /// next (the GPU has run them long before): three buffers serve every step.
    /// Start-up's parameter uploads fill the pool (each copy still running when the next
    /// comes); the steps' four uploads then keep four buffers, and the rest are released.
    #[test]
    fn a_steady_stream_of_steps_keeps_the_pool_small() {
        let mut pool: Vec<BufferState> = Vec::new();
        let mut clock = 0;
        let mut upload = |pool: &mut Vec<BufferState>, bytes: usize| {
            clock += 1;
            let i = match pick(pool, bytes, MAX_BUFFERS) {
                Pick::Use(i) => i,
                Pick::Add => {
                    pool.push(b(bytes.div_ceil(GRANULE) * GRANULE, true, 0));
                    pool.len() - 1
                }
                Pick::Replace(i) | Pick::Wait(i) => {
                    pool[i].capacity = pool[i].capacity.max(bytes);
                    i
                }
            };
            pool[i].free = false;
            pool[i].used = clock;
            // As `release_stale`, after the pick.
            for i in stale(pool, clock, STALE_AFTER) {
                pool.remove(i);
            }
        };
        for layer in 0..16 {
            upload(&mut pool, (layer + 1) << 20);
        }
        assert_eq!(pool.len(), MAX_BUFFERS, "start-up fills the pool");
        for step in 0..40 {
            for s in pool.iter_mut() {
                s.free = true;
            }
            for bytes in [19 << 20, 1536, 1536, 512] {
                upload(&mut pool, bytes);
            }
            if step == 9 {
                assert!(pool.len() > 4, "released too early: {pool:?}");
            }
        }
        assert_eq!(pool.len(), 4, "{pool:?}");
    }
}
