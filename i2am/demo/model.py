"""The demo's tiny reference-based inpainting model, built from diffusers components.

The denoiser is a ``UNet2DConditionModel`` on a "latent" that is the image itself, folded
2 x 2 pixels to 12 channels (pixel unshuffle: lossless, so there is no autoencoder to train).
Its input is the noisy latent, the masked target's latent and the folded mask (12 + 12 + 4
channels); its cross-attention (the attn2 layers, plain
diffusers ``Attention`` with the default processor) attends to a CLS token plus an hI x wI grid
of patch tokens from a small trainable ViT-style encoder of the reference. The masked target
hides the garment, so its pattern can only reach the image through cross-attention.
"""
import json
import os
from copy import deepcopy

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file, save_file
from torch import nn

HERE = os.path.dirname(__file__)
WEIGHTS = os.path.join(HERE, "weights.safetensors")
CONFIG = os.path.join(HERE, "config.json")

DEFAULT_CONFIG = {
    "fold": 2,  # latent cell = fold x fold pixels
    "unet": {
        "sample_size": 16,
        "in_channels": 28,  # noisy latent, masked image latent, folded mask
        "out_channels": 12,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [48, 64, 96],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 64,
        "attention_head_dim": 4,  # diffusers' legacy name: this is the number of heads
    },
    "reference_encoder": {"image_size": 32, "patch_size": 4, "dim": 64, "layers": 1, "heads": 4},
    "scheduler": {
        "num_train_timesteps": 1000,
        "beta_schedule": "squaredcos_cap_v2",
        "prediction_type": "sample",  # the target is nearly fixed by reference + mask: regress it directly
        "clip_sample": True,
    },
}


class ReferenceEncoder(ModelMixin, ConfigMixin):
    """Conv patchify + fixed 2-D sin-cos positions + a few transformer layers -> CLS + patches.

    The positions stay in every patch token so the denoiser can look patches up by place.
    """

    @register_to_config
    def __init__(self, image_size=32, patch_size=4, dim=64, layers=1, heads=4):
        super().__init__()
        side = image_size // patch_size
        self.patchify = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        position = get_2d_sincos_pos_embed(dim, side, base_size=side).float()
        position = torch.cat([torch.zeros(1, dim), position])  # the CLS token has no place
        self.register_buffer("position", position[None], persistent=False)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    @property
    def grid(self):
        """(hI, wI) of the patch tokens, which follow the CLS token in row-major order."""
        side = self.config.image_size // self.config.patch_size
        return (side, side)

    def forward(self, reference):
        """reference (B, 3, H, W) in [0, 1] -> tokens (B, 1 + hI*wI, dim)."""
        patches = self.patchify(reference * 2 - 1).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(len(patches), -1, -1), patches], 1) + self.position
        return self.norm(self.blocks(tokens))

    def null_tokens(self, batch):
        """The unconditional reference for classifier-free guidance: all-zero tokens."""
        n = 1 + self.grid[0] * self.grid[1]
        return torch.zeros(batch, n, self.config.dim, device=self.device, dtype=self.dtype)


def to_latent(images, fold):
    """Images (B, C, H, W) in [0, 1] -> latents (B, C*fold*fold, H/fold, W/fold) in [-1, 1]."""
    return F.pixel_unshuffle(images * 2 - 1, fold)


def to_images(latents, fold):
    return ((F.pixel_shuffle(latents, fold) + 1) / 2).clamp(0, 1)


def denoiser_input(noisy, masked, mask, fold):
    """UNet input: the noisy latent, the masked image's latent and the folded mask, on channels."""
    return torch.cat([noisy, to_latent(masked, fold), F.pixel_unshuffle(mask, fold)], 1)


class DemoInpaintPipeline(DiffusionPipeline):
    """Reference-based inpainting with classifier-free guidance, batched [uncond, cond]."""

    def __init__(self, unet, reference_encoder, scheduler, fold=2):
        super().__init__()
        self.register_modules(unet=unet, reference_encoder=reference_encoder, scheduler=scheduler)
        self.register_to_config(fold=fold)

    @torch.no_grad()
    def __call__(self, reference, masked, mask, num_inference_steps=50, guidance_scale=2.0, generator=None):
        """reference (B,3,R,R), masked (B,3,T,T), mask (B,1,T,T), all in [0, 1] -> images (B,3,T,T) in [0, 1].

        The denoiser sees latents of (T/fold, T/fold): that is the latent grid of the maps.

        guidance_scale <= 1 runs the conditional branch alone (no CFG batch).
        """
        device, dtype = self.unet.device, self.unet.dtype
        reference, masked, mask = (t.to(device, dtype) for t in (reference, masked, mask))
        cond = self.reference_encoder(reference)
        guided = guidance_scale > 1
        if guided:
            cond = torch.cat([self.reference_encoder.null_tokens(len(cond)), cond])
            masked, mask = torch.cat([masked, masked]), torch.cat([mask, mask])

        fold = self.config.fold
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        shape = (len(reference), self.unet.config.out_channels, masked.shape[-2] // fold, masked.shape[-1] // fold)
        sample = torch.randn(shape, generator=generator, dtype=dtype)
        sample = sample.to(device) * self.scheduler.init_noise_sigma
        for t in self.progress_bar(self.scheduler.timesteps):
            noisy = torch.cat([sample, sample]) if guided else sample
            noisy = self.scheduler.scale_model_input(noisy, t)
            pred = self.unet(denoiser_input(noisy, masked, mask, fold), t, encoder_hidden_states=cond).sample
            if guided:
                uncond, conditional = pred.chunk(2)
                pred = uncond + guidance_scale * (conditional - uncond)
            sample = self.scheduler.step(pred, t, sample).prev_sample
        return to_images(sample, fold)


def build_pipeline(config=None):
    """A pipeline with freshly initialised weights from a config dict (DEFAULT_CONFIG when None)."""
    config = config or DEFAULT_CONFIG
    unet = UNet2DConditionModel(**config["unet"])
    encoder = ReferenceEncoder(**config["reference_encoder"])
    scheduler = DDIMScheduler(**config["scheduler"])
    pipe = DemoInpaintPipeline(unet=unet, reference_encoder=encoder, scheduler=scheduler, fold=config["fold"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def training_scheduler(config=None):
    """The noise schedule the model was trained with (same betas as the DDIM sampler)."""
    return DDPMScheduler(**(config or DEFAULT_CONFIG)["scheduler"])


def state_dict(pipe):
    """Every trained tensor of the pipeline, prefixed by its component."""
    tensors = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    tensors.update({f"reference_encoder.{k}": v for k, v in pipe.reference_encoder.state_dict().items()})
    return {k: v.detach().contiguous() for k, v in tensors.items()}


def save_weights(pipe, path):
    """Half precision on disk (half the size, no visible change); loading casts back to float32."""
    save_file({k: v.half() if v.is_floating_point() else v for k, v in state_dict(pipe).items()}, path)


def load_pipeline(weights=WEIGHTS, config=CONFIG, device="cpu"):
    """The shipped demo model (or any weights/config pair written by i2am.demo.train)."""
    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)["model"]
    pipe = build_pipeline(config)
    tensors = load_file(weights)
    for name in ("unet", "reference_encoder"):
        prefix = name + "."
        part = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        getattr(pipe, name).load_state_dict(part)
    return pipe.to(device)


def cross_attention_layers(unet):
    """(name, Attention) of every attn2 layer: the ones that read the reference."""
    return [(name, module) for name, module in unet.named_modules() if name.endswith("attn2")]


def with_random_cross_attention(pipe, seed=0):
    """A copy of the pipeline whose attn2 projections are re-initialised (model randomisation check)."""
    copy = DemoInpaintPipeline(
        unet=deepcopy(pipe.unet), reference_encoder=pipe.reference_encoder, scheduler=deepcopy(pipe.scheduler),
        fold=pipe.config.fold,
    )
    copy.set_progress_bar_config(disable=True)
    with torch.random.fork_rng():  # leave the caller's random stream alone
        torch.manual_seed(seed)
        for _, attn in cross_attention_layers(copy.unet):
            for linear in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
                linear.reset_parameters()
    return copy
