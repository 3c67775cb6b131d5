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
# maps: rtol, and atol as a fraction of the map's largest value (maps scale like 1/Nq or 1/Nk)
MAP_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3), torch.bfloat16: (3e-2, 1e-2)}


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


def assert_map_close(got, want, dtype, name=""):
    """A map against its expected value, within MAP_TOL for inputs of `dtype`."""
    rtol, frac = MAP_TOL[dtype]
    torch.testing.assert_close(got, want, rtol=rtol, atol=frac * want.abs().max().item(),
                               msg=lambda m: f"{name}: {m}")


def check_backend(backend, case, calls=1, **kwargs):
    """Run `calls` accumulating calls of backend on case; assert out and maps match the reference.
    The map buffers start at random values of the maps' own scale: a backend that overwrote them,
    or added a wrong map, is off by about that scale."""
    q, k, v = case.q, case.k, case.v
    B, H, Nq = q.shape[:3]
    out = torch.full((B, H, Nq, v.shape[-1]), float("nan"), dtype=q.dtype, device=q.device)
    want_out, want = expected(case)
    gen = torch.Generator().manual_seed(1)
    prefill = {n: torch.rand(want[n].shape, generator=gen) * want[n].abs().max() for n in case.names}
    maps = {n: t.clone().to(q.device) for n, t in prefill.items()}
    for _ in range(calls):
        backend_module(backend).run(q, k, v, out, maps, scale=case.scale, ref_idx=case.ref_idx,
                                    record_idx=case.record_idx, key_probes=case.key_probes,
                                    query_probes=case.query_probes, **kwargs)
    rtol, atol = TOL[q.dtype]
    rec = case.record_idx.cpu()
    torch.testing.assert_close(out.cpu()[rec].float(), want_out[rec], rtol=rtol, atol=atol)
    for n in case.names:
        assert_map_close(maps[n].cpu(), prefill[n] + calls * want[n], q.dtype, n)
