// Unfolding for convolution as a matrix product (cuBLAS): im2col lays out one image's
// receptive fields as columns, col2im folds the input gradient back. col2im gathers (each input
// pixel sums the column entries that read it), so there are no atomics.
// Column layout: [in_c * k * k, out_h * out_w], row (c, ky, kx), column (oy, ox).

extern "C" __global__ void im2col(const float* x, float* col, int in_c, int in_h, int in_w, int k,
                                  int stride, int pad, int out_h, int out_w) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)in_c * k * k * out_h * out_w;
    if (t >= total) return;
    int pix = (int)(t % ((long long)out_h * out_w));
    int row = (int)(t / ((long long)out_h * out_w));
    int kx = row % k, ky = (row / k) % k, c = row / (k * k);
    int oy = pix / out_w, ox = pix % out_w;
    int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
    col[t] = (iy >= 0 && iy < in_h && ix >= 0 && ix < in_w)
                 ? x[((long long)c * in_h + iy) * in_w + ix]
                 : 0.0f;
}

extern "C" __global__ void col2im(const float* col, float* dx, int in_c, int in_h, int in_w, int k,
                                  int stride, int pad, int out_h, int out_w) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= (long long)in_c * in_h * in_w) return;
    int ix = (int)(t % in_w), iy = (int)((t / in_w) % in_h), c = (int)(t / ((long long)in_w * in_h));
    int py = iy + pad, px = ix + pad;
    float acc = 0.0f;
    for (int ky = 0; ky < k; ++ky) {
        int sy = py - ky;
        if (sy < 0 || sy % stride) continue;
        int oy = sy / stride;
        if (oy >= out_h) continue;
        for (int kx = 0; kx < k; ++kx) {
            int sx = px - kx;
            if (sx < 0 || sx % stride) continue;
            int ox = sx / stride;
            if (ox >= out_w) continue;
            acc += col[((long long)(c * k + ky) * k + kx) * out_h * out_w + oy * out_w + ox];
        }
    }
    dx[t] = acc;
}
