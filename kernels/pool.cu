// Overlapping max pooling (square window, no padding). The backward pass gathers instead of
// scattering: each input element sums the gradients of the outputs whose first maximum
// (row-major, as on the CPU, in PyTorch and cuDNN) it is, so there are no atomics and the
// result does not depend on scheduling.

extern "C" __global__ void maxpool_forward(const float* x, float* y, long long planes, int in_h,
                                           int in_w, int out_h, int out_w, int size, int stride) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= planes * out_h * out_w) return;
    long long plane = t / ((long long)out_h * out_w);
    int o = (int)(t % ((long long)out_h * out_w));
    int oy = o / out_w, ox = o % out_w;
    const float* xp = x + plane * in_h * in_w;
    float m = __int_as_float(0xff800000) /* -inf */;
    for (int ky = 0; ky < size; ++ky)
        for (int kx = 0; kx < size; ++kx)
            m = fmaxf(m, xp[(oy * stride + ky) * in_w + ox * stride + kx]);
    y[t] = m;
}

extern "C" __global__ void maxpool_backward(const float* x, const float* y, const float* dy,
                                            float* dx, long long planes, int in_h, int in_w,
                                            int out_h, int out_w, int size, int stride) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= planes * in_h * in_w) return;
    long long plane = t / ((long long)in_h * in_w);
    int i = (int)(t % ((long long)in_h * in_w));
    int iy = i / in_w, ix = i % in_w;
    const float* xp = x + plane * in_h * in_w;
    const float* yp = y + plane * out_h * out_w;
    const float* dyp = dy + plane * out_h * out_w;
    // Outputs whose window holds (iy, ix): oy*stride <= iy < oy*stride + size.
    int oy_lo = iy < size ? 0 : (iy - size) / stride + 1;
    int oy_hi = min(iy / stride, out_h - 1);
    int ox_lo = ix < size ? 0 : (ix - size) / stride + 1;
    int ox_hi = min(ix / stride, out_w - 1);
    float g = 0.0f;
    for (int oy = oy_lo; oy <= oy_hi; ++oy)
        for (int ox = ox_lo; ox <= ox_hi; ++ox) {
            float m = yp[oy * out_w + ox];
            // The window's first element equal to the maximum takes the gradient.
            int first = -1;
            for (int ky = 0; ky < size && first < 0; ++ky)
                for (int kx = 0; kx < size; ++kx) {
                    int at = (oy * stride + ky) * in_w + ox * stride + kx;
                    if (xp[at] == m) {
                        first = at;
                        break;
                    }
                }
            if (first == i) g += dyp[oy * out_w + ox];
        }
    dx[t] = g;
}
