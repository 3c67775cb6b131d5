"""The recorder: time-summed, head-indexed map buffers per layer, fed one attention call at a time.

Any code can feed it (layer name, step, q, k, v) without diffusers::

    rec = Recorder(ref_grid=(16, 16), latent_size=(64, 64), num_steps=50, time_groups=5)
    out = rec.record("mid.attn2", q, k, v, step=t)      # attention output, maps accumulated
    maps = rec.maps()                                   # i2am.AttributionMaps

Per layer it keeps gen (Br, G, H, Ru, Nq) and ref (Br, G, H, Rw, |K_ref|) at the layer's own
resolution; nothing is stored per step. The protocol adds its own rows: under
"official" one key probe per context key (gen) and probes on the layer's own grid (ref).

Several references (a joint sequence [text, generated, ref_0, ref_1, ...], set_references):
the reference keys are their union, ref 0's first, and the key probes are those of
probes.reference_key_probes. A call that names its key segments (``segments``: the text keys
and the generated image's own keys of a joint sequence) is reduced over ALL its keys and also
keeps the sources: one P row per reference and per segment, the indicator of its keys.
"""
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import protocols
from .config import CONVENTIONS, TraceConfig, check_groups, pair, positive
from .finite import describe, nonfinite_groups
from .grid import layer_grid, pullback
from .kernels import prepare, query_row_range, slice_indices
from .layers import layer_selected
from .maps import AttributionMaps
from .probes import key_probes, query_probes, reference_key_probes
from .regions import shape


@dataclass
class LayerBuffers:
    grid: tuple
    heads: int
    nk: int
    ref_idx: torch.Tensor       # the keys the kernel reduces over (all keys when per-key rows are kept)
    ref_cols: torch.Tensor      # the reference keys among them, in grid order (None: no reference keys)
    key_grid: tuple             # their grid (hI_l, wI_l), None without reference keys
    per_key: int                # gen rows with one key probe per context key, after the probe rows
    key_probes: torch.Tensor    # (Ru, Kr) on the layer's device
    query_probes: torch.Tensor  # (Rw, Nq): latent probes pulled back to this layer's grid, protocol rows
    gen: torch.Tensor
    ref: torch.Tensor           # None without reference keys
    call: object = None  # the checked kernel arguments (kernels.MapsCall), reused step after step
    ref_cpu: torch.Tensor = None  # ref_idx on the CPU: per-call ref_keys are checked without a sync
    rows: object = None  # the query rows the call was prepared for
    key_grids: tuple = None     # each reference's grid, in key order (several references)
    sources: tuple = ()         # names of the source rows, the last gen rows of the P buffer
    gen_p: torch.Tensor = None  # gen_key (P) beside a gen_query buffer, for the sources


class Recorder:
    """Accumulates I2AM maps of many attention calls; see the module docstring.

    Takes an i2am.TraceConfig, or its keywords (which make one), and latent_size (h, w) when
    it is known before the first call.
    """

    def __init__(self, config=None, *, latent_size=None, **keywords):
        self.config = config = TraceConfig.of(config, **keywords)
        self.protocol = protocols.get(config.protocol)
        # ref_grid="layer": each layer's reference keys lie on its own query grid; maps
        # are resized over the key axes to the common grid ref_size (default: the largest one)
        self.layer_grids = config.layer_grids
        # ref_grid=None: the model says it (a DiT's reference tokens), through set_ref_grid
        self.ref_grid = None if self.layer_grids else config.ref_grid
        # query_region/ref_region: two rectangles of one latent grid; the maps live on them
        self.regions = config.regions
        if self.regions is not None:
            self.ref_grid = shape(self.regions.ref)
        self._region_rows = {}  # layer -> (rows, grid, reference keys, their grid) on the regions; None: untraced
        self.ref_size, self.time_groups, self.ref_keys = config.ref_size, config.time_groups, config.ref_keys
        self.branch, self.convention, self.backend = config.branch, config.convention, config.backend
        self.layers, self.resize, self.mask = config.layers, config.resize, config.mask
        self.points, self.boxes, self.patches = config.points, config.boxes, config.patches
        self.references = None  # the grids of several references (set_references)
        self.keys = None
        if self.ref_grid is not None or self.layer_grids:
            self.keys = key_probes(self.ref_grid or self.ref_size or (1, 1), _one_reference(self.patches))
        self.latent_size = self.queries = self.num_steps = self.record_idx = self._query_rows = None
        self.steps_run = 0  # 1 + the last step recorded: fewer than num_steps leaves groups empty
        self.buffers = {}
        if config.num_steps is not None:
            self.set_num_steps(config.num_steps)
        if latent_size is not None:
            self.set_latent_size(latent_size)

    def set_num_steps(self, num_steps):
        num_steps = positive(num_steps, "num_steps")
        check_groups(self.time_groups, num_steps)
        self.num_steps = num_steps

    def set_latent_size(self, size):
        """Fix the latent (h, w); query probes are built on it. It may not change afterwards."""
        size = pair(size, "latent size (h, w)")
        if self.latent_size is not None and size != self.latent_size:
            raise ValueError(f"the latent size changed from {self.latent_size} to {size} during the "
                             "trace; trace one resolution at a time")
        if self.latent_size is None:
            if self.regions is not None:
                self.regions.check(size)
            self.latent_size = size
            self.queries = query_probes(self.map_size, self.mask, self.points, self.boxes)

    @property
    def map_size(self):
        """(h, w) of the generated maps: the query region's, else the latent grid."""
        return self.latent_size if self.regions is None else shape(self.regions.query)

    def set_ref_grid(self, grid):
        """Fix the reference grid (hI, wI) of a model that says it (a DiT's reference tokens); a
        grid given before must agree."""
        grid = pair(grid, "reference grid (hI, wI)")
        if self.layer_grids:
            raise ValueError("ref_grid='layer' is for reference keys on each layer's own grid; this model's "
                             f"reference tokens form one {grid} grid: leave ref_grid out")
        if self.ref_grid is not None and grid != self.ref_grid:
            raise ValueError(f"ref_grid {self.ref_grid} was given, but the model's reference tokens form a "
                             f"{grid} grid; leave ref_grid out to use the model's")
        if self.ref_grid is None:
            self.ref_grid, self.keys = grid, key_probes(grid, _one_reference(self.patches))

    def set_references(self, grids):
        """Fix the grids [(hI_r, wI_r), ...] of the references a model says it has (one: the same
        as set_ref_grid). A ref_grid given before must be reference 0's; they may not change."""
        grids = tuple(pair(g, "reference grid (hI, wI)") for g in grids)
        if not grids:
            raise ValueError("the model call has no reference-image tokens")
        known = self.references or ((self.ref_grid,) if self.buffers else None)
        if known is not None:
            if grids != known:
                raise ValueError(f"the references changed from grids {list(known)} to {list(grids)} during the "
                                 "trace; trace one set of references at a time")
            return
        if len(grids) == 1:
            return self.set_ref_grid(grids[0])
        if self.layer_grids:
            raise ValueError("ref_grid='layer' is for reference keys on each layer's own grid; this model's "
                             f"references form the grids {list(grids)}: leave ref_grid out")
        if self.ref_grid is not None and self.ref_grid != grids[0]:
            raise ValueError(f"ref_grid {self.ref_grid} was given, but the model's first reference forms a "
                             f"{grids[0]} grid (references: {list(grids)}); leave ref_grid out to use the model's")
        self.ref_grid, self.references = grids[0], grids
        self.keys = reference_key_probes(grids, self.patches)

    def selected(self, name, grid):
        """Whether layer `name` with grid (h_l, w_l) is recorded: `layers` holds fnmatch name
        patterns and/or (h_l, w_l) resolutions (None: every layer)."""
        return layer_selected(name, grid, self.layers)

    def record(self, layer, q, k, v, *, step, scale=None, grid=None, cfg=None, query_rows=None, ref_keys=None,
               segments=None, cut=None):
        """Attention of one call (q (B,H,Nq,d), k, v), with its maps added to layer's buffers.

        step: the denoising step, 0 = first. grid: the layer's (h_l, w_l), default inferred
        from Nq and the latent size. cfg: whether the batch is [uncond, cond] (default: an even
        batch is). query_rows: a slice of Nq, the queries that form the grid (joint attention;
        default all). ref_keys: this call's reference keys (default the recorder's ref_keys); with
        several references their union, ref 0's keys first. segments: {"text": keys, "generated":
        keys} (slices or indices) of a joint sequence: the layer then also keeps the sources.
        Returns the attention output (B, H, Nq, dv) for every query.
        """
        if self.latent_size is None or self.num_steps is None:
            raise ValueError("the recorder needs latent_size and num_steps before the first call")
        if self.ref_grid is None and not self.layer_grids:
            raise ValueError("the recorder needs ref_grid (hI, wI) before the first call")
        B, H, Nq = q.shape[:3]
        rows = None if query_rows is None else query_row_range(query_rows, Nq)  # as the MapsCall keeps it
        if self.regions is not None:
            if not self._on_regions(layer, rows, grid, Nq, k.shape[2]):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)
            rows, grid, ref_keys = self._region_rows[layer][:3]
            segments = None  # the reference keys are some of the generated ones: no separate sources
        n = Nq if rows is None else rows.stop - rows.start if isinstance(rows, slice) else rows.numel()
        grid = layer_grid(n, self.latent_size) if grid is None else pair(grid, "grid")
        if grid[0] * grid[1] != n:
            raise ValueError(f"layer {layer!r}: grid {grid} does not hold its Nq={n} queries")
        if self.regions is None and not self.selected(layer, grid):
            if cut is not None:
                return cut.attention(q, k, v, scale)
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        tau = self._group(step)
        rec = self._entries(B, cfg)
        buf = self._layer(layer, grid, H, k.shape[2], q.device, ref_keys, segments)
        gen, ref = CONVENTIONS[self.convention]
        ref = (ref,) if buf.ref is not None else ()
        gens = (gen,) if buf.gen_p is None else (gen, "key")
        if cut is not None:
            return self._record_cut(layer, buf, tau, rec, cut, q, k, v, scale, rows, gens, ref)
        if buf.call is None or not buf.call.matches(q, k, v, scale) or not _same_rows(buf.rows, rows):
            buf.rows = rows
            buf.call = prepare(q, k, v, scale=scale, ref_keys=buf.ref_idx, query_rows=rows, record=rec,
                               key_probes=buf.key_probes, query_probes=buf.query_probes, gen=gens, ref=ref,
                               backend=self.backend)
        into = {f"gen_{gen}": buf.gen[:, tau]}
        if buf.gen_p is not None:
            into["gen_key"] = buf.gen_p[:, tau]
        if ref:
            into[f"ref_{ref[0]}"] = buf.ref[:, tau]
        return buf.call(q, k, v, into)

    def _record_cut(self, layer, buf, tau, rec, cut, q, k, v, scale, rows, gens, ref):
        """record() of a call whose batch entries cut.entries attend to the kept keys only: the
        kernel gets the kept keys as an index set (never an Nq x Nk mask), the maps' dropped
        reference keys carry nothing, and the uniform key probe covers the kept ones."""
        if not set(rec.tolist()) <= set(cut.entries.tolist()):
            raise ValueError(f"layer {layer!r}: i2am.ablate removes keys from batch entries {cut.entries.tolist()} "
                             f"but the trace records {rec.tolist()}: give ablate the trace's branch")
        where = torch.full((buf.nk,), -1)
        where[cut.kept] = torch.arange(cut.kept.numel())
        at = where[buf.ref_idx.cpu()]  # the kernel's reduced keys among the kept ones, -1: dropped
        live = (at >= 0).nonzero().flatten()
        if live.numel() == 0:
            raise ValueError(f"layer {layer!r}: i2am.ablate drops every reference key; keep at least one cell")
        probes = buf.key_probes[:, live.to(q.device)].clone()
        probes[0] /= probes[0].sum().clamp_min(1e-30)  # row 0 is the uniform probe: over the kept keys
        kept = cut.kept.to(q.device)
        k_kept, v_kept = k[:, :, kept], v[:, :, kept]
        call = prepare(q, k_kept, v_kept, scale=scale, ref_keys=at[live].to(q.device), query_rows=rows, record=rec,
                       key_probes=probes, query_probes=buf.query_probes, gen=gens, ref=ref, backend=self.backend)
        into = {f"gen_{gens[0]}": buf.gen[:, tau]}
        if buf.gen_p is not None:
            into["gen_key"] = buf.gen_p[:, tau]
        if ref:
            part = torch.zeros(*buf.ref.shape[:1], *buf.ref.shape[2:-1], live.numel(), device=q.device)
            into[f"ref_{ref[0]}"] = part
        out = call(q, k_kept, v_kept, into)
        if ref:
            buf.ref[:, tau].index_add_(-1, live.to(q.device), part)
        return cut.restore_others(out, q, k, v, scale)

    def maps(self):
        """The accumulated maps as an i2am.AttributionMaps (buffers moved to the CPU)."""
        if not self.buffers:
            raise ValueError("nothing was recorded: no traced cross-attention layer was called")
        layers = {}
        for name, b in self.buffers.items():
            n_src = len(b.sources)
            gen = b.gen[:, :, :, :b.gen.shape[3] - n_src]  # the source rows apart
            layers[name] = {"gen": gen.cpu().reshape(*gen.shape[:-1], *b.grid), "grid": b.grid,
                            "key_grid": b.key_grid, "per_key": b.per_key}
            if b.key_grids is not None:
                layers[name]["key_grids"] = b.key_grids
            if n_src:
                p = b.gen if b.gen_p is None else b.gen_p
                layers[name]["src"] = p[:, :, :, -n_src:].cpu().reshape(*p.shape[:3], n_src, *b.grid)
                layers[name]["sources"] = b.sources
            if b.ref is not None:
                layers[name]["ref"] = b.ref[..., b.ref_cols].cpu()  # the reference keys, in grid order
        self._warn_incomplete(layers)
        ref_grid = self.ref_grid or self.ref_size or max(
            (b.key_grid for b in self.buffers.values() if b.key_grid is not None),
            key=lambda g: g[0] * g[1], default=None)
        return AttributionMaps(
            layers, latent_size=self.map_size, ref_grid=ref_grid, convention=self.convention,
            protocol=self.protocol.name, num_steps=self.num_steps, resize=self.resize, key_labels=self.keys.labels,
            query_labels=self.queries.labels, query_rows=self._query_rows, record=self.record_idx.tolist(),
            mask=self.mask, references=self.references, regions=None if self.regions is None else {
                "latent": self.latent_size, "query": self.regions.query, "ref": self.regions.ref})

    def _on_regions(self, layer, rows, grid, nq, nk):
        """Whether a layer call on the regions is recorded (layers= selects by name or by the
        layer's whole token grid); its (query rows, their grid, reference keys, their grid) in
        self._region_rows: the scaled rectangles of the layer's token grid, whose tokens are
        `rows` (all queries when None), and the keys at the same positions (self-attention)."""
        if layer not in self._region_rows:
            tokens = torch.arange(nq)[slice(None) if rows is None else rows]
            grid = layer_grid(tokens.numel(), self.latent_size) if grid is None else pair(grid, "grid")
            if not self.selected(layer, grid):
                self._region_rows[layer] = None
                return False
            if grid[0] * grid[1] != tokens.numel() or nk != nq:
                raise ValueError(f"layer {layer!r}: query_region/ref_region need self-attention over one token grid "
                                 f"(the keys the same tokens as the queries); it has {tokens.numel()} image "
                                 f"queries on grid {grid} and {nk} keys for {nq} queries")
            q_idx, q_grid, k_idx, k_grid = self.regions.on_layer(layer, grid, self.latent_size)
            self._region_rows[layer] = (query_row_range(tokens[q_idx], nq), q_grid, tokens[k_idx], k_grid)
        return self._region_rows[layer] is not None

    def _warn_incomplete(self, layers):
        """Warnings for what the maps cannot show: steps that did not run, non-finite values."""
        T, G = self.num_steps, self.time_groups
        if self.steps_run < T:
            empty = [g for g in range(G) if g > (self.steps_run - 1) * G // T]
            warnings.warn(f"only {self.steps_run} of the num_steps={T} declared denoiser steps ran"
                          + (f": time groups {', '.join(map(str, empty))} are empty" if empty else "")
                          + "; set num_steps to the number of denoiser calls", stacklevel=3)
        bad = nonfinite_groups(layers)
        if bad:
            warnings.warn(f"non-finite values (NaN or inf) entered the maps of {describe(bad, T, G)}; maps "
                          "integrated over them are errors: leave those layers out with layers=",
                          RuntimeWarning, stacklevel=3)

    def _group(self, step):
        if not isinstance(step, int) or not 0 <= step < self.num_steps:
            raise ValueError(f"step {step!r} is outside the {self.num_steps} steps of this recording "
                             "(0 = first); set num_steps to the number of denoiser calls")
        self.steps_run = max(self.steps_run, step + 1)
        return step * self.time_groups // self.num_steps  # tau(t) = floor(t G / T), eq. 10

    def _entries(self, B, cfg):
        rec = torch.tensor(batch_entries(self.branch, B, cfg))
        if self.record_idx is None:
            self.record_idx = rec
        elif not torch.equal(rec, self.record_idx):
            raise ValueError(f"the recorded batch entries changed from {self.record_idx.tolist()} to "
                             f"{rec.tolist()} (batch size {B}); keep one batch size per trace")
        return rec

    def _layer(self, name, grid, heads, nk, device, call_ref_keys=None, segments=None):
        buf = self.buffers.get(name)
        if buf is not None:
            if (buf.grid, buf.heads, buf.nk) != (grid, heads, nk) or buf.gen.device != device:
                raise ValueError(f"layer {name!r} was first called with grid {buf.grid}, {buf.heads} heads, "
                                 f"{buf.nk} keys on {buf.gen.device}; now {grid}, {heads}, {nk} on {device}")
            if call_ref_keys is not None and (buf.ref_cpu is None
                                              or not torch.equal(_key_indices(call_ref_keys, nk), buf.ref_cpu)):
                raise ValueError(f"layer {name!r}: this call's ref_keys differ from its first call's")
            return buf
        ref_cols, key_grid = self._reference_keys(name, grid, nk, call_ref_keys)
        ref_cpu = None if ref_cols is None else ref_cols.long()
        G, Br = self.time_groups, self.record_idx.numel()
        # the probe rows of the user's probes, over the reference keys on the layer's key grid
        if ref_cols is None:
            keys = torch.zeros(0, nk)
        elif key_grid == self.keys.weights.shape[-2:] or not (self.layer_grids or self.regions):
            keys = self.keys.weights.reshape(len(self.keys.labels), -1)
        else:  # uniform over the layer's own keys; patches pulled back through the key-axis resize
            keys = torch.full((1, ref_cols.numel()), 1.0 / ref_cols.numel())
            if len(self.keys.labels) > 1:
                keys = torch.cat([keys, pullback(self.keys.weights[1:], key_grid, self.resize)])
        # per-key rows cost Nk x Nq per head and group: kept on context layers, never on layers whose
        # keys lie on their own grid (Nk = Nq there; the official M_g does not read them)
        per_key = nk if self.protocol.per_key_rows and not (self.layer_grids and ref_cols is not None) else 0
        sources = ()
        if per_key or segments is not None:  # probes over all keys: per key (CLS included), or the sources
            ref_idx = torch.arange(nk)
            spread = torch.zeros(keys.shape[0], nk)
            if ref_cols is not None:
                spread[:, ref_cols] = keys
            keys = torch.cat([spread, torch.eye(nk)]) if per_key else spread
            if segments is not None:  # the sources: the indicator of each reference's and segment's keys
                sources, rows = self._source_rows(name, nk, ref_cols, segments)
                keys = torch.cat([keys, rows])
        else:
            ref_idx, ref_cols = ref_cols, None if ref_cols is None else torch.arange(ref_cols.numel())
        labels, extra = self.protocol.layer_query_rows(self.queries.labels, self.map_size, grid)
        queries = torch.cat([pullback(self.queries.weights, grid, self.resize), extra])
        self._query_rows = self.queries.labels + labels
        with torch.inference_mode(False):  # normal tensors: a later step outside inference_mode adds into them
            buf = LayerBuffers(
                grid, heads, nk, ref_idx.to(device), ref_cols, key_grid, per_key, keys.to(device), queries.to(device),
                torch.zeros(Br, G, heads, keys.shape[0], grid[0] * grid[1], device=device),
                None if ref_cols is None else torch.zeros(Br, G, heads, queries.shape[0], ref_idx.numel(),
                                                          device=device),
                ref_cpu=ref_cpu, key_grids=self.references, sources=sources)
            if sources and CONVENTIONS[self.convention][0] != "key":  # the sources are P: a gen_key buffer beside
                buf.gen_p = torch.zeros_like(buf.gen)
        self.buffers[name] = buf
        return buf

    def _reference_keys(self, name, grid, nk, call_ref_keys=None):
        """(indices of the reference keys in grid order, their grid) of a layer with nk keys, by the
        fit rule: hI*wI keys, or a leading CLS token and hI*wI keys; else ref_keys (this
        call's, else the recorder's)."""
        key_grid = grid if self.layer_grids else self._region_rows[name][3] if self.regions else self.ref_grid
        nref = sum(h * w for h, w in self.references) if self.references else key_grid[0] * key_grid[1]
        ref_keys = self.ref_keys if call_ref_keys is None else call_ref_keys
        if ref_keys is not None:
            idx = _key_indices(ref_keys, nk)
            if idx.numel() != nref:
                grids = f"reference grids {list(self.references)}" if self.references else f"reference grid {key_grid}"
                raise ValueError(f"ref_keys selects {idx.numel()} keys of layer {name!r} but its {grids} "
                                 f"{'have' if self.references else 'has'} {nref} patches")
            return idx, key_grid
        if nk in (nref, nref + 1):
            return torch.arange(nk - nref, nk), key_grid
        if self.layer_grids and self.protocol.context_layers:
            return None, None  # a context-only layer (StableVITON's one-token attn2): generated map only
        tried = "the layer's own grid" if self.layer_grids else "ref_grid"
        raise ValueError(f"layer {name!r} has Nk={nk} keys, which fit neither {nref} nor {nref + 1} (a CLS token "
                         f"first) keys of {tried} {key_grid[0]}x{key_grid[1]}; pass ref_keys= to select its "
                         "reference keys, ref_grid='layer' when they lie on each layer's own grid, or layers= "
                         "to leave this layer out")


    def _source_rows(self, name, nk, ref_cols, segments):
        """(names, (S, nk) indicator rows) of the sources: each reference, then "text" and "generated"."""
        sizes = [h * w for h, w in (self.references or (self.ref_grid,))]
        names, parts = [], []
        for r, n in enumerate(sizes):
            names.append(f"ref{r}")
            parts.append(ref_cols[sum(sizes[:r]):sum(sizes[:r]) + n])
        for seg in ("text", "generated"):
            names.append(seg)
            parts.append(_key_indices(segments[seg], nk))
        rows = torch.zeros(len(parts), nk)
        for i, idx in enumerate(parts):
            rows[i, idx] = 1.0
        if (rows.sum(0) > 1).any():
            raise ValueError(f"layer {name!r}: the text, generated and reference key segments overlap")
        return tuple(names), rows


def _one_reference(patches):
    """(i, j) patches of a one-reference model: (0, i, j) is (i, j); another reference is an error."""
    out = []
    for p in patches:
        if len(p) == 3:
            if p[0] != 0:
                raise ValueError(f"patch {p} names reference {p[0]}, but the model has one reference (0)")
            p = p[1:]
        out.append(p)
    return tuple(out)


def batch_entries(branch, B, cfg):
    """The batch entries of a call that `branch` selects ("cond", "uncond", "all" or indices); cfg:
    whether the batch is [uncond, cond] (None: an even batch is)."""
    cfg = B % 2 == 0 if cfg is None else cfg
    if branch == "all" or (branch == "cond" and not cfg):
        return list(range(B))
    if branch == "uncond" and not cfg:
        raise ValueError(f"branch='uncond' needs a classifier-free-guidance batch [uncond, cond]; "
                         f"this call has batch {B} without guidance")
    if branch in ("cond", "uncond"):
        half = B // 2
        return list(range(half, B)) if branch == "cond" else list(range(half))
    rec = [int(i) for i in branch]
    if max(rec) >= B or min(rec) < -B:
        raise ValueError(f"branch indices {rec} are out of range for batch size {B}")
    return [i % B for i in rec]


def _key_indices(ref_keys, nk):
    """ref_keys (a slice or indices into the nk keys) as an int64 CPU tensor."""
    if isinstance(ref_keys, slice):
        return slice_indices(ref_keys, nk)
    return torch.as_tensor(ref_keys).reshape(-1).long().cpu()


def _same_rows(a, b):
    """Whether two query-row selections are the same: equal slices, or one index tensor."""
    return a is b or (isinstance(a, slice) and a == b)
