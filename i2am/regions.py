"""Regions: the generated image and its reference as two rectangles of ONE latent grid.

CatVTON-style try-on puts the person and the garment latents one above the other and lets a
UNet's self-attention (attn1) relate them; in-context editors and FLUX.1 Fill try-on put the
reference beside the image. ``query_region`` and ``ref_region`` are (top, left, bottom, right),
end-exclusive, on the latent grid (a DiT's packed token grid). On a layer at a lower
resolution both scale by the layer's factor; each layer's query rows and reference keys are
the scaled rectangles' tokens in row-major order (strided when the halves sit side by side).
"""
from dataclasses import dataclass
from math import gcd

import torch

from .inputs import InputError, arg, coords, to_pil
from .integers import int_tuple


def rectangle(region, what):
    """(top, left, bottom, right) as ints with top < bottom, left < right, all >= 0."""
    t, l, b, r = int_tuple(region, 4, f"{arg(what)} (top, left, bottom, right)")
    if not (0 <= t < b and 0 <= l < r):
        raise InputError(f"{arg(what)} must satisfy 0 <= top < bottom and 0 <= left < right (end-exclusive), "
                         f"got {coords((t, l, b, r))}")
    return t, l, b, r


def regions_of(query_region, ref_region):
    """The checked Regions of two rectangles, or None when neither is given."""
    if query_region is None and ref_region is None:
        return None
    if query_region is None or ref_region is None:
        raise InputError(f"{arg('query_region')} and {arg('ref_region')} go together: the generated and the "
                         "reference part of one latent grid")
    return Regions(rectangle(query_region, "query_region"), rectangle(ref_region, "ref_region"))


def shape(region):
    t, l, b, r = region
    return b - t, r - l


@dataclass(frozen=True)
class Regions:
    """The query (generated) and reference rectangles of one latent grid."""
    query: tuple
    ref: tuple

    def __post_init__(self):
        (t1, l1, b1, r1), (t2, l2, b2, r2) = self.query, self.ref
        if t1 < b2 and t2 < b1 and l1 < r2 and l2 < r1:
            raise InputError(f"{arg('query_region')} {coords(self.query)} and {arg('ref_region')} "
                             f"{coords(self.ref)} overlap; they must be two separate parts of the latent grid")

    def check(self, grid):
        """An error unless both rectangles lie inside the latent grid (h, w)."""
        h, w = grid
        for what, (t, l, b, r) in (("query_region", self.query), ("ref_region", self.ref)):
            if b > h or r > w:
                raise InputError(f"{arg(what)} {coords((t, l, b, r))} reaches outside the latent grid {h}x{w} "
                                 f"(bottom <= {h}, right <= {w})")

    def on_layer(self, layer, grid, latent_size):
        """(query indices, query grid, reference indices, reference grid) of the rectangles scaled
        to a layer's token grid (h_l, w_l); indices into its row-major tokens, int64 on the CPU."""
        (q, q_grid), (k, k_grid) = (_scaled(layer, what, region, grid, latent_size)
                                    for what, region in (("query_region", self.query), ("ref_region", self.ref)))
        return q, q_grid, k, k_grid


def _scaled(layer, what, region, grid, latent_size):
    (h, w), (h_l, w_l) = latent_size, grid
    t, l, b, r = region
    bounds = (t * h_l, l * w_l, b * h_l, r * w_l)
    sizes = (h, w, h, w)
    if any(x % n for x, n in zip(bounds, sizes)):
        raise ValueError(f"layer {layer!r}: {what} {region} on the {h}x{w} latent grid does not scale to whole "
                         f"tokens of the layer's {h_l}x{w_l} grid; choose bounds divisible by "
                         f"{h // gcd(h, h_l)} (rows) and {w // gcd(w, w_l)} (cols), or leave the layer out "
                         "with layers=")
    t, l, b, r = (x // n for x, n in zip(bounds, sizes))
    rows, cols = torch.arange(t, b), torch.arange(l, r)
    return (rows[:, None] * w_l + cols[None, :]).reshape(-1), (b - t, r - l)


def crop(image, region, latent):
    """The pixels of a latent-grid `region` of a PIL `image` or an (..., H, W) tensor whose latent
    grid is `latent` (each side an integer number of pixels per latent cell)."""
    (h, w), (t, l, b, r) = latent, region
    if isinstance(image, torch.Tensor):
        sy, sx = image.shape[-2] // h, image.shape[-1] // w
        return image[..., t * sy:b * sy, l * sx:r * sx]
    sy, sx = image.height // h, image.width // w
    return image.crop((l * sx, t * sy, r * sx, b * sy))


def split_image(image, regions):
    """(the query region's image, the reference region's image) of one generated image, as PIL
    images; regions: AttributionMaps.regions ({"latent", "query", "ref"})."""
    image = to_pil(image)
    return tuple(crop(image, regions[part], regions["latent"]) for part in ("query", "ref"))
