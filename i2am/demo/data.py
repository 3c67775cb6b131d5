"""Procedural, seeded try-on data with a known warp.

A "garment" (a T-shirt silhouette with stripes, dots or checks and a small logo) is drawn in
its own frame; the reference image shows it unwarped, the target image shows it on a simple
person in a scene after a random similarity + shear warp, and the mask is exactly where the
garment lands. Everything is analytic in the garment frame, so for every target pixel the
true source position in the reference is known.

Coordinates: pixel (row, col) covers [row, row+1) x [col, col+1); its centre is (row+0.5,
col+0.5). The garment frame is the reference's pixel frame centred at its middle.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

REF_SIZE = 32  # reference image, square
TARGET_SIZE = 32  # target image, square
SUPERSAMPLE = 2  # sub-pixels per side, for anti-aliased rendering
EXAMPLES_SEED = 1234  # the fixed demo examples; training draws from its own stream (seed + 1)


@dataclass
class Warp:
    """Garment frame -> target pixels: p = matrix @ g + offset, per sample.

    matrix (B, 2, 2) and offset (B, 2) act on (x, y) = (col, row) order.
    """

    matrix: torch.Tensor
    offset: torch.Tensor

    def to_target(self, ref_rc):
        """Reference continuous (row, col) (B, N, 2) -> target continuous (row, col)."""
        g = ref_rc.flip(-1) - REF_SIZE / 2
        p = torch.einsum("bij,bnj->bni", self.matrix, g) + self.offset[:, None]
        return p.flip(-1)

    def to_reference(self, target_rc):
        """Target continuous (row, col) (B, N, 2) -> reference continuous (row, col)."""
        p = target_rc.flip(-1) - self.offset[:, None]
        g = torch.einsum("bij,bnj->bni", torch.linalg.inv(self.matrix), p)
        return (g + REF_SIZE / 2).flip(-1)

    def __getitem__(self, index):
        return Warp(self.matrix[index], self.offset[index])


def true_patch(warp, points, patch_size, latent_scale=1):
    """Reference patch (i, j) that latent points (B, N, 2) of integer (row, col) come from.

    latent_scale: target pixels per latent cell (1 here: the demo model works on pixels).
    Returns a long tensor (B, N, 2); patches off the reference grid are clamped onto it.
    """
    centre = (points.to(torch.float64) + 0.5) * latent_scale
    source = warp.to_reference(centre.to(warp.matrix.dtype))
    patch = torch.floor(source / patch_size).long()
    return patch.clamp(0, REF_SIZE // patch_size - 1)


def _rand(g, n, low, high):
    return low + (high - low) * torch.rand(n, generator=g)


def _hsv_to_rgb(h, s, v):
    """(B,) each in [0, 1] -> (B, 3)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], -1)
    f = v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))
    return f


def _palette(g, n):
    """Garment and scene colours in [0, 1]: body (B, 4, 3) at the garment's four corners, others (B, 3).

    The body colour blends between its corners, so every part of a garment has its own colour
    and copying it right needs the right reference position, not just the garment's mean.
    """
    corners = [
        _hsv_to_rgb(torch.rand(n, generator=g), _rand(g, n, 0.4, 1.0), _rand(g, n, 0.55, 1.0)) for _ in range(4)
    ]
    body = torch.stack(corners, 1)
    light = torch.rand(n, generator=g) < 0.5  # the pattern is much darker or much lighter than the body
    pattern = _hsv_to_rgb(torch.rand(n, generator=g), _rand(g, n, 0.0, 0.5), torch.where(light, 0.95, 0.15))
    logo = _hsv_to_rgb(torch.rand(n, generator=g), _rand(g, n, 0.7, 1.0), _rand(g, n, 0.8, 1.0))
    background = _hsv_to_rgb(torch.rand(n, generator=g), _rand(g, n, 0.0, 0.4), _rand(g, n, 0.3, 0.9))
    skin = _hsv_to_rgb(_rand(g, n, 0.03, 0.1), _rand(g, n, 0.3, 0.6), _rand(g, n, 0.35, 0.95))
    trousers = _hsv_to_rgb(torch.rand(n, generator=g), _rand(g, n, 0.2, 0.7), _rand(g, n, 0.1, 0.5))
    return dict(body=body, pattern=pattern, logo=logo, background=background, skin=skin, trousers=trousers)


def _design(g, n):
    """Random pattern and logo parameters, each (B,)."""
    return dict(
        kind=torch.randint(0, 3, (n,), generator=g),  # 0 stripes, 1 dots, 2 checks
        angle=torch.randint(0, 4, (n,), generator=g) * (math.pi / 4),
        period=_rand(g, n, 5.0, 8.0),
        phase_x=torch.rand(n, generator=g),
        phase_y=torch.rand(n, generator=g),
        logo_shape=torch.randint(0, 3, (n,), generator=g),  # 0 square, 1 plus, 2 diamond
        logo_x=_rand(g, n, -4.0, 4.0),
        logo_y=_rand(g, n, -7.0, 7.0),
        plain_sleeves=torch.rand(n, generator=g) < 0.5,
    )


def _b(t):
    """(B, ...) parameter -> broadcastable against (B, H, W) coordinates."""
    return t.view(-1, *([1] * 2), *t.shape[1:])


def garment_alpha(x, y):
    """T-shirt silhouette in the garment frame: body, two slanted sleeves, a round neckline."""
    body = (x.abs() <= 7) & (y >= -12) & (y <= 12)
    along = x.abs() - 7
    sleeve = (along > 0) & (along <= 6) & (y >= -12 + 0.6 * along) & (y <= -4 + 0.6 * along)
    neck = x.square() + (y + 13).square() <= 3.5**2
    return (body | sleeve) & ~neck


def _garment_rgb(x, y, design, colours):
    """Garment colour (B, H, W, 3) at garment-frame points (B, H, W)."""
    period, phase_x, phase_y = _b(design["period"]), _b(design["phase_x"]), _b(design["phase_y"])
    angle = _b(design["angle"])
    along = (x * torch.cos(angle) + y * torch.sin(angle)) / period + phase_x
    stripes = (along % 1) < 0.45
    dx = ((x / period + phase_x) % 1) - 0.5
    dy = ((y / period + phase_y) % 1) - 0.5
    dots = dx.square() + dy.square() <= 0.22**2
    checks = ((torch.floor(x / period + phase_x) + torch.floor(y / period + phase_y)) % 2) == 0
    kind = _b(design["kind"])
    patterned = torch.where(kind == 0, stripes, torch.where(kind == 1, dots, checks))
    sleeve = x.abs() > 7
    patterned = patterned & ~(sleeve & _b(design["plain_sleeves"]))

    lx, ly = (x - _b(design["logo_x"])).abs(), (y - _b(design["logo_y"])).abs()
    shape = _b(design["logo_shape"])
    square = (lx <= 2.5) & (ly <= 2.5)
    plus = ((lx <= 1) & (ly <= 3)) | ((lx <= 3) & (ly <= 1))
    diamond = lx + ly <= 3.2
    logo = torch.where(shape == 0, square, torch.where(shape == 1, plus, diamond))

    u = ((x + 13) / 26).clamp(0, 1)[..., None]
    v = ((y + 13) / 25).clamp(0, 1)[..., None]
    top_left, top_right, bottom_left, bottom_right = (_b(colours["body"][:, k]) for k in range(4))
    body = (top_left * (1 - u) + top_right * u) * (1 - v) + (bottom_left * (1 - u) + bottom_right * u) * v
    rgb = torch.where(patterned[..., None], _b(colours["pattern"]), body)
    return torch.where(logo[..., None], _b(colours["logo"]), rgb)


def _person_rgb(x, y, colours, row_fraction):
    """Scene without the garment (B, H, W, 3): background with a vertical shade, head, arms, legs."""
    shade = 0.75 + 0.25 * row_fraction[..., None]
    rgb = _b(colours["background"]) * shade
    head = x.square() + (y + 19).square() <= 5.0**2
    neck = (x.abs() <= 2) & (y >= -16) & (y <= -10)
    arms = (x.abs() >= 12) & (x.abs() <= 15.5) & (y >= -6) & (y <= 10)
    legs = (x.abs() >= 1) & (x.abs() <= 6.5) & (y >= 10) & (y <= 40)
    rgb = torch.where((head | neck | arms)[..., None], _b(colours["skin"]), rgb)
    return torch.where(legs[..., None], _b(colours["trousers"]), rgb)


def _random_warp(g, n):
    """Scale, aspect, rotation and shear, and a shift that keeps the garment inside the target."""
    scale = _rand(g, n, 0.55, 0.8)
    aspect = _rand(g, n, 0.9, 1.1)
    rotation = _rand(g, n, -0.15, 0.15)
    shear = _rand(g, n, -0.12, 0.12)
    cos, sin = torch.cos(rotation), torch.sin(rotation)
    rotate = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    stretch = torch.zeros(n, 2, 2)
    stretch[:, 0, 0] = scale * aspect
    stretch[:, 0, 1] = scale * shear
    stretch[:, 1, 1] = scale / aspect
    matrix = rotate @ stretch
    margin = TARGET_SIZE / 2 - 15 * scale * 1.1 - 1
    offset = TARGET_SIZE / 2 + margin[:, None] * (2 * torch.rand(n, 2, generator=g) - 1)
    return Warp(matrix, offset)


def _render(size, n, frame_of):
    """Supersampled (B, size*S, size*S) garment-frame coordinates for one image."""
    fine = (torch.arange(size * SUPERSAMPLE, dtype=torch.float32) + 0.5) / SUPERSAMPLE
    rows, cols = torch.meshgrid(fine, fine, indexing="ij")
    rc = torch.stack([rows, cols], -1).reshape(1, -1, 2).expand(n, -1, -1)
    frame = frame_of(rc).reshape(n, size * SUPERSAMPLE, size * SUPERSAMPLE, 2)
    return frame[..., 0], frame[..., 1], rows.expand(n, -1, -1) / size  # x, y, row fraction


def _downsample(img):
    """(B, H*S, W*S, C) -> (B, C, H, W) by averaging the sub-pixels."""
    return F.avg_pool2d(img.permute(0, 3, 1, 2).float(), SUPERSAMPLE)


def make_batch(n, seed=None, generator=None):
    """n seeded examples; images in [0, 1], (B, C, H, W).

    Returns a dict: reference (B,3,R,R), ref_mask (B,1,R,R) garment silhouette in the reference,
    target (B,3,T,T), mask (B,1,T,T) with 1 = region to fill, masked (target with the mask
    region set to 0.5 grey), warp (Warp), and logo (B,2): the reference (row, col) of the logo's
    centre, a landmark whose target position is warp.to_target(logo).
    """
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    colours, design, warp = _palette(g, n), _design(g, n), _random_warp(g, n)

    x, y, _ = _render(REF_SIZE, n, lambda rc: rc.flip(-1) - REF_SIZE / 2)
    alpha = garment_alpha(x, y)[..., None]
    reference = torch.where(alpha, _garment_rgb(x, y, design, colours), torch.ones(3))

    def target_frame(rc):
        return (warp.to_reference(rc) - REF_SIZE / 2).flip(-1)

    x, y, row_fraction = _render(TARGET_SIZE, n, target_frame)
    on_garment = garment_alpha(x, y)[..., None]
    scene = _person_rgb(x, y, colours, row_fraction)
    target = torch.where(on_garment, _garment_rgb(x, y, design, colours), scene)

    mask = (_downsample(on_garment) > 0).float()  # every pixel the garment touches: no leak into `masked`
    target = _downsample(target)
    return dict(
        reference=_downsample(reference),
        ref_mask=(_downsample(alpha) >= 0.5).float(),
        target=target,
        mask=mask,
        masked=target * (1 - mask) + 0.5 * mask,
        warp=warp,
        logo=torch.stack([design["logo_y"], design["logo_x"]], -1) + REF_SIZE / 2,
    )


def examples(n=4):
    """The fixed examples the demo and docs show and score."""
    return make_batch(n, seed=EXAMPLES_SEED)


def probe_points(mask, count, grid=None, border=0):
    """Up to `count` (row, col) points spread over the mask (H, W), `border` cells inside it.

    Keep the border at 0 when scoring correspondence: the garment's interior is its middle, so
    eroded probes make "the centre patch" a good guess (on 16 examples a constant patch is
    within one patch of the truth for 61% of border-1 probes, 32% of border-0 probes).
    grid: the latent (h, w) to pick points on; the mask is resized to it with nearest, as
    i2am.trace resizes its mask. Points are taken in raster order at an even stride over the
    eroded mask, so they are deterministic and cover the whole region.
    """
    inner = mask.float()[None, None]
    if grid is not None:
        inner = F.interpolate(inner, size=tuple(grid), mode="nearest")
    if border:
        inner = -F.max_pool2d(-inner, 2 * border + 1, stride=1, padding=border)
    candidates = torch.nonzero(inner[0, 0] > 0.5)
    if len(candidates) <= count:
        return candidates
    pick = torch.linspace(0, len(candidates) - 1, count).round().long()
    return candidates[pick]
