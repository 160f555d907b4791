// Elementwise ops and copies: ReLU, the SGD step, bias broadcasts, the row copies of the
// column exchange (all-gather concat, reduce-scatter slice) and the regrouping of a
// convolution's output gradient for its weight gradient. Grid-stride loops: any launch
// size covers any length.

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)(n); \
         i += (long long)blockDim.x * gridDim.x)

extern "C" __global__ void relu_forward(float* x, long long n) {
    GRID_STRIDE(i, n) { x[i] = fmaxf(x[i], 0.0f); }
}

// dy *= (y > 0), y being the ReLU's output.
extern "C" __global__ void relu_backward(const float* y, float* dy, long long n) {
    GRID_STRIDE(i, n) {
        if (y[i] <= 0.0f) dy[i] = 0.0f;
    }
}

// x *= factor: the replicas' mean from their sum (one rounding, as on the CPU).
extern "C" __global__ void scale(float* x, float factor, long long n) {
    GRID_STRIDE(i, n) { x[i] = __fmul_rn(x[i], factor); }
}

// The paper's update: v <- m v - wd lr w - lr g ; w <- w + v (same operation order as the CPU).
extern "C" __global__ void sgd_update(float* w, float* v, const float* g, float lr, float momentum,
                                      float decay, long long n) {
    GRID_STRIDE(i, n) {
        float vi = momentum * v[i] - decay * w[i] - lr * g[i];
        v[i] = vi;
        w[i] += vi;
    }
}

// y[r, o] = b[o] for `rows` rows of `out` values (the GEMM then adds x w^T).
extern "C" __global__ void broadcast_rows(float* y, const float* b, long long rows, int out) {
    GRID_STRIDE(i, rows * out) { y[i] = b[i % out]; }
}

// y[n, c, p] = b[c] over `batch` images of `channels` planes of `plane` values.
extern "C" __global__ void broadcast_channels(float* y, const float* b, long long batch,
                                              int channels, int plane) {
    GRID_STRIDE(i, batch * channels * plane) { y[i] = b[(i / plane) % channels]; }
}

// out[r, offset .. offset + width] = part[r, 0 .. width] for every row (one part of a concat).
extern "C" __global__ void copy_into_rows(float* out, const float* part, long long rows, int total,
                                          int offset, int width) {
    GRID_STRIDE(i, rows * width) {
        long long r = i / width;
        out[r * total + offset + (i % width)] = part[i];
    }
}

// dst[r, :] (=|+=) src[r, offset .. offset + width].
extern "C" __global__ void slice_rows(float* dst, const float* src, long long rows, int total,
                                      int offset, int width, int accumulate) {
    GRID_STRIDE(i, rows * width) {
        float v = src[(i / width) * total + offset + (i % width)];
        dst[i] = accumulate ? dst[i] + v : v;
    }
}

// dst[b][a][j] = src[a * a_stride + b * inner + j] for a < outer, b < middle, j < inner: swaps
// the two outer dimensions of a block. A convolution's output gradient, [images][channels]
// [pixels] with one group's channels at a stride of all channels, becomes [channels][images]
// [pixels], so that one matrix product sums the weight gradient over images and pixels.
extern "C" __global__ void swap_outer(float* dst, const float* src, long long outer, int middle,
                                      int inner, long long a_stride) {
    GRID_STRIDE(t, outer * middle * inner) {
        long long j = t % inner;
        long long r = t / inner;
        long long a = r % outer, b = r / outer;
        dst[t] = src[a * a_stride + b * inner + j];
    }
}
