"""Recording I2AM maps from plain PyTorch code: the ``recording`` context and ``attention``.

``i2am.attention`` is a drop-in for ``F.scaled_dot_product_attention``: outside a recording
(or with ``layer=None``) it is SDPA; inside ``with i2am.recording(...)`` it records the call
under its layer name. Instrumenting an LDM-style codebase (StableVITON, DCI-VTON: the
``CrossAttention`` of ``ldm/modules/attention.py`` serves both attn1 and attn2 of every
``BasicTransformerBlock``) takes three lines::

    import i2am                                                       # 1, in ldm/modules/attention.py

    # 2, in CrossAttention.forward, for the lines from ``sim = einsum(...)`` to
    # ``out = einsum('b i j, b j d -> b i d', attn, v)`` (q, k, v are (b*h, n, d) there):
    out = i2am.attention(q, k, v, heads=h, scale=self.scale, attn_mask=mask, layer=self)

    # 3, around sampling: the denoiser's forward is one step and gives the latent size;
    # layers= keeps the self-attention (attn1) calls out of the maps
    with i2am.recording(model.model.diffusion_model, ref_grid=(16, 12), num_steps=50,
                        layers="*.attn2") as rec:
        samples, _ = sampler.sample(...)
    maps = rec.maps()

(``mask`` there is LDM's (b*h, 1, n_k) boolean key mask, or None; a recorded call may not have
one.) Without a denoiser, give ``latent_size`` and call ``rec.step()`` before each step.
"""
import contextvars
import warnings
import weakref

import torch
import torch.nn.functional as F

from . import faithfulness
from .grid import layer_grid
from .integers import as_int
from .kernels import graph_break
from .recorder import Recorder

_CURRENT = contextvars.ContextVar("i2am_recording", default=None)
_IN_USE = weakref.WeakSet()  # denoisers hooked by an active recording
_ACTIVE = weakref.WeakSet()  # entered recordings, found by their modules from other threads


def attention(q, k, v, *, scale=None, layer=None, attn_mask=None, heads=None, grid=None, query_rows=None,
              ref_keys=None):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)`` that, inside
    an :class:`i2am.recording` (or :class:`i2am.trace`), records the call as layer `layer`.

    q (B, H, Nq, d), k (B, H, Nk, d), v (B, H, Nk, dv); or (B*H, N, d) each, as LDM code lays
    them out, with heads=H (the recorder needs the batch axis for CFG and the head axis for
    by-head maps). layer: a name, or a module inside the recording's denoiser (named as in
    ``denoiser.named_modules()``); None: never recorded. grid: the call's query grid
    (h_l, w_l), default inferred from Nq and the latent size. query_rows: a slice of the
    queries that form that grid (joint attention; default all). ref_keys: this call's
    reference keys, a slice or indices (default the recording's ref_keys, else the last hI*wI
    keys): in a self-attention with concatenated reference features, keys = [own, reference]
    and ref_keys the reference part. A recorded call may not have an attention mask.
    """
    rec = _CURRENT.get() or _recording_of(layer)
    if rec is None or layer is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    if q.dim() == 4:
        return rec.attend(layer, q, k, v, scale=scale, attn_mask=attn_mask, grid=grid, query_rows=query_rows,
                          ref_keys=ref_keys)
    if q.dim() != 3 or heads is None:
        raise ValueError(f"a recorded call needs q, k, v as (B, H, N, d), or (B*H, N, d) with heads=H; got "
                         f"q {tuple(q.shape)} and heads={heads}")
    if as_int(heads, "heads") < 1:
        raise ValueError(f"heads must be a positive integer (the H of q's (B*H, N, d) rows), got {heads!r}")
    if q.shape[0] % heads or k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"heads={heads} does not divide the {q.shape[0]} rows of q (B*H, N, d), or k, v have "
                         f"other row counts ({k.shape[0]}, {v.shape[0]}): pass heads=H of this call")
    q, k, v = (t.unflatten(0, (-1, heads)) for t in (q, k, v))
    if attn_mask is not None and attn_mask.dim() == 3:
        attn_mask = attn_mask.unflatten(0, (-1, heads))
    return rec.attend(layer, q, k, v, scale=scale, attn_mask=attn_mask, grid=grid, query_rows=query_rows,
                      ref_keys=ref_keys).flatten(0, 1)


def _recording_of(layer):
    """The active recording a call outside its context (another thread) belongs to: the one whose
    denoiser holds the module `layer`. A layer name cannot say which: a warning, not a silent gap."""
    if layer is None or not _ACTIVE:
        return None
    if not isinstance(layer, str):
        return next((rec for rec in list(_ACTIVE) if layer in rec._names), None)
    warnings.warn(f"i2am.attention(layer={layer!r}) was called outside the active i2am recording (from another "
                  "thread or context): this call is not recorded; pass the layer module of the recording's "
                  "denoiser, or call it from the thread that entered the recording", RuntimeWarning, stacklevel=3)
    return None


class recording:
    """A context in which :func:`i2am.attention` calls record I2AM maps into a Recorder.

    Args:
        denoiser: optional module whose forward call is one denoising step: a forward pre-hook
            advances the step and reads the latent size (h, w) from the last two axes of its
            first input; module layers are named relative to it.
        config: an i2am.TraceConfig (ref_grid is required; num_steps: T, the number of
            denoising steps; cfg: whether batches are [uncond, cond], default: an even batch
            is), or leave it out and give its keywords (see i2am.trace); keywords given with a
            config change those settings.
        latent_size: (h, w), needed without a denoiser.

    Use ``rec.step()`` (next step) or ``rec.step(t)`` to set the step without a denoiser, and
    ``rec.maps()`` for the i2am.AttributionMaps. A denoiser can be in one recording at a time.
    """

    def __init__(self, denoiser=None, config=None, *, latent_size=None, **keywords):
        self.recorder = Recorder(config, latent_size=latent_size, **keywords)
        self.config = self.recorder.config
        self.denoiser, self.cfg = denoiser, self.config.cfg
        self.current_step = None
        self._names = {}
        self._undo = []  # callables that restore the model, run in reverse on exit
        self._token = None
        self._entered = False

    def __enter__(self):
        if self._entered:
            raise RuntimeError("this recording was already entered; use a new one for each block")
        self._entered = True
        try:
            if self.denoiser is not None:
                self._claim(self.denoiser)
                self._names = {m: n for n, m in self.denoiser.named_modules()}
                handle = self.denoiser.register_forward_pre_hook(TraceHook(self._on_denoiser_call), with_kwargs=True)
                self._undo.append(handle.remove)
            self._install()
        except BaseException:
            self._restore()
            raise
        self._token = _CURRENT.set(self)
        _ACTIVE.add(self)
        return self

    def __exit__(self, *exc):
        _CURRENT.reset(self._token)
        _ACTIVE.discard(self)
        self._token = None
        self._restore()
        return False

    def step(self, t=None):
        """Set the current denoising step to t (0 = first), or advance to the next one."""
        t = (0 if self.current_step is None else self.current_step + 1) if t is None else as_int(t, "step")
        T = self.recorder.num_steps
        if t < 0:
            raise ValueError(f"step must be an integer >= 0 (0 = first), got {t!r}")
        if T is not None and t >= T:
            raise ValueError(f"step {t} is outside the {T} steps of this recording (0 = first); one "
                             "denoiser call is one step: set num_steps to the number of calls, and run "
                             "one sampling loop per block")
        self.current_step = t
        return t

    @graph_break  # under torch.compile each recorded call runs eagerly
    def attend(self, layer, q, k, v, *, scale=None, attn_mask=None, grid=None, query_rows=None, ref_keys=None,
               segments=None):
        """The attention of one call of `layer` (a name or a module), its maps recorded
        (query_rows, ref_keys: see i2am.attention; segments: see Recorder.record)."""
        name = self._name(layer)
        if self.recorder.latent_size is None or self.current_step is None:
            raise ValueError(f"layer {name!r} was called before the first step: pass a denoiser (or "
                             "latent_size) to the recording and call rec.step() before each step")
        n_rows = q.shape[2] if query_rows is None else len(range(q.shape[2])[query_rows])
        grid = grid or layer_grid(n_rows, self.recorder.latent_size)
        ablation = faithfulness.active(self.denoiser)  # an i2am.ablate block on this denoiser
        if ablation is not None and self.recorder.regions is not None:
            raise ValueError("i2am.ablate removes the keys of a model's own reference tokens; it does not "
                             "combine with a trace on query_region/ref_region")
        cut = None if ablation is None else ablation.cut(name, q, k, grid=grid, query_rows=query_rows,
                                                         ref_keys=ref_keys, cfg=self.cfg,
                                                         ref_grid=self.recorder.ref_grid)
        if cut is not None and cut.mode == "zero":
            k, v, cut = *cut.zeroed(k, v), None
        if attn_mask is not None:
            if cut is not None or self.recorder.selected(name, grid):
                raise ValueError(f"layer {name!r}: i2am cannot record attention with an attention mask "
                                 "(the maps assume the plain softmax); leave this layer out with layers=")
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        return self.recorder.record(name, q, k, v, step=self.current_step, scale=scale, grid=grid, cfg=self.cfg,
                                    query_rows=query_rows, ref_keys=ref_keys, segments=segments,
                                    cut=cut)

    def maps(self):
        """The maps recorded so far, as an i2am.AttributionMaps."""
        return self.recorder.maps()

    # ---- hooks for subclasses and their undo -------------------------------------------
    def _install(self):
        """Changes to the model beyond the step hook (i2am.trace swaps processors here)."""

    def _on_denoiser_call(self, module, args, kwargs):
        self.recorder.set_latent_size(latent_size_of(args, kwargs))
        self.step()

    def _claim(self, denoiser):
        if denoiser in _IN_USE:
            raise RuntimeError(f"{type(denoiser).__name__} is already traced by another active i2am "
                               "trace/recording; nested or concurrent traces on one model are not supported")
        _IN_USE.add(denoiser)
        self._undo.append(lambda: _IN_USE.discard(denoiser))

    def _restore(self):
        while self._undo:
            self._undo.pop()()

    def _name(self, layer):
        if isinstance(layer, str):
            return layer
        name = self._names.get(layer)
        if name is None:
            raise ValueError(f"layer {type(layer).__name__} is not a module of this recording's denoiser; "
                             "pass the layer's name as a string instead")
        return name


class TraceHook:
    """A module hook of a trace (the denoiser's step hook, a DiT layer's hooks). A deep copy of the
    traced model is an untraced copy: the copy of the hook does nothing (as the copies of the UNet
    family's processors are the originals)."""

    def __init__(self, hook):
        self.hook = hook

    @graph_break  # the step count and the running layer are Python state, never traced into a graph
    def __call__(self, *args):
        return self.hook(*args)

    def __deepcopy__(self, memo):
        return _untraced


def _untraced(*args):
    return None


def latent_size_of(args, kwargs):
    """(h, w) of a denoiser call's latent sample: its first input, (B, C, h, w)."""
    sample = args[0] if args else kwargs.get("sample", kwargs.get("x"))
    if not isinstance(sample, torch.Tensor) or sample.dim() < 3:
        raise ValueError("cannot read the latent size: the denoiser's first input must be the latent "
                         "sample (B, C, h, w)")
    return tuple(sample.shape[-2:])
