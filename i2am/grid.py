"""Grids: resizing maps between layer and latent resolution, inferring a layer's grid, and
pulling latent-grid query probes back to a layer's grid through the adjoint of the resize."""
import math

import torch
import torch.nn.functional as F

RESIZE_MODES = ("bicubic", "bilinear", "nearest")


def resize(x, size, mode="bicubic"):
    """Resize the last two axes of x to size; align_corners=False as the official I2AM code."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    size = tuple(int(s) for s in size)
    if tuple(x.shape[-2:]) == size:
        return x
    lead = x.shape[:-2]
    flat = x.reshape(-1, 1, *x.shape[-2:])
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(flat, size=size, mode=mode, **kw).reshape(*lead, *size)


def layer_grid(nq, latent_size):
    """(h_l, w_l) of a layer with nq queries, for a latent (h, w) downsampled by powers of two.

    diffusers' stride-2 convolutions (padding 1) give ceil(h/2); pooling gives floor(h/2).
    """
    h, w = latent_size
    f = 1
    while f <= max(h, w):
        for grid in ((math.ceil(h / f), math.ceil(w / f)), (h // f, w // f)):
            if grid[0] * grid[1] == nq:
                return grid
        f *= 2
    raise ValueError(f"cannot infer the grid of a layer with Nq={nq} queries from the latent size "
                     f"{h}x{w} (expected (h/2^i)*(w/2^i) queries); pass its grid explicitly")


def pullback(m, grid, mode="bicubic"):
    """Resize_l^T m: latent-grid probes m (R, h, w) as weights (R, h_l*w_l) on a layer's grid.

    ref[m] = sum_X m[X] Resize_l(P)[X] = sum_x (Resize_l^T m)[x] P[x] (eq. 14): the resize
    is linear, so its adjoint is the vector-Jacobian product, exact for every mode. Grad is
    enabled here because pipelines call the denoiser under no_grad or inference_mode.
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.zeros(m.shape[0], *grid, dtype=torch.float64, requires_grad=True)
        y = resize(x, m.shape[-2:], mode)
        (g,) = torch.autograd.grad(y, x, m.to(torch.float64))
    return g.reshape(m.shape[0], -1).float()
