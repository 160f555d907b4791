// Inverted dropout on a [rows, cols] block of a larger layer. The mask is a function of the
// seed and of the element's place in the whole (unsplit, all-replica) layer, exactly as on the
// CPU, so a column or replica on a GPU drops what one process holding everything would drop.
// Forward and backward are the same operation (it is linear in its input).

#include "rng.cuh"

extern "C" __global__ void dropout(float* x, long long rows, int cols, float p, u64 seed,
                                   u64 row_offset, u64 col_offset, u64 total_cols) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= rows * cols) return;
    u64 r = (u64)(i / cols), c = (u64)(i % cols);
    u64 index = (row_offset + r) * total_cols + col_offset + c;
    float keep_scale = 1.0f / (1.0f - p);
    x[i] = uniform24(seed, index) < p ? 0.0f : x[i] * keep_scale;
}
