"""attention_with_maps: the one public op of the kernel layer.

This wrapper checks and normalises the arguments, allocates (or takes) the float32 map
buffers, sends unrecorded batch entries to plain SDPA and the recorded ones to a backend.
Every backend module exposes the same function::

    run(q, k, v, out, maps, *, scale, ref_idx, record_idx, key_probes, query_probes)

With query_rows (joint attention) a backend sees only those rows: q and out are the row views
q[:, :, rows] and out[:, :, rows] (P rows are independent, and C over the rows is the attention
of those rows alone), and this wrapper writes the other rows with SDPA. Rows that are no
contiguous range (the left half-rows of a side-by-side latent) reach the backend as a copy of
those rows of q, O(Nr d) like q itself, and their out rows are scattered back. A backend with
QUERY_ROWS = True (the reference, the torch backend) instead takes the whole call and
query_rows=.

q (B,H,Nq,d), k (B,H,Nk,d), v (B,H,Nk,dv): the caller's tensors, any strides, one dtype and
device. out (B,H,Nq,dv), q.dtype: the backend writes the rows record_idx (every entry's with
ALL_ENTRIES = True: then the wrapper runs SDPA on no entry of those rows). maps: {name: float32
buffer, any strides}, with name in MAP_NAMES and shape (Br,H,Ru,Nq) for gen_*, (Br,H,Rw,Kr)
for ref_*: the backend ADDS this call's maps into them. ref_idx (Kr,) and record_idx (Br,) are
int64 on the device; key_probes (Ru,Kr) and query_probes (Rw,Nq) are contiguous float32.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MAP_NAMES = ("gen_query", "gen_key", "ref_key", "ref_query")
CONVENTIONS = ("query", "key")
BACKENDS = ("auto", "triton", "cuda", "torch", "reference")
_MODULES = {
    "torch": "torch_backend",
    "triton": "triton_backend",
    "cuda": "cuda_backend",
    "reference": "reference_backend",
}


def attention_with_maps(q, k, v, *, scale=None, ref_keys=None, query_rows=None, record=None, key_probes=None,
                        query_probes=None, gen=("query",), ref=("key",), backend="auto",
                        accumulate=None):
    """Cross-attention that also returns I2AM maps, without materialising (Nq x Nk) scores.

    Args:
        q, k, v: (B, H, Nq, d), (B, H, Nk, d), (B, H, Nk, dv); any float dtype and strides.
        scale: score scale, default d ** -0.5.
        ref_keys: the reference-grid keys, a slice or an index tensor into Nk (default all).
        query_rows: the rows that form the generated grid, a slice or an index tensor into Nq
            (default all; no row twice): the softmax over queries runs over these rows only, gen
            maps and query_probes have their count (Nr) of columns, in this order; out still
            holds every row (joint attention, DiTs).
        record: batch indices whose maps are computed (default all); the others cost plain
            attention only.
        key_probes: (Ru, Kr) weights over the reference keys, default one uniform row 1/Kr.
        query_probes: (Rw, Nr) weights over this call's query rows, default one uniform row 1/Nr.
        gen, ref: softmax conventions to reduce for the generated and reference maps:
            "query" (softmax over queries) and/or "key" (softmax over keys).
        backend: "auto" (triton for CUDA tensors when it imports, else torch), "triton",
            "cuda", "torch" or "reference".
        accumulate: optional dict of float32 buffers with exactly the requested map names and
            shapes (strided views allowed); this call's maps are added into them in place.

    Returns:
        (out, maps): out == SDPA(q, k, v) in q.dtype, with SDPA's gradients when grad is
        enabled; maps {"gen_query": (Br,H,Ru,Nr), "gen_key": ..., "ref_key": (Br,H,Rw,Kr),
        "ref_query": ...}, float32, exactly the requested entries (the accumulate dict itself
        when given), never carrying autograd history.

    Under torch.compile the call is a graph break: it runs as it does eagerly.
    """
    return _attention_with_maps(q, k, v, scale=scale, ref_keys=ref_keys, query_rows=query_rows, record=record,
                                key_probes=key_probes, query_probes=query_probes, gen=gen, ref=ref, backend=backend,
                                accumulate=accumulate)


def graph_break(fn):
    """fn, run eagerly under torch.compile (a graph break at each call: Dynamo cannot trace i2am's
    host-side argument checks and Python state). Eager calls skip the torch.compiler.disable
    wrapper, whose frame switch would cost about 10x the call itself on small layers."""
    disabled = torch.compiler.disable(fn)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return disabled(*args, **kwargs) if torch.compiler.is_dynamo_compiling() else fn(*args, **kwargs)

    return call


@graph_break  # torch.compile of attention_with_maps itself traces its body: the break is here
def _attention_with_maps(q, k, v, *, scale, ref_keys, query_rows, record, key_probes, query_probes, gen, ref,
                         backend, accumulate):
    if accumulate is None and _selects_nothing(record):
        return _unrecorded(q, k, v, scale, ref_keys, query_rows, key_probes, query_probes, gen, ref, backend)
    call = prepare(q, k, v, scale=scale, ref_keys=ref_keys, query_rows=query_rows, record=record,
                   key_probes=key_probes,
                   query_probes=query_probes, gen=gen, ref=ref, backend=backend)
    maps = _buffers(accumulate, call.shapes, q.device)
    return call(q, k, v, maps), maps


def _unrecorded(q, k, v, scale, ref_keys, query_rows, key_probes, query_probes, gen, ref, backend):
    """Nothing recorded: SDPA and empty maps. The arguments get the same checks as in prepare(),
    but on their own devices and without building the reference-key and probe tensors on q's
    device (a full prepare() costs about 0.1 ms, more than SDPA itself on small GPU calls)."""
    B, H, Nq, Nk, d = _check_qkv(q, k, v)
    scale = d ** -0.5 if scale is None else _check_scale(scale)
    _resolve_backend(backend, q)
    kr = _index(ref_keys, Nk, "ref_keys", torch.device("cpu")).numel()
    Nq = _row_count(query_row_range(query_rows, Nq))
    probes = {"gen": _probes(key_probes, kr, "key_probes", "|ref_keys|", _device(key_probes)).shape[0],
              "ref": _probes(query_probes, Nq, "query_probes", _nq_name(query_rows), _device(query_probes)).shape[0]}
    size = {"gen": Nq, "ref": kr}
    maps = {f"{kind}_{c}": q.new_zeros(0, H, probes[kind], size[kind], dtype=torch.float32)
            for kind, sel in (("gen", gen), ("ref", ref)) for c in _conventions(sel, kind)}
    return _sdpa(q, k, v, scale), maps


def _selects_nothing(record):
    """Whether `record` is an empty index list (a slice is resolved against B in prepare())."""
    return record is not None and not isinstance(record, slice) and torch.as_tensor(record).numel() == 0


def _device(t):
    return t.device if isinstance(t, torch.Tensor) else torch.device("cpu")


@dataclass(frozen=True)
class MapsCall:
    """The checked arguments of attention_with_maps for calls of one signature (shapes, dtype,
    device, scale). Calling it runs the attention and adds the maps into `maps`; it can be kept
    and reused, so repeated calls (a recorder's layer, step after step) skip the argument checks
    and, on CUDA, their host-device synchronisations."""
    signature: tuple
    scale: float
    ref_idx: torch.Tensor
    record_idx: torch.Tensor
    unrecorded_idx: object  # a slice or an index tensor
    key_probes: torch.Tensor
    query_probes: torch.Tensor
    shapes: dict  # {map name: buffer shape}
    backend: str
    query_rows: object = None  # the rows with maps: None (all), a slice (step 1) or an index tensor
    other_rows: object = None  # with an index tensor of query_rows: the other rows (a slice or an index tensor)

    def matches(self, q, k, v, scale=None):
        """Whether q, k, v (and scale) have the signature these arguments were checked for."""
        return _signature(q, k, v, scale) == self.signature

    @graph_break
    def __call__(self, q, k, v, maps):
        if not self.matches(q, k, v, self.scale):
            raise ValueError(f"q, k, v {_signature(q, k, v, self.scale)} do not match the call these maps "
                             f"were prepared for: {self.signature}")
        _checked_buffers(maps, self.shapes, q.device, "maps")
        if not self.shapes or self.record_idx.numel() == 0:
            return _sdpa(q, k, v, self.scale)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return _SDPAGradient.apply(q, k, v, self, maps)
        return self._run(q, k, v, maps)

    def _run(self, q, k, v, maps):
        Nq = q.shape[2]
        out = _empty_like_q(q, v.shape[-1])
        u = self.unrecorded_idx
        module, rows = backend_module(self.backend), self.query_rows
        args = {"scale": self.scale, "ref_idx": self.ref_idx, "record_idx": self.record_idx,
                "key_probes": self.key_probes, "query_probes": self.query_probes}
        every = getattr(module, "ALL_ENTRIES", False)
        unrecorded = not every and (isinstance(u, slice) or u.numel())  # entries left to SDPA below
        r = self.record_idx if unrecorded else slice(None)  # the entries whose other rows SDPA writes
        if rows is None:
            module.run(q, k, v, out, maps, **args)
        elif getattr(module, "QUERY_ROWS", False):
            module.run(q, k, v, out, maps, query_rows=rows, **args)
        elif isinstance(rows, slice):  # the backend runs the rows (views); SDPA the other rows
            for other in (slice(0, rows.start), slice(rows.stop, Nq)):
                if other.stop > other.start:
                    out[r, :, other] = _sdpa(q[:, :, other][r], k[r], v[r], self.scale)
            module.run(q[:, :, rows], k, v, out[:, :, rows], maps, **args)
        else:  # strided rows: the backend runs a copy of them, SDPA a copy of the others; both
            # scatter every entry's rows back, the unrecorded entries' rewritten below (if any)
            for idx, run in ((rows, module.run), (self.other_rows, None)):
                if isinstance(idx, slice) or idx.numel():
                    part = _empty_like_q(q[:, :, idx], v.shape[-1])
                    if run is None:
                        part[r] = _sdpa(q[:, :, idx][r], k[r], v[r], self.scale)
                    else:
                        run(q[:, :, idx], k, v, part, maps, **args)
                    out[:, :, idx] = part
        if unrecorded:
            out[u] = _sdpa(q[u], k[u], v[u], self.scale)
        if q.device.type == "cpu":
            # a query row holding NaN has only NaN scores: CPU SDPA answers zeros or NaN depending
            # on the torch release, so such rows take SDPA's own answer (their maps keep the NaN,
            # to be reported). q's sum is NaN whenever a row holds NaN: one reduction gates the
            # row test, which costs several times more (a boolean tensor as large as q)
            if q.sum().isnan():
                nan_rows = q.isnan().any(-1, keepdim=True)
                if nan_rows.any():
                    out.copy_(torch.where(nan_rows, _sdpa(q, k, v, self.scale).to(out.dtype), out))
        return out


class _SDPAGradient(torch.autograd.Function):
    """out of a MapsCall with SDPA's gradients: the forward runs the backend with grad disabled
    (so neither out nor the map buffers record history), the backward recomputes SDPA and takes
    its gradients. Only q, k, v are saved, as SDPA's own backward saves them."""

    @staticmethod
    def forward(ctx, q, k, v, call, maps):
        ctx.save_for_backward(q, k, v)
        ctx.scale = call.scale
        return call._run(q, k, v, maps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        inputs = [t.detach().requires_grad_(need) for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            out = _sdpa(*inputs, ctx.scale)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return tuple(next(grads) if t.requires_grad else None for t in inputs) + (None, None)


def _empty_like_q(q, dv):
    """An empty (B, H, Nq, dv) output whose dimensions lie in memory in q's order, so that the
    caller's view back (diffusers' transpose(1, 2) of a (B, Nq, H*d) projection) needs no copy."""
    order = sorted(range(3), key=lambda i: -q.stride(i)) + [3]  # the head dim stays innermost
    shape = (*q.shape[:3], dv)
    out = torch.empty([shape[i] for i in order], dtype=q.dtype, device=q.device)
    return out.permute([order.index(i) for i in range(4)])


def prepare(q, k, v, *, scale=None, ref_keys=None, query_rows=None, record=None, key_probes=None,
            query_probes=None, gen=("query",), ref=("key",), backend="auto"):
    """Check and normalise the arguments of attention_with_maps (same meaning) into a MapsCall."""
    B, H, Nq, Nk, d = _check_qkv(q, k, v)
    rows = query_row_range(query_rows, Nq)
    Nq = _row_count(rows)
    scale = d ** -0.5 if scale is None else _check_scale(scale)
    dev = q.device
    ref_idx = _index(ref_keys, Nk, "ref_keys", dev)
    record_idx = _index(record, B, "record", dev, unique=True)
    key_probes = _probes(key_probes, ref_idx.numel(), "key_probes", "|ref_keys|", dev)
    query_probes = _probes(query_probes, Nq, "query_probes", _nq_name(query_rows), dev)
    names = [f"gen_{c}" for c in _conventions(gen, "gen")]
    names += [f"ref_{c}" for c in _conventions(ref, "ref")]
    shapes = {n: (record_idx.numel(), H, (key_probes if n.startswith("gen") else query_probes).shape[0],
                  Nq if n.startswith("gen") else ref_idx.numel()) for n in names}
    strided = isinstance(rows, torch.Tensor)
    return MapsCall(_signature(q, k, v, scale), scale, ref_idx, record_idx, _complement(record_idx, B),
                    key_probes, query_probes, shapes, _resolve_backend(backend, q),
                    None if query_rows is None else rows.to(dev) if strided else rows,
                    _complement(rows.to(dev), q.shape[2]) if strided else None)


def _signature(q, k, v, scale):
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return tuple(x for t in (q, k, v) for x in (tuple(t.shape), t.dtype, t.device)) + (scale,)


def backend_module(name):
    """The module implementing backend `name` (imported on first use)."""
    return importlib.import_module(f"{__package__}.{_MODULES[name]}")


def triton_available(device):
    """Triton runs CUDA tensors, and CPU tensors under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _resolve_backend(backend, q):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda and triton_available(q.device) else "torch"
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        raise ValueError("backend='triton' needs the triton package, which is not installed: CUDA builds of "
                         "torch bring it, else `pip install triton` (or use backend='torch')")
    if backend == "triton" and not triton_available(q.device):
        raise ValueError("backend='triton' needs CUDA tensors and an importable triton "
                         f"(or TRITON_INTERPRET=1 for CPU tensors); got a {q.device} tensor")
    if backend == "triton" and not q.is_cuda and q.dtype == torch.bfloat16:
        raise TypeError("backend='triton' cannot compute bfloat16 in Triton's CPU interpreter (TRITON_INTERPRET=1: "
                        "it has no bfloat16 dot products); use float16/float32, or backend='torch'")
    return backend


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, d), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    B, H, Nq, d = q.shape
    if k.shape[:2] != (B, H) or k.shape[3] != d:
        raise ValueError(f"k must be (B={B}, H={H}, Nk, d={d}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"v must be (B={B}, H={H}, Nk={k.shape[2]}, dv) to match k, got {tuple(v.shape)}")
    if min(B, H, Nq, k.shape[2], d) == 0:
        raise ValueError(f"empty attention: q {tuple(q.shape)}, k {tuple(k.shape)}")
    return B, H, Nq, k.shape[2], d


def _check_scale(scale):
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    return scale


def _index(sel, n, what, device, unique=False):
    """A slice, a sequence or an integer tensor of indices into range(n), as int64 on device."""
    if sel is None:
        idx = torch.arange(n)
    elif isinstance(sel, slice):
        idx = slice_indices(sel, n)
    else:
        idx = torch.as_tensor(sel).reshape(-1)
        if idx.numel() and (idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool):
            raise TypeError(f"{what} must hold integer indices, got {idx.dtype}")
        idx = idx.long().cpu()
        lo, hi = idx.aminmax() if idx.numel() else (0, 0)
        if lo < 0 or hi >= n:
            raise ValueError(f"{what} must index range(0, {n}), got values from {int(lo)} to {int(hi)}")
        if unique and idx.numel() > 1 and idx.unique().numel() != idx.numel():
            raise ValueError(f"{what} must not repeat an index, got {idx.tolist()}")
    if what != "record" and idx.numel() == 0:
        raise ValueError(f"{what} selects no index out of {n}")
    return idx.contiguous().to(device)  # a strided slice or view is a strided tensor: backends read it flat


def slice_indices(sel, n):
    """The indices of range(n) a slice selects, any step, reversed ones too (torch indexing
    refuses negative steps)."""
    return torch.tensor(range(n)[sel], dtype=torch.long)


def query_row_range(sel, n):
    """query_rows within range(n): a slice(start, stop) when they are one contiguous range in
    order (None is all rows), else their int64 index tensor on the CPU (a strided slice, a
    sequence or an integer tensor, as ref_keys; no row twice)."""
    if sel is None:
        return slice(0, n)
    if isinstance(sel, slice) and sel.step in (None, 1):
        start, stop, _ = sel.indices(n)
        if stop <= start:
            raise ValueError(f"query_rows must select at least one of the {n} queries, got {sel}")
        return slice(start, stop)
    idx = _index(sel, n, "query_rows", torch.device("cpu"), unique=True)
    return _as_range(idx) or idx


def _as_range(idx):
    """slice(a, a + len) when idx is exactly a, a + 1, ..., else None."""
    a = int(idx[0])
    return slice(a, a + idx.numel()) if torch.equal(idx, torch.arange(a, a + idx.numel())) else None


def _row_count(rows):
    return rows.stop - rows.start if isinstance(rows, slice) else rows.numel()


def _nq_name(query_rows):
    return "Nq" if query_rows is None else "|query_rows|"


def _probes(p, n, what, n_name, device):
    if p is None:
        return torch.full((1, n), 1.0 / n, device=device)
    if not isinstance(p, torch.Tensor):
        p = torch.as_tensor(p, dtype=torch.float32)
    if p.dim() == 1:
        p = p[None]
    if p.dim() != 2 or p.shape[1] != n or p.shape[0] == 0:
        raise ValueError(f"{what} must be (R, {n_name}={n}) with R >= 1, got {tuple(p.shape)}")
    if not torch.isfinite(p).all():
        raise ValueError(f"{what} must be finite")
    # probes are weights of a reduction, not parameters: the maps never carry their history
    return p.detach().to(device=device, dtype=torch.float32).contiguous()


def _conventions(sel, what):
    sel = (sel,) if isinstance(sel, str) else tuple(sel or ())
    bad = [c for c in sel if c not in CONVENTIONS]
    if bad or len(set(sel)) != len(sel):
        raise ValueError(f"{what} must be distinct entries of {CONVENTIONS}, got {sel}")
    return sel


def _buffers(accumulate, shapes, device):
    if accumulate is None:
        with torch.inference_mode(False):  # normal tensors: a later call outside inference_mode adds into them
            return {n: torch.zeros(s, device=device) for n, s in shapes.items()}
    return _checked_buffers(accumulate, shapes, device, "accumulate")


def _checked_buffers(maps, shapes, device, what):
    """maps, checked to be a dict of float32 buffers of exactly `shapes` on device."""
    if not isinstance(maps, dict) or set(maps) != set(shapes):
        got = sorted(maps) if isinstance(maps, dict) else type(maps).__name__
        raise ValueError(f"{what} must hold exactly the keys {sorted(shapes)} (a dict), got {got}")
    for n, s in shapes.items():
        t = maps[n]
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}[{n!r}] must be a float32 tensor {s} on {device}, got {type(t).__name__}")
        if tuple(t.shape) != s or t.dtype != torch.float32 or t.device != device:
            raise ValueError(f"{what}[{n!r}] must be float32 {s} on {device}, "
                             f"got {t.dtype} {tuple(t.shape)} on {t.device}")
    return maps


def _complement(idx, n):
    """The indices of range(n) not in idx (batch entries, query rows): a slice when they are
    contiguous (the CFG uncond half), so that q[u] is a view, not a copy of the inputs."""
    taken = set(idx.tolist())  # a few batch entries mostly: Python ints cost less than tensor ops
    rest = [i for i in range(n) if i not in taken]
    if rest and rest[-1] - rest[0] + 1 == len(rest):
        return slice(rest[0], rest[-1] + 1)
    return torch.tensor(rest, dtype=torch.long, device=idx.device)

