"""A tiny, randomly initialised Qwen-Image-Edit-Plus transformer built in code (no downloads).

QwenImageTransformer2DModel with two double-stream blocks, 2 heads of 8 channels, called as
QwenImageEditPlusPipeline calls it: hidden_states holds the packed latents of the generated image
(a 4 x 6 token grid) and then of two reference images of different sizes (4 x 4 and 3 x 5),
img_shapes gives each one's (1, rows, cols); the text mask of an unpadded prompt is all ones.
And the whole QwenImageEditPlusPipeline around it, every component built in code (a byte-level
Qwen2 tokenizer, also FLUX.2 Klein's, a tiny Qwen2.5-VL text encoder with its vision tower, a
tiny VAE).
"""
import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline,
                       QwenImageTransformer2DModel)
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer,
                          Qwen2VLImageProcessorPil, Qwen2VLProcessor)
from transformers.convert_slow_tokenizer import bytes_to_unicode

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


# ---- the whole QwenImageEditPlusPipeline, every component built in code -----------------------
# Its VAE sees each reference at about 1024x1024 pixels (its own resize), so the tiny VAE
# downsamples 6 times (64 pixels a latent cell, 128 a packed token) to keep the grids small: a
# 512 x 768 output is the 4 x 6 GRID, references of aspect 1 and 9:7 pack to 8 x 8 and 7 x 9.
PIPE_SIZE, PIPE_REFS, REFERENCE_SIZES = (512, 768), ((8, 8), (7, 9)), ((64, 64), (90, 70))  # (width, height)
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>")


def tokenizer(chat_template=None):
    """A Qwen2 tokenizer of bytes: byte-level BPE without merges (each byte one token), Qwen's
    special tokens whole."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    vocab.update({s: len(vocab) + i for i, s in enumerate(SPECIAL)})
    return Qwen2Tokenizer(vocab=vocab, merges=[], chat_template=chat_template, additional_special_tokens=SPECIAL[1:])


def processor(tok):
    """Qwen2VLProcessor for images alone, each image a few vision tokens."""
    class ImageProcessor(Qwen2VLProcessor):
        # transformers checks every sub-processor's class, and a video processor needs torchvision
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template)

    images = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 2 * 56 * 56})
    return ImageProcessor(image_processor=images, tokenizer=tok)


def text_encoder(tok):
    """Qwen2_5_VLForConditionalGeneration (a 2-block vision tower, a 2-layer language model of
    JOINT_DIM channels) whose image tokens are the tokenizer's."""
    ids = {s: tok.convert_tokens_to_ids(s) for s in SPECIAL}
    text = dict(vocab_size=len(tok), hidden_size=JOINT_DIM, intermediate_size=32, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"],
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})
    vision = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=JOINT_DIM,
                  window_size=56, fullatt_block_indexes=[1])
    torch.manual_seed(1)
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"])).eval()


def vae():
    torch.manual_seed(2)
    z = CHANNELS // 4  # the transformer's input is 2 x 2 packed latents
    return AutoencoderKLQwenImage(base_dim=4, z_dim=z, dim_mult=[1] * 7, num_res_blocks=0, attn_scales=[],
                                  temperal_downsample=[False] * 6, latents_mean=[0.0] * z,
                                  latents_std=[1.0] * z).eval()


def edit_plus_pipeline():
    tok = tokenizer()
    pipe = QwenImageEditPlusPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae(),
                                     text_encoder=text_encoder(tok), tokenizer=tok, processor=processor(tok),
                                     transformer=transformer().eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe

