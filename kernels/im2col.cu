// Unfolding for convolution as a matrix product (cuBLAS): im2col lays out each image's
// receptive fields as columns, col2im folds the input gradient back. Both take a run of
// `images` images in one launch (image n at x + n * image_stride: the images of a batch, one
// group's channels), so that a pass over the batch is one launch, not one per image. col2im
// gathers (each input pixel sums the column entries that read it), so there are no atomics.
// Rows (c, ky, kx) of in_c * k * k, columns (oy, ox) of out_h * out_w. im2col writes entry
// (n, row, pixel) at col + n * col_image + row * col_row + pixel: per image [rows, pixels]
// (col_image = rows * pixels, col_row = pixels: one product per image, for the forward pass
// and the input gradient), or per row [images, pixels] (col_image = pixels, col_row = images
// * pixels: one product over the images and pixels together, for the weight gradient).
// col2im reads the first layout.

extern "C" __global__ void im2col(const float* x, float* col, int images, long long image_stride,
                                  long long col_image, long long col_row, int in_c, int in_h,
                                  int in_w, int k, int stride, int pad, int out_h, int out_w) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long plane = (long long)out_h * out_w;
    long long per = (long long)in_c * k * k * plane;
    if (t >= images * per) return;
    long long n = t / per;
    long long r = t % per;
    int pix = (int)(r % plane);
    int row = (int)(r / plane);
    int kx = row % k, ky = (row / k) % k, c = row / (k * k);
    int oy = pix / out_w, ox = pix % out_w;
    int iy = oy * stride - pad + ky, ix = ox * stride - pad + kx;
    col[n * col_image + row * col_row + pix] =
        (iy >= 0 && iy < in_h && ix >= 0 && ix < in_w)
            ? x[n * image_stride + ((long long)c * in_h + iy) * in_w + ix]
            : 0.0f;
}

extern "C" __global__ void col2im(const float* col, float* dx, int images, long long image_stride,
                                  int in_c, int in_h, int in_w, int k, int stride, int pad,
                                  int out_h, int out_w) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long image = (long long)in_c * in_h * in_w;
    if (t >= images * image) return;
    long long n = t / image;
    long long r = t % image;
    int ix = (int)(r % in_w), iy = (int)((r / in_w) % in_h), c = (int)(r / ((long long)in_w * in_h));
    const float* cn = col + n * (long long)in_c * k * k * out_h * out_w;
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
            acc += cn[((long long)(c * k + ky) * k + kx) * out_h * out_w + oy * out_w + ox];
        }
    }
    dx[n * image_stride + r] = acc;
}
