// Block geometry per (input type, head-dim bucket) and global -> shared tile copies.
#pragma once

#include "device.cuh"
#include "params.cuh"

namespace i2am {

template <class T> __device__ inline T from_float(float x);
template <> __device__ inline float from_float<float>(float x) { return x; }
template <> __device__ inline __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ inline __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
__device__ inline float to_float(float x) { return x; }
__device__ inline float to_float(__half x) { return __half2float(x); }
__device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// D: head-dim bucket (64, 128, 256) that both d and dv fit in.
template <class T, int D>
struct Tiles {
    static_assert(D % 16 == 0, "head-dim buckets are whole mma k-steps");
    // Keys per block: bounded by registers (D/8 accumulator tiles per thread) and shared memory.
    static constexpr int kBlockK = sizeof(T) == 2 ? (D <= 128 ? 64 : 32) : (D <= 64 ? 64 : D <= 128 ? 32 : 16);
    // Rows padded by 16 bytes: rows stay 16-byte aligned and consecutive rows start 4 banks
    // apart, so ldmatrix (8 rows of 16 B) and the fp32 lane patterns are conflict-free.
    static constexpr int kPad = 16 / sizeof(T);
    static constexpr int kLdD = D + kPad;         // Q, K, V tiles
    static constexpr int kLdK = kBlockK + kPad;   // P, C (per query row) and U (per probe) tiles
    static constexpr int kLdQ = kBlockQ + kPad;   // M tile (per probe)
};

// tile[r][c] = src[r * row_stride + c * col_stride] for r < rows_valid, c < cols_valid, else 0,
// for r < Rows and c < cols (a multiple of 16). vec: col_stride == 1 and 16-byte aligned rows;
// those chunks go by cp.async, so the tile is complete only after tiles_landed().
template <class T, int Rows>
__device__ void load_tile(T* tile, int ld, const T* src, int64_t row_stride, int64_t col_stride, bool vec,
                          int rows_valid, int cols_valid, int cols) {
    constexpr int kVec = 16 / sizeof(T);
    const int chunks = cols / kVec;
    for (int idx = threadIdx.x; idx < Rows * chunks; idx += kThreads) {
        const int r = idx / chunks, c = idx % chunks * kVec;
        T* dst = tile + r * ld + c;
        const T* row = src + r * row_stride;
        if (vec && r < rows_valid && c + kVec <= cols_valid) {
            cp_async_16(dst, row + c);
            continue;
        }
#pragma unroll
        for (int e = 0; e < kVec; ++e)
            dst[e] = r < rows_valid && c + e < cols_valid ? row[(c + e) * col_stride] : from_float<T>(0.f);
    }
}

// The block's tile loads so far have landed and are visible to every thread.
__device__ inline void tiles_landed() {
    cp_async_wait_all();
    __syncthreads();
}

// tile[r][c] = T(src[r * row_stride + c]) for r < rows_valid, c < cols_valid, else 0; fp32 probes.
template <class T, int Rows, int Cols>
__device__ void load_probe_tile(T* tile, int ld, const float* src, int64_t row_stride, int rows_valid,
                                int cols_valid) {
    for (int idx = threadIdx.x; idx < Rows * Cols; idx += kThreads) {
        const int r = idx / Cols, c = idx % Cols;
        tile[r * ld + c] = from_float<T>(r < rows_valid && c < cols_valid ? src[r * row_stride + c] : 0.f);
    }
}

// The (recorded entry i, head h) of this block (grid: slots x heads x recorded entries).
struct BlockHead {
    int slot, h, i;
    int64_t b, ih;  // batch index, and i * heads + h for the workspace arrays
    __device__ explicit BlockHead(const Params& p)
        : slot(blockIdx.x), h(blockIdx.y), i(blockIdx.z), b(p.record_idx[blockIdx.z]),
          ih(int64_t(blockIdx.z) * p.heads + blockIdx.y) {}

    template <class T>
    __device__ const T* at(const void* base, const Strides& s) const {
        return static_cast<const T*>(base) + b * s.b + h * s.h;
    }
    __device__ int first_block(const Params& p) const { return slot * p.blocks_per_slot; }
    __device__ int end_block(const Params& p) const {
        const int n = ceil_div(p.nq, kBlockQ);
        return min(n, first_block(p) + p.blocks_per_slot);
    }
};

}  // namespace i2am
