"""Triton kernels of the fused I2AM attention; kernels/triton_backend.py launches them.

Notation, for one program row bh = (recorded entry i, head h); scores in base 2 so that every
exponential is one exp2 (the log2(e) factor is folded into the scale, as in Triton's
fused-attention tutorial):

    t[x, k]    = log2(e) * scale * <q[x], k[k]>
    lse_row[x] = log2 sum_k 2^t[x, k]        P[x, k] = 2^(t[x, k] - lse_row[x])   softmax over keys
    lse_col[k] = log2 sum_x 2^t[x, k]        C[x, k] = 2^(t[x, k] - lse_col[k])   softmax over queries

Queries come in blocks of BLOCK_M rows and keys in tiles of BLOCK_N. A grid row of
`n_splits` programs shares the query blocks of one bh (program s takes blocks s, s+n_splits,
...), so scratch that is kept per program is O(n_splits * Nk), never O(Nq * Nk).

1. stats_kernel: per query block, an online pass over the key tiles gives lse_row; per key
   tile it also merges the block's column sums into the program's partial column statistics
   (only when C is needed): the row exponentials at one shift per tile, summed by an MMA.
2. col_lse_kernel: merges the n_splits partial column statistics into lse_col, in a fixed order,
   and flags the columns whose sums lost too much below float32's range; col_exact_kernel redoes
   those (if any) with their own exponential.
3. main_kernel: recomputes t, now with exact P (C from P, below): out = P V; gen maps as P U^T, C U^T
   (U: key probes placed on their keys), kept in registers over the key tiles and added into
   the caller's buffer (every element belongs to one program); ref maps as M P, M C (M: query
   probes), added into the program's partial (one row of the scratch per program).
4. ref_reduce_kernel: sums the partials of the n_splits programs in a fixed order, gathers the
   reference keys and adds into the caller's buffer.

One exponential per score in each pass. C and P differ by a rank-one factor,
C[x, k] = P[x, k] 2^(lse_row[x] - lse_col[k]) = P[x, k] a[x] b[k] with a[x] = 2^(lse_row[x] - c),
b[k] = 2^(c - lse_col[k]) for any shift c, so the C maps are P reductions with rescaled probes:

    gen_query[r, x] = a[x] sum_k (U[r, k] b[k]) P[x, k]     ref_query[r, k] = b[k] sum_x (M[r, x] a[x]) P[x, k]

With c the head's largest lse_row, a <= 1, and b <= 2^RANGE as long as c - min_k lse_col <= RANGE;
then any term that a, b or P lose below float32's 2^-126 is below 2^(RANGE - 126) = 2^-46 of a map
value. c, b and U b are computed once per call (triton_backend._c_from_p); a head whose scores
spread wider takes the direct second exponential. The stats pass shares its exponential the same
way (derivation at its column sums).

No float atomics: every buffer element is written by exactly one program, and every cross-program
sum runs in a fixed order, so maps are bit-identical run after run (for a given autotune choice).
Every kernel pass is also idempotent for autotuning: the partial scratch of a program starts at its
first query block, and the autotuner restores the gen buffers that main_kernel adds into.
"""
import os

import triton
import triton.language as tl

from .torch_backend import C_FROM_P_RANGE

NEG = tl.constexpr(-1.0e30)  # the score of masked entries: 2^(NEG - finite) == 0 without inf - inf
RANGE = tl.constexpr(C_FROM_P_RANGE)  # log2 spread up to which C is taken from P (docstring above)
# the smallest column sum (at the stats pass's shift) kept; RANGE < 0 sends every column to col_exact_kernel
TINY = tl.constexpr(2.0 ** -C_FROM_P_RANGE if C_FROM_P_RANGE >= 0 else float("inf"))
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRET:  # the CPU interpreter: one small config, no benchmarking
    CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
else:  # 8 warps keep the extra map accumulators out of local memory (sm_90 compile, fp16)
    CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
               for bm, bn, w in [(128, 64, 8), (128, 32, 8), (64, 64, 8), (64, 32, 8), (64, 64, 4), (64, 32, 4)]]
MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in CONFIGS)
MAX_BLOCK_N = max(c.kwargs["BLOCK_N"] for c in CONFIGS)  # the main pass's own buffers are padded to its multiples
# col_exact_kernel: usually a check of one key tile, so one small config
EXACT_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4) if INTERPRET else dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
EXACT_BLOCK_N = EXACT_CONFIG["BLOCK_N"]
TUNE_MIN_NQ = 4096


def _prune(configs, named_args, **kwargs):
    """Head dims of 256 (160 padded) only fit narrow key tiles (registers and shared memory), the
    main pass only under 32 scores a thread, at d 80-128 only 32-key tiles at 8 warps (with both gen
    maps of one key probe: only 32-key tiles, 128-query blocks at d 80-128); below TUNE_MIN_NQ queries
    a call is too short to gain from tuning: the smallest tile. Calls
    are tuned once per power-of-two bucket of Nq (nq_bucket), and the choice is kept on disk."""
    args = {**named_args, **kwargs}
    if max(args["BLOCK_D"], args.get("BLOCK_DV", 0)) >= 256:
        configs = [c for c in configs if c.kwargs["BLOCK_N"] <= 32] or configs
    if "BLOCK_DV" in args:  # main_kernel (sm_90a, bench/triton_sass.py): 32 scores a thread spill besides the
        # map accumulators, and at d 80-128 so do 64-key tiles and 4 warps
        wide = max(args["BLOCK_D"], args["BLOCK_DV"]) == 128
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 1024 * c.num_warps and (
            not wide or c.kwargs["BLOCK_N"] <= 32 and c.num_warps == 8)] or configs
        if args["ROWSUM"] and args["GEN_KEY"] and args["GEN_QUERY"]:  # two gen tiles of running products:
            # 64-key tiles spill at d 40-64 too, and 64-query blocks at d 80-128
            configs = [c for c in configs if c.kwargs["BLOCK_N"] <= 32 and (c.kwargs["BLOCK_M"] == 128 or not wide)
                       ] or configs
    return configs if args["nq_bucket"] >= TUNE_MIN_NQ else configs[-1:]


@triton.jit
def _head(X, REC, bh, H, s_b, s_h, ALIGN: tl.constexpr):
    """Base pointer of head bh % H of the recorded batch entry REC[bh // H]. The launcher
    checked that the strides are multiples of ALIGN: said on the computed offset (a hint on
    the arguments themselves does not reach the loads), it lets them load ALIGN elements at once."""
    b = tl.load(REC + bh // H)
    return X + tl.multiple_of(b * s_b + (bh % H).to(tl.int64) * s_h, ALIGN)


@triton.jit
def _aligned(stride, ALIGN: tl.constexpr):
    """stride, known to the compiler as a multiple of ALIGN (which the launcher checked)."""
    return stride // ALIGN * ALIGN


@triton.jit
def _load_queries(q_base, rows, dims, sq_n, sq_d, Nq, D):
    """(BLOCK_M, BLOCK_D) query tile; masked rows and head-dim padding read as 0."""
    mask = (rows[:, None] < Nq) & (dims[None, :] < D)
    return tl.load(q_base + rows[:, None] * sq_n + dims[None, :] * sq_d, mask=mask, other=0.0)


@triton.jit
def _qk(q, k_base, cols, dims, sk_n, sk_d, Nk, D, DOT_PRECISION: tl.constexpr):
    """q k^T for one key tile, not yet scaled (t = qk_scale q k^T): the callers fold the scale
    into the shift of their exponential, one FFMA a score; keys past Nk read as 0, the callers mask them."""
    kt = tl.load(k_base + cols[None, :] * sk_n + dims[:, None] * sk_d,
                 mask=(cols[None, :] < Nk) & (dims[:, None] < D), other=0.0)
    return tl.dot(q, kt, input_precision=DOT_PRECISION)


@triton.autotune(configs=CONFIGS, key=["nq_bucket", "Nk", "BLOCK_D", "NEED_COL"],
                 prune_configs_by={"early_config_prune": _prune}, cache_results=True)
@triton.jit
def stats_kernel(Q, K, REC, LSE_ROW, COL_MAX, COL_SUM,
                 sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d,
                 H, Nq, Nk, nq_bucket, qk_scale, D: tl.constexpr, ALIGN: tl.constexpr,
                 NEED_COL: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    split, bh = tl.program_id(0), tl.program_id(1)
    n_splits = tl.num_programs(0)
    q_base = _head(Q, REC, bh, H, sq_b, sq_h, ALIGN)
    k_base = _head(K, REC, bh, H, sk_b, sk_h, ALIGN)
    sq_n, sk_n = _aligned(sq_n, ALIGN), _aligned(sk_n, ALIGN)
    dims = tl.arange(0, BLOCK_D)
    first = tl.arange(0, 16) == 0  # the row of the column-sum product that holds w
    for qb in range(split, tl.cdiv(Nq, BLOCK_M), n_splits):
        rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Nq
        q = _load_queries(q_base, rows, dims, sq_n, sq_d, Nq, D)
        # Online row log-sum-exp: with running max m and sum l = sum 2^(t - m), a tile whose
        # row sums are r_sum = sum 2^(t - r_shift) gives m' = max(m, r_shift) and
        # l' = l 2^(m - m') + r_sum 2^(r_shift - m'). The keys' (max, sum) merge the same way.
        m_i = tl.full([BLOCK_M], NEG, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        for n0 in range(0, Nk, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            s = tl.where((cols < Nk)[None, :], _qk(q, k_base, cols, dims, sk_n, sk_d, Nk, D, DOT_PRECISION), NEG)
            r_shift = tl.max(s, 1) * qk_scale  # qk_scale > 0: the row max of t
            p = tl.exp2(s * qk_scale - r_shift[:, None])
            r_sum = tl.sum(p, 1)
            if NEED_COL:
                # This block holds every row of (block, tile), so the tile's column sums are final
                # for the block. They come from the row exponentials at one shift per tile, g =
                # the largest row max: sum_x 2^(t - g) = sum_x w[x] p[x, k], w = 2^(r_shift - g),
                # one (16 x BLOCK_M) x (BLOCK_M x BLOCK_N) product with w in its first row (a
                # reduction on the tensor cores, not a second softmax). Only terms below float32's
                # 2^-126 are lost: col_lse_kernel flags the columns where that could matter.
                g = tl.max(tl.where(row_ok, r_shift, NEG))
                w = tl.exp2(tl.where(row_ok, r_shift - g, NEG))
                c_sum_t = tl.dot(tl.where(first[:, None], w[None, :], 0.0), p, input_precision=DOT_PRECISION)
                at = (bh * n_splits + split) * Nk + cols[None, :] + tl.zeros([16, 1], tl.int32)
                c_ok = first[:, None] & (cols[None, :] < Nk)
                seen = qb > split  # the program's first block starts afresh
                c_max = tl.where(seen, tl.load(COL_MAX + at, mask=c_ok, other=NEG), NEG)
                c_sum = tl.where(seen, tl.load(COL_SUM + at, mask=c_ok, other=0.0), 0.0)
                c_new = tl.maximum(c_max, g)
                c_sum = c_sum * tl.exp2(c_max - c_new) + c_sum_t * tl.exp2(g - c_new)
                tl.store(COL_MAX + at, c_new, mask=c_ok)
                tl.store(COL_SUM + at, c_sum, mask=c_ok)
            m_new = tl.maximum(m_i, r_shift)
            l_i = l_i * tl.exp2(m_i - m_new) + r_sum * tl.exp2(r_shift - m_new)
            m_i = m_new
        tl.store(LSE_ROW + bh * Nq + rows, m_i + tl.log2(l_i), mask=row_ok)
        tl.debug_barrier()  # the next block re-reads the column partials stored by other threads


@triton.jit
def col_lse_kernel(COL_MAX, COL_SUM, LSE_COL, Nk, n_splits, BLOCK: tl.constexpr):
    """lse_col[k] = m + log2 S, S = sum_s l_s[k] 2^(m_s[k] - m), m = max_s m_s[k], where (m_s, l_s)
    are the partial (max, sum) of split s; the splits are summed in order. The terms the stats
    pass lost are below Nq 2^-126 of 2^m, so S >= 2^-RANGE keeps them below Nq 2^(RANGE - 126)
    of the sum; a column with a smaller S gets lse_col = +inf, for col_exact_kernel to redo."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < Nk
    at = tl.program_id(1) * n_splits * Nk + cols
    m = tl.full([BLOCK], NEG, tl.float32)
    for s in range(n_splits):
        m = tl.maximum(m, tl.load(COL_MAX + at + s * Nk, mask=col_ok, other=NEG))
    total = tl.zeros([BLOCK], tl.float32)
    for s in range(n_splits):
        c_max = tl.load(COL_MAX + at + s * Nk, mask=col_ok, other=NEG)
        total += tl.load(COL_SUM + at + s * Nk, mask=col_ok, other=1.0) * tl.exp2(c_max - m)
    lse = tl.where(total >= TINY, m + tl.log2(tl.maximum(total, 1.0e-38)), float("inf"))
    tl.store(LSE_COL + tl.program_id(1) * Nk + cols, lse, mask=col_ok)


@triton.jit
def col_exact_kernel(Q, K, REC, LSE_COL, sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, H, Nq, Nk, qk_scale,
                     D: tl.constexpr, ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The columns col_lse_kernel flagged (+inf), if any in this key tile: lse_col from their own
    online (max, sum) over every query, a second exponential per score; a rare path (columns
    whose scores all lie about RANGE bits below a row's largest), run only where needed."""
    bh = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < Nk
    lse = tl.load(LSE_COL + bh * Nk + cols, mask=col_ok, other=0.0)
    if tl.max(lse) == float("inf"):
        q_base = _head(Q, REC, bh, H, sq_b, sq_h, ALIGN)
        k_base = _head(K, REC, bh, H, sk_b, sk_h, ALIGN)
        sq_n, sk_n = _aligned(sq_n, ALIGN), _aligned(sk_n, ALIGN)
        dims = tl.arange(0, BLOCK_D)
        c_max = tl.full([BLOCK_N], NEG, tl.float32)
        c_sum = tl.zeros([BLOCK_N], tl.float32)
        for qb in range(0, tl.cdiv(Nq, BLOCK_M)):
            rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
            q = _load_queries(q_base, rows, dims, sq_n, sq_d, Nq, D)
            t = tl.where((rows < Nq)[:, None] & col_ok[None, :],
                         _qk(q, k_base, cols, dims, sk_n, sk_d, Nk, D, DOT_PRECISION) * qk_scale, NEG)
            c_new = tl.maximum(c_max, tl.max(t, 0))
            c_sum = c_sum * tl.exp2(c_max - c_new) + tl.sum(tl.exp2(t - c_new[None, :]), 0)
            c_max = c_new
        tl.store(LSE_COL + bh * Nk + cols, c_max + tl.log2(c_sum), mask=col_ok & (lse == float("inf")))


@triton.jit
def _add_gen(g_base, acc, rows, probes, sg_r, sg_n, Nq, Ru):
    """g[r, x] += acc[x, r] for this block's rows: only this program touches them."""
    ptrs = g_base + rows[:, None] * sg_n + probes[None, :] * sg_r
    mask = (rows[:, None] < Nq) & (probes[None, :] < Ru)
    tl.store(ptrs, tl.load(ptrs, mask=mask, other=0.0) + acc, mask=mask)


@triton.jit
def _load_probe_rows(M, probes, rows, Nq, Rw):
    """(BLOCK_R, BLOCK_M) query-probe weights of this block's rows."""
    return tl.load(M + probes[:, None] * Nq + rows[None, :], mask=(probes[:, None] < Rw) & (rows[None, :] < Nq),
                   other=0.0)


@triton.jit
def _add_ref_block(PART, m, w, b, probes, cols, part_row, nk_pad, Rw,
                   MAP_PRECISION: tl.constexpr, SCALED: tl.constexpr):
    """PART[r, k] += b[k] sum_x m[r, x] w[x, k] for one block of probes (b only if SCALED; m
    then carries the row factor a). The partials' rows are padded to nk_pad keys: no key mask."""
    ptrs = PART + (part_row + probes[:, None]) * nk_pad + cols[None, :]
    mask = probes[:, None] < Rw
    acc = tl.load(ptrs, mask=mask)
    if SCALED:
        acc += tl.dot(m, w, input_precision=MAP_PRECISION) * b[None, :]
    elif m.dtype == tl.float16:  # P in [0, 1] and the probe rows scaled to [-1, 1]
        acc = tl.dot(m, w.to(tl.float16), acc)
    else:
        acc = tl.dot(m, w, acc, input_precision=MAP_PRECISION)
    tl.store(ptrs, acc, mask=mask)


@triton.jit
def _add_ref(PART, M, m, w, a, b, rows, cols, part_row, Nq, nk_pad, Rw, BLOCK_R: tl.constexpr,
             ONE_R: tl.constexpr, MAP_PRECISION: tl.constexpr, SCALED: tl.constexpr):
    """PART[r, k] += b[k] sum_x M[r, x] a[x] w[x, k] over this block's rows (a, b only if SCALED).
    ONE_R: every probe in one block, m (its rows, times a if SCALED) loaded once per query block;
    else BLOCK_R probes at a time, loaded here."""
    if ONE_R:
        _add_ref_block(PART, m, w, b, tl.arange(0, BLOCK_R), cols, part_row, nk_pad, Rw, MAP_PRECISION, SCALED)
    else:
        for r0 in range(0, Rw, BLOCK_R):
            probes = r0 + tl.arange(0, BLOCK_R)
            mr = _load_probe_rows(M, probes, rows, Nq, Rw)
            if SCALED:
                mr = mr.to(tl.float32) * a[None, :]
            _add_ref_block(PART, mr, w, b, probes, cols, part_row, nk_pad, Rw, MAP_PRECISION, SCALED)


@triton.jit
def _zero_ref(PART, part_row, nk_pad, Rw, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Zeroes the program's rows of a ref partial before its first query block, so that every
    key tile after adds into it without asking whether it is the first."""
    probes = tl.arange(0, BLOCK_R)
    for r0 in range(0, Rw, BLOCK_R):
        for n0 in range(0, nk_pad, BLOCK_N):
            ptrs = PART + (part_row + r0 + probes[:, None]) * nk_pad + n0 + tl.arange(0, BLOCK_N)[None, :]
            tl.store(ptrs, tl.zeros([BLOCK_R, BLOCK_N], tl.float32), mask=r0 + probes[:, None] < Rw)


@triton.jit
def _key_probes(U, n0, keys, probes, su_k, ROWSUM: tl.constexpr):
    """U^T tile (BLOCK_N, BLOCK_U) of the key tile at n0: key probes on their keys, zero on the
    other keys; with one probe (ROWSUM) just its (BLOCK_N,) column, from a base at the tile's start
    (fewer address instructions). U is zero-padded to whole key tiles and probe blocks
    (triton_backend._probes_on_keys): no mask."""
    if ROWSUM:
        u = tl.load(U + n0 * su_k + keys * su_k)
    else:  # (computed from the keys: offsets hoisted out of the key loop would hold registers)
        u = tl.load(U + (n0 + keys)[:, None] * su_k + probes[None, :])
    return u


@triton.jit
def _gen_update(g, w, u, ROWSUM: tl.constexpr, MAP_PRECISION: tl.constexpr):
    """g[x, r] += sum_k w[x, k] u[k, r] over one key tile: an MMA, or with one probe (ROWSUM)
    instead of a product padded to 16 probes, g is a (BLOCK_M, BLOCK_N) tile of running products,
    one FFMA a score, summed over its row once per query block (_gen_final), not across lanes every tile."""
    if ROWSUM:
        g += w * u[None, :]
    else:
        g = tl.dot(w, u, g, input_precision=MAP_PRECISION)
    return g


@triton.jit
def _gen_final(g, probes, ROWSUM: tl.constexpr):
    """The (BLOCK_M, BLOCK_U) gen accumulator of a query block (ROWSUM: its row sums in column 0)."""
    if ROWSUM:
        g = tl.where(probes[None, :] == 0, tl.sum(g, 1)[:, None], 0.0)
    return g


@triton.jit
def _main_tile(acc, gen_key, gen_query, q, k_base, v_base, U, ub_base, B, LSE_COL, RK, RQ, M, m_key, m_query, a,
               lse_row, from_p, n0, keys, rows, row_ok, dims, vdims, probes, part_row, bh, sk_n, sk_d, sv_n, sv_d,
               su_k, Nq, Nk, nk_pad, Rw, qk_scale, D: tl.constexpr, DV: tl.constexpr, GEN_KEY: tl.constexpr,
               GEN_QUERY: tl.constexpr, REF_KEY: tl.constexpr, REF_QUERY: tl.constexpr, BLOCK_R: tl.constexpr,
               ROWSUM: tl.constexpr, ONE_R: tl.constexpr, DOT_PRECISION: tl.constexpr, MAP_PRECISION: tl.constexpr,
               LAST: tl.constexpr):
    """main_kernel on the key tile at n0: (acc, gen_key, gen_query) updated, the ref partials added
    into. Only a LAST tile (Nk not a multiple of BLOCK_N) masks keys: in a whole tile the key mask
    (keys < BLOCK_N) folds away, and so does every select on P."""
    cols = n0 + keys
    key_ok = keys < (Nk - n0 if LAST else keys.numel)
    kt = tl.load(k_base + cols[None, :] * sk_n + dims[:, None] * sk_d, mask=key_ok[None, :] & (dims[:, None] < D),
                 other=0.0)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)  # t = qk_scale s, folded into the exponential's shift
    # lse_row is final, so P needs no rescaling: out = sum over tiles of P V. Keys past Nk (s = 0)
    # are masked: P = 2^-lse_row there can overflow, and inf * 0 is NaN in every consumer (v, U,
    # U b read 0 there; the ref partials' padded columns are never read).
    p = tl.exp2(s * qk_scale - lse_row[:, None])
    if LAST:
        p = tl.where(key_ok[None, :], p, 0.0)
    v = tl.load(v_base + cols[:, None] * sv_n + vdims[None, :] * sv_d,
                mask=key_ok[:, None] & (vdims[None, :] < DV), other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    if GEN_KEY:  # gen_key[r, x] = sum_k U[r, k] P[x, k]
        ut = _key_probes(U, n0, keys, probes, su_k, ROWSUM)
        gen_key = _gen_update(gen_key, p, ut, ROWSUM, MAP_PRECISION)
    if REF_KEY:  # ref_key[r, k] = sum_x M[r, x] P[x, k]
        _add_ref(RK, M, m_key, p, None, None, rows, cols, part_row, Nq, nk_pad, Rw,
                 BLOCK_R, ONE_R, MAP_PRECISION, False)
    if GEN_QUERY or REF_QUERY:
        # C = P a b (then w = P), else C = 2^(t - lse_col) directly (w = C, a = b = 1);
        # rows past Nq get a = 0 or a zeroed C (their t is not a real score)
        if from_p:
            w = p
        else:
            lse_col = tl.load(LSE_COL + bh * Nk + cols, mask=key_ok, other=0.0)
            w = tl.where(row_ok[:, None] & key_ok[None, :], tl.exp2(s * qk_scale - lse_col[None, :]), 0.0)
        if GEN_QUERY:  # gen_query = a * (w (U b)^T): U b precomputed per call, a once per block
            ubt = _key_probes(ub_base, n0, keys, probes, su_k, ROWSUM)
            gen_query = _gen_update(gen_query, w, ubt, ROWSUM, MAP_PRECISION)
        if REF_QUERY:
            b = tl.load(B + bh * nk_pad + cols)
            _add_ref(RQ, M, m_query, w, a, b, rows, cols, part_row, Nq, nk_pad, Rw,
                     BLOCK_R, ONE_R, MAP_PRECISION, True)
    return acc, gen_key, gen_query


@triton.autotune(configs=CONFIGS,
                 key=["nq_bucket", "Nk", "Ru", "Rw", "BLOCK_D", "BLOCK_DV", "GEN_KEY", "GEN_QUERY",
                      "REF_KEY", "REF_QUERY"],
                 prune_configs_by={"early_config_prune": _prune}, restore_value=["GK", "GQ"], cache_results=True)
@triton.jit
def main_kernel(Q, K, V, OUT, REC, LSE_ROW, LSE_COL, C_SHIFT, FROM_P, B, U, UB, M, GK, GQ, RK, RQ,
                sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                so_b, so_h, so_n, so_d, su_k, sub_h, sgk_i, sgk_h, sgk_r, sgk_n, sgq_i, sgq_h, sgq_r, sgq_n,
                H, Nq, Nk, nk_pad, nq_bucket, Ru, Rw, qk_scale, D: tl.constexpr, DV: tl.constexpr, ALIGN: tl.constexpr,
                GEN_KEY: tl.constexpr, GEN_QUERY: tl.constexpr, REF_KEY: tl.constexpr,
                REF_QUERY: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_U: tl.constexpr, BLOCK_R: tl.constexpr, ROWSUM: tl.constexpr, ONE_R: tl.constexpr,
                DOT_PRECISION: tl.constexpr, MAP_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    split, bh = tl.program_id(0), tl.program_id(1)
    n_splits = tl.num_programs(0)
    q_base = _head(Q, REC, bh, H, sq_b, sq_h, ALIGN)
    k_base = _head(K, REC, bh, H, sk_b, sk_h, ALIGN)
    v_base = _head(V, REC, bh, H, sv_b, sv_h, ALIGN)
    o_base = _head(OUT, REC, bh, H, so_b, so_h, ALIGN)
    sq_n, sk_n = _aligned(sq_n, ALIGN), _aligned(sk_n, ALIGN)
    sv_n, so_n = _aligned(sv_n, ALIGN), _aligned(so_n, ALIGN)
    i, h = bh // H, bh % H
    gk_base = GK + i * sgk_i + h * sgk_h
    gq_base = GQ + i * sgq_i + h * sgq_h
    ub_base = UB + bh * sub_h
    part_row = (bh * n_splits + split) * Rw
    dims = tl.arange(0, BLOCK_D)
    vdims = tl.arange(0, BLOCK_DV)
    probes = tl.arange(0, BLOCK_U)
    keys = tl.arange(0, BLOCK_N)  # offsets within a key tile
    G_N: tl.constexpr = BLOCK_N if ROWSUM else BLOCK_U  # the gen accumulators' width (_gen_update)
    from_p = True  # the head's shift c and whether C comes from P (module docstring), if C is needed
    if GEN_QUERY or REF_QUERY:
        c = tl.load(C_SHIFT + bh)
        from_p = tl.load(FROM_P + bh) != 0
    if REF_KEY:
        _zero_ref(RK, part_row, nk_pad, Rw, BLOCK_R, BLOCK_N)
    if REF_QUERY:
        _zero_ref(RQ, part_row, nk_pad, Rw, BLOCK_R, BLOCK_N)
    tl.debug_barrier()  # the key tiles read the zeros other threads stored
    for qb in range(split, tl.cdiv(Nq, BLOCK_M), n_splits):
        rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Nq
        q = _load_queries(q_base, rows, dims, sq_n, sq_d, Nq, D)
        lse_row = tl.load(LSE_ROW + bh * Nq + rows, mask=row_ok, other=0.0)
        a = 0.0  # the rows' factor of C, if C is needed
        if GEN_QUERY or REF_QUERY:
            a = tl.exp2(tl.where(from_p, tl.where(row_ok, lse_row - c, NEG), 0.0))
        m_key = 0.0  # the query-probe rows of this block when ONE_R: loaded once for all its key tiles
        m_query = 0.0
        if ONE_R:
            m_key = _load_probe_rows(M, tl.arange(0, BLOCK_R), rows, Nq, Rw)
            if REF_QUERY:
                m_query = m_key.to(tl.float32) * a[None, :]
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        gen_key = tl.zeros([BLOCK_M, G_N], tl.float32)
        gen_query = tl.zeros([BLOCK_M, G_N], tl.float32)
        for n0 in range(0, Nk - Nk % BLOCK_N, BLOCK_N):  # the whole key tiles
            acc, gen_key, gen_query = _main_tile(
                acc, gen_key, gen_query, q, k_base, v_base, U, ub_base, B, LSE_COL, RK, RQ, M, m_key, m_query, a,
                lse_row, from_p, n0, keys, rows, row_ok, dims, vdims, probes, part_row, bh, sk_n, sk_d, sv_n, sv_d,
                su_k, Nq, Nk, nk_pad, Rw, qk_scale, D, DV, GEN_KEY, GEN_QUERY, REF_KEY, REF_QUERY, BLOCK_R, ROWSUM,
                ONE_R, DOT_PRECISION, MAP_PRECISION, False)
        for n0 in tl.range(Nk - Nk % BLOCK_N, Nk, BLOCK_N, num_stages=1):  # the last, if Nk % BLOCK_N
            acc, gen_key, gen_query = _main_tile(
                acc, gen_key, gen_query, q, k_base, v_base, U, ub_base, B, LSE_COL, RK, RQ, M, m_key, m_query, a,
                lse_row, from_p, n0, keys, rows, row_ok, dims, vdims, probes, part_row, bh, sk_n, sk_d, sv_n, sv_d,
                su_k, Nq, Nk, nk_pad, Rw, qk_scale, D, DV, GEN_KEY, GEN_QUERY, REF_KEY, REF_QUERY, BLOCK_R, ROWSUM,
                ONE_R, DOT_PRECISION, MAP_PRECISION, True)
        tl.store(o_base + rows[:, None] * so_n + vdims[None, :] * so_d, acc.to(OUT.dtype.element_ty),
                 mask=row_ok[:, None] & (vdims[None, :] < DV))
        if GEN_KEY:
            _add_gen(gk_base, _gen_final(gen_key, probes, ROWSUM), rows, probes, sgk_r, sgk_n, Nq, Ru)
        if GEN_QUERY:
            gen_query = _gen_final(gen_query, probes, ROWSUM) * a[:, None]
            _add_gen(gq_base, gen_query, rows, probes, sgq_r, sgq_n, Nq, Ru)
        tl.debug_barrier()  # the next block re-reads the ref partials stored by other threads


@triton.jit
def ref_reduce_kernel(PART, REF_IDX, M_SCALE, BUF, sb_i, sb_h, sb_r, sb_k, H, Rw, Kr, nk_pad, n_splits,
                      BLOCK: tl.constexpr):
    """buf[i, h, r, j] += m_scale[r] sum_s PART[bh, s, r, ref_idx[j]], splits summed in order
    (PART's rows padded to nk_pad keys)."""
    j = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    r, bh = tl.program_id(1), tl.program_id(2)
    j_ok = j < Kr
    key = tl.load(REF_IDX + j, mask=j_ok, other=0)
    total = tl.zeros([BLOCK], tl.float32)
    for s in range(n_splits):
        total += tl.load(PART + ((bh * n_splits + s) * Rw + r) * nk_pad + key, mask=j_ok, other=0.0)
    ptrs = BUF + (bh // H) * sb_i + (bh % H) * sb_h + r * sb_r + j * sb_k
    tl.store(ptrs, tl.load(ptrs, mask=j_ok, other=0.0) + total * tl.load(M_SCALE + r), mask=j_ok)
