// Probe preparation: key probes scattered onto key indices, probe rows normalised.
#include <cmath>

#include "device.cuh"
#include "errors.h"
#include "passes.h"

namespace i2am {
namespace {

constexpr int kThreadsPerBlock = 256;

// link[j] = the next j' > j with ref_idx[j'] == ref_idx[j], or -1; link[n + j] = 1 when no
// j' < j has that key (j heads its chain). O(n^2) compares, independent of the probe count.
__global__ void link_repeated_keys(const int64_t* ref_idx, int n, int* link) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    const int64_t key = ref_idx[j];
    int next = -1, head = 1;
    for (int o = 0; o < n; ++o) {
        if (ref_idx[o] != key || o == j) continue;
        if (o < j) head = 0;
        else if (next < 0) next = o;
    }
    link[j] = next;
    link[n + j] = head;
}

__global__ void scatter_key_probes(const float* probes, const int64_t* ref_idx, const int* link, int n, int rows,
                                   int nk, float* u) {
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= int64_t(rows) * n) return;
    const int r = int(idx / n), j = int(idx % n);
    if (!link[n + j]) return;
    float sum = 0.f;
    for (int o = j; o >= 0; o = link[o]) sum += probes[int64_t(r) * n + o];
    u[int64_t(r) * nk + ref_idx[j]] = sum;
}

// One warp per row.
__global__ void normalize_rows(const float* src, float* dst, float* scale, int cols) {
    const int64_t row = blockIdx.x;
    float m = 0.f;
    for (int c = threadIdx.x; c < cols; c += 32) m = fmaxf(m, fabsf(src[row * cols + c]));
    for (int mask = 16; mask > 0; mask /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, mask));
    int e = 0;
    frexpf(m, &e);  // m = f 2^e with f in [0.5, 1): 2^e >= m
    const float s = m > 0.f ? ldexpf(1.f, e) : 1.f;
    for (int c = threadIdx.x; c < cols; c += 32) dst[row * cols + c] = src[row * cols + c] / s;
    if (threadIdx.x == 0) scale[row] = s;
}

}  // namespace

void launch_scatter_key_probes(const float* key_probes, const int64_t* ref_idx, int n_ref, int rows, int nk,
                               float* u, int* link, cudaStream_t stream) {
    check_cuda(cudaMemsetAsync(u, 0, sizeof(float) * rows * size_t(nk), stream), "zeroing the key-probe buffer");
    launch_kernel(link_repeated_keys, dim3(blocks_for(n_ref, kThreadsPerBlock)), kThreadsPerBlock, 0, stream,
                  ref_idx, n_ref, link);
    check_launch("link_repeated_keys");
    launch_kernel(scatter_key_probes, dim3(blocks_for(int64_t(rows) * n_ref, kThreadsPerBlock)), kThreadsPerBlock,
                  0, stream, key_probes, ref_idx, static_cast<const int*>(link), n_ref, rows, nk, u);
    check_launch("scatter_key_probes");
}

void launch_normalize_rows(const float* src, float* dst, float* scale, int rows, int cols, cudaStream_t stream) {
    launch_kernel(normalize_rows, dim3(rows), 32, 0, stream, src, dst, scale, cols);
    check_launch("normalize_rows");
}

}  // namespace i2am
