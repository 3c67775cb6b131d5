"""The Flux family: joint attention of diffusers' FluxTransformer2DModel (FLUX.1, FLUX.1 Kontext).

A Flux transformer's attention runs over one joint sequence [text, image tokens]: double-stream
blocks (``transformer_blocks.*.attn``) project the text and the image tokens separately and
concatenate them, single-stream blocks (``single_transformer_blocks.*.attn``) get the joint
sequence. FLUX.1 Kontext appends the reference image's tokens to the generated ones and marks
them in ``img_ids`` (first id channel 1; the generated tokens have 0; channels 1-2 are row and
column). So at every transformer call the generated rows (the maps' queries), the reference
keys and both grids are read from img_ids: the latent grid is the packed token grid (H/16,
W/16). FLUX.1 [dev] and Kontext are guidance-distilled: no [uncond, cond] batch.

``FluxAttnProcessor`` runs unchanged; its dispatched attention is recorded (i2am.integrations.dit).
"""
import torch
from diffusers.models.transformers.transformer_flux import (FluxAttention, FluxAttnProcessor,
                                                            FluxTransformer2DModel)

from .dit import DiTFamily, TokenLayout, negative_pass, row_major_grid

GENERATED, REFERENCE = 0, 1  # img_ids[:, 0] of FLUX.1 Kontext's generated and reference tokens


class FluxFamily(DiTFamily):
    PROTOCOLS = ("paper",)  # the official protocol reproduces the authors' UNet code
    TRANSFORMER = FluxTransformer2DModel
    PROCESSORS = (FluxAttnProcessor,)
    REGIONS = True  # FLUX.1 Fill try-on, in-context editors: the reference beside the image

    def attention_layers(self, attention="cross"):
        """{name: FluxAttention}: every joint attention, double- and single-stream blocks (joint
        attention is both the cross- and the self-attention)."""
        return {n: m for n, m in self.denoiser.named_modules() if isinstance(m, FluxAttention)}

    def read_inputs(self, args, kwargs):
        """The call's token layout from its img_ids and text length; sets the latent size and the
        reference grid (both fixed for the trace). A second call within one scheduler step is
        true CFG's negative-prompt pass (FluxKontextPipeline with true_cfg_scale > 1): not a new step,
        and not recorded (branch="cond")."""
        inputs = self.inputs(args, kwargs)
        negative = self.plain = negative_pass(self, self.timestep(args, kwargs))
        # query_region/ref_region: the reference sits inside the generated grid (FLUX.1 Fill try-on,
        # in-context editors); the recorder takes both rectangles from it
        regions = self.recording.recorder.regions is not None
        self.layout = token_layout(inputs.get("img_ids"), inputs.get("encoder_hidden_states"),
                                   inputs.get("hidden_states"), reference=not regions)
        self.recording.recorder.set_latent_size(self.layout.grid)
        if not regions:
            self.recording.recorder.set_ref_grid(self.layout.ref_grid)
        return not negative


def token_layout(img_ids, encoder_hidden_states, hidden_states, reference=True):
    """TokenLayout of a FluxTransformer2DModel call from img_ids (N, 3) (or (B, N, 3)).
    reference=False: the generated tokens alone (reference tokens, if any, are other keys)."""
    if not isinstance(img_ids, torch.Tensor) or not isinstance(encoder_hidden_states, torch.Tensor):
        raise ValueError("cannot read the token layout: the Flux transformer call needs img_ids and "
                         "encoder_hidden_states")
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    if ids.dim() != 2 or ids.shape[-1] != 3 or (hidden_states is not None and hidden_states.shape[1] != len(ids)):
        raise ValueError(f"img_ids must be (N, 3), one row per image token, got {tuple(img_ids.shape)}")
    text = encoder_hidden_states.shape[1]
    kinds = ids[:, 0].round().long().cpu()
    if reference and not (kinds == REFERENCE).any():
        raise ValueError("the Flux transformer call has no reference-image tokens (img_ids[:, 0] == 1, as "
                         "FluxKontextPipeline marks them): i2am maps need a reference image; pass image= "
                         "to the Kontext pipeline")
    spans = {}
    for kind, what in ((GENERATED, "generated"), (REFERENCE, "reference"))[:2 if reference else 1]:
        at = (kinds == kind).nonzero().flatten()
        if at.numel() == 0 or at[-1] - at[0] + 1 != at.numel():
            raise ValueError(f"the {what} image tokens (img_ids[:, 0] == {kind}) must be one contiguous, "
                             f"non-empty range of the image tokens")
        spans[kind] = (slice(int(at[0]), int(at[-1]) + 1), row_major_grid(ids[at, 1:].cpu(), what))
    if not set(kinds.tolist()) <= {GENERATED, REFERENCE}:
        raise ValueError(f"img_ids[:, 0] holds {sorted(set(kinds.tolist()))}; i2am knows 0 (generated) and "
                         "1 (one reference image, FLUX.1 Kontext)")
    gen, grid = spans[GENERATED]
    if not reference:
        return TokenLayout(text, len(ids), slice(text + gen.start, text + gen.stop), None, grid, None)
    ref, ref_grid = spans[REFERENCE]
    return TokenLayout(text, len(ids), slice(text + gen.start, text + gen.stop),
                       slice(text + ref.start, text + ref.stop), grid, ref_grid)


# ---- the `i2am run --pipeline flux-kontext` model -------------------------------------------------
def load_kontext(model, *, device, dtype):
    """FluxKontextPipeline from a local folder (save_pretrained) or the local Hugging Face cache;
    nothing is downloaded."""
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True).to(device)


def edit_size(pipe, image):
    """(height, width) of a Kontext edit of `image` at its own size: each side floored to a multiple
    of the packed token size (the VAE scale factor times the 2 x 2 packing)."""
    m = pipe.vae_scale_factor * 2
    return image.height // m * m, image.width // m * m


def token_grid(pipe, height, width):
    """The packed token grid (h, w) of an image of height x width: the latent grid of the maps."""
    m = pipe.vae_scale_factor * 2
    return height // m, width // m


def kontext_call(image, prompt, height, width):
    """Keyword arguments of a FluxKontextPipeline edit of `image` at height x width, without the
    pipeline's resize to its preferred resolutions (so the token grids are the ones asked for)."""
    return dict(image=image, prompt=prompt, height=height, width=width, max_area=height * width,
                _auto_resize=False)
