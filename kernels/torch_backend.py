"""Streaming PyTorch backend: chunked over queries, any device, the CPU default.

Per recorded entry, pass 1 runs over query chunks and keeps each key's log-sum-exp over ALL
queries (online: lse = logaddexp(lse, logsumexp(chunk))); it is needed only for the
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

    def scores(b, a, e):
        return scale * (q[b, :, a:e].float() @ kb.transpose(-1, -2))  # (H, c, Nk)

    for i, b in enumerate(record_idx.tolist()):
        kb, vb = k[b].float(), v[b].float()
        if need_c:
            lse_c = torch.full((H, Nk), -torch.inf, device=q.device)
            for a, e in chunks:
                lse_c = torch.logaddexp(lse_c, scores(b, a, e).logsumexp(-2))
            lse_c_ref = lse_c[:, None, ref_idx]
        for a, e in chunks:
            s = scores(b, a, e)
            p = (s - s.logsumexp(-1, keepdim=True)).exp_()
            out[b, :, a:e] = (p @ vb).to(out.dtype)
            p = p[..., ref_idx]  # (H, c, Kr)
            if "gen_key" in maps:
                maps["gen_key"][i, :, :, a:e] += u @ p.transpose(-1, -2)
            if "ref_key" in maps:
                maps["ref_key"][i] += m[:, a:e] @ p
            if need_c:
                c = (s[..., ref_idx] - lse_c_ref).exp_()
                if "gen_query" in maps:
                    maps["gen_query"][i, :, :, a:e] += u @ c.transpose(-1, -2)
                if "ref_query" in maps:
                    maps["ref_query"][i] += m[:, a:e] @ c
