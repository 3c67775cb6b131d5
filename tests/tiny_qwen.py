"""A tiny, randomly initialised Qwen-Image-Edit-Plus transformer built in code (no downloads).

QwenImageTransformer2DModel with two double-stream blocks, 2 heads of 8 channels, called as
QwenImageEditPlusPipeline calls it: hidden_states holds the packed latents of the generated image
(a 4 x 6 token grid) and then of two reference images of different sizes (4 x 4 and 3 x 5),
img_shapes gives each one's (1, rows, cols); the text mask of an unpadded prompt is all ones.
"""
import torch
from diffusers import QwenImageTransformer2DModel

GRID, REFS = (4, 6), ((4, 4), (3, 5))  # packed generated and reference token grids
TEXT, JOINT_DIM, CHANNELS = 5, 16, 16


def transformer(zero_cond_t=False):
    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=CHANNELS, out_channels=4, num_layers=2,
                                       attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_DIM,
                                       axes_dims_rope=(2, 2, 4), zero_cond_t=zero_cond_t)


def edit_plus_inputs(batch=1, seed=0, refs=REFS, img_shapes=None):
    """Keyword arguments of one transformer call as QwenImageEditPlusPipeline makes them."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(1, *GRID), *[(1, *r) for r in refs]]
    n = sum(h * w for _, h, w in shapes)
    return dict(hidden_states=torch.randn(batch, n, CHANNELS, generator=gen),
                timestep=torch.full((batch,), 0.9), guidance=None,
                encoder_hidden_states_mask=torch.ones(batch, TEXT, dtype=torch.long),
                encoder_hidden_states=torch.randn(batch, TEXT, JOINT_DIM, generator=gen),
                img_shapes=img_shapes or [shapes] * batch, attention_kwargs=None, return_dict=False)
