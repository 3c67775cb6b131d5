"""AttributionMaps: integration of the recorded buffers into I2AM maps (SPEC section 3-4)."""
import json

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import display
from .grid import resize
from .probes import probe_row
from .recorder import layer_selected

BY = (None, "time", "head")


class AttributionMaps:
    """Time-summed, head-indexed map buffers of a trace, and the maps integrated from them.

    layers: {name: {"gen": (Br, G, H, Ru, h_l, w_l), "ref": (Br, G, H, Rw, hI*wI)}} float32.
    Every map method returns (h, w) or (hI, wI) maps, with (G, ...) for by="time", (N, ...) for
    by="head", and a leading batch axis when more than one image was recorded.
    """

    def __init__(self, layers, *, latent_size, ref_grid, convention, num_steps, resize, key_labels,
                 query_labels, record, mask=None, settings=None):
        self.layers = layers
        self.latent_size, self.ref_grid = tuple(latent_size), tuple(ref_grid)
        self.convention, self.num_steps, self.resize = convention, num_steps, resize
        self.key_labels, self.query_labels = tuple(key_labels), tuple(query_labels)
        self.record, self.mask = list(record), mask
        self.settings = dict(settings or {})  # free-form run settings (pipeline, model, steps, seed...)
        self.time_groups = next(iter(layers.values()))["gen"].shape[1]

    # ---- maps ----------------------------------------------------------------------------
    def generated(self, by=None, layers=None, normalize=True):
        """M_g (eq. 5; by="time" eq. 10, by="head" eq. 11): where the generated image draws on
        the reference, (h, w) at latent resolution."""
        return self._generated(("uniform",), by, layers, normalize)

    def specific_generated(self, patch, by=None, layers=None, normalize=True):
        """Where reference patch (i, j) (traced with patches=) is used in the generated image."""
        return self._generated(("patch", tuple(patch)), by, layers, normalize)

    def reference(self, by=None, masked=False, layers=None, normalize=True):
        """M_r (eq. 13; by="time"/"head" as above; masked=True is eq. 17 with the traced
        inpainting mask): which reference patches are drawn on, (hI, wI)."""
        return self._reference(("mask",) if masked else ("uniform",), by, layers, normalize)

    def specific_reference(self, point_or_box, by=None, layers=None, normalize=True):
        """M_sr (eq. 16): the reference patches one traced latent point (row, col) or box
        (top, left, bottom, right) looked at, (hI, wI)."""
        p = tuple(int(x) for x in point_or_box)
        return self._reference(("point" if len(p) == 2 else "box", p), by, layers, normalize)

    def imacs(self, ref_mask=None, gen_mask=None, lam=3.0, threshold=0.4):
        """IMACS (SPEC section 3): {"gen": IMACS_g} against gen_mask (default the traced mask),
        and "ref": IMACS_r of the masked reference map against ref_mask when it is given.
        Maps are taken to each mask's size at pixel level (eq. 9) before scoring."""
        if gen_mask is None:
            if self.mask is None:
                raise ValueError("imacs needs gen_mask, or a trace with mask=")
            gen_mask = self.mask
        scores = {"gen": self._score(self.generated(normalize=False), gen_mask, "gen_mask", lam, threshold)}
        if ref_mask is not None:
            scores["ref"] = self._score(self.reference(masked=True, normalize=False), ref_mask, "ref_mask",
                                        lam, threshold)
        return scores

    def _score(self, M, mask, what, lam, threshold):
        mask = display.binary_mask(mask, what)
        value = display.imacs(display.pixel_level(M.double(), mask.shape[-2:], threshold), mask, lam)
        return value.item() if value.dim() == 0 else value

    # ---- integration ---------------------------------------------------------------------
    def _generated(self, label, by, layers, normalize):
        row = probe_row(self.key_labels, label)
        total, selected = 0, self._selected(layers, by)
        for name, heads in selected:
            g = self.layers[name]["gen"][:, :, :, row].double()  # (Br, G, H, h_l, w_l)
            if by != "time":
                g = g.sum(1, keepdim=True)  # sum over time groups before the resize (eq. 5)
            g = resize(g, self.latent_size, self.resize).clamp_min(0)
            total = total + (g if by == "head" else g.sum(2, keepdim=True)) / heads
        return self._finish(total, by, len(selected), normalize)

    def _reference(self, label, by, layers, normalize):
        row = probe_row(self.query_labels, label)
        total, selected = 0, self._selected(layers, by)
        for name, heads in selected:
            r = self.layers[name]["ref"][:, :, :, row].double()  # (Br, G, H, K)
            total = total + r.sum(1 if by == "head" else 2, keepdim=True) / heads
        if by != "time" and by != "head":
            total = total.sum(1, keepdim=True)
        return self._finish(total.reshape(*total.shape[:-1], *self.ref_grid), by, len(selected), normalize)

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

    def _selected(self, layers, by):
        if by not in BY:
            raise ValueError(f"by must be one of {BY}, got {by!r}")
        names = self.select(layers)
        heads = {self.layers[n]["gen"].shape[2] for n in names}
        if by == "head" and len(heads) > 1:
            raise ValueError(f"by='head' needs layers with one head count; the selected layers have "
                             f"{sorted(heads)} heads: select layers that share one")
        return [(n, self.layers[n]["gen"].shape[2]) for n in names]

    def select(self, layers=None):
        """Names of the traced layers matching `layers` (fnmatch patterns and/or (h_l, w_l))."""
        names = [n for n, b in self.layers.items() if layer_selected(n, tuple(b["gen"].shape[-2:]), layers)]
        if not names:
            raise ValueError(f"layers={layers!r} matches none of the traced layers: {list(self.layers)}")
        return names

    # ---- persistence ---------------------------------------------------------------------
    def save(self, path, settings=None):
        """Save buffers and settings to a safetensors file (settings in its metadata); `settings`
        (JSON-ready values, e.g. the pipeline call's) are stored beside self.settings and come
        back as AttributionMaps.load(path).settings."""
        tensors = {f"{kind}/{name}": b[kind].contiguous() for name, b in self.layers.items()
                   for kind in ("gen", "ref")}
        if self.mask is not None:
            tensors["mask"] = self.mask.float().contiguous()
        meta = {"latent_size": self.latent_size, "ref_grid": self.ref_grid, "convention": self.convention,
                "num_steps": self.num_steps, "resize": self.resize, "key_labels": self.key_labels,
                "query_labels": self.query_labels, "record": self.record, "layers": list(self.layers),
                "settings": {**self.settings, **(settings or {})}}
        save_file(tensors, str(path), metadata={"i2am": json.dumps(meta)})

    @classmethod
    def load(cls, path):
        """Load maps written by save()."""
        with safe_open(str(path), "pt") as f:  # one read: the metadata and the tensors
            meta = (f.metadata() or {}).get("i2am")
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        if meta is None:
            raise ValueError(f"{path} is not an i2am maps file (no 'i2am' metadata)")
        meta = json.loads(meta)
        layers = {n: {"gen": tensors[f"gen/{n}"], "ref": tensors[f"ref/{n}"]} for n in meta.pop("layers")}
        meta["key_labels"] = _labels(meta["key_labels"])
        meta["query_labels"] = _labels(meta["query_labels"])
        return cls(layers, mask=tensors.get("mask"), **meta)

    def __repr__(self):
        h, w = self.latent_size
        counts = {}
        for lab in self.query_labels[1:] + self.key_labels[1:]:
            counts[lab[0]] = counts.get(lab[0], 0) + 1
        plural = {"point": "points", "box": "boxes", "patch": "patches"}
        probes = ", ".join(f"{v} {plural[k] if v > 1 else k}" for k, v in counts.items()) or "none"
        return (f"AttributionMaps({len(self.layers)} layers, latent {h}x{w}, reference grid "
                f"{self.ref_grid[0]}x{self.ref_grid[1]}, {len(self.record)} image(s), "
                f"{self.time_groups} time group(s) over {self.num_steps} steps, convention="
                f"{self.convention!r}, probes: {probes})")


def _labels(raw):
    """JSON turns ("point", (1, 2)) into ["point", [1, 2]]: back to tuples."""
    return tuple((lab[0],) if len(lab) == 1 else (lab[0], tuple(lab[1])) for lab in raw)
