"""Random attention cases and the check every backend must pass against the reference.

check_backend runs a backend's `run` directly with a poisoned output (NaN: an unwritten row
fails) and map buffers pre-filled with random values (the backend must ADD into them), and
compares both against the materialised reference of i2am.reference.
"""
from dataclasses import dataclass

import torch

from i2am import reference
from i2am.kernels import backend_module

TOL = {torch.float32: (2e-4, 2e-5), torch.float16: (2e-2, 2e-3), torch.bfloat16: (5e-2, 2e-2)}
MAP_TOL = {torch.float32: (1e-4, 1e-6), torch.float16: (1e-2, 1e-4), torch.bfloat16: (3e-2, 3e-4)}


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    ref_idx: torch.Tensor
    record_idx: torch.Tensor
    key_probes: torch.Tensor
    query_probes: torch.Tensor
    names: tuple = ("gen_query", "ref_key")


def diffusers_layout(B, H, N, d, dtype, device, gen):
    """A (B, H, N, d) view of a (B, N, H*d) tensor, as diffusers' attention processors make."""
    x = torch.randn(B, N, H * d, generator=gen).to(device=device, dtype=dtype)
    return x.view(B, N, H, d).transpose(1, 2)


def make_case(B=2, H=2, Nq=37, Nk=77, d=40, dv=None, *, dtype=torch.float32, device="cpu",
              ref="tail", record=None, Ru=2, Rw=3, strided=False, names=("gen_query", "ref_key"),
              scale=None, seed=0, spread=2.0):
    """A random case. ref: "tail" (last Nk-1 keys, a CLS token first), "all" or "index"."""
    gen = torch.Generator().manual_seed(seed)
    dv = dv or d
    if strided:
        q, k, v = (diffusers_layout(B, H, n, e, dtype, device, gen) for n, e in ((Nq, d), (Nk, d), (Nk, dv)))
    else:
        q = torch.randn(B, H, Nq, d, generator=gen).to(device=device, dtype=dtype)
        k = torch.randn(B, H, Nk, d, generator=gen).to(device=device, dtype=dtype)
        v = torch.randn(B, H, Nk, dv, generator=gen).to(device=device, dtype=dtype)
    q = q * spread  # sharper softmaxes than unit scores: maps far from uniform
    if ref == "tail":
        ref_idx = torch.arange(min(1, Nk - 1), Nk)
    elif ref == "index":
        ref_idx = torch.randperm(Nk, generator=gen)[: max(1, Nk // 2)]
    else:
        ref_idx = torch.arange(Nk)
    record_idx = torch.arange(B) if record is None else torch.as_tensor(record)
    Kr = ref_idx.numel()
    return Case(q, k, v, d ** -0.5 if scale is None else scale, ref_idx.to(device), record_idx.to(device),
                torch.rand(Ru, Kr, generator=gen).to(device) / Kr,
                torch.rand(Rw, Nq, generator=gen).to(device) / Nq, tuple(names))


def expected(case):
    return reference.call_maps(case.q, case.k, case.v, scale=case.scale, ref_idx=case.ref_idx,
                               record_idx=case.record_idx, key_probes=case.key_probes,
                               query_probes=case.query_probes, names=case.names)


def check_backend(backend, case, calls=1, **kwargs):
    """Run `calls` accumulating calls of backend on case; assert out and maps match the reference."""
    q, k, v = case.q, case.k, case.v
    B, H, Nq = q.shape[:3]
    Br = case.record_idx.numel()
    out = torch.full((B, H, Nq, v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    gen = torch.Generator().manual_seed(1)
    shapes = {"gen": (case.key_probes.shape[0], Nq), "ref": (case.query_probes.shape[0], case.ref_idx.numel())}
    prefill = {n: torch.rand(Br, H, *shapes[n[:3]], generator=gen) for n in case.names}
    maps = {n: t.clone().to(q.device) for n, t in prefill.items()}
    for _ in range(calls):
        backend_module(backend).run(q, k, v, out, maps, scale=case.scale, ref_idx=case.ref_idx,
                                    record_idx=case.record_idx, key_probes=case.key_probes,
                                    query_probes=case.query_probes, **kwargs)
    want_out, want = expected(case)
    rtol, atol = TOL[q.dtype]
    rec = case.record_idx.cpu()
    torch.testing.assert_close(out.cpu()[rec].float(), want_out[rec], rtol=rtol, atol=atol)
    rtol, atol = MAP_TOL[q.dtype]
    for n in case.names:
        torch.testing.assert_close(maps[n].cpu(), prefill[n] + calls * want[n], rtol=rtol, atol=atol,
                                   msg=lambda m, n=n: f"{n}: {m}")
