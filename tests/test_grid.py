"""Layer grids and the probe pull-back against the materialised eq. 14-17."""
import pytest
import torch

from cases import make_case
from i2am import reference
from i2am.grid import layer_grid, pullback
from i2am.kernels import attention_with_maps
from i2am.probes import key_probes, query_probes


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("grid,size", [((3, 5), (12, 20)), ((4, 4), (9, 7)), ((6, 4), (6, 4))])
def test_pullback_is_the_adjoint(mode, grid, size):
    m = torch.rand(3, *size, dtype=torch.float64)
    brute = torch.stack([reference.pullback(r, grid, mode) for r in m])
    torch.testing.assert_close(pullback(m, grid, mode).double(), brute, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["bicubic", "bilinear", "nearest"])
def test_ref_map_with_pulled_back_probes_equals_eq14(mode):
    grid, size = (4, 6), (16, 24)
    probes = query_probes(size, mask=(torch.rand(32, 48) > 0.6), points=[(3, 7)], boxes=[(2, 3, 9, 11)])
    c = make_case(B=1, H=2, Nq=24, Nk=10, d=40)
    _, maps = attention_with_maps(c.q, c.k, c.v, query_probes=pullback(probes.weights, grid, mode),
                                  gen=(), ref=("key", "query"), backend="torch")
    P, C = reference.softmaxes(c.q.double(), c.k.double(), 40 ** -0.5)
    for name, S in (("ref_key", P), ("ref_query", C)):
        for h in range(2):
            want = torch.stack([reference.ref_map_eq14(S[0, h], grid, m, mode) for m in probes.weights.double()])
            torch.testing.assert_close(maps[name][0, h].double(), want, rtol=1e-4, atol=1e-6)


def test_uniform_probe_keeps_its_mass():
    w = pullback(query_probes((13, 9)).weights, (4, 3), "bicubic")
    torch.testing.assert_close(w.sum(), torch.tensor(1.0))


@pytest.mark.parametrize("nq,size,grid", [(64 * 48, (64, 48), (64, 48)), (32 * 24, (64, 48), (32, 24)),
                                          (4 * 3, (27, 17), (4, 3)), (3 * 2, (27, 17), (3, 2)),
                                          (7 * 5, (27, 17), (7, 5))])
def test_layer_grid(nq, size, grid):
    assert layer_grid(nq, size) == grid


def test_layer_grid_error():
    with pytest.raises(ValueError, match="cannot infer the grid of a layer with Nq=50"):
        layer_grid(50, (64, 64))


@pytest.mark.parametrize("kwargs,match", [
    ({"points": [(8, 0)]}, r"point \(8, 0\) is off the latent grid 8x6"),
    ({"points": [(0, -1)]}, "off the latent grid"),
    ({"points": [(1, 2, 3)]}, "must be 2 integers"),
    ({"boxes": [(0, 0, 9, 2)]}, r"0 <= top < bottom <= 8"),
    ({"boxes": [(3, 3, 3, 4)]}, "end-exclusive"),
    ({"mask": torch.zeros(16, 12)}, "mask is empty"),
    ({"mask": torch.ones(2, 16, 12)}, "mask must be 2-D"),
    ({"points": [(1, 1), (1, 1)]}, "given twice"),
])
def test_bad_query_probes(kwargs, match):
    with pytest.raises(ValueError, match=match):
        query_probes((8, 6), **kwargs)


def test_query_probes_rows():
    mask = torch.zeros(16, 12)
    mask[4:8, 2:6] = 1
    p = query_probes((8, 6), mask=mask, points=[(1, 2)], boxes=[(0, 1, 2, 4)])
    assert p.labels == (("uniform",), ("mask",), ("point", (1, 2)), ("box", (0, 1, 2, 4)))
    torch.testing.assert_close(p.weights.sum((-2, -1)), torch.tensor([1.0, 4 / 48, 1.0, 1.0]))
    assert p.weights[1].nonzero().tolist() == [[r, c] for r in (2, 3) for c in (1, 2)]


def test_key_probes():
    p = key_probes((3, 4), patches=[(2, 3)])
    assert p.labels == (("uniform",), ("patch", (2, 3)))
    assert p.weights[1, 2, 3] == 1 and p.weights[1].sum() == 1
    with pytest.raises(ValueError, match=r"patch \(3, 0\) is off the reference grid 3x4"):
        key_probes((3, 4), patches=[(3, 0)])


def test_pullback_under_no_grad_and_inference_mode():
    m = torch.rand(2, 6, 8)
    with torch.no_grad():
        a = pullback(m, (3, 4))
    with torch.inference_mode():
        b = pullback(m, (3, 4))
    assert torch.equal(a, b) and torch.equal(a, pullback(m, (3, 4)))
