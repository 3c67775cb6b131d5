// Host emulation of the device primitives of ../device.cuh, to run the kernels on a CPU in tests.
//
// A launch runs block after block; the threads of a block are fibers on one host thread and
// switch at every block or warp collective (barriers, shuffles, ldmatrix, mma), in a shuffled
// order each round. ldmatrix and mma are written from the PTX ISA fragment tables, not from
// the kernels' use of them, and check their operands (16-byte aligned rows inside shared
// memory, all 32 lanes present). Shared memory starts as NaN bytes each block.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#define __launch_bounds__(...)

extern uint3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;

namespace i2am {

using std::max;
using std::min;

namespace emu {

void block_barrier();
void warp_barrier();
// Every lane of the warp posts `size` bytes (at most 64); all[32 * size] receives all posts.
void warp_exchange(const void* mine, void* all, size_t size);
void ldmatrix(uint32_t* r, int matrices, bool trans, const void* row);
// cp.async of 16 bytes: the destination reads as NaN until the issuing thread waits.
void cp_async_16(void* smem, const void* gmem);
void cp_async_wait_all();
// mma.m16n8k16 with fp32 accumulators; `to_float` widens one 16-bit element.
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], float (*to_float)(uint16_t));
float half_to_float(uint16_t bits);
float bfloat16_to_float(uint16_t bits);
unsigned char* shared_memory();
// Runs body(ctx) for every thread of every block; throws i2am::Error on a failed check or deadlock.
void run_grid(dim3 grid, int threads, size_t smem, void (*body)(void*), void* ctx);

}  // namespace emu

inline void cp_async_16(void* smem, const void* gmem) { emu::cp_async_16(smem, gmem); }
inline void cp_async_wait_all() { emu::cp_async_wait_all(); }
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emu::ldmatrix(r, 4, false, row); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) { emu::ldmatrix(r, 2, false, row); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) { emu::ldmatrix(r, 2, true, row); }

template <class T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
inline void mma_m16n8k16<__half>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    emu::mma_m16n8k16(c, a, b, emu::half_to_float);
}
template <>
inline void mma_m16n8k16<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    emu::mma_m16n8k16(c, a, b, emu::bfloat16_to_float);
}

inline unsigned char* dynamic_smem() { return emu::shared_memory(); }

template <class... Params, class... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, int threads, size_t smem, cudaStream_t, Args... args) {
    auto body = [&] { kernel(args...); };
    emu::run_grid(grid, threads, smem, [](void* ctx) { (*static_cast<decltype(body)*>(ctx))(); }, &body);
}

}  // namespace i2am

inline void __syncthreads() { i2am::emu::block_barrier(); }
inline void __syncwarp(unsigned = 0xffffffffu) { i2am::emu::warp_barrier(); }

template <class T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
    T all[32];
    i2am::emu::warp_exchange(&value, all, sizeof(T));
    return all[(threadIdx.x % 32) ^ lane_mask];
}
