"""i2am.trace (this module: i2am.tracing): record I2AM maps while a diffusers pipeline runs as usual.

    with i2am.trace(pipe, ref_grid=(16, 16), mask=mask, points=[(20, 30)]) as tc:
        image = pipe(...).images[0]
    maps = tc.maps()

Inside the block the denoiser's attention layers (a UNet's cross-attention attn2 layers, a
Flux transformer's joint attention) are recorded by the model's family (i2am.integrations):
the same output, the maps streamed into small buffers; every other module is untouched. On
exit, also when the block raised, the family undoes what it changed (the original processor
objects, the original dispatch function) and the denoiser's hooks are gone.
"""
import torch

from . import faithfulness, integrations
from .config import TraceConfig
from .layers import could_select
from .instrument import recording


class trace(recording):
    """Context manager that records I2AM maps of a diffusers pipeline or denoiser while it runs.

    ``trace(pipe, config)`` takes an i2am.TraceConfig holding the settings below;
    ``trace(pipe, **settings)`` makes one of them (checked on the spot, errors name the
    setting); keywords given with a config change those settings.

    Args:
        pipe_or_denoiser: a diffusers pipeline with a ``.unet``, or a UNet2DConditionModel; or
            a FluxKontextPipeline, or a FluxTransformer2DModel given Kontext's inputs.
        ref_grid: (hI, wI) rows x cols of the reference-image tokens, or "layer": each layer's
            reference keys lie on its own query grid (reference features at every resolution);
            the maps are then resized over the key axes to ref_size and clamped at 0. Flux
            models say it (the reference tokens of img_ids): leave it out, or it is checked
            against theirs.
        ref_keys: the reference keys (slice or indices into the keys). Default: a layer's keys
            are the grid (hI*wI keys) or a CLS token and the grid (hI*wI + 1); any other key
            count is an error naming the layer.
        ref_size: the common reference grid of ref_grid="layer" (default: the largest traced
            layer grid; needed with patches=).
        protocol: "paper" (default: the printed equations) or "official" (the authors' released
            code step by step: its M_g over every context key, recorded with one key probe per
            key, its display, IMACS and layer sets); carried by the maps, see i2am.protocols.
            The official protocol reproduces the authors' UNet code: UNets only.
        time_groups: G, the number of time groups (eq. 10).
        branch: "cond" (default), "uncond", "all" or a list of batch indices to record.
        mask: the inpainting mask (1 = region to fill), any size: the masked reference map
            (eq. 17) and IMACS.
        points, boxes: latent (row, col) and (top, left, bottom, right) end-exclusive, for
            specific-reference maps. patches: reference-grid (i, j), for specific-generated maps.
        num_steps: T, the denoiser calls of the run; default read from pipe.scheduler at the
            first call: the timesteps from the scheduler's begin_index, else from the first
            call's timestep, to the end (so img2img/inpainting runs with strength < 1, which
            start partway down the schedule, count only their own steps). Needed for a bare UNet.
        layers: record only these layers (UNets: attn2 layers; Flux: every joint attention,
            "transformer_blocks.*" and "single_transformer_blocks.*"): fnmatch name patterns
            (e.g. "up_blocks.*") and/or (h_l, w_l) resolutions; the others run as plain attention.
            Patterns that match no layer are an error on entering the block; resolutions are
            known only once the layers run.
        convention: "official" or "paper" (docs/maps.md, "The two softmax conventions"); default
            None: the protocol's own ("official" under both protocols; "official" accepts no
            other).
        backend: "auto", "triton", "cuda", "torch" or "reference".
        cfg: whether batches are [uncond, cond]; default ``pipe.do_classifier_free_guidance``
            where the pipeline has it, else an even batch is (UNets); Flux: never (guidance-
            distilled, so branch="cond" records every entry).
        resize: "bicubic" (default), "bilinear" or "nearest", the layer-to-latent resize.
        query_region, ref_region: (top, left, bottom, right), end-exclusive, on the latent grid
            (Flux: the packed token grid): the generated image and its reference as two parts of
            one latent (CatVTON's [person; garment], a side-by-side reference). Each layer's
            queries and reference keys are the rectangles' tokens scaled to its grid (a bound
            that does not scale to whole tokens is an error naming the layer); the maps have the
            regions' shapes, points and boxes are in the query region's coordinates, patches in
            the reference region's, the mask covers the query region. No ref_grid then.
        attention: "cross" (default: a UNet's attn2 layers) or "self" (its attn1 layers).

    One denoiser call is one step; the latent size is read from its input and may not change.
    Layers are the UNet's attn2 modules (``Attention.is_cross_attention``) running
    AttnProcessor/AttnProcessor2_0 or IPAdapterAttnProcessor(2_0); for IP-Adapter layers the
    maps come from the attention over the image tokens. Flux: every FluxAttention running
    FluxAttnProcessor; the joint sequence is [text, generated, reference] tokens, the
    generated rows are the queries of the maps, the latent grid is the packed token grid
    (H/16, W/16), and both grids are read from img_ids at every call; a second call within one
    scheduler step (true CFG's negative prompt) is no new step and is not recorded. A recorded call with an
    attention mask (or ip_adapter_masks) is an error: the maps assume the plain softmax.
    """

    def __init__(self, pipe_or_denoiser, config=None, /, **keywords):
        config = TraceConfig.of(config, **keywords)
        family = integrations.family(pipe_or_denoiser)
        self.pipe, denoiser = family.split(pipe_or_denoiser)
        self.family = family(denoiser)
        if config.protocol not in self.family.PROTOCOLS:
            raise ValueError(f"protocol={config.protocol!r} is not defined for {type(denoiser).__name__}: its "
                             f"family supports {', '.join(map(repr, self.family.PROTOCOLS))}")
        if self.pipe is None and config.num_steps is None:
            raise ValueError("num_steps is needed to trace a bare denoiser (there is no pipeline scheduler "
                             "to read it from)")
        if config.ref_grid is None and config.regions is None and self.family.NEEDS_REF_GRID:
            raise ValueError(f"ref_grid (hI, wI) is needed to trace {type(denoiser).__name__}: the rows x cols "
                             "of the reference-image tokens")
        if config.cfg is None and not self.family.CFG_BATCH:
            config = config.replace(cfg=False)
        super().__init__(denoiser, config)
        self.attention_layers = self.family.attention_layers(config.attention)
        self._cfg_from_pipe = config.cfg is None

    def _install(self):
        if not could_select(self.attention_layers, self.recorder.layers):
            raise ValueError(f"layers={self.recorder.layers!r} matches none of the {len(self.attention_layers)} "
                             f"attention layers: {', '.join(self.attention_layers)}")
        faithfulness.step_aside(self.denoiser, self._undo)  # an enclosing i2am.ablate acts through attend
        self._undo.append(self.family.restore)  # before install: a partial install is undone too
        self.family.install(self, self.attention_layers)

    def _on_denoiser_call(self, module, args, kwargs):
        if self.current_step is None and self.recorder.num_steps is None:
            scheduler = getattr(self.pipe, "scheduler", None)
            if getattr(scheduler, "timesteps", None) is None:
                raise ValueError("cannot read the number of steps from pipe.scheduler.timesteps; pass num_steps")
            self.recorder.set_num_steps(_steps_from(scheduler, self.family.timestep(args, kwargs)))
        if self._cfg_from_pipe:  # a property valid during the pipeline call; None: the even-batch rule
            self.cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
        if self.family.read_inputs(args, kwargs):
            self.step()


def _steps_from(scheduler, timestep):
    """Denoiser calls from the first one (at `timestep`) to the end of scheduler.timesteps. A run
    with strength < 1 starts at index t_start: the pipeline sets it as begin_index on schedulers
    that keep one; on the others (DDIM, PNDM) it is where the first timestep sits in the list
    (its first occurrence: only schedulers with begin_index repeat timesteps). A timestep not in
    the list (a pipeline that rescales it) counts the whole list."""
    timesteps = scheduler.timesteps
    begin = getattr(scheduler, "begin_index", None)
    if begin is None and timestep is not None:
        t = torch.as_tensor(timestep).flatten()[:1].to(device=timesteps.device, dtype=torch.float64)
        hits = (timesteps.double() == t).nonzero().flatten()  # in float64: 0.999 is not step 0
        begin = int(hits[0]) if hits.numel() else 0
    return len(timesteps) - (begin or 0)
