"""Streaming PyTorch backend: chunked over queries, any device, the CPU default.

Per recorded entry, pass 1 runs over query chunks and keeps each key's log-sum-exp over ALL
queries (online: a running column max and a sum rescaled to it); it is needed only for the
query-axis softmax C. Pass 2 recomputes the scores of each chunk, finishes the key-axis
softmax P row by row (a chunk holds whole rows), writes out = P V and adds the probe
reductions into the buffers. Peak extra memory is a few (H, chunk, Nk) float32 tensors,
never Nq x Nk of the whole layer.

C needs no exponential of its own: C[x, k] = P[x, k] a[x] b[k] with a = exp(lse_row - c) and
b = exp(c - lse_col), so the C maps are P reductions with rescaled probes (derivation and range
argument in triton_kernels.py). Here c bounds every lse_row of the entry from above (the largest
score plus log Nk), and an entry whose c is more than C_FROM_P_RANGE above its smallest lse_col
computes C directly.
"""
import math
import os

import torch

# One (H, chunk, Nk) float32 score tensor; about 4 are live at once. On CPU a small chunk is
# 1.2-1.5x faster at Nq=4096-16384 on 2 cores (it stays in cache, and its allocations are
# reused instead of faulted in); on a GPU large chunks mean fewer launches.
CHUNK_BYTES = {"cpu": 4 * 2**20}
DEFAULT_CHUNK_BYTES = 32 * 2**20
# log2 units, for this and the Triton backend: one exponential serves both softmaxes while scores
# spread less than this (then a term lost below 2^-126 is below 2^(80 - 126) of its sum).
# I2AM_C_FROM_P_RANGE=-1 forces two exponentials everywhere: bench/triton_passes.py times both.
C_FROM_P_RANGE = float(os.environ.get("I2AM_C_FROM_P_RANGE", "80"))


def run(q, k, v, out, maps, *, scale, ref_idx, record_idx, key_probes, query_probes, chunk_bytes=None):
    H, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    chunk_bytes = chunk_bytes or CHUNK_BYTES.get(q.device.type, DEFAULT_CHUNK_BYTES)
    chunks = _chunks(Nq, 4 * H * Nk, chunk_bytes)
    u, m = key_probes, query_probes
    need_c = "gen_query" in maps or "ref_query" in maps
    ref = _as_slice(ref_idx)
    cached = None  # the scores, when one chunk holds them all: pass 2 need not recompute them

    def scores(b, a, e):
        return cached if cached is not None else (q[b, :, a:e].float() * scale) @ kb.transpose(-1, -2)

    for i, b in enumerate(record_idx.tolist()):
        kb, vb = k[b].float(), v[b].float()
        cached = None
        if need_c:
            # online log-sum-exp over queries: rescale the running sum to each new column max
            col_max = torch.full((H, Nk), -torch.inf, device=q.device)
            col_sum = torch.zeros(H, Nk, device=q.device)
            for a, e in chunks:
                s = scores(b, a, e)  # (H, c, Nk)
                new_max = torch.maximum(col_max, s.amax(-2))
                e_s = s - new_max[:, None] if len(chunks) == 1 else s.sub_(new_max[:, None])  # s kept if cached
                col_sum = col_sum * (col_max - new_max).exp_() + e_s.exp_().sum(-2)
                col_max = new_max
            lse_c = (col_max + col_sum.log())[:, None, ref]  # (H, 1, Kr)
            cached = s if len(chunks) == 1 else None
            shift = col_max.amax(-1)[:, None, None] + math.log(Nk)  # >= every lse_row: a <= 1
            from_p = (shift - lse_c.amin(-1, keepdim=True)).max().item() <= C_FROM_P_RANGE * math.log(2)
            b_k = (shift - lse_c).exp() if from_p else None
        for a, e in chunks:
            s = scores(b, a, e)
            if need_c and not from_p:
                c = (s[..., ref] - lse_c).exp_()
            mx = s.amax(-1, keepdim=True)
            p = s.sub_(mx).exp_()  # in place: no second (H, c, Nk) tensor
            total = p.sum(-1, keepdim=True)
            p /= total
            out[b, :, a:e] = (p @ vb).to(out.dtype)
            p = p[..., ref]  # (H, c, Kr)
            if "gen_key" in maps:
                maps["gen_key"][i, :, :, a:e] += u @ p.transpose(-1, -2)
            if "ref_key" in maps:
                maps["ref_key"][i] += m[:, a:e] @ p
            if need_c and from_p:  # C = a P b: a on the query side, b on the key side of P
                a_x = (mx + total.log() - shift).exp_().transpose(-1, -2)  # (H, 1, c)
                if "gen_query" in maps:
                    maps["gen_query"][i, :, :, a:e] += ((u * b_k) @ p.transpose(-1, -2)) * a_x
                if "ref_query" in maps:
                    maps["ref_query"][i] += ((m[:, a:e] * a_x) @ p) * b_k
            elif need_c:
                if "gen_query" in maps:
                    maps["gen_query"][i, :, :, a:e] += u @ c.transpose(-1, -2)
                if "ref_query" in maps:
                    maps["ref_query"][i] += m[:, a:e] @ c


def _chunks(n, row_bytes, chunk_bytes):
    """[(start, end)] query ranges of at most chunk_bytes (one row at least), as even as possible:
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
