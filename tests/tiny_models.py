"""Tiny, randomly initialised diffusers pipelines built in code (no downloads) for trace tests.

Each builder returns a TinyModel: the real pipeline class with a DDIM scheduler, the keyword
arguments of one classifier-free-guided run, the reference grid of its cross-attention keys,
and which module projects those keys (to_k, or to_k_ip[0] for IP-Adapter layers).
Images are 16 x 24 pixels, latents 8 x 12, cross-attention layers at 8 x 12 and 4 x 6.
"""
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, PaintByExamplePipeline, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionConfig, Dinov2Config, Dinov2Model

HEIGHT, WIDTH = 16, 24
LATENT = (8, 12)
CROSS_DIM = 16
STEPS = 3


@dataclass
class TinyModel:
    name: str
    pipe: object
    kwargs: dict        # one run, without generator
    ref_grid: tuple
    ip_adapter: bool    # keys come from to_k_ip[0] (the image tokens), not to_k

    def run(self, seed=0, **overrides):
        """The denoised latents of one seeded run."""
        args = {**self.kwargs, **overrides}
        return self.pipe(generator=torch.Generator().manual_seed(seed), output_type="latent", **args).images


def unet(in_channels=4):
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=LATENT[0], in_channels=in_channels, out_channels=4, block_out_channels=(8, 16),
        layers_per_block=1, norm_num_groups=4, cross_attention_dim=CROSS_DIM, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))


def vae():
    torch.manual_seed(1)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def scheduler():
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def image(seed, size=(WIDTH, HEIGHT)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def inpainting_mask():
    """1 = region to fill: a block in the right half, (HEIGHT, WIDTH) pixels."""
    m = np.zeros((HEIGHT, WIDTH), dtype=np.float32)
    m[4:14, 10:22] = 1
    return m


def paint_by_example():
    """PaintByExamplePipeline: one projected CLIP embedding per image, ref_grid (1, 1)."""
    torch.manual_seed(2)
    config = CLIPVisionConfig(hidden_size=CROSS_DIM, projection_dim=CROSS_DIM, intermediate_size=32,
                              num_attention_heads=2, num_hidden_layers=5, image_size=16, patch_size=4)
    pipe = PaintByExamplePipeline(
        vae=vae(), image_encoder=PaintByExampleImageEncoder(config, proj_size=CROSS_DIM), unet=unet(9),
        scheduler=scheduler(), safety_checker=None, feature_extractor=CLIPImageProcessorPil(crop_size=16, size=16),
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(image=image(0), mask_image=Image.fromarray((inpainting_mask() * 255).astype(np.uint8)),
                  example_image=image(1, (16, 16)), height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                  guidance_scale=5.0)
    return TinyModel("paint_by_example", pipe, kwargs, (1, 1), False)


def patch_inpainting():
    """SD inpainting whose prompt embeddings are the CLS + 4 x 3 patch tokens of a Dinov2 encoder
    of the reference image (the paper's patch-embedding model)."""
    torch.manual_seed(3)
    encoder = Dinov2Model(Dinov2Config(hidden_size=CROSS_DIM, num_hidden_layers=1, num_attention_heads=2,
                                       mlp_ratio=2, image_size=16, patch_size=4)).eval()
    reference = torch.randn(1, 3, 16, 12)
    with torch.no_grad():
        embeds = encoder(pixel_values=reference).last_hidden_state              # (1, 1 + 4*3, 16)
        negative = encoder(pixel_values=torch.zeros_like(reference)).last_hidden_state
    pipe = StableDiffusionInpaintPipeline(
        vae=vae(), text_encoder=None, tokenizer=None, unet=unet(9), scheduler=scheduler(), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=negative, image=image(0),
                  mask_image=Image.fromarray((inpainting_mask() * 255).astype(np.uint8)), height=HEIGHT,
                  width=WIDTH, num_inference_steps=STEPS, guidance_scale=5.0)
    return TinyModel("patch_inpainting", pipe, kwargs, (4, 3), False)


def ip_adapter():
    """StableDiffusionPipeline with an IP-Adapter "full" image projection (CLS + 3 x 2 image tokens)
    loaded through diffusers' own conversion, adapter scale 0.7, random text embeddings."""
    torch.manual_seed(4)
    model = unet(4)
    image_dim = 12
    ip_layers = {}
    for j, (name, proc) in enumerate((n, p) for n, p in model.attn_processors.items() if n.endswith("attn2.processor")):
        to_k = model.get_submodule(name[: -len(".processor")]).to_k
        ip_layers[f"{2 * j + 1}.to_k_ip.weight"] = torch.randn_like(to_k.weight)  # key ids 1, 3, 5...
        ip_layers[f"{2 * j + 1}.to_v_ip.weight"] = torch.randn_like(to_k.weight)
    image_proj = {"proj.0.weight": torch.randn(image_dim, image_dim) / 4, "proj.0.bias": torch.zeros(image_dim),
                  "proj.2.weight": torch.randn(CROSS_DIM, image_dim) / 4, "proj.2.bias": torch.zeros(CROSS_DIM),
                  "proj.3.weight": torch.ones(CROSS_DIM), "proj.3.bias": torch.zeros(CROSS_DIM)}
    model._load_ip_adapter_weights([{"image_proj": image_proj, "ip_adapter": ip_layers}], low_cpu_mem_usage=False)
    pipe = StableDiffusionPipeline(vae=vae(), text_encoder=None, tokenizer=None, unet=model, scheduler=scheduler(),
                                   safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_ip_adapter_scale(0.7)
    image_embeds = torch.randn(2, 1, 1 + 3 * 2, image_dim)  # [negative, positive], one image each
    kwargs = dict(prompt_embeds=torch.randn(1, 5, CROSS_DIM), negative_prompt_embeds=torch.randn(1, 5, CROSS_DIM),
                  ip_adapter_image_embeds=[image_embeds], height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                  guidance_scale=5.0)
    return TinyModel("ip_adapter", pipe, kwargs, (3, 2), True)


BUILDERS = {"paint_by_example": paint_by_example, "patch_inpainting": patch_inpainting, "ip_adapter": ip_adapter}
