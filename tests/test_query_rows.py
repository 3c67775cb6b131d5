"""query_rows (SPEC 3c): maps on a sub-range of the queries of a joint attention call.

The argument's rules, and the torch backend on thousands of tokens. Every backend runs the joint
layouts (slices and strided index tensors) in the contract suite, test_backends.py, against the
float64 definitions of cases.joint_expected.
"""
import pytest
import torch

from cases import check_op, joint_case, poison
from i2am.kernels import attention_with_maps


@pytest.fixture
def poisoned(monkeypatch):
    poison(monkeypatch)


@pytest.mark.parametrize("kind", ["text, gen, ref", "ref, gen", "text, ref, gen, text", "text, gen | ref"])
def test_thousands_of_keys_on_the_torch_backend(kind, poisoned):
    """About 2,600 tokens: several query chunks, rows starting and ending inside chunks (side by
    side: every chunk holds rows of several half-rows)."""
    case = joint_case(kind, B=1, H=2, d=40, n_text=27, grid_gen=(30, 40), grid_ref=(30, 40), Rw=2, Ru=2)
    check_op(case, "torch")


def test_rows_default_to_all_and_maps_have_the_rows_count():
    case = joint_case("text, gen, ref")
    out, maps = attention_with_maps(case["q"], case["k"], case["v"], query_rows=slice(5, 17), backend="torch")
    assert maps["gen_query"].shape == (2, 2, 1, 12)
    torch.testing.assert_close(maps["gen_query"].sum(-1), torch.ones(2, 2, 1))  # C sums to 1 over the rows
    _, full = attention_with_maps(case["q"], case["k"], case["v"], query_rows=slice(None), backend="torch")
    assert full["gen_query"].shape[-1] == case["q"].shape[2]


@pytest.mark.parametrize("rows,err,match", [
    ([1.0, 2.0], TypeError, "query_rows must hold integer indices"),
    (torch.tensor([True, False]), TypeError, "query_rows must hold integer indices"),
    ([3, 4, 3], ValueError, "query_rows must not repeat an index"),
    ([0, 29], ValueError, r"query_rows must index range\(0, 29\)"),
    (slice(40, 50), ValueError, "query_rows must select at least one"),
    (slice(0, 10, -1), ValueError, "query_rows selects no index"),
])
def test_bad_query_rows(rows, err, match):
    q = torch.randn(1, 2, 29, 8)
    with pytest.raises(err, match=match):
        attention_with_maps(q, q, q, query_rows=rows)
    with pytest.raises(err, match=match):
        attention_with_maps(q, q, q, query_rows=rows, record=[])


def test_strided_rows_are_an_index_and_a_contiguous_index_is_a_slice():
    """An index tensor that is one range in order keeps the slice path (row views, no copy); a
    strided slice is its index tensor; maps follow the rows' order."""
    from i2am.kernels import prepare, query_row_range

    assert query_row_range(torch.tensor([3, 4, 5]), 29) == slice(3, 6)
    assert query_row_range([7], 29) == slice(7, 8)
    assert torch.equal(query_row_range(slice(0, 10, 3), 29), torch.tensor([0, 3, 6, 9]))
    assert torch.equal(query_row_range(slice(10, 0, -4), 29), torch.tensor([10, 6, 2]))
    q = torch.randn(1, 2, 29, 8)
    assert prepare(q, q, q, query_rows=torch.arange(29)[4:9]).query_rows == slice(4, 9)
    rows = torch.tensor([9, 2, 5])
    _, maps = attention_with_maps(q, q, q, query_rows=rows, query_probes=torch.eye(3), backend="torch")
    _, ordered = attention_with_maps(q, q, q, query_rows=rows.sort().values, query_probes=torch.eye(3),
                                     backend="torch")
    assert maps["gen_query"].shape == (1, 2, 1, 3)
    torch.testing.assert_close(maps["gen_query"], ordered["gen_query"][..., [2, 0, 1]])
    torch.testing.assert_close(maps["ref_key"], ordered["ref_key"][:, :, [2, 0, 1]])


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


def test_slices_with_any_step_are_their_indices():
    """A reversed or strided slice of ref_keys, record or query_rows selects what range() does."""
    q = torch.randn(3, 2, 11, 8)
    for sel in (slice(None, None, -1), slice(9, 0, -3), slice(1, None, 4)):
        idx = torch.tensor(range(11)[sel])
        _, by_slice = attention_with_maps(q, q, q, ref_keys=sel, query_rows=sel, gen=("query", "key"),
                                          ref=("key", "query"), backend="torch")
        _, by_index = attention_with_maps(q, q, q, ref_keys=idx, query_rows=idx, gen=("query", "key"),
                                          ref=("key", "query"), backend="torch")
        for n in by_slice:
            assert torch.equal(by_slice[n], by_index[n]), (sel, n)
    _, maps = attention_with_maps(q, q, q, record=slice(None, None, -2), backend="torch")
    _, want = attention_with_maps(q, q, q, record=[2, 0], backend="torch")
    assert torch.equal(maps["gen_query"], want["gen_query"])
