"""i2am.trace (this module: i2am.tracing): record I2AM maps while a diffusers pipeline runs as usual (SPEC section 4).

    with i2am.trace(pipe, ref_grid=(16, 16), mask=mask, points=[(20, 30)]) as tc:
        image = pipe(...).images[0]
    maps = tc.maps()

Inside the block the UNet's cross-attention layers (attn2) run through i2am processors
(i2am.processors) that compute the same output and stream the maps into small buffers; every
other module is untouched. On exit, also when the block raised, the original processor
objects and the denoiser's hooks are back.
"""
from diffusers.models.attention_processor import (Attention, AttnProcessor, AttnProcessor2_0,
                                                  IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)
import torch
from torch import nn

from .processors import I2AMAttnProcessor, I2AMIPAdapterAttnProcessor
from .recording import recording

PLAIN = (AttnProcessor, AttnProcessor2_0)            # same math: scaled dot-product attention
IP_ADAPTER = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)


class trace(recording):
    """Context manager that records I2AM maps of a diffusers pipeline or UNet while it runs.

    Args:
        pipe_or_denoiser: a diffusers pipeline with a ``.unet``, or a UNet2DConditionModel.
        ref_grid: (hI, wI) rows x cols of the reference-image tokens, or "layer": each layer's
            reference keys lie on its own query grid (reference features at every resolution);
            the maps are then resized over the key axes to ref_size and clamped at 0.
        ref_keys: the reference keys (slice or indices into the keys). Default: a layer's keys
            are the grid (hI*wI keys) or a CLS token and the grid (hI*wI + 1); any other key
            count is an error naming the layer.
        ref_size: the common reference grid of ref_grid="layer" (default: the largest traced
            layer grid; needed with patches=).
        protocol: "paper" (default: the printed equations) or "official" (the authors' released
            code step by step: its M_g over every context key, recorded with one key probe per
            key, its display, IMACS and layer sets); carried by the maps, see i2am.protocols.
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
        layers: record only these attn2 layers: fnmatch name patterns (e.g. "up_blocks.*") and/or
            (h_l, w_l) resolutions; the others run as plain attention.
        convention: "official" (default) or "paper" (SPEC section 2).
        backend: "auto", "triton", "cuda", "torch" or "reference".
        cfg: whether batches are [uncond, cond]; default ``pipe.do_classifier_free_guidance``
            where the pipeline has it, else an even batch is.
        resize: "bicubic" (default), "bilinear" or "nearest", the layer-to-latent resize.

    One denoiser call is one step; the latent size is read from its input and may not change.
    Layers are the UNet's attn2 modules (``Attention.is_cross_attention``) running
    AttnProcessor/AttnProcessor2_0 or IPAdapterAttnProcessor(2_0); for IP-Adapter layers the
    maps come from the attention over the image tokens. A recorded call with an attention
    mask (or ip_adapter_masks) is an error: the maps assume the plain softmax.
    """

    def __init__(self, pipe_or_denoiser, *, ref_grid, ref_keys=None, time_groups=1, branch="cond", mask=None,
                 points=(), boxes=(), patches=(), num_steps=None, layers=None, convention="official",
                 protocol="paper", ref_size=None, backend="auto", cfg=None, resize="bicubic"):
        self.pipe, unet = _split(pipe_or_denoiser)
        if self.pipe is None and num_steps is None:
            raise ValueError("num_steps is needed to trace a bare denoiser (there is no pipeline scheduler "
                             "to read it from)")
        super().__init__(unet, num_steps=num_steps, cfg=cfg, ref_grid=ref_grid, ref_keys=ref_keys,
                         time_groups=time_groups, branch=branch, mask=mask, points=points, boxes=boxes,
                         patches=patches, layers=layers, convention=convention, protocol=protocol,
                         ref_size=ref_size, backend=backend, resize=resize)
        self.cross_layers = cross_attention_layers(unet)
        self._cfg_from_pipe = cfg is None

    def _install(self):
        for name, module in self.cross_layers.items():  # check them all before changing any
            if type(module.processor) not in PLAIN + IP_ADAPTER:  # exact: a subclass may change the math
                raise ValueError(f"layer {name!r} runs {type(module.processor).__name__}; i2am.trace stands in "
                                 f"for {', '.join(c.__name__ for c in PLAIN + IP_ADAPTER)} only (call "
                                 "unet.set_default_attn_processor() first, or instrument the code with i2am.attention)")
        for name, module in self.cross_layers.items():
            original = module.processor
            if isinstance(original, IP_ADAPTER):
                module.set_processor(I2AMIPAdapterAttnProcessor(original, self, name))
            else:
                module.set_processor(I2AMAttnProcessor(self, name))
            self._undo.append(lambda m=module, p=original: m.set_processor(p))

    def _on_denoiser_call(self, module, args, kwargs):
        if self.current_step is None and self.recorder.num_steps is None:
            scheduler = getattr(self.pipe, "scheduler", None)
            if getattr(scheduler, "timesteps", None) is None:
                raise ValueError("cannot read the number of steps from pipe.scheduler.timesteps; pass num_steps")
            timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            self.recorder.set_num_steps(_steps_from(scheduler, timestep))
        if self._cfg_from_pipe:  # a property valid during the pipeline call; None: the even-batch rule
            self.cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
        super()._on_denoiser_call(module, args, kwargs)


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


def cross_attention_layers(unet):
    """{name: Attention} of the UNet's attn2 layers; an error when there are none."""
    layers = {n: m for n, m in unet.named_modules()
              if n.rsplit(".", 1)[-1] == "attn2" and isinstance(m, Attention) and m.is_cross_attention}
    if not layers:
        raise ValueError(f"no cross-attention layers (attn2 Attention modules) found in {type(unet).__name__}; "
                         "i2am.trace supports diffusers UNets such as UNet2DConditionModel")
    return layers


def _split(obj):
    """(pipeline or None, its UNet) from a pipeline or a bare denoiser."""
    unet = getattr(obj, "unet", None)
    if isinstance(unet, nn.Module):
        return obj, unet
    if isinstance(obj, nn.Module):
        return None, obj
    if isinstance(getattr(obj, "transformer", None), nn.Module):
        raise ValueError(f"{type(obj).__name__} has a transformer denoiser; i2am.trace supports UNet pipelines "
                         "(pipe.unet) only")
    raise TypeError(f"i2am.trace needs a diffusers pipeline with a .unet or a UNet module, got {type(obj).__name__}")
