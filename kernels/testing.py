"""The per-call I2AM equations, materialised: the oracle every backend is tested against.

Kept in the kernel layer (as FlagAttention keeps its reference in a ``testing`` module) so that
the "reference" backend needs nothing from the analysis layer. Everything here builds the full
(Nq x Nk) scores in float64 by default: never use it on real sizes.
"""
from __future__ import annotations

import torch


def softmaxes(q, k, scale, query_rows=None):
    """P (softmax over keys, the attention itself) and C (softmax over queries), (..., Nq, Nk).

    query_rows (a slice of Nq): C is the softmax over those rows only (joint attention, where
    only some queries form the generated grid) and zero on the other rows; P is over all keys.
    """
    s = scale * q @ k.transpose(-1, -2)  # s[x, k] = scale <q[x], k[k]>
    rows = slice(None) if query_rows is None else query_rows
    C = torch.zeros_like(s)
    C[..., rows, :] = s[..., rows, :].softmax(-2)
    return s.softmax(-1), C


def call_maps(q, k, v, *, scale, ref_idx, record_idx, key_probes, query_probes, query_rows=None,
              names=("gen_query", "ref_key"), dtype=torch.float64):
    """One attention call: the output and the maps of the definitions for the recorded entries.

    q (B,H,Nq,d), k (B,H,Nk,d), v (B,H,Nk,dv); ref_idx (Kr,) key indices of the reference grid;
    record_idx (Br,) batch indices; key_probes u (Ru,Kr); query_probes m (Rw,Nr) over the
    query_rows (a slice of Nq, default all: Nr = Nq). Returns out (B,H,Nq,dv) for every row, in
    float32, and {name: (Br,H,R,N)} in float32 with N = Nr for gen_* maps.
    """
    rows = slice(None) if query_rows is None else query_rows
    q, k, v = (t.to(dtype) for t in (q, k, v))
    P, C = softmaxes(q, k, scale, rows)
    out = (P @ v).to(torch.float32)
    u, m = key_probes.to(dtype), query_probes.to(dtype)
    P, C = (X[record_idx][..., rows, :][..., ref_idx] for X in (P, C))  # (Br,H,Nr,Kr)
    maps = {
        "gen_query": lambda: u @ C.transpose(-1, -2),  # sum_k u[k] C[x,k]        official M_g
        "gen_key": lambda: u @ P.transpose(-1, -2),    # sum_k u[k] P[x,k]        eq. 4-7
        "ref_key": lambda: m @ P,                      # sum_x m[x] P[x,k]        official M_r
        "ref_query": lambda: m @ C,                    # sum_x m[x] C[x,k]        eq. 12-15
    }
    return out, {name: maps[name]().float() for name in names}
