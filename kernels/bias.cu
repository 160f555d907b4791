// Bias gradients: the sum of the output gradient over everything but the channel (conv:
// images and pixels; linear: rows). One block per channel; a fixed reduction tree, so the
// result does not depend on scheduling.

#define THREADS 256

__device__ float block_sum(float v) {
    __shared__ float red[THREADS];
    red[threadIdx.x] = v;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    return red[0];
}

// db[c] = sum_{n, p} dy[n, c, p].
extern "C" __global__ void bias_grad_channels(const float* dy, float* db, int batch, int channels,
                                              int plane) {
    int c = blockIdx.x;
    float acc = 0.0f;
    long long count = (long long)batch * plane;
    for (long long i = threadIdx.x; i < count; i += blockDim.x) {
        long long n = i / plane, p = i % plane;
        acc += dy[(n * channels + c) * plane + p];
    }
    float total = block_sum(acc);
    if (threadIdx.x == 0) db[c] = total;
}

// db[o] = sum_r dy[r, o].
extern "C" __global__ void bias_grad_rows(const float* dy, float* db, int rows, int out) {
    int o = blockIdx.x;
    float acc = 0.0f;
    for (int r = threadIdx.x; r < rows; r += blockDim.x) acc += dy[(long long)r * out + o];
    float total = block_sum(acc);
    if (threadIdx.x == 0) db[o] = total;
}
