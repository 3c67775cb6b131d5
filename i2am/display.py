"""Display and scoring of 2-D maps: normalisation (eq. 8), pixel level (eq. 9) and IMACS."""
import torch

from .grid import resize
from .inputs import as_mask


def normalize(x):
    """Min-max each 2-D map (last two axes) to [0, 1]; a constant map becomes zeros, never NaN."""
    lo = x.amin((-2, -1), keepdim=True)
    span = x.amax((-2, -1), keepdim=True) - lo
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1), torch.zeros_like(x))


def pixel_level(M, size, threshold=0.4):
    """eq. 9: normalise, bicubic to the image size, clamp to [0, 1], normalise again, and zero
    the values <= threshold (eq. 8's display threshold)."""
    x = normalize(resize(normalize(M), size, "bicubic").clamp(0, 1))
    return torch.where(x <= threshold, torch.zeros_like(x), x)


def binary_mask(mask, what="mask"):
    """A 2-D (or batched) mask (PIL image, array or tensor; the rule of i2am.inputs) as a bool
    tensor; empty or full masks are errors."""
    mask = as_mask(mask, what, batched=True)
    counts = mask.flatten(-2).sum(-1)
    if (counts == 0).any():
        raise ValueError(f"{what} is empty: IMACS needs pixels inside the mask")
    if (counts == mask.shape[-2] * mask.shape[-1]).any():
        raise ValueError(f"{what} covers the whole image: IMACS needs pixels outside the mask")
    return mask


def imacs(Mh, x, lam=3.0):
    """IMACS (official code): mean of Mh inside mask x minus lam times its mean outside.

    Mh: normalised, thresholded maps (..., H, W) at the mask's size; x: binary mask (..., H, W).
    """
    x = x.to(Mh.dtype)
    inside = (Mh * x).sum((-2, -1)) / x.sum((-2, -1))
    outside = (Mh * (1 - x)).sum((-2, -1)) / (1 - x).sum((-2, -1))
    return inside - lam * outside
