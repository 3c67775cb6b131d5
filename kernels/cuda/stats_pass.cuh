// Pass 1: each query row's log2-sum-exp2 over all keys (for P), and when a query-softmax map
// is requested, each key column's (max, sum) over the block's run of query rows (for C).
#pragma once

#include "scores.cuh"

namespace i2am {

template <class T, int D>
struct StatsSmem {
    using Cfg = Tiles<T, D>;
    static constexpr size_t kQ = size_t(kBlockQ) * Cfg::kLdD * sizeof(T);
    static constexpr size_t kK = size_t(Cfg::kBlockK) * Cfg::kLdD * sizeof(T);
    static constexpr size_t kCols = size_t(kWarps) * Cfg::kBlockK * sizeof(MaxSum);
    static constexpr size_t kBytes = kQ + kK + kCols;
};

// Column (max, sum) of the warp's 16 rows for each key of s, written by lanes g == 0 to cols.
template <int kTiles>
__device__ void warp_column_stats(const float (&s)[kTiles][4], const bool (&row_ok)[2], MaxSum* cols) {
    const LaneCoords ln;
#pragma unroll
    for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
            const float v0 = row_ok[0] ? s[nt][c] : -INFINITY, v1 = row_ok[1] ? s[nt][2 + c] : -INFINITY;
            float m = fmaxf(v0, v1);
            for (int mask = 4; mask < 32; mask *= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, mask));
            float l = m == -INFINITY ? 0.f : exp2f(v0 - m) + exp2f(v1 - m);
            for (int mask = 4; mask < 32; mask *= 2) l += __shfl_xor_sync(0xffffffffu, l, mask);
            if (ln.g == 0) cols[nt * 8 + 2 * ln.t + c] = {m, l};
        }
    }
}

template <class T, int D>
__global__ void __launch_bounds__(kThreads) stats_pass(Params p) {
    using Cfg = Tiles<T, D>;
    constexpr int kBlockK = Cfg::kBlockK, kTiles = kBlockK / 8;
    unsigned char* smem = dynamic_smem();
    T* q_tile = reinterpret_cast<T*>(smem);
    T* k_tile = reinterpret_cast<T*>(smem + StatsSmem<T, D>::kQ);
    MaxSum* col_tile = reinterpret_cast<MaxSum*>(smem + StatsSmem<T, D>::kQ + StatsSmem<T, D>::kK);  // [warp][key]

    const BlockHead bh(p);
    const LaneCoords ln;
    const T* q = bh.at<T>(p.q, p.qs);
    const T* k = bh.at<T>(p.k, p.ks);
    const int d16 = round_up(p.d, 16);
    MaxSum* col_part = p.col_part + (bh.ih * p.slots + bh.slot) * p.nk;

    for (int qb = bh.first_block(p); qb < bh.end_block(p); ++qb) {
        const int x0 = qb * kBlockQ, xw = x0 + 16 * ln.warp + ln.g;  // xw: the lane's first row
        const bool row_ok[2] = {xw < p.nq, xw + 8 < p.nq};
        __syncthreads();  // the previous run's readers of q_tile are done
        load_tile<T, kBlockQ>(q_tile, Cfg::kLdD, q + x0 * p.qs.n, p.qs.n, p.qs.c, p.q_vec, p.nq - x0, p.d, d16);
        MaxSum row[2] = {{-INFINITY, 0.f}, {-INFINITY, 0.f}};  // over this lane's columns only

        for (int k0 = 0; k0 < p.nk; k0 += kBlockK) {
            __syncthreads();  // readers of k_tile and col_tile of the previous key block are done
            load_tile<T, kBlockK>(k_tile, Cfg::kLdD, k + k0 * p.ks.n, p.ks.n, p.ks.c, p.k_vec, p.nk - k0, p.d, d16);
            __syncthreads();
            float s[kTiles][4];
            warp_scores<T, D>(s, q_tile + 16 * ln.warp * Cfg::kLdD, k_tile, k0, p);

#pragma unroll
            for (int j = 0; j < 2; ++j) {  // online update of rows g and g+8
                float m = row[j].m;
#pragma unroll
                for (int nt = 0; nt < kTiles; ++nt) m = fmaxf(m, fmaxf(s[nt][2 * j], s[nt][2 * j + 1]));
                if (m == -INFINITY) continue;  // no valid key in this lane's columns yet
                float l = row[j].l * exp2f(row[j].m - m);
#pragma unroll
                for (int nt = 0; nt < kTiles; ++nt) l += exp2f(s[nt][2 * j] - m) + exp2f(s[nt][2 * j + 1] - m);
                row[j] = {m, l};
            }

            if (!p.need_c) continue;
            warp_column_stats<kTiles>(s, row_ok, col_tile + ln.warp * kBlockK);
            __syncthreads();
            const int key = k0 + int(threadIdx.x);
            if (threadIdx.x < kBlockK && key < p.nk) {  // merge warps, then this run's earlier blocks
                MaxSum c = col_tile[threadIdx.x];
                for (int w = 1; w < kWarps; ++w) c = merge(c, col_tile[w * kBlockK + threadIdx.x]);
                col_part[key] = qb == bh.first_block(p) ? c : merge(col_part[key], c);
            }
        }

        float* lse_row = p.lse_row + bh.ih * p.nq;
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            for (int mask = 1; mask < 4; mask *= 2) row[j] = merge(row[j], shfl_xor(row[j], mask));
            if (ln.t == 0 && row_ok[j]) lse_row[xw + 8 * j] = row[j].m + log2f(row[j].l);
        }
    }
}

}  // namespace i2am
