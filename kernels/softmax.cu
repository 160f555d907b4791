// Softmax cross-entropy, one block per row: the row's maximum, the sum of exponentials (in
// double, as on the CPU), the row's loss, and the gradient of the mean loss.

#define THREADS 256

extern "C" __global__ void softmax_xent(const float* logits, const unsigned int* labels,
                                        float* dlogits, double* row_loss, int rows, int classes) {
    __shared__ double red[THREADS];
    __shared__ float maxv[THREADS];
    int r = blockIdx.x;
    if (r >= rows) return;
    const float* z = logits + (long long)r * classes;
    float* d = dlogits + (long long)r * classes;
    float m = __int_as_float(0xff800000) /* -inf */;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) m = fmaxf(m, z[c]);
    maxv[threadIdx.x] = m;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) maxv[threadIdx.x] = fmaxf(maxv[threadIdx.x], maxv[threadIdx.x + s]);
        __syncthreads();
    }
    m = maxv[0];
    double sum = 0.0;
    for (int c = threadIdx.x; c < classes; c += blockDim.x) sum += exp((double)(z[c] - m));
    red[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    sum = red[0];
    unsigned int label = labels[r];
    for (int c = threadIdx.x; c < classes; c += blockDim.x) {
        float g = (float)(exp((double)(z[c] - m)) / sum / (double)rows);
        if ((unsigned int)c == label) g -= 1.0f / (float)rows;
        d[c] = g;
    }
    if (threadIdx.x == 0) row_loss[r] = log(sum) - (double)(z[label] - m);
}
