"""Figures of attribution maps (paper Figures 2 and 5-9), drawn with matplotlib.

plot_overlay draws one map over its image into an Axes: the map at pixel level (eq. 9: bicubic
to the image size, min-max, values <= threshold transparent) in a colormap, a colorbar of the
value scale and the mask's outline. panel_figure lays out a row of such panels (images, maps,
probes); split_figure the by-time or by-head grids, where each row shares one colour scale;
sources_figure the share of each source (several references, text, the image itself).
Images are PIL images or arrays/tensors (3, H, W), (H, W, 3) or (H, W) with floats in [0, 1] or
uint8; masks follow the rule of i2am.inputs (1 = inside). Grid coordinates (latent points and
boxes, reference patches) map to pixels by the image / grid size ratio.

    fig, axes = plt.subplots(1, 2)
    i2am.plot_overlay(maps.generated(), image, ax=axes[0], mask=mask)
    i2am.plot_overlay(maps.reference(), reference, ax=axes[1])
    fig.savefig("maps.pdf")

The figure functions take the values to draw and every label from the caller, so a display
protocol (what is shown, how it is labelled) is the caller's choice.
"""
import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, Normalize
from matplotlib.patches import Patch, Rectangle

from . import display
from .grid import resize
from .inputs import as_mask, to_pil

MIN_SIDE = 256  # small images are enlarged (nearest) to this many display pixels, maps drawn smooth at it
PANEL_INCHES = 2.3  # height of one panel
NO_IMAGE = 0.5  # grey level of the canvas when a map has no image to lie on
OUTLINE = dict(colors="white", linewidths=1.4,
               path_effects=[patheffects.withStroke(linewidth=2.6, foreground="black")])
PROBE = dict(color="white", path_effects=[patheffects.withStroke(linewidth=2.5, foreground="black")])
SCALE_LABEL = "map value (min-max normalised)"


@dataclass
class Panel:
    """One Axes of a panel_figure: an image (None: a grey canvas of the map's or grid's aspect),
    a 2-D map drawn over it with plot_overlay, a mask outline, and probes drawn on probe_grid
    (latent points (row, col), boxes (top, left, bottom, right) end-exclusive), each labelled
    with its coordinates or with its text in labels."""
    title: str
    image: object = None
    map: object = None
    mask: object = None
    probes: tuple = ()
    probe_grid: tuple = None
    labels: tuple = None


def plot_overlay(map2d, image, *, ax=None, threshold=0.4, alpha=0.5, cmap="jet", mask=None, colorbar=True,
                 normalize=True, label=SCALE_LABEL):
    """Draw map2d (h, w) over image in ax (a new figure when None) and return ax.

    The map is taken to the image's size at pixel level (eq. 9) and drawn where it is above
    threshold (values <= threshold are transparent, as in the paper's figures), blended with
    alpha; image None draws it on a grey canvas. mask (any size, 1 = inside) is outlined.
    normalize=False: map2d is already on the [0, 1] colour scale (e.g. several maps normalised
    together); it is resized and clamped, not normalised again. colorbar: the value scale, with
    the transparent part marked, labelled `label`."""
    M = torch.as_tensor(map2d)
    if M.dim() != 2:
        raise ValueError(f"plot_overlay takes one 2-D map, got shape {tuple(M.shape)} (maps of several recorded "
                         "images carry a batch axis first: pick one)")
    if ax is None:
        _, ax = plt.subplots(figsize=(PANEL_INCHES * 1.3, PANEL_INCHES), layout="constrained")
    base = _show_image(ax, image, M.shape)
    size = base.shape[:2]
    M = M.double()
    if normalize:
        heat = display.pixel_level(M, size, threshold)
    else:
        heat = resize(M, size, "bicubic").clamp(0, 1)
        heat = torch.where(heat <= threshold, torch.zeros_like(heat), heat)
    heat = heat.numpy()
    # alpha lives in the colormap's colours, not on the artist: for PDF and SVG matplotlib
    # composites the image with the one below and applied an artist alpha a second time (faint PDFs)
    colours = plt.get_cmap(cmap).with_alpha(alpha).with_extremes(bad=(0, 0, 0, 0))  # masked: transparent
    ax.imshow(np.ma.masked_where(heat <= threshold, heat), cmap=colours, vmin=0, vmax=1, interpolation="nearest")
    if mask is not None:
        outline_mask(ax, mask, size)
    if colorbar:
        add_colorbar(ax.figure, ax, cmap=cmap, threshold=threshold, label=label)
    return ax


def outline_mask(ax, mask, size, what="mask"):
    """The outline of mask (1 = inside, any size: nearest to `size`, the Axes' pixels) in ax."""
    m = as_mask(mask, what).double()
    m = resize(m, size, "nearest").numpy()
    if 0 < m.sum() < m.size:  # a contour needs both sides
        ax.contour(m, levels=[0.5], **OUTLINE)


def draw_probe(ax, probe, grid_size, size, *, label=True):
    """A point (row, col) as a dot in its cell, a box (top, left, bottom, right), end-exclusive,
    as a rectangle around its cells; coordinates on a grid of grid_size laid over an Axes of
    `size` (rows, cols) pixels; label: True, its coordinates beside it; a string, that text."""
    sy, sx = size[0] / grid_size[0], size[1] / grid_size[1]
    if len(probe) == 2:
        r, c = probe
        x, y = (c + 0.5) * sx - 0.5, (r + 0.5) * sy - 0.5
        ax.plot([x], [y], marker="o", markersize=7, markerfacecolor="red", markeredgecolor="white",
                markeredgewidth=1.5, linestyle="none")
        anchor = (x + max(0.6 * sx, 6), y)
    elif len(probe) == 4:
        t, l, b, r = probe
        ax.add_patch(Rectangle((l * sx - 0.5, t * sy - 0.5), (r - l) * sx, (b - t) * sy, fill=False,
                               edgecolor="red", linewidth=2))
        anchor = (l * sx, t * sy - 0.5 - 4)
    else:
        raise ValueError(f"a probe is a point (row, col) or a box (top, left, bottom, right), got {probe!r}")
    if label:
        text = label if isinstance(label, str) else "(" + ", ".join(str(int(v)) for v in probe) + ")"
        ax.annotate(text, anchor, fontsize=7, va="center" if len(probe) == 2 else "bottom", **PROBE)


def add_colorbar(fig, axes, *, cmap="jet", threshold=0.4, label=SCALE_LABEL):
    """One colorbar of the [0, 1] colour scale beside `axes` (one Axes or several), the values
    <= threshold, which the overlays leave transparent, greyed out."""
    bar = fig.colorbar(ScalarMappable(Normalize(0, 1), cmap), ax=axes, fraction=0.05, pad=0.02, aspect=25,
                       panchor=False)  # the panels keep their own anchor
    if threshold > 0:
        bar.ax.axhspan(0, threshold, facecolor="white", alpha=0.75, hatch="//", edgecolor="0.5", linewidth=0)
        bar.ax.axhline(threshold, color="black", linewidth=0.8)
        ticks = sorted({0.0, threshold, 1.0} | {t for t in (0.2, 0.4, 0.6, 0.8) if abs(t - threshold) > 0.08})
        bar.set_ticks(ticks)
        label = f"{label}\n<= {threshold:g}: not drawn"
    bar.set_label(label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return bar


def panel_figure(panels, *, title=None, threshold=0.4, alpha=0.5, cmap="jet", label=SCALE_LABEL, row_labels=None):
    """A row of Panels (paper Figures 2 and 9: the probe beside its map), or several rows of as
    many Panels (a list of lists, labelled row_labels: one row per reference), with one colorbar
    when any panel has a map; every map is normalised on its own (eq. 9). Returns the Figure."""
    rows = panels if panels and isinstance(panels[0], (list, tuple)) else [panels]
    if any(len(row) != len(rows[0]) for row in rows):
        raise ValueError(f"panel_figure needs rows of one length, got {[len(row) for row in rows]}")
    aspects = [max(_aspect(row[c]) for row in rows) for c in range(len(rows[0]))]
    fig, axes = _figure(len(rows), aspects, title)
    for r, label_r in enumerate(row_labels or [None] * len(rows)):
        if label_r:
            axes[r, 0].set_ylabel(label_r, fontsize=9)
    panels = [p for row in rows for p in row]
    for ax, p in zip(axes.ravel(), panels):
        if p.map is not None:
            plot_overlay(p.map, p.image, ax=ax, threshold=threshold, alpha=alpha, cmap=cmap, mask=p.mask,
                         colorbar=False)
        else:
            base = _show_image(ax, p.image, p.probe_grid)
            if p.mask is not None:
                outline_mask(ax, p.mask, base.shape[:2])
        size = _pixels(ax)
        for probe, text in zip(p.probes, p.labels or [True] * len(p.probes)):
            draw_probe(ax, probe, p.probe_grid, size, label=text)
        ax.set_title(p.title, fontsize=9)
    if any(p.map is not None for p in panels):
        add_colorbar(fig, axes.ravel().tolist(), cmap=cmap, threshold=threshold, label=label)
    return fig


def sources_figure(shares, image=None, *, mask=None, title=None, alpha=0.8, cmap="viridis"):
    """Where each part of the generated image draws its attention from: one panel per source
    (shares {name: (h, w)} in [0, 1], on one shared 0-1 colour scale, not normalised), then one
    categorical map of the dominant source (the largest share at each position) with a legend.
    Returns the Figure."""
    names = list(shares)
    stack = torch.stack([torch.as_tensor(shares[n]).double() for n in names])
    if stack.dim() != 3:
        raise ValueError(f"sources_figure takes 2-D shares, got shape {tuple(stack.shape[1:])} (maps of several "
                         "recorded images carry a batch axis first: pick one)")
    aspect = _aspect(Panel("", image, stack[0]))
    fig, axes = _figure(1, [aspect] * (len(names) + 1), title)
    for ax, name, M in zip(axes[0], names, stack):
        plot_overlay(M, image, ax=ax, threshold=0, alpha=alpha, cmap=cmap, mask=mask, colorbar=False,
                     normalize=False)
        ax.set_title(f"share of {name}", fontsize=9)
    add_colorbar(fig, axes[0, :-1].tolist(), cmap=cmap, threshold=0, label="share of the attention")
    ax = axes[0, -1]
    base = _show_image(ax, image, stack.shape[-2:])
    dominant = resize(stack, base.shape[:2], "nearest").argmax(0).numpy()
    colours = plt.get_cmap("tab10").colors[:len(names)]
    ax.imshow(dominant, cmap=ListedColormap(colours), vmin=-0.5, vmax=len(names) - 0.5, alpha=alpha,
              interpolation="nearest")
    if mask is not None:
        outline_mask(ax, mask, base.shape[:2])
    ax.set_title("dominant source", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=n) for c, n in zip(colours, names)], loc="upper left",
              bbox_to_anchor=(1.02, 1), fontsize=8, frameon=False)
    return fig


def split_figure(stacks, *, column_labels, row_labels, images=None, masks=None, title=None, threshold=0.4,
                 alpha=0.5, cmap="jet", label="map value (min-max over the row)"):
    """Grid of maps split by time group or head (paper Figures 5-8): one row per stack (N, a, b)
    (e.g. generated and reference maps), one column per group or head. Each row is min-max
    normalised as a whole, so that its panels share one colour scale (one colorbar) and a
    weaker group looks weaker; images/masks: one per row (or None). Returns the Figure."""
    images = list(images) if images is not None else [None] * len(stacks)
    masks = list(masks) if masks is not None else [None] * len(stacks)
    if not stacks or len(row_labels) != len(stacks) or len(images) != len(stacks) or len(masks) != len(stacks):
        raise ValueError(f"split_figure needs one row label, image and mask per stack: {len(stacks)} stacks, "
                         f"{len(row_labels)} row labels, {len(images)} images, {len(masks)} masks")
    for stack, name in zip(stacks, row_labels):
        if len(stack) != len(column_labels):
            raise ValueError(f"{len(column_labels)} column labels for {len(stack)} maps in row {name!r}")
    aspects = [max(_aspect(Panel("", img, stack[0])) for stack, img in zip(stacks, images))] * len(column_labels)
    fig, axes = _figure(len(stacks), aspects, title)
    for r, (stack, img, mask) in enumerate(zip(stacks, images, masks)):
        shared = shared_scale(torch.as_tensor(stack).double())
        for c, M in enumerate(shared):
            plot_overlay(M, img, ax=axes[r, c], threshold=threshold, alpha=alpha, cmap=cmap, mask=mask,
                         colorbar=False, normalize=False)
            if r == 0:
                axes[r, c].set_title(column_labels[c], fontsize=9)
        axes[r, 0].set_ylabel(row_labels[r], fontsize=9)
    add_colorbar(fig, axes.ravel().tolist(), cmap=cmap, threshold=threshold, label=label)
    return fig


def save_figure(fig, path, formats=("png", "pdf"), dpi=200):
    """Save fig as path.png, path.pdf (and any other matplotlib format), close it, return the
    file names. The files carry no date, so that the same figure gives the same bytes; PDF text is
    in TrueType (Type 42) fonts, as publishers ask."""
    names = []
    for fmt in formats:
        target = f"{path}.{fmt}"
        meta = {"CreationDate": None} if fmt == "pdf" else {"Date": None} if fmt == "svg" else None
        with plt.rc_context({"pdf.fonttype": 42}):
            fig.savefig(target, dpi=dpi, metadata=meta)
        names.append(target)
    plt.close(fig)
    return names


def time_labels(time_groups, num_steps):
    """Column labels of a by-time split: the steps (0 = first, noisiest) of each group (eq. 10)."""
    starts = [-(-g * num_steps // time_groups) for g in range(time_groups + 1)]  # first t with tau(t) = g
    return [f"steps {a}-{b - 1}" if b - 1 > a else f"step {a}" for a, b in zip(starts, starts[1:])]


def _figure(rows, aspects, title):
    """Figure and (rows, len(aspects)) Axes, columns as wide as their width/height aspects."""
    width = PANEL_INCHES * sum(aspects) + 1.2  # + the colorbar
    height = PANEL_INCHES * rows + (0.5 if title else 0.2) + 0.3
    fig, axes = plt.subplots(rows, len(aspects), figsize=(width, height), layout="constrained", squeeze=False,
                             gridspec_kw={"width_ratios": aspects})
    for ax in axes.ravel():  # a panel narrower than its column keeps to the left, beside its row's label
        ax.set_anchor("W")
    if title:
        fig.suptitle(title, fontsize=10)
    return fig, axes


def _show_image(ax, image, grid_size):
    """Show image (enlarged with nearest to MIN_SIDE pixels when smaller, so its pixels stay
    sharp) in ax without ticks, or a grey canvas of grid_size's aspect; returns the pixels."""
    if image is None:
        h, w = grid_size
        scale = MIN_SIDE / max(h, w)
        base = np.full((max(1, round(h * scale)), max(1, round(w * scale)), 3), NO_IMAGE)
    else:
        pil = to_pil(image)
        k = max(1, math.ceil(MIN_SIDE / max(pil.size)))
        base = np.asarray(pil.resize((pil.width * k, pil.height * k), 0) if k > 1 else pil)  # 0: nearest
    ax.imshow(base, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    return base


def _pixels(ax):
    """(rows, cols) of the first image shown in ax."""
    return ax.images[0].get_array().shape[:2]


def _aspect(panel):
    """Width / height of a panel."""
    if panel.image is not None:
        w, h = to_pil(panel.image).size
    else:
        h, w = panel.map.shape[-2:] if panel.map is not None else panel.probe_grid
    return w / h


def shared_scale(stack):
    """Min-max over the whole stack (not per map), so that its maps share one colour scale."""
    lo, hi = stack.min(), stack.max()
    return (stack - lo) / (hi - lo) if hi > lo else torch.zeros_like(stack)
