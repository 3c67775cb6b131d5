"""The fused Triton backend against the materialised reference (SPEC sections 2 and 5).

Without CUDA these run in Triton's CPU interpreter (TRITON_INTERPRET=1, set in conftest.py;
small shapes, one autotune config); with CUDA the same cases compile for the GPU. The case matrix
every backend passes is in test_backends.py; here the launcher's and the kernels' own cases.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from cases import check_backend, make_case  # noqa: E402  (after the skip: triton may be absent)
from i2am.kernels import attention_with_maps, backend_module  # noqa: E402

ALL = ("gen_query", "gen_key", "ref_key", "ref_query")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("names", [("gen_query",), ("ref_key",), ("gen_key", "ref_query")])
def test_map_subsets_accumulate_over_calls(names):
    case = make_case(Nq=20, Nk=17, names=names, device=DEVICE)
    check_backend("triton", case, calls=3, splits=3)


@pytest.mark.parametrize("names,dtype,Ru", [(ALL, torch.float32, 2), (ALL, torch.float16, 2),
                                             (("gen_query",), torch.float32, 2), (ALL, torch.float32, 1)])
def test_blocks_of_extreme_scores_take_the_direct_exponential(names, dtype, Ru):
    """Queries 0-15 (the first interpreter block) score up to ~100 nats: their heads are past RANGE
    and compute C directly, and columns the stats pass's shift loses take the exact column pass."""
    case = make_case(Nq=45, Nk=77, names=names, dtype=dtype, Ru=Ru, device=DEVICE)
    case.q[:, :, :16] *= 20
    check_backend("triton", case, splits=2)


@pytest.mark.parametrize("d,dtype", [(40, torch.float16), (80, torch.float32)])
@pytest.mark.parametrize("names", [ALL, ("gen_query", "ref_key")])
def test_one_key_probe_sums_a_tile_of_running_products(d, dtype, names):
    """One key probe (the default gen maps): the gen maps keep a tile of running products over the
    key tiles (77 keys: a masked last tile), summed once per query block; program 0 takes two
    query blocks, so the tile must start afresh at each."""
    case = make_case(Nq=45, Nk=77, d=d, dtype=dtype, Ru=1, Rw=6, names=names, seed=d, device=DEVICE)
    check_backend("triton", case, splits=2)


def test_one_probe_gen_tiles_prune_the_configs_that_spill():
    """sm_90a compiles of the main pass (bench/triton_sass.py) at 32 scores a thread spill, and at
    head dims 80-128 so do 64-key tiles and 4 warps; tiles of running products take a register a
    score: with both gen maps, 64-key tiles spill, and 64-query blocks from head dim 80. The
    launcher keeps the others."""
    from i2am.kernels import triton_kernels as tk
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w)
               for bm, bn, w in [(128, 64, 8), (128, 32, 8), (64, 64, 8), (64, 32, 8), (64, 64, 4), (64, 32, 4)]]

    def kept(d, **maps):
        args = dict(dict(GEN_KEY=False, GEN_QUERY=False), nq_bucket=4096, D=d, DV=d,
                    ROWSUM=True, **maps)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in tk._prune(configs, args)]

    assert kept(64, GEN_QUERY=True) == [(128, 32, 8), (64, 64, 8), (64, 32, 8), (64, 32, 4)]
    assert kept(128, GEN_QUERY=True) == [(128, 32, 8), (64, 32, 8)]
    assert kept(64, GEN_KEY=True, GEN_QUERY=True) == [(128, 32, 8), (64, 32, 8), (64, 32, 4)]
    assert kept(128, GEN_KEY=True, GEN_QUERY=True) == [(128, 32, 8)]
    assert kept(64) == [(128, 32, 8), (64, 64, 8), (64, 32, 8), (64, 32, 4)]  # ref maps only: no gen tile
    assert kept(256) == [(128, 32, 8), (64, 32, 8), (64, 32, 4)]


@pytest.mark.parametrize("Ru,Rw", [(70, 70), (2, 70), (70, 3)])
def test_more_probes_than_one_launch_holds(Ru, Rw):
    case = make_case(Nq=17, Nk=9, Ru=Ru, Rw=Rw, names=ALL, device=DEVICE)
    check_backend("triton", case)


def test_attention_with_maps_end_to_end():
    case = make_case(B=2, H=2, Nq=33, Nk=12, d=40, strided=True, device=DEVICE)
    kw = dict(scale=0.3, ref_keys=torch.tensor([5, 1, 5, 11]), record=[1], gen=("query", "key"),
              ref=("key", "query"))
    bufs = {n: torch.rand(1, 2, 1, 33 if n.startswith("gen") else 4, device=DEVICE) for n in ALL}
    want_out, want = attention_with_maps(case.q, case.k, case.v, backend="reference", **kw)
    prefill = {n: b.clone() for n, b in bufs.items()}
    out, maps = attention_with_maps(case.q, case.k, case.v, backend="triton", accumulate=bufs, **kw)
    assert maps is bufs
    torch.testing.assert_close(out, want_out, rtol=2e-4, atol=2e-5)
    for n in ALL:
        torch.testing.assert_close(maps[n], prefill[n] + want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_deterministic():
    case = make_case(Nq=45, Nk=40, names=ALL, device=DEVICE)
    runs = []
    for _ in range(2):
        maps = {n: torch.zeros(2, 2, 2 if n.startswith("gen") else 3, 45 if n.startswith("gen") else 39,
                               device=DEVICE) for n in ALL}
        out = torch.empty_like(case.q)
        backend_module("triton").run(case.q, case.k, case.v, out, maps, scale=case.scale, ref_idx=case.ref_idx,
                                     record_idx=case.record_idx, key_probes=case.key_probes,
                                     query_probes=case.query_probes, splits=2)
        runs.append((out, maps))
    assert torch.equal(runs[0][0], runs[1][0])
    for n in ALL:
        assert torch.equal(runs[0][1][n], runs[1][1][n]), n


def test_float64_runs_on_the_torch_backend():
    case = make_case(Nq=10, Nk=6, dtype=torch.float64, device=DEVICE)
    want_out, want = attention_with_maps(case.q, case.k, case.v, backend="reference")
    out, maps = attention_with_maps(case.q, case.k, case.v, backend="triton")
    torch.testing.assert_close(out, want_out, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(maps["ref_key"], want["ref_key"], rtol=1e-4, atol=1e-6)


def test_splits_stay_within_query_blocks_and_scratch_cap():
    triton_backend = backend_module("triton")
    cpu = torch.device("cpu")
    split_count = triton_backend._split_counter(1000, 65536, 1025, 8, 14, cpu)  # Nq, Nk, BH, partial rows
    assert 1 <= split_count(64) and split_count(64) * 4 * 8 * 1025 * 14 <= triton_backend.SCRATCH_BYTES
    split_count = triton_backend._split_counter(1000, 40, 7, 2, 3, cpu)
    assert (split_count(16), split_count(64), split_count(128)) == (3, 1, 1)  # the query blocks of each config


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_columns_far_below_every_row_take_the_exact_column_pass(dtype):
    """Keys 3 and 5 score ~150 bits below every query's best key: at the stats pass's one shift
    per tile their column sums vanish in float32, so col_lse_kernel must flag them and
    exact_lse_kernel redo them (without it, C on those keys is inf or NaN)."""
    case = make_case(Nq=40, Nk=9, d=16, names=ALL, dtype=dtype, device=DEVICE)
    for x in (case.q, case.k):
        x[..., 0] = 0.0
    case.q[..., 0] = 8.0
    case.k[:, :, :, 0] = 2.0
    case.k[:, :, [3, 5], 0] = -10.0  # scores ~ 8 * 2 / 4 = 4 nats for the others, -20 nats for these
    case.scale = 4.0  # ... scaled to ~16 and ~-80 nats: 96 nats = 138 bits apart
    check_backend("triton", case, splits=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_far_below_their_block_take_the_exact_row_pass(dtype):
    """Queries 3 and 5 score ~400 bits below the other queries of their block on every key: at the
    stats pass's one shift per tile their row sums vanish in float32, so the stats pass must flag
    them and exact_lse_kernel redo them (without it their lse_row is +inf: P, out and every map
    on those rows are 0 instead of a softmax)."""
    case = make_case(Nq=40, Nk=9, d=16, names=ALL, dtype=dtype, device=DEVICE)
    for x in (case.q, case.k):
        x[..., 0] = 0.0
    case.q[..., 0] = 8.0
    case.q[:, :, [3, 5], 0] = -30.0
    case.k[:, :, :, 0] = 2.0  # scores ~ 8 * 2 / 4 = 4 nats for the others, -15 nats for these
    case.scale = 4.0  # ... scaled to ~16 and ~-240 nats: about 370 bits apart
    check_backend("triton", case, splits=2)


@pytest.mark.parametrize("dtype,Ru", [(torch.float32, 2), (torch.float16, 1)])
def test_rows_scoring_far_below_zero_keep_the_padded_keys_finite(dtype, Ru):
    """Every score ~200 bits below zero: lse_row is too, so the keys past Nk of the last tile (77
    keys: 51 of a 64-key tile; their score is 0) would get P = 2^-lse_row = inf (or an fp16 inf),
    and inf times their zero value a NaN in out and every map: the main pass's last tile must
    mask them (its whole tiles have no key mask)."""
    case = make_case(Nq=45, Nk=77, names=ALL, dtype=dtype, Ru=Ru, device=DEVICE)
    gen = torch.Generator().manual_seed(3)
    case.q = (-4.7 + 0.3 * torch.randn(case.q.shape, generator=gen)).to(case.q)
    case.k = (4.7 + 0.3 * torch.randn(case.k.shape, generator=gen)).to(case.k)  # t ~ -9 * 4.7^2 ~ -200 bits
    check_backend("triton", case, splits=2)
