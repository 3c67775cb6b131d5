"""Tiny in-context models built in code (no downloads): the reference inside the same latent.

- CatVTON-shaped: an SD-inpainting-like UNet2DConditionModel (9 input channels: noisy latent,
  masked latent, mask) called on a height-concatenated [person; garment] latent of 16 x 6
  (each part 8 x 6), with a single all-zero context token (no meaningful cross-attention
  conditioning); its self-attention (attn1) relates the two parts.
- FLUX.1 Fill-like side by side: the tiny Flux transformer of tiny_flux on one 4 x 8 packed
  token grid whose left half is the image and right half the reference (every other half-row).
"""
import torch
from diffusers import UNet2DConditionModel

import tiny_flux as tf

PERSON = (8, 6)                                 # each part of the CatVTON latent
CATVTON_LATENT = (16, 6)                        # [person; garment] along height
CATVTON_QUERY, CATVTON_REF = (0, 0, 8, 6), (8, 0, 16, 6)
FILL_GRID = (4, 8)                              # [image | reference] along width
FILL_QUERY, FILL_REF = (0, 0, 4, 4), (0, 4, 4, 8)


def catvton_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=CATVTON_LATENT[0], in_channels=9, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def catvton_inputs(batch=2, seed=0):
    """One UNet call: [person; garment] noisy and masked latents and the mask (garment half kept)."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, 1, *CATVTON_LATENT)
    mask[:, :, 2:6, 1:5] = 1  # the try-on area of the person
    x = torch.cat([torch.randn(batch, 4, *CATVTON_LATENT, generator=gen),
                   torch.randn(batch, 4, *CATVTON_LATENT, generator=gen), mask], 1)
    return dict(sample=x, timestep=torch.tensor(500), encoder_hidden_states=torch.zeros(batch, 1, 8),
                return_dict=False)


def fill_inputs(batch=2, seed=0):
    """One FluxTransformer2DModel call on the side-by-side grid: every image token has id kind 0."""
    gen = torch.Generator().manual_seed(seed)
    n = FILL_GRID[0] * FILL_GRID[1]
    return dict(hidden_states=torch.randn(batch, n, 16, generator=gen),
                encoder_hidden_states=torch.randn(batch, tf.TEXT, tf.JOINT_DIM, generator=gen),
                pooled_projections=torch.randn(batch, tf.POOLED_DIM, generator=gen),
                timestep=torch.full((batch,), 0.9), guidance=torch.full((batch,), 2.5),
                img_ids=tf.token_ids(FILL_GRID, 0), txt_ids=torch.zeros(tf.TEXT, 3), return_dict=False)
