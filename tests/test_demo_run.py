"""`i2am demo` end to end (few steps) and its correspondence scoring."""
import json

import pytest
import torch

from i2am import report
from i2am.demo import data, model, run


def test_best_single_patch_baseline():
    truths = torch.tensor([[0, 0], [0, 1], [5, 5]])
    assert run.best_single_patch(truths, (8, 8)) == 2 / 3  # (0, 0) or (1, 1) is near the first two
    assert run.near((3, 3), (4, 2)) and not run.near((3, 3), (5, 3))


def test_trained_correspondence_beats_the_randomised_copy_at_few_steps():
    """The demo's headline: the trained model's specific-reference maps find the true source of
    the probe points; with its cross-attention re-initialised they do not, and always answering
    the one best patch does worse too."""
    pipe = model.load_pipeline()
    randomised = model.with_random_cross_attention(pipe)
    examples, trained, random, baseline = data.examples(4), [], [], []
    for b in range(4):
        example = {name: examples[name][b:b + 1] for name in ("reference", "masked", "mask", "warp")}
        options = dict(seed=run.SEED + b, steps=3, backend="torch")
        scores = run.analyse(pipe, example, **options).scores
        trained.append(scores["correspondence_accuracy"])
        baseline.append(scores["correspondence_best_single_patch"])
        random.append(run.analyse(randomised, example, **options).scores["correspondence_accuracy"])
    trained, random, baseline = (sum(x) / len(x) for x in (trained, random, baseline))
    assert trained >= 0.9 and random <= 0.25 and trained > baseline, (trained, random, baseline)


@pytest.mark.slow
def test_demo_smoke_run_writes_reports(tmp_path, capsys, record_bars, step_bars, monkeypatch):
    example_bars = record_bars(run)
    true_sources, render_figures = [], report.render_figures
    monkeypatch.setattr(report, "render_figures", lambda *a, **k: true_sources.append(k["true_sources"])
                        or render_figures(*a, **k))
    assert run.run_demo(out=tmp_path, examples=1, steps=3) == 0
    summary = json.loads((tmp_path / "scores.json").read_text())
    for key in ("correspondence_accuracy", "correspondence_accuracy_randomised", "correspondence_best_single_patch"):
        assert 0 <= summary[key] <= 1
    assert summary["correspondence_accuracy"] > summary["correspondence_accuracy_randomised"]
    scores = json.loads((tmp_path / "example_0" / "scores.json").read_text())
    assert scores["IMACS_g"] == summary["IMACS_g"] and scores["settings"]["num_steps"] == 3
    assert len(scores["settings"]["points"]) == run.POINTS
    # each probe point's figure is told the reference patch its content truly comes from
    (sources,) = true_sources
    assert set(sources) == {tuple(p) for p in scores["settings"]["points"]}
    grid = tuple(scores["settings"]["ref_grid"])
    assert all(0 <= i < grid[0] and 0 <= j < grid[1] for i, j in sources.values())
    for name in ("report.md", "by_time.png", "by_time.pdf", "overview.pdf"):
        assert (tmp_path / "example_0" / name).exists(), name
    assert "correspondence accuracy" in capsys.readouterr().out
    # the bars: one over the examples, and one over the steps of each generation
    assert [(b["desc"], b["disable"]) for b in example_bars] == [("i2am demo", False)]
    assert [(b["desc"], b["disable"]) for b in step_bars] == [("example 0, trained", False),
                                                              ("example 0, randomised attn2", False)]
