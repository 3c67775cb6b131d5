// Score tiles and log2-domain softmax statistics shared by the two attention passes.
#pragma once

#include <cmath>

#include "tile_io.cuh"
#include "warp_mma.cuh"

namespace i2am {

// The sum at the larger shift: one exponential, for the smaller side (exp2(-inf) = 0 drops an empty one).
__device__ inline MaxSum merge(MaxSum a, MaxSum b) {
    const float m = fmaxf(a.m, b.m);
    if (m == -INFINITY) return {m, 0.f};
    const float f = exp2f(fminf(a.m, b.m) - m);
    return {m, a.m >= b.m ? a.l + b.l * f : a.l * f + b.l};
}

__device__ inline MaxSum shfl_xor(MaxSum a, int mask) {
    return {__shfl_xor_sync(0xffffffffu, a.m, mask), __shfl_xor_sync(0xffffffffu, a.l, mask)};
}

// Scores of the warp's 16 query rows against the block's keys, log2 domain:
// s[nt][e] = scale log2(e) <q[row], k[key]>, row = g + 8 (e / 2), key = k0 + 8 nt + 2t + e % 2;
// keys >= nk get -inf. q_rows: the warp's rows of the Q tile.
template <class T, int D>
__device__ void warp_scores(float (&s)[Tiles<T, D>::kBlockK / 8][4], const T* q_rows, const T* k_tile,
                            int k0, const Params& p) {
    using Mma = WarpMma<T>;
    using Cfg = Tiles<T, D>;
    constexpr int kTiles = Cfg::kBlockK / 8;
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt)
        for (int e = 0; e < 4; ++e) s[nt][e] = 0.f;
    const int ksteps = ceil_div(p.d, 16);  // the tiles are zero beyond d
    for (int ks = 0; ks < ksteps; ++ks) {
        typename Mma::FragA a;
        Mma::load_a(a, q_rows + ks * 16, Cfg::kLdD);
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) {
            typename Mma::FragB b;
            Mma::load_b_nk(b, k_tile + nt * 8 * Cfg::kLdD + ks * 16, Cfg::kLdD);
            Mma::mma(s[nt], a, b);
        }
    }
    const LaneCoords ln;
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt)
        for (int e = 0; e < 4; ++e)
            s[nt][e] = k0 + nt * 8 + 2 * ln.t + e % 2 < p.nk ? s[nt][e] * p.scale_log2 : -INFINITY;
}

}  // namespace i2am
