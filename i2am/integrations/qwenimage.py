"""The Qwen-Image family: joint attention of diffusers' QwenImageTransformer2DModel (Qwen-Image-Edit,
Qwen-Image-Edit-Plus: QwenImageEditPipeline, QwenImageEditPlusPipeline).

Every block (``transformer_blocks.*.attn``) is double-stream: the text and the image tokens are
projected apart and attend as one sequence [text, image tokens]. The image tokens are the packed
latents of the generated image, then of each reference image in order; ``img_shapes`` gives, per
batch entry, each one's (frames, rows, cols): the first the generated grid (the maps' latent
grid, (H/16, W/16)), the others the references'. So at every transformer call the generated rows
and each reference's keys and grid are read from img_shapes and checked against the token count.
True CFG (true_cfg_scale > 1) calls the transformer twice per step, the negative prompt second:
that call is no new step and is not recorded (branch="cond").

``QwenDoubleStreamAttnProcessor2_0`` runs unchanged; its dispatched attention is recorded
(i2am.integrations.dit).
"""
import torch
from diffusers.models.transformers.transformer_qwenimage import (QwenDoubleStreamAttnProcessor2_0,
                                                                 QwenImageTransformer2DModel)

from .dit import DiTFamily, TokenLayout, negative_pass

class QwenImageFamily(DiTFamily):
    PROTOCOLS = ("paper",)  # the official protocol reproduces the authors' UNet code
    TRANSFORMER = QwenImageTransformer2DModel
    PROCESSORS = (QwenDoubleStreamAttnProcessor2_0,)

    def attention_layers(self, attention="cross"):
        """{name: Attention}: the joint attention of every block (both the cross- and the self-attention)."""
        return {f"transformer_blocks.{i}.attn": b.attn for i, b in enumerate(self.denoiser.transformer_blocks)}

    def read_inputs(self, args, kwargs):
        """The call's token layout from img_shapes; returns whether the call is a new step."""
        inputs = self.inputs(args, kwargs)
        negative = self.plain = negative_pass(self, self.timestep(args, kwargs))
        self.layout = token_layout(inputs.get("img_shapes"), inputs.get("encoder_hidden_states"),
                                   inputs.get("hidden_states"))
        self.recording.recorder.set_latent_size(self.layout.grid)
        self.recording.recorder.set_references(self.layout.grids)
        return not negative


def token_layout(img_shapes, encoder_hidden_states, hidden_states):
    """TokenLayout of a QwenImageTransformer2DModel call: [text, generated, ref_0, ref_1, ...]."""
    if img_shapes is None or encoder_hidden_states is None or hidden_states is None:
        raise ValueError("cannot read the token layout: the Qwen-Image transformer call needs hidden_states, "
                         "encoder_hidden_states and img_shapes")
    shapes = [tuple(tuple(int(x) for x in s) for s in entry) for entry in img_shapes]
    if any(s != shapes[0] for s in shapes):
        raise ValueError(f"img_shapes differ between the batch entries ({shapes}); i2am traces one layout "
                         "per call")
    shapes = shapes[0]
    if any(len(s) != 3 or s[0] != 1 for s in shapes):
        raise ValueError(f"img_shapes holds {list(shapes)}; i2am reads (1, rows, cols) per image")
    if len(shapes) < 2:
        raise ValueError("the Qwen-Image transformer call has no reference image (img_shapes holds the generated "
                         "image only): i2am maps need one; use QwenImageEditPipeline or QwenImageEditPlusPipeline "
                         "with image=")
    text, image = encoder_hidden_states.shape[1], hidden_states.shape[1]
    if sum(f * h * w for f, h, w in shapes) != image:
        raise ValueError(f"img_shapes {list(shapes)} holds {sum(f * h * w for f, h, w in shapes)} image tokens, "
                         f"but hidden_states has {image}")
    grid, refs = shapes[0][1:], tuple(s[1:] for s in shapes[1:])
    gen = slice(text, text + grid[0] * grid[1])
    return TokenLayout(text, image, gen, slice(gen.stop, text + image), grid, refs[0], references=refs)
