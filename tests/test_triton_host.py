"""The host side of the Triton backend on the cached path (SPEC section 6: at most one
host-device synchronisation per recorded call): what a kept MapsCall does around the kernels.

The kernels are replaced by stubs that only record their launches, so that the torch ops and
synchronisations counted are the launcher's own. Synchronisations are counted without CUDA:
every read of a tensor's value on the host (.item(), bool(), int(), float() dispatch to
_local_scalar_dense or is_nonzero) and every .cpu()/.tolist()/.numpy() call.
"""
import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("triton")

from cases import check_backend, make_case  # noqa: E402
from i2am import Recorder  # noqa: E402
from i2am.kernels import attention_with_maps, backend_module  # noqa: E402

KERNELS = ("stats_kernel", "exact_lse_kernel", "col_lse_kernel", "main_kernel", "ref_reduce_kernel")
# a recorded call with C maps: the exact pass runs for the rows, then (after col_lse) for the columns
LAUNCHES = ["stats_kernel", "exact_lse_kernel", "col_lse_kernel", "exact_lse_kernel", "main_kernel",
            "ref_reduce_kernel"]
HOST_READS = ("aten._local_scalar_dense.default", "aten.is_nonzero.default", "aten.item.default")


class Counted(TorchDispatchMode):
    """Counts the aten ops run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


class StubKernel:
    """kernel[grid](...) records (name, grid, BLOCK_M) and computes nothing."""

    def __init__(self, name, launches, block_m=16):
        self.name, self.launches = name, launches
        self.best_config = type("Config", (), {"kwargs": {"BLOCK_M": block_m, "BLOCK_N": 64}})()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            meta = {**kwargs, **self.best_config.kwargs}
            self.launches.append((self.name, grid(meta) if callable(grid) else grid, kwargs.get("BLOCK_M")))
        return launch


@pytest.fixture
def launches(monkeypatch):
    launched = []
    tb = backend_module("triton")
    for name in KERNELS:
        monkeypatch.setattr(tb, name, StubKernel(name, launched))
    return launched


@pytest.fixture
def host_reads(monkeypatch):
    """A counter of the .cpu()/.tolist()/.numpy() calls made while it is live."""
    reads = collections.Counter()
    for name in ("cpu", "tolist", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name, **k):
            reads[_name] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


def diffusers_qkv(B=2, H=8, Nq=8 * 12, Nk=1 + 3 * 4, d=40, dtype=torch.float16):
    """(B, H, N, d) views of (B, N, H*d) projections, as diffusers' processors pass them."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(B, n, H * d, generator=gen).to(dtype).view(B, n, H, d).transpose(1, 2) for n in (Nq, Nk, Nk)]


def recorder():
    return Recorder(ref_grid=(3, 4), latent_size=(8, 12), num_steps=2, mask=torch.ones(8, 12), points=[(1, 2), (5, 7)],
                    backend="triton")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_a_cached_recorded_call_reads_nothing_back_and_runs_few_ops(launches, host_reads, dtype):
    rec = recorder()
    q, k, v = diffusers_qkv(dtype=dtype)
    rec.record("up.attn2", q, k, v, step=0)  # the first call prepares and builds the constants
    launches.clear()
    host_reads.clear()
    with Counted() as counted:
        out = rec.record("up.attn2", q, k, v, step=1)
    syncs = sum(counted.ops[op] for op in HOST_READS) + sum(host_reads.values())
    assert syncs <= 1, (counted.ops, host_reads)
    assert sum(counted.ops.values()) <= 60, counted.ops
    assert [name for name, *_ in launches] == LAUNCHES
    assert out.shape == (2, 8, 96, 40) and out.stride() == q.stride()  # in q's layout: no copy for diffusers


def test_the_grid_follows_the_chosen_query_block(launches):
    """Programs per head from the config the kernel runs with, and the reductions read as many
    partials as that launch wrote."""
    q, k, v = diffusers_qkv(B=1, H=1, Nq=200, Nk=9)
    tb = backend_module("triton")
    tb.stats_kernel.best_config.kwargs["BLOCK_M"] = 128
    maps = {"gen_query": torch.zeros(1, 1, 1, 200), "ref_key": torch.zeros(1, 1, 1, 9)}
    tb.run(q, k, v, torch.empty_like(q), maps, scale=0.1, ref_idx=torch.arange(9), record_idx=torch.tensor([0]),
           key_probes=torch.full((1, 9), 1 / 9), query_probes=torch.full((1, 200), 1 / 200), splits=100)
    grids = {name: grid for name, grid, _ in launches}
    assert grids["stats_kernel"] == (2, 1) and grids["main_kernel"] == (13, 1)  # 200 rows: 2 blocks of 128, 13 of 16


def test_kept_probes_follow_in_place_changes():
    """The scaled and placed probes are built once per MapsCall; changing the caller's probe
    tensors in place between calls must still give the maps of the new probes."""
    case = make_case(Nq=20, Nk=9, names=("gen_query", "ref_key"))
    check_backend("triton", case)
    case.key_probes.mul_(3.0)
    case.query_probes[0].neg_()
    check_backend("triton", case)


def test_out_keeps_q_layout_and_unrecorded_entries():
    q, k, v = diffusers_qkv(B=3, H=2, Nq=24, Nk=5, d=16, dtype=torch.float32)
    out, _ = attention_with_maps(q, k, v, record=[1], backend="triton")
    assert out.stride() == q.stride()
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=2e-4, atol=2e-5)


def test_kept_constants_follow_their_tensors():
    tb = backend_module("triton")
    t = torch.ones(3)
    assert tb._cached((t,), "x", lambda: 1) == 1 and tb._cached((t,), "x", lambda: 2) == 1  # built once
    t.add_(1)
    assert tb._cached((t,), "x", lambda: 3) == 3  # an in-place change rebuilds
    n = len(tb._CONSTANTS)
    del t
    assert len(tb._CONSTANTS) == n - 1  # and the entry goes with the tensor
