"""The backend contract of the op (kernels/api.py), one suite for every backend: torch, Triton (in
its CPU interpreter without a GPU), CUDA C++ (its host emulation without a GPU) and the reference.

Each case runs against the materialised float64 equations on awkward shapes (head dims 40/80/160,
Nk of 1 + h*w tokens, 77, a tile and a bit), with poisoned outputs (NaN: an unwritten row fails) and
map buffers that start at random values (a backend must add into them), within tolerances relative
to the reference's own error in the inputs' dtype (cases.check_backend). Tests of one backend's
internals (tiling, passes, emulation, host overhead) stay in that backend's file.
"""
import pytest
import torch

from cases import DEVICE, check_backend, check_op, joint_case, make_case, poison

ALL = ("gen_query", "gen_key", "ref_key", "ref_query")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
NKS = (1, 7, 77, 257, 128)  # 128: whole key tiles only (64 in the Triton interpreter)
OP_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 2e-3), torch.bfloat16: (5e-2, 2e-2)}


def dtype_of(backend, d, Nk):
    """float32 everywhere, and on CUDA each head dim and each Nk meets every dtype."""
    return DTYPES[((40, 80, 160).index(d) + NKS.index(Nk)) % 3] if backend.name == "cuda" else torch.float32


def needs(backend, dtype):
    if dtype not in backend.dtypes:
        pytest.skip(f"the {backend.name} backend has no {dtype} here")


@pytest.mark.parametrize("d", [40, 80, 160])
@pytest.mark.parametrize("Nk", NKS)
def test_matches_reference(backend, d, Nk):
    case = make_case(Nq=45, Nk=Nk, d=d, dtype=dtype_of(backend, d, Nk), names=ALL, seed=d + Nk, device=DEVICE)
    # torch: 4 chunks of 12, 12, 12 and 9 rows; Triton: 3 query blocks of 16 in the interpreter, 2 + 1
    check_backend(backend.name, case, **backend.options, **backend.tiles(case, rows=12, splits=2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ref", ["tail", "index", "all"])
def test_strided_dtypes_ref_keys_record_subset(backend, dtype, ref):
    needs(backend, dtype)
    case = make_case(B=3, H=3, Nq=6 * 5, Nk=1 + 4 * 3, d=80, dv=40, dtype=dtype, ref=ref, record=[2, 0],
                     strided=True, names=ALL, device=DEVICE)
    check_backend(backend.name, case, **backend.options, **backend.tiles(case, rows=7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_index_views_with_strides(backend, dtype):
    """record and ref_keys as strided views (a slice with a step of an index tensor): a backend that
    read them as contiguous would record entry 1 and keys 1, 2, 3, ... instead."""
    case = make_case(B=3, H=2, Nq=21, Nk=1 + 4 * 5, d=40, dtype=dtype, names=ALL, device=DEVICE)
    case.record_idx = torch.arange(3, device=DEVICE)[::2]  # entries 0 and 2
    case.ref_idx = torch.arange(21, device=DEVICE).flip(0)[1::3]  # keys 19, 16, ..., 1
    case.key_probes = case.key_probes[:, :case.ref_idx.numel()]
    assert not case.record_idx.is_contiguous() and not case.ref_idx.is_contiguous()
    check_backend(backend.name, case, **backend.options)


@pytest.mark.parametrize("scale", [1e-30, 3e-29, 1e-20])
def test_any_positive_scale(backend, scale):
    """Scales far below d^-0.5: every score near 0, softmaxes near uniform. Keys past Nk in a last
    partial tile (77 keys) must stay out of every softmax however small the scale."""
    case = make_case(Nq=20, Nk=77, d=40, names=ALL, scale=scale, device=DEVICE)
    check_backend(backend.name, case, **backend.options)


KINDS = ["text, gen, ref", "ref, gen", "text, ref, gen, text", "text, gen | ref", "ref | gen"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_query_rows_and_ref_keys_through_the_op(backend, monkeypatch, kind, dtype):
    """query_rows and ref_keys of one joint sequence, as slices and, side by side ("gen | ref": the
    two grids beside each other in one latent), as strided index tensors: the rows reach the
    backend as row views (offset, often off 16-byte alignment) or copies; out is written for every
    row of every entry, the maps for the rows alone."""
    needs(backend, dtype)
    poison(monkeypatch)
    backend.route(monkeypatch)
    case = joint_case(kind, d=40, dtype=dtype, seed=4, grid_ref=(3, 3), device=DEVICE)
    check_op(case, backend.name, record=[1], tol=OP_TOL[dtype])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("record", [None, [1], [0, 2]])
def test_query_rows_with_record_subsets(backend, monkeypatch, kind, record):
    if backend.name in ("triton", "cuda") and DEVICE == "cpu" and record != [0, 2]:
        pytest.skip("interpreted and emulated backends take one of the subsets (tiny shapes)")
    poison(monkeypatch)
    backend.route(monkeypatch)
    case = joint_case(kind, B=3, d=80, seed=len(kind), grid_ref=(3, 4), device=DEVICE)
    check_op(case, backend.name, record=record, scale=0.11)
