"""A tiny, randomly initialised FLUX.2 transformer built in code (no downloads).

Flux2Transformer2DModel with one double-stream and one single-stream block, 2 heads of 8
channels, called as Flux2Pipeline (guidance-distilled) and Flux2KleinKVPipeline (KV cache) call
it: img_ids (time, row, col, layer) give the generated 4 x 6 token grid time 0 and two
references of different sizes (4 x 4, 3 x 5) times 10 and 20. And Flux2KleinPipeline and
Flux2KleinKVPipeline around it, every component built in code (a tiny Qwen3 text encoder, the
byte-level tokenizer of tiny_qwen, a tiny VAE); Pipeline stands in for a whole Flux2Pipeline
(whose text encoder is too large to build here) in the eval tests.
"""
from types import SimpleNamespace

import numpy as np
import torch
from diffusers import (AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline, Flux2KleinPipeline,
                       Flux2Transformer2DModel)
from diffusers.models.transformers.transformer_flux2 import Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image
from transformers import Qwen3Config, Qwen3ForCausalLM

from tiny_qwen import tokenizer

GRID, REFS = (4, 6), ((4, 4), (3, 5))
TEXT, JOINT_DIM, CHANNELS = 5, 16, 16


def transformer(guidance=True, kv=False, joint_dim=JOINT_DIM):
    torch.manual_seed(0)
    model = Flux2Transformer2DModel(patch_size=1, in_channels=CHANNELS, num_layers=1, num_single_layers=1,
                                    attention_head_dim=8, num_attention_heads=2, joint_attention_dim=joint_dim,
                                    timestep_guidance_channels=16, axes_dims_rope=(2, 2, 2, 2),
                                    guidance_embeds=guidance)
    if kv:  # as Flux2KleinKVPipeline sets them
        for block in model.transformer_blocks:
            block.attn.set_processor(Flux2KVAttnProcessor())
        for block in model.single_transformer_blocks:
            block.attn.set_processor(Flux2KVParallelSelfAttnProcessor())
    return model


def image_ids(grid, t):
    """img_ids of one latent grid: (t, row, col, 0), row-major (Flux2Pipeline._prepare_image_ids)."""
    return torch.cartesian_prod(torch.tensor([t]), torch.arange(grid[0]), torch.arange(grid[1]), torch.arange(1))


def reference_ids(refs=REFS):
    return torch.cat([image_ids(g, 10 + 10 * r) for r, g in enumerate(refs)])


def inputs(batch=1, seed=0, guidance=True, refs=REFS):
    """Keyword arguments of one transformer call as Flux2Pipeline makes them: [generated, references]."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.cat([image_ids(GRID, 0), reference_ids(refs)])
    return dict(hidden_states=torch.randn(batch, len(ids), CHANNELS, generator=gen),
                timestep=torch.full((batch,), 0.9), guidance=torch.full((batch,), 2.5) if guidance else None,
                encoder_hidden_states=torch.randn(batch, TEXT, JOINT_DIM, generator=gen),
                txt_ids=torch.zeros(batch, TEXT, 4), img_ids=ids[None].expand(batch, -1, -1),
                joint_attention_kwargs=None, return_dict=False)


def kv_steps(model, timesteps, seed=0, scheduler=None):
    """The transformer calls of Flux2KleinKVPipeline: the first step with [references, generated]
    (kv_cache_mode="extract"), the next ones with the generated tokens and the cached reference K/V.
    With a scheduler, its timesteps (pipeline units), which it steps after each call as the
    pipeline does. Returns the generated tokens' outputs of every step."""
    base = inputs(seed=seed, guidance=False)
    n_ref = sum(h * w for h, w in REFS)
    refs, gen = base["hidden_states"][:, GRID[0] * GRID[1]:], base["hidden_states"][:, :GRID[0] * GRID[1]]
    outs, cache = [], None
    if scheduler is not None:
        scheduler.set_begin_index(0)  # as the pipeline does
        timesteps = scheduler.timesteps / 1000
    for i, t in enumerate(timesteps):
        step = {**base, "timestep": torch.full((1,), float(t))}
        if i == 0:
            out, cache = model(**{**step, "hidden_states": torch.cat([refs, gen], 1),
                                  "img_ids": torch.cat([reference_ids(), image_ids(GRID, 0)])[None],
                                  "kv_cache_mode": "extract", "num_ref_tokens": n_ref})
        else:
            out = model(**{**step, "hidden_states": gen, "img_ids": image_ids(GRID, 0)[None], "kv_cache": cache,
                           "kv_cache_mode": "cached"})[0]
        outs.append(out)
        if scheduler is not None:
            gen = scheduler.step(out, t, gen, return_dict=False)[0]
    return outs


# ---- the whole Flux2KleinPipeline / Flux2KleinKVPipeline, every component built in code --------
# A 4-level VAE (8 pixels a latent cell, 16 a packed token): a 64 x 96 output is the 4 x 6 GRID,
# references of 64 x 64 and 64 x 80 (width x height) pack to 4 x 4 and 5 x 4 (the pipeline takes
# sides of at least 64 pixels).
PIPE_SIZE, PIPE_REFS, REFERENCE_SIZES = (64, 96), ((4, 4), (5, 4)), ((64, 64), (64, 80))
HIDDEN_LAYERS = (9, 18, 27)  # the text encoder's hidden states the pipeline stacks (its default)
TEXT_HIDDEN = 8  # the text encoder's width: the transformer's text input is len(HIDDEN_LAYERS) of them
QWEN3_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and "
                  "not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


def text_encoder(tok):
    """Qwen3ForCausalLM with as many layers as the deepest hidden state the pipeline reads."""
    torch.manual_seed(1)
    return Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok), hidden_size=TEXT_HIDDEN, intermediate_size=16,
                                        num_hidden_layers=max(HIDDEN_LAYERS), num_attention_heads=2,
                                        num_key_value_heads=1, head_dim=4)).eval()


def vae():
    torch.manual_seed(2)
    return AutoencoderKLFlux2(block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=CHANNELS // 4,
                              norm_num_groups=2).eval()


def klein_pipeline(kv=False):
    """Flux2KleinPipeline (true CFG with guidance_scale > 1), or with kv Flux2KleinKVPipeline."""
    tok = tokenizer(QWEN3_TEMPLATE)
    cls = Flux2KleinKVPipeline if kv else Flux2KleinPipeline
    pipe = cls(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(), text_encoder=text_encoder(tok), tokenizer=tok,
               transformer=transformer(guidance=False, joint_dim=len(HIDDEN_LAYERS) * TEXT_HIDDEN).eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Pipeline:
    """A stand-in Flux2Pipeline: its denoising loop, token layout and image processor around the tiny
    transformer, without VAE or text encoder. A token is 16 x 16 pixels (vae_scale_factor 8, packed
    2 x 2): each reference (sides multiples of 16, as the pipeline's processor leaves it) enters as
    its tokens' mean colours, the prompt as seeded text states, and the output image shows the
    generated tokens' first three channels."""

    vae_scale_factor, dtype = 8, torch.float32

    def __init__(self):
        self.transformer, self.scheduler = transformer(), FlowMatchEulerDiscreteScheduler()
        self.image_processor = Flux2ImageProcessor(vae_scale_factor=16)

    def set_progress_bar_config(self, **options):
        pass

    @torch.no_grad()
    def __call__(self, image, prompt, height, width, num_inference_steps, guidance_scale, generator):
        grid = (height // 16, width // 16)
        refs = [_tokens(im) for im in image]
        ids = torch.cat([image_ids(grid, 0), reference_ids([g for g, _ in refs])])[None]
        text = torch.randn(1, TEXT, JOINT_DIM, generator=torch.Generator().manual_seed(len(prompt)))
        latents = torch.randn(1, grid[0] * grid[1], CHANNELS, generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            out = self.transformer(hidden_states=torch.cat([latents, *(tokens for _, tokens in refs)], 1),
                                   timestep=t.expand(1) / 1000, guidance=torch.full((1,), float(guidance_scale)),
                                   encoder_hidden_states=text, txt_ids=torch.zeros(1, TEXT, 4), img_ids=ids,
                                   return_dict=False)[0][:, :latents.shape[1]]
            latents = self.scheduler.step(out, t, latents, return_dict=False)[0]
        rgb = torch.sigmoid(latents[0, :, :3]).reshape(*grid, 3).repeat_interleave(16, 0).repeat_interleave(16, 1)
        return SimpleNamespace(images=[Image.fromarray((rgb.numpy() * 255).round().astype(np.uint8))])


def _tokens(image):
    """(grid, (1, tokens, CHANNELS)) of a reference: each 16 x 16 cell's mean colour, repeated."""
    a = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255)
    h, w = a.shape[0] // 16, a.shape[1] // 16
    assert (h * 16, w * 16) == tuple(a.shape[:2]), "the stand-in takes references of sides multiples of 16"
    cells = a.reshape(h, 16, w, 16, 3).mean((1, 3)).reshape(1, h * w, 3)
    return (h, w), cells.repeat(1, 1, CHANNELS // 3 + 1)[..., :CHANNELS]
