"""Protocols: the two ways of turning the recorded buffers into displayed maps and IMACS scores.

A protocol is chosen once (``i2am.trace(..., protocol=)``) and carried by the maps. It says
what is recorded beyond the user's probes, which layers each map integrates by default,
which probe rows a map reads, how maps are displayed and how IMACS is scored:

- "paper": the printed equations (eq. 5-18): M_g from the uniform key probe, M_r from the
  latent query probes pulled back to each layer, min-max display with a 0.4 threshold, IMACS
  of eq. 18 on both maps, every traced layer.
- "official": the authors' released code step by step: M_g as the mean over ALL context keys
  of each key's C map, resized and clamped at 0 one key at a time (recorded with one key probe
  per key); M_r as the plain mean over each layer's own queries; M_sr from the probe cell on
  the layer's grid; figures and IMACS_g on the inverted map 1 - M_g (values >= 0.6 set to 1
  first); IMACS_r on the reference map times the cloth mask; the authors' layer sets.

Where the authors' code leaves a choice open, "official" takes: the first traced layer at half
the latent resolution as its one reference block; a point's or box's layer cells as the
latent positions' cells on the layer grid (row * h_l // h); on a layer whose key grid differs
from the common grid the query mean is resized (the authors resize each query's key map
first; the two agree on the default block, whose grid is the common one).

A new protocol is one more class and one more entry in PROTOCOLS.
"""
import torch

from . import display
from .grid import resize
from .layers import in_middle_block

EPS = 1e-8  # the official code's min-max and IMACS_r epsilon


class Paper:
    name = "paper"
    generated_name = "M_g"     # the generated map as figures show it
    summary = ("the printed equations: M_g from the uniform key probe, min-max display with a 0.4 "
               "threshold, IMACS of eq. 18 on M_g and on M_r with the inpainting-mask probe (eq. 17)")
    # the softmax axes (i2am.config.CONVENTIONS) a trace takes when convention= is not given: the
    # official ones (C for M_g, P for M_r) here too, since the printed axes average to a constant
    # map when every key is a reference key
    convention = "official"
    per_key_rows = False       # records one key probe per context key
    context_layers = False     # under ref_grid="layer", a layer whose keys fit no grid is recorded for M_g only

    def check(self, convention):
        """The softmax conventions this protocol accepts."""

    def layer_query_rows(self, labels, latent_size, grid):
        """Extra query probe rows (labels, (R, h_l*w_l) weights) built on the layer's own grid."""
        return (), torch.zeros(0, grid[0] * grid[1])

    def default_layers(self, maps, kind, by):
        """Layer names a map of `kind` ("generated", "specific_generated", "reference",
        "specific_reference") integrates when layers= is not given."""
        return list(maps.layers)

    def generated_rows(self, maps, name):
        """The gen rows of layer `name` whose resized, clamped maps are averaged into M_g."""
        return [maps._key_row(name, ("uniform",))]

    def query_label(self, label):
        """The recorded query row that the reference-side map of probe `label` reads."""
        return label

    def shown_generated(self, M):
        """The generated map as figures show it, from M normalised to [0, 1] (per map, or over a
        by-time/by-head row as a whole)."""
        return M

    def masked_reference(self, maps, ref_mask):
        """(the masked reference map figures show, or None; its caption)."""
        if maps.mask is None:
            return None, ""
        return maps.reference(masked=True), "M_r, mask probe (eq. 17)"

    def imacs(self, maps, ref_mask, gen_mask, lam, threshold, ref=0):
        threshold = 0.4 if threshold is None else threshold
        M = maps.generated(normalize=False, ref=ref)
        scores = {"gen": (_paper_score(M, gen_mask, "gen_mask", lam, threshold), M)}
        if ref_mask is not None:
            M = maps.reference(masked=True, normalize=False, ref=ref)
            scores["ref"] = (_paper_score(M, ref_mask, "ref_mask", lam, threshold), M)
        return defined(scores)


class Official(Paper):
    name = "official"
    generated_name = "1 - M_g"
    summary = ("the authors' released code: M_g as the mean over all context keys of each key's map, "
               "resized and clamped one key at a time, shown and scored inverted (1 - M_g, values >= 0.6 "
               "set to 1 first); M_r as the plain mean over each layer's own queries, multiplied by the "
               "cloth mask for IMACS_r (threshold 0.4, +1e-8); its layer sets (no middle block for M_g, "
               "one block at half the latent resolution for M_r)")
    per_key_rows = True
    context_layers = True
    GEN_CUT = 0.6  # IMACS_g: pixel-level values >= 0.6 become 1 before the inversion

    def check(self, convention):
        if convention != "official":
            raise ValueError("protocol='official' reads C (softmax over queries) for the generated map and P for "
                             f"the reference map, as the authors' code does: use convention='official', not "
                             f"{convention!r}")

    def layer_query_rows(self, labels, latent_size, grid):
        """The plain mean over the layer's queries, and each point or box as the layer cells its
        latent positions fall in (the official code resizes the probe to the layer's grid)."""
        (h, w), (hl, wl) = latent_size, grid
        rows, names = [torch.full((hl, wl), 1.0 / (hl * wl))], [("layer_uniform",)]
        for lab in labels:
            if lab[0] not in ("point", "box"):
                continue
            t, l, b, r = (*lab[1], lab[1][0] + 1, lab[1][1] + 1) if lab[0] == "point" else lab[1]
            cells = torch.zeros(hl, wl)
            cells[t * hl // h:(b - 1) * hl // h + 1, l * wl // w:(r - 1) * wl // w + 1] = 1
            rows.append(cells / cells.sum())
            names.append(("layer_" + lab[0], lab[1]))
        return tuple(names), torch.stack(rows).reshape(len(rows), -1)

    def default_layers(self, maps, kind, by):
        if kind in ("generated", "specific_generated"):  # every cross-attention layer but the middle block's
            need = "per_key" if kind == "generated" else "key_grid"
            names = [n for n, lay in maps.layers.items() if lay[need] and not in_middle_block(n)]
            if not names:
                raise EmptyLayerSet(f"the official {kind.replace('_', ' ')} layer set (the traced layers outside the "
                                 f"middle block, with {'per-key maps' if need == 'per_key' else 'reference keys'}) "
                                 f"is empty among {list(maps.layers)}: pass layers=")
            return names
        h, w = maps.latent_size
        halves = {(-(-h // 2), -(-w // 2)), (h // 2, w // 2)}
        names = [n for n, lay in maps.layers.items() if lay["key_grid"] is not None and lay["grid"] in halves]
        if not names:
            raise EmptyLayerSet(f"the official reference layer set (a layer at half the latent resolution "
                             f"{sorted(halves)} with reference keys) is empty; the traced layers are "
                             f"{ {n: lay['grid'] for n, lay in maps.layers.items()} }: pass layers=")
        return names if by == "time" else names[:1]  # one block; all blocks at that resolution by time

    def generated_rows(self, maps, name):
        return maps._per_key_rows(name)

    def query_label(self, label):
        if label[0] in ("uniform", "point", "box"):
            return ("layer_" + label[0],) + label[1:]
        return label

    def shown_generated(self, M):
        return 1 - M

    def masked_reference(self, maps, ref_mask):
        if ref_mask is None:
            return None, ""
        return maps.reference(ref_mask=ref_mask), "M_r times the reference mask"

    def imacs(self, maps, ref_mask, gen_mask, lam, threshold, ref=0):  # one reference: ref is 0
        threshold = 0.4 if threshold is None else threshold
        x = display.binary_mask(gen_mask, "gen_mask")
        try:
            M = maps.generated(normalize=False)
        except EmptyLayerSet as err:  # e.g. only warp blocks traced: IMACS_r is still defined
            scores = {"gen": (None, f"there is no generated map: {err}")}
        else:
            g = pixel_level(M.double(), x.shape[-2:])
            r = 1 - torch.where(g >= self.GEN_CUT, torch.ones_like(g), g)
            x = x.to(r.dtype)
            scores = {"gen": (_mean(r, x) - lam * _mean(r, 1 - x), M)}
        if ref_mask is not None:
            y = display.binary_mask(ref_mask, "ref_mask")
            M = maps.reference(ref_mask=y, normalize=False)
            m = pixel_level(M.double(), y.shape[-2:])
            m = torch.where(m <= threshold, torch.zeros_like(m), m)
            y = y.to(m.dtype)
            scores["ref"] = (_mean(m, y, EPS) - lam * _mean(m, 1 - y, EPS), M)
        return defined(scores)


class EmptyLayerSet(ValueError):
    """A protocol's default layer set holds none of the traced layers."""


PROTOCOLS = {p.name: p for p in (Paper(), Official())}


def get(protocol):
    """The protocol object named `protocol` ("paper" or "official")."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {tuple(PROTOCOLS)}, got {protocol!r}")
    return PROTOCOLS[protocol]


def minmax(x, eps=EPS):
    """The official min-max: (x - min) / (max - min + eps) over the last two axes."""
    lo = x.amin((-2, -1), keepdim=True)
    return (x - lo) / (x.amax((-2, -1), keepdim=True) - lo + eps)


def pixel_level(M, size):
    """The official display: min-max (+1e-8), bicubic to the image size, min-max (+1e-8), no clamp."""
    return minmax(resize(minmax(M), size, "bicubic"))


def _mean(M, x, eps=0.0):
    return (M * x).sum((-2, -1)) / (x.sum((-2, -1)) + eps)


def _paper_score(M, mask, what, lam, threshold):
    mask = display.binary_mask(mask, what)
    return display.imacs(display.pixel_level(M.double(), mask.shape[-2:], threshold), mask, lam)


def defined(scores):
    """{key: (score tensor, the map it scores) or (None, why)} -> {key: float, or None where the map is constant},
    with "undefined": {key: why} when any is None. A constant map ranks no pixel above another
    (min-max leaves all zeros): its IMACS would be a number that says nothing, never 0.0.
    Several recorded images: a tensor of scores, NaN (JSON null in reports) where undefined."""
    out, why = {}, {}
    for key, (v, M) in scores.items():
        if v is None:  # M: why there is no map to score
            out[key], why[key] = None, M
            continue
        flat = M.flatten(-2)
        constant = flat.amax(-1) == flat.amin(-1)
        if v.dim() == 0:
            out[key] = None if constant else v.item()
        else:
            out[key] = v.masked_fill(constant, float("nan"))
        if constant.any():
            one_token = " (a 1x1 reference grid: the model sees one reference token)" if M.shape[-2:] == (1, 1) else ""
            why[key] = (f"the {'generated' if key == 'gen' else 'reference'} map is constant{one_token}, so it "
                        "ranks no pixel above another and IMACS is undefined")
    if why:
        out["undefined"] = why
    return out
