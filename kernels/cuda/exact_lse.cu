// The exact fallback of the stats pass: rows or columns whose sums fell out of float's range at
// the shared shift (stats_pass.cuh) are redone with their own shift, one warp each. Rare, so
// scalar dot products; the lanes' (max, sum) are merged in a fixed tree: deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "errors.h"
#include "passes.h"
#include "scores.cuh"

namespace i2am {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kMaxBlocksPerHead = 16;  // each warp strides over the indices: cheap when none is flagged

// lse[ih][i] = log2 sum_j 2^(scale_log2 <a[i], b[j]>) where it holds +inf. Rows: a = q, b = k;
// columns: a = k, b = q.
template <class T>
__global__ void exact_lse(float* lse, const T* a, Strides as, int n_a, const T* b, Strides bs, int n_b, int d,
                          float scale_log2, const int64_t* record_idx, int heads) {
    const int64_t ih = blockIdx.y, batch = record_idx[ih / heads], h = ih % heads;
    a += batch * as.b + h * as.h;
    b += batch * bs.b + h * bs.h;
    const int lane = threadIdx.x % 32, warps = gridDim.x * kWarpsPerBlock;
    for (int i = blockIdx.x * kWarpsPerBlock + int(threadIdx.x) / 32; i < n_a; i += warps) {
        if (lse[ih * n_a + i] != INFINITY) continue;  // the same for the whole warp
        MaxSum acc = {-INFINITY, 0.f};
        for (int j = lane; j < n_b; j += 32) {
            float dot = 0.f;
            for (int c = 0; c < d; ++c) dot = fmaf(to_float(a[i * as.n + c * as.c]), to_float(b[j * bs.n + c * bs.c]), dot);
            acc = merge(acc, {dot * scale_log2, 1.f});
        }
        for (int mask = 1; mask < 32; mask *= 2) acc = merge(acc, shfl_xor(acc, mask));
        if (lane == 0) lse[ih * n_a + i] = acc.m + log2f(acc.l);
    }
}

template <class T>
void launch_for(ExactLse which, const Params& p, int n_record, cudaStream_t stream) {
    const bool rows = which == ExactLse::kRows;
    const T *q = static_cast<const T*>(p.q), *k = static_cast<const T*>(p.k);
    const int n_a = rows ? p.nq : p.nk;
    const int blocks = std::min(ceil_div(n_a, kWarpsPerBlock), kMaxBlocksPerHead);
    launch_kernel(exact_lse<T>, dim3(blocks, n_record * p.heads), 32 * kWarpsPerBlock, 0, stream,
                  rows ? p.lse_row : p.lse_col, rows ? q : k, rows ? p.qs : p.ks, n_a, rows ? k : q,
                  rows ? p.ks : p.qs, rows ? p.nk : p.nq, p.d, p.scale_log2, p.record_idx, p.heads);
    check_launch(rows ? "exact_lse (rows)" : "exact_lse (columns)");
}

}  // namespace

void launch_exact_lse(ExactLse which, int dtype, const Params& p, int n_record, cudaStream_t stream) {
    switch (dtype) {
        case I2AM_F16: return launch_for<__half>(which, p, n_record, stream);
        case I2AM_BF16: return launch_for<__nv_bfloat16>(which, p, n_record, stream);
        case I2AM_F32: return launch_for<float>(which, p, n_record, stream);
    }
    throw Error(I2AM_INTERNAL, "no exact_lse kernel for dtype " + std::to_string(dtype));
}

}  // namespace i2am
