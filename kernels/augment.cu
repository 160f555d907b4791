// The paper's training views finished on the device, so that the host ships each view's bytes
// as cut from its stored uint8 image (a quarter of the float view's size) and the device does
// the arithmetic: mirror, mean image subtraction and the PCA colour shift, in the same
// arithmetic as the CPU (src/data/augment.rs::finish, and ::render, which it equals):
//   out[v, c, y, x] = pixels[v, c, y, sx] - mean[c, y0 + y, x0 + sx] + shift[v, c]
// where sx = x, or out_side - 1 - x for a mirrored view, and (x0, y0) is where view v was cut
// from its side x side image. No multiply: the sum rounds as on the CPU, bit for bit.

extern "C" __global__ void finish_views(const unsigned char* pixels, const float* mean,
                                        const int* crops, const float* shifts, float* out,
                                        int views, int side, int out_side) {
    long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long per = 3LL * out_side * out_side;
    if (t >= views * per) return;
    int v = (int)(t / per);
    int rem = (int)(t % per);
    int c = rem / (out_side * out_side);
    int y = (rem / out_side) % out_side;
    int x = rem % out_side;
    int x0 = crops[3 * v], y0 = crops[3 * v + 1], flip = crops[3 * v + 2];
    int sx = flip ? out_side - 1 - x : x;
    long long m = ((long long)c * side + y0 + y) * side + x0 + sx;
    float p = (float)pixels[v * per + ((long long)c * out_side + y) * out_side + sx];
    out[t] = p - mean[m] + shifts[3 * v + c];
}
