"""The benchmark's baselines compute the same maps as i2am (a fair comparison), and its table."""
import torch

from i2am import benchmark
from i2am.kernels import attention_with_maps


def test_baselines_compute_the_same_maps():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (50, 9, 9))
    ref_idx = torch.arange(1, 9)
    kp, qp = benchmark.default_probes(50, 8, "cpu")
    out, want = attention_with_maps(q, k, v, ref_keys=ref_idx, record=[1], key_probes=kp, query_probes=qp,
                                    backend="reference")
    for fn in (benchmark.naive, lambda *a: benchmark.chunked_capture(*a, chunk=16)):
        o, gen, ref = fn(q, k, v, 0.25, ref_idx, [1], kp, qp)
        torch.testing.assert_close(o, out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ref, want["ref_key"], rtol=1e-5, atol=1e-7)
    # the naive path also has the query-axis softmax (gen_query); the capture tools only P
    _, gen, _ = benchmark.naive(q, k, v, 0.25, ref_idx, [1], kp, qp)
    torch.testing.assert_close(gen, want["gen_query"], rtol=1e-5, atol=1e-7)


def test_table_has_every_column_side_by_side(tmp_path):
    rows = benchmark.run([("tiny", 64, 9, 16, 2)], "cpu", torch.float32, reps=2)
    cols = [r.column for r in rows]
    assert cols == ["sdpa", "i2am-torch off", "i2am-torch maps", "i2am-torch maps cached", "naive", "chunked capture"]
    assert rows[0].ratio == 1.0 and all(r.ms > 0 and r.shape == "tiny" for r in rows)
    assert all(0 < r.min_ms <= r.ms and r.spread >= 0 for r in rows)
    table = benchmark.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| tiny | i2am-torch maps |" in table
    benchmark.plot(rows, tmp_path / "ratio.png")
    assert (tmp_path / "ratio.png").stat().st_size > 0


def test_columns_are_interleaved_rep_by_rep():
    """One call of every column per round, the order rotating, after one warm-up call each: a
    disturbed stretch of the machine cannot fall on one column's whole block of reps."""
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = benchmark.interleaved(fns, "cpu", reps=3)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {n: len(t) for n, t in times.items()} == {"a": 3, "b": 3, "c": 3}
    assert benchmark.summary([3.0, 1.0, 2.0]) == (1.0, 2.0, 1.0)


def test_the_cached_column_keeps_its_call_and_adds_into_its_buffers():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for n in (12, 5, 5))
    kp, qp = benchmark.default_probes(12, 4, "cpu")
    ref_idx = torch.arange(1, 5)
    cached = benchmark._cached_call("torch")
    out = [cached(q, k, v, 0.3, ref_idx, [1], kp, qp) for _ in range(2)]
    want, _ = attention_with_maps(q, k, v, scale=0.3, ref_keys=ref_idx, record=[1], key_probes=kp, query_probes=qp)
    torch.testing.assert_close(out[1], want)
