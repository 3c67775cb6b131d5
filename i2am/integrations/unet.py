"""The UNet family: cross-attention (attn2) layers of diffusers UNets, e.g. UNet2DConditionModel,
or their self-attention (attn1) layers (attention="self": a reference inside the same latent).

The processors do the math of diffusers' ``AttnProcessor2_0`` and ``IPAdapterAttnProcessor2_0``
step by step (spatial/group norm, projections, head split, attention, output projection,
residual, rescale); only the attention that carries the reference image goes through
``recording.attend``, which returns the same output as SDPA and adds the call's maps to the
buffers. The latent size is read from the UNet's input sample. These processors call SDPA
directly (not diffusers' dispatch_attention_fn, where the DiT families stand in), and the
IP-Adapter one splits text and image attention, so the UNet family keeps processor copies.
"""
import copy

import torch.nn.functional as F
from diffusers.models.attention_processor import (Attention, AttnProcessor, AttnProcessor2_0,
                                                  IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)
from torch import nn

from ..instrument import latent_size_of

from .base import Family

PLAIN = (AttnProcessor, AttnProcessor2_0)            # same math: scaled dot-product attention
IP_ADAPTER = (IPAdapterAttnProcessor, IPAdapterAttnProcessor2_0)


class UNetFamily(Family):
    CFG_BATCH = True
    NEEDS_REF_GRID = True
    PROTOCOLS = ("paper", "official")

    @classmethod
    def matches(cls, obj):
        return isinstance(getattr(obj, "unet", None), nn.Module) or isinstance(obj, nn.Module)

    @classmethod
    def split(cls, obj):
        unet = getattr(obj, "unet", None)
        return (obj, unet) if isinstance(unet, nn.Module) else (None, obj)

    def attention_layers(self, attention="cross"):
        """{name: Attention} of the UNet's attn2 (cross) or attn1 (self) layers; an error when there are none."""
        name, cross = ("attn2", True) if attention == "cross" else ("attn1", False)
        layers = {n: m for n, m in self.denoiser.named_modules()
                  if n.rsplit(".", 1)[-1] == name and isinstance(m, Attention) and m.is_cross_attention == cross}
        if not layers:
            raise ValueError(f"no {attention}-attention layers ({name} Attention modules) found in "
                             f"{type(self.denoiser).__name__}; i2am.trace supports diffusers UNets such as "
                             "UNet2DConditionModel")
        return layers

    def install(self, recording, layers):
        """i2am processors on every given attn2 layer, recording into `recording`."""
        for name, module in layers.items():  # check them all before changing any
            if type(module.processor) not in PLAIN + IP_ADAPTER:  # exact: a subclass may change the math
                raise ValueError(f"layer {name!r} runs {type(module.processor).__name__}; i2am.trace stands in "
                                 f"for {', '.join(c.__name__ for c in PLAIN + IP_ADAPTER)} only (call "
                                 "unet.set_default_attn_processor() first, or instrument the code with "
                                 "i2am.attention)")
        self.recording = recording
        for name, module in layers.items():
            original = module.processor
            if isinstance(original, IP_ADAPTER):
                module.set_processor(I2AMIPAdapterAttnProcessor(original, recording, name))
            else:
                module.set_processor(I2AMAttnProcessor(recording, name, original))
            self._undo.append(lambda m=module, p=original: m.set_processor(p))

    def read_inputs(self, args, kwargs):
        self.recording.recorder.set_latent_size(latent_size_of(args, kwargs))
        return True

    def timestep(self, args, kwargs):
        return kwargs.get("timestep", args[1] if len(args) > 1 else None)


def cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, attend, qk_norm=True):
    """AttnProcessor2_0's forward with the attention itself done by
    attend(query, key, value, mask) -> (B, heads, Nq, head_dim); qk_norm=False skips
    norm_q/norm_k, as IPAdapterAttnProcessor2_0 does."""
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape)
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)
    query, key, value = (split_heads(t, attn.heads, batch_size) for t in (query, key, value))
    if qk_norm and attn.norm_q is not None:
        query = attn.norm_q(query)
    if qk_norm and attn.norm_k is not None:
        key = attn.norm_k(key)

    hidden_states = attend(query, key, value, attention_mask)
    hidden_states = hidden_states.transpose(1, 2).flatten(2)  # (B, Nq, heads*head_dim)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.to(query.dtype)))  # linear, dropout
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def split_heads(x, heads, batch_size):
    """(B, N, heads*d) -> (B, heads, N, d), the view diffusers' processors make."""
    return x.view(batch_size, -1, heads, x.shape[-1] // heads).transpose(1, 2)


class I2AMAttnProcessor:
    """AttnProcessor2_0 whose attention is recorded as layer `layer` of `recording`.

    The score scale is ``attn.scale`` (dim_head ** -0.5 in Stable Diffusion, as SDPA's default).
    """

    def __init__(self, recording, layer, original):
        self.recording, self.layer, self.original = recording, layer, original

    def __deepcopy__(self, memo):  # a deep copy of the traced model is untraced: its own original processor
        return copy.deepcopy(self.original, memo)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        def attend(q, k, v, mask):
            return self.recording.attend(self.layer, q, k, v, scale=attn.scale, attn_mask=mask)

        return cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, attend)


class I2AMIPAdapterAttnProcessor(IPAdapterAttnProcessor2_0):
    """IPAdapterAttnProcessor2_0 whose IMAGE-token attention is recorded; the text attention is
    plain SDPA, as in the original.

    It shares the original processor's to_k_ip / to_v_ip modules (same parameters, same state
    dict keys) and reads and writes its ``scale``, so ``pipe.set_ip_adapter_scale`` inside a
    trace reaches the original. With one adapter the image attention is recorded as layer
    `layer`, with several as ``f"{layer}.ip{i}"``. Regional adapters (``ip_adapter_masks``) are
    an error: their maps would mix masked calls.
    """

    def __init__(self, original, recording, layer):
        super(IPAdapterAttnProcessor2_0, self).__init__()  # nn.Module only: the weights are shared
        self.original, self.recording, self.layer = (original,), recording, layer  # tuple: no submodule
        self.hidden_size, self.cross_attention_dim = original.hidden_size, original.cross_attention_dim
        self.num_tokens = original.num_tokens
        self.to_k_ip, self.to_v_ip = original.to_k_ip, original.to_v_ip

    def __deepcopy__(self, memo):  # as I2AMAttnProcessor: the copy runs the original processor
        return copy.deepcopy(self.original[0], memo)

    @property
    def scale(self):
        return self.original[0].scale

    @scale.setter
    def scale(self, value):
        self.original[0].scale = value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 scale=1.0, ip_adapter_masks=None):
        if ip_adapter_masks is not None:
            raise ValueError(f"layer {self.layer!r}: i2am does not record IP-Adapter attention with "
                             "ip_adapter_masks (regional adapters); trace without them")
        if isinstance(encoder_hidden_states, tuple):
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states
        else:  # the deprecated layout: image tokens appended to the text tokens
            end = encoder_hidden_states.shape[1] - self.num_tokens[0]
            encoder_hidden_states, ip_hidden_states = encoder_hidden_states[:, :end], [encoder_hidden_states[:, end:]]

        def attend(q, k, v, mask):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            n = len(self.to_k_ip)
            names = [self.layer] if n == 1 else [f"{self.layer}.ip{i}" for i in range(n)]
            for name, ip, s, to_k, to_v in zip(names, ip_hidden_states, self.scale, self.to_k_ip, self.to_v_ip):
                if s == 0 or (isinstance(s, list) and all(x == 0 for x in s)):
                    continue  # the original skips a zero-scaled adapter
                k_ip, v_ip = (split_heads(f(ip), attn.heads, q.shape[0]) for f in (to_k, to_v))
                out = out + s * self.recording.attend(name, q, k_ip, v_ip, scale=attn.scale)
            return out

        return cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb, attend,
                               qk_norm=False)
