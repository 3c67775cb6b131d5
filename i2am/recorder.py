"""The recorder: time-summed, head-indexed map buffers per layer, fed one attention call at a time.

Any code can feed it (layer name, step, q, k, v) without diffusers::

    rec = Recorder(ref_grid=(16, 16), latent_size=(64, 64), num_steps=50, time_groups=5)
    out = rec.record("mid.attn2", q, k, v, step=t)      # attention output, maps accumulated
    maps = rec.maps()                                   # i2am.AttributionMaps

Per layer it keeps gen (Br, G, H, Ru, Nq) and ref (Br, G, H, Rw, |K_ref|) at the layer's own
resolution (SPEC section 3); nothing is stored per step.
"""
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch
import torch.nn.functional as F

from .grid import RESIZE_MODES, layer_grid, pullback
from .kernels import prepare
from .probes import key_probes, mask_2d, query_probes

CONVENTIONS = {"official": ("query", "key"), "paper": ("key", "query")}  # (gen softmax, ref softmax)
BRANCHES = ("cond", "uncond", "all")


@dataclass
class LayerBuffers:
    grid: tuple
    heads: int
    nk: int
    ref_idx: torch.Tensor
    key_probes: torch.Tensor    # (Ru, Kr) on the layer's device
    query_probes: torch.Tensor  # (Rw, Nq): latent probes pulled back to this layer's grid
    gen: torch.Tensor
    ref: torch.Tensor
    call: object = None  # the checked kernel arguments (kernels.MapsCall), reused step after step


class Recorder:
    """Accumulates I2AM maps of many attention calls; see the module docstring."""

    def __init__(self, *, ref_grid, latent_size=None, num_steps=None, time_groups=1, ref_keys=None,
                 branch="cond", mask=None, points=(), boxes=(), patches=(), convention="official",
                 backend="auto", layers=None, resize="bicubic"):
        self.ref_grid = _pair(ref_grid, "ref_grid (hI, wI)")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {tuple(CONVENTIONS)}, got {convention!r}")
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
        if not (branch in BRANCHES or _is_index_list(branch)):
            raise ValueError(f"branch must be one of {BRANCHES} or a list of batch indices, got {branch!r}")
        if not isinstance(time_groups, int) or time_groups < 1:
            raise ValueError(f"time_groups must be a positive integer, got {time_groups!r}")
        self.time_groups, self.ref_keys, self.branch = time_groups, ref_keys, branch
        self.convention, self.backend, self.layers, self.resize = convention, backend, layers, resize
        self.mask = None if mask is None else mask_2d(mask)  # checked now, not at the first call
        self.points, self.boxes = tuple(map(tuple, points)), tuple(map(tuple, boxes))
        self.keys = key_probes(self.ref_grid, patches)
        self.latent_size = self.queries = self.num_steps = self.record_idx = None
        self.buffers = {}
        if num_steps is not None:
            self.set_num_steps(num_steps)
        if latent_size is not None:
            self.set_latent_size(latent_size)

    def set_num_steps(self, num_steps):
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        if self.time_groups > num_steps:
            raise ValueError(f"time_groups={self.time_groups} is more than the {num_steps} steps")
        self.num_steps = num_steps

    def set_latent_size(self, size):
        """Fix the latent (h, w); query probes are built on it. It may not change afterwards."""
        size = _pair(size, "latent size (h, w)")
        if self.latent_size is not None and size != self.latent_size:
            raise ValueError(f"the latent size changed from {self.latent_size} to {size} during the "
                             "trace; trace one resolution at a time")
        if self.latent_size is None:
            self.latent_size = size
            self.queries = query_probes(size, self.mask, self.points, self.boxes)

    def selected(self, name, grid):
        """Whether layer `name` with grid (h_l, w_l) is recorded: `layers` holds fnmatch name
        patterns and/or (h_l, w_l) resolutions (None: every layer)."""
        return layer_selected(name, grid, self.layers)

    def record(self, layer, q, k, v, *, step, scale=None, grid=None, cfg=None):
        """Attention of one call (q (B,H,Nq,d), k, v), with its maps added to layer's buffers.

        step: the denoising step, 0 = first. grid: the layer's (h_l, w_l), default inferred
        from Nq and the latent size. cfg: whether the batch is [uncond, cond] (default: an even
        batch is). Returns the attention output (B, H, Nq, dv).
        """
        if self.latent_size is None or self.num_steps is None:
            raise ValueError("the recorder needs latent_size and num_steps before the first call")
        B, H, Nq = q.shape[:3]
        grid = layer_grid(Nq, self.latent_size) if grid is None else _pair(grid, "grid")
        if grid[0] * grid[1] != Nq:
            raise ValueError(f"layer {layer!r}: grid {grid} does not hold its Nq={Nq} queries")
        if not self.selected(layer, grid):
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        tau = self._group(step)
        rec = self._entries(B, cfg)
        buf = self._layer(layer, grid, H, k.shape[2], q.device)
        gen, ref = CONVENTIONS[self.convention]
        if buf.call is None or not buf.call.matches(q, k, v, scale):
            buf.call = prepare(q, k, v, scale=scale, ref_keys=buf.ref_idx, record=rec, key_probes=buf.key_probes,
                               query_probes=buf.query_probes, gen=(gen,), ref=(ref,), backend=self.backend)
        return buf.call(q, k, v, {f"gen_{gen}": buf.gen[:, tau], f"ref_{ref}": buf.ref[:, tau]})

    def maps(self):
        """The accumulated maps as an i2am.AttributionMaps (buffers moved to the CPU)."""
        from .maps import AttributionMaps

        if not self.buffers:
            raise ValueError("nothing was recorded: no traced cross-attention layer was called")
        layers = {name: {"gen": b.gen.cpu().reshape(*b.gen.shape[:-1], *b.grid), "ref": b.ref.cpu()}
                  for name, b in self.buffers.items()}
        return AttributionMaps(
            layers, latent_size=self.latent_size, ref_grid=self.ref_grid, convention=self.convention,
            num_steps=self.num_steps, resize=self.resize, key_labels=self.keys.labels,
            query_labels=self.queries.labels, record=self.record_idx.tolist(),
            mask=self.mask)

    def _group(self, step):
        if not isinstance(step, int) or not 0 <= step < self.num_steps:
            raise ValueError(f"step {step!r} is outside the {self.num_steps} steps of this recording "
                             "(0 = first); set num_steps to the number of denoiser calls")
        return step * self.time_groups // self.num_steps  # tau(t) = floor(t G / T), eq. 10

    def _entries(self, B, cfg):
        cfg = B % 2 == 0 if cfg is None else cfg
        if self.branch == "all" or (self.branch == "cond" and not cfg):
            rec = list(range(B))
        elif self.branch == "uncond" and not cfg:
            raise ValueError(f"branch='uncond' needs a classifier-free-guidance batch [uncond, cond]; "
                             f"this call has batch {B} without guidance")
        elif self.branch in ("cond", "uncond"):
            half = B // 2
            rec = list(range(half, B)) if self.branch == "cond" else list(range(half))
        else:
            rec = [int(i) for i in self.branch]
            if max(rec) >= B or min(rec) < -B:
                raise ValueError(f"branch indices {rec} are out of range for batch size {B}")
            rec = [i % B for i in rec]
        rec = torch.tensor(rec)
        if self.record_idx is None:
            self.record_idx = rec
        elif not torch.equal(rec, self.record_idx):
            raise ValueError(f"the recorded batch entries changed from {self.record_idx.tolist()} to "
                             f"{rec.tolist()} (batch size {B}); keep one batch size per trace")
        return rec

    def _layer(self, name, grid, heads, nk, device):
        buf = self.buffers.get(name)
        if buf is not None:
            if (buf.grid, buf.heads, buf.nk) != (grid, heads, nk) or buf.gen.device != device:
                raise ValueError(f"layer {name!r} was first called with grid {buf.grid}, {buf.heads} heads, "
                                 f"{buf.nk} keys on {buf.gen.device}; now {grid}, {heads}, {nk} on {device}")
            return buf
        nref = self.ref_grid[0] * self.ref_grid[1]
        if self.ref_keys is None:
            if nk < nref:
                raise ValueError(f"ref_grid {self.ref_grid} needs {nref} reference keys but layer {name!r} "
                                 f"has Nk={nk} keys; check ref_grid or pass ref_keys")
            ref_idx = torch.arange(nk - nref, nk)  # default: the last hI*wI keys (a CLS token first)
        else:
            ref_idx = torch.arange(nk)[self.ref_keys] if isinstance(self.ref_keys, slice) \
                else torch.as_tensor(self.ref_keys).reshape(-1)
            if ref_idx.numel() != nref:
                raise ValueError(f"ref_keys selects {ref_idx.numel()} keys of layer {name!r} but ref_grid "
                                 f"{self.ref_grid} has {nref} patches")
        G, Br = self.time_groups, self.record_idx.numel()
        Ru, Rw = len(self.keys.labels), len(self.queries.labels)
        queries = pullback(self.queries.weights, grid, self.resize)
        buf = LayerBuffers(
            grid, heads, nk, ref_idx.to(device), self.keys.weights.reshape(Ru, -1).to(device), queries.to(device),
            torch.zeros(Br, G, heads, Ru, grid[0] * grid[1], device=device),
            torch.zeros(Br, G, heads, Rw, nref, device=device))
        self.buffers[name] = buf
        return buf


def layer_selected(name, grid, spec):
    """Whether a layer matches spec: None (all), an fnmatch pattern, an (h_l, w_l) resolution,
    or a list of those."""
    if spec is None:
        return True
    items = [spec] if isinstance(spec, str) or _is_resolution(spec) else list(spec)
    for it in items:
        if isinstance(it, str) and fnmatchcase(name, it):
            return True
        if _is_resolution(it) and tuple(it) == tuple(grid):
            return True
        if not isinstance(it, str) and not _is_resolution(it):
            raise TypeError(f"layers entries must be name patterns (str) or (h_l, w_l) resolutions, got {it!r}")
    return False


def _is_resolution(x):
    return isinstance(x, tuple) and len(x) == 2 and all(isinstance(i, int) for i in x)


def _is_index_list(x):
    return isinstance(x, (list, tuple, range)) and len(x) > 0 and all(isinstance(i, int) for i in x)


def _pair(x, what):
    try:
        a, b = (int(i) for i in x)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be two integers, got {x!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{what} must be positive, got {(a, b)}")
    return a, b
