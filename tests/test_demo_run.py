"""`i2am demo` end to end (few steps) and its correspondence scoring."""
import json

import torch

from i2am.demo import run


def test_best_single_patch_baseline():
    truths = torch.tensor([[0, 0], [0, 1], [5, 5]])
    assert run.best_single_patch(truths, (8, 8)) == 2 / 3  # (0, 0) or (1, 1) is near the first two
    assert run.near((3, 3), (4, 2)) and not run.near((3, 3), (5, 3))


def test_demo_smoke_run_writes_reports(tmp_path, capsys):
    assert run.run_demo(out=tmp_path, examples=1, steps=3) == 0
    summary = json.loads((tmp_path / "scores.json").read_text())
    for key in ("correspondence_accuracy", "correspondence_accuracy_randomised", "correspondence_best_single_patch"):
        assert 0 <= summary[key] <= 1
    scores = json.loads((tmp_path / "example_0" / "scores.json").read_text())
    assert scores["IMACS_g"] == summary["IMACS_g"] and scores["settings"]["num_steps"] == 3
    assert len(scores["settings"]["points"]) == run.POINTS
    for name in ("report.md", "by_time.png", "by_time.pdf", "overview.pdf"):
        assert (tmp_path / "example_0" / name).exists(), name
    printed = capsys.readouterr()
    assert "correspondence accuracy" in printed.out
    assert "i2am demo: 100%" in printed.err and "example 0, trained" in printed.err  # the progress bars
