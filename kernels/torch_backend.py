"""Streaming PyTorch backend: chunked over queries, any device, the CPU default.

Per recorded entry, pass 1 runs over query chunks and keeps each key's log-sum-exp over ALL
queries (online: a running column max and a sum rescaled to it); it is needed only for the
query-axis softmax C. Pass 2 recomputes the scores of each chunk, finishes the key-axis
softmax P row by row (a chunk holds whole rows), writes out = P V and adds the probe
reductions into the buffers. Peak extra memory is a few (H, chunk, Nk) float32 tensors,
never Nq x Nk of the whole layer.
"""
import torch

CHUNK_BYTES = 32 * 2**20  # one (H, chunk, Nk) float32 score tensor; about 5 are live at once


def run(q, k, v, out, maps, *, scale, ref_idx, record_idx, key_probes, query_probes,
        chunk_bytes=CHUNK_BYTES):
    H, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    rows = max(1, chunk_bytes // (4 * H * Nk))
    chunks = [(a, min(a + rows, Nq)) for a in range(0, Nq, rows)]
    u, m = key_probes, query_probes
    need_c = "gen_query" in maps or "ref_query" in maps
    ref = _as_slice(ref_idx)
    cached = None  # the scores, when one chunk holds them all: pass 2 need not recompute them

    def scores(b, a, e):
        return cached if cached is not None else scale * (q[b, :, a:e].float() @ kb.transpose(-1, -2))

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
                col_sum = col_sum * (col_max - new_max).exp_() + (s - new_max[:, None]).exp_().sum(-2)
                col_max = new_max
            lse_c = col_max + col_sum.log()
            cached = s if len(chunks) == 1 else None
            lse_c_ref = lse_c[:, None, ref]
        for a, e in chunks:
            s = scores(b, a, e)
            p = (s - s.amax(-1, keepdim=True)).exp_()
            p /= p.sum(-1, keepdim=True)
            out[b, :, a:e] = (p @ vb).to(out.dtype)
            p = p[..., ref]  # (H, c, Kr)
            if "gen_key" in maps:
                maps["gen_key"][i, :, :, a:e] += u @ p.transpose(-1, -2)
            if "ref_key" in maps:
                maps["ref_key"][i] += m[:, a:e] @ p
            if need_c:
                c = (s[..., ref] - lse_c_ref).exp_()
                if "gen_query" in maps:
                    maps["gen_query"][i, :, :, a:e] += u @ c.transpose(-1, -2)
                if "ref_query" in maps:
                    maps["ref_query"][i] += m[:, a:e] @ c


def _as_slice(idx):
    """A contiguous index range as a slice (indexing by it is a view, not a gather)."""
    a = int(idx[0])
    if torch.equal(idx, torch.arange(a, a + idx.numel(), device=idx.device)):
        return slice(a, a + idx.numel())
    return idx
