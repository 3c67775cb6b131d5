"""Figures of attribution maps (paper Figures 2 and 5-9): matplotlib colormaps, Pillow images.

Images come in as PIL images or arrays/tensors (3, H, W), (H, W, 3) or (H, W) with floats in
[0, 1] or uint8; maps as 2-D tensors (stacks (N, h, w) for the grids). A map is shown at pixel
level (eq. 9: bicubic to the image size, min-max, threshold) in the jet colormap, blended only
where the thresholded map is non-zero. Grid coordinates (latent points and boxes, reference
patches) map to pixels by the image / grid size ratio.

    viz.overlay(image, maps.generated()).save("generated.png")
    viz.specific_reference_figure(image, reference, maps.specific_reference((20, 30)), (20, 30),
                                  maps.latent_size).save("point.png")
"""
import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from . import display

TILE = 192  # display height of one panel, in pixels
NO_IMAGE = (128, 128, 128)  # canvas colour when a map has no image to lie on
PROBE_COLOUR, PROBE_EDGE = (255, 0, 0), (255, 255, 255)
_LABEL_SIZE = 13
_PAD = 6


def to_pil(image):
    """An RGB PIL image from a PIL image or a (3, H, W) / (H, W, 3) / (H, W) array or tensor with
    floats in [0, 1] or uint8 values."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    a = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"an image must be (3, H, W), (H, W, 3) or (H, W), got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.round(np.clip(a.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def overlay(image, M, *, threshold=0.4, alpha=0.5, cmap="jet"):
    """Map M (h, w) over image at pixel level (eq. 9); pixels where the thresholded map is zero
    keep the image's values exactly."""
    M = torch.as_tensor(M)
    if M.dim() != 2:
        raise ValueError(f"overlay takes one 2-D map, got shape {tuple(M.shape)} (maps of several recorded "
                         "images carry a batch axis first: pick one)")
    base = to_pil(image)
    heat = display.pixel_level(M.double(), (base.height, base.width), threshold).numpy()
    colour = colormaps[cmap](heat)[..., :3] * 255
    out = np.asarray(base).copy()
    on = heat > 0
    out[on] = np.round((1 - alpha) * out[on] + alpha * colour[on]).astype(np.uint8)
    return Image.fromarray(out)


def draw_probe(image, probe, grid_size, *, colour=PROBE_COLOUR):
    """A copy of image with a probe drawn: a point (row, col) as a dot in its cell, a box (top,
    left, bottom, right), end-exclusive, as an outline inside it. Coordinates are on a grid of
    grid_size (rows, cols) laid over the image."""
    img = to_pil(image)
    sy, sx = img.height / grid_size[0], img.width / grid_size[1]
    draw = ImageDraw.Draw(img)
    if len(probe) == 2:
        r, c = probe
        cy, cx = (r + 0.5) * sy, (c + 0.5) * sx
        rad = max(2.0, 0.35 * min(sy, sx))
        draw.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=colour, outline=PROBE_EDGE)
    elif len(probe) == 4:
        t, l, b, r = probe
        box = (round(l * sx), round(t * sy), round(r * sx) - 1, round(b * sy) - 1)
        width = max(2, round(min(img.size) / 64))
        draw.rectangle(box, outline=colour, width=width)
    else:
        raise ValueError(f"a probe is a point (row, col) or a box (top, left, bottom, right), got {probe!r}")
    return img


def overview_figure(image, reference_image, M_g, M_r, M_r_masked=None, *, title=None, threshold=0.4,
                    alpha=0.5, tile=TILE):
    """The generated image and M_g over it, the reference image and M_r over it, and, when given,
    the inpainting-mask reference map (eq. 17) over it; images that are None are left out."""
    panels = []
    sides = (("generated", image, (("M_g", M_g),)),
             ("reference", reference_image, (("M_r", M_r), ("M_r, masked", M_r_masked))))
    for name, img, maps in sides:
        base = _panel_base(img, maps[0][1].shape[-2:], tile)
        if img is not None:
            panels.append((name, base))
        panels += [(label, overlay(base, M, threshold=threshold, alpha=alpha)) for label, M in maps if M is not None]
    return compose([[p for _, p in panels]], column_labels=[label for label, _ in panels], title=title)


def split_figure(generated=None, reference=None, *, image=None, reference_image=None, column_labels,
                 title=None, threshold=0.4, alpha=0.5, tile=TILE):
    """Grid of maps split by time group or head (paper Figures 5-8): one column per group or
    head, a row of generated maps (N, h, w) over image and a row of reference maps (N, hI, wI)
    over reference_image; either row may be left out."""
    rows, row_labels = [], []
    for stack, img, label in ((generated, image, "generated"), (reference, reference_image, "reference")):
        if stack is None:
            continue
        if len(stack) != len(column_labels):
            raise ValueError(f"{len(column_labels)} column labels for {len(stack)} {label} maps")
        base = _panel_base(img, stack.shape[-2:], tile)
        rows.append([overlay(base, M, threshold=threshold, alpha=alpha) for M in stack])
        row_labels.append(label)
    if not rows:
        raise ValueError("split_figure needs generated and/or reference maps")
    return compose(rows, column_labels=column_labels, row_labels=row_labels, title=title)


def specific_reference_figure(image, reference_image, M_sr, probe, latent_size, *, title=None,
                              threshold=0.4, alpha=0.5, tile=TILE):
    """Paper Figures 2 and 9: the generated image with the probe point or box (latent
    coordinates) drawn, beside the reference image with its specific-reference map M_sr."""
    left = draw_probe(_panel_base(image, latent_size, tile), probe, latent_size)
    right = overlay(_panel_base(reference_image, M_sr.shape, tile), M_sr, threshold=threshold, alpha=alpha)
    kind = "point" if len(probe) == 2 else "box"
    return compose([[left, right]], column_labels=[f"generated, {kind} {tuple(probe)}", "reference, M_sr"],
                   title=title)


def specific_generated_figure(reference_image, image, M_sg, patch, ref_grid, *, title=None,
                              threshold=0.4, alpha=0.5, tile=TILE):
    """The dual figure: reference patch (i, j) drawn on the reference image, beside the generated
    image with the map of where that patch is used."""
    i, j = patch
    left = draw_probe(_panel_base(reference_image, ref_grid, tile), (i, j, i + 1, j + 1), ref_grid)
    right = overlay(_panel_base(image, M_sg.shape, tile), M_sg, threshold=threshold, alpha=alpha)
    return compose([[left, right]], column_labels=[f"reference, patch {(i, j)}", "generated, M_sg"],
                   title=title)


def time_labels(time_groups, num_steps):
    """Column labels of a by-time split: the steps (0 = first, noisiest) of each group (eq. 10)."""
    starts = [-(-g * num_steps // time_groups) for g in range(time_groups + 1)]  # first t with tau(t) = g
    return [f"steps {a}-{b - 1}" if b - 1 > a else f"step {a}" for a, b in zip(starts, starts[1:])]


def compose(rows, *, column_labels=None, row_labels=None, title=None):
    """Lay out rows of images on white in aligned columns (each image centred in its cell), with
    column labels above the first row, row labels on the left and a title on top."""
    font = ImageFont.load_default(size=_LABEL_SIZE)
    line = _LABEL_SIZE + _PAD
    ncols = max(len(row) for row in rows)
    col_w = [max([row[c].width for row in rows if c < len(row)]
                 + [_text_width(font, column_labels[c]) if column_labels else 0]) for c in range(ncols)]
    row_h = [max(im.height for im in row) for row in rows]
    left = max(_text_width(font, s) for s in row_labels) + _PAD if row_labels else 0
    top = (line if title else 0) + (line if column_labels else 0)
    width = max(_PAD + left + sum(col_w) + _PAD * ncols, _PAD + _text_width(font, title or "") + _PAD)
    height = _PAD + top + sum(row_h) + _PAD * len(rows)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((_PAD, _PAD), title, fill="black", font=font)
    y = _PAD + top
    for r, row in enumerate(rows):
        if row_labels:
            draw.text((_PAD, y + row_h[r] // 2), row_labels[r], fill="black", font=font, anchor="lm")
        x = _PAD + left
        for c, im in enumerate(row):
            if r == 0 and column_labels:
                draw.text((x + col_w[c] // 2, y - _PAD // 2), column_labels[c], fill="black", font=font,
                          anchor="md")
            canvas.paste(im, (x + (col_w[c] - im.width) // 2, y + (row_h[r] - im.height) // 2))
            x += col_w[c] + _PAD
        y += row_h[r] + _PAD
    return canvas


def _panel_base(image, grid_size, tile):
    """The image scaled to the panel height (nearest when enlarging, so pixels stay visible), or a
    grey canvas of the grid's aspect ratio when there is no image."""
    if image is None:
        h, w = grid_size
        return Image.new("RGB", (max(1, round(tile * w / h)), tile), NO_IMAGE)
    img = to_pil(image)
    size = (max(1, round(img.width * tile / img.height)), tile)
    return img.resize(size, Image.NEAREST if tile >= img.height else Image.LANCZOS)


def _text_width(font, text):
    return int(np.ceil(font.getlength(text)))
