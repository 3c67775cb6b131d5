"""Attention with its log-sum-exp, and the I2AM maps from three such calls.

`attention_lse` is PyTorch's fused attention kept with the per-row log-sum-exp that the public
SDPA computes and drops. The private ops that return it are version-bound, so each is guarded:
an op that is missing, refuses the inputs or returns another shape falls back to public SDPA
plus a chunked log-sum-exp (exact, memory bounded by the chunk).

`three_call_maps` is the peer a capable user would write (the yardstick of the torch backend):
1. the attention itself: out and lse_row (log-sum-exp of each query row over all keys);
2. the reference keys as queries over the query rows: the log-sum-exp of that call is lse_col
   (the query-axis softmax's normaliser), its output with probe-weighted values the ref maps:
   sum_x C[x,k] w[x] with w = m gives ref_query, with w = m exp(c - lse_row) it gives ref_key
   up to exp(lse_col - c), since P[x,k] = C[x,k] exp(lse_col[k] - lse_row[x]);
3. the query rows against the reference keys alone (softmax over them: normaliser lse_ref):
   values u give gen_key up to exp(lse_ref - lse_row), values u exp(c' - lse_col) gen_query up
   to exp(lse_ref - c').
The shifts c, c' (the smallest lse per head) keep the values within [0, max probe].
"""
import torch
import torch.nn.functional as F

LSE_CHUNK_BYTES = 16 * 2**20  # the unfused fallback's (H, rows, Nk) float32 score chunk


def attention_lse(q, k, v, scale):
    """(out, lse): SDPA(q, k, v) in q.dtype and the float32 log-sum-exp of every row's scaled
    scores over the keys, (B, H, Nq). q (B,H,Nq,d), k (B,H,Nk,d), v (B,H,Nk,dv), any strides."""
    fused = _FUSED.get(q.device.type)
    if fused is not None:
        try:
            out, lse = fused(q, k, v, scale)
            if out.shape == (*q.shape[:3], v.shape[-1]) and lse.shape == q.shape[:3]:
                return out, lse.float()
        except (AttributeError, NotImplementedError, RuntimeError, TypeError):
            pass
    return F.scaled_dot_product_attention(q, k, v, scale=scale), _chunked_lse(q, k, scale)


def _cpu_flash(q, k, v, scale):
    # the raw op needs one head size for q, k, v (zero columns change no score and no output
    # column), and it misreads a last dimension that is not unit-stride (SDPA copies first)
    d, dv = q.shape[-1], v.shape[-1]
    if dv < d:
        v = F.pad(v, (0, d - dv))
    elif d < dv:
        q, k = F.pad(q, (0, dv - d)), F.pad(k, (0, dv - d))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, scale=scale)
    return out[..., :dv], lse


def _cuda_efficient(q, k, v, scale):
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=scale)[:2]
    return out, lse[..., :q.shape[2]]  # the op pads the rows of lse to its block size


_FUSED = {"cpu": _cpu_flash, "cuda": _cuda_efficient}


def _chunked_lse(q, k, scale):
    B, H, Nq = q.shape[:3]
    rows = max(1, LSE_CHUNK_BYTES // (4 * B * H * k.shape[2]))
    kt = k.float().transpose(-1, -2)
    return torch.cat([torch.logsumexp(q[:, :, a:a + rows].float() @ kt * scale, -1) for a in range(0, Nq, rows)], -1)


def three_call_maps(q, k, v, *, scale, ref_idx, record_idx, key_probes, query_probes, query_rows=None,
                    names=("gen_query", "ref_key")):
    """out (B,H,Nq,dv) and {name: float32 (Br,H,R,N)} for the requested map names, with the
    meaning of kernels.testing.call_maps (query_rows a slice of Nq, default all)."""
    rows = slice(None) if query_rows is None else query_rows
    out, lse = attention_lse(q, k, v, scale)
    qr, kr = q[record_idx][:, :, rows], k[record_idx][:, :, ref_idx]
    lse_row = lse[record_idx][..., rows]  # (Br,H,Nr)
    u, m = key_probes.float(), query_probes.float()
    Ru, Rw = u.shape[0], m.shape[0]
    maps = {}
    if {"gen_query", "ref_key", "ref_query"} & set(names):
        c = lse_row.amin(-1, keepdim=True)
        w = torch.cat([m.T.expand(*lse_row.shape, Rw), m.T * (c - lse_row).exp()[..., None]], -1)
        o, lse_col = attention_lse(kr, qr, _values(w, q), scale)  # (Br,H,Kr,2Rw), (Br,H,Kr)
        o = o[..., :2 * Rw].float().transpose(-1, -2)
        maps["ref_query"] = o[:, :, :Rw]
        maps["ref_key"] = o[:, :, Rw:] * (lse_col - c)[:, :, None].exp()
    if {"gen_query", "gen_key"} & set(names):
        if "gen_query" in names:
            c = lse_col.amin(-1, keepdim=True)
            w = torch.cat([u.T.expand(*lse_col.shape, Ru), u.T * (c - lse_col).exp()[..., None]], -1)
        else:
            w = u.T.expand(*lse_row.shape[:2], -1, -1)
        o, lse_ref = attention_lse(qr, kr, _values(w, q), scale)  # (Br,H,Nr,.), (Br,H,Nr)
        o = o[..., :w.shape[-1]].float().transpose(-1, -2)
        maps["gen_key"] = o[:, :, :Ru] * (lse_ref - lse_row)[:, :, None].exp()
        if "gen_query" in names:
            maps["gen_query"] = o[:, :, Ru:] * (lse_ref - c)[:, :, None].exp()
    return out, {name: maps[name] for name in names}


def _values(w, q):
    """Probe weights as values of the fused op: q's dtype, padded to its head size (one size for
    q, k and v is what the CPU op takes; the padding is zeros)."""
    return F.pad(w, (0, max(0, q.shape[-1] - w.shape[-1]))).to(q.dtype)
