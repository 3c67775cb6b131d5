"""What an evaluation generates: the traced run of one sample under one protocol.

A task knows its model and samples; `run(sample, protocol, seed)` makes one traced generation
and returns an i2am.generation.Generation (image as uint8 (3, H, W), maps, ref_mask, scores, and
the sample's ground truth as uint8 framed as the image, or None).
DemoTask is the embedded demo model over its synthetic data (where the true correspondence is
known), generated as `i2am demo` does (i2am.demo.run.analyse); PipelineTask is a diffusers
pipeline as `i2am run` loads it, generated as `i2am run` does (i2am.generation.run_traced).
"""
from pathlib import Path

import numpy as np
import torch

from .. import generation, pipelines
from ..generation import Generation
from ..inputs import InputError, as_mask, open_image, to_pil
from .datasets import Sample


def as_uint8(image):
    """(3, H, W) uint8 tensor from a path, a PIL image or a float tensor in [0, 1]."""
    if isinstance(image, (str, Path)):
        image = open_image(image, "image")
    return torch.from_numpy(np.array(to_pil(image))).permute(2, 0, 1).contiguous()


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
        gen = self.traced(sample, seed, protocol)
        return Generation(as_uint8(gen.image), gen.maps, seed, as_mask(sample.ref_mask).float(), gen.scores,
                          ground_truth=as_uint8(sample.ground_truth))

    # ---- what the faithfulness evaluation (i2am.evaluation.faithfulness) asks of a task ----------
    def traced(self, sample, seed, protocol="paper"):
        """run()'s traced generation with the image as it came, (3, H, W) floats in [0, 1]."""
        return self._run.analyse(self.pipe, self._example(sample), seed=seed, steps=self.steps,
                                 backend=self.backend, protocol=protocol, traced_as=protocol)

    def points(self, sample):
        """The probe points (P, 2) traced in the sample's generation, on the latent grid."""
        return self._run.probe_points(self.pipe, sample.mask)

    def generate(self, sample, seed, reference=None):
        """The image (3, H, W) of the same seeded generation untraced, with the sample's reference
        or another one (3, R, R)."""
        call = self._run.pipeline_call(self._example(sample, reference), self.steps)
        return self.pipe(**call, generator=torch.Generator().manual_seed(seed))[0].cpu()

    @staticmethod
    def _example(sample, reference=None):
        """The sample as the demo's batch of one."""
        return {"reference": (sample.reference if reference is None else reference)[None],
                "masked": sample.extra["masked"][None], "mask": sample.mask[None, None],
                "warp": sample.extra["warp"]}


class PipelineTask:
    """A pipeline of i2am.pipelines (`kind`, as `i2am run` loads it), loaded once at construction:
    each sample is only prepared (pipelines.inputs, as `i2am run` prepares its inputs: the mask
    and ground truth framed as the output) and generated. options: the kind's load options
    (ip-adapter's ip_adapter and ip_adapter_scale); prompt: the prompt of samples without their
    own (a sample's own prompt wins)."""

    correlated = ()

    def __init__(self, kind, model, *, device="cpu", dtype="auto", prompt="", steps=50, guidance=5.0,
                 time_groups=5, convention="official", backend="auto", settings=None, **options):
        self.kind, self.prompt = kind, prompt
        self.pipe = pipelines.load(kind, model, device=device, dtype=dtype, progress=False, **options)
        self.steps, self.guidance, self.time_groups = steps, guidance, time_groups
        self.convention, self.backend = convention, backend
        own = {"pipeline": kind, "model": str(model), "dtype": str(self.pipe.dtype).removeprefix("torch."),
               **({"prompt": prompt} if pipelines.KINDS[kind].takes_prompt else {}), **options}
        self.settings = {**own, **(settings or {}), "steps": steps, "guidance": guidance,
                         "time_groups": time_groups, "convention": convention, "backend": backend}

    def run(self, sample, protocol, seed):
        pipe = self.pipe
        try:
            x = pipelines.inputs(self.kind, pipe, image=sample.image, mask=sample.mask, reference=sample.reference,
                                 ref_mask=sample.ref_mask, prompt=sample.prompt or self.prompt,
                                 ground_truth=sample.ground_truth)
        except InputError as err:
            raise InputError(f"sample {sample.id}: {err}") from err

        call = dict(**x.call, num_inference_steps=self.steps, guidance_scale=self.guidance)
        gen = generation.run_traced(pipe, call, seed=seed, ref_grid=x.ref_grid, time_groups=self.time_groups,
                                    mask=x.mask, convention=self.convention, protocol=protocol, backend=self.backend)
        gen.image, gen.ref_mask = as_uint8(gen.image), x.ref_mask
        gen.ground_truth = None if x.ground_truth is None else as_uint8(x.ground_truth)
        return gen
