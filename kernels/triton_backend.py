"""Fused Triton backend: attention plus streamed I2AM maps, never an (Nq x Nk) tensor.

Passes (kernels and their derivation in triton_kernels.py), per recorded entry and head:
  1. statistics over query blocks: the row log-sum-exp (softmax over keys) and, only when
     gen_query/ref_query are requested, per-program partial column (max, sum-exp) statistics;
  2. only then, exact passes over the (rare) rows whose sums fell below float32's range at the
     stats pass's shared shift, a fixed-order reduction of the partials to the column
     log-sum-exp, and an exact pass over the (rare) columns whose partial sums did;
  3. the main pass: out = P V, gen maps added straight into their buffers, ref maps into
     per-program partials;
  4. a fixed-order reduction of the ref partials, gathered at the reference keys and added.
A grid row holds `splits` programs per (entry, head); extra memory is the row lse plus
O(splits * Nk * (2 + Rw)) floats per (entry, head), independent of Nq * Nk.
"""
import contextlib
import math
import weakref

import torch
import triton

from . import torch_backend
from .triton_kernels import (EXACT_CONFIG, MAX_BLOCK_N, MIN_BLOCK_M, MIN_BLOCK_N, col_lse_kernel, exact_lse_kernel,
                             main_kernel, ref_reduce_kernel, stats_kernel)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_PROBES = 64  # probes one launch reduces: gen maps keep (BLOCK_M, probes) accumulators
REDUCE_BLOCK = 128
PROGRAMS_PER_SM = 2
SCRATCH_BYTES = 32 * 2**20  # cap on the per-program partials: fewer splits beyond it


def run(q, k, v, out, maps, *, scale, ref_idx, record_idx, key_probes, query_probes, splits=None):
    """The backend contract of kernels/api.py; `splits` programs share one head's query blocks."""
    if q.dtype not in DTYPES:  # float64: the streaming torch backend (it computes in float32 too)
        return torch_backend.run(q, k, v, out, maps, scale=scale, ref_idx=ref_idx, record_idx=record_idx,
                                 key_probes=key_probes, query_probes=query_probes)
    # the kernels read indices and probe rows flat: strided views (a slice's step) as contiguous copies
    ref_idx, record_idx, key_probes, query_probes = (t.contiguous() for t in (ref_idx, record_idx, key_probes,
                                                                                query_probes))
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():  # launch on q's GPU
        _launch(q, k, v, out, maps, scale, ref_idx, record_idx, key_probes, query_probes, splits)


def _launch(q, k, v, out, maps, scale, ref_idx, record_idx, key_probes, query_probes, splits):
    H, Nq, d = q.shape[1:]
    Nk, dv = k.shape[2], v.shape[3]
    Ru, Rw = key_probes.shape[0], query_probes.shape[0]
    BH = record_idx.numel() * H
    need_col = "gen_query" in maps or "ref_query" in maps
    refs = [n for n in ("ref_key", "ref_query") if n in maps]
    gens = [n for n in ("gen_key", "gen_query") if n in maps]
    Nk_pad = _padded_keys(Nk)
    # The scratch holds the splits of the smallest query block; a launch takes as many as its
    # config's BLOCK_M needs (split_count), and the reductions read the count the chosen config used.
    split_count = _split_counter(splits, Nq, Nk_pad, BH, Rw * len(refs) + 2 * need_col, q.device)
    most = split_count(MIN_BLOCK_M)
    f32 = {"device": q.device, "dtype": torch.float32}
    fp32_dots = "ieee" if q.dtype == torch.float32 else "tf32"
    shared = {"H": H, "Nq": Nq, "Nk": Nk, "nq_bucket": triton.next_power_of_2(Nq), "D": d,
              "qk_scale": scale * math.log2(math.e), "ALIGN": _alignment(q, k, v, out),
              "DOT_PRECISION": fp32_dots}
    shared["BLOCK_D"], shared["BLOCK_D2"] = head_tiles(d)

    def grid(meta):
        return split_count(meta["BLOCK_M"]), BH

    lse_row = torch.empty(BH, Nq, **f32)
    unused = lse_row  # the pointer passed for disabled inputs and outputs, never touched
    col_max = col_sum = lse_col = unused
    if need_col:  # partial column sums, and one shift per key tile of each
        col_max = torch.empty(BH, most, triton.cdiv(Nk, MIN_BLOCK_N), **f32)
        col_sum = torch.empty(BH, most, Nk, **f32)
        lse_col = torch.empty(BH, Nk, **f32)
    stats_kernel[grid](q, k, record_idx, lse_row, col_max, col_sum, *q.stride(), *k.stride(),
                       NEED_COL=need_col, **shared)
    if need_col:
        exact = {n: shared[n] for n in ("H", "qk_scale", "D", "ALIGN", "BLOCK_D", "BLOCK_D2", "DOT_PRECISION")}
        # the rows, then the columns, whose sums the stats pass's shared shifts lost
        exact_lse_kernel[(triton.cdiv(Nq, EXACT_CONFIG["BLOCK_M"]), BH)](
            q, k, record_idx, lse_row, *q.stride(), *k.stride(), Na=Nq, Nb=Nk, **exact, **EXACT_CONFIG)
        col_lse_kernel[(triton.cdiv(Nk, REDUCE_BLOCK), BH)](
            col_max, col_sum, lse_col, Nk, _used(stats_kernel, split_count),
            stats_kernel.best_config.kwargs["BLOCK_N"], BLOCK=REDUCE_BLOCK)
        exact_lse_kernel[(triton.cdiv(Nk, EXACT_CONFIG["BLOCK_M"]), BH)](
            k, q, record_idx, lse_col, *k.stride(), *q.stride(), Na=Nk, Nb=Nq, **exact, **EXACT_CONFIG)

    partials = {n: torch.empty(BH, most, Rw, Nk_pad, **f32) for n in refs}
    M, m_scale = (_cached((query_probes,), q.dtype, lambda: _query_probes(query_probes, q.dtype)) if refs
                  else (unused, unused))
    U = _cached((key_probes, ref_idx), Nk, lambda: _probes_on_keys(key_probes, ref_idx, Nk_pad)) if gens else unused
    c_shift = from_p = b = UB = unused
    if need_col:
        c_shift, from_p, b = _c_from_p(lse_row, lse_col, Nk_pad)
        if "gen_query" in maps:
            UB = U * b[:, :, None]  # (BH, Nk_pad, U's width): the gen_query probes rescaled once per call
    block_r = _pow2(min(Rw, MAX_PROBES))
    dv_tiles = head_tiles(dv)
    for a in range(0, Ru if gens else 1, MAX_PROBES):  # one launch unless over MAX_PROBES key probes
        n_u = min(Ru - a, MAX_PROBES)
        gk, gq = (maps[n][:, :, a:a + n_u] if n in maps else None for n in ("gen_key", "gen_query"))
        rk, rq = (partials.get(n) if a == 0 else None for n in ("ref_key", "ref_query"))
        main_kernel[grid](
            q, k, v, out, record_idx, lse_row, lse_col, c_shift, from_p, b, U[:, a:] if gens else U,
            UB[:, :, a:] if gq is not None else UB, M, *(unused if t is None else t for t in (gk, gq, rk, rq)),
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), U.stride(0), UB.stride(0) if gq is not None else 0,
            *_strides(gk), *_strides(gq), nk_pad=Nk_pad, DV=dv, Ru=n_u, Rw=Rw,
            GEN_KEY=gk is not None, GEN_QUERY=gq is not None, REF_KEY=rk is not None, REF_QUERY=rq is not None,
            BLOCK_DV=dv_tiles[0], BLOCK_DV2=dv_tiles[1], BLOCK_U=_pow2(n_u), BLOCK_R=block_r, ROWSUM=n_u == 1,
            ONE_R=Rw <= block_r,
            MAP_PRECISION=fp32_dots, **shared)

    Kr = ref_idx.numel()
    for name, part in partials.items():
        buf = maps[name]
        ref_reduce_kernel[(triton.cdiv(Kr, REDUCE_BLOCK), Rw, BH)](
            part, ref_idx, m_scale, buf, *buf.stride(), H, Rw, Kr, Nk_pad, _used(main_kernel, split_count),
            BLOCK=REDUCE_BLOCK)


_CONSTANTS = {}  # ids of the tensors a value is built from, and what -> (their weak references, versions, value)


def _cached(tensors, what, build):
    """build(), kept while `tensors` live unchanged: the probes of a kept MapsCall (a recorder's
    layer) are scaled and placed once, not on every call. An in-place change of one of them (its
    version counter) rebuilds; the entry goes when one of them is freed."""
    key = (*map(id, tensors), what)
    hit = _CONSTANTS.get(key)
    if hit is not None and all(r() is t and n == t._version for r, n, t in zip(*hit[:2], tensors)):
        return hit[2]
    value = build()
    drop = lambda _, table=_CONSTANTS: table.pop(key, None)  # noqa: E731  (table: still there at exit)
    _CONSTANTS[key] = ([weakref.ref(t, drop) for t in tensors], [t._version for t in tensors], value)
    return value


def _used(kernel, split_count):
    """The programs per head of the launch just made: from the config the autotuner chose."""
    return split_count(kernel.best_config.kwargs["BLOCK_M"])


def _c_from_p(lse_row, lse_col, Nk_pad):
    """Per (entry, head): the shift c (the largest lse_row), whether C comes from P there
    (c - min lse_col <= RANGE, triton_kernels' docstring) and b[k] = 2^(c - lse_col[k]) where it
    does, 1 elsewhere: the C-probe rescaling, once per call instead of per key tile; b padded
    with zeros to Nk_pad keys."""
    c = lse_row.amax(1)
    from_p = c - lse_col.amin(1) <= torch_backend.C_FROM_P_RANGE
    b = torch.where(from_p[:, None], torch.exp2(c[:, None] - lse_col), 1.0)
    return c, from_p.int(), torch.nn.functional.pad(b, (0, Nk_pad - lse_col.shape[1]))


def _query_probes(query_probes, dtype):
    """(M, m_scale) with query_probes = m_scale[:, None] * M. For fp16/bf16 calls M holds fp16
    rows scaled to [-1, 1]: the ref_key product M P then runs in fp16 (P in [0, 1] converted
    like the P V operand), at the fp16 tensor-core rate and with half the shared-memory traffic
    of TF32. fp32 calls keep M exact."""
    if dtype == torch.float32:
        return query_probes, torch.ones_like(query_probes[:, 0])
    m_scale = query_probes.abs().amax(1)
    return (query_probes / torch.where(m_scale > 0, m_scale, 1.0)[:, None]).half(), m_scale


def _probes_on_keys(key_probes, ref_idx, Nk_pad):
    """(Nk_pad, width): key probe weights placed on their keys, zero elsewhere (the padding too),
    so that gen maps reduce whole key tiles, and the probe blocks of every launch (BLOCK_U wide)
    load without a mask: width is 1 for one probe, else a multiple of 16 (aligned rows). index_put_
    with accumulate sums repeated keys in a fixed (sorted) order."""
    Ru = key_probes.shape[0]
    U = key_probes.new_zeros(Nk_pad, _probe_width(Ru))
    U[:, :Ru].index_put_((ref_idx,), key_probes.T, accumulate=True)
    return U


def _padded_keys(Nk):
    """The key count of the main pass's own buffers (U, U b, b, the ref partials): whole key
    tiles of every config, so that they load without a key mask, in aligned rows."""
    return triton.cdiv(Nk, MAX_BLOCK_N) * MAX_BLOCK_N


def _probe_width(Ru):
    """U's columns for Ru key probes: 1 for one, else every launch's probe block (MAX_PROBES
    probes, the last one padded to BLOCK_U) in full, a multiple of 16."""
    last = (Ru - 1) // MAX_PROBES * MAX_PROBES  # the first probe of the last launch
    return Ru if Ru == 1 else last + _pow2(Ru - last)


def _split_counter(splits, Nq, Nk, BH, partial_rows, device):
    """block_m -> programs per head for query blocks of block_m rows: by default enough to fill
    the GPU about PROGRAMS_PER_SM deep (one per head elsewhere); never more than the query
    blocks, nor more than SCRATCH_BYTES of partials."""
    if splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 0
        splits = max(1, triton.cdiv(PROGRAMS_PER_SM * sms, BH))
    splits = min(splits, SCRATCH_BYTES // max(1, 4 * BH * Nk * partial_rows))
    return lambda block_m: max(1, min(splits, triton.cdiv(Nq, block_m)))


def _alignment(*tensors):
    """The largest power of two, up to 16 bytes, that divides every batch, head and row stride
    (in elements): the kernels load head and row starts that many elements at a time."""
    n = 16 // tensors[0].element_size()
    for t in tensors:
        for s in t.stride()[:3]:
            n = math.gcd(n, s)
    return n


def _strides(buf):
    return (0, 0, 0, 0) if buf is None else buf.stride()


def head_tiles(d):
    """(BLOCK_D, BLOCK_D2): a head dim of d as two tiles of power-of-two widths, the largest power of
    two below d and the rest (at least 16, tl.dot's minimum), where they cover it with fewer columns
    than one tile and the first is at least 64 (80 = 64 + 16, not 128; 160 = 128 + 32, not 256), else
    one tile and BLOCK_D2 = 0. On sm_90a (bench/triton_sass.py) the split takes 4-20% fewer
    instructions per key tile at d 80, 96 and 160 (and keeps d=160's main pass from spilling 336 bytes),
    but 3% more at d=40 (32 + 16), where the extra products outweigh the saved columns."""
    whole = _pow2(d)
    first = 1 << (d.bit_length() - 1)  # the largest power of two <= d
    second = _pow2(d - first) if d > first else 0
    return (first, second) if first >= 64 and second and first + second < whole else (whole, 0)


def _pow2(n):
    """Tile width for a dimension of n: a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(n))
