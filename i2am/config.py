"""i2am.TraceConfig: every setting of a trace in one frozen object, checked once when it is made.

    config = i2am.TraceConfig(ref_grid=(16, 16), time_groups=5, mask=mask, points=[(20, 30)])
    with i2am.trace(pipe, config) as tc:          # the same as i2am.trace(pipe, ref_grid=(16, 16), ...)
        image = pipe(...).images[0]

The trace, the recording and the Recorder take a config (or the same keywords, which make
one), so a setting is written once and a bad one is an error naming it before any model work.
"""
import dataclasses
from dataclasses import dataclass

import torch

from . import protocols
from .grid import RESIZE_MODES
from .inputs import InputError, arg
from .integers import as_int, int_tuple, int_tuples
from .kernels import BACKENDS
from .layers import check_layers
from .probes import mask_2d
from .regions import Regions, regions_of

CONVENTIONS = {"official": ("query", "key"), "paper": ("key", "query")}  # (gen softmax, ref softmax)
BRANCHES = ("cond", "uncond", "all")
ATTENTIONS = ("cross", "self")  # a UNet's attn2 or attn1 layers


@dataclass(frozen=True, eq=False)
class TraceConfig:
    """The settings of one trace (see i2am.trace for what each means).

    Checked and normalised when made: grids and probes become tuples of ints, the mask a 0/1
    float (H, W) tensor, and ``convention=None`` the protocol's own convention (an explicit
    one must be one the protocol accepts). ``replace(**changes)`` returns a checked copy.
    """
    ref_grid: object = None       # (hI, wI), "layer", or None: the model says it (DiTs)
    ref_keys: object = None       # slice or indices of the reference keys
    time_groups: int = 1
    branch: object = "cond"       # "cond", "uncond", "all" or batch indices
    mask: object = None           # the inpainting mask, any size
    points: tuple = ()            # latent (row, col)
    boxes: tuple = ()             # latent (top, left, bottom, right), end-exclusive
    patches: tuple = ()           # reference-grid (i, j), or (r, i, j) of reference r of several
    num_steps: int = None         # None: read from the pipeline's scheduler
    layers: object = None         # name patterns and/or (h_l, w_l) resolutions
    convention: str = None        # None: the protocol's
    protocol: str = "paper"
    ref_size: tuple = None        # the common grid of ref_grid="layer"
    backend: str = "auto"
    resize: str = "bicubic"
    cfg: bool = None              # None: from the pipeline, else an even batch is [uncond, cond]
    query_region: tuple = None    # (top, left, bottom, right) of the generated part of the latent grid
    ref_region: tuple = None      # (top, left, bottom, right) of the reference part of the same grid
    attention: str = "cross"      # a UNet's "cross" (attn2) or "self" (attn1) attention layers

    def __post_init__(self):
        put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731 (frozen)
        protocol = protocols.get(self.protocol)
        convention = protocol.convention if self.convention is None else self.convention
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {tuple(CONVENTIONS)} or None (the protocol's), "
                             f"got {convention!r}")
        protocol.check(convention)
        put("convention", convention)
        ref_grid = self.ref_grid
        layer_grids = isinstance(ref_grid, str) and ref_grid == "layer"
        if isinstance(ref_grid, str) and not layer_grids:
            raise ValueError(f"ref_grid must be (hI, wI) or 'layer', got {ref_grid!r}")
        if ref_grid is not None and not layer_grids:
            put("ref_grid", pair(ref_grid, "ref_grid (hI, wI)"))
        regions = regions_of(self.query_region, self.ref_region)
        if regions is not None:
            if ref_grid is not None or self.ref_keys is not None or self.ref_size is not None:
                raise InputError(f"{arg('ref_region')} gives the reference keys and their grid; leave ref_grid, "
                                 "ref_keys and ref_size out")
            if protocol.per_key_rows:
                raise InputError(f"{arg('query_region')}/{arg('ref_region')} are defined under protocol 'paper'; "
                                 f"protocol {self.protocol!r} reproduces the authors' cross-attention code")
            put("query_region", regions.query)
            put("ref_region", regions.ref)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.ref_size is not None:
            if not layer_grids:
                raise ValueError("ref_size sets the common grid of ref_grid='layer'; with a fixed ref_grid the maps "
                                 "are on ref_grid itself: leave ref_size out")
            put("ref_size", pair(self.ref_size, "ref_size (hI, wI)"))
        if layer_grids and self.patches and self.ref_size is None:
            raise ValueError("patches with ref_grid='layer' need ref_size=(hI, wI), the common grid the patches "
                             "are given on")
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {RESIZE_MODES}, got {self.resize!r}")
        check_branch(self.branch)
        put("time_groups", positive(self.time_groups, "time_groups"))
        if self.num_steps is not None:
            put("num_steps", positive(self.num_steps, "num_steps"))
            check_groups(self.time_groups, self.num_steps)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        check_layers(self.layers)
        if self.mask is not None:
            put("mask", mask_2d(self.mask))
        put("points", int_tuples(self.points, 2, "points", "(row, col) pairs", "point (row, col)"))
        put("boxes", int_tuples(self.boxes, 4, "boxes", "(top, left, bottom, right) tuples",
                                "box (top, left, bottom, right)"))
        put("patches", _patches(self.patches))
        if self.cfg is not None and not isinstance(self.cfg, bool):
            raise TypeError(f"cfg must be True, False or None (the pipeline says it), got {self.cfg!r}")

    @classmethod
    def of(cls, config=None, **keywords):
        """`config` with `keywords` changed, or a config made of the keywords."""
        if config is None:
            return cls(**keywords)
        if not isinstance(config, cls):
            raise TypeError(f"config must be an i2am.TraceConfig, got {type(config).__name__}")
        return config.replace(**keywords) if keywords else config

    def replace(self, **changes):
        """A checked copy with `changes`."""
        return dataclasses.replace(self, **changes)

    @property
    def regions(self):
        """The query and reference rectangles of one latent grid (i2am.regions), or None."""
        return None if self.query_region is None else Regions(self.query_region, self.ref_region)

    @property
    def layer_grids(self):
        """ref_grid="layer": each layer's reference keys lie on its own query grid."""
        return isinstance(self.ref_grid, str)


def positive(x, what):
    try:
        n = as_int(x, what)
    except TypeError:
        n = 0
    if n < 1:
        raise ValueError(f"{what} must be a positive integer, got {x!r}")
    return n


def check_groups(time_groups, num_steps):
    """The time groups of a run fit its steps: one group holds at least one step."""
    if time_groups > num_steps:
        raise InputError(f"{arg('time_groups')}={time_groups} is more than the {num_steps} steps")


def pair(x, what):
    try:
        a, b = int_tuple(x, 2, what)
    except (TypeError, ValueError):
        raise TypeError(f"{what} must be two integers, got {x!r}") from None
    if a < 1 or b < 1:
        raise ValueError(f"{what} must be positive, got {(a, b)}")
    return a, b


def check_branch(branch):
    """The batch-entry rule's argument (trace's and ablate's branch=): "cond", "uncond", "all" or a
    non-empty list of batch indices."""
    if not (branch in BRANCHES or _is_index_list(branch)):
        raise ValueError(f"branch must be one of {BRANCHES} or a list of batch indices, got {branch!r}")


def _is_index_list(x):
    return isinstance(x, (list, tuple, range)) and len(x) > 0 and all(
        isinstance(i, int) and not isinstance(i, bool) for i in x)


def _patches(patches):
    """patches as (i, j) pairs (one reference) or (r, i, j) triples (several references)."""
    if isinstance(patches, torch.Tensor):
        patches = patches.tolist()
    items = list(patches) if isinstance(patches, (list, tuple)) else patches
    if isinstance(items, list) and any(isinstance(p, (list, tuple)) and len(p) == 3 for p in items):
        # beside (r, i, j) triples, an (i, j) pair is reference 0's
        items = [(0, *p) if isinstance(p, (list, tuple)) and len(p) == 2 else p for p in items]
        return int_tuples(items, 3, "patches", "(r, i, j) triples", "patch (r, i, j)")
    return int_tuples(items, 2, "patches", "(i, j) pairs or (r, i, j) triples", "patch (i, j)")
