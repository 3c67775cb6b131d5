"""The streaming torch backend against the materialised reference (SPEC sections 2 and 5): its
chunking and its two ways to C. The case matrix every backend passes is in test_backends.py."""
import os
import subprocess
import sys

import pytest

from cases import check_backend, make_case
from i2am.kernels import torch_backend

ALL = ("gen_query", "gen_key", "ref_key", "ref_query")


def test_accumulates_over_calls():
    case = make_case(Nq=20, Nk=17, names=ALL)
    check_backend("torch", case, calls=3)


def test_one_chunk_per_query_row():
    case = make_case(Nq=9, Nk=5, names=ALL)
    check_backend("torch", case, chunk_bytes=1)


@pytest.mark.parametrize("chunk_bytes", [None, 4 * 2 * 77 * 16])
def test_extreme_scores_take_the_direct_exponential(chunk_bytes):
    """Queries scoring up to ~100 nats spread the entry's lse_row far past C_FROM_P_RANGE above
    its smallest lse_col: C is computed directly (taking it from P would lose whole columns)."""
    case = make_case(Nq=45, Nk=77, names=ALL)
    case.q[:, :, :16] *= 20
    check_backend("torch", case, chunk_bytes=chunk_bytes)


def test_chunks_are_even_and_within_the_budget():
    chunks = torch_backend._chunks(4096, 4 * 8 * 257, 32 * 2**20)
    assert chunks == [(0, 2048), (2048, 4096)]  # not 4080 rows and 16
    assert torch_backend._chunks(45, 8, 8 * 12) == [(0, 12), (12, 24), (24, 36), (36, 45)]
    assert torch_backend._chunks(3, 100, 1) == [(0, 1), (1, 2), (2, 3)]


def test_two_exponentials_forced_by_the_environment():
    """I2AM_C_FROM_P_RANGE=-1 (bench/triton_passes.py's comparison) takes C directly everywhere."""
    script = ("import sys; sys.path.insert(0, 'tests'); from cases import check_backend, make_case\n"
              "from i2am.kernels import torch_backend\n"
              "assert torch_backend.C_FROM_P_RANGE == -1\n"
              "check_backend('torch', make_case(Nq=45, Nk=77, names=('gen_query', 'ref_query')))\n"
              "print('ok')")
    env = dict(os.environ, I2AM_C_FROM_P_RANGE="-1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=root)
    assert res.stdout.strip() == "ok", res.stderr[-2000:]
