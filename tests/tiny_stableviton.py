"""A StableVITON-shaped denoiser built in code (plain PyTorch, instrumented with i2am.attention).

StableVITON conditions its UNet twice: attn2 cross-attends to a CLIP embedding of the garment
(a one-token context), and its warp blocks cross-attend from the decoder to garment features
on each block's own grid. This model has both at three resolutions of an 8 x 6 latent
(8x6, 4x3, 2x2): attn2 in the input blocks, the middle block and the output blocks, warp blocks
in the output blocks whose keys are reference features (a 1x1 projection of the garment latent,
standing in for StableVITON's zero-initialised encoder) pooled to the block's grid.
"""
import torch
import torch.nn.functional as F
from torch import nn

import i2am

LATENT, CHANNELS, HEADS, DIM = (8, 6), 8, 2, 4
GRIDS = {0: (8, 6), 1: (4, 3), 2: (2, 2)}


class CrossAttention(nn.Module):
    def __init__(self, context_dim):
        super().__init__()
        self.to_q = nn.Linear(CHANNELS, HEADS * DIM, bias=False)
        self.to_k = nn.Linear(context_dim, HEADS * DIM, bias=False)
        self.to_v = nn.Linear(context_dim, HEADS * DIM, bias=False)
        self.to_out = nn.Linear(HEADS * DIM, CHANNELS)
        self.calls = None  # a list: every call's (module, q, k, v) is appended (the tests' oracle input)

    def forward(self, x, context):
        B, C, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)
        q, k, v = (f(t).unflatten(-1, (HEADS, DIM)).transpose(1, 2)
                   for f, t in ((self.to_q, tokens), (self.to_k, context), (self.to_v, context)))
        q = q * 2.0  # sharper attention than a random init gives, so that the maps are not flat
        if self.calls is not None:
            self.calls.append((self, q.detach().double(), k.detach().double(), v.detach().double()))
        out = i2am.attention(q, k, v, layer=self)
        return x + self.to_out(out.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(B, C, h, w)


class TinyStableVITON(nn.Module):
    """forward(x (B, 4, 8, 6), context (B, n, 16), reference (B, 4, 8, 6)) -> (B, 4, 8, 6)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = nn.Conv2d(4, CHANNELS, 3, padding=1)
        self.ref_proj = nn.Conv2d(4, CHANNELS, 1)
        self.input_blocks = nn.ModuleList(nn.ModuleDict({"attn2": CrossAttention(16)}) for _ in GRIDS)
        self.middle_block = nn.ModuleDict({"attn2": CrossAttention(16)})
        self.output_blocks = nn.ModuleList(
            nn.ModuleDict({"attn2": CrossAttention(16), "warp": CrossAttention(CHANNELS)}) for _ in GRIDS)
        self.conv_out = nn.Conv2d(CHANNELS, 4, 3, padding=1)

    def attention_layers(self):
        return [m for m in self.modules() if isinstance(m, CrossAttention)]

    def forward(self, x, context, reference):
        ref = self.ref_proj(reference)
        skips, h = [], self.conv_in(x)
        for i, block in enumerate(self.input_blocks):
            h = block["attn2"](F.adaptive_avg_pool2d(h, GRIDS[i]), context)
            skips.append(h)
        h = self.middle_block["attn2"](h, context)
        for i in reversed(range(len(GRIDS))):
            block = self.output_blocks[i]
            h = F.interpolate(h, size=GRIDS[i], mode="nearest") + skips[i]
            h = block["attn2"](h, context)
            keys = F.adaptive_avg_pool2d(ref, GRIDS[i]).flatten(2).transpose(1, 2)  # the block's own grid
            h = block["warp"](h, keys)
        return self.conv_out(h)


@torch.no_grad()
def sample(model, context, reference, steps, guidance=True):
    """A short denoising loop; with guidance the batch is [uncond (zero context), cond]."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(context.shape[0], 4, *LATENT, generator=gen)
    for _ in range(steps):
        if guidance:
            ctx = torch.cat([torch.zeros_like(context), context])
            eps = model(torch.cat([x, x]), ctx, torch.cat([reference, reference])).chunk(2)[1]
        else:
            eps = model(x, context, reference)
        x = x - 0.2 * eps
    return x


def inputs(n_context, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, n_context, 16, generator=gen) * 2, torch.randn(1, 4, *LATENT, generator=gen) * 3
