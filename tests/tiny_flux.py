"""A tiny, randomly initialised FLUX.1 Kontext built in code (no downloads) for the Flux tests.

The transformer has one double-stream and one single-stream block, 2 heads of 8 channels.
Images are 16 x 24 pixels: a VAE with scale factor 2 gives 8 x 12 latents, packed 2 x 2 into
a 4 x 6 grid of generated tokens; the 16 x 16 reference image gives 4 x 4 reference tokens.
"""
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxKontextPipeline, FluxTransformer2DModel

from tiny_models import image

HEIGHT, WIDTH = 16, 24
GRID, REF_GRID = (4, 6), (4, 4)  # packed generated and reference token grids
TEXT, JOINT_DIM, POOLED_DIM = 5, 16, 8
STEPS = 3


def transformer():
    torch.manual_seed(0)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT_DIM,
                                  pooled_projection_dim=POOLED_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4))


def token_ids(grid, kind):
    """img_ids of a packed grid, row-major, first channel `kind` (0 generated, 1 reference)."""
    ids = torch.zeros(*grid, 3)
    ids[..., 0] = kind
    ids[..., 1] = torch.arange(grid[0])[:, None]
    ids[..., 2] = torch.arange(grid[1])[None, :]
    return ids.reshape(-1, 3)


def kontext_inputs(batch=2, seed=0):
    """Keyword arguments of one FluxTransformer2DModel call as FluxKontextPipeline makes them."""
    gen = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1] + REF_GRID[0] * REF_GRID[1]
    return dict(hidden_states=torch.randn(batch, n, 16, generator=gen),
                encoder_hidden_states=torch.randn(batch, TEXT, JOINT_DIM, generator=gen),
                pooled_projections=torch.randn(batch, POOLED_DIM, generator=gen),
                timestep=torch.full((batch,), 0.9), guidance=torch.full((batch,), 2.5),
                img_ids=torch.cat([token_ids(GRID, 0), token_ids(REF_GRID, 1)]), txt_ids=torch.zeros(TEXT, 3),
                return_dict=False)


def pipeline():
    torch.manual_seed(1)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, shift_factor=0.1, scaling_factor=0.5)
    pipe = FluxKontextPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=None,
                               tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_kwargs():
    gen = torch.Generator().manual_seed(2)
    return dict(image=image(1, (16, 16)), prompt_embeds=torch.randn(1, TEXT, JOINT_DIM, generator=gen),
                pooled_prompt_embeds=torch.randn(1, POOLED_DIM, generator=gen), height=HEIGHT, width=WIDTH,
                max_area=HEIGHT * WIDTH, _auto_resize=False, num_inference_steps=STEPS, guidance_scale=2.5,
                output_type="latent")


def saved_pipeline(folder):
    """The tiny pipeline with tiny CLIP and T5 text encoders and tokenizers (a 26-letter vocabulary),
    saved with save_pretrained into folder; returns the folder."""
    import json

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **{c + "</w>": i + 2 for i, c in enumerate(letters)}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(3)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=POOLED_DIM, intermediate_size=16,
                                        num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=8,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5_vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in letters + " "]
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_vocab), d_model=JOINT_DIM, d_kv=4, d_ff=16, num_layers=1,
                                 num_heads=2))
    pipe = pipeline()
    pipe = FluxKontextPipeline(
        scheduler=pipe.scheduler, vae=pipe.vae, transformer=pipe.transformer, text_encoder=clip,
        tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8),
        text_encoder_2=t5, tokenizer_2=T5TokenizerFast(vocab=t5_vocab, extra_ids=0))
    pipe.save_pretrained(folder / "model")
    return folder / "model"
