"""The benchmark's baselines compute the same maps as i2am (a fair comparison), and its table."""
import pytest
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
    assert cols == ["sdpa", "i2am-torch off", "i2am-torch maps", "i2am-torch maps cached", "composition", "naive",
                    "chunked capture"]
    assert rows[0].ratio == 1.0 and all(r.ms > 0 and r.shape == "tiny" for r in rows)
    assert all(0 < r.min_ms <= r.ms and r.spread >= 0 for r in rows)
    table = benchmark.markdown(rows)
    assert table.count("\n") == len(rows) + 1 and "| tiny | i2am-torch maps |" in table
    benchmark.plot(rows, tmp_path / "ratio.png")
    assert (tmp_path / "ratio.png").stat().st_size > 0


def test_ratio_figure_gives_each_column_one_colour_across_shapes():
    from matplotlib.colors import to_hex

    Row = benchmark.Row
    rows = [Row(shape, col, 64, 9, 16, 1.0, ratio, 0.0, 0.0) for shape, ratios in (("a", (1.0, 3.0, 2.0)),
                                                                                   ("b", (1.0, 1.5)))
            for col, ratio in zip(("sdpa", "i2am-torch maps", "composition"), ratios)]
    rows.append(Row("pipe", "pipeline traced", 64, 9, 0, 1.0, 1.2, 0.0, 0.0))  # no attention shape: left out
    ax = benchmark.ratio_figure(rows).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
    points = {c.get_label(): (c.get_offsets().tolist(), {to_hex(f) for f in c.get_facecolors()})
              for c in ax.collections}
    assert points["i2am-torch maps"][0] == [[3.0, 0], [1.5, 1]] and points["composition"][0] == [[2.0, 0]]
    assert len(points["i2am-torch maps"][1]) == 1 and points["i2am-torch maps"][1] != points["composition"][1]
    assert set(points) == {"i2am-torch maps", "composition"}  # SDPA is the line at 1, not a column


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


def test_joint_shapes_time_sdpa_i2am_and_the_checked_composition():
    rows = benchmark.run_joint([("tiny joint", 5, 12, (9, 7), 16, 3)], "cpu", torch.float32, reps=2)
    assert [r.column for r in rows] == ["sdpa", "i2am-torch maps", "composition"]
    assert all(r.nq == 12 and r.nk == 33 and 0 < r.min_ms <= r.ms for r in rows)
    assert "| tiny joint | composition |" in benchmark.markdown(rows)


def test_a_wrong_composition_map_stops_the_benchmark(monkeypatch):
    """The composition is checked against the float64 reference before it is timed."""
    right = benchmark.three_call_maps

    def wrong(*args, **kwargs):
        out, maps = right(*args, **kwargs)
        maps["ref_key"][..., 0] *= 1.01
        return out, maps

    monkeypatch.setattr(benchmark, "three_call_maps", wrong)
    with pytest.raises(AssertionError, match="composition ref_key"):
        benchmark.run_joint([("tiny joint", 5, 12, (9,), 16, 2)], "cpu", torch.float32, reps=1)


def test_kontext_pipeline_row_times_the_traced_loop_against_the_untraced_one():
    rows = benchmark.kontext_pipeline_row("cpu", torch.float32, steps=2, reps=1, grid=(4, 4), text=8)
    assert [r.column for r in rows] == ["pipeline untraced", "pipeline traced"]
    assert rows[0].shape == rows[1].shape == "Kontext 4x4 2 steps" and (rows[0].nq, rows[0].nk) == (16, 40)
    assert rows[1].ratio == rows[1].ms / rows[0].ms


def test_table_on_cpu_has_no_tflops_and_notes_say_why_and_when_fused_is_slower():
    rows = [benchmark.Row("tiny", "sdpa", 64, 9, 16, 1.0, 1.0, 0.001, 0.0),
            benchmark.Row("tiny", "i2am-torch maps", 64, 9, 16, 3.0, 3.0, 0.001, 0.0),
            benchmark.Row("tiny", "naive", 64, 9, 16, 2.0, 2.0, 0.001, 0.0),
            benchmark.Row("big", "sdpa", 4096, 77, 64, 1.0, 1.0, 0.5, 0.0),
            benchmark.Row("big", "i2am-torch maps", 4096, 77, 64, 2.0, 2.0, 0.5, 0.0),
            benchmark.Row("big", "naive", 4096, 77, 64, 9.0, 9.0, 0.5, 0.0)]
    assert "TFLOP/s" not in benchmark.markdown(rows, "cpu") and "TFLOP/s" in benchmark.markdown(rows, "cuda")
    cpu = benchmark.notes(rows, "cpu")
    assert len(cpu) == 2 and "No TFLOP/s on CPU" in cpu[0]
    assert cpu[1].startswith("At tiny, i2am-torch maps is slower than the naive path") and "host" in cpu[1]
    assert benchmark.notes(rows, "cuda") == cpu[1:]  # "big": fused is faster, nothing to explain
