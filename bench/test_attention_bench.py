"""pytest-benchmark suite: `pytest bench/` (CPU shapes; the GPU shapes of bench/RESULTS.md with CUDA).

Each parameter set times one column of i2am.benchmark on the same inputs, so the saved
benchmark JSON holds SDPA and every i2am/naive/capture column side by side. No assertion is
about time: the comparison is the table (`i2am bench`), not a pass/fail.
"""
import pytest
import torch

from i2am import benchmark as table

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
SHAPES = ([s for s in table.GPU_SHAPES if s[1] >= 4096 and s[3] in (40, 64)] if DEVICE == "cuda"
          else table.QUICK_CPU_SHAPES)
COLUMNS = table.columns(DEVICE)


@pytest.fixture(scope="module", params=SHAPES, ids=[s[0] for s in SHAPES])
def inputs(request):
    _, nq, nk, d, h = request.param
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, n, d, generator=g).to(DEVICE, DTYPE) for n in (nq, nk, nk))
    ref_idx = torch.arange(1, nk, device=DEVICE)
    kp, qp = table.default_probes(nq, nk - 1, DEVICE)
    return q, k, v, d ** -0.5, ref_idx, [1], kp, qp


@pytest.mark.parametrize("column", list(COLUMNS))
def test_column(benchmark, inputs, column):
    fn = COLUMNS[column]
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def call():
        fn(*inputs)
        sync()

    benchmark.group = "x".join(map(str, inputs[0].shape))
    benchmark(call)

