// Pass 1: each query row's log2-sum-exp2 over all keys (for P), and when a query-softmax map
// is requested, each key column's (max, sum) over the block's run of query rows (for C).
//
// One exponential a score serves both: per key block each warp takes one shift W, its largest
// score there, and e = 2^(s - W) gives its rows' sums and its columns' sums at the same shift.
// Rows and columns far below W lose their terms to float's range: a row (or column) whose sum
// at the largest shift it met is below p.tiny = 2^-c_range is written as +inf, and
// launch_exact_lse redoes it with its own shift. Where the sum is at least 2^-c_range, each
// lost term is below 2^(-126 + c_range) of it.
#pragma once

#include "scores.cuh"

namespace i2am {

template <class T, int D>
struct StatsSmem {
    using Cfg = Tiles<T, D>;
    static constexpr size_t kQ = size_t(kBlockQ) * Cfg::kLdD * sizeof(T);
    static constexpr size_t kK = size_t(Cfg::kBlockK) * Cfg::kLdD * sizeof(T);  // two: one lands, one is read
    static constexpr size_t kCols = size_t(kWarps) * Cfg::kBlockK * sizeof(float);  // column sums at W
    static constexpr size_t kShifts = size_t(kWarps) * sizeof(float);             // the warps' W
    static constexpr size_t kBytes = kQ + 2 * kK + kCols + kShifts;
};

// Reduce-scatter over the lanes of one t (lane bits 2-4, masks kMask .. 4): of the kN values
// v[0 .. kN) (value indices base ..) each lane keeps the half its mask bit names, added to its
// partner's copy, until one value is left; masks left over then add it in full.
template <int kVals, int kN, int kMask>
__device__ void sum_over_lanes_of_t(float (&v)[kVals], int& base) {
    if constexpr (kMask >= 4) {
        if constexpr (kN == 1) {
            v[0] += __shfl_xor_sync(0xffffffffu, v[0], kMask);
        } else {
            const bool hi = threadIdx.x & kMask;
#pragma unroll
            for (int i = 0; i < kN / 2; ++i) {
                const float keep = hi ? v[i + kN / 2] : v[i], send = hi ? v[i] : v[i + kN / 2];
                v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kMask);
            }
            if (hi) base += kN / 2;
        }
        sum_over_lanes_of_t<kVals, kN == 1 ? 1 : kN / 2, kMask / 2>(v, base);
    }
}

// Sums over the warp's 16 rows of e for each key of the block, into cols[key]: each column's
// value i = 2 nt + c (key 8 nt + 2t + c) of the lanes of one t, reduce-scattered over them
// (14 shuffles for 64 keys, where a full reduction of each would take 48).
template <int kTiles>
__device__ void warp_column_sums(const float (&e)[kTiles][4], float* cols) {
    constexpr int kVals = 2 * kTiles, kLeft = kVals >= 8 ? kVals / 8 : 1;  // values a lane ends with
    const LaneCoords ln;
    float v[kVals];
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
        for (int c = 0; c < 2; ++c) v[2 * nt + c] = e[nt][c] + e[nt][2 + c];
    int base = 0;
    sum_over_lanes_of_t<kVals, kVals, 16>(v, base);
#pragma unroll
    for (int i = 0; i < kLeft; ++i) cols[(base + i) / 2 * 8 + 2 * ln.t + (base + i) % 2] = v[i];
}

// The block's (max, sum) of one key column: the warps' sums rescaled to the largest W.
__device__ inline MaxSum block_column(const float* cols, const float* shifts, int key, int block_k) {
    float m = shifts[0];
    for (int w = 1; w < kWarps; ++w) m = fmaxf(m, shifts[w]);
    if (m == -INFINITY) return {m, 0.f};
    float l = 0.f;
    for (int w = 0; w < kWarps; ++w) l += cols[w * block_k + key] * exp2f(shifts[w] - m);
    return {m, l};
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) stats_pass(Params p) {
    using Cfg = Tiles<T, D>;
    constexpr int kBlockK = Cfg::kBlockK, kTiles = kBlockK / 8;
    unsigned char* smem = dynamic_smem();
    T* q_tile = reinterpret_cast<T*>(smem);
    T* const k_tiles[2] = {reinterpret_cast<T*>(smem + StatsSmem<T, D>::kQ),
                           reinterpret_cast<T*>(smem + StatsSmem<T, D>::kQ + StatsSmem<T, D>::kK)};
    float* col_tile = reinterpret_cast<float*>(smem + StatsSmem<T, D>::kQ + 2 * StatsSmem<T, D>::kK);  // [warp][key]
    float* shifts = col_tile + kWarps * kBlockK;                                                  // [warp]

    const BlockHead bh(p);
    const LaneCoords ln;
    const T* q = bh.at<T>(p.q, p.qs);
    const T* k = bh.at<T>(p.k, p.ks);
    const int d16 = round_up(p.d, 16);
    MaxSum* col_part = p.col_part + (bh.ih * p.slots + bh.slot) * p.nk;
    const auto load_keys = [&](int k0, T* tile) {
        load_tile<T, kBlockK>(tile, Cfg::kLdD, k + k0 * p.ks.n, p.ks.n, p.ks.c, p.k_vec, p.nk - k0, p.d, d16);
    };

    for (int qb = bh.first_block(p); qb < bh.end_block(p); ++qb) {
        const int x0 = qb * kBlockQ, xw = x0 + 16 * ln.warp + ln.g;  // xw: the lane's first row
        const bool row_ok[2] = {xw < p.nq, xw + 8 < p.nq};
        __syncthreads();  // the previous run's readers of q_tile and the key tiles are done
        load_tile<T, kBlockQ>(q_tile, Cfg::kLdD, q + x0 * p.qs.n, p.qs.n, p.qs.c, p.q_vec, p.nq - x0, p.d, d16);
        load_keys(0, k_tiles[0]);
        // The rows' sums over this lane's columns at the shift m, the largest W so far (the
        // same in every lane of the warp).
        float m = -INFINITY, l[2] = {0.f, 0.f};

        for (int k0 = 0, cur = 0; k0 < p.nk; k0 += kBlockK, cur ^= 1) {
            // This key block's tile has landed (at the first, Q's too); the readers of the other
            // tile and of col_tile in the previous key block are done.
            tiles_landed();
            if (k0 + kBlockK < p.nk) load_keys(k0 + kBlockK, k_tiles[cur ^ 1]);  // lands while this block runs
            float s[kTiles][4];
            warp_scores<T, D>(s, q_tile + 16 * ln.warp * Cfg::kLdD, k_tiles[cur], k0, p);
            float w = -INFINITY;  // W: the largest score of the warp's valid rows
#pragma unroll
            for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (!row_ok[e / 2]) s[nt][e] = -INFINITY;
                    w = fmaxf(w, s[nt][e]);
                }
            for (int mask = 1; mask < 32; mask *= 2) w = fmaxf(w, __shfl_xor_sync(0xffffffffu, w, mask));
            const float shift = w == -INFINITY ? 0.f : w;  // no valid score: every e below is 0
            float r[2] = {0.f, 0.f};
#pragma unroll
            for (int nt = 0; nt < kTiles; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[nt][e] = exp2f(s[nt][e] - shift);  // s now holds e = 2^(s - W)
                    r[e / 2] += s[nt][e];
                }
            if (w != -INFINITY) {  // rows: (m, l) and (W, r) to the larger shift (one exponential a row)
                for (int j = 0; j < 2; ++j) l[j] = merge({m, l[j]}, {w, r[j]}).l;
                m = fmaxf(m, w);
            }

            if (!p.need_c) continue;
            warp_column_sums<kTiles>(s, col_tile + ln.warp * kBlockK);
            if (ln.g == 0 && ln.t == 0) shifts[ln.warp] = w;
            __syncthreads();
            const int key = k0 + int(threadIdx.x);
            if (threadIdx.x < kBlockK && key < p.nk) {  // merge warps, then this run's earlier blocks
                const MaxSum c = block_column(col_tile, shifts, threadIdx.x, kBlockK);
                col_part[key] = qb == bh.first_block(p) ? c : merge(col_part[key], c);
            }
        }

        float* lse_row = p.lse_row + bh.ih * p.nq;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            for (int mask = 1; mask < 4; mask *= 2) l[j] += __shfl_xor_sync(0xffffffffu, l[j], mask);
            if (ln.t == 0 && row_ok[j]) lse_row[xw + 8 * j] = l[j] >= p.tiny ? m + log2f(l[j]) : INFINITY;
        }
    }
}

}  // namespace i2am
