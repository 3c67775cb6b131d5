"""`i2am eval --faithfulness`: do the maps say what the model uses? (deletion and randomisation)

Per sample, with its seed: the traced unablated generation; for each fraction k of the
reference cells, the generation with the top-k cells of M_r removed (i2am.ablate), with k
random cells (several draws) and with k random cells inside the reference mask; for each probe
point, its top-1 and top-4 M_sr cells against as many random cells; and the generation with
another sample's reference, whose per-position change is set against M_g (Spearman). The change
of a generation is the mean squared difference from the unablated one inside the inpainting mask.
With randomized=True all of it again on the model whose traced query and key projections are
re-initialised (i2am.randomize). Samples are sharded and resumable like `i2am eval`: one
samples/ID.json each; the summary (curves, areas, gains with 95% bootstrap intervals over the
samples) goes to faithfulness.json, faithfulness.md and faithfulness.png.
"""
import json
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..faithfulness import ablate, randomize
from .runner import RESULTS_DIR, SETTINGS_FILE, _claim, _write_atomic

FRACTIONS = (0.05, 0.10, 0.20, 0.40)
POINT_CELLS = (1, 4)
TOPS = ("top", "top_masked")  # ranked by M_r, and by the inpainting-mask probe M_r (eq. 17)
BASELINES = ("random", "random_in_mask")
MODELS = ("trained", "randomized")


def evaluate_faithfulness(task, samples, out, *, randomized=False, draws=3, points=2, mode="drop", seed=0,
                          progress=True):
    """Run the deletion test over `samples` into `out`; returns the summary dict (main process).

    task: a DemoTask (pipe; traced(sample, seed): the traced generation as an
    i2am.generation.Generation, maps under the paper protocol; points(sample): its probe points;
    generate(sample, seed, reference=None): the same generation untraced). draws: random draws
    per baseline; points: probe points per sample (the first of the task's). mode: ablate's mode.
    """
    from accelerate import PartialState
    from tqdm import tqdm

    state, out = PartialState(), Path(out)
    results = out / RESULTS_DIR
    models = MODELS if randomized else MODELS[:1]
    settings = {**task.settings, "test": "faithfulness", "models": list(models), "draws": draws, "points": points,
                "mode": mode, "fractions": list(FRACTIONS), "seed": seed, "samples": len(samples)}
    if state.is_main_process:
        results.mkdir(parents=True, exist_ok=True)
        _claim(out / SETTINGS_FILE, settings)
    state.wait_for_everyone()
    pending = [s for s in samples if not (results / f"{s.id}.json").is_file()]
    mine = pending[state.process_index::state.num_processes]
    for sample in tqdm(mine, desc="i2am eval --faithfulness", unit="sample",
                       disable=not (progress and state.is_main_process)):
        other = samples[(samples.index(sample) + 1) % len(samples)]
        record = {"id": sample.id}
        for model in models:
            record[model] = _sample(task, sample, other, model, draws, points, mode, seed)
        _write_atomic(results / f"{sample.id}.json", lambda p, r=record: p.write_text(json.dumps(r) + "\n"))
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    records = [json.loads((results / f"{s.id}.json").read_text()) for s in samples]
    result = summarize(records, models, seed=seed)
    result["settings"] = settings
    (out / "faithfulness.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "faithfulness.md").write_text(table(result))
    figure(result, out / "faithfulness.png")
    return result


def _sample(task, sample, other, model, draws, n_points, mode, seed):
    """One sample's changes under one model ("trained" or "randomized")."""
    sample_seed = seed + (sample.index if sample.seed is None else sample.seed)
    rng = np.random.default_rng([seed, sample.index])
    target = task.pipe.unet
    randomizing = randomize(target, seed=seed) if model == "randomized" else nullcontext()
    with randomizing:
        traced = task.traced(sample, sample_seed)  # the unablated generation and its maps
        base, maps = traced.image, traced.maps
        points = task.points(sample)[:n_points]
        region, grid = sample.mask > 0.5, maps.ref_grid

        def change(cells, reference=None):
            if cells is None:
                image = task.generate(sample, sample_seed, reference)
            else:
                with ablate(target, cells, mode=mode, ref_grid=grid):
                    image = task.generate(sample, sample_seed)
            return float(((image - base) ** 2).mean(0)[region].mean())

        n = grid[0] * grid[1]
        inside = _cells_inside(sample.ref_mask, grid)
        everywhere = [divmod(i, grid[1]) for i in range(n)]
        rec = {"top": [], "top_masked": [], "random": [], "random_in_mask": []}
        for frac in FRACTIONS:
            k = max(1, round(frac * n))
            rec["top"].append(change(maps.top_patches(k)))
            rec["top_masked"].append(change(maps.top_patches(k, masked=True)))
            rec["random"].append([change(_draw(rng, everywhere, k)) for _ in range(draws)])
            if len(inside) >= k:
                rec["random_in_mask"].append([change(_draw(rng, inside, k)) for _ in range(draws)])
        rec["points"] = {}
        for p in points.tolist():
            rec["points"][str(p)] = {str(c): {"top": change(maps.top_patches(c, of=tuple(p))),
                                              "random": [change(_draw(rng, everywhere, c)) for _ in range(draws)]}
                                     for c in POINT_CELLS}
        swapped = task.generate(sample, sample_seed, other.reference)
        rec["swap_spearman"] = _spearman(maps.generated(normalize=False), (swapped - base) ** 2, sample.mask)
    return rec


def _draw(rng, cells, k):
    return [cells[i] for i in rng.choice(len(cells), size=k, replace=False)]


def _cells_inside(ref_mask, grid):
    """The reference cells whose area is mostly inside the reference mask."""
    if ref_mask is None:
        return []
    cover = F.adaptive_avg_pool2d(torch.as_tensor(ref_mask, dtype=torch.float32)[None, None], grid)[0, 0]
    return [tuple(c) for c in (cover > 0.5).nonzero().tolist()]


def _spearman(m_g, change, mask):
    """Spearman's rho of M_g and the per-position change (pooled to the latent grid) inside the mask."""
    from scipy.stats import spearmanr

    h, w = m_g.shape[-2:]
    c = F.adaptive_avg_pool2d(change.mean(0)[None, None].float(), (h, w))[0, 0]
    inside = F.adaptive_avg_pool2d(mask[None, None].float(), (h, w))[0, 0] > 0.5
    with warnings.catch_warnings():  # a constant map or change: undefined, returned as None
        warnings.simplefilter("ignore")
        rho = spearmanr(m_g[inside].numpy(), c[inside].numpy()).statistic
    return None if not np.isfinite(rho) else float(rho)


# ---- the summary --------------------------------------------------------------------------
def _interval(values, seed):
    """(mean, low, high): the mean with its 95% percentile-bootstrap interval (scipy); None for
    fewer than 2 values."""
    from scipy.stats import bootstrap

    values = np.asarray([v for v in values if v is not None], dtype=float)
    if len(values) < 2:
        return None
    if np.ptp(values) == 0:
        return [float(values[0])] * 3
    ci = bootstrap((values,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile",
                   random_state=seed).confidence_interval
    return [float(values.mean()), float(ci.low), float(ci.high)]


def summarize(records, models, *, seed=0):
    """Curves, areas between the top-k and each random curve, and M_sr's gains, each with a 95%
    bootstrap interval over the samples, per model."""
    x = np.asarray(FRACTIONS)
    out = {"fractions": list(FRACTIONS), "samples": len(records)}
    for model in models:
        recs = [r[model] for r in records]
        curves = {}
        for name in TOPS + BASELINES:
            if all(len(r.get(name, ())) == len(FRACTIONS) for r in recs):
                curves[name] = np.array([[np.mean(v) for v in r[name]] for r in recs])
        res = {"curves": {name: [_interval(c[:, i], seed) for i in range(len(FRACTIONS))]
                          for name, c in curves.items()},
               "area": {f"{top} - {base}": _interval(np.trapezoid(curves[top] - curves[base], x, axis=1), seed)
                        for top in TOPS for base in BASELINES if top in curves and base in curves},
               "gain": {str(c): _interval([np.mean([p[str(c)]["top"] - np.mean(p[str(c)]["random"])
                                                    for p in r["points"].values()]) for r in recs], seed)
                        for c in POINT_CELLS},
               "swap_spearman": _interval([r["swap_spearman"] for r in recs], seed)}
        out[model] = res
    return out


def _fmt(ci):
    return "n/a" if ci is None else f"{ci[0]:.4f} [{ci[1]:.4f}, {ci[2]:.4f}]"


def _verdict(ci):
    return "n/a" if ci is None else ("passes" if ci[1] > 0 else "fails" if ci[2] > 0 else "reversed")


TOP_NAMES = {"top": "M_r", "top_masked": "mask-probe M_r"}
BASE_NAMES = {"random": "random cells", "random_in_mask": "random cells inside the reference mask"}


def table(result):
    """faithfulness.md: one row a test and model, mean [95% interval] and whether the interval
    lies above 0."""
    models = [m for m in MODELS if m in result]
    lines = [f"# Faithfulness ({result['samples']} samples)", "",
             "Change: mean squared difference from the unablated generation inside the inpainting mask. "
             "A test passes when its 95% bootstrap interval lies above 0.", "",
             "| test | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    rows = [(f"area, {TOP_NAMES[top]} top-k minus {BASE_NAMES[base]}", lambda r, a=f"{top} - {base}": r["area"].get(a))
            for top in TOPS for base in BASELINES]
    rows += [("M_sr gain, top-1 cell minus a random cell", lambda r: r["gain"]["1"]),
             ("M_sr gain, top-4 cells minus 4 random cells", lambda r: r["gain"]["4"]),
             ("Spearman, M_g against the change from another reference", lambda r: r["swap_spearman"])]
    for name, get in rows:
        lines.append(f"| {name} | " + " | ".join(f"{_fmt(get(result[m]))} ({_verdict(get(result[m]))})"
                                                 for m in models) + " |")
    return "\n".join(lines) + "\n"


def figure(result, path):
    """Deletion curves (top-k against each random baseline, 95% bands) per model, and M_sr's gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in MODELS if m in result]
    x = 100 * np.asarray(result["fractions"])
    fig, axes = plt.subplots(1, len(models) + 1, figsize=(4.2 * (len(models) + 1), 3.4), layout="constrained")
    styles = {"top": ("C3", "top-k cells of M_r"), "top_masked": ("C1", "top-k cells of the mask-probe M_r"),
              "random": ("C0", "random cells"),
              "random_in_mask": ("C2", "random cells in the reference mask")}
    for ax, model in zip(axes, models):
        for name, points in result[model]["curves"].items():
            colour, label = styles[name]
            mean, low, high = (np.array([p[i] for p in points]) for i in range(3))
            ax.plot(x, mean, "o-", color=colour, label=label)
            ax.fill_between(x, low, high, color=colour, alpha=0.2)
        ax.set(title=f"deletion, {model} model", xlabel="reference cells removed (%)",
               ylabel="change (MSE in the mask)")
        ax.legend(fontsize=7)
    ax = axes[-1]
    for i, model in enumerate(models):
        for j, c in enumerate(POINT_CELLS):
            g = result[model]["gain"][str(c)]
            if g is not None:
                ax.errorbar(j + 0.15 * (2 * i - 1), g[0], yerr=[[g[0] - g[1]], [g[2] - g[0]]], fmt="o", capsize=4,
                            color=f"C{i + 3}", label=model if j == 0 else None)
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(xticks=range(len(POINT_CELLS)), xticklabels=[f"top-{c}" for c in POINT_CELLS],
           title="M_sr gain over random cells", ylabel="change, top minus random")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120)
    plt.close(fig)
