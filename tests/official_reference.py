"""The official protocol (SPEC section 3a), materialised in float64 from the attention inputs.

Written from the spec alone, independent of i2am's buffers and protocol code: every call's full
(Nq x Nk) softmaxes are built and summed per time group, and each step of the authors' code is
done as it reads (per-key resize and clamp, plain query means, the cloth-mask product, the
official display and IMACS).
"""
import torch
import torch.nn.functional as F


def bicubic(x, size):
    """Bicubic resize of the last two axes, align_corners=False."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-2]
    return F.interpolate(x.reshape(-1, 1, *x.shape[-2:]), size=tuple(size), mode="bicubic",
                         align_corners=False).reshape(*lead, *size)


def sums(calls, T, G, record):
    """{layer: (P, C)}, each (Br, G, H, Nq, Nk): softmax over keys and over queries, summed over
    the steps of each time group tau = floor(t G / T). calls: (layer, step, q, k) per call."""
    out = {}
    for layer, t, q, k in calls:
        s = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
        P, C = s.softmax(-1)[record], s.softmax(-2)[record]
        if layer not in out:
            out[layer] = [torch.zeros(len(record), G, *P.shape[1:], dtype=torch.float64) for _ in range(2)]
        tau = t * G // T
        out[layer][0][:, tau] += P
        out[layer][1][:, tau] += C
    return out


def generated(S, grids, latent, layers, by=None):
    """M_g: per layer C summed over a group's steps; each context key's map resized to the latent
    grid and clamped at 0, then the mean over ALL keys; the mean over layers and heads (by="head":
    each head's share of that mean, as i2am's by-head maps, which sum to M_g)."""
    total = 0
    for name in layers:
        C = S[name][1]  # (Br, G, H, Nq, Nk)
        if by != "time":
            C = C.sum(1, keepdim=True)
        Br, G, H, Nq, Nk = C.shape
        per_key = [bicubic(C[..., j].reshape(Br, G, H, *grids[name]), latent).clamp_min(0) for j in range(Nk)]
        m = torch.stack(per_key).mean(0)  # (Br, G, H, h, w)
        total = total + (m / H if by == "head" else m.mean(2, keepdim=True))  # by head: sums to M_g
    total = total / len(layers)
    return total[:, :, 0] if by == "time" else total[:, 0] if by == "head" else total[:, 0, 0]


def reference(S, key_grids, common, layers, by=None, query_weights=None):
    """M_r: per layer P summed over a group's steps, the plain mean over the layer's own queries
    (or the given per-layer query weights), the key grid resized bicubic to the common grid and
    clamped at 0, the mean over heads; then over layers. The layer's keys are its last hI*wI."""
    total = 0
    for name in layers:
        P = S[name][0]
        if by != "time":
            P = P.sum(1, keepdim=True)
        hk, wk = key_grids[name]
        P = P[..., P.shape[-1] - hk * wk:]
        w = query_weights[name] if query_weights else torch.full((P.shape[-2],), 1.0 / P.shape[-2], dtype=P.dtype)
        r = torch.einsum("bghqk,q->bghk", P, w).reshape(*P.shape[:3], hk, wk)
        r = bicubic(r, common).clamp_min(0)
        total = total + (r / r.shape[2] if by == "head" else r.mean(2, keepdim=True))
    total = total / len(layers)
    return total[:, :, 0] if by == "time" else total[:, 0] if by == "head" else total[:, 0, 0]


def cell_weights(grid, latent, point):
    """The official M_sr probe: the latent point nearest-resized to the layer grid, i.e. the one
    layer cell the point falls in."""
    (h, w), (hl, wl) = latent, grid
    m = torch.zeros(hl, wl, dtype=torch.float64)
    m[point[0] * hl // h, point[1] * wl // w] = 1
    return m.flatten()


def minmax(x):
    lo = x.amin((-2, -1), keepdim=True)
    return (x - lo) / (x.amax((-2, -1), keepdim=True) - lo + 1e-8)


def display(M, size):
    """min-max (+1e-8), bicubic to the image size, min-max (+1e-8)."""
    return minmax(bicubic(minmax(M), size))


def imacs_gen(M_g, mask):
    """Pixel-level M_g, values >= 0.6 set to 1, inverted, inside mean - 3 x outside mean."""
    x = mask.double()
    r = display(M_g, x.shape)
    r = 1 - torch.where(r >= 0.6, torch.ones_like(r), r)
    return ((r * x).sum((-2, -1)) / x.sum() - 3 * (r * (1 - x)).sum((-2, -1)) / (1 - x).sum()).item()


def imacs_ref(M_r, cloth):
    """The reference map times the cloth mask (bicubic to the reference grid), pixel level,
    values <= 0.4 set to 0, inside - 3 x outside with +1e-8 in both denominators."""
    x = cloth.double()
    d = display(M_r * bicubic(x, M_r.shape[-2:]), x.shape)
    d = torch.where(d <= 0.4, torch.zeros_like(d), d)
    return ((d * x).sum() / (x.sum() + 1e-8) - 3 * (d * (1 - x)).sum() / ((1 - x).sum() + 1e-8)).item()
