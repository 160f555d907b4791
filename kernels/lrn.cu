// Local response normalisation across channels, the paper's form (alpha not divided by the
// window size): s[c] = k + alpha * sum_{c' in window(c)} x[c']^2, y[c] = x[c] s[c]^-beta.
// One thread per (image, pixel) walks the channels with a sliding window of squares, so each
// value is read once per pass.

__device__ __forceinline__ float pow_neg_beta(float s, float beta) {
    // beta = 0.75 as two square roots, as on the CPU (powf is slower and rounds differently).
    return beta == 0.75f ? 1.0f / sqrtf(s * sqrtf(s)) : powf(s, -beta);
}

extern "C" __global__ void lrn_forward(const float* x, float* y, float* scale, int batch,
                                       int channels, int plane, int size, float alpha, float beta,
                                       float k) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)batch * plane) return;
    long long n = t / plane, p = t % plane;
    const float* xi = x + n * channels * plane + p;
    float* yi = y + n * channels * plane + p;
    float* si = scale + n * channels * plane + p;
    int half = size / 2;
    for (int c = 0; c < channels; ++c) {
        int lo = c - half < 0 ? 0 : c - half;
        int hi = c + half + 1 > channels ? channels : c + half + 1;
        float sum = 0.0f;
        // Summed in channel order, like the CPU, so that results match to rounding.
        for (int j = lo; j < hi; ++j) {
            float v = xi[(long long)j * plane];
            sum += v * v;
        }
        float s = k + alpha * sum;
        si[(long long)c * plane] = s;
        yi[(long long)c * plane] = xi[(long long)c * plane] * pow_neg_beta(s, beta);
    }
}

// dx[c] = dy[c] s[c]^-beta - 2 alpha beta x[c] sum_{c' in window(c)} dy[c'] y[c'] / s[c'].
extern "C" __global__ void lrn_backward(const float* x, const float* y, const float* scale,
                                        const float* dy, float* dx, int batch, int channels,
                                        int plane, int size, float alpha, float beta) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)batch * plane) return;
    long long n = t / plane, p = t % plane;
    long long base = n * channels * plane + p;
    int half = size / 2;
    float coeff = -2.0f * alpha * beta;
    for (int c = 0; c < channels; ++c) {
        int lo = c - half < 0 ? 0 : c - half;
        int hi = c + half + 1 > channels ? channels : c + half + 1;
        float sum = 0.0f;
        for (int j = lo; j < hi; ++j) {
            long long o = base + (long long)j * plane;
            sum += dy[o] * y[o] / scale[o];
        }
        long long o = base + (long long)c * plane;
        dx[o] = dy[o] * pow_neg_beta(scale[o], beta) + coeff * x[o] * sum;
    }
}
