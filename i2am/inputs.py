"""Images and masks as users pass them: PIL images, numpy arrays or torch tensors.

One rule for every mask (i2am.trace, AttributionMaps.imacs, i2am.viz, the `i2am` command):
1 marks the region to fill (the inpainting mask) or the region of interest (a reference mask);
values are scaled to [0, 1] (PIL images and uint8 arrays divided by 255, bool as 0/1, other
numbers must already lie in [0, 1]) and a pixel is inside when its value is > 0.5.
"""
import numpy as np
import torch
from PIL import Image


def as_mask(mask, what="mask", *, batched=False):
    """The mask as a bool tensor (H, W), or (B, H, W) when batched, by the rule above.

    Leading (and, for arrays, one trailing) axes of size 1 are dropped: (1, 1, H, W) and
    (H, W, 1) are (H, W) masks."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(mask.convert("L"))
    m = mask.detach().cpu() if torch.is_tensor(mask) else torch.from_numpy(np.array(mask))
    if m.dim() == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    while m.dim() > 2 and m.shape[0] == 1 and not (batched and m.dim() == 3):
        m = m[0]
    if m.dim() != 2 and not (batched and m.dim() == 3):
        form = "2-D (H, W) or 3-D (B, H, W)" if batched else "2-D (H, W)"
        raise ValueError(f"{what} must be {form} (axes of size 1 allowed), got shape {tuple(m.shape)}")
    if m.dtype == torch.bool:
        return m
    if m.dtype == torch.uint8:
        return m > 127  # > 0.5 after dividing by 255
    if not (m.is_floating_point() or m.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{what} must hold numbers or bools, got {m.dtype}")
    m = m.double()
    if not torch.isfinite(m).all():
        raise ValueError(f"{what} must hold finite values in [0, 1] (1 = inside, 0 = outside), got NaN or inf")
    if m.min() < 0 or m.max() > 1:
        raise ValueError(f"{what} must hold values in [0, 1] (1 = inside; PIL images and uint8 arrays are "
                         f"read as 0-255), got values from {m.min().item():g} to {m.max().item():g}")
    return m > 0.5


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
