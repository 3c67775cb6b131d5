"""The faithfulness evaluation on a model built so that the answer is known, and top_patches.

CopyModel's one cross-attention layer has a constant query and keys that score only a marker
channel, so every output position copies the one marked reference cell: removing that cell
(the top-1 cell of every map) changes the output completely, removing any other cell almost not.
"""
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention

import i2am
from i2am.evaluation.datasets import Sample
from i2am.evaluation.faithfulness import evaluate_faithfulness, summarize
from i2am.generation import run_traced

GRID, LATENT = (3, 3), (4, 4)


class CopyModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn2 = Attention(query_dim=3, cross_attention_dim=4, heads=1, dim_head=3, bias=True, out_bias=True)
        with torch.no_grad():
            for p in self.attn2.parameters():
                p.zero_()
            self.attn2.to_q.bias[0] = 10.0
            self.attn2.to_k.weight[0, 3] = 10.0  # the marker channel
            self.attn2.to_v.weight[:, :3] = torch.eye(3)
            self.attn2.to_out[0].weight.copy_(torch.eye(3))

    def forward(self, sample, timestep, encoder_hidden_states):
        h = sample.flatten(2).transpose(1, 2)
        return self.attn2(h, encoder_hidden_states).transpose(1, 2).reshape(sample.shape)


class CopyPipe:
    """A pipeline of one CopyModel call from seeded noise: a batch of one (1, 3, h, w)."""

    def __init__(self):
        self.unet = CopyModel()

    def __call__(self, reference, generator):
        x = torch.randn(1, 3, *LATENT, generator=generator)
        with torch.no_grad():
            return self.unet(x, 0, reference[None])


class CopyTask:
    """What the evaluation asks of a task (DemoTask's traced, points and generate), on CopyPipe."""
    settings = {"model": "copy"}

    def __init__(self):
        self.pipe = CopyPipe()

    def traced(self, sample, seed):
        return run_traced(self.pipe, dict(reference=sample.reference), seed=seed, target=self.pipe.unet,
                          ref_grid=GRID, num_steps=1, mask=sample.mask, backend="torch",
                          points=[tuple(p) for p in self.points(sample).tolist()])

    def points(self, sample):
        return torch.tensor([[1, 2], [3, 0]])

    def generate(self, sample, seed, reference=None):
        ref = sample.reference if reference is None else reference
        return self.pipe(ref, torch.Generator().manual_seed(seed))[0]


def samples(n):
    out = []
    for b in range(n):
        ref = torch.randn(GRID[0] * GRID[1], 4, generator=torch.Generator().manual_seed(100 + b))
        ref[:, 3] = 0
        ref[(2 * b + 1) % 9, 3] = 1  # the copied cell
        out.append(Sample(id=f"s{b}", index=b, image=None, mask=torch.ones(LATENT), reference=ref,
                          ref_mask=torch.ones(6, 6), seed=b))
    return out


def test_the_copied_cell_dominates_the_deletion_test(tmp_path):
    task = CopyTask()
    result = evaluate_faithfulness(task, samples(5), tmp_path, randomized=True, draws=2, points=2, progress=False)
    trained = result["trained"]
    for ci in trained["gain"].values():  # top-1 and top-4 M_sr cells hold the copied cell: gain interval > 0
        assert ci[1] > 0.1
    assert set(trained["area"]) == {f"{t} - {b}" for t in ("top", "top_masked") for b in ("random", "random_in_mask")}
    for ci in trained["area"].values():
        assert ci[1] > 0
    top, random = trained["curves"]["top"], trained["curves"]["random"]
    assert all(t[0] > 3 * r[0] for t, r in zip(top, random))
    assert (tmp_path / "faithfulness.png").is_file() and "passes" in (tmp_path / "faithfulness.md").read_text()
    assert torch.equal(task.pipe.unet.attn2.to_q.bias[0], torch.tensor(10.0))  # randomize restored it
    # resumable: a second run reads the finished samples instead of recomputing them
    again = evaluate_faithfulness(task, samples(5), tmp_path, randomized=True, draws=2, points=2, progress=False)
    assert again["trained"] == trained


def test_summary_intervals_and_undefined_scores():
    rec = {"top": [1.0, 1.0, 2.0, 2.0], "random": [[0.0, 0.0]] * 4, "random_in_mask": [],
           "points": {"[0, 0]": {"1": {"top": 1.0, "random": [0.0]}, "4": {"top": 1.0, "random": [0.5]}}},
           "swap_spearman": None}
    s = summarize([{"trained": rec}, {"trained": rec}], ["trained"])["trained"]
    assert s["gain"]["1"] == [1.0, 1.0, 1.0] and s["gain"]["4"] == [0.5, 0.5, 0.5]
    assert set(s["area"]) == {"top - random"} and s["swap_spearman"] is None
    assert s["area"]["top - random"][0] == pytest.approx(np.trapezoid([1, 1, 2, 2], [0.05, 0.1, 0.2, 0.4]))


def test_top_patches_order_and_ties():
    model = CopyModel()
    ref = torch.zeros(1, 9, 4)
    ref[0, [4, 7], 3] = 1.0  # two marked cells: equal mass, ties broken row-major
    ref[0, 2, 3] = 0.5
    with i2am.trace(model, ref_grid=GRID, num_steps=1, points=[(0, 0)], backend="torch") as tc:
        model(torch.zeros(1, 3, *LATENT), 0, ref)
    maps = tc.maps()
    assert maps.top_patches(3) == [(1, 1), (2, 1), (0, 2)]
    assert maps.top_patches(2, of=(0, 0)) == [(1, 1), (2, 1)]
    assert maps.top_patches(9)[3:] == [(0, 0), (0, 1), (1, 0), (1, 2), (2, 0), (2, 2)]  # equal zeros: row-major
    with pytest.raises(ValueError, match="k must be"):
        maps.top_patches(10)
    with pytest.raises(ValueError, match="not traced"):
        maps.top_patches(1, of=(1, 1))
    with pytest.raises(ValueError, match="ref=1"):
        maps.top_patches(1, ref=1)


@pytest.mark.slow
def test_demo_task_untraced_generation_is_its_traced_one():
    """The deletion test's changes are measured from the traced generation: the same seeded call
    untraced (what ablate runs) must give the same image, and the probe points are the traced ones."""
    from i2am.evaluation import DemoTask

    task = DemoTask(samples=2, steps=2, backend="torch")
    first, second = task.samples()
    traced = task.traced(first, seed=5)
    torch.testing.assert_close(task.generate(first, 5), traced.image, rtol=0, atol=1e-5)
    assert not torch.allclose(task.generate(first, 5, second.reference), traced.image, atol=1e-3)
    for p in task.points(first).tolist():
        traced.maps.specific_reference(tuple(p))  # an untraced point raises
