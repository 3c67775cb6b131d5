"""summary.md of an evaluation: the Table-2-style row, IMACS-to-metric correlations, scatter plots.

Correlations are scipy's Pearson and Spearman over the samples that have both scores, with
their count; a constant column has no correlation and says so.
"""
import json
import math
import warnings

import numpy as np

from .metrics import KID_SUBSET

SUMMARY_FILE, SUMMARY_JSON = "summary.md", "summary.json"
IMACS = ("IMACS_g", "IMACS_r")
LOWER_IS_BETTER = ("FID", "KID", "LPIPS")


def write(out, records, set_scores, settings, missing, paired_names, task_names, protocols):
    """Write summary.md, summary.json and scatter_PROTOCOL.png into out; returns the summary dict.

    IMACS is correlated with the paired image metrics (paired_names, per sample) and with the
    task's own per-protocol scores named in task_names; its other scores (baselines) are only
    averaged."""
    means = {name: _mean([r.get(name) for r in records]) for name in paired_names}
    per_protocol = {p: _columns(records, p) for p in protocols}
    table = {p: {k: _mean(v) for k, v in cols.items()} for p, cols in per_protocol.items()}
    names = (paired_names, task_names)
    correlations = [row for p in protocols for row in _correlations(records, p, *names)]
    plots = [_scatter(out, records, p, *names) for p in protocols]
    result = {"samples": len(records), **set_scores, **means, "protocols": table, "correlations": correlations,
              "left_out": missing, "settings": settings}
    (out / SUMMARY_JSON).write_text(json.dumps(result, indent=2) + "\n")
    (out / SUMMARY_FILE).write_text(_markdown(result, protocols, paired_names, [p for p in plots if p]))
    return result


def _columns(records, protocol):
    """{score name: [value or None per record]} of the per-protocol scores (IMACS first)."""
    names = list(IMACS) + sorted({k for r in records for k in r["scores"][protocol]} - set(IMACS) - {"undefined"})
    return {k: [r["scores"][protocol].get(k) for r in records] for k in names}


def _metrics_of(records, protocol, paired_names, task_names):
    """The per-sample metrics IMACS is set against: the paired image metrics, then the task's own."""
    own = _columns(records, protocol)
    cols = {name: [r.get(name) for r in records] for name in paired_names}
    cols.update((k, own[k]) for k in task_names if k in own)
    return cols


def _correlations(records, protocol, paired_names, task_names):
    rows, own = [], _columns(records, protocol)
    for imacs in IMACS:
        for metric, values in _metrics_of(records, protocol, paired_names, task_names).items():
            x, y = _pairs(own[imacs], values)
            rows.append({"protocol": protocol, "imacs": imacs, "metric": metric, "n": len(x),
                         **_correlate(x, y)})
    return rows


def _correlate(x, y):
    from scipy import stats

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        why = "fewer than 3 samples" if len(x) < 3 else "a constant column"
        return {"pearson": None, "pearson_p": None, "spearman": None, "spearman_p": None, "undefined": why}
    with warnings.catch_warnings():  # p-values of tiny samples warn; the count is beside them
        warnings.simplefilter("ignore")
        pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
    return {"pearson": float(pearson.statistic), "pearson_p": float(pearson.pvalue),
            "spearman": float(spearman.statistic), "spearman_p": float(spearman.pvalue)}


def _pairs(a, b):
    keep = [(u, v) for u, v in zip(a, b) if u is not None and v is not None]
    return np.array([u for u, _ in keep], dtype=float), np.array([v for _, v in keep], dtype=float)


def _scatter(out, records, protocol, paired_names, task_names):
    """scatter_PROTOCOL.png: IMACS_g and IMACS_r (rows) against each per-sample metric (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own, others = _columns(records, protocol), _metrics_of(records, protocol, paired_names, task_names)
    shown = [m for m in others if any(v is not None for v in others[m])]
    if not shown:
        return None
    fig, axes = plt.subplots(len(IMACS), len(shown), figsize=(3.2 * len(shown), 3.0 * len(IMACS)), squeeze=False)
    for i, imacs in enumerate(IMACS):
        for j, metric in enumerate(shown):
            ax = axes[i][j]
            x, y = _pairs(own[imacs], others[metric])
            ax.scatter(x, y, s=14, alpha=0.75)
            ax.set_xlabel(f"{imacs} ({protocol})")
            ax.set_ylabel(metric)
            r = _correlate(x, y)["pearson"]
            ax.set_title(f"n = {len(x)}" + ("" if r is None else f", Pearson r = {r:+.2f}"), fontsize=9)
    fig.suptitle(f"Per-sample IMACS against the metrics, protocol {protocol}")
    fig.tight_layout()
    name = f"scatter_{protocol}.png"
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name


def _markdown(s, protocols, paired_names, plots):
    settings = s["settings"]
    about = ", ".join(f"{k} {v}" for k, v in settings.items() if k not in ("protocols",))
    lines = ["# i2am eval summary", "", f"{s['samples']} samples; {about}.", ""]
    if settings.get("model", "").startswith("i2am demo"):
        lines += [f"The demo model runs {settings['steps']} DDIM steps here (the `i2am demo` report uses 50), "
                  "so its scores are not those of the demo report.", ""]
    head = [k for k in ("FID", "KID") if k in s] + list(paired_names)
    for p in protocols:
        extra = [k for k in s["protocols"][p] if k not in IMACS]
        cols = head + [f"{k} ({p})" for k in IMACS] + [f"{k} ({p})" for k in extra]
        values = [s[k] for k in head] + [s["protocols"][p][k] for k in IMACS] + [s["protocols"][p][k] for k in extra]
        arrows = [" ↓" if c in LOWER_IS_BETTER else " ↑" if c == "SSIM" or c.startswith(IMACS) else "" for c in cols]
        lines += ["| " + " | ".join(c + a for c, a in zip(cols, arrows)) + " |",
                  "|" + "---:|" * len(cols),
                  "| " + " | ".join(_num(v) for v in values) + " |", ""]
    kid = ""
    if "KID" in s:
        kid = (f" KID: the mean over random subsets of {KID_SUBSET} samples (std {_num(s['KID_std'])})." if "KID_std" in s
               else " KID: over the whole set (fewer samples than one subset).")
    lines += [f"Means over the samples that have the score.{kid}", ""]
    lines += [f"- {line}" for line in s["left_out"]] + ([""] if s["left_out"] else [])
    lines += ["## Correlation of IMACS with the per-sample metrics", "",
              "| protocol | IMACS | metric | n | Pearson r (p) | Spearman rho (p) |", "|---|---|---|---:|---:|---:|"]
    for c in s["correlations"]:
        if c["pearson"] is None:
            pearson = spearman = f"undefined ({c['undefined']})"
        else:
            pearson = f"{c['pearson']:+.3f} ({_p(c['pearson_p'])})"
            spearman = f"{c['spearman']:+.3f} ({_p(c['spearman_p'])})"
        lines.append(f"| {c['protocol']} | {c['imacs']} | {c['metric']} | {c['n']} | {pearson} | {spearman} |")
    lines.append("")
    lines += [f"![IMACS against the metrics]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _num(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4g}"


def _p(p):
    return f"p={p:.2g}"
