"""Evaluation data sets: what one sample holds, read from a JSONL manifest or a VITON-HD-like folder.

A sample is the image to inpaint (also the real image the FID and KID compare with), its
inpainting mask (white = fill), the reference and its mask (e.g. the cloth mask, for IMACS_r),
and the ground truth for SSIM and LPIPS (in a paired setting: the image itself).

JSONL manifest, one sample a line, paths relative to the manifest's folder:

    {"id": "00001_00", "image": "image/00001_00.jpg", "mask": "agnostic-mask/00001_00_mask.png",
     "reference": "cloth/00001_00.jpg", "ref_mask": "cloth-mask/00001_00.jpg",
     "ground_truth": "image/00001_00.jpg", "prompt": "", "seed": 7}

"reference" may be a list of paths, for a pipeline of several references (ref 0 first).
"ref_mask", "ground_truth", "prompt" and "seed" are optional (seed: an integer, added to the
run's seed; default the sample's line number). An id names the sample's result files: it is a
file name (no folder, no "/" or "\\"), distinct from every other id after normalisation ("./s0" is
"s0"; letter case and Unicode forms do not tell ids apart). Every image is checked to decode
when the data set is loaded, so that a bad sample stops the run before any generation.

Folder (VITON-HD's test split, with StableVITON's agnostic masks): image/, agnostic-mask/
(NAME_mask.png), cloth/, cloth-mask/, and test_pairs.txt ("person.jpg cloth.jpg" a line) in the
folder or beside it. A pair whose cloth is the person's own (the same name) is paired: its
image is the ground truth; an unpaired pair has none (FID and KID only).
"""
import json
import posixpath
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..inputs import InputError
from ..integers import as_int

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
    source: str = ""  # where the sample is described ("pairs.jsonl, line 3"), for error messages


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
        sample_id = str(entry.get("id", Path(str(entry["image"])).stem))
        files = {key: _image(path.parent / entry[key], where, key, sample_id)
                 for key in ("image", "mask", "ref_mask", "ground_truth") if entry.get(key)}
        files["reference"] = _references(entry["reference"], path.parent, where, sample_id)
        samples.append(Sample(id=sample_id, index=len(samples), prompt=entry.get("prompt", ""),
                              seed=entry.get("seed"), source=where, **files))
    return check_samples(samples, path)


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
        sample_id = stem if stem == Path(cloth).stem else f"{stem}__{Path(cloth).stem}"
        image = _image(root / "image" / person, where, "image", sample_id)
        samples.append(Sample(
            id=sample_id, index=len(samples),
            image=image, mask=_image(root / "agnostic-mask" / f"{stem}_mask.png", where, "mask", sample_id),
            reference=_image(root / "cloth" / cloth, where, "cloth", sample_id),
            ref_mask=_image(root / "cloth-mask" / cloth, where, "cloth mask", sample_id),
            ground_truth=image if stem == Path(cloth).stem else None, source=where))
    return check_samples(samples, pairs)


def _references(given, folder, where, sample_id):
    """A manifest's "reference": one path, or a non-empty list of paths (several references)."""
    if isinstance(given, str):
        return _image(folder / given, where, "reference", sample_id)
    if not (isinstance(given, list) and given and all(isinstance(p, str) for p in given)):
        raise DatasetError(f"{where}: reference must be a path or a non-empty list of paths, got {given!r}")
    return [_image(folder / p, where, f"reference {r}", sample_id) for r, p in enumerate(given)]


def _image(path, where, what, sample_id):
    """path, checked to be an image file that decodes."""
    if not Path(path).is_file():
        raise DatasetError(f"{where}: {what} file not found: {path} (sample id {sample_id!r})")
    try:
        with Image.open(path) as img:
            img.verify()
    except (OSError, UnidentifiedImageError, SyntaxError) as err:  # PIL's decoders raise all three
        raise DatasetError(f"{where}: {what} {path} is not a readable image: {err} (sample id {sample_id!r})") from None
    return Path(path)


def check_samples(samples, source="the samples"):
    """samples, their ids normalised (see the module docstring) and checked to be distinct file
    names, and their seeds integers; an error names the sample (its manifest line) and id."""
    if not samples:
        raise DatasetError(f"{source}: no samples")
    seen = {}
    for s in samples:
        where = s.source or f"{source}, sample {s.index}"
        s.id = _file_name(s.id, where)
        if s.seed is not None:
            try:
                s.seed = as_int(s.seed, "seed")
            except TypeError as err:
                raise DatasetError(f"{where}: {err}, an integer (sample id {s.id!r})") from None
        key = s.id.casefold()
        if key in seen:
            raise DatasetError(f"{where}: sample id {s.id!r} appears twice: {seen[key]} has it too (ids name the "
                               "result files and must differ after normalisation)")
        seen[key] = where
    return samples


def _file_name(sample_id, where):
    """The id as the file name it becomes: "./s0" -> "s0"; a folder, a separator or an id that
    leaves the output folder is an error."""
    name = unicodedata.normalize("NFC", str(sample_id)).strip()
    name = posixpath.normpath(name) if name else name
    if name in ("", ".", "..") or name.startswith("../") or "/" in name or "\\" in name or "\0" in name:
        raise DatasetError(f"{where}: sample id {sample_id!r} must be a file name (ids name the result files "
                           "inside the output folder): no '/', '\\' or '..'")
    return name
