"""Evaluation data sets: what one sample holds, read from a JSONL manifest or a VITON-HD-like folder.

DATA_SETS below says what a sample holds and how a manifest or a folder describes the samples
(`i2am eval --help` shows the same text). Which inputs a pipeline needs and refuses is
i2am.pipelines.sample_rules; sizes and masks are checked by i2am.pipelines.read as each sample
is generated.
"""
import json
import posixpath
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..inputs import InputError
from ..integers import as_int
from ..pipelines import sample_rules

PAIRS_FILE = "test_pairs.txt"
INPUTS = ("image", "mask", "reference", "ref_mask", "prompt", "ground_truth")  # a manifest's keys beside id, seed

DATA_SETS = """\
For an inpainting pipeline a sample is the image to inpaint (also the real image the FID and KID
compare with), its inpainting mask (white = fill), the reference and its mask (e.g. the cloth
mask, for IMACS_r), and the ground truth for SSIM and LPIPS (in a paired setting: the image
itself). For an editor (flux-kontext, qwen-image-edit-plus, flux2) a sample is its references and
its edit instruction (the prompt), with optionally the edited region (mask, for IMACS_g of each
reference), each reference's mask (ref_mask, for IMACS_r) and the expected edit (ground truth,
for SSIM and LPIPS, and the real image of FID and KID), and no image.

JSONL manifest, one sample a line (wrapped here), paths relative to the manifest's folder:

  {"id": "00001_00", "image": "image/00001_00.jpg", "mask": "agnostic-mask/00001_00_mask.png",
   "reference": "cloth/00001_00.jpg", "ref_mask": "cloth-mask/00001_00.jpg",
   "ground_truth": "image/00001_00.jpg", "prompt": "", "seed": 7}
  {"id": "tryon_3", "reference": ["person/3.jpg", "shirt/9.jpg"],
   "prompt": "the person wears the shirt", "mask": "edit/3.png",
   "ref_mask": [null, "shirt-mask/9.png"], "ground_truth": "result/3.jpg"}

"reference" may be a list of paths, for a pipeline of several references (ref 0 first);
"ref_mask" then is a list as long (null for a reference without one). An editor's mask and
ground truth are the size of the reference its output takes its frame from (flux2: ref 0;
qwen-image-edit-plus: the last). "seed" is optional (an integer, added to the run's seed;
default the sample's line number); an editor's sample without its own "prompt" takes the
default prompt (`i2am eval --prompt`), and with neither is an error. An id names the sample's
result files (default: the image's file name, an editor's first reference's): it is a file name
(no folder, no "/" or "\\"), distinct from every other id after normalisation ("./s0" is "s0";
letter case and Unicode forms do not tell ids apart). Every image is checked to decode when the
data set is loaded, so that a bad sample stops the run before any generation.

Folder (VITON-HD's test split, with StableVITON's agnostic masks): image/, agnostic-mask/
(NAME_mask.png), cloth/, cloth-mask/, and test_pairs.txt ("person.jpg cloth.jpg" a line) in the
folder or beside it. A pair whose cloth is the person's own (the same name) is paired: its
image is the ground truth; an unpaired pair has none (FID and KID only).
"""


class DatasetError(InputError):
    """A manifest or folder that does not describe samples; the message names the file."""


@dataclass
class Sample:
    """One evaluation sample. Images are file paths or in-memory images (PIL or tensors)."""

    id: str
    index: int
    image: object  # None for an editor's sample
    mask: object  # None for an editor's sample without an edited region
    reference: object  # one image, or a list of them (several references, ref 0 first)
    ref_mask: object = None
    ground_truth: object = None
    prompt: str = ""
    seed: int = None
    extra: dict = field(default_factory=dict)  # data-set-specific inputs (the demo's warp)
    source: str = ""  # where the sample is described ("pairs.jsonl, line 3"), for error messages

    @property
    def real(self):
        """The real image FID and KID compare with: the image to inpaint; an editor's (no image)
        ground truth; None when there is neither."""
        return self.image if self.image is not None else self.ground_truth


def load_dataset(path, kind=None, prompt=""):
    """Samples from a .jsonl manifest or a VITON-HD-like folder for the pipeline `kind` (its
    i2am.pipelines.sample_rules; None: an inpainting pipeline's). prompt: the default prompt of
    samples without their own (an editor's samples need one or the other)."""
    path = Path(path)
    if path.is_dir():
        return load_folder(path, kind)
    if path.is_file():
        return load_manifest(path, kind, prompt)
    raise DatasetError(f"data set not found: {path} (a .jsonl manifest or a folder with image/, "
                       f"agnostic-mask/, cloth/, cloth-mask/ and {PAIRS_FILE})")


def load_manifest(path, kind=None, prompt=""):
    path = Path(path)
    needed, refused = sample_rules(kind)
    pipeline = f"the {kind} pipeline" if kind else "an inpainting pipeline"
    samples = []
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        where = f"{path}, line {n + 1}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as err:
            raise DatasetError(f"{where}: not JSON ({err})") from None
        if not isinstance(entry, dict):
            raise DatasetError(f"{where}: a sample is a JSON object ({{\"reference\": ..., ...}}), got {line.strip()!r}")
        unknown = set(entry) - {"id", "seed", *INPUTS}
        if unknown:
            raise DatasetError(f"{where}: unknown keys {', '.join(sorted(unknown))}")
        for key, why in refused.items():
            if entry.get(key) not in (None, ""):
                raise DatasetError(f"{where}: \"{key}\" is not an input of {pipeline}: {why}; leave it out")
        missing = [key for key in needed if entry.get(key) in (None, "") and not (key == "prompt" and prompt)]
        if missing:
            what = ", ".join(f"{key} ({needed[key]})" for key in missing)
            default = "; or a default prompt (--prompt) for the samples without one" if "prompt" in missing else ""
            raise DatasetError(f"{where}: lacks {what}, which {pipeline} needs{default}")
        if not isinstance(entry.get("prompt", ""), str):
            raise DatasetError(f"{where}: prompt must be a text, got {entry['prompt']!r}")
        references = entry["reference"]
        first = references[0] if isinstance(references, list) and references else references
        sample_id = str(entry.get("id", Path(str(entry.get("image") or first)).stem))
        files = {key: _image(path.parent / entry[key], where, key, sample_id) if entry.get(key) else None
                 for key in ("image", "mask", "ground_truth")}
        files["reference"] = _references(references, path.parent, where, sample_id)
        if entry.get("ref_mask") is not None:
            files["ref_mask"] = _ref_masks(entry["ref_mask"], files["reference"], path.parent, where, sample_id)
        samples.append(Sample(id=sample_id, index=len(samples), prompt=entry.get("prompt", ""),
                              seed=entry.get("seed"), source=where, **files))
    return check_samples(samples, path)


def load_folder(root, kind=None):
    root = Path(root)
    if "image" in sample_rules(kind)[1]:
        raise DatasetError(f"{root}: a VITON-HD-like folder holds inpainting samples (image, mask, cloth); the {kind} "
                           "pipeline edits its references: describe its samples in a .jsonl manifest")
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


def _ref_masks(given, references, folder, where, sample_id):
    """A manifest's "ref_mask": a path beside one reference path; beside a list of them, a list as
    long of paths or nulls (one per reference)."""
    if isinstance(references, list):
        if not (isinstance(given, list) and len(given) == len(references)
                and all(p is None or isinstance(p, str) for p in given)):
            raise DatasetError(f"{where}: ref_mask must be a list like reference, one path or null per reference "
                               f"(ref 0 first; {len(references)} here), got {given!r}")
        return [None if p is None else _image(folder / p, where, f"ref_mask {r}", sample_id)
                for r, p in enumerate(given)]
    if not isinstance(given, str):
        raise DatasetError(f"{where}: ref_mask must be a path (reference is one path), got {given!r}")
    return _image(folder / given, where, "ref_mask", sample_id)


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
    """samples, their ids normalised (see DATA_SETS) and checked to be distinct file
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
