"""Faithfulness interventions: i2am.ablate (remove reference cells from the attention) and
i2am.randomize (re-initialise the attention's query and key projections).

    with i2am.ablate(pipe, [(3, 4), (3, 5)]):           # or a boolean (hI, wI) array
        image = pipe(...).images[0]                     # the run without those reference cells

Both act on the layers i2am.trace records (a UNet's attn2 layers, every Flux joint attention;
``layers=`` picks among them the same way) and restore the model exactly on exit, also when the
block raised. ``ablate`` composes with ``trace`` either way round: under a trace the dropped
keys leave the kernel's softmax as an index set of kept keys, so the maps are the ablated
run's. Without a trace the model's family stands in as it does for a trace (a UNet's processor
copies, a DiT's dispatch_attention_fn stand-in, i2am.integrations) and hands each call here:
plain SDPA over the kept keys.
"""
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import integrations
from .config import check_branch
from .grid import layer_grid
from .integers import int_tuple, int_tuples
from .layers import check_layers, layer_selected
from .recorder import batch_entries

MODES = ("drop", "zero")
_ACTIVE = weakref.WeakKeyDictionary()  # denoiser -> its active ablate


def active(denoiser):
    """The ablate block active on `denoiser`, or None."""
    return None if denoiser is None else _ACTIVE.get(denoiser)


def step_aside(denoiser, undo):
    """Put the original processors back under an ablate on `denoiser` while a trace installs its
    own (they consult the ablation through recording.attend); `undo` gets the re-install."""
    ablation = active(denoiser)
    if ablation is not None and ablation._installed:
        ablation._uninstall()
        undo.append(ablation._install)


@dataclass(frozen=True)
class Cut:
    """One call's ablation: the batch entries `entries` lose the keys `dropped` (CPU int64
    indices into the call's keys); `kept` are the others."""
    mode: str
    entries: torch.Tensor
    dropped: torch.Tensor
    kept: torch.Tensor

    def zeroed(self, k, v):
        """k and v with the dropped tokens of the ablated entries set to zero ("zero" mode)."""
        k, v = k.clone(), v.clone()
        e, dropped = self.entries.to(k.device), self.dropped.to(k.device)
        for t in (k, v):
            part = t[e]
            part[:, :, dropped] = 0
            t[e] = part
        return k, v

    def attention(self, q, k, v, scale=None):
        """SDPA in which the ablated entries attend to the kept keys only ("drop" mode)."""
        out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        e, kept = self.entries.to(q.device), self.kept.to(q.device)
        out[e] = F.scaled_dot_product_attention(q[e], k[e][:, :, kept], v[e][:, :, kept], scale=scale)
        return out

    def restore_others(self, out, q, k, v, scale=None):
        """out (computed over the kept keys for every entry) with the entries that are not ablated
        recomputed over all keys: the other branch is left as it was."""
        others = torch.tensor(sorted(set(range(q.shape[0])) - set(self.entries.tolist())), dtype=torch.long)
        if others.numel():
            o = others.to(q.device)
            out[o] = F.scaled_dot_product_attention(q[o], k[o], v[o], scale=scale).to(out.dtype)
        return out


class _Restoring:
    """A context manager that changes the model in _apply() and undoes it in _restore(), which also
    runs when _apply() or the block raised."""

    def __enter__(self):
        try:
            self._apply()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc):
        self._restore()
        return False


class ablate(_Restoring):
    """Context manager: the given reference cells removed from the attention of the traced layers.

    Args:
        pipe_or_denoiser: what i2am.trace takes (a UNet pipeline or UNet2DConditionModel, a
            FluxKontextPipeline or FluxTransformer2DModel).
        patches: a boolean (hI, wI) array (True = remove) or a list of (i, j) cells of the
            reference grid.
        mode: "drop" (the cells' keys leave the softmax; the other keys are renormalised) or
            "zero" (their key and value tokens are set to zero).
        ref: the reference (0: the families here have one).
        layers: the layers to ablate among the traced ones (name patterns and/or (h_l, w_l)).
        branch: the batch entries to ablate, as i2am.trace's branch ("cond" by default); the
            other entries are left as they were.
        ref_grid: (hI, wI) of the reference tokens, needed with a list of cells on a UNet outside
            a trace (a boolean array, a trace or a Flux model's img_ids say it).

    A layer's reference keys are those i2am.trace maps: the call's ref_keys (Flux: read from
    img_ids), else the last hI*wI keys when the layer has hI*wI keys or a CLS token and them.
    Under an i2am.trace (entered inside or outside this block) the maps are the ablated run's.
    """

    def __init__(self, pipe_or_denoiser, patches, *, mode="drop", ref=0, layers=None, branch="cond", ref_grid=None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if ref != 0 or isinstance(ref, bool):
            raise ValueError(f"ref={ref!r}: i2am.ablate removes cells of a model's one reference (ref=0); several "
                             "references (Qwen-Image-Edit-Plus, FLUX.2) are not ablated yet")
        check_branch(branch)
        check_layers(layers)
        family = integrations.family(pipe_or_denoiser)
        self.pipe, self.denoiser = family.split(pipe_or_denoiser)
        self.family = family(self.denoiser)  # this block's own stand-in, state and undo
        self.mode, self.layers, self.branch = mode, layers, branch
        self.grid, self.cells = _cells(patches, ref_grid)
        self.attention_layers = self.family.attention_layers()
        self.cfg = False if not self.family.CFG_BATCH else None
        self._installed, self._hooks = False, []
        self._entered = False

    # ---- the context ---------------------------------------------------------------------
    def __enter__(self):
        if self._entered:
            raise RuntimeError("this ablate block was already entered; use a new one for each block")
        self._entered = True
        if self.denoiser in _ACTIVE:
            raise RuntimeError(f"{type(self.denoiser).__name__} is already inside an i2am.ablate block; "
                               "give one block all the cells to remove")
        return super().__enter__()

    def _apply(self):
        handle = self.denoiser.register_forward_pre_hook(self._on_denoiser_call, with_kwargs=True)
        self._hooks.append(handle.remove)
        from .instrument import _IN_USE  # a trace or recording is active: its processors consult us
        if self.denoiser not in _IN_USE:
            self._install()
        _ACTIVE[self.denoiser] = self

    def _restore(self):
        _ACTIVE.pop(self.denoiser, None)
        if self._installed:
            self._uninstall()
        while self._hooks:
            self._hooks.pop()()

    def _install(self):
        self._installed = True  # before install: a partial install is undone too
        self.family.install(self, self.attention_layers)

    def _uninstall(self):
        self.family.restore()
        self._installed = False

    # ---- what the family's stand-in and read_inputs use (self stands in for a trace) ---------
    regions = None  # the reference is the model's own reference tokens (no query_region/ref_region)

    @property
    def recorder(self):
        return self

    def set_latent_size(self, size):
        self.latent_size = tuple(size)

    def set_ref_grid(self, grid):
        grid = tuple(grid)
        if self.grid is not None and self.grid != grid:
            raise ValueError(f"patches are given on a {self.grid} grid but the model's reference tokens form a "
                             f"{grid} grid")
        self.model_grid = grid

    def _on_denoiser_call(self, module, args, kwargs):
        if self.pipe is not None and self.family.CFG_BATCH:
            self.cfg = getattr(self.pipe, "do_classifier_free_guidance", None)
        if self._installed:  # else a trace's family reads the call and hands the grids to cut()
            self.family.read_inputs(args, kwargs)

    def attend(self, layer, q, k, v, *, scale=None, attn_mask=None, grid=None, query_rows=None, ref_keys=None,
               segments=None):
        """A traced layer's attention outside a trace: SDPA with the ablation (segments, the key
        segments a DiT family names for the maps' sources, play no part in it)."""
        cut = self.cut(layer, q, k, grid=grid, query_rows=query_rows, ref_keys=ref_keys, cfg=self.cfg)
        if cut is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
        if attn_mask is not None:
            raise ValueError(f"layer {layer!r}: i2am.ablate does not remove keys from attention with an "
                             "attention mask; leave this layer out with layers=")
        if cut.mode == "zero":
            k, v = cut.zeroed(k, v)
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        return cut.attention(q, k, v, scale)

    # ---- one call ------------------------------------------------------------------------
    def cut(self, layer, q, k, *, grid=None, query_rows=None, ref_keys=None, cfg=None, latent_size=None,
            ref_grid=None):
        """The Cut of one call of `layer` (q (B, H, Nq, d), k (B, H, Nk, d)), or None when the
        layer is not ablated."""
        if self.layers is not None:
            if grid is None:
                rows = q.shape[2] if query_rows is None else len(range(q.shape[2])[query_rows])
                grid = layer_grid(rows, latent_size or getattr(self, "latent_size", None))
            if not layer_selected(layer, grid, self.layers):
                return None
        nk = k.shape[2]
        cells_grid = self.grid or ref_grid or getattr(self, "model_grid", None)
        if cells_grid is None:
            raise ValueError("ablate needs the reference grid of a list of cells: pass ref_grid=(hI, wI) or "
                             "a boolean (hI, wI) array")
        n = cells_grid[0] * cells_grid[1]
        if max(i * cells_grid[1] + j for i, j in self.cells) >= n or any(
                i >= cells_grid[0] or j >= cells_grid[1] for i, j in self.cells):
            raise ValueError(f"patches {self.cells} lie outside the {cells_grid} reference grid")
        if ref_keys is not None:
            ref = torch.arange(nk)[ref_keys] if isinstance(ref_keys, slice) else torch.as_tensor(ref_keys).cpu()
            if ref.numel() != n:
                raise ValueError(f"layer {layer!r}: its {ref.numel()} reference keys are not the {n} cells of "
                                 f"the {cells_grid} grid")
        elif nk in (n, n + 1):
            ref = torch.arange(nk - n, nk)
        else:
            raise ValueError(f"layer {layer!r} has Nk={nk} keys, which fit neither {n} nor {n + 1} (a CLS token "
                             f"first) keys of the {cells_grid} reference grid; leave it out with layers=")
        dropped = ref[torch.tensor([i * cells_grid[1] + j for i, j in self.cells])].long()
        keep = torch.ones(nk, dtype=torch.bool)
        keep[dropped] = False
        if self.mode == "drop" and not keep.any():
            raise ValueError(f"layer {layer!r}: ablate would drop all of its {nk} keys; keep at least one")
        entries = torch.tensor(batch_entries(self.branch, q.shape[0], cfg), dtype=torch.long)
        return Cut(self.mode, entries, dropped, keep.nonzero().flatten())


def _cells(patches, ref_grid):
    """(grid or None, sorted unique (i, j) cells) from a boolean (hI, wI) array or a list of cells."""
    grid = None if ref_grid is None else int_tuple(ref_grid, 2, "ref_grid")
    if isinstance(patches, (np.ndarray, torch.Tensor)):
        arr = torch.as_tensor(np.asarray(patches.cpu() if isinstance(patches, torch.Tensor) else patches))
        if arr.dim() != 2 or arr.dtype != torch.bool:
            raise ValueError(f"patches must be a boolean (hI, wI) array or a list of (i, j) cells, got an array "
                             f"of {arr.dtype} with shape {tuple(arr.shape)}")
        if grid is not None and tuple(arr.shape) != grid:
            raise ValueError(f"patches is a {tuple(arr.shape)} array but ref_grid is {grid}")
        cells = [tuple(c) for c in arr.nonzero().tolist()]
        grid = tuple(arr.shape)
    else:
        cells = sorted(set(int_tuples(patches, 2, "patches", "(i, j) pairs", "patch (i, j)")))
    if not cells:
        raise ValueError("patches selects no reference cell")
    if any(i < 0 or j < 0 for i, j in cells):
        raise ValueError(f"patches must be non-negative (i, j) cells, got {cells}")
    return grid, cells


class randomize(_Restoring):
    """Context manager: the traced layers' query and key projections re-initialised as at training
    start (each Linear's reset_parameters, from `seed`; the caller's random stream is left alone),
    the trained values copied back on exit, also when the block raised.

    layers: name patterns among the traced layers (default all). Flux's double-stream layers
    also have the text tokens' projections (add_q_proj, add_k_proj): re-initialised too.
    """

    PROJECTIONS = ("to_q", "to_k", "add_q_proj", "add_k_proj")

    def __init__(self, pipe_or_denoiser, *, layers=None, seed=0):
        check_layers(layers)
        family = integrations.family(pipe_or_denoiser)
        _, denoiser = family.split(pipe_or_denoiser)
        names = family(denoiser).attention_layers()
        patterns = [layers] if isinstance(layers, str) else layers
        if layers is not None and any(not isinstance(x, str) for x in patterns):
            raise ValueError("randomize takes layers as name patterns (resolutions are known only once the model runs)")
        self.modules = [m for n, m in names.items() if layer_selected(n, None, layers)]
        if not self.modules:
            raise ValueError(f"layers={layers!r} matches none of the attention layers: {', '.join(names)}")
        self.seed, self._saved = int_tuple((seed,), 1, "seed")[0], []

    def _apply(self):
        linears = [getattr(m, p) for m in self.modules for p in self.PROJECTIONS if getattr(m, p, None) is not None]
        self._saved = [(p, p.detach().clone()) for lin in linears for p in lin.parameters()]
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(self.seed)
            for lin in linears:
                lin.reset_parameters()

    def _restore(self):
        with torch.no_grad():
            for p, value in self._saved:
                p.copy_(value)
        self._saved = []
