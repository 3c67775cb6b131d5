"""The I2AM equations, materialised: the oracle every backend and map is tested against.

Written to be read next to the paper (Park & Jang, "I2AM", ICLR 2025) and docs/maps.md.
The per-call equations (softmaxes, call_maps) live in the kernel layer,
i2am.kernels.testing, and are re-exported here. Everything here builds the full (Nq x Nk)
probabilities and loops over layers, heads and time groups as the equations are printed;
float64 by default. Never use it on real sizes: that is what the streaming backends are for.
"""
from __future__ import annotations

import torch

from .grid import resize
from .kernels.testing import call_maps, softmaxes  # noqa: F401  the per-call equations


def ref_map_eq14(P, grid, m, mode="bicubic"):
    """eq. 14-15 as printed: Resize_l the query axes of P (Nq,Kr) to the latent grid, weight by m."""
    Kr = P.shape[-1]
    resized = resize(P.transpose(0, 1).reshape(Kr, *grid), m.shape, mode)  # (Kr, h, w)
    return (resized * m).sum((-2, -1))


def pullback(m, grid, mode="bicubic"):
    """Resize_l^T m by brute force: the weight of layer position x is <m, Resize_l(e_x)>."""
    n = grid[0] * grid[1]
    basis = torch.eye(n, dtype=m.dtype).reshape(n, *grid)
    return (resize(basis, m.shape, mode) * m).sum((-2, -1))


def generated(gens, size, mode="bicubic", by=None):
    """M_g (eq. 5, 10, 11). gens: one (G, N_l, h_l, w_l) buffer per layer of the set S.

    M_g = 1/|S| sum_l 1/N_l sum_n clamp_min0(Resize(sum_tau gen[l, tau, n])) (docs/maps.md,
    with each layer's own head count N_l); by="time" keeps tau (clamp per group), by="head"
    keeps n. The factors are the same in all three, so summing over the kept axis gives back
    the integrated reference map.
    """
    keep = {None: 1, "time": gens[0].shape[0], "head": gens[0].shape[1]}[by]
    total = torch.zeros(keep, *size, dtype=torch.float64)
    for g in gens:
        N = g.shape[1]
        for i in range(keep):
            for n in range(N):
                if by == "head" and n != i:
                    continue
                x = g[i, n] if by == "time" else g[:, n].sum(0)
                total[i] += resize(x.double(), size, mode).clamp_min(0) / N
    total /= len(gens)
    return total if by else total[0]


def reference(refs, grid, by=None):
    """M_r (eq. 13, 15, 17). refs: one (G, N_l, hI*wI) buffer per layer of the set S."""
    axes = {None: (0, 1), "time": (1,), "head": (0,)}[by]
    total = sum(r.double().sum(axes) / r.shape[1] for r in refs) / len(refs)
    return total.reshape(*total.shape[:-1], *grid)
