"""Streaming PyTorch backend: any device, the CPU default.

The attention itself and lse_row (each query row's log-sum-exp over ALL keys) come from one
call of PyTorch's fused attention (composition.attention_lse) over the whole batch per chunk of
rows, unrecorded entries and rows without maps included (ALL_ENTRIES, QUERY_ROWS). Then per
recorded entry (its rows with maps, query_rows) one pass over chunks
of the reference keys, each with every query row of a group of heads, in log2 units as in the
Triton kernel (t = log2(e) scale q k^T, lse_row taken to log2): P = 2^(t - lse_row) is one
exponential a score, and a chunk holds whole columns, so the query-axis softmax C needs no pass
of its own. Peak extra memory is one (heads, Nq, keys) float32 chunk and O(B H (Nq + Nk)),
never Nq x Nk of the whole layer.

C needs no exponential of its own: C[x, k] = P[x, k] a[x] b[k] with a = 2^(lse_row - c) and
b = 2^(c - lse_col), so the C maps are P reductions with rescaled probes (derivation and range
argument in triton_kernels.py), and 2^(lse_col - c) = sum_x a[x] P[x, k] is one more probe row
of the ref product. Here c bounds every lse_col of the entry from above (the largest lse_row plus
log2 Nq); a chunk with a column more than C_FROM_P_RANGE below c computes C directly.

On a CPU every large elementwise op, and every exp (MKL's), is a parallel region that waits for
the slower thread: on a busy machine that wait, not the arithmetic, is most of a small layer's
time. So the call is a few large ops: per entry and chunk one product for the scores, one exp2,
one product for the reference side and one for the generated side, each written in place.
"""
import math
import os

import torch

from .composition import attention_lse

# One (heads, Nq, keys) float32 chunk. Every chunk is a few multi-threaded ops; on a loaded CPU each
# costs a wait for the slower thread, so larger chunks degrade less: at a Kontext-like layer on 2
# busy cores, 32 MiB took 1.47x SDPA and 8 MiB 1.75x (one idle thread: 4 MiB, in cache, is 5-8%
# faster). On a GPU: fewer launches.
CHUNK_BYTES = 32 * 2**20
# log2 units, for this and the Triton backend: one exponential serves both softmaxes while scores
# spread less than this (then a term lost below 2^-126 is below 2^(80 - 126) of its sum).
# I2AM_C_FROM_P_RANGE=-1 forces two exponentials everywhere: bench/triton_passes.py times both.
C_FROM_P_RANGE = float(os.environ.get("I2AM_C_FROM_P_RANGE", "80"))
# run takes the whole call (every query row, query_rows naming those with maps) and writes the out
# of every entry, recorded or not: one fused call over the batch and all rows gives all of it and
# the log-sum-exp of the rows with maps, where SDPA on the others would be more calls and copies
QUERY_ROWS = True
ALL_ENTRIES = True
LOG2E = 1 / math.log(2)


def run(q, k, v, out, maps, *, scale, ref_idx, record_idx, key_probes, query_probes, query_rows=None,
        chunk_bytes=None):
    B, H, Nq = q.shape[:3]
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    lse = []  # every entry's lse_row, (B, H, rows) a chunk: indexing the recorded ones would be one more pass
    for a, e in _chunks(Nq, 4 * B * H * max(q.shape[-1], v.shape[-1]), chunk_bytes):
        o, part = attention_lse(q[:, :, a:e], k, v, scale)
        out[:, :, a:e] = o
        lse.append(part)
    lse_row = lse[0] if len(lse) == 1 else torch.cat(lse, -1)
    ref, rows = _as_slice(ref_idx), slice(None) if query_rows is None else query_rows
    for i, b in enumerate(record_idx.tolist() if maps else ()):
        _maps(q[b][:, rows].float(), k[b][:, ref].float(), lse_row[b][:, rows], {n: buf[i] for n, buf in maps.items()},
              scale, key_probes, query_probes, chunk_bytes)


def _maps(q, k, lse_row, maps, scale, u, m, chunk_bytes):
    """Add one entry's maps into maps {name: (H, R, N)}: q (H,Nq,d), k (H,Kr,d) the reference keys,
    lse_row (H, Nq) natural log. Each intermediate is written once, in place (see the top)."""
    H, Nq, Kr = q.shape[0], q.shape[1], k.shape[1]
    Ru, Rw = u.shape[0], m.shape[0]
    need_c = "gen_query" in maps or "ref_query" in maps
    # exp2 runs about 1.4x faster than exp here, and on a small tensor it stays on one thread
    lse_row = lse_row * LOG2E
    c = lse_row.amax(-1, keepdim=True) + math.log2(Nq)  # >= every lse_col: a <= 1, sum_x a P <= 1
    a = torch.exp2(lse_row - c)  # (H, Nq)
    # rows of the column product: m for ref_key, m a for ref_query, a for 2^(lse_col - c)
    left = torch.empty(H, 2 * Rw + 1, Nq, device=q.device)
    left[:, :Rw] = m
    torch.mul(torch.cat([m, m.new_ones(1, Nq)]), a[:, None], out=left[:, Rw:])
    # sum_k P u and (for C taken from P) sum_k P u b, held transposed (H, probes, Nq): a product
    # with P's transpose runs several times faster than P @ (keys, probes), whose few output
    # columns the BLAS handles poorly. Each head group's first key chunk writes it (beta 0).
    gen = torch.empty(H, (1 + need_c) * Ru, Nq, device=q.device)
    direct = None  # sum_k C u where a chunk takes C directly
    keys = min(Kr, max(1, chunk_bytes // (4 * Nq)))
    heads = max(1, min(H, chunk_bytes // (4 * Nq * keys)))
    buf = torch.empty(heads * Nq * keys, device=q.device)
    for h0 in range(0, H, heads):
        hs = slice(h0, min(h0 + heads, H))
        h = hs.stop - hs.start
        # [scale log2(e) q, -lse_row] against [k, 1]: the product is t - lse_row, no broadcast pass
        # over the chunk
        qs = torch.empty(h, Nq, q.shape[-1] + 1, device=q.device)
        torch.mul(q[hs], scale * LOG2E, out=qs[..., :-1])
        torch.neg(lse_row[hs], out=qs[..., -1])
        k1 = torch.cat([k[hs], k.new_ones(h, Kr, 1)], -1)  # (h, Kr, d+1)
        for k0, k_end in _chunks(Kr, 1, keys):
            ks = slice(k0, k_end)
            p = buf[:h * Nq * (k_end - k0)].view(h, Nq, k_end - k0)
            torch.bmm(qs, k1[:, ks].transpose(-1, -2), out=p).exp2_()  # P, (h, Nq, keys)
            cols = left[hs] @ p  # (h, 2Rw+1, keys)
            if "ref_key" in maps:
                maps["ref_key"][hs, :, ks] += cols[:, :Rw]
            probes = [u[:, ks].expand(h, -1, -1)]
            if need_c:
                z = cols[:, 2 * Rw:]  # 2^(lse_col - c)
                from_p = bool((z >= 2.0 ** -C_FROM_P_RANGE).all())
                b = 1 / z if from_p else torch.zeros_like(z)
                probes.append(u[:, ks] * b)
            gen[hs].baddbmm_(torch.cat(probes, 1), p.transpose(-1, -2), beta=float(k0 > 0))
            if need_c and from_p and "ref_query" in maps:
                maps["ref_query"][hs, :, ks] += cols[:, Rw:2 * Rw] * b
            elif need_c and not from_p:  # C = softmax over the rows of the chunk's scores
                s = torch.bmm(q[hs], k[hs, ks].transpose(-1, -2)).mul_(scale)
                cq = s.sub_(s.logsumexp(-2, keepdim=True)).exp_()
                if direct is None:
                    direct = torch.zeros(H, Ru, Nq, device=q.device)
                direct[hs] += u[:, ks] @ cq.transpose(-1, -2)
                if "ref_query" in maps:
                    maps["ref_query"][hs, :, ks] += m @ cq
    if "gen_key" in maps:
        maps["gen_key"] += gen[:, :Ru]
    if "gen_query" in maps:
        maps["gen_query"].addcmul_(gen[:, Ru:], a[:, None])
        if direct is not None:
            maps["gen_query"] += direct


def _chunks(n, row_bytes, chunk_bytes):
    """[(start, end)] ranges of at most chunk_bytes (one row at least), as even as possible:
    a last chunk of a few rows would cost a whole pass of small matmuls."""
    count = -(-n * row_bytes // chunk_bytes)
    rows = max(1, -(-n // count))
    return [(a, min(a + rows, n)) for a in range(0, n, rows)]


def _as_slice(idx):
    """A contiguous index range as a slice (indexing by it is a view, not a gather)."""
    a = int(idx[0])
    if torch.equal(idx, torch.arange(a, a + idx.numel(), device=idx.device)):
        return slice(a, a + idx.numel())
    return idx
