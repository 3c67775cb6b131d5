"""Random attention cases and the check every backend must pass against the reference.

check_backend runs a backend's `run` directly with a poisoned output (NaN: an unwritten row
fails) and map buffers pre-filled with random values (the backend must ADD into them), and
compares both against the materialised reference of i2am.reference.
"""
from dataclasses import dataclass

import torch

from i2am import reference
from i2am.kernels import backend_module

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the device of the contract suite's cases
REFERENCE_ERRORS = 2  # FlagAttention's factor (assert_within_reference_error)
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


def expected(case, dtype=torch.float64):
    return reference.call_maps(case.q, case.k, case.v, scale=case.scale, ref_idx=case.ref_idx,
                               record_idx=case.record_idx, key_probes=case.key_probes,
                               query_probes=case.query_probes, names=case.names, dtype=dtype)


def assert_within_reference_error(got, gold, plain, floor, name=""):
    """FlagAttention's criterion: a backend is at most REFERENCE_ERRORS times as far from the
    float64 value `gold` as the materialised equations computed in the inputs' own 16-bit dtype
    (`plain`) are, plus `floor`."""
    err, own = ((x.double() - gold.double()).abs().max().item() for x in (got, plain))
    assert err <= REFERENCE_ERRORS * own + floor, f"{name}: error {err:.3g}, the reference's own {own:.3g}"


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
    if q.dtype in (torch.float16, torch.bfloat16):  # (float32's own error is a few ulps: TOL's atol rules)
        plain_out, plain = expected(case, q.dtype)
        assert_within_reference_error(out.cpu()[rec], want_out[rec], plain_out.cpu()[rec], atol, "out")
        for n in case.names:
            got = (maps[n].cpu() - prefill[n]) / calls
            floor = MAP_TOL[q.dtype][1] * want[n].abs().max().item()
            assert_within_reference_error(got, want[n], plain[n].cpu(), floor, n)


# ---- joint attention through the op: query_rows and ref_keys of one sequence -------------------

def poison(monkeypatch):
    """torch.empty inside the op returns NaN-filled floats: an element nobody writes fails."""
    from i2am.kernels import api
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(api.torch, "empty", nan_empty)


def layout(kind, n_text, grid_gen, grid_ref):
    """(Nq, query_rows, ref_keys) of a joint sequence; every token is a query and a key. The
    side-by-side kinds put the two grids of one height beside each other in one latent (in-context
    editors): the rows and keys are every other half-row, index tensors."""
    g, r = grid_gen[0] * grid_gen[1], grid_ref[0] * grid_ref[1]
    if kind == "text, gen, ref":
        return n_text + g + r, slice(n_text, n_text + g), slice(n_text + g, n_text + g + r)
    if kind == "ref, gen":
        return r + g, slice(r, r + g), slice(0, r)
    if kind == "text, ref, gen, text":
        return 2 * n_text + r + g, slice(n_text + r, n_text + r + g), slice(n_text, n_text + r)
    if kind in ("text, gen | ref", "ref | gen"):
        assert grid_gen[0] == grid_ref[0], "side by side: one height"
        w = grid_gen[1] + grid_ref[1]
        token = torch.arange(grid_gen[0] * w).view(grid_gen[0], w)
        left, right = token[:, :grid_gen[1]].flatten(), token[:, grid_gen[1]:].flatten()
        if kind == "ref | gen":  # the reference on the left: grids of one width
            left, right = token[:, grid_gen[1]:].flatten(), token[:, :grid_gen[1]].flatten()
            return g + r, left, right
        return n_text + g + r, n_text + left, n_text + right
    raise ValueError(kind)


def joint_case(kind, *, B=2, H=2, d=40, n_text=5, grid_gen=(3, 4), grid_ref=(4, 3), dtype=torch.float32,
               strided=True, seed=0, Ru=2, Rw=3, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    N, rows, ref = layout(kind, n_text, grid_gen, grid_ref)
    if strided:
        q, k, v = (diffusers_layout(B, H, N, d, dtype, device, gen) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, H, N, d, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    q = q * 2
    Nr, Kr = (len(range(N)[x]) if isinstance(x, slice) else x.numel() for x in (rows, ref))
    return dict(q=q, k=k, v=v, query_rows=rows, ref_keys=ref,
                key_probes=torch.rand(Ru, Kr, generator=gen) / Kr, query_probes=torch.rand(Rw, Nr, generator=gen) / Nr)


def joint_expected(q, k, v, *, query_rows, ref_keys, key_probes, query_probes, record, scale=None):
    """Definitions in float64: s = scale q k^T; P = softmax over all keys; C = softmax over the
    query_rows of s[rows]; maps on the rows and reference keys only."""
    q, k, v = (t.double().cpu() for t in (q, k, v))
    s = (q.shape[-1] ** -0.5 if scale is None else scale) * torch.einsum("bhqd,bhkd->bhqk", q, k)
    out = s.softmax(-1) @ v
    s = s[record][:, :, query_rows]
    P = s.softmax(-1)[..., ref_keys]
    C = s.softmax(-2)[..., ref_keys]
    u, m = key_probes.double(), query_probes.double()
    maps = {"gen_query": u @ C.transpose(-1, -2), "gen_key": u @ P.transpose(-1, -2),
            "ref_key": m @ P, "ref_query": m @ C}
    return out, maps


def check_op(case, backend, *, record=None, tol=(1e-4, 1e-5), **kw):
    """prepare() and one call of the op on a joint case, every convention; out (every row, every
    entry) and the maps against joint_expected, the buffers pre-filled with random values."""
    import torch.nn.functional as F

    from i2am.kernels import prepare

    B = case["q"].shape[0]
    rec = list(range(B)) if record is None else record
    call = prepare(**case, record=record, gen=("query", "key"), ref=("key", "query"), backend=backend, **kw)
    want_out, want = joint_expected(**case, record=rec, **kw)
    gen = torch.Generator().manual_seed(1)  # buffers start at random values of the maps' scale
    prefill = {n: torch.rand(s, generator=gen) * want[n].abs().max().float() for n, s in call.shapes.items()}
    maps = {n: t.clone().to(case["q"].device) for n, t in prefill.items()}
    out = call(case["q"], case["k"], case["v"], maps)
    rtol, atol = tol
    torch.testing.assert_close(out.double().cpu(), want_out, rtol=rtol, atol=atol)  # every row, all entries
    torch.testing.assert_close(out, F.scaled_dot_product_attention(case["q"], case["k"], case["v"], **kw),
                               rtol=rtol, atol=atol)
    for n in want:
        got = maps[n].cpu() - prefill[n]
        torch.testing.assert_close(got.double(), want[n], rtol=rtol, atol=atol * want[n].abs().max().item(),
                                   msg=lambda m: f"{n}: {m}")
    return out, maps
