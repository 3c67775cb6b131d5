"""What an evaluation generates: the traced run of one sample under one protocol.

A task knows its model and samples; `run(sample, protocol, seed)` makes one traced generation
and returns an i2am.generation.Generation (image as uint8 (3, H, W), maps, ref_mask, scores).
DemoTask is the embedded demo model over its synthetic data (where the true correspondence is
known), generated as `i2am demo` does (i2am.demo.run.analyse); PipelineTask is a diffusers
pipeline as `i2am run` loads it, generated as `i2am run` does (i2am.generation.run_traced).
"""
from pathlib import Path

import numpy as np
import torch

from .. import generation
from ..generation import Generation
from ..protocols import PROTOCOLS
from ..viz import to_pil
from .datasets import Sample


def check_protocols(protocols):
    protocols, known = list(protocols), ", ".join(PROTOCOLS)
    if not protocols:
        raise ValueError(f"no protocol given: choose one or more of {known}")
    for p in protocols:
        if p not in PROTOCOLS:
            raise ValueError(f"unknown protocol {p!r}: choose one or more of {known}")
    if len(set(protocols)) != len(protocols):
        raise ValueError(f"protocol given twice: {' '.join(protocols)}")
    return protocols


def as_uint8(image):
    """(3, H, W) uint8 tensor from a path, a PIL image or a float tensor in [0, 1]."""
    if isinstance(image, (str, Path)):
        image = _open(image, "RGB")
    return torch.from_numpy(np.array(to_pil(image))).permute(2, 0, 1).contiguous()


def as_mask(mask):
    """Binary float (H, W) from a path, a PIL image (white = 1) or a tensor (> 0.5 = 1)."""
    if isinstance(mask, torch.Tensor):
        return (mask.squeeze() > 0.5).float()
    if isinstance(mask, (str, Path)):
        mask = _open(mask, "L")
    return torch.from_numpy(np.asarray(mask.convert("L")) > 127).float()


def _open(path, mode):
    from PIL import Image

    with Image.open(path) as img:
        return img.convert(mode)


class DemoTask:
    """The embedded demo model over `samples` synthetic examples (seeded, held out from training).

    Each generation traces the probe points of the demo, so that the correspondence accuracy
    (the fraction of probes whose specific-reference map peaks within one patch of the true
    source) stands beside IMACS; the always-the-same-patch baseline is recorded with it.
    """

    correlated = ("correspondence_accuracy",)  # the per-sample scores IMACS is set against
    SEED = 4321  # its own stream: not the demo's examples, not the training stream

    def __init__(self, samples=32, steps=10, device="cpu", backend="auto"):
        from ..demo import data, model, run

        self._data, self._run = data, run
        self.steps, self.device, self.backend = steps, device, backend
        self.pipe = model.load_pipeline(device=device)
        self.pipe.set_progress_bar_config(disable=True)
        self.count = samples
        self.settings = {"model": "i2am demo (embedded)", "samples": samples, "steps": steps,
                         "guidance": run.GUIDANCE, "time_groups": min(run.TIME_GROUPS, steps),
                         "points_per_sample": run.POINTS, "data_seed": self.SEED, "backend": backend}

    def samples(self):
        batch = self._data.make_batch(self.count, seed=self.SEED)
        return [Sample(id=f"demo_{b:03d}", index=b, image=batch["target"][b], mask=batch["mask"][b, 0],
                       reference=batch["reference"][b], ref_mask=batch["ref_mask"][b, 0],
                       ground_truth=batch["target"][b], seed=b,
                       extra={"masked": batch["masked"][b], "warp": batch["warp"][b:b + 1]})
                for b in range(self.count)]

    def run(self, sample, protocol, seed):
        example = {"reference": sample.reference[None], "masked": sample.extra["masked"][None],
                   "mask": sample.mask[None, None], "warp": sample.extra["warp"]}
        gen = self._run.analyse(self.pipe, example, seed=seed, steps=self.steps, backend=self.backend,
                                protocol=protocol, traced_as=protocol)
        return Generation(as_uint8(gen.image), gen.maps, seed, as_mask(sample.ref_mask), gen.scores)


class PipelineTask:
    """A diffusers pipeline as `i2am run` loads it.

    load(reference) -> (pipe, ref_grid, the pipeline call's reference inputs), as `i2am run`'s
    loaders return them; seen(pipe, image) -> the reference-side image as the model's encoder
    sees it (resized and cropped), which is where the reference mask is scored.
    """

    correlated = ()

    def __init__(self, load, seen, *, steps=50, guidance=5.0, time_groups=5, convention="official",
                 backend="auto", settings=None):
        self.load, self.seen = load, seen
        self.steps, self.guidance, self.time_groups = steps, guidance, time_groups
        self.convention, self.backend = convention, backend
        self.settings = {**(settings or {}), "steps": steps, "guidance": guidance, "time_groups": time_groups,
                         "convention": convention, "backend": backend}

    def run(self, sample, protocol, seed):
        image, mask_image = _open(sample.image, "RGB"), _open(sample.mask, "L")
        if mask_image.size != image.size:
            raise ValueError(f"sample {sample.id}: its mask is {mask_image.size} but its image is {image.size}")
        reference = _open(sample.reference, "RGB")
        # the loader takes the reference: a model encoding it at load time is loaded per sample
        pipe, ref_grid, inputs = self.load(reference)
        pipe.set_progress_bar_config(disable=True)
        if sample.prompt:
            inputs = {**inputs, "prompt": sample.prompt}

        call = dict(image=image, mask_image=mask_image, height=image.height, width=image.width,
                    num_inference_steps=self.steps, guidance_scale=self.guidance, **inputs)
        gen = generation.run_traced(pipe, call, seed=seed, ref_grid=ref_grid, time_groups=self.time_groups,
                                    mask=as_mask(mask_image), convention=self.convention, protocol=protocol,
                                    backend=self.backend)
        gen.image = as_uint8(gen.image)
        if sample.ref_mask is not None:
            gen.ref_mask = as_mask(self.seen(pipe, _open(sample.ref_mask, "L")).convert("L"))
        return gen
