"""The report folder of one analysis: maps.safetensors, scores.json, PNG figures and report.md.

    report.write_report("out", maps, image=generated, reference=reference, ref_mask=cloth_mask,
                        settings={"steps": 50}, extra_scores={"accuracy": 0.8},
                        extra_images={"input": masked_input})

Images are PIL images or arrays/tensors as in i2am.viz; when more than one image was recorded,
image may be a list with one image per recorded entry and every figure is made per entry.
"""
import json
import math
import os
from pathlib import Path

import torch

from . import protocols, viz
from .inputs import as_mask, to_pil
from .regions import split_image

MAPS_FILE, SCORES_FILE, INDEX_FILE = "maps.safetensors", "scores.json", "report.md"


def write_report(out_dir, maps, *, image=None, reference=None, ref_mask=None, settings=None,
                 extra_scores=None, extra_images=None, threshold=0.4, alpha=0.5, lam=3.0, imacs_threshold=0.4,
                 title="I2AM attribution report", compare_protocols=False, true_sources=None):
    """Write the report folder of `maps` (an i2am.AttributionMaps) and return the scores.json
    content: "protocol" (the maps' protocol, which every score and figure follows), IMACS_g when
    the trace had an inpainting mask, IMACS_r when ref_mask is also given, the extra scores, and
    "settings" (the maps' own settings, the display settings, the run settings the maps carry
    and `settings`, e.g. the pipeline call's). The maps file keeps the run and display settings,
    so that `i2am show` re-renders with them. threshold and alpha are the figures' display
    settings and never change a score; imacs_threshold is the scoring one (AttributionMaps.imacs's
    threshold). compare_protocols: also "by_protocol", the IMACS under every protocol the recorded
    buffers can be read under, side by side in report.md. true_sources: see render_figures.
    Maps traced on two regions of one image (query_region/ref_region) take `image` whole: its
    query region is the generated image of the figures, its reference region the reference."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _remove_previous_report(out)  # nothing of an earlier report (its ref_mask.png, its figures) survives
    run = {**maps.settings, **(settings or {}), "threshold": threshold, "alpha": alpha,
           "imacs_threshold": imacs_threshold}
    _save_maps(maps, out / MAPS_FILE, _jsonable(run))
    scored = dict(lam=lam, threshold=imacs_threshold)
    scores = {"protocol": maps.protocol, **imacs_scores(maps, ref_mask, **scored)}
    if compare_protocols:
        scores["by_protocol"] = {name: imacs_scores(maps.with_protocol(name), ref_mask, **scored)
                                 for name in readable_protocols(maps)}
    scores.update(extra_scores or {})
    scores["settings"] = {**map_settings(maps), "lam": lam, **run}
    whole = image
    if maps.regions is not None and image is not None:
        image, reference = _region_images(image, maps.regions)
    images = _report_images(whole, reference, extra_images)
    figures = render_figures(out, maps, image=image, reference=reference, ref_mask=ref_mask, threshold=threshold,
                             alpha=alpha, true_sources=true_sources)
    # the files of this report: the next report into the folder removes them first
    scores["files"] = sorted([MAPS_FILE, SCORES_FILE, INDEX_FILE, *(f"{n}.png" for n in images),
                              *(f"{stem}.{fmt}" for stem, _ in figures for fmt in ("png", "pdf"))])
    (out / SCORES_FILE).write_text(json.dumps(_jsonable(scores), indent=2) + "\n")

    for name, img in images.items():
        to_pil(img).save(out / f"{name}.png")
    (out / INDEX_FILE).write_text(_markdown(title, maps, scores, list(images), figures))
    return scores


def _report_images(image, reference, extra_images):
    """{file stem: image} of the images a report shows."""
    images = dict(extra_images or {})
    for name, img in (("generated", image), ("reference", reference)):
        if isinstance(img, (list, tuple)):
            images.update((f"{name}_{b}", one) for b, one in enumerate(img) if one is not None)
        elif img is not None:
            images[name] = img
    return images


def rewrite_report(maps_file, out_dir, *, image=None, reference=None, ref_mask=None, protocol=None, threshold=None,
                   alpha=None, imacs_threshold=None):
    """write_report of a saved maps file (AttributionMaps.save), read under `protocol` (default:
    its own), with the run's images found beside it (generated.png, reference.png, ref_mask.png)
    unless given, and its threshold, alpha and imacs_threshold unless given; returns the
    scores. Maps of several references take theirs from beside the maps file only:
    reference_R.png and ref_mask_R.png (none for a reference without one), as their report
    saved them; a given reference or ref_mask is then an error."""
    from .inputs import InputError, arg, binary_mask, check_out, open_image, same_size
    from .maps import AttributionMaps

    check_out(out_dir)
    path = Path(maps_file)
    if not path.is_file():
        raise InputError(f"maps file not found: {path}")
    try:
        maps = AttributionMaps.load(path)
    except Exception as err:
        raise InputError(f"cannot read maps from {path}: {err}") from err
    if protocol is not None:
        try:
            maps = maps.with_protocol(protocol)
        except ValueError as err:
            raise InputError(f"{arg('protocol')} {protocol}: {err}") from err
    several = len(maps.references)
    if several > 1:
        for key, value in (("reference", reference), ("ref_mask", ref_mask)):
            if value is not None:
                raise InputError(f"{arg(key)} is one image, but these maps have {several} references: their "
                                 f"{key}_0.png to {key}_{several - 1}.png beside the maps file are used")
    given = {"image": image, "reference": reference, "ref_mask": ref_mask}
    for key, name in (("image", "generated.png"), ("reference", "reference.png"), ("ref_mask", "ref_mask.png")):
        if given[key] is None and (path.parent / name).is_file() and (key == "image" or several == 1):
            given[key] = path.parent / name  # the run's report folder
    image, reference, ref_mask = (None if given[key] is None else open_image(given[key], key, mode)
                                  for key, mode in (("image", "RGB"), ("reference", "RGB"), ("ref_mask", "L")))
    # the run's inputs shown in its report are carried along: a report rewritten in its own folder keeps them
    carried = {name: open_image(path.parent / f"{name}.png", name, mode)
               for name, mode in (("input", "RGB"), ("mask", "L")) if (path.parent / f"{name}.png").is_file()}
    if several > 1:
        reference, images, ref_mask = _beside_references(path.parent, maps)
        carried.update((f"ref_mask_{r}", m) for r, m in enumerate(images) if m is not None)
    elif ref_mask is not None:
        if given["ref_mask"] == path.parent / "ref_mask.png":
            carried["ref_mask"] = ref_mask
        if reference is not None:
            same_size(ref_mask, "ref_mask", reference, "reference")
        ref_mask = binary_mask(ref_mask, "ref_mask")
        if maps.mask is None:
            raise InputError(f"{arg('ref_mask')} gives IMACS_r, which needs maps traced with an inpainting mask; "
                             "these have none")
    shown = {key: maps.settings.get(key, default) if value is None else value
             for key, value, default in (("threshold", threshold, 0.4), ("alpha", alpha, 0.5))}  # the run's
    if imacs_threshold is None:  # the run's (maps saved before it had its own name were scored at "threshold")
        imacs_threshold = maps.settings.get("imacs_threshold", maps.settings.get("threshold", 0.4))
    return write_report(out_dir, maps, image=image, reference=reference, ref_mask=ref_mask,
                        settings={"maps_file": str(path)}, extra_images=carried, imacs_threshold=imacs_threshold,
                        **shown)


def _beside_references(folder, maps):
    """(reference_R.png, ref_mask_R.png, that mask as 0/1) of each reference of maps of several
    references, read from their report folder: lists, None where a file is not there. Each mask
    is checked as a given ref_mask is; an error names the files."""
    from .inputs import InputError, binary_mask, open_image

    refs, images, masks = [], [], []
    for r in range(len(maps.references)):
        ref_file, mask_file = folder / f"reference_{r}.png", folder / f"ref_mask_{r}.png"
        ref = open_image(ref_file, f"reference {r}") if ref_file.is_file() else None
        image = open_image(mask_file, f"ref_mask {r}", "L") if mask_file.is_file() else None
        if image is not None:
            if ref is not None and image.size != ref.size:
                raise InputError(f"{mask_file} is {image.width}x{image.height} but {ref_file} is "
                                 f"{ref.width}x{ref.height}: a reference's mask must be its size")
            if maps.mask is None:
                raise InputError(f"{mask_file} gives IMACS_r, which needs maps traced with an inpainting mask; "
                                 "these have none")
        refs.append(ref)
        images.append(image)
        masks.append(None if image is None else binary_mask(image, f"ref_mask {r}", f" ({mask_file})"))
    return refs, images, masks


def report_files(out):
    """The file names the i2am report in `out` lists in its scores.json (plain names inside out
    only, scores.json itself among them); [] when out holds no i2am report."""
    try:
        names = json.loads((Path(out) / SCORES_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..")]


def _remove_previous_report(out):
    for name in report_files(out):
        if (out / name).is_file():
            (out / name).unlink()


def render_figures(out_dir, maps, *, image=None, reference=None, ref_mask=None, threshold=0.4, alpha=0.5,
                   true_sources=None):
    """Write every figure of `maps` as PNG and PDF into out_dir; returns [(file stem, caption)].

    overview (M_g, M_r and the masked M_r over their images), by_time (when there is more than
    one time group), by_head (one per head count when layers differ in heads), one
    specific-reference figure per traced point or box and one specific-generated figure per
    traced patch. The inpainting mask is outlined on the generated image, ref_mask on the
    reference. A 1x1 reference grid (one reference token) has no reference-side panels: its
    reference maps are a single value. Figures follow the maps' protocol (under "official" the
    generated map is shown inverted and the masked reference map is M_r times ref_mask).
    true_sources: {latent point (row, col): reference patch (i, j)} where the point's content
    truly comes from (known for synthetic data), marked on its specific-reference figure.

    Several references (maps.references): `reference` is a list of their images, ref 0 first;
    the overview and the by-time and by-head grids have rows per reference, and a "sources"
    figure shows the share of each reference, the text and the image itself in each position."""
    if len(maps.references) > 1:
        return _render_references(Path(out_dir), maps, image=image, references=reference, ref_mask=ref_mask,
                                  shown=dict(threshold=threshold, alpha=alpha))
    if isinstance(ref_mask, (list, tuple)):  # one per reference: of the one reference
        (ref_mask,) = _reference_masks(ref_mask, 1)
    true_sources = {tuple(p): tuple(c) for p, c in (true_sources or {}).items()}
    out = Path(out_dir)
    samples = len(maps.record)
    ref_side = has_reference_side(maps)
    shown = dict(threshold=threshold, alpha=alpha)
    figures = []

    def save(fig, name, caption):
        viz.save_figure(fig, out / name)
        figures.append((name, caption))

    protocol = protocols.get(maps.protocol)
    shown_gen = protocol.shown_generated  # "official" shows M_g inverted, as the authors' code does
    masked, masked_caption = protocol.masked_reference(maps, ref_mask) if ref_side else (None, "")
    overview = (shown_gen(maps.generated()), maps.reference() if ref_side else None, masked)
    splits = [(name, caption, labels, maps.generated(by=by, layers=layers, normalize=False),
               maps.reference(by=by, layers=layers, normalize=False) if ref_side else None)
              for name, caption, by, layers, labels in _splits(maps)]
    specific_refs = [(lab[1], maps.specific_reference(lab[1])) for lab in maps.query_labels
                     if lab[0] in ("point", "box") and ref_side]
    specific_gens = [(lab[1], shown_gen(maps.specific_generated(lab[1]))) for lab in maps.key_labels
                     if lab[0] == "patch"]
    images, refs = _per_sample(image, samples), _per_sample(reference, samples)
    ref_masks = _per_sample_mask(ref_mask, samples)
    for b in range(samples):
        sfx, img, ref, rmask = _suffix(b, samples), images[b], refs[b], ref_masks[b]

        def pick(tensor):  # this image's maps: they carry a batch axis when several were recorded
            return tensor if samples == 1 or tensor is None else tensor[b]

        M_g, M_r, M_rm = map(pick, overview)
        panels = [viz.Panel("generated image", img, mask=maps.mask)] if img is not None else []
        panels.append(viz.Panel(f"{protocol.generated_name}: generated map", img, M_g, mask=maps.mask))
        if ref_side:
            panels += [viz.Panel("reference image", ref, mask=rmask)] if ref is not None else []
            panels.append(viz.Panel("M_r: reference map", ref, M_r, mask=rmask))
            if M_rm is not None:
                panels.append(viz.Panel(masked_caption, ref, M_rm, mask=rmask))
        caption = f"Generated map {protocol.generated_name}" + (" and reference map M_r" if ref_side else "")
        save(viz.panel_figure(panels, title=_title(maps, caption), **shown), "overview" + sfx, caption)
        for name, caption, labels, gen, ref_maps in splits:
            # one colour scale per row: the generated row normalised as a whole, then shown as the protocol does
            stacks, rows = [shown_gen(viz.shared_scale(pick(gen).double()))], [f"{protocol.generated_name} (generated)"]
            if ref_maps is not None:
                stacks, rows = stacks + [pick(ref_maps)], rows + ["M_r (reference)"]
            fig = viz.split_figure(stacks, column_labels=labels, row_labels=rows, images=[img, ref][:len(stacks)],
                                   masks=[maps.mask, rmask][:len(stacks)], title=_title(maps, caption), **shown)
            save(fig, name + sfx, caption)
        for probe, M_sr in specific_refs:
            kind = "point" if len(probe) == 2 else "box"
            caption = f"Specific-reference map M_sr of latent {kind} {_coords(probe)}"
            truth = true_sources.get(tuple(probe))
            cells = {} if truth is None else dict(probes=[(*truth, truth[0] + 1, truth[1] + 1)],
                                                  probe_grid=maps.ref_grid, labels=["true source"])
            panels = [viz.Panel(f"generated, latent {kind} {_coords(probe)}", img, mask=maps.mask, probes=[probe],
                                probe_grid=maps.latent_size),
                      viz.Panel("M_sr over the reference" + (f", true source {_coords(truth)}" if truth else ""),
                                ref, pick(M_sr), mask=rmask, **cells)]
            save(viz.panel_figure(panels, title=_title(maps, caption), **shown),
                 f"specific_reference_{kind}_{_join(probe)}{sfx}", caption)
        for patch, M_sg in specific_gens:
            i, j = patch
            caption = f"Where reference patch {_coords(patch)} is used in the generated image"
            panels = [viz.Panel(f"reference, patch {_coords(patch)}", ref, mask=rmask, probes=[(i, j, i + 1, j + 1)],
                                probe_grid=maps.ref_grid, labels=[_coords(patch)]),
                      viz.Panel("specific-generated map", img, pick(M_sg), mask=maps.mask)]
            save(viz.panel_figure(panels, title=_title(maps, caption), **shown),
                 f"specific_generated_patch_{_join(patch)}{sfx}", caption)
    return figures


def _render_references(out, maps, *, image, references, ref_mask, shown):
    """render_figures of maps with several references."""
    R, samples = len(maps.references), len(maps.record)
    ref_masks = _reference_masks(ref_mask, R)
    refs = [None] * R if references is None else list(references)
    if len(refs) != R:
        raise ValueError(f"{len(refs)} reference images for the {R} references of the maps")
    figures = []

    def save(fig, name, caption):
        viz.save_figure(fig, out / name)
        figures.append((name, caption))

    gen_name = protocols.get(maps.protocol).generated_name
    splits = [(name, caption, labels,
               [(maps.generated(by=by, layers=layers, normalize=False, ref=r),
                 maps.reference(by=by, layers=layers, normalize=False, ref=r)) for r in range(R)])
              for name, caption, by, layers, labels in _splits(maps)]
    points = [lab[1] for lab in maps.query_labels if lab[0] in ("point", "box")]
    patches = [lab[1] for lab in maps.key_labels if lab[0] == "patch"]
    for b, img in enumerate(_per_sample(image, samples)):
        sfx = _suffix(b, samples)

        def pick(tensor):  # this image's maps: they carry a batch axis when several were recorded
            return tensor if samples == 1 else tensor[b]

        rows = []
        for r in range(R):
            row = [viz.Panel(f"{gen_name} of reference {r}", img, pick(maps.generated(ref=r)), mask=maps.mask)]
            if any(ref is not None for ref in refs):  # a missing one of them: a grey canvas of its grid
                row.append(viz.Panel(f"reference {r}", refs[r], mask=ref_masks[r], probe_grid=maps.references[r]))
            row.append(viz.Panel(f"M_r: reference map {r}", refs[r], pick(maps.reference(ref=r)), mask=ref_masks[r]))
            if maps.mask is not None:
                row.append(viz.Panel("M_r, mask probe (eq. 17)", refs[r], pick(maps.reference(masked=True, ref=r)),
                                     mask=ref_masks[r]))
            rows.append(row)
        caption = f"Generated map {gen_name} and reference map M_r of each reference"
        save(viz.panel_figure(rows, title=_title(maps, caption), row_labels=[f"reference {r}" for r in range(R)],
                              **shown), "overview" + sfx, caption)
        for name, caption, labels, per_ref in splits:
            stacks, names, images = [], [], []
            for r, (gen, ref) in enumerate(per_ref):
                stacks += [viz.shared_scale(pick(gen).double()), pick(ref)]
                names += [f"{gen_name}, ref {r}", f"M_r, ref {r}"]
                images += [img, refs[r]]
            fig = viz.split_figure(stacks, column_labels=labels, row_labels=names, images=images,
                                   masks=[m for r in range(R) for m in (maps.mask, ref_masks[r])],
                                   title=_title(maps, caption), **shown)
            save(fig, name + sfx, caption)
        caption = "Sources: the share of each reference, the text and the image itself in each position"
        shares = {k: pick(v) for k, v in maps.sources(all_keys=_all_sources(maps)).items()}
        save(viz.sources_figure(shares, img, mask=maps.mask, title=_title(maps, caption)), "sources" + sfx, caption)
        for probe in points:
            kind = "point" if len(probe) == 2 else "box"
            caption = f"Specific-reference maps M_sr of latent {kind} {tuple(probe)}"
            panels = [viz.Panel(f"generated, latent {kind} {tuple(probe)}", img, probes=[probe],
                                probe_grid=maps.latent_size)]
            panels += [viz.Panel(f"M_sr over reference {r}", refs[r], pick(maps.specific_reference(probe, ref=r)))
                       for r in range(R)]
            save(viz.panel_figure(panels, title=_title(maps, caption), **shown),
                 f"specific_reference_{kind}_{_join(probe)}{sfx}", caption)
        for r, i, j in patches:
            caption = f"Where patch {(i, j)} of reference {r} is used in the generated image"
            panels = [viz.Panel(f"reference {r}, patch {(i, j)}", refs[r], probes=[(i, j, i + 1, j + 1)],
                                probe_grid=maps.references[r]),
                      viz.Panel("specific-generated map", img, pick(maps.specific_generated((r, i, j))),
                                mask=maps.mask)]
            save(viz.panel_figure(panels, title=_title(maps, caption), **shown),
                 f"specific_generated_patch_{_join((r, i, j))}{sfx}", caption)
    return figures


def _all_sources(maps):
    """Whether every layer kept the text and generated sources beside the references."""
    return all("src" in lay for lay in maps.layers.values())


def readable_protocols(maps):
    """The protocols the recorded buffers of `maps` can be read under."""
    names = []
    for name in protocols.PROTOCOLS:
        try:
            maps.with_protocol(name)
        except ValueError:
            continue
        names.append(name)
    return names


def has_reference_side(maps):
    """Whether the reference maps carry a picture: not with one reference token (a 1x1 grid, e.g.
    Paint-by-Example), where M_r and M_sr are a single value."""
    return maps.ref_grid is None or tuple(maps.ref_grid) != (1, 1)


def imacs_scores(maps, ref_mask=None, *, lam=3.0, threshold=0.4):
    """{"IMACS_g", "IMACS_r"} as AttributionMaps.imacs computes them, of reference 0; maps of
    several references add "IMACS_g_ref1", "IMACS_r_ref1", ... of each further reference.
    ref_mask: reference 0's mask, or a list of one per reference (None for one without). Empty
    without a traced inpainting mask (IMACS_r also needs its ref_mask). An undefined score is
    None, and "undefined" then says why: {"IMACS_r": reason}."""
    ref_masks = _reference_masks(ref_mask, len(maps.references))
    if maps.mask is None:
        if any(m is not None for m in ref_masks):
            raise ValueError("IMACS_r needs the inpainting mask in the trace (mask=), these maps have none")
        return {}
    named, why = {}, {}
    for r, mask in enumerate(ref_masks):
        scores = maps.imacs(ref_mask=mask, lam=lam, threshold=threshold, ref=r)
        reasons = scores.pop("undefined", {})
        for key, value in scores.items():
            name = f"IMACS_{'g' if key == 'gen' else 'r'}" + (f"_ref{r}" if r else "")
            named[name] = value
            if key in reasons:
                why[name] = reasons[key]
    if why:
        named["undefined"] = why
    return named


def _reference_masks(ref_mask, references):
    """ref_mask (reference 0's mask, or a list of one per reference) as a list of one per reference."""
    if not isinstance(ref_mask, (list, tuple)):
        return [ref_mask] + [None] * (max(references, 1) - 1)
    if len(ref_mask) != references:
        raise ValueError(f"ref_mask holds {len(ref_mask)} masks for the {references} references of the maps")
    return list(ref_mask)


def score_lines(scores):
    """"name: value" lines of a scores dict for the terminal and report.md: an undefined score
    says so, and why."""
    why = scores.get("undefined", {})
    return [(key, f"undefined ({why[key]})" if value is None and key in why else value)
            for key, value in scores.items() if key not in ("settings", "undefined", "files")]


def map_settings(maps):
    """The settings an AttributionMaps carries, as JSON-ready values."""
    return {
        "latent_size": list(maps.latent_size), "ref_grid": maps.ref_grid and list(maps.ref_grid),
        **({"references": [list(g) for g in maps.references]} if len(maps.references) > 1 else {}),
        "num_steps": maps.num_steps, "time_groups": maps.time_groups, "convention": maps.convention,
        "protocol": maps.protocol,
        "resize": maps.resize, "recorded_entries": maps.record, "layers": list(maps.layers),
        "inpainting_mask": maps.mask is not None,
        "points": [list(lab[1]) for lab in maps.query_labels if lab[0] == "point"],
        "boxes": [list(lab[1]) for lab in maps.query_labels if lab[0] == "box"],
        "patches": [list(lab[1]) for lab in maps.key_labels if lab[0] == "patch"],
    }


def _splits(maps):
    """(file name, title, by, layers, column labels) of the by-time and by-head grids."""
    splits = []
    if maps.time_groups > 1:
        splits.append(("by_time", f"By time group ({maps.num_steps} steps, first = noisiest)", "time", None,
                       viz.time_labels(maps.time_groups, maps.num_steps)))
    by_heads = {}
    for name, buffers in maps.layers.items():
        by_heads.setdefault(buffers["gen"].shape[2], []).append(name)
    for heads, names in sorted(by_heads.items()):
        alone = len(by_heads) == 1
        splits.append(("by_head" if alone else f"by_head_{heads}heads",
                       "By head: head i averaged over " + (f"the {len(maps.layers)} layers" if alone else
                                                           f"the {len(names)} layers with {heads} heads")
                       + " and all steps",
                       "head", None if alone else names, [f"head {n}" for n in range(heads)]))
    return splits


def _save_maps(maps, path, settings):
    """Save through a temporary file, so that re-rendering into the folder the maps were loaded
    from never truncates the file under them."""
    tmp = path.with_name(path.name + ".tmp")
    maps.save(tmp, settings=settings)
    os.replace(tmp, path)


def _region_images(image, regions):
    """(query region images, reference region images) of one image or a list of them."""
    if isinstance(image, (list, tuple)):
        return tuple(map(list, zip(*(split_image(one, regions) for one in image))))
    return split_image(image, regions)


def _per_sample(image, samples):
    if isinstance(image, (list, tuple)):
        if len(image) != samples:
            raise ValueError(f"{len(image)} images for {samples} recorded entries")
        return list(image)
    return [image] * samples


def _per_sample_mask(mask, samples):
    """One reference mask per recorded entry: a (B, H, W) mask holds one each."""
    if mask is None:
        return [None] * samples
    m = as_mask(mask, "ref_mask", batched=True)
    if m.dim() == 3:
        if len(m) != samples:
            raise ValueError(f"ref_mask holds {len(m)} masks for {samples} recorded entries")
        return list(m)
    return [m] * samples


# the protocol and the softmax convention in a reader's words (definitions: docs/maps.md)
PROTOCOL_WORDS = {"paper": "as the paper's printed equations",
                  "official": "as the authors' released code computes them"}
CONVENTION_WORDS = {"official": "M_g: softmax over queries; M_r: softmax over keys",
                    "paper": "M_g: softmax over keys; M_r: softmax over queries (eq. 4, 12)"}


def _title(maps, what):
    """A figure title: what it shows, then the protocol, convention, layers and steps behind it."""
    n = len(maps.layers)
    return (f"{what}\n{_words(PROTOCOL_WORDS, maps.protocol).capitalize()}; {n} layer{'s' if n != 1 else ''}, "
            f"{maps.num_steps} steps in {maps.time_groups} time group{'s' if maps.time_groups != 1 else ''}\n"
            f"{_words(CONVENTION_WORDS, maps.convention)}")


def _words(table, name):
    return table.get(name, name)


def _coords(cell):
    """(3, 4), not (tensor(3), tensor(4)) or [3, 4]."""
    return "(" + ", ".join(str(int(v)) for v in cell) + ")"


def _suffix(b, samples):
    return "" if samples == 1 else f"_{b}"


def _join(coords):
    return "_".join(str(int(c)) for c in coords)


def _jsonable(x):
    if torch.is_tensor(x):
        return _jsonable(x.tolist())
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None  # an undefined score of one of several images
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)  # paths, dtypes, devices


def _markdown(title, maps, scores, image_names, figures):
    settings = scores["settings"]
    values = dict(score_lines({k: v for k, v in scores.items() if k not in ("protocol", "by_protocol")}))
    protocol = protocols.get(scores["protocol"])
    lines = [f"# {title}", "", *_legend(maps, settings["threshold"]), "", "## Scores", "",
             f"Protocol: **{protocol.name}** ({protocol.summary}).", "",
             f"IMACS threshold: {settings['imacs_threshold']:g} ({_imacs_threshold_use(protocol.name)}; "
             "`--imacs-threshold`). The display threshold of the figures does not change a score.", ""]
    if values:
        lines += ["| score | value |", "|---|---|"] + [f"| {k} | {_score_cell(v)} |" for k, v in values.items()]
    else:
        lines.append("No scores: the trace had no inpainting mask, so IMACS is not defined.")
    compared = scores.get("by_protocol", {})
    if len(compared) > 1:
        names = list(compared)
        keys = sorted({k for s in compared.values() for k in s} - {"undefined"})
        lines += ["", "### IMACS under each protocol", "", "| score | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        lines += [f"| {k} | " + " | ".join(_score_cell(compared[n].get(k, "")) for n in names) + " |" for k in keys]
        lines += ["", "The protocols score different maps from the same recorded attention: "
                  + "; ".join(f"*{n}* uses {protocols.get(n).summary}" for n in names) + "."]
    lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {json.dumps(_jsonable(v))} |" for k, v in settings.items()]
    if image_names:  # an HTML table, so that small images are shown enlarged with sharp pixels
        cells = "".join(f'<td><img src="{n}.png" alt="{n}" height="192" style="image-rendering: '
                        f'pixelated"></td>' for n in image_names)
        heads = "".join(f"<th>{n}</th>" for n in image_names)
        lines += ["", "## Images", "", f"<table><tr>{heads}</tr><tr>{cells}</tr></table>"]
    lines += ["", "## Figures", ""]
    for stem, caption in figures:
        lines += [f"### {caption}", "", f"![{caption}]({stem}.png)", "", f"[PDF]({stem}.pdf)", ""]
    lines.append(f"Maps: `{MAPS_FILE}` (i2am.AttributionMaps.load), scores: `{SCORES_FILE}`.")
    return "\n".join(lines) + "\n"


def _legend(maps, threshold):
    """The short legend report.md opens with (the definitions: docs/maps.md of the i2am package)."""
    lines = [
        f"Protocol: **{maps.protocol}** (maps and IMACS {_words(PROTOCOL_WORDS, maps.protocol)}); softmax "
        f"convention: **{maps.convention}** ({_words(CONVENTION_WORDS, maps.convention)}); definitions and equation "
        "numbers: `docs/maps.md` of the i2am package.",
        "",
        "- **M_g**, generated map: where the generated image draws on the reference, over the generated image.",
        *([f"  Shown as **{protocols.get(maps.protocol).generated_name}**, as this protocol's display does."]
          if protocols.get(maps.protocol).generated_name != "M_g" else []),
        "- **M_r**, reference map: which reference patches the generation draws on, over the reference image; "
        "*mask probe (eq. 17)*: only the queries inside the inpainting mask.",
        "- **M_sr**, specific-reference map: the reference patches one latent point or box (red) looked at; "
        "**specific-generated**: where one reference patch (red box) is used. Where the truth is known, a red box "
        "labelled *true source* marks the reference patch a point's content really comes from.",
        f"- Colours: jet over the image, each map min-max normalised (eq. 8-9); values <= {threshold:g} (the "
        "display threshold) are not drawn: the hatched, paler part of the colorbar. In the by-time and by-head "
        "grids each row is normalised as a whole, so its panels compare; a by-head panel is that head averaged "
        "over the layers and steps.",
        "- White outline: the inpainting mask (generated side) and the reference mask (reference side).",
        "- IMACS: mean of the map inside the mask minus 3 times its mean outside; higher means the "
        "attribution stays in the mask (at most 1).",
    ]
    if not has_reference_side(maps):
        lines.append("- The reference grid is 1x1: the model conditions on one reference token (as "
                     "Paint-by-Example does), so the reference map, its splits and the specific-reference maps "
                     "are a single value; their panels are left out and M_g carries the information.")
    return lines


def _imacs_threshold_use(protocol):
    """What the IMACS threshold cuts under each protocol."""
    return {"paper": "map values <= it count as 0 in both IMACS_g and IMACS_r",
            "official": "M_r values <= it count as 0 in IMACS_r; IMACS_g cuts M_g at 0.6, as the authors' code"
            }.get(protocol, "as the protocol applies it")


def _score_cell(value):
    value = _jsonable(value)
    if isinstance(value, list):
        return ", ".join(_score_cell(v) for v in value)
    if value is None:
        return "undefined"
    if isinstance(value, str):
        return value
    return f"{value:.4f}" if isinstance(value, float) else json.dumps(value)
