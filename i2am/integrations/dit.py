"""How i2am stands in for the attention of every DiT family: at diffusers' dispatch_attention_fn.

In diffusers 0.4x every DiT attention processor (Flux, FLUX.2, Qwen-Image, Wan, ...) computes
its q, k and v (projections, norms, RoPE, text/image concatenation) and then calls
``dispatch_attention_fn(query, key, value, ...)`` with (B, N, heads, d) tensors, a name it
imports into its own module. During a trace that name is bound to a stand-in, and a forward
pre-hook on each traced attention module says which layer is calling; the stand-in sends the
call to the family's ``attend``, which hands it to the trace with the family's reading of the
token layout (which rows are the generated grid, which keys the reference). Calls outside a
traced layer (or from another model) go to the original function.

Why there and not in copies of the processors (the UNet family copies AttnProcessor2_0, which
calls SDPA directly): a processor copy repeats the processor's math line for line and must be
kept in step with every diffusers release and written again for every new DiT; at the dispatch
point the processor's own code runs untouched and a family says only where the generated rows
and the reference keys are. So a new DiT family (Qwen-Image-Edit-Plus, FLUX.2, in-context
editors whose reference sits beside the generated image) is a DiTFamily subclass with:

    TRANSFORMER           the diffusers transformer class (matches, split, inputs and timestep
                          follow from it)
    PROCESSORS            the processor classes it accepts (each calls dispatch_attention_fn
                          once per layer call with the layer's whole joint sequence)
    attention_layers
    read_inputs(args, kwargs)   sets self.layout (a TokenLayout or anything with its fields)
                          from the transformer call, and the recording's latent size and grids

and, when some calls are not to be recorded (true CFG's negative pass), ``self.plain = True``
(``negative_pass`` tells it from the scheduler's step index and the timestep). The layout's text
and generated keys are kept as two more sources beside the references (AttributionMaps.sources).

The stand-in is bound while any trace uses it (counted per module) and the original is back
when the last one leaves.
"""
import contextvars
import inspect
import sys
from dataclasses import dataclass

import torch

from ..instrument import TraceHook
from .base import Family

_LAYER = contextvars.ContextVar("i2am_dit_layer", default=None)  # (family, layer name) running now
_BOUND = {}  # processor module -> [the original dispatch_attention_fn, traces using the stand-in]


@dataclass(frozen=True)
class TokenLayout:
    """Where the generated and reference tokens sit in one call's joint sequence [text, image].
    With several references their keys follow each other, ref 0 first; with a KV cache the
    queries and keys differ (reference keys without reference queries)."""
    text: int           # text tokens, first in the joint sequence
    image: int          # image tokens after them (generated and reference), as keys
    rows: slice         # the generated tokens: the maps' queries
    ref_keys: slice     # the reference tokens of every reference (None: inside the generated grid,
                        # query_region/ref_region)
    grid: tuple         # (h, w) of the generated tokens, row-major
    ref_grid: tuple     # (hI, wI) of the reference tokens (of reference 0), or None as ref_keys
    references: tuple = None  # every reference's (hI, wI), in key order (None: ref_grid alone)
    generated: slice = None   # the generated tokens among the keys (None: rows)
    queries: int = None       # query tokens, where they are not the keys
    passthrough: tuple = ()   # (Nq, Nk) of dispatched calls that are no joint attention (not recorded)

    @property
    def length(self):
        return self.text + self.image

    @property
    def grids(self):
        return self.references or (self.ref_grid,)

    @property
    def segments(self):
        """The keys of the two sources that are not references (AttributionMaps.sources)."""
        return {"text": slice(0, self.text), "generated": self.rows if self.generated is None else self.generated}


class DiTFamily(Family):
    CFG_BATCH = False        # DiT editors are guidance-distilled or run true CFG as separate calls
    NEEDS_REF_GRID = False   # the token layout says it
    PROCESSORS = ()
    TRANSFORMER = None       # the diffusers transformer class (pipelines hold it as .transformer)
    REGIONS = False          # takes query_region/ref_region (a reference inside the generated grid)

    @classmethod
    def matches(cls, obj):
        return isinstance(obj, cls.TRANSFORMER) or isinstance(getattr(obj, "transformer", None), cls.TRANSFORMER)

    @classmethod
    def split(cls, obj):
        return (None, obj) if isinstance(obj, cls.TRANSFORMER) else (obj, obj.transformer)

    def inputs(self, args, kwargs):
        """{name: value} of a transformer call's arguments."""
        return inspect.signature(self.TRANSFORMER.forward).bind_partial(None, *args, **kwargs).arguments

    def timestep(self, args, kwargs):
        """The pipelines pass timestep / 1000 (the transformer multiplies it back)."""
        t = self.inputs(args, kwargs).get("timestep")
        return None if t is None else torch.as_tensor(t).double() * 1000

    def __init__(self, denoiser):
        super().__init__(denoiser)
        self.layout = None   # the last transformer call's TokenLayout
        self.plain = False   # the last call is not recorded (its attention runs as the model's own)
        self._running = []   # contextvar tokens of the layers running now
        self._last_call = None  # the last transformer call's (timestep, scheduler step index): negative_pass

    def install(self, recording, layers):
        for name, module in layers.items():  # check them all before changing any
            if type(module.processor) not in self.PROCESSORS:  # exact: a subclass may change the math
                raise ValueError(f"layer {name!r} runs {type(module.processor).__name__}; i2am.trace stands in for "
                                 f"{', '.join(c.__name__ for c in self.PROCESSORS)} only (IP-Adapter and fused "
                                 "or custom processors are not traced)")
        if recording.recorder.regions is not None and not self.REGIONS:
            raise ValueError(f"query_region/ref_region are not supported for {type(self.denoiser).__name__}: its "
                             "references are separate images in the transformer's inputs, whose grids i2am reads "
                             "from the call; leave query_region and ref_region out")
        self.recording = recording
        for module in dict.fromkeys(sys.modules[p.__module__] for p in self.PROCESSORS):
            self._undo.append(_bind(module))
        for name, module in layers.items():
            entered = module.register_forward_pre_hook(
                TraceHook(lambda m, a, n=name: self._running.append(_LAYER.set((self, n)))))
            left = module.register_forward_hook(TraceHook(lambda m, a, o: _LAYER.reset(self._running.pop())),
                                                always_call=True)
            self._undo += [entered.remove, left.remove]

    def attend(self, layer, query, key, value, attn_mask, scale, plain):
        """One dispatched attention of `layer`, (B, N, heads, d) tensors; plain() is the
        model's own call."""
        layout, shape = self.layout, (query.shape[1], key.shape[1])
        if layout is not None and shape in layout.passthrough:
            return plain()
        if layout is None or shape != (layout.queries or layout.length, layout.length):
            raise ValueError(f"layer {layer!r}: an attention of {shape[0]} queries over {shape[1]} keys, not the "
                             f"{layout.text if layout else '?'} text + {layout.image if layout else '?'} image "
                             "tokens of this transformer call; call the traced transformer itself")
        if self.plain:
            return plain()
        if attn_mask is not None and attn_mask.dtype == torch.bool and bool(attn_mask.all()):
            attn_mask = None  # a mask that keeps every key (Qwen-Image's text mask of an unpadded prompt)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, heads, N, d) views
        out = self.recording.attend(layer, q, k, v, scale=scale, attn_mask=attn_mask, grid=layout.grid,
                                    query_rows=layout.rows, ref_keys=layout.ref_keys, segments=layout.segments)
        return out.transpose(1, 2)


def _bind(module):
    """Bind module.dispatch_attention_fn to the stand-in (once for all traces); returns the undo."""
    entry = _BOUND.get(module)
    if entry is None:
        original = getattr(module, "dispatch_attention_fn", None)
        if original is None:
            raise ValueError(f"{module.__name__} does not call dispatch_attention_fn; i2am stands in for DiT "
                             "attention there")
        entry = _BOUND[module] = [original, 0]
        module.dispatch_attention_fn = _stand_in(original)
    entry[1] += 1

    def undo():
        entry[1] -= 1
        if entry[1] == 0:
            module.dispatch_attention_fn = entry[0]
            del _BOUND[module]
    return undo


def _stand_in(original):
    signature = inspect.signature(original)

    def dispatch_attention_fn(*args, **kwargs):
        running = _LAYER.get()
        if running is None:
            return original(*args, **kwargs)
        family, layer = running
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        a = call.arguments
        unusual = {n: a[n] for n in ("dropout_p", "is_causal", "enable_gqa", "parallel_config") if a.get(n)}
        if unusual:
            raise ValueError(f"layer {layer!r} dispatches attention with {unusual}; i2am records plain softmax "
                             "attention on one device: leave this layer out with layers=")
        return family.attend(layer, a["query"], a["key"], a["value"], a["attn_mask"], a["scale"],
                             lambda: original(*args, **kwargs))

    dispatch_attention_fn.__wrapped__ = original
    return dispatch_attention_fn


def negative_pass(family, timestep):
    """Whether a transformer call at `timestep` (pipeline units) is true CFG's negative-prompt pass,
    the second call of one denoising step (recorded only under branch="cond": not at all).

    Under a pipeline whose scheduler keeps a step index, the call belongs to the previous call's
    step only if the scheduler has not stepped since (the negative pass runs before
    scheduler.step) and the timestep is the same: schedulers such as
    FlowMatchHeunDiscreteScheduler repeat timesteps (t0, t1, t1, t2, ...) over distinct steps,
    and calls made without stepping the scheduler stay steps of their own timesteps. With no
    scheduler to ask (a bare transformer, or a scheduler without a step index) the rule is the
    timestep alone: a second call in a row at the same timestep."""
    t = None if timestep is None else timestep.flatten()[:1].cpu()
    scheduler = getattr(getattr(family.recording, "pipe", None), "scheduler", None)
    index = getattr(scheduler, "step_index", None)
    last, family._last_call = family._last_call, (t, index)
    negative = t is not None and last is not None and torch.equal(t, last[0]) and index == last[1]
    branch = family.recording.recorder.branch
    if negative and branch != "cond":
        raise ValueError(f"two transformer calls in one step at timestep {t.item():g}: true CFG's negative-prompt "
                         f"pass (true_cfg_scale > 1); i2am records the cond pass of true CFG only (branch='cond'), "
                         f"got branch={branch!r}")
    return negative


def row_major_grid(rc, what):
    """(h, w) of tokens whose (row, col) ids (N, 2) must run row-major over a full h x w grid."""
    rc = rc.round().long()
    rc = rc - rc.min(0).values  # offsets of the ids (e.g. a shifted reference) do not matter
    h, w = int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1
    want = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
    if rc.shape[0] != h * w or not torch.equal(rc, want):
        raise ValueError(f"the {what} tokens' (row, col) ids do not form a row-major grid")
    return h, w
