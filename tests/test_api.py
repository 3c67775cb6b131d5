"""attention_with_maps: the public op, its defaults, accumulation and its errors (SPEC section 4)."""
import pytest
import torch
import torch.nn.functional as F

from cases import assert_map_close, make_case
from i2am import reference
from i2am.kernels import attention_with_maps


def test_defaults_match_reference():
    c = make_case(B=2, H=3, Nq=33, Nk=77, d=40)
    out, maps = attention_with_maps(c.q, c.k, c.v, backend="torch")
    assert set(maps) == {"gen_query", "ref_key"}
    Nq, Nk = 33, 77
    want_out, want = reference.call_maps(c.q, c.k, c.v, scale=40 ** -0.5, ref_idx=torch.arange(Nk),
                                         record_idx=torch.arange(2), key_probes=torch.full((1, Nk), 1 / Nk),
                                         query_probes=torch.full((1, Nq), 1 / Nq))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(c.q, c.k, c.v), rtol=1e-5, atol=1e-5)
    for n in maps:
        torch.testing.assert_close(maps[n], want[n], rtol=1e-5, atol=1e-7)
    # the query-axis softmax sums to one over queries: the uniform gen_query map sums to 1
    torch.testing.assert_close(maps["gen_query"].sum(-1), torch.ones(2, 3, 1))


@pytest.mark.parametrize("gen,ref", [(("key",), ("query",)), (("query", "key"), ()), ((), ("key", "query"))])
def test_conventions_slices_record_and_scale(gen, ref):
    c = make_case(B=3, H=2, Nq=26, Nk=1 + 5 * 4, d=80, strided=True)
    kp, qp = torch.rand(3, 20), torch.rand(2, 26)
    out, maps = attention_with_maps(c.q, c.k, c.v, scale=0.3, ref_keys=slice(1, None), record=[2, 0],
                                    key_probes=kp, query_probes=qp, gen=gen, ref=ref, backend="torch")
    names = tuple(f"gen_{g}" for g in gen) + tuple(f"ref_{r}" for r in ref)
    assert tuple(maps) == names
    want_out, want = reference.call_maps(c.q, c.k, c.v, scale=0.3, ref_idx=torch.arange(1, 21),
                                         record_idx=torch.tensor([2, 0]), key_probes=kp, query_probes=qp,
                                         names=names)
    torch.testing.assert_close(out, want_out, rtol=1e-4, atol=1e-5)  # unrecorded entry 1 too
    for n in names:
        torch.testing.assert_close(maps[n], want[n], rtol=1e-4, atol=1e-6)


def test_accumulate_adds_in_place_over_calls():
    calls = [make_case(B=2, H=2, Nq=12, Nk=9, seed=s) for s in range(3)]
    acc = {"gen_query": torch.zeros(1, 2, 1, 12), "ref_key": torch.zeros(1, 2, 1, 8)}
    want = {n: 0 for n in acc}
    for c in calls:
        _, maps = attention_with_maps(c.q, c.k, c.v, ref_keys=slice(1, None), record=[1], accumulate=acc,
                                      backend="torch")
        assert maps is acc
        _, one = attention_with_maps(c.q, c.k, c.v, ref_keys=slice(1, None), record=[1], backend="reference")
        want = {n: want[n] + one[n] for n in acc}
    for n in acc:
        torch.testing.assert_close(acc[n], want[n], rtol=1e-5, atol=1e-7)


def test_accumulate_into_strided_views():
    c = make_case(B=1, H=2, Nq=10, Nk=6, names=("gen_query", "ref_key"))
    big = torch.zeros(1, 3, 2, 1, 10)  # (Br, G, H, Ru, Nq): the recorder passes big[:, tau]
    ref = torch.zeros(1, 3, 2, 1, 6)
    attention_with_maps(c.q, c.k, c.v, accumulate={"gen_query": big[:, 1], "ref_key": ref[:, 1]}, backend="torch")
    _, want = attention_with_maps(c.q, c.k, c.v, backend="reference")
    torch.testing.assert_close(big[:, 1], want["gen_query"])
    assert big[:, [0, 2]].abs().sum() == 0 and ref[:, [0, 2]].abs().sum() == 0


def test_fp16_and_unrecorded_calls_are_plain_attention():
    c = make_case(B=2, H=2, Nq=20, Nk=30, d=40, dtype=torch.float16, strided=True)
    out, maps = attention_with_maps(c.q, c.k, c.v, record=[], backend="torch")
    assert out.dtype == torch.float16 and maps["gen_query"].shape == (0, 2, 1, 20)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(c.q, c.k, c.v))
    out, maps = attention_with_maps(c.q, c.k, c.v, backend="torch")
    _, want = attention_with_maps(c.q, c.k, c.v, backend="reference")
    assert_map_close(maps["ref_key"], want["ref_key"], torch.float16)


def _qkv(B=2, H=2, Nq=8, Nk=5, d=4):
    return torch.randn(B, H, Nq, d), torch.randn(B, H, Nk, d), torch.randn(B, H, Nk, d)


@pytest.mark.parametrize("change,err,match", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be 4-D"),
    (lambda q, k, v: (q, k[:, :, :, :3], v), ValueError, r"k must be \(B=2, H=2, Nk, d=4\)"),
    (lambda q, k, v: (q, k, v[:, :, :4]), ValueError, r"v must be"),
    (lambda q, k, v: (q, k.double(), v), TypeError, r"one dtype"),
    (lambda q, k, v: (q.long(), k, v), TypeError, r"floating"),
    (lambda q, k, v: (q[:, :, :0], k, v), ValueError, r"empty attention"),
])
def test_bad_tensors(change, err, match):
    with pytest.raises(err, match=match):
        attention_with_maps(*change(*_qkv()))


@pytest.mark.parametrize("kwargs,err,match", [
    ({"ref_keys": slice(5, None)}, ValueError, "ref_keys selects no index"),
    ({"ref_keys": [0, 5]}, ValueError, r"ref_keys must index range\(0, 5\)"),
    ({"ref_keys": [0.5]}, TypeError, "integer indices"),
    ({"record": [2]}, ValueError, r"record must index range\(0, 2\)"),
    ({"record": [1, 1]}, ValueError, "must not repeat"),
    ({"key_probes": torch.ones(2, 4)}, ValueError, r"key_probes must be \(R, \|ref_keys\|=5\)"),
    ({"query_probes": torch.ones(7)}, ValueError, r"query_probes must be \(R, Nq=8\)"),
    ({"query_probes": torch.full((1, 8), float("nan"))}, ValueError, "finite"),
    ({"gen": ("rows",)}, ValueError, "gen must be distinct entries"),
    ({"scale": -1.0}, ValueError, "scale must be a positive"),
    ({"backend": "jax"}, ValueError, "backend must be one of"),
    ({"accumulate": {"gen_query": torch.zeros(2, 2, 1, 8)}}, ValueError, "exactly the keys"),
    ({"accumulate": {"gen_query": torch.zeros(2, 2, 1, 9), "ref_key": torch.zeros(2, 2, 1, 5)}},
     ValueError, r"accumulate\['gen_query'\] must be float32 \(2, 2, 1, 8\)"),
])
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        attention_with_maps(*_qkv(), **kwargs)


def test_triton_backend_needs_cuda_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        attention_with_maps(*_qkv(), backend="triton")


def test_prepared_call_is_reusable_and_checks_its_signature():
    from i2am.kernels import prepare

    c = make_case(B=2, H=2, Nq=12, Nk=9)
    call = prepare(c.q, c.k, c.v, record=[1], backend="torch")
    acc = {n: torch.zeros(s) for n, s in call.shapes.items()}
    for _ in range(2):
        call(c.q, c.k, c.v, acc)
    _, want = attention_with_maps(c.q, c.k, c.v, record=[1], backend="reference")
    for n in acc:
        torch.testing.assert_close(acc[n], 2 * want[n])
    assert call.matches(c.q, c.k, c.v) and not call.matches(c.q, c.k, c.v, scale=0.1)
    with pytest.raises(ValueError, match="do not match the call these maps were prepared for"):
        call(c.q[:, :, :5], c.k, c.v, acc)


@pytest.mark.parametrize("record", [[1], [0, 2], [2]])
def test_unrecorded_entries_contiguous_or_not_get_plain_attention(record):
    c = make_case(B=3, H=2, Nq=10, Nk=6)
    out, maps = attention_with_maps(c.q, c.k, c.v, record=record, backend="torch")
    torch.testing.assert_close(out, F.scaled_dot_product_attention(c.q, c.k, c.v), rtol=1e-5, atol=1e-5)
    _, want = attention_with_maps(c.q, c.k, c.v, record=record, backend="reference")
    torch.testing.assert_close(maps["ref_key"], want["ref_key"])


@pytest.mark.parametrize("kwargs,err,match", [
    ({"ref_keys": [0, 5]}, ValueError, r"ref_keys must index range\(0, 5\)"),
    ({"key_probes": torch.ones(2, 4)}, ValueError, r"key_probes must be \(R, \|ref_keys\|=5\)"),
    ({"query_probes": torch.full((1, 8), float("nan"))}, ValueError, "finite"),
    ({"gen": ("rows",)}, ValueError, "gen must be distinct entries"),
])
def test_calls_that_record_nothing_check_their_arguments_too(kwargs, err, match):
    with pytest.raises(err, match=match):
        attention_with_maps(*_qkv(), record=[], **kwargs)
