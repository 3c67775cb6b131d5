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

1. stats_kernel: per query block, an online pass over the key tiles gives lse_row; when C is
   needed it also merges the block's column sums into the program's partial column statistics
   per key tile: one exponential at one shift per tile for the whole block, summed over keys for
   the rows and by an MMA over queries for the columns. Rows whose sums lost too much below
   float32's range at that shift are flagged; exact_lse_kernel redoes those (if any) with a
   shift per row.
2. col_lse_kernel: merges the n_splits partial column statistics into lse_col, in a fixed order,
   and flags the columns whose sums lost too much below float32's range; exact_lse_kernel, with
   the roles of q and k swapped, redoes those (if any) with their own exponential.
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

NEG = tl.constexpr(-1.0e30)  # a running max's start (log2 units): 2^(NEG - finite) == 0 without inf - inf
# an unscaled score of a masked key: -inf at any positive scale (-1e30 times a scale below 1e-28
# would be a few hundred bits or less, and 2^-14 of a masked key is no zero)
MASKED = tl.constexpr(float("-inf"))
RANGE = tl.constexpr(C_FROM_P_RANGE)  # log2 spread up to which C is taken from P (docstring above)
# the smallest column sum (at the stats pass's shift) kept; RANGE < 0 sends every column to exact_lse_kernel
TINY = tl.constexpr(2.0 ** -C_FROM_P_RANGE if C_FROM_P_RANGE >= 0 else float("inf"))
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

if INTERPRET:  # the CPU interpreter: one small config, no benchmarking
    CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
else:  # 8 warps keep the extra map accumulators out of local memory (sm_90 compile, fp16)
    CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
               for bm, bn, w in [(128, 64, 8), (128, 32, 8), (64, 64, 8), (64, 32, 8), (64, 64, 4), (64, 32, 4)]]
MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in CONFIGS)
MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in CONFIGS)
MAX_BLOCK_N = max(c.kwargs["BLOCK_N"] for c in CONFIGS)  # the main pass's own buffers are padded to its multiples
# exact_lse_kernel: usually a check of one query block or key tile, so one small config
EXACT_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4) if INTERPRET else dict(BLOCK_M=64, BLOCK_N=64, num_warps=4)
TUNE_MIN_NQ = 4096


def _prune(configs, named_args, **kwargs):
    """Head dims over 128 only fit narrow key tiles (registers and shared memory); the main pass
    only under 32 scores a thread, at d 80-128 only 32-key tiles at 8 warps (with both gen maps of
    one key probe: only 32-key tiles, 128-query blocks at d 80-128); below TUNE_MIN_NQ queries a
    call is too short to gain from tuning: the smallest tile. Calls are tuned once per power-of-two
    bucket of Nq (nq_bucket), and the choice is kept on disk."""
    args = {**named_args, **kwargs}
    head = max(args["D"], args.get("DV", 0))
    if head > 128:
        configs = [c for c in configs if c.kwargs["BLOCK_N"] <= 32] or configs
    if "DV" in args:  # main_kernel (sm_90a, bench/triton_sass.py): 32 scores a thread spill besides the
        # map accumulators, and at d 80-128 so do 64-key tiles and 4 warps with some map sets (at d 80
        # and 96 the default maps would fit 4 warps, but all four maps or two gen_key probes spill there)
        wide = 64 < head <= 128
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
def _heads(Q, K, REC, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, ALIGN: tl.constexpr):
    """Two tensors' (q and k, or v and out) base pointers of program row bh and their row strides,
    known aligned (_head, _aligned)."""
    return (_head(Q, REC, bh, H, sq_b, sq_h, ALIGN), _head(K, REC, bh, H, sk_b, sk_h, ALIGN),
            _aligned(sq_n, ALIGN), _aligned(sk_n, ALIGN))


@triton.jit
def _head_dim_tiles(base, idx, idx_ok, s_n, s_d, D, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr):
    """The (len(idx), D) rows idx of a q or v head as two tiles of power-of-two widths, head dims
    [0, BLOCK_D) and [BLOCK_D, BLOCK_D + BLOCK_D2) (BLOCK_D2 = 0: the first only; the second is
    then the first again, unused), so that d = 80 takes 64 + 16 columns instead of 128; rows not
    idx_ok and the padding read as 0."""
    dims = tl.arange(0, BLOCK_D)
    x = tl.load(base + idx[:, None] * s_n + dims[None, :] * s_d, mask=idx_ok[:, None] & (dims[None, :] < D), other=0.0)
    x2 = x
    if BLOCK_D2 > 0:
        dims2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        x2 = tl.load(base + idx[:, None] * s_n + dims2[None, :] * s_d, mask=idx_ok[:, None] & (dims2[None, :] < D),
                     other=0.0)
    return x, x2


@triton.jit
def _qk(q, q2, k_base, cols, key_ok, sk_n, sk_d, D, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """q k^T for one key tile (q in _head_dim_tiles' two tiles), not yet scaled (t = qk_scale q k^T):
    the callers fold the scale into the shift of their exponential, one FFMA a score. Keys where
    key_ok is false (past Nk) read as 0, the callers mask them; in a whole tile key_ok is a
    compile-time true (_key_mask) and the loads take no mask."""
    dims = tl.arange(0, BLOCK_D)
    kt = tl.load(k_base + cols[None, :] * sk_n + dims[:, None] * sk_d, mask=key_ok[None, :] & (dims[:, None] < D),
                 other=0.0)
    s = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if BLOCK_D2 > 0:
        dims2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        kt2 = tl.load(k_base + cols[None, :] * sk_n + dims2[:, None] * sk_d,
                      mask=key_ok[None, :] & (dims2[:, None] < D), other=0.0)
        s = tl.dot(q2, kt2, s, input_precision=DOT_PRECISION)
    return s


@triton.jit
def _key_mask(keys, n0, Nk, LAST: tl.constexpr):
    """Which keys of the tile at n0 exist: in the LAST tile (Nk not a multiple of BLOCK_N) those
    below Nk; in every other tile all, as a mask the compiler folds away (keys < BLOCK_N)."""
    return keys < (Nk - n0 if LAST else keys.numel)


@triton.jit
def _row_lse(q, q2, k_base, sk_n, sk_d, Nk, qk_scale, D, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
             DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """lse_row of one query block by an online pass over the key tiles, one shift per row: with
    running max m and sum l = sum 2^(t - m), a tile of row max r and row sums r_sum = sum 2^(t - r)
    gives m' = max(m, r) and l' = l 2^(m - m') + r_sum 2^(r - m')."""
    m_i = tl.full([q.shape[0]], NEG, tl.float32)
    l_i = tl.zeros([q.shape[0]], tl.float32)
    keys = tl.arange(0, BLOCK_N)
    for n0 in range(0, Nk, BLOCK_N):
        key_ok = n0 + keys < Nk
        s = _qk(q, q2, k_base, n0 + keys, key_ok, sk_n, sk_d, D, BLOCK_D, BLOCK_D2, DOT_PRECISION)
        s = tl.where(key_ok[None, :], s, MASKED)
        r_shift = tl.max(s, 1) * qk_scale  # qk_scale > 0: the row max of t
        r_sum = tl.sum(tl.exp2(s * qk_scale - r_shift[:, None]), 1)
        m_new = tl.maximum(m_i, r_shift)
        l_i = l_i * tl.exp2(m_i - m_new) + r_sum * tl.exp2(r_shift - m_new)
        m_i = m_new
    return m_i + tl.log2(l_i)


@triton.jit
def _stats_tile(q, q2, k_base, ones, m_b, l_i, seen, COL_MAX, COL_SUM, part, n0, keys, sk_n, sk_d, Nk, qk_scale, D,
                BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                LAST: tl.constexpr):
    """One key tile of stats_kernel's column statistics (derivation there): (m_b, l_i) updated, the
    program's column partial of the tile merged. Only the LAST tile masks keys (_key_mask)."""
    key_ok = _key_mask(keys, n0, Nk, LAST)
    cols = n0 + keys
    s = _qk(q, q2, k_base, cols, key_ok, sk_n, sk_d, D, BLOCK_D, BLOCK_D2, DOT_PRECISION)
    if LAST:
        s = tl.where(key_ok[None, :], s, MASKED)
    g = tl.max(s) * qk_scale
    p = tl.exp2(s * qk_scale - g)
    c_sum_t = tl.dot(ones, p, input_precision=DOT_PRECISION)
    at = part * Nk + cols[None, :] + tl.zeros([16, 1], tl.int32)
    c_ok = (tl.arange(0, 16) == 0)[:, None] & key_ok[None, :]
    tile = part * tl.cdiv(Nk, BLOCK_N) + n0 // BLOCK_N
    c_max = tl.where(seen, tl.load(COL_MAX + tile), NEG)
    c_sum = tl.where(seen, tl.load(COL_SUM + at, mask=c_ok, other=0.0), 0.0)
    c_new = tl.maximum(c_max, g)
    c_sum = c_sum * tl.exp2(c_max - c_new) + c_sum_t * tl.exp2(g - c_new)
    tl.store(COL_MAX + tile, c_new)
    tl.store(COL_SUM + at, c_sum, mask=c_ok)
    m_new = tl.maximum(m_b, g)
    l_i = l_i * tl.exp2(m_b - m_new) + tl.sum(p, 1) * tl.exp2(g - m_new)
    return m_new, l_i


@triton.autotune(configs=CONFIGS, key=["nq_bucket", "Nk", "D", "NEED_COL"],
                 prune_configs_by={"early_config_prune": _prune}, cache_results=True)
@triton.jit
def stats_kernel(Q, K, REC, LSE_ROW, COL_MAX, COL_SUM,
                 sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d,
                 H, Nq, Nk, nq_bucket, qk_scale, D: tl.constexpr, ALIGN: tl.constexpr,
                 NEED_COL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
                 DOT_PRECISION: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """lse_row, and with NEED_COL the program's partial column statistics: for each key tile one
    shift c_max (the largest tile maximum its query blocks have seen) and the column sums
    sum_x 2^(t[x, k] - c_max) over its query blocks."""
    split, bh = tl.program_id(0), tl.program_id(1)
    n_splits = tl.num_programs(0)
    q_base, k_base, sq_n, sk_n = _heads(Q, K, REC, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, ALIGN)
    keys = tl.arange(0, BLOCK_N)
    for qb in range(split, tl.cdiv(Nq, BLOCK_M), n_splits):
        rows = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < Nq
        q, q2 = _head_dim_tiles(q_base, rows, rows < Nq, sq_n, sq_d, D, BLOCK_D, BLOCK_D2)
        if NEED_COL:
            # One shift per tile for the whole block, g = the tile's largest t (rows past Nq read
            # q = 0, so t = 0 there: g stays an upper bound), serves the rows and the columns:
            # p = 2^(t - g) sums to the tile's row sums and, by one (16 x BLOCK_M) x (BLOCK_M x
            # BLOCK_N) product with the block's valid rows as ones in its first row, to its column
            # sums (a reduction on the tensor cores, not a second softmax). The rows merge at one
            # running shift m (l' = l 2^(m - m') + r_sum 2^(g - m')), the columns into the
            # program's partial at its tile shift. Only terms below float32's 2^-126 of 2^g are
            # lost: a row or a column whose sum ends below 2^-RANGE is flagged (+inf) and redone
            # exactly (exact_lse_kernel).
            ones = tl.where((tl.arange(0, 16) == 0)[:, None] & row_ok[None, :], 1.0, 0.0)
            m_b = NEG
            l_i = tl.zeros([BLOCK_M], tl.float32)
            seen = qb > split  # the program's first block starts afresh
            part = bh * n_splits + split  # the program's row of the column partials
            whole = Nk // BLOCK_N * BLOCK_N
            for n0 in range(0, whole, BLOCK_N):
                m_b, l_i = _stats_tile(q, q2, k_base, ones, m_b, l_i, seen, COL_MAX, COL_SUM, part, n0, keys, sk_n,
                                       sk_d, Nk, qk_scale, D, BLOCK_D, BLOCK_D2, DOT_PRECISION, BLOCK_N, False)
            if whole < Nk:
                m_b, l_i = _stats_tile(q, q2, k_base, ones, m_b, l_i, seen, COL_MAX, COL_SUM, part, whole, keys, sk_n,
                                       sk_d, Nk, qk_scale, D, BLOCK_D, BLOCK_D2, DOT_PRECISION, BLOCK_N, True)
            lse = tl.where(l_i >= TINY, m_b + tl.log2(l_i), float("inf"))
        else:
            lse = _row_lse(q, q2, k_base, sk_n, sk_d, Nk, qk_scale, D, BLOCK_D, BLOCK_D2, DOT_PRECISION, BLOCK_N)
        tl.store(LSE_ROW + bh * Nq + rows, lse, mask=row_ok)
        tl.debug_barrier()  # the next block re-reads the column partials stored by other threads


@triton.jit
def col_lse_kernel(COL_MAX, COL_SUM, LSE_COL, Nk, n_splits, TILE_N, BLOCK: tl.constexpr):
    """lse_col[k] = m + log2 S, S = sum_s l_s[k] 2^(m_s[k] - m), m = max_s m_s[k], where l_s are the
    partial column sums of split s at its shift m_s of k's key tile (TILE_N keys, the stats pass's
    BLOCK_N); the splits are summed in order. The terms the stats pass lost are below Nq 2^-126
    of 2^m, so S >= 2^-RANGE keeps them below Nq 2^(RANGE - 126) of the sum; a column with a
    smaller S gets lse_col = +inf, for exact_lse_kernel to redo."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < Nk
    at = tl.program_id(1) * n_splits * Nk + cols
    n_tiles = tl.cdiv(Nk, TILE_N)
    tile = tl.program_id(1) * n_splits * n_tiles + cols // TILE_N
    m = tl.full([BLOCK], NEG, tl.float32)
    for s in range(n_splits):
        m = tl.maximum(m, tl.load(COL_MAX + tile + s * n_tiles, mask=col_ok, other=NEG))
    total = tl.zeros([BLOCK], tl.float32)
    for s in range(n_splits):
        c_max = tl.load(COL_MAX + tile + s * n_tiles, mask=col_ok, other=NEG)
        total += tl.load(COL_SUM + at + s * Nk, mask=col_ok, other=1.0) * tl.exp2(c_max - m)
    lse = tl.where(total >= TINY, m + tl.log2(tl.maximum(total, 1.0e-38)), float("inf"))
    tl.store(LSE_COL + tl.program_id(1) * Nk + cols, lse, mask=col_ok)


@triton.jit
def exact_lse_kernel(A, B, REC, LSE, sa_b, sa_h, sa_n, sa_d, sb_b, sb_h, sb_n, sb_d, H, Na, Nb, qk_scale,
                     D: tl.constexpr, ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,
                     DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The entries of LSE flagged (+inf), if any in this block of BLOCK_M: lse[i] = log2 sum_j
    2^(qk_scale <a[i], b[j]>) from their own shift (_row_lse). With (A, B) = (q, k) that is lse_row
    of the rows the stats pass flagged, with (k, q) lse_col of the columns col_lse_kernel flagged; a
    rare path (scores all about RANGE bits below the shared shift), run only where needed."""
    bh = tl.program_id(1)
    idx = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = idx < Na
    lse = tl.load(LSE + bh * Na + idx, mask=ok, other=0.0)
    if tl.max(lse) == float("inf"):
        a_base, b_base, sa_n, sb_n = _heads(A, B, REC, bh, H, sa_b, sa_h, sa_n, sb_b, sb_h, sb_n, ALIGN)
        a, a2 = _head_dim_tiles(a_base, idx, ok, sa_n, sa_d, D, BLOCK_D, BLOCK_D2)
        exact = _row_lse(a, a2, b_base, sb_n, sb_d, Nb, qk_scale, D, BLOCK_D, BLOCK_D2, DOT_PRECISION, BLOCK_N)
        tl.store(LSE + bh * Na + idx, exact, mask=ok & (lse == float("inf")))


@triton.jit
def _pv(p, v_base, cols, col_ok, sv_n, sv_d, DV, acc, acc2, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
        DOT_PRECISION: tl.constexpr):
    """acc += P V over one key tile, V's head dims in two tiles as q's (_head_dim_tiles): acc2 holds
    [BLOCK_DV, BLOCK_DV + BLOCK_DV2) when BLOCK_DV2 > 0."""
    v, v2 = _head_dim_tiles(v_base, cols, col_ok, sv_n, sv_d, DV, BLOCK_DV, BLOCK_DV2)
    p = p.to(v.dtype)
    acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
    if BLOCK_DV2 > 0:
        acc2 = tl.dot(p, v2, acc2, input_precision=DOT_PRECISION)
    return acc, acc2


@triton.jit
def _store_out(o_base, acc, rows, first, so_n, so_d, Nq, DV, WIDTH: tl.constexpr):
    """out[rows, first:first + WIDTH] = acc (its columns below DV)."""
    vdims = first + tl.arange(0, WIDTH)
    tl.store(o_base + rows[:, None] * so_n + vdims[None, :] * so_d, acc.to(o_base.dtype.element_ty),
             mask=(rows[:, None] < Nq) & (vdims[None, :] < DV))


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
def _main_tile(acc, acc2, gen_key, gen_query, q, q2, k_base, v_base, U, ub_base, B, LSE_COL, RK, RQ, M, m_key,
               m_query, a, lse_row, from_p, n0, keys, rows, row_ok, probes, part_row, bh, sk_n, sk_d, sv_n, sv_d,
               su_k, Nq, Nk, nk_pad, Rw, qk_scale, D: tl.constexpr, DV: tl.constexpr, GEN_KEY: tl.constexpr,
               GEN_QUERY: tl.constexpr, REF_KEY: tl.constexpr, REF_QUERY: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr, BLOCK_R: tl.constexpr,
               ROWSUM: tl.constexpr, ONE_R: tl.constexpr, DOT_PRECISION: tl.constexpr, MAP_PRECISION: tl.constexpr,
               LAST: tl.constexpr):
    """main_kernel on the key tile at n0: (acc, acc2, gen_key, gen_query) updated, the ref partials
    added into. Only a LAST tile (Nk not a multiple of BLOCK_N) masks keys: in a whole tile the key
    mask folds away (_key_mask), and so does every select on P."""
    cols = n0 + keys
    key_ok = _key_mask(keys, n0, Nk, LAST)
    s = _qk(q, q2, k_base, cols, key_ok, sk_n, sk_d, D, BLOCK_D, BLOCK_D2, DOT_PRECISION)
    # lse_row is final, so P needs no rescaling: out = sum over tiles of P V. Keys past Nk (s = 0)
    # are masked: P = 2^-lse_row there can overflow, and inf * 0 is NaN in every consumer (v, U,
    # U b read 0 there; the ref partials' padded columns are never read).
    p = tl.exp2(s * qk_scale - lse_row[:, None])
    if LAST:
        p = tl.where(key_ok[None, :], p, 0.0)
    acc, acc2 = _pv(p, v_base, cols, key_ok, sv_n, sv_d, DV, acc, acc2, BLOCK_DV, BLOCK_DV2, DOT_PRECISION)
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
    return acc, acc2, gen_key, gen_query


@triton.autotune(configs=CONFIGS,
                 key=["nq_bucket", "Nk", "Ru", "Rw", "D", "DV", "GEN_KEY", "GEN_QUERY",
                      "REF_KEY", "REF_QUERY"],
                 prune_configs_by={"early_config_prune": _prune}, restore_value=["GK", "GQ"], cache_results=True)
@triton.jit
def main_kernel(Q, K, V, OUT, REC, LSE_ROW, LSE_COL, C_SHIFT, FROM_P, B, U, UB, M, GK, GQ, RK, RQ,
                sq_b, sq_h, sq_n, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
                so_b, so_h, so_n, so_d, su_k, sub_h, sgk_i, sgk_h, sgk_r, sgk_n, sgq_i, sgq_h, sgq_r, sgq_n,
                H, Nq, Nk, nk_pad, nq_bucket, Ru, Rw, qk_scale, D: tl.constexpr, DV: tl.constexpr, ALIGN: tl.constexpr,
                GEN_KEY: tl.constexpr, GEN_QUERY: tl.constexpr, REF_KEY: tl.constexpr,
                REF_QUERY: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_DV2: tl.constexpr,
                BLOCK_U: tl.constexpr, BLOCK_R: tl.constexpr, ROWSUM: tl.constexpr, ONE_R: tl.constexpr,
                DOT_PRECISION: tl.constexpr, MAP_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    split, bh = tl.program_id(0), tl.program_id(1)
    n_splits = tl.num_programs(0)
    q_base, k_base, sq_n, sk_n = _heads(Q, K, REC, bh, H, sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, ALIGN)
    v_base, o_base, sv_n, so_n = _heads(V, OUT, REC, bh, H, sv_b, sv_h, sv_n, so_b, so_h, so_n, ALIGN)
    i, h = bh // H, bh % H
    gk_base = GK + i * sgk_i + h * sgk_h
    gq_base = GQ + i * sgq_i + h * sgq_h
    ub_base = UB + bh * sub_h
    part_row = (bh * n_splits + split) * Rw
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
        q, q2 = _head_dim_tiles(q_base, rows, rows < Nq, sq_n, sq_d, D, BLOCK_D, BLOCK_D2)
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
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)  # out, head dims as in _head_dim_tiles
        acc2 = tl.zeros([BLOCK_M, BLOCK_DV2 if BLOCK_DV2 > 0 else BLOCK_DV], tl.float32)
        gen_key = tl.zeros([BLOCK_M, G_N], tl.float32)
        gen_query = tl.zeros([BLOCK_M, G_N], tl.float32)
        for n0 in range(0, Nk - Nk % BLOCK_N, BLOCK_N):  # the whole key tiles
            acc, acc2, gen_key, gen_query = _main_tile(
                acc, acc2, gen_key, gen_query, q, q2, k_base, v_base, U, ub_base, B, LSE_COL, RK, RQ, M, m_key,
                m_query, a, lse_row, from_p, n0, keys, rows, row_ok, probes, part_row, bh, sk_n, sk_d, sv_n, sv_d,
                su_k, Nq, Nk, nk_pad, Rw, qk_scale, D, DV, GEN_KEY, GEN_QUERY, REF_KEY, REF_QUERY, BLOCK_D, BLOCK_D2,
                BLOCK_DV, BLOCK_DV2, BLOCK_R, ROWSUM, ONE_R, DOT_PRECISION, MAP_PRECISION, False)
        for n0 in tl.range(Nk - Nk % BLOCK_N, Nk, BLOCK_N, num_stages=1):  # the last, if Nk % BLOCK_N
            acc, acc2, gen_key, gen_query = _main_tile(
                acc, acc2, gen_key, gen_query, q, q2, k_base, v_base, U, ub_base, B, LSE_COL, RK, RQ, M, m_key,
                m_query, a, lse_row, from_p, n0, keys, rows, row_ok, probes, part_row, bh, sk_n, sk_d, sv_n, sv_d,
                su_k, Nq, Nk, nk_pad, Rw, qk_scale, D, DV, GEN_KEY, GEN_QUERY, REF_KEY, REF_QUERY, BLOCK_D, BLOCK_D2,
                BLOCK_DV, BLOCK_DV2, BLOCK_R, ROWSUM, ONE_R, DOT_PRECISION, MAP_PRECISION, True)
        _store_out(o_base, acc, rows, 0, so_n, so_d, Nq, DV, BLOCK_DV)
        if BLOCK_DV2 > 0:
            _store_out(o_base, acc2, rows, BLOCK_DV, so_n, so_d, Nq, DV, BLOCK_DV2)
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
