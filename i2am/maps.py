"""AttributionMaps: integration of the recorded buffers into I2AM maps (docs/maps.md)."""
import json
from pathlib import Path

import torch

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import display, protocols
from .finite import describe, nonfinite_groups
from .grid import resize
from .integers import as_int
from .layers import layer_selected
from .probes import mask_2d, probe_row, reference_patch

BY = (None, "time", "head")
ROW_CHUNK = 32  # gen rows resized together when a map averages many (official M_g: one per context key)


class AttributionMaps:
    """Time-summed, head-indexed map buffers of a trace, and the maps integrated from them.

    layers: {name: {"gen": (Br, G, H, Ru, h_l, w_l), "ref": (Br, G, H, Rw, hI_l*wI_l), "grid": (h_l, w_l),
    "key_grid": (hI_l, wI_l) or None, "per_key": n, ["key_grids": [(hI_r, wI_r), ...], "src": (Br, G, H, S,
    h_l, w_l), "sources": names]}} float32: gen rows are the key probes
    (key_labels, when the layer has reference keys) then n rows of one key probe per context key;
    ref rows are query_rows; a layer without reference keys has no "ref". Every map method takes
    by, layers and normalize as keywords, in that order, and returns (h, w) or (hI, wI) maps, with
    (G, ...) for by="time", (N, ...) for by="head", and a leading batch axis when more than one
    image was recorded. `protocol` ("paper" or "official") decides
    the default layer sets, the rows each map reads, the display and IMACS (i2am.protocols).
    `regions` ({"latent": (h, w), "query": (t, l, b, r), "ref": (t, l, b, r)}, traced with
    query_region/ref_region): where the generated and the reference maps lie in the one latent
    grid; the maps have those rectangles' shapes.

    Several references (`references`: one grid each, ref 0 first; the "ref" buffer's keys are
    their union in that order): ref= picks one on every map; "src" holds the sources, P summed
    over the keys of each reference and of the text and generated segments (sources()).
    """

    def __init__(self, layers, *, latent_size, ref_grid, convention, num_steps, resize, key_labels,
                 query_labels, record, mask=None, protocol="paper", query_rows=None, settings=None, references=None,
                 regions=None):
        self.latent_size = tuple(latent_size)
        self.ref_grid = None if ref_grid is None else tuple(ref_grid)
        if references is not None:
            self._references = tuple(tuple(g) for g in references)
        else:
            self._references = () if self.ref_grid is None else (self.ref_grid,)
        self.convention, self.num_steps, self.resize = convention, num_steps, resize
        self.key_labels, self.query_labels = tuple(key_labels), tuple(query_labels)
        self.query_rows = self.query_labels if query_rows is None else tuple(query_rows)
        self.record, self.mask = list(record), mask
        self.layers = {name: _layer(lay, self.ref_grid) for name, lay in layers.items()}
        self.regions = None if regions is None else {k: tuple(v) for k, v in regions.items()}
        self.settings = dict(settings or {})  # free-form run settings (pipeline, model, steps, seed...)
        self.time_groups = next(iter(layers.values()))["gen"].shape[1]
        self._protocol = protocols.get(protocol)

    @property
    def protocol(self):
        """The protocol ("paper" or "official") the maps are read under."""
        return self._protocol.name

    @property
    def references(self):
        """((hI_0, wI_0), ...): the grid of each reference, ref 0 first (one for one-reference models)."""
        return self._references

    def with_protocol(self, protocol):
        """The same buffers read under another protocol, where they hold what it needs (maps
        traced under "official" also hold everything "paper" reads when every layer has
        reference keys); otherwise an error: trace once per protocol."""
        target = protocols.get(protocol)
        missing = []
        if target.per_key_rows and not any(lay["per_key"] for lay in self.layers.values()):
            missing.append("one key probe per context key")
        labels, _ = target.layer_query_rows(self.query_labels, self.latent_size, (1, 1))
        missing += [str(lab) for lab in labels if lab not in self.query_rows]
        if not target.context_layers:
            missing += [f"reference keys of layer {n!r}" for n, lay in self.layers.items() if lay["key_grid"] is None]
        if missing:
            raise ValueError(f"maps traced under protocol={self.protocol!r} cannot be read under {protocol!r}: "
                             f"they lack {', '.join(missing)}; trace with protocol={protocol!r}")
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__, _protocol=target)
        return other

    # ---- maps ----------------------------------------------------------------------------
    def generated(self, *, by=None, layers=None, normalize=True, ref=None):
        """M_g (eq. 5; by="time" eq. 10, by="head" eq. 11): where the generated image draws on
        the reference, (h, w) at latent resolution. Under "official" the mean over all context
        keys of each key's map, resized and clamped one key at a time (never inverted here).
        ref: None, the uniform probe over every reference's keys; r, over reference r's only."""
        names = self._names(layers, by, "generated")
        label = self._ref_label(ref)
        if label == ("uniform",):
            rows = {n: self._protocol.generated_rows(self, n) for n in names}
        else:
            rows = {n: [self._key_row(n, label)] for n in names}
        return self._generated(rows, by, normalize)

    def specific_generated(self, patch, *, by=None, layers=None, normalize=True):
        """Where reference patch (i, j) (traced with patches=) is used in the generated image;
        with several references the patch is (r, i, j) ((i, j): reference 0)."""
        names = self._names(layers, by, "specific_generated")
        r, i, j = reference_patch(patch, self.references)
        label = ("patch", (i, j)) if len(self.references) == 1 else ("patch", (r, i, j))
        return self._generated({n: [self._key_row(n, label)] for n in names}, by, normalize)

    def reference(self, *, by=None, layers=None, normalize=True, masked=False, ref_mask=None, ref=0):
        """M_r (eq. 13; by="time"/"head" as above; masked=True is eq. 17 with the traced
        inpainting mask): which patches of reference `ref` are drawn on, (hI, wI). ref_mask: the
        reference (cloth) mask, any size: the map is multiplied by it, resized bicubic to the
        reference grid (the official protocol's masked reference map)."""
        label = self._protocol.query_label(("mask",) if masked else ("uniform",))
        M = self._reference(label, self._names(layers, by, "reference"), by, normalize and ref_mask is None, ref)
        if ref_mask is None:
            return M
        M = M * resize(mask_2d(ref_mask).double(), self.references[ref], "bicubic").float()
        return display.normalize(M) if normalize else M

    def specific_reference(self, point_or_box, *, by=None, layers=None, normalize=True, ref=0):
        """M_sr (eq. 16): the patches of reference `ref` one traced latent point (row, col) or box
        (top, left, bottom, right) looked at, (hI, wI)."""
        p = tuple(as_int(x, "point_or_box") for x in point_or_box)
        label = self._protocol.query_label(("point" if len(p) == 2 else "box", p))
        return self._reference(label, self._names(layers, by, "specific_reference"), by, normalize, ref)

    def sources(self, *, by=None, all_keys=False, layers=None):
        """{"ref0": (h, w), "ref1": ..., ["text", "generated"]}: the share of each reference in the
        attention of each generated position, A_r / sum_r' A_r' with A_r the attention (P) on
        reference r's keys, integrated like M_g (0 where the sum is 0). all_keys=True adds the text
        keys and the generated image's own keys; the shares then sum to 1 over every key. A
        layer traced without sources (a UNet's cross-attention: its one reference is all of its
        reference attention) gives share 1 to ref0 wherever its M_g is positive."""
        names = self._names(layers, by, "generated")
        missing = [n for n in names if "src" not in self.layers[n]]
        if missing and (all_keys or len(self.references) > 1):
            raise ValueError(f"layers {missing} were traced without the attention on each key segment (text, "
                             "generated, references), which joint-attention models record: sources(all_keys=True) "
                             "needs them; leave those layers out with layers=")
        if missing:
            A = self.generated(by=by, layers=layers, normalize=False)
            return {"ref0": (A > 0).float()}
        kinds = self.layers[names[0]]["sources"]
        if any(self.layers[n]["sources"] != kinds for n in names):
            raise ValueError(f"the selected layers keep different sources: select layers that share them")
        keep = list(range(len(kinds))) if all_keys else [i for i, k in enumerate(kinds) if k.startswith("ref")]
        total = 0
        for n in names:
            src = self.layers[n]["src"][:, :, :, keep].double()  # (Br, G, H, S, h_l, w_l)
            if by != "time":
                src = src.sum(1, keepdim=True)
            src = resize(src, self.latent_size, self.resize).clamp_min(0)
            total = total + (src if by == "head" else src.sum(2, keepdim=True)) / src.shape[2]
        total = total / len(names)  # (Br, G|1, H|1, S, h, w)
        share = total / total.sum(3, keepdim=True)
        share = torch.where(total.sum(3, keepdim=True) > 0, share, torch.zeros_like(share)).float()
        share = share[:, :, 0] if by == "time" else share[:, 0]
        if by is None:
            share = share[:, 0]
        share = share[0] if share.shape[0] == 1 else share  # (..., S, h, w)
        return {kinds[i]: share.select(-3, s) for s, i in enumerate(keep)}

    def top_patches(self, k, *, of="reference", masked=False, ref=0):
        """The k reference cells (i, j) ranked highest by M_r (of="reference"; the inpainting-mask
        probe with masked=True) or by the M_sr of a traced point or box (of=(row, col) or
        (top, left, bottom, right)), of reference `ref`, highest first, ties in row-major order."""
        if isinstance(of, str):
            if of != "reference":
                raise ValueError(f"of must be 'reference' or a traced point or box, got {of!r}")
            M = self.reference(masked=masked, normalize=False, ref=ref)
        else:
            M = self.specific_reference(of, normalize=False, ref=ref)
        if M.dim() != 2:
            raise ValueError("top_patches ranks the maps of one recorded image; these hold several (trace one "
                             "branch, or use maps.reference(...)[b])")
        k = as_int(k, "k")
        if not 1 <= k <= M.numel():
            raise ValueError(f"k must be between 1 and the {M.numel()} reference cells, got {k}")
        if not torch.isfinite(M).all():
            raise ValueError("the map holds non-finite values; its cells cannot be ranked")
        order = torch.sort(M.flatten(), descending=True, stable=True).indices[:k]  # stable: ties row-major
        return [divmod(int(i), M.shape[1]) for i in order]

    def imacs(self, ref_mask=None, gen_mask=None, lam=3.0, threshold=None, ref=0):
        """IMACS under the maps' protocol: {"gen": IMACS_g} against gen_mask (default the traced
        mask), and "ref": IMACS_r against ref_mask when it is given. Maps are taken to each mask's
        size at pixel level before scoring. threshold: the reference-side display threshold
        (default 0.4; "paper" applies it to both maps, "official" cuts M_g at 0.6). ref: the
        reference both maps are of (with one reference, 0: its maps). A score of a constant map (a
        1x1 reference grid: one reference token) is undefined: None, and "undefined" then maps its
        key to the reason."""
        if gen_mask is None:
            if self.mask is None:
                raise ValueError("imacs needs gen_mask, or a trace with mask=")
            gen_mask = self.mask
        self._ref_index(ref)
        return self._protocol.imacs(self, ref_mask, gen_mask, lam, threshold, ref)

    def _ref_index(self, ref):
        """ref checked: an integer naming one of the references."""
        r = as_int(ref, "ref")
        if not 0 <= r < len(self.references):
            raise ValueError(f"ref={ref!r}: the maps have {len(self.references)} reference(s), "
                             f"0..{len(self.references) - 1}")
        return r

    def _ref_label(self, ref):
        """The key probe of M_g of reference `ref` (None: the uniform probe over all references)."""
        if ref is None or len(self.references) == 1 and self._ref_index(ref) == 0:
            return ("uniform",)
        return ("ref", self._ref_index(ref))

    def _key_row(self, name, label):
        """The gen row of key probe `label` in layer `name`."""
        if self.layers[name]["key_grid"] is None:
            raise ValueError(f"layer {name!r} has no reference keys (its key count fits no reference grid): "
                             "only its generated map over all context keys exists; leave it out with layers=")
        return probe_row(self.key_labels, label)

    def _per_key_rows(self, name):
        """The gen rows of layer `name` with one key probe per context key (protocol 'official')."""
        lay = self.layers[name]
        if not lay["per_key"]:
            raise ValueError(f"layer {name!r} has no per-key maps (they are recorded under protocol='official', "
                             "on layers whose keys are not on their own grid); leave it out with layers=")
        start = len(self.key_labels) if lay["key_grid"] is not None else 0
        return range(start, start + lay["per_key"])

    # ---- integration ---------------------------------------------------------------------
    def _generated(self, rows, by, normalize):
        """rows: {layer: gen rows}; per layer each row's map is resized to the latent grid and
        clamped at 0, then the rows are averaged (one row: the map itself)."""
        total = 0
        for name, r in rows.items():
            gen, r = self.layers[name]["gen"], list(r)
            g = 0
            for i in range(0, len(r), ROW_CHUNK):  # the official per-key rows: a bounded resize at a time
                chunk = gen[:, :, :, r[i:i + ROW_CHUNK]].double()  # (Br, G, H, R, h_l, w_l)
                if by != "time":
                    chunk = chunk.sum(1, keepdim=True)  # sum over time groups before the resize (eq. 5)
                g = g + resize(chunk, self.latent_size, self.resize).clamp_min(0).sum(3)
            g = g / len(r)
            total = total + (g if by == "head" else g.sum(2, keepdim=True)) / gen.shape[2]
        return self._finish(total, by, len(rows), normalize)

    def _reference(self, label, names, by, normalize, ref=0):
        ref = self._ref_index(ref)
        row = probe_row(self.query_rows, label)
        total = 0
        for name in names:
            lay = self.layers[name]
            if "ref" not in lay:
                self._key_row(name, ("uniform",))  # the error naming the layer
            heads = lay["ref"].shape[2]
            grids = lay.get("key_grids") or (lay["key_grid"],)
            start = sum(h * w for h, w in grids[:ref])
            r = lay["ref"][:, :, :, row, start:start + grids[ref][0] * grids[ref][1]].double()  # (Br, G, H, K_r)
            if by != "time":
                r = r.sum(1, keepdim=True)
            r = r.reshape(*r.shape[:-1], *grids[ref])
            if grids[ref] != self.references[ref]:  # a layer's own key grid: to the common grid (ref_grid='layer')
                r = resize(r, self.references[ref], self.resize).clamp_min(0)
            total = total + (r if by == "head" else r.sum(2, keepdim=True)) / heads
        return self._finish(total, by, len(names), normalize)

    @staticmethod
    def _finish(total, by, n_layers, normalize):
        """(Br, G or 1, H or 1, a, b) summed over layers -> mean over layers, squeezed, normalised."""
        total = total / n_layers
        total = total[:, :, 0] if by == "time" else total[:, 0]
        if by is None:
            total = total[:, 0]
        total = total.float()
        if normalize:
            total = display.normalize(total)
        return total[0] if total.shape[0] == 1 else total

    def _names(self, layers, by, kind):
        """The layers a map integrates: `layers` exactly, else the protocol's default set."""
        if by not in BY:
            raise ValueError(f"by must be one of {BY}, got {by!r}")
        names = self._select(layers) if layers is not None else self._protocol.default_layers(self, kind, by)
        bad = nonfinite_groups({n: self.layers[n] for n in names})
        if bad:
            where = describe(bad, self.num_steps, self.time_groups)
            raise ValueError(f"cannot integrate non-finite (NaN or inf) buffers of {where}; leave those layers "
                             "out with layers=")
        heads = {self.layers[n]["gen"].shape[2] for n in names}
        if by == "head" and len(heads) > 1:
            raise ValueError(f"by='head' needs layers with one head count; the selected layers have "
                             f"{sorted(heads)} heads: select layers that share one")
        return names

    def _select(self, layers=None):
        """Names of the traced layers matching `layers` (fnmatch patterns and/or (h_l, w_l))."""
        names = [n for n, lay in self.layers.items() if layer_selected(n, lay["grid"], layers)]
        if not names:
            raise ValueError(f"layers={layers!r} matches none of the traced layers: {list(self.layers)}")
        return names

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path, settings=None):
        """Save buffers and settings to a safetensors file (settings in its metadata); `settings`
        (JSON-ready values, e.g. the pipeline call's) are stored beside self.settings and come
        back as AttributionMaps.load(path).settings."""
        tensors = {f"{kind}/{name}": lay[kind].contiguous() for name, lay in self.layers.items()
                   for kind in ("gen", "ref", "src") if kind in lay}
        if self.mask is not None:
            tensors["mask"] = self.mask.float().contiguous()
        meta = {"latent_size": self.latent_size, "ref_grid": self.ref_grid, "convention": self.convention,
                "protocol": self.protocol, "num_steps": self.num_steps, "resize": self.resize,
                "key_labels": self.key_labels, "query_labels": self.query_labels, "query_rows": self.query_rows,
                "record": self.record, "layers": list(self.layers), "references": self.references,
                "regions": self.regions,
                "layer_grids": {n: {k: lay[k] for k in ("grid", "key_grid", "per_key", "key_grids", "sources")
                                    if k in lay} for n, lay in self.layers.items()},
                "settings": {**self.settings, **(settings or {})}}
        save_file(tensors, str(path), metadata={"i2am": json.dumps(meta)})

    @classmethod
    def load(cls, path):
        """Load maps written by save(); a file that is not one is a ValueError naming its path."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"no i2am maps file at {path}")
        try:
            with safe_open(str(path), "pt") as f:  # one read: the metadata and the tensors
                meta = (f.metadata() or {}).get("i2am")
                tensors = {name: f.get_tensor(name) for name in f.keys()}
            if meta is None:
                raise ValueError("no 'i2am' metadata")
            meta = json.loads(meta)
            grids = meta.pop("layer_grids", {})
            layers = {}
            for n in meta.pop("layers"):
                grid = grids.get(n, {})  # files from before per-layer grids: every layer has reference keys
                kinds = ("gen", "ref") if grid.get("key_grid", ()) is not None else ("gen",)
                layers[n] = {kind: tensors[f"{kind}/{n}"] for kind in kinds}
                if "sources" in grid:
                    layers[n]["src"] = tensors[f"src/{n}"]
                    grid["sources"] = tuple(grid["sources"])
                if "key_grids" in grid:
                    grid["key_grids"] = tuple(tuple(g) for g in grid["key_grids"])
                layers[n].update(grid)
            if not layers:
                raise ValueError("no layers")
            for key in ("key_labels", "query_labels", "query_rows"):
                if key in meta:
                    meta[key] = _labels(meta[key])
            return _checked_shapes(cls(layers, mask=tensors.get("mask"), **meta))
        except (SafetensorError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            detail = f"missing entry {err}" if isinstance(err, KeyError) else str(err)
            raise ValueError(f"cannot read i2am maps from {path}: {detail} (write maps files with "
                             "AttributionMaps.save)") from err

    def __repr__(self):
        h, w = self.latent_size
        counts = {}
        for lab in self.query_labels[1:] + self.key_labels[1:]:
            if lab[0] == "ref":  # each reference's uniform probe: the references are named apart
                continue
            counts[lab[0]] = counts.get(lab[0], 0) + 1
        plural = {"point": "points", "box": "boxes", "patch": "patches"}
        probes = ", ".join(f"{v} {plural[k] if v > 1 else k}" for k, v in counts.items()) or "none"
        grid = "none" if self.ref_grid is None else f"{self.ref_grid[0]}x{self.ref_grid[1]}"
        if len(self.references) > 1:
            grid = "s " + ", ".join(f"{a}x{b}" for a, b in self.references)
        return (f"AttributionMaps({len(self.layers)} layers, latent {h}x{w}, reference grid"
                f"{'' if grid.startswith('s ') else ' '}{grid}, {len(self.record)} image(s), "
                f"{self.time_groups} time group(s) over {self.num_steps} steps, convention="
                f"{self.convention!r}, protocol={self.protocol!r}, probes: {probes})")


def _checked_shapes(maps):
    """maps, each buffer checked against what the metadata says it holds: float32 (records,
    time groups, heads, probe rows, layer grid) gen and (..., query rows, reference keys) ref
    buffers, so that a wrong buffer is an error, not a plausible wrong map."""
    Br, G = len(maps.record), maps.time_groups
    for name, lay in maps.layers.items():
        heads = lay["gen"].shape[2] if lay["gen"].dim() == 6 else "H"
        rows = (len(maps.key_labels) if lay["key_grid"] is not None else 0) + lay["per_key"]
        want = {"gen": (Br, G, heads, rows, *lay["grid"])}
        if "ref" in lay:
            grids = lay.get("key_grids") or (lay["key_grid"],)  # several references: their keys side by side
            want["ref"] = (Br, G, heads, len(maps.query_rows), sum(h * w for h, w in grids))
        for kind, shape in want.items():
            t = lay[kind]
            if t.dtype != torch.float32 or tuple(t.shape) != shape:
                raise ValueError(f"buffer {kind}/{name} is {t.dtype} {tuple(t.shape)}, but the metadata describes "
                                 f"float32 {shape}")
    if maps.mask is not None and not (maps.mask.is_floating_point() and maps.mask.dim() in (2, 3)):
        raise ValueError(f"the mask is {maps.mask.dtype} {tuple(maps.mask.shape)}, not a float (H, W) mask")
    return maps


def _labels(raw):
    """JSON turns ("point", (1, 2)) into ["point", [1, 2]]: back to tuples."""
    return tuple((lab[0],) if len(lab) == 1 else (lab[0], tuple(lab[1]) if isinstance(lab[1], list) else lab[1])
                 for lab in raw)


def _layer(lay, ref_grid):
    """A layer's buffers with their grids; maps saved before per-layer grids were kept have the
    layer grid in gen's shape, the reference keys on ref_grid and no per-key rows."""
    key_grid = lay.get("key_grid", ref_grid if "ref" in lay else None)
    if lay.get("key_grids") is not None:
        lay = {**lay, "key_grids": tuple(tuple(g) for g in lay["key_grids"])}
    return {**lay, "grid": tuple(lay.get("grid", lay["gen"].shape[-2:])),
            "key_grid": None if key_grid is None else tuple(key_grid), "per_key": int(lay.get("per_key", 0))}
