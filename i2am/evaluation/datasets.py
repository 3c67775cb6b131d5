"""Evaluation data sets: what one sample holds, read from a JSONL manifest or a VITON-HD-like folder.

A sample is the image to inpaint (also the real image the FID and KID compare with), its
inpainting mask (white = fill), the reference and its mask (e.g. the cloth mask, for IMACS_r),
and the ground truth for SSIM and LPIPS (in a paired setting: the image itself).

JSONL manifest, one sample a line, paths relative to the manifest's folder:

    {"id": "00001_00", "image": "image/00001_00.jpg", "mask": "agnostic-mask/00001_00_mask.png",
     "reference": "cloth/00001_00.jpg", "ref_mask": "cloth-mask/00001_00.jpg",
     "ground_truth": "image/00001_00.jpg", "prompt": "", "seed": 7}

"reference" may be a list of paths, for a pipeline of several references (ref 0 first).
"ref_mask", "ground_truth", "prompt" and "seed" are optional (seed: the run's seed plus the
sample's line number).

Folder (VITON-HD's test split, with StableVITON's agnostic masks): image/, agnostic-mask/
(NAME_mask.png), cloth/, cloth-mask/, and test_pairs.txt ("person.jpg cloth.jpg" a line) in the
folder or beside it. A pair whose cloth is the person's own (the same name) is paired: its
image is the ground truth; an unpaired pair has none (FID and KID only).
"""
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..inputs import InputError

PAIRS_FILE = "test_pairs.txt"


class DatasetError(InputError):
    """A manifest or folder that does not describe samples; the message names the file."""


@dataclass
class Sample:
    """One evaluation sample. Images are file paths or in-memory images (PIL or tensors)."""

    id: str
    index: int
    image: object
    mask: object
    reference: object  # one image, or a list of them (several references, ref 0 first)
    ref_mask: object = None
    ground_truth: object = None
    prompt: str = ""
    seed: int = None
    extra: dict = field(default_factory=dict)  # data-set-specific inputs (the demo's warp)


def load_dataset(path):
    """Samples from a .jsonl manifest or a VITON-HD-like folder."""
    path = Path(path)
    if path.is_dir():
        return load_folder(path)
    if path.is_file():
        return load_manifest(path)
    raise DatasetError(f"data set not found: {path} (a .jsonl manifest or a folder with image/, "
                       f"agnostic-mask/, cloth/, cloth-mask/ and {PAIRS_FILE})")


def load_manifest(path):
    path = Path(path)
    samples = []
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        where = f"{path}, line {n + 1}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where}: not JSON ({err})") from None
        missing = [key for key in ("image", "mask", "reference") if key not in entry]
        if missing:
            raise DatasetError(f"{where}: lacks {', '.join(missing)} (every sample needs image, mask and reference)")
        unknown = set(entry) - {"id", "image", "mask", "reference", "ref_mask", "ground_truth", "prompt", "seed"}
        if unknown:
            raise DatasetError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        files = {key: _existing(path.parent / entry[key], where, key)
                 for key in ("image", "mask", "ref_mask", "ground_truth") if entry.get(key)}
        files["reference"] = _references(entry["reference"], path.parent, where)
        samples.append(Sample(id=str(entry.get("id", Path(entry["image"]).stem)), index=len(samples),
                              prompt=entry.get("prompt", ""), seed=entry.get("seed"), **files))
    return _checked(samples, path)


def load_folder(root):
    root = Path(root)
    pairs = next((p for p in (root / PAIRS_FILE, root.parent / PAIRS_FILE) if p.is_file()), None)
    if pairs is None:
        raise DatasetError(f"{root}: no {PAIRS_FILE} in the folder or beside it (lines 'person.jpg cloth.jpg')")
    samples = []
    for n, line in enumerate(pairs.read_text().splitlines()):
        if not line.strip():
            continue
        names = line.split()
        where = f"{pairs}, line {n + 1}"
        if len(names) != 2:
            raise DatasetError(f"{where}: expected 'person.jpg cloth.jpg', got {line!r}")
        person, cloth = names
        stem = Path(person).stem
        image = _existing(root / "image" / person, where, "image")
        samples.append(Sample(
            id=stem if stem == Path(cloth).stem else f"{stem}__{Path(cloth).stem}", index=len(samples),
            image=image, mask=_existing(root / "agnostic-mask" / f"{stem}_mask.png", where, "mask"),
            reference=_existing(root / "cloth" / cloth, where, "cloth"),
            ref_mask=_existing(root / "cloth-mask" / cloth, where, "cloth mask"),
            ground_truth=image if stem == Path(cloth).stem else None))
    return _checked(samples, pairs)


def _references(given, folder, where):
    """A manifest's "reference": one path, or a non-empty list of paths (several references)."""
    if isinstance(given, str):
        return _existing(folder / given, where, "reference")
    if not (isinstance(given, list) and given and all(isinstance(p, str) for p in given)):
        raise DatasetError(f"{where}: reference must be a path or a non-empty list of paths, got {given!r}")
    return [_existing(folder / p, where, f"reference {r}") for r, p in enumerate(given)]


def _existing(path, where, what):
    if not Path(path).is_file():
        raise DatasetError(f"{where}: {what} file not found: {path}")
    return Path(path)


def _checked(samples, source):
    if not samples:
        raise DatasetError(f"{source}: no samples")
    seen = set()
    for s in samples:
        if s.id in seen:
            raise DatasetError(f"{source}: sample id {s.id!r} appears twice (ids name the result files)")
        seen.add(s.id)
    return samples
