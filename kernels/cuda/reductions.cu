// Fixed-order reductions: the column log-sum-exp and the ref-map partials over slots, and the
// per-head factors that let the main pass take C from P.
#include "errors.h"
#include "passes.h"
#include "scores.cuh"

namespace i2am {
namespace {

constexpr int kThreadsPerBlock = 256;

__global__ void column_lse(const MaxSum* part, float* lse_col, int slots, int nk, float tiny, int64_t n) {
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // ih * nk + key
    if (idx >= n) return;
    const MaxSum* p = part + idx / nk * slots * nk + idx % nk;
    MaxSum c = p[0];
    for (int s = 1; s < slots; ++s) c = merge(c, p[int64_t(s) * nk]);
    lse_col[idx] = c.l >= tiny ? c.m + log2f(c.l) : INFINITY;  // +inf: redone by exact_lse
}

// One warp per (entry, head): max and min are exact in any order, so this is deterministic too.
__global__ void c_from_p(const float* lse_row, const float* lse_col, float* head_shift, int* from_p,
                         float* col_factor, int nq, int nk, float range) {
    const int64_t ih = blockIdx.x;
    const float* rows = lse_row + ih * nq;
    const float* cols = lse_col + ih * nk;
    float c = -INFINITY, lo = INFINITY;
    for (int x = threadIdx.x; x < nq; x += 32) c = fmaxf(c, rows[x]);
    for (int k = threadIdx.x; k < nk; k += 32) lo = fminf(lo, cols[k]);
    for (int mask = 16; mask > 0; mask /= 2) {
        c = fmaxf(c, __shfl_xor_sync(0xffffffffu, c, mask));
        lo = fminf(lo, __shfl_xor_sync(0xffffffffu, lo, mask));
    }
    const bool ok = c - lo <= range;
    if (threadIdx.x == 0) head_shift[ih] = c, from_p[ih] = ok;
    if (ok)
        for (int k = threadIdx.x; k < nk; k += 32) col_factor[ih * nk + k] = exp2f(c - cols[k]);
}

__global__ void reduce_ref(const float* part, const int64_t* ref_idx, const float* m_scale, float* map,
                           Strides ms, int heads, int slots, int rows, int nk, int n_ref, int64_t n) {
    const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // ((i * heads + h) * rows + r) * n_ref + j
    if (idx >= n) return;
    const int j = int(idx % n_ref), r = int(idx / n_ref % rows);
    const int64_t ih = idx / n_ref / rows;
    const float* p = part + (ih * slots * rows + r) * nk + ref_idx[j];
    float sum = 0.f;
    for (int s = 0; s < slots; ++s) sum += p[int64_t(s) * rows * nk];
    map[ih / heads * ms.b + ih % heads * ms.h + r * ms.n + j * ms.c] += m_scale[r] * sum;
}

}  // namespace

void launch_column_lse(const Params& p, int n_record, cudaStream_t stream) {
    const int64_t n = int64_t(n_record) * p.heads * p.nk;
    launch_kernel(column_lse, dim3(blocks_for(n, kThreadsPerBlock)), kThreadsPerBlock, 0, stream,
                  static_cast<const MaxSum*>(p.col_part), p.lse_col, p.slots, p.nk, p.tiny, n);
    check_launch("column_lse");
}

void launch_c_from_p(const Params& p, int n_record, cudaStream_t stream) {
    launch_kernel(c_from_p, dim3(n_record * p.heads), 32, 0, stream, static_cast<const float*>(p.lse_row),
                  static_cast<const float*>(p.lse_col), p.head_shift, p.from_p, p.col_factor, p.nq, p.nk, p.c_range);
    check_launch("c_from_p");
}

void launch_reduce_ref(const float* part, const int64_t* ref_idx, const float* m_scale, float* map,
                       const Strides& map_strides, int n_record, int heads, int slots, int rows, int nk, int n_ref,
                       cudaStream_t stream) {
    const int64_t n = int64_t(n_record) * heads * rows * n_ref;
    launch_kernel(reduce_ref, dim3(blocks_for(n, kThreadsPerBlock)), kThreadsPerBlock, 0, stream, part, ref_idx,
                  m_scale, map, map_strides, heads, slots, rows, nk, n_ref, n);
    check_launch("reduce_ref");
}

}  // namespace i2am
