"""The three-call composition (the torch backend's yardstick) and attention_lse against the
materialised float64 reference."""
import pytest
import torch
import torch.nn.functional as F

from cases import assert_map_close, make_case
from i2am.kernels import composition
from i2am.kernels.testing import call_maps

ALL = ("gen_query", "gen_key", "ref_key", "ref_query")


@pytest.mark.parametrize("names", [ALL, ("gen_query", "ref_key"), ("gen_key",), ("ref_query",)])
@pytest.mark.parametrize("ref, rows", [("tail", None), ("index", slice(5, 30))])
def test_maps_match_the_reference(names, ref, rows):
    case = make_case(B=3, H=2, Nq=37, Nk=23, d=40, ref=ref, record=[2, 0], strided=True, names=names, Rw=6)
    out, maps = composition.three_call_maps(
        case.q, case.k, case.v, scale=case.scale, ref_idx=case.ref_idx, record_idx=case.record_idx,
        key_probes=case.key_probes, query_probes=case.query_probes[:, rows or slice(None)], query_rows=rows,
        names=names)
    want_out, want = call_maps(case.q, case.k, case.v, scale=case.scale, ref_idx=case.ref_idx,
                               record_idx=case.record_idx, key_probes=case.key_probes,
                               query_probes=case.query_probes[:, rows or slice(None)], query_rows=rows, names=names)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    assert list(maps) == list(names)
    for name in names:
        assert_map_close(maps[name], want[name], torch.float32, name)


def _lse(q, k, scale):
    return torch.logsumexp(scale * q.double() @ k.double().transpose(-1, -2), -1).float()


@pytest.mark.parametrize("dv", [24, 40, 56])
def test_attention_lse_any_head_sizes_and_strides(dv):
    """The fused CPU op takes one head size and misreads a strided last dimension: both are
    handled before it is called."""
    g = torch.Generator().manual_seed(dv)
    q = torch.randn(2, 3, 40, 19, generator=g).transpose(-1, -2)[:, :, :, :11]  # last dim strided
    k, v = torch.randn(2, 3, 13, 11, generator=g), torch.randn(2, 3, 13, dv, generator=g)
    out, lse = composition.attention_lse(q, k, v, 0.4)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.4), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, _lse(q, k, 0.4), rtol=1e-5, atol=1e-5)


def test_attention_lse_falls_back_when_the_fused_op_fails(monkeypatch):
    def broken(*args):
        raise RuntimeError("this build has no such op")

    monkeypatch.setitem(composition._FUSED, "cpu", broken)
    monkeypatch.setattr(composition, "LSE_CHUNK_BYTES", 4 * 2 * 3 * 13 * 7)  # several row chunks
    q, k, v = torch.randn(2, 3, 40, 16), torch.randn(2, 3, 13, 16), torch.randn(2, 3, 13, 8)
    out, lse = composition.attention_lse(q, k, v, 0.3)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))
    torch.testing.assert_close(lse, _lse(q, k, 0.3), rtol=1e-5, atol=1e-5)


def test_attention_lse_falls_back_when_the_fused_op_changes_its_outputs(monkeypatch):
    monkeypatch.setitem(composition._FUSED, "cpu", lambda q, k, v, s: (q, q))  # a (B,H,Nq,d) "lse"
    q, k, v = torch.randn(1, 2, 9, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    out, lse = composition.attention_lse(q, k, v, 0.3)
    torch.testing.assert_close(lse, _lse(q, k, 0.3), rtol=1e-5, atol=1e-5)
