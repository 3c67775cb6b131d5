"""query_rows (SPEC 3c): maps on a sub-range of the queries of a joint attention call.

Every backend against a float64 computation written here from the definitions: P over ALL keys,
C the softmax over the query_rows only, out for every row as SDPA. Sequences laid out as DiTs
and reference-attention UNets lay them out: text first, then generated, then reference tokens;
reference before generated; generated rows in the middle. Outputs are poisoned (every float
tensor the op allocates starts as NaN) and map buffers start at random values.
"""
import pytest
import torch
import torch.nn.functional as F

from cases import diffusers_layout
from i2am.kernels import api, attention_with_maps, prepare, triton_available

ALL = ("gen_query", "gen_key", "ref_key", "ref_query")
CONVENTIONS = {"gen": ("query", "key"), "ref": ("key", "query")}


def poison(monkeypatch):
    """torch.empty inside the op returns NaN-filled floats: an element nobody writes fails."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(api.torch, "empty", nan_empty)


@pytest.fixture
def poisoned(monkeypatch):
    poison(monkeypatch)


def layout(kind, n_text, grid_gen, grid_ref):
    """(Nq, query_rows, ref_keys) of a joint sequence; every token is a query and a key."""
    g, r = grid_gen[0] * grid_gen[1], grid_ref[0] * grid_ref[1]
    if kind == "text, gen, ref":
        return n_text + g + r, slice(n_text, n_text + g), slice(n_text + g, n_text + g + r)
    if kind == "ref, gen":
        return r + g, slice(r, r + g), slice(0, r)
    if kind == "text, ref, gen, text":
        return 2 * n_text + r + g, slice(n_text + r, n_text + r + g), slice(n_text, n_text + r)
    raise ValueError(kind)


def joint_case(kind, *, B=2, H=2, d=40, n_text=5, grid_gen=(3, 4), grid_ref=(4, 3), dtype=torch.float32,
               strided=True, seed=0, Ru=2, Rw=3):
    gen = torch.Generator().manual_seed(seed)
    N, rows, ref = layout(kind, n_text, grid_gen, grid_ref)
    if strided:
        q, k, v = (diffusers_layout(B, H, N, d, dtype, "cpu", gen) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, H, N, d, generator=gen).to(dtype) for _ in range(3))
    q = q * 2
    Nr, Kr = rows.stop - rows.start, ref.stop - ref.start
    return dict(q=q, k=k, v=v, query_rows=rows, ref_keys=ref,
                key_probes=torch.rand(Ru, Kr, generator=gen) / Kr, query_probes=torch.rand(Rw, Nr, generator=gen) / Nr)


def expected(q, k, v, *, query_rows, ref_keys, key_probes, query_probes, record, scale=None):
    """Definitions in float64: s = scale q k^T; P = softmax over all keys; C = softmax over the
    query_rows of s[rows]; maps on the rows and reference keys only."""
    q, k, v = (t.double() for t in (q, k, v))
    s = (q.shape[-1] ** -0.5 if scale is None else scale) * torch.einsum("bhqd,bhkd->bhqk", q, k)
    out = s.softmax(-1) @ v
    s = s[record][:, :, query_rows]
    P = s.softmax(-1)[..., ref_keys]
    C = s.softmax(-2)[..., ref_keys]
    u, m = key_probes.double(), query_probes.double()
    maps = {"gen_query": u @ C.transpose(-1, -2), "gen_key": u @ P.transpose(-1, -2),
            "ref_key": m @ P, "ref_query": m @ C}
    return out, maps


def check(case, backend, *, record=None, tol=(1e-4, 1e-5), **kw):
    B = case["q"].shape[0]
    rec = list(range(B)) if record is None else record
    call = prepare(**case, record=record, gen=CONVENTIONS["gen"], ref=CONVENTIONS["ref"], backend=backend, **kw)
    want_out, want = expected(**case, record=rec, **kw)
    gen = torch.Generator().manual_seed(1)  # buffers start at random values of the maps' scale
    prefill = {n: torch.rand(s, generator=gen) * want[n].abs().max().float() for n, s in call.shapes.items()}
    maps = {n: t.clone() for n, t in prefill.items()}
    out = call(case["q"], case["k"], case["v"], maps)
    rtol, atol = tol
    torch.testing.assert_close(out.double(), want_out, rtol=rtol, atol=atol)  # every row, all entries
    torch.testing.assert_close(out, F.scaled_dot_product_attention(case["q"], case["k"], case["v"], **kw),
                               rtol=rtol, atol=atol)
    for n in ALL:
        got = maps[n] - prefill[n]
        torch.testing.assert_close(got.double(), want[n], rtol=rtol, atol=atol * want[n].abs().max().item(),
                                   msg=lambda m: f"{n}: {m}")
    return out, maps


KINDS = ["text, gen, ref", "ref, gen", "text, ref, gen, text"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("record", [None, [1], [0, 2]])
def test_rows_and_reference_keys_at_awkward_offsets(kind, backend, record, poisoned):
    case = joint_case(kind, B=3, d=80, seed=len(kind))
    check(case, backend, record=record, scale=0.11)


@pytest.mark.parametrize("kind", KINDS)
def test_thousands_of_keys_on_the_torch_backend(kind, poisoned):
    """About 2,600 tokens: several query chunks, rows starting and ending inside chunks."""
    case = joint_case(kind, B=1, H=2, d=40, n_text=27, grid_gen=(33, 40), grid_ref=(30, 40), Rw=2, Ru=2)
    check(case, "torch")


def test_fp16_rows_on_the_torch_backend(poisoned):
    case = joint_case("text, gen, ref", dtype=torch.float16, d=40)
    check(case, "torch", tol=(2e-2, 2e-3))


@pytest.mark.skipif(not triton_available(torch.device("cpu")), reason="needs triton (the CPU interpreter)")
@pytest.mark.parametrize("kind,dtype", [("text, gen, ref", torch.float32), ("ref, gen", torch.float16),
                                        ("text, ref, gen, text", torch.float32)])
def test_triton_backend_under_the_interpreter(kind, dtype, poisoned):
    case = joint_case(kind, d=40, dtype=dtype, seed=3)
    check(case, "triton", record=[1], tol=(1e-4, 1e-5) if dtype == torch.float32 else (2e-2, 2e-3))


def test_rows_default_to_all_and_maps_have_the_rows_count():
    case = joint_case("text, gen, ref")
    out, maps = attention_with_maps(case["q"], case["k"], case["v"], query_rows=slice(5, 17), backend="torch")
    assert maps["gen_query"].shape == (2, 2, 1, 12)
    torch.testing.assert_close(maps["gen_query"].sum(-1), torch.ones(2, 2, 1))  # C sums to 1 over the rows
    _, full = attention_with_maps(case["q"], case["k"], case["v"], query_rows=slice(None), backend="torch")
    assert full["gen_query"].shape[-1] == case["q"].shape[2]


@pytest.mark.parametrize("rows,err,match", [
    ([1, 2], TypeError, "query_rows must be a slice"),
    (slice(0, 10, 2), ValueError, "step 1"),
    (slice(40, 50), ValueError, "non-empty slice"),
])
def test_bad_query_rows(rows, err, match):
    q = torch.randn(1, 2, 29, 8)
    with pytest.raises(err, match=match):
        attention_with_maps(q, q, q, query_rows=rows)
    with pytest.raises(err, match=match):
        attention_with_maps(q, q, q, query_rows=rows, record=[])


def test_query_probes_must_cover_the_rows():
    q = torch.randn(1, 2, 29, 8)
    with pytest.raises(ValueError, match=r"query_probes must be \(R, \|query_rows\|=12\)"):
        attention_with_maps(q, q, q, query_rows=slice(5, 17), query_probes=torch.ones(1, 29))


def test_the_kernel_layer_never_imports_the_analysis_layer():
    """kernels/ is installed as i2am.kernels but stands alone: no module of it imports i2am.*."""
    import ast
    from pathlib import Path

    for path in (Path(__file__).resolve().parents[1] / "kernels").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else []
            assert not any(n == "i2am" or n.startswith("i2am.") for n in names), f"{path.name} imports {names}"
