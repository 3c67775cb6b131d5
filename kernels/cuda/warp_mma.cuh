// Warp-level 16x8 tile products from shared memory, one policy per input type.
//
// Every product in the kernels is  acc(16x8, fp32) += A(16x16) * B(16x8)  per k-step, with
// the accumulator in the mma.m16n8k16 C layout: lane = 4*g + t holds rows g and g+8,
// columns 2t and 2t+1 (acc[0..3] = (g,2t) (g,2t+1) (g+8,2t) (g+8,2t+1)). All code outside
// this file relies only on that layout, so fp16/bf16 (tensor cores) and fp32 (plain FMAs,
// full precision) share the kernels.
//
// A is row-major [m][k] in smem. B comes either as [n][k] ("nk": rows of K, probe rows) or
// as [k][n] ("kn": rows of V, P or C indexed by the k-dimension).
#pragma once

#include "device.cuh"

namespace i2am {

struct LaneCoords {
    int warp, g, t;  // warp in block; lane = 4 g + t
    __device__ LaneCoords() : warp(threadIdx.x / 32), g(threadIdx.x % 32 / 4), t(threadIdx.x % 4) {}
};

// Tensor-core policy for 16-bit inputs: fragments come from ldmatrix, products from mma.sync.
template <class T>
struct Mma16 {
    struct FragA { uint32_t r[4]; };
    struct FragB { uint32_t r[2]; };

    // Matrices 0..3 of the x4 load are A's quadrants (rows 0-7|8-15) x (cols 0-7|8-15) in the
    // order of the mma A registers a0a1, a2a3, a4a5, a6a7.
    static __device__ void load_a(FragA& f, const T* a, int lda) {
        const int l = threadIdx.x % 32, quad = l / 8;
        ldmatrix_x4(f.r, a + ((quad & 1) * 8 + l % 8) * lda + (quad >> 1) * 8);
    }
    // B stored [n][k]: matrices (n 0-7, k 0-7) and (n 0-7, k 8-15); lane (n=g, k=2t..2t+1) is
    // the mma B layout b0b1 (and b2b3 for k+8).
    static __device__ void load_b_nk(FragB& f, const T* b, int ldb) {
        const int l = threadIdx.x % 16;
        ldmatrix_x2(f.r, b + (l % 8) * ldb + (l / 8) * 8);
    }
    // B stored [k][n]: matrices k 0-7 and k 8-15; transposed, lane holds (k=2t..2t+1, n=g).
    static __device__ void load_b_kn(FragB& f, const T* b, int ldb) {
        ldmatrix_x2_trans(f.r, b + (threadIdx.x % 16) * ldb);
    }
    static __device__ void mma(float (&c)[4], const FragA& a, const FragB& b) { mma_m16n8k16<T>(c, a.r, b.r); }
};

// fp32 policy: the same fragments and accumulator layout, computed with FMAs (no tf32
// rounding). A fragment: rows g and g+8, 16 k each; B fragment: columns 2t and 2t+1.
struct MmaF32 {
    struct FragA { float v[2][16]; };
    struct FragB { float v[2][16]; };

    static __device__ void load_a(FragA& f, const float* a, int lda) {
        const LaneCoords ln;
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            f.v[0][k] = a[ln.g * lda + k];
            f.v[1][k] = a[(ln.g + 8) * lda + k];
        }
    }
    static __device__ void load_b_nk(FragB& f, const float* b, int ldb) {
        const LaneCoords ln;
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            f.v[0][k] = b[(2 * ln.t) * ldb + k];
            f.v[1][k] = b[(2 * ln.t + 1) * ldb + k];
        }
    }
    static __device__ void load_b_kn(FragB& f, const float* b, int ldb) {
        const LaneCoords ln;
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            f.v[0][k] = b[k * ldb + 2 * ln.t];
            f.v[1][k] = b[k * ldb + 2 * ln.t + 1];
        }
    }
    static __device__ void mma(float (&c)[4], const FragA& a, const FragB& b) {
#pragma unroll
        for (int k = 0; k < 16; ++k) {
            c[0] = fmaf(a.v[0][k], b.v[0][k], c[0]);
            c[1] = fmaf(a.v[0][k], b.v[1][k], c[1]);
            c[2] = fmaf(a.v[1][k], b.v[0][k], c[2]);
            c[3] = fmaf(a.v[1][k], b.v[1][k], c[3]);
        }
    }
};

template <class T> struct MmaFor { using type = Mma16<T>; };
template <> struct MmaFor<float> { using type = MmaF32; };
template <class T> using WarpMma = typename MmaFor<T>::type;

}  // namespace i2am
