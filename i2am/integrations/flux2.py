"""The FLUX.2 family: joint attention of diffusers' Flux2Transformer2DModel (Flux2Pipeline,
Flux2KleinPipeline, Flux2KleinKVPipeline).

Double-stream blocks (``transformer_blocks.*.attn``) and single-stream blocks
(``single_transformer_blocks.*.attn``) attend over one joint sequence [text, image tokens]. The
image tokens are the generated image's and each reference image's, told apart by the time
coordinate of ``img_ids`` (T, H, W, L): 0 for the generated tokens, 10 + 10 r for reference r
(H and W are row and column). So the generated rows (the maps' queries), each reference's keys
and every grid are read from img_ids at every call. FLUX.2 [dev] is guidance-distilled; Klein
runs true CFG as a second call within the same step (not recorded, branch="cond").

The KV-cache variant (Flux2KleinKVPipeline) puts the references first at the first step
(``kv_cache_mode="extract"``: [text, references, generated], the references attending only to
themselves) and afterwards keeps their keys only as cached K/V between the text and the
generated keys (``kv_cache_mode="cached"``: img_ids hold the generated tokens alone). Both
record the generated rows against [text, references, generated] keys; the references' own
attention is not recorded; the cached calls take the reference grids from the first call.
"""
import torch
from diffusers.models.transformers.transformer_flux2 import (Flux2Attention, Flux2AttnProcessor,
                                                             Flux2KVAttnProcessor, Flux2KVParallelSelfAttnProcessor,
                                                             Flux2ParallelSelfAttention,
                                                             Flux2ParallelSelfAttnProcessor,
                                                             Flux2Transformer2DModel)

from .dit import DiTFamily, TokenLayout, negative_pass, row_major_grid

GENERATED, REFERENCE_STEP = 0, 10  # img_ids[:, 0]: 0 generated, 10 + 10 r reference r


class Flux2Family(DiTFamily):
    PROTOCOLS = ("paper",)  # the official protocol reproduces the authors' UNet code
    TRANSFORMER = Flux2Transformer2DModel
    PROCESSORS = (Flux2AttnProcessor, Flux2ParallelSelfAttnProcessor, Flux2KVAttnProcessor,
                  Flux2KVParallelSelfAttnProcessor)

    def attention_layers(self, attention="cross"):
        """{name: attention}: every joint attention, double- and single-stream blocks (joint attention
        is both the cross- and the self-attention)."""
        return {n: m for n, m in self.denoiser.named_modules()
                if isinstance(m, (Flux2Attention, Flux2ParallelSelfAttention))}

    def read_inputs(self, args, kwargs):
        """The call's token layout from img_ids (and the KV cache); returns whether it is a new step."""
        inputs = self.inputs(args, kwargs)
        negative = self.plain = negative_pass(self, self.timestep(args, kwargs))
        recorder = self.recording.recorder
        mode = inputs.get("kv_cache_mode")
        if mode == "cached" and inputs.get("kv_cache") is not None:
            known = recorder.references or (recorder.ref_grid and (recorder.ref_grid,))
            self.layout = cached_layout(inputs.get("img_ids"), inputs.get("encoder_hidden_states"),
                                        inputs.get("hidden_states"), inputs["kv_cache"].num_ref_tokens, known)
        else:
            extract = mode == "extract" and inputs.get("num_ref_tokens", 0) > 0
            self.layout = token_layout(inputs.get("img_ids"), inputs.get("encoder_hidden_states"),
                                       inputs.get("hidden_states"), extract=extract)
        recorder.set_latent_size(self.layout.grid)
        recorder.set_references(self.layout.grids)
        return not negative


def _ids(img_ids, encoder_hidden_states, hidden_states):
    if not isinstance(img_ids, torch.Tensor) or not isinstance(encoder_hidden_states, torch.Tensor):
        raise ValueError("cannot read the token layout: the FLUX.2 transformer call needs img_ids and "
                         "encoder_hidden_states")
    ids = img_ids[0] if img_ids.dim() == 3 else img_ids
    if ids.dim() != 2 or ids.shape[-1] != 4 or (hidden_states is not None and hidden_states.shape[1] != len(ids)):
        raise ValueError(f"img_ids must be (N, 4) (time, row, col, layer), one row per image token, got "
                         f"{tuple(img_ids.shape)}")
    return ids.cpu()


def _spans(ids):
    """{time coordinate: (slice of the image tokens, (h, w))}, each one contiguous row-major grid."""
    times = ids[:, 0].round().long()
    spans = {}
    for t in times.unique().tolist():
        at = (times == t).nonzero().flatten()
        what = "generated" if t == GENERATED else f"time-{t}"
        if at[-1] - at[0] + 1 != at.numel():
            raise ValueError(f"the {what} image tokens (img_ids[:, 0] == {t}) must be one contiguous range")
        spans[t] = (slice(int(at[0]), int(at[-1]) + 1), row_major_grid(ids[at, 1:3], what))
    return spans


def token_layout(img_ids, encoder_hidden_states, hidden_states, extract=False):
    """TokenLayout of a Flux2Transformer2DModel call: [text, generated, ref_0, ref_1, ...], or with
    extract (a KV-cache extract call) [text, ref_0, ref_1, ..., generated] whose reference queries
    attend only to themselves."""
    ids = _ids(img_ids, encoder_hidden_states, hidden_states)
    spans = _spans(ids)
    refs = sorted(t for t in spans if t != GENERATED)
    want = [REFERENCE_STEP * (r + 1) for r in range(len(refs))]
    if GENERATED not in spans or not refs or refs != want:
        raise ValueError(f"img_ids' time coordinates are {sorted(spans)}; i2am reads 0 (the generated image) and "
                         f"10, 20, ... (references 0, 1, ...; 10 + 10 r as FLUX.2 pipelines write them), at least "
                         "one reference: pass image= to the pipeline")
    ref_range = [spans[t][0] for t in refs]
    if any(a.stop != b.start for a, b in zip(ref_range, ref_range[1:])):
        raise ValueError("the reference image tokens must follow each other in order, reference 0 first")
    text, image = encoder_hidden_states.shape[1], len(ids)
    (gen, grid), grids = spans[GENERATED], tuple(spans[t][1] for t in refs)
    ref_keys = slice(text + ref_range[0].start, text + ref_range[-1].stop)
    if extract:
        if gen.stop != image or ref_range[0].start != 0:
            raise ValueError("a KV-cache extract call must hold the reference tokens first, then the generated ones")
        n_gen, n_ref = gen.stop - gen.start, ref_keys.stop - ref_keys.start
        return TokenLayout(text, image, slice(text, text + n_gen), ref_keys, grid, grids[0], references=grids,
                           generated=slice(text + gen.start, text + gen.stop), queries=text + n_gen,
                           passthrough=((n_ref, n_ref),))
    return TokenLayout(text, image, slice(text + gen.start, text + gen.stop), ref_keys, grid, grids[0],
                       references=grids)


def cached_layout(img_ids, encoder_hidden_states, hidden_states, cached, grids):
    """TokenLayout of a KV-cache call: queries [text, generated], keys [text, cached references,
    generated]; the reference grids are those of the extract call."""
    ids = _ids(img_ids, encoder_hidden_states, hidden_states)
    spans = _spans(ids)
    if set(spans) != {GENERATED}:
        raise ValueError(f"a KV-cache call's img_ids hold time coordinates {sorted(spans)}, not the generated "
                         "image's 0 alone")
    if not grids:
        raise ValueError("a KV-cache call (kv_cache_mode='cached') came before the extract call that says the "
                         "reference grids: trace the whole run from its first step")
    if sum(h * w for h, w in grids) != cached:
        raise ValueError(f"the KV cache holds {cached} reference tokens, not the {sum(h * w for h, w in grids)} of "
                         f"the reference grids {list(grids)} of the extract call")
    text, grid = encoder_hidden_states.shape[1], spans[GENERATED][1]
    n_gen = grid[0] * grid[1]
    return TokenLayout(text, cached + n_gen, slice(text, text + n_gen), slice(text, text + cached), grid, grids[0],
                       references=tuple(grids), generated=slice(text + cached, text + cached + n_gen),
                       queries=text + n_gen)
