// What the host hands to the kernels: problem, plan and workspace, plus block geometry.
#pragma once

#include <cstdint>

namespace i2am {

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kBlockQ = 16 * kWarps;  // query rows of a block: one 16-row mma tile per warp
constexpr int kProbeTile = 16;        // probe rows per main-pass launch: one mma M tile

// The two softmaxes (over keys and over queries), used to index per-softmax arrays.
enum Softmax { kOverKeys = 0 /* P */, kOverQueries = 1 /* C */ };

struct Strides { int64_t b, h, n, c; };  // elements, for (B, H, N, C) views

// sum_i 2^(s_i) = l * 2^m over a set of log2-domain scores; m = -inf (with l = 0) when empty.
struct MaxSum {
    float m, l;
};

struct Params {
    const void *q, *k, *v;
    void* out;
    Strides qs, ks, vs, os;
    bool q_vec, k_vec, v_vec;  // 16-byte loads allowed (unit column stride, aligned rows)
    int heads, nq, nk, d, dv;
    float scale_log2;          // scale * log2(e): scores live in the log2 domain
    const int64_t* record_idx;

    // Query blocks are split into `slots` runs of `blocks_per_slot`; block (slot, h, i) owns one
    // run, so per-slot partials have one writer and are reduced over slots in a fixed order.
    int slots, blocks_per_slot;

    float* lse_row;            // [Br][H][Nq]       log2-sum-exp2 of each query row
    MaxSum* col_part;          // [Br][H][slots][Nk] each key column over the slot's query rows
    float* lse_col;            // [Br][H][Nk]       merged over slots
    bool need_c;               // a map over the query softmax C is requested
    // C from P (main_pass.cuh): with c the head's largest lse_row, C[x,k] = P[x,k] a[x] b[k],
    // a[x] = 2^(lse_row[x] - c) <= 1, b[k] = 2^(c - lse_col[k]) <= 2^c_range, so whatever a, b
    // or P lose below float's 2^-126 is below 2^(c_range - 126) of a map value. A head whose
    // c - min lse_col exceeds c_range takes the direct exponential 2^(s - lse_col) instead.
    float c_range;
    float tiny;                // 2^-c_range (+inf for c_range < 0): row and column sums kept at a shared shift
    float* head_shift;         // [Br][H]      c
    int* from_p;               // [Br][H]      1 where C comes from P
    float* col_factor;         // [Br][H][Nk]  b where C comes from P

    const float* u;            // [Ru][Nk] key probes scattered to key indices, rows / u_scale
    const float* u_scale;      // [Ru]
    int n_u;                   // Ru, 0 without gen maps
    const float* m;            // [Rw][Nq] query probes, rows / m_scale
    int n_m;                   // Rw, 0 without ref maps

    float* gen[2];             // caller's gen_key (P) and gen_query (C) buffers, or null
    Strides gen_s[2];
    float* ref_part[2];        // [Br][H][slots][Rw][Nk] partial ref_key (P), ref_query (C), or null

    int r0;                    // first probe row handled by this main-pass launch
    bool write_out;            // only the first probe chunk writes out
};

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }
__host__ __device__ constexpr int round_up(int a, int b) { return ceil_div(a, b) * b; }

// Blocks of `threads` covering n elements, for the one-thread-per-element helper kernels.
constexpr int blocks_for(int64_t n, int threads) { return int((n + threads - 1) / threads); }

}  // namespace i2am
