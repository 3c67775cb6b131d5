// Pass 2: out = P V and the map reductions, with the exact softmaxes of pass 1:
//   P[x,k] = 2^(s[x,k] - lse_row[x]),  C[x,k] = P[x,k] a[x] b[k]   (log2 domain),
// C from P by the rank-one factors of params.cuh (one exponential a score), or where a head's
// scores spread too wide, C[x,k] = 2^(s[x,k] - lse_col[k]).
// Per key block each warp writes its 16 rows of P and C to shared memory, then
//   out  (16 x dv) += P V                 gen (16 x probes) += P U^T, C U^T   (the warp's rows)
// and, after a block barrier, the ref maps sum over all the block's query rows:
//   ref (probes x 8 keys) += M (probes x 64 rows) P(64 rows x 8 keys), one key tile per warp,
// added into this block's own slot partial (one writer, fixed order: deterministic).
// U: scattered key probes of this launch's 16 probe rows; M: query probes of the same rows.
#pragma once

#include "scores.cuh"

namespace i2am {

template <class T, int D>
struct MainSmem {
    using Cfg = Tiles<T, D>;
    static constexpr size_t kQ = size_t(kBlockQ) * Cfg::kLdD * sizeof(T);
    static constexpr size_t kKV = size_t(Cfg::kBlockK) * Cfg::kLdD * sizeof(T);     // K, V each
    static constexpr size_t kPC = size_t(kBlockQ) * Cfg::kLdK * sizeof(T);         // P, C each
    static constexpr size_t kU = size_t(kProbeTile) * Cfg::kLdK * sizeof(T);
    static constexpr size_t kM = size_t(kProbeTile) * Cfg::kLdQ * sizeof(T);
    static constexpr size_t kCol = size_t(Cfg::kBlockK) * sizeof(float);
    static constexpr size_t kBytes = kQ + 2 * kKV + 2 * kPC + kU + kM + kCol;

    T *q, *k, *v, *pc[2], *u, *m;  // pc[Softmax]: P and C tiles
    float* col;                    // per key of the block: b where C comes from P, else lse_col
    __device__ explicit MainSmem(unsigned char* base) {
        q = reinterpret_cast<T*>(base);
        k = reinterpret_cast<T*>(base + kQ);
        v = reinterpret_cast<T*>(base + kQ + kKV);
        pc[kOverKeys] = reinterpret_cast<T*>(base + kQ + 2 * kKV);
        pc[kOverQueries] = reinterpret_cast<T*>(base + kQ + 2 * kKV + kPC);
        u = reinterpret_cast<T*>(base + kQ + 2 * kKV + 2 * kPC);
        m = reinterpret_cast<T*>(base + kQ + 2 * kKV + 2 * kPC + kU);
        col = reinterpret_cast<float*>(base + kQ + 2 * kKV + 2 * kPC + kU + kM);
    }
};

// One block's work: its (entry, head), its probe rows and the steps of a key block.
template <class T, int D>
struct MainBlock {
    using Mma = WarpMma<T>;
    using Cfg = Tiles<T, D>;
    static constexpr int kBlockK = Cfg::kBlockK, kTiles = kBlockK / 8, kOutTiles = D / 8;
    static constexpr int kGenTiles = kProbeTile / 8;

    const Params& p;
    const MainSmem<T, D> sm;
    const BlockHead bh;
    const LaneCoords ln;
    const int gen_rows, ref_rows;  // probe rows of this launch: [p.r0, p.r0 + rows)
    const bool c_from_p;           // C = P a b in this head (params.cuh)
    bool gen[2], ref[2];           // per softmax: this launch adds to that map

    __device__ explicit MainBlock(const Params& params)
        : p(params), sm(dynamic_smem()), bh(params), gen_rows(max(0, min(kProbeTile, p.n_u - p.r0))),
          ref_rows(max(0, min(kProbeTile, p.n_m - p.r0))), c_from_p(p.need_c && p.from_p[bh.ih]) {
        for (int sx = 0; sx < 2; ++sx) {
            gen[sx] = gen_rows > 0 && p.gen[sx];
            ref[sx] = ref_rows > 0 && p.ref_part[sx];
        }
    }

    // The block's 64 query rows of Q and of this launch's query probes.
    __device__ void load_query_block(int x0) {
        load_tile<T, kBlockQ>(sm.q, Cfg::kLdD, bh.at<T>(p.q, p.qs) + x0 * p.qs.n, p.qs.n, p.qs.c, p.q_vec,
                              p.nq - x0, p.d, round_up(p.d, 16));
        if (ref[0] || ref[1])
            load_probe_tile<T, kProbeTile, kBlockQ>(sm.m, Cfg::kLdQ, p.m + int64_t(p.r0) * p.nq + x0, p.nq,
                                                     ref_rows, p.nq - x0);
    }

    // Keys k0 .. k0 + kBlockK of K, V, the key probes and b or lse_col.
    __device__ void load_key_block(int k0) {
        load_tile<T, kBlockK>(sm.k, Cfg::kLdD, bh.at<T>(p.k, p.ks) + k0 * p.ks.n, p.ks.n, p.ks.c, p.k_vec,
                              p.nk - k0, p.d, round_up(p.d, 16));
        if (p.write_out)
            load_tile<T, kBlockK>(sm.v, Cfg::kLdD, bh.at<T>(p.v, p.vs) + k0 * p.vs.n, p.vs.n, p.vs.c, p.v_vec,
                                  p.nk - k0, p.dv, round_up(p.dv, 16));
        if (gen[0] || gen[1])
            load_probe_tile<T, kProbeTile, kBlockK>(sm.u, Cfg::kLdK, p.u + int64_t(p.r0) * p.nk + k0, p.nk,
                                                     gen_rows, p.nk - k0);
        const int key = k0 + int(threadIdx.x);  // one key of the block per thread
        if (p.need_c && threadIdx.x < kBlockK)
            sm.col[threadIdx.x] = key < p.nk ? (c_from_p ? p.col_factor : p.lse_col)[bh.ih * p.nk + key] : 0.f;
    }

    // How this head's C tile is made: none needed, from P, or by its own exponential.
    enum CTile { kNoC, kFromP, kDirect };

    // The warp's rows of P and C; zero outside the valid rows and keys. a: the rows' a[x].
    // One instance per CTile, so that the C-from-P tile holds no exponential, not even predicated off.
    template <CTile kC>
    __device__ void write_softmaxes(const float (&s)[kTiles][4], const bool (&row_ok)[2], const float (&lse_row)[2],
                                    const float (&a)[2]) {
#pragma unroll
        for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int j = e / 2, col = nt * 8 + 2 * ln.t + e % 2;
                const bool ok = row_ok[j] && s[nt][e] != -INFINITY;  // -inf: key >= nk
                const int at = (16 * ln.warp + ln.g + 8 * j) * Cfg::kLdK + col;
                const float pv = ok ? exp2f(s[nt][e] - lse_row[j]) : 0.f;
                sm.pc[kOverKeys][at] = from_float<T>(pv);
                if (kC == kNoC) continue;
                // a b = 2^(lse_row - lse_col) first: it underflows only where C < 2^-126 anyway
                const float cv = kC == kFromP ? pv * (a[j] * sm.col[col]) : ok ? exp2f(s[nt][e] - sm.col[col]) : 0.f;
                sm.pc[kOverQueries][at] = from_float<T>(cv);
            }
        }
    }

    __device__ void write_softmaxes(const float (&s)[kTiles][4], const bool (&row_ok)[2], const float (&lse_row)[2],
                                    const float (&a)[2]) {
        if (!p.need_c) write_softmaxes<kNoC>(s, row_ok, lse_row, a);
        else if (c_from_p) write_softmaxes<kFromP>(s, row_ok, lse_row, a);
        else write_softmaxes<kDirect>(s, row_ok, lse_row, a);
    }

    // out += P V and gen += P U^T, C U^T over the warp's 16 rows.
    __device__ void add_row_products(float (&out)[kOutTiles][4], float (&gen_acc)[2][kGenTiles][4]) {
        const int rows = 16 * ln.warp * Cfg::kLdK;
        for (int ks = 0; ks < kBlockK / 16; ++ks) {
            typename Mma::FragA a;
            if (p.write_out) {
                Mma::load_a(a, sm.pc[kOverKeys] + rows + ks * 16, Cfg::kLdK);
#pragma unroll
                for (int nt = 0; nt < kOutTiles; ++nt) {
                    if (nt * 8 >= p.dv) continue;
                    typename Mma::FragB b;
                    Mma::load_b_kn(b, sm.v + ks * 16 * Cfg::kLdD + nt * 8, Cfg::kLdD);
                    Mma::mma(out[nt], a, b);
                }
            }
#pragma unroll
            for (int sx = 0; sx < 2; ++sx) {
                if (!gen[sx]) continue;
                Mma::load_a(a, sm.pc[sx] + rows + ks * 16, Cfg::kLdK);
#pragma unroll
                for (int pt = 0; pt < kGenTiles; ++pt) {
                    if (pt * 8 >= gen_rows) continue;
                    typename Mma::FragB b;
                    Mma::load_b_nk(b, sm.u + pt * 8 * Cfg::kLdK + ks * 16, Cfg::kLdK);
                    Mma::mma(gen_acc[sx][pt], a, b);
                }
            }
        }
    }

    // ref partial (probes x keys) += M P and M C over all 64 rows of the block, one key tile per
    // warp, into the slot's partial: assigned by the slot's first query block, then added.
    __device__ void add_ref_products(int k0, bool first_block) {
        for (int nt = ln.warp; nt < kTiles; nt += kWarps) {
#pragma unroll
            for (int sx = 0; sx < 2; ++sx) {
                if (!ref[sx]) continue;
                float acc[4] = {};
                for (int ks = 0; ks < kBlockQ / 16; ++ks) {
                    typename Mma::FragA a;
                    typename Mma::FragB b;
                    Mma::load_a(a, sm.m + ks * 16, Cfg::kLdQ);
                    Mma::load_b_kn(b, sm.pc[sx] + ks * 16 * Cfg::kLdK + nt * 8, Cfg::kLdK);
                    Mma::mma(acc, a, b);
                }
                float* part = p.ref_part[sx] + (bh.ih * p.slots + bh.slot) * p.n_m * p.nk;
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = ln.g + 8 * (e / 2), key = k0 + nt * 8 + 2 * ln.t + e % 2;
                    if (r >= ref_rows || key >= p.nk) continue;
                    float& dst = part[int64_t(p.r0 + r) * p.nk + key];
                    dst = first_block ? acc[e] : dst + acc[e];
                }
            }
        }
    }

    // The warp's rows of out, and its gen values added to the caller's buffers.
    __device__ void store_rows(int xw, const bool (&row_ok)[2], const float (&out)[kOutTiles][4],
                               const float (&gen_acc)[2][kGenTiles][4]) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int j = e / 2, x = xw + 8 * j;
            if (!row_ok[j]) continue;
            if (p.write_out) {
                T* o = static_cast<T*>(p.out) + bh.b * p.os.b + bh.h * p.os.h + x * p.os.n;
#pragma unroll
                for (int nt = 0; nt < kOutTiles; ++nt) {
                    const int c = nt * 8 + 2 * ln.t + e % 2;
                    if (c < p.dv) o[c * p.os.c] = from_float<T>(out[nt][e]);
                }
            }
#pragma unroll
            for (int sx = 0; sx < 2; ++sx) {
                if (!gen[sx]) continue;
                const Strides& gs = p.gen_s[sx];
                float* g = p.gen[sx] + bh.i * gs.b + bh.h * gs.h + x * gs.c;
#pragma unroll
                for (int pt = 0; pt < kGenTiles; ++pt) {
                    const int r = pt * 8 + 2 * ln.t + e % 2;
                    if (r < gen_rows) g[(p.r0 + r) * gs.n] += gen_acc[sx][pt][e] * p.u_scale[p.r0 + r];
                }
            }
        }
    }
};

template <class T, int D>
__global__ void __launch_bounds__(kThreads) main_pass(Params p) {
    MainBlock<T, D> blk(p);
    const LaneCoords& ln = blk.ln;
    for (int qb = blk.bh.first_block(p); qb < blk.bh.end_block(p); ++qb) {
        const int x0 = qb * kBlockQ, xw = x0 + 16 * ln.warp + ln.g;  // xw: the lane's first row
        const bool row_ok[2] = {xw < p.nq, xw + 8 < p.nq};
        __syncthreads();  // the previous run's readers of the Q and M tiles are done
        blk.load_query_block(x0);
        float lse_row[2], a[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            lse_row[j] = row_ok[j] ? p.lse_row[blk.bh.ih * p.nq + xw + 8 * j] : 0.f;
            a[j] = blk.c_from_p && row_ok[j] ? exp2f(lse_row[j] - p.head_shift[blk.bh.ih]) : 0.f;
        }
        float out[MainBlock<T, D>::kOutTiles][4] = {};
        float gen_acc[2][MainBlock<T, D>::kGenTiles][4] = {};  // [softmax][probe tile]

        for (int k0 = 0; k0 < p.nk; k0 += MainBlock<T, D>::kBlockK) {
            blk.load_key_block(k0);  // its previous readers finished before the last block barrier
            tiles_landed();          // also the Q and M tiles'; and the last key block's readers of P, C are done
            float s[MainBlock<T, D>::kTiles][4];
            warp_scores<T, D>(s, blk.sm.q + 16 * ln.warp * Tiles<T, D>::kLdD, blk.sm.k, k0, p);
            blk.write_softmaxes(s, row_ok, lse_row, a);
            __syncwarp();  // a warp reads back only its own rows of P and C here
            blk.add_row_products(out, gen_acc);
            __syncthreads();  // every warp's rows of P and C are in place; K, V, U readers are done
            blk.add_ref_products(k0, qb == blk.bh.first_block(p));
        }
        blk.store_rows(xw, row_ok, out, gen_acc);
    }
}

}  // namespace i2am
