"""The rules for what users pass: images, masks, devices, backends, protocols, output folders.

Every check raises InputError (a ValueError) whose message names the argument and what was
expected. Arguments are named as Python keywords (ref_mask, (8, 0)); inside
command_line_spelling() as the `i2am` command's options (--ref-mask, 8,0), so the command
reports the library's own message and exits with 2.

One rule for every mask (i2am.trace, AttributionMaps.imacs, i2am.viz, the `i2am` command):
1 marks the region to fill (the inpainting mask) or the region of interest (a reference mask);
values are scaled to [0, 1] (PIL images and integer arrays divided by their type's range: 255
for 8 bits, 65535 for 16 bits; bool as 0/1; other numbers must already lie in [0, 1]) and a
pixel is inside when its value is > 0.5. Images are read the same way: a 16-bit PNG is scaled,
never clipped.
"""
import os
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

_COMMAND_LINE = ContextVar("i2am_command_line_spelling", default=False)

# PIL modes beyond 8 bits and the value of full white: 16-bit files open as I;16 (or as I, 32-bit
# integers holding 16-bit data, in older Pillow); F holds floats in [0, 1]
HIGH_BIT_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}
INTEGER_RANGES = {np.dtype(np.uint8): 255, np.dtype(np.uint16): 65535}


class InputError(ValueError):
    """A bad argument: the message names it and says what was expected."""


@contextmanager
def command_line_spelling():
    """Inside, input errors name arguments as the command's options and coordinates as typed."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


def arg(name):
    """The argument `name` (a Python keyword) as the user wrote it: ref_mask or --ref-mask."""
    return "--" + name.replace("_", "-") if _COMMAND_LINE.get() else name


def coords(values):
    """Grid coordinates as the user wrote them: (8, 0) or 8,0."""
    values = tuple(int(v) for v in values)
    return ",".join(map(str, values)) if _COMMAND_LINE.get() else str(values)


def as_mask(mask, what="mask", *, batched=False):
    """The mask as a bool tensor (H, W), or (B, H, W) when batched, by the rule above.

    Leading (and, for arrays, one trailing) axes of size 1 are dropped: (1, 1, H, W) and
    (H, W, 1) are (H, W) masks."""
    if isinstance(mask, Image.Image):
        mask = np.asarray(as_8bit(mask, what).convert("L"))
    if isinstance(mask, np.ndarray) and mask.dtype in INTEGER_RANGES and mask.dtype != np.uint8:
        mask = mask / INTEGER_RANGES[mask.dtype]  # uint8 keeps its exact > 127 rule below
    m = mask.detach().cpu() if torch.is_tensor(mask) else torch.from_numpy(np.array(mask))
    if m.dim() == 3 and m.shape[-1] == 1:
        m = m[..., 0]
    while m.dim() > 2 and m.shape[0] == 1 and not (batched and m.dim() == 3):
        m = m[0]
    if m.dim() != 2 and not (batched and m.dim() == 3):
        form = "2-D (H, W) or 3-D (B, H, W)" if batched else "2-D (H, W)"
        raise InputError(f"{what} must be {form} (axes of size 1 allowed), got shape {tuple(m.shape)}")
    if m.dtype == torch.bool:
        return m
    if m.dtype == torch.uint8:
        return m > 127  # > 0.5 after dividing by 255
    if not (m.is_floating_point() or m.dtype in (torch.int8, torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{what} must hold numbers or bools, got {m.dtype}")
    m = m.double()
    if not torch.isfinite(m).all():
        raise InputError(f"{what} must hold finite values in [0, 1] (1 = inside, 0 = outside), got NaN or inf")
    if m.min() < 0 or m.max() > 1:
        raise InputError(f"{what} must hold values in [0, 1] (1 = inside; PIL images and uint8 arrays are "
                         f"read as 0-255), got values from {m.min().item():g} to {m.max().item():g}")
    return m > 0.5


def to_pil(image):
    """An RGB PIL image from a PIL image or a (3, H, W) / (H, W, 3) / (H, W) array or tensor with
    floats in [0, 1], uint8 or uint16 values."""
    if isinstance(image, Image.Image):
        return as_8bit(image).convert("RGB")
    a = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if a.dtype in INTEGER_RANGES and a.dtype != np.uint8:
        a = a / INTEGER_RANGES[a.dtype]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] != 3):
        raise ValueError(f"an image must be (3, H, W), (H, W, 3) or (H, W), got shape {a.shape}")
    if a.dtype != np.uint8:
        a = np.round(np.clip(a.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    return Image.fromarray(a).convert("RGB")


def open_image(source, what, mode="RGB"):
    """A PIL image in `mode` from a file path, a PIL image or an array or tensor (to_pil's forms);
    `what` names the argument."""
    if isinstance(source, Image.Image):
        return as_8bit(source, arg(what)).convert(mode)
    if not isinstance(source, (str, os.PathLike)):
        return to_pil(source).convert(mode)
    if not Path(source).is_file():
        raise InputError(f"{arg(what)} file not found: {source}")
    try:
        with Image.open(source) as img:
            return as_8bit(img, f"{arg(what)} {source}").convert(mode)
    except (OSError, UnidentifiedImageError) as err:
        raise InputError(f"cannot read {arg(what)} {source}: {err}") from err


def as_8bit(img, what="image"):
    """A PIL image as an 8-bit one: the modes of HIGH_BIT_MODES divided by their full white
    (values outside it are an error, not clipped); 8-bit images are returned as they are."""
    top = HIGH_BIT_MODES.get(img.mode)
    if top is None:
        return img
    a = np.asarray(img, dtype=np.float64) / top
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise InputError(f"{what} (PIL mode {img.mode}) must hold values in [0, {top:g}], got values from "
                         f"{np.nanmin(a) * top:g} to {np.nanmax(a) * top:g}")
    return Image.fromarray(np.round(a * 255).astype(np.uint8), "L")


def binary_mask(mask, what="mask", how=""):
    """A mask (the rule above) as 0/1 float (H, W) that marks a region: neither empty nor everywhere.
    how: what was done to it, for the message (", cropped as the reference,")."""
    m = as_mask(mask, arg(what)).float()
    if m.sum() == 0 or m.sum() == m.numel():
        raise InputError(f"{arg(what)}{how} is {'empty' if m.sum() == 0 else 'white everywhere'}: it must mark "
                         "a region (white) and leave the rest black")
    return m


def same_size(image, what, other, other_what):
    """image and other (PIL images) of one size, or an error naming both."""
    if image.size != other.size:
        raise InputError(f"{arg(what)} is {_wxh(image)} but {arg(other_what)} is {_wxh(other)}: they must be "
                         "the same size")


def _wxh(img):
    return f"{img.width}x{img.height}"


def check_out(out, what="out", *, report=False, overwrite=False):
    """The output folder can be made and written: checked before any work is done. report: the
    folder of one report, new or empty, or with overwrite one holding only an earlier i2am report
    (the files its scores.json lists, which write_report then replaces); files i2am did not write
    are never removed: they stop it."""
    path = Path(out)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{arg(what)} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"{arg(what)} {path}: {existing} is not writable")
    present = sorted(p.name for p in path.iterdir()) if report and path.is_dir() else []
    if not present:
        return
    if not overwrite:
        raise InputError(f"{arg(what)} {path} is not empty ({_names(present)}): choose a new folder, or "
                         f"pass {arg('overwrite')} to replace the i2am report it holds")
    from .report import report_files

    foreign = sorted(set(present) - set(report_files(path)))
    if foreign:
        raise InputError(f"{arg(what)} {path} holds files that are not an i2am report's ({_names(foreign)}); "
                         "overwriting replaces only a report i2am wrote: move them, or choose a new folder")


def check_out_file(path, what):
    """An output file can be written: not a folder, and its folder can be made and written."""
    if Path(path).is_dir():
        raise InputError(f"{arg(what)} {path} is a folder, not a file")
    check_out(Path(path).parent, what)


def _names(names, shown=4):
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def check_device(device=None, backend="auto"):
    """The torch device name of a run (default: cuda when available, else cpu), checked to exist
    and to support the attention backend."""
    from .kernels import triton_available

    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"{arg('device')} {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        missing = "is available" if dev.index is None else "with that index"
        raise InputError(f"{arg('device')} {name}: no CUDA device {missing}")
    if (backend == "triton" and not triton_available(dev)) or (backend == "cuda" and dev.type != "cuda"):
        raise InputError(f"{arg('backend')} {backend} needs a CUDA device"
                         f"{' and triton installed' * (backend == 'triton')} (this run's device is {name}); "
                         f"use {arg('backend')} auto or torch")
    if backend == "cuda":
        from .kernels.cuda_backend import CudaBackendError, load_library

        try:
            load_library()
        except CudaBackendError as err:
            raise InputError(f"{arg('backend')} cuda: {err}") from None
    return name


def check_protocols(protocols, allowed=None, model="this model"):
    """The protocols of a run (one traced generation each): known, each once, and among `allowed`
    (those defined for `model`) when given."""
    from .protocols import PROTOCOLS

    protocols, known = list(protocols), ", ".join(PROTOCOLS)
    if not protocols:
        raise InputError(f"no {arg('protocol')} given: choose one or more of {known}")
    for p in protocols:
        if p not in PROTOCOLS:
            raise InputError(f"unknown {arg('protocol')} {p!r}: choose one or more of {known}")
        if allowed is not None and p not in allowed:
            raise InputError(f"{arg('protocol')} {p} is not defined for {model} (the official protocol "
                             f"reproduces the authors' UNet code): use {arg('protocol')} {' or '.join(allowed)}")
    if len(set(protocols)) != len(protocols):
        raise InputError(f"{arg('protocol')} given twice: {' '.join(protocols)}")
    return protocols
