"""Probes: every I2AM map is one weighted reduction of the attention (docs/maps.md).

Query probes live on the latent grid (h, w): uniform (eq. 15), the inpainting mask (eq. 17),
one-hot points (M_sr, eq. 16) and boxes (a region's M_sr). Key probes live on the reference
grid (hI, wI): uniform (eq. 7) and one-hot patches (specific-generated maps). With several
references (joint sequences [text, generated, ref_0, ref_1, ...]) key probes live on the union of
the references' keys, ref 0's first: uniform over the union, uniform over each reference
("ref", r), patches ("patch", (r, i, j)).
"""
from dataclasses import dataclass

import torch

from .grid import resize
from .integers import int_tuple
from .inputs import InputError, as_mask, coords


@dataclass(frozen=True)
class ProbeSet:
    """Probe rows with their labels: ("uniform",), ("mask",), ("point", (r, c)), ("box", (t, l, b, r))
    or ("patch", (i, j)). weights: (R, rows, cols), each row a probe over a grid."""
    labels: tuple
    weights: torch.Tensor


def probe_row(labels, label):
    """The row of a probe label, or an error naming the probes that were traced."""
    if label not in labels:
        traced = ", ".join(_describe(lab) for lab in labels)
        raise ValueError(f"{_describe(label)} was not traced (traced probes: {traced})")
    return labels.index(label)


def _describe(label):
    return label[0] if len(label) == 1 else f"{label[0]} {label[1]}"


def latent_mask(mask, size):
    """The inpainting mask (1 = region to fill, any size) resized with nearest to size, as 0/1 float."""
    m = (resize(mask_2d(mask), size, "nearest") > 0.5).float()
    if m.sum() == 0:
        raise ValueError(f"mask is empty once resized with nearest to the latent grid {size[0]}x{size[1]}")
    return m


def mask_2d(mask):
    """A mask (PIL image, array or tensor; the rule of i2am.inputs) as a 0/1 float (H, W) tensor."""
    return as_mask(mask).float()


def query_probes(size, mask=None, points=(), boxes=()):
    """Latent-grid query probes: uniform 1/(h w), mask/(h w) when a mask is given, points, boxes."""
    h, w = size
    labels, rows = [("uniform",)], [torch.full((h, w), 1.0 / (h * w))]
    if mask is not None:
        labels.append(("mask",))
        rows.append(latent_mask(mask, size) / (h * w))
    for p in points:
        r, c = _ints(p, 2, "point (row, col)")
        if not (0 <= r < h and 0 <= c < w):
            raise InputError(f"point {coords((r, c))} is off the latent grid {h}x{w} "
                             f"(rows 0..{h - 1}, cols 0..{w - 1})")
        one = torch.zeros(h, w)
        one[r, c] = 1.0
        labels.append(("point", (r, c)))
        rows.append(one)
    for bx in boxes:
        t, l, b, r = _ints(bx, 4, "box (top, left, bottom, right)")
        if not (0 <= t < b <= h and 0 <= l < r <= w):
            raise InputError(f"box {coords((t, l, b, r))} must satisfy 0 <= top < bottom <= {h} and "
                             f"0 <= left < right <= {w} (end-exclusive, latent grid {h}x{w})")
        ind = torch.zeros(h, w)
        ind[t:b, l:r] = 1.0 / ((b - t) * (r - l))
        labels.append(("box", (t, l, b, r)))
        rows.append(ind)
    return _unique(ProbeSet(tuple(labels), torch.stack(rows)))


def key_probes(ref_grid, patches=()):
    """Reference-grid key probes: uniform 1/(hI wI), then one-hot patches (i, j)."""
    hI, wI = ref_grid
    labels, rows = [("uniform",)], [torch.full((hI, wI), 1.0 / (hI * wI))]
    for p in patches:
        i, j = _ints(p, 2, "patch (i, j)")
        if not (0 <= i < hI and 0 <= j < wI):
            raise InputError(f"patch {coords((i, j))} is off the reference grid {hI}x{wI} "
                             f"(rows 0..{hI - 1}, cols 0..{wI - 1})")
        one = torch.zeros(hI, wI)
        one[i, j] = 1.0
        labels.append(("patch", (i, j)))
        rows.append(one)
    return _unique(ProbeSet(tuple(labels), torch.stack(rows)))


def check_probes(size, ref_grid, points=(), boxes=(), patches=()):
    """The probes of a run checked before it: points and boxes on the latent grid `size`, patches
    on the reference grid, each given once (the rules query_probes and key_probes apply).
    ref_grid: (hI, wI), or every reference's grid [(hI_r, wI_r), ...] when there are several."""
    query_probes(size, points=points, boxes=boxes)
    if isinstance(ref_grid[0], (tuple, list)):
        reference_key_probes(ref_grid, patches)
    else:
        key_probes(ref_grid, patches)


def reference_key_probes(grids, patches=()):
    """Key probes over several references' keys (grids [(hI_r, wI_r), ...], keys in that order),
    weights (R, sum hI_r wI_r): uniform over the union, then uniform over each reference, then
    one-hot patches (r, i, j) (an (i, j) patch is reference 0's)."""
    sizes = [h * w for h, w in grids]
    starts = [sum(sizes[:r]) for r in range(len(grids))]
    total = sum(sizes)
    labels, rows = [("uniform",)], [torch.full((total,), 1.0 / total)]
    for r, (start, n) in enumerate(zip(starts, sizes)):
        one = torch.zeros(total)
        one[start:start + n] = 1.0 / n
        labels.append(("ref", r))
        rows.append(one)
    for p in patches:
        r, i, j = reference_patch(p, grids)
        one = torch.zeros(total)
        one[starts[r] + i * grids[r][1] + j] = 1.0
        labels.append(("patch", (r, i, j)))
        rows.append(one)
    return _unique(ProbeSet(tuple(labels), torch.stack(rows)))


def reference_patch(patch, grids):
    """(r, i, j) of a patch given as (r, i, j) or (i, j) (reference 0), checked against the grids."""
    p = tuple(patch) if isinstance(patch, (tuple, list)) else patch
    r, i, j = _ints(p, 3, "patch (r, i, j)") if len(p) == 3 else (0, *_ints(p, 2, "patch (i, j)"))
    if not 0 <= r < len(grids):
        raise InputError(f"patch {p}: reference {r} does not exist (references 0..{len(grids) - 1})")
    hI, wI = grids[r]
    if not (0 <= i < hI and 0 <= j < wI):
        raise InputError(f"patch {p} is off reference {r}'s grid {hI}x{wI} (rows 0..{hI - 1}, cols 0..{wI - 1})")
    return r, i, j


def _ints(p, n, what):
    return int_tuple(p, n, f"each {what}")


def _unique(probes):
    seen = set()
    for lab in probes.labels:
        if lab in seen:
            raise ValueError(f"{_describe(lab)} is given twice")
        seen.add(lab)
    return probes
