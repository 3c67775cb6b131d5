"""The streaming torch backend against the materialised reference (SPEC sections 2 and 5)."""
import pytest
import torch

from cases import check_backend, make_case

ALL = ("gen_query", "gen_key", "ref_key", "ref_query")


@pytest.mark.parametrize("d", [40, 80, 160])
@pytest.mark.parametrize("Nk", [1, 7, 77, 257])
def test_matches_reference(d, Nk):
    case = make_case(Nq=45, Nk=Nk, d=d, names=ALL, seed=d + Nk)
    check_backend("torch", case, chunk_bytes=4 * 2 * Nk * 16)  # 16 rows a chunk: 45 is no multiple


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("ref", ["tail", "index", "all"])
def test_strided_dtypes_ref_keys_record_subset(dtype, ref):
    case = make_case(B=3, H=3, Nq=6 * 5, Nk=1 + 4 * 3, d=80, dv=40, dtype=dtype, ref=ref, record=[2, 0],
                     strided=True, names=ALL)
    check_backend("torch", case, chunk_bytes=4 * 3 * 13 * 7)


def test_accumulates_over_calls():
    case = make_case(Nq=20, Nk=17, names=ALL)
    check_backend("torch", case, calls=3)


def test_one_chunk_per_query_row():
    case = make_case(Nq=9, Nk=5, names=ALL)
    check_backend("torch", case, chunk_bytes=1)
