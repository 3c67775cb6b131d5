"""Streaming PyTorch backend: any device, the CPU default.

Per recorded entry, the attention itself and lse_row (each query row's log-sum-exp over ALL
keys) come from PyTorch's fused attention (composition.attention_lse), in chunks of rows. Then
one pass over chunks of the reference keys, each with every query row of a group of heads:
P = exp(scale q k^T - lse_row) is one exponential a score, and a chunk holds whole columns, so
the query-axis softmax C needs no pass of its own. Peak extra memory is one (heads, Nq, keys)
float32 chunk and O(H (Nq + Nk)), never Nq x Nk of the whole layer.

C needs no exponential of its own: C[x, k] = P[x, k] a[x] b[k] with a = exp(lse_row - c) and
b = exp(c - lse_col), so the C maps are P reductions with rescaled probes (derivation and range
argument in triton_kernels.py), and exp(lse_col - c) = sum_x a[x] P[x, k] is one more probe row
of the ref product. Here c bounds every lse_col of the entry from above (the largest lse_row plus
log Nq); a chunk with a column more than C_FROM_P_RANGE below c computes C directly.
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


def run(q, k, v, out, maps, *, scale, ref_idx, record_idx, key_probes, query_probes, chunk_bytes=None):
    H, Nq = q.shape[1], q.shape[2]
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    ref = _as_slice(ref_idx)
    ct = torch.float64 if q.dtype == torch.float64 else torch.float32  # float64 inputs: out of float64 accuracy
    for i, b in enumerate(record_idx.tolist()):
        qb, kb, vb = q[b].to(ct), k[b].to(ct), v[b].to(ct)
        lse_row = torch.empty(H, Nq, device=q.device)
        for a, e in _chunks(Nq, 4 * H * max(vb.shape[-1], qb.shape[-1]), chunk_bytes):
            o, lse_row[:, a:e] = attention_lse(qb[None, :, a:e], kb[None], vb[None], scale)
            out[b, :, a:e] = o[0]
        if maps:
            _maps(qb.float(), kb[:, ref].float(), lse_row, {n: buf[i] for n, buf in maps.items()}, scale,
                  key_probes, query_probes, chunk_bytes)


def _maps(q, k, lse_row, maps, scale, u, m, chunk_bytes):
    """Add one entry's maps into maps {name: (H, R, N)}: q (H,Nq,d), k (H,Kr,d) the reference keys."""
    H, Nq, Kr = q.shape[0], q.shape[1], k.shape[1]
    Ru, Rw = u.shape[0], m.shape[0]
    need_c = "gen_query" in maps or "ref_query" in maps
    c = lse_row.amax(-1, keepdim=True) + math.log(Nq)  # >= every lse_col: a <= 1, sum_x a P <= 1
    a = (lse_row - c).exp_()  # (H, Nq)
    # rows of the column product: m for ref_key, m a for ref_query, a for exp(lse_col - c)
    left = torch.cat([m.expand(H, Rw, Nq), m * a[:, None], a[:, None]], 1)  # (H, 2Rw+1, Nq)
    gen = torch.zeros(H, Nq, 2 * Ru, device=q.device)  # sum_k P u, sum_k P u b (C taken from P)
    direct = torch.zeros(H, Nq, Ru, device=q.device) if need_c else None  # sum_k C u (C taken directly)
    keys = min(Kr, max(1, chunk_bytes // (4 * Nq)))
    heads = max(1, min(H, chunk_bytes // (4 * Nq * keys)))
    buf = torch.empty(heads * Nq * keys, device=q.device)
    for h0 in range(0, H, heads):
        hs = slice(h0, min(h0 + heads, H))
        # [scale q, -lse_row] against [k, 1]: the product is s - lse_row, no broadcast pass over the chunk
        qs = torch.cat([q[hs] * scale, -lse_row[hs, :, None]], -1)  # (h, Nq, d+1)
        k1 = torch.cat([k[hs], k.new_ones(qs.shape[0], Kr, 1)], -1)  # (h, Kr, d+1)
        for k0, k_end in _chunks(Kr, 1, keys):
            ks = slice(k0, k_end)
            p = buf[:qs.shape[0] * Nq * (k_end - k0)].view(qs.shape[0], Nq, k_end - k0)
            torch.bmm(qs, k1[:, ks].transpose(-1, -2), out=p).exp_()  # P, (h, Nq, keys)
            cols = left[hs] @ p  # (h, 2Rw+1, keys)
            if "ref_key" in maps:
                maps["ref_key"][hs, :, ks] += cols[:, :Rw]
            z = cols[:, 2 * Rw:]  # exp(lse_col - c)
            from_p = need_c and bool((z >= 2.0 ** -C_FROM_P_RANGE).all())
            b = 1 / z if from_p else torch.zeros_like(z)
            gen[hs] += p @ torch.cat([u[:, ks].T.expand(p.shape[0], -1, -1), (u[:, ks] * b).transpose(-1, -2)], -1)
            if from_p and "ref_query" in maps:
                maps["ref_query"][hs, :, ks] += cols[:, Rw:2 * Rw] * b
            elif need_c and not from_p:  # C = exp(s - lse_col) from the chunk's scores
                s = torch.bmm(q[hs], k[hs, ks].transpose(-1, -2)).mul_(scale)
                cq = s.sub_(s.logsumexp(-2, keepdim=True)).exp_()
                direct[hs] += cq @ u[:, ks].T
                if "ref_query" in maps:
                    maps["ref_query"][hs, :, ks] += m @ cq
    if "gen_key" in maps:
        maps["gen_key"] += gen[..., :Ru].transpose(-1, -2)
    if "gen_query" in maps:
        maps["gen_query"] += (gen[..., Ru:] * a[..., None] + direct).transpose(-1, -2)


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
