// The paper's training views made on the device from the stored uint8 images, so that the host
// ships bytes (4x fewer than floats): crop, mirror, mean image subtraction and the PCA colour
// shift, in the same arithmetic as the CPU (src/data/augment.rs::render):
//   out[n, c, y, x] = image[n, c, y0 + y, x0 + sx] - mean[c, y0 + y, x0 + sx] + shift[n, c]
// where sx = x, or out_side - 1 - x for a mirrored view.

extern "C" __global__ void augment_u8(const unsigned char* images, const float* mean,
                                      const int* crops, const float* shifts, float* out,
                                      int batch, int side, int out_side) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long per = 3LL * out_side * out_side;
    if (t >= batch * per) return;
    int n = (int)(t / per);
    int rem = (int)(t % per);
    int c = rem / (out_side * out_side);
    int y = (rem / out_side) % out_side;
    int x = rem % out_side;
    int x0 = crops[3 * n], y0 = crops[3 * n + 1], flip = crops[3 * n + 2];
    int sx = flip ? out_side - 1 - x : x;
    long long at = ((long long)c * side + y0 + y) * side + x0 + sx;
    out[t] = (float)images[(long long)n * 3 * side * side + at] - mean[at] + shifts[3 * n + c];
}
