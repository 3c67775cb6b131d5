"""One traced generation (after DAAM's GenerationExperiment): a seeded pipeline call under
i2am.trace, and what it gives, the image and the maps, in one small object.

    gen = i2am.generation.run_traced(pipe, dict(image=image, mask_image=mask, **inputs),
                                     ref_grid=(16, 16), mask=mask, seed=0)
    gen.image, gen.maps                         # the first generated image, i2am.AttributionMaps
    gen.write_report("report", reference=reference)

`i2am run`, `i2am eval` and `i2am demo` make every generation through run_traced, so the
three give the same maps for the same call, settings and seed. run_report is `i2am run`: a
pipeline kind of i2am.pipelines from its model and files to its report folder.
"""
import os
from dataclasses import dataclass, field

import torch

from . import pipelines
from .config import TraceConfig, check_groups
from .inputs import check_device, check_out
from .probes import check_probes
from .tracing import trace


@dataclass
class Generation:
    image: object                # the first generated image, as the pipeline returned it
    maps: object                 # i2am.AttributionMaps
    seed: int = None             # the seed of the call's CPU generator
    ref_mask: object = None      # binary (H, W) on the reference as the model saw it; None: no IMACS_r
    scores: dict = field(default_factory=dict)  # scores of the run beside IMACS (the demo's correspondence)
    true_sources: dict = None    # {latent point: reference patch} its content truly comes from (synthetic data)
    ground_truth: object = None  # the expected image, framed as `image` (an evaluation's SSIM and LPIPS)

    def write_report(self, out_dir, **options):
        """report.write_report of this generation into out_dir: its image, maps, ref_mask, scores
        and true sources (options: write_report's, e.g. reference=, settings=, extra_images=);
        returns the scores written."""
        from .report import write_report

        options.setdefault("ref_mask", self.ref_mask)
        options.setdefault("true_sources", self.true_sources)
        options["extra_scores"] = {**self.scores, **(options.get("extra_scores") or {})}
        return write_report(out_dir, self.maps, image=self.image, **options)


def run_traced(pipe, call, config=None, *, seed=0, target=None, **settings):
    """``pipe(**call, generator=torch.Generator().manual_seed(seed))`` under
    ``i2am.trace(target, config, **settings)`` (target: what is traced, default `pipe`; a
    pipeline that is not diffusers' traces its denoiser) -> Generation(the first image of the
    output (``output.images[0]``, or ``output[0]`` for a pipeline returning a batch), the maps,
    seed)."""
    with trace(pipe if target is None else target, config, **settings) as traced:
        output = pipe(**call, generator=torch.Generator().manual_seed(seed))
    return Generation(getattr(output, "images", output)[0], traced.maps(), seed)


def run_report(kind, model, out, config=None, *, reference, image=None, mask=None, ref_mask=None, prompt="",
               steps=50, guidance=None, seed=0, device=None, dtype="auto", overwrite=False, progress=True,
               threshold=0.4, alpha=0.5, imacs_threshold=0.4, **options):
    """`i2am run` from Python: one seeded generation of the pipeline `kind` (pipelines.load of
    `model` with the kind's load options, e.g. ip_adapter) traced under `config` (an
    i2am.TraceConfig: time groups, probes, regions, protocol, backend, ...; the sample gives its
    ref_grid and mask), written as the report folder `out` (new or empty, unless overwrite, as
    inputs.check_out) -> the scores. Every argument is checked before the model loads. guidance:
    None is the kind's own (Kind.guidance); threshold, alpha, imacs_threshold: write_report's."""
    config = TraceConfig() if config is None else config
    check_out(out, report=True, overwrite=overwrite)
    device = check_device(device, config.backend)
    check_groups(config.time_groups, steps)
    pipelines.check_protocols_of(kind, [config.protocol])
    given = pipelines.read(kind, image=image, mask=mask, reference=reference, ref_mask=ref_mask, prompt=prompt)
    pipe = pipelines.load(kind, model, device=device, dtype=dtype, progress=progress, **options)
    x = pipelines.inputs(kind, pipe, **given)
    if config.regions is not None:  # the maps live on two regions of the one latent
        x = pipelines.on_regions(x, config.regions)
    check_probes(x.latent_size, x.ref_grids or x.ref_grid, config.points, config.boxes, config.patches)
    guidance = pipelines.KINDS[kind].guidance_scale(guidance)
    call = dict(**x.call, num_inference_steps=steps, guidance_scale=guidance)
    gen = run_traced(pipe, call, config.replace(ref_grid=None if config.regions else x.ref_grid, mask=x.mask),
                     seed=seed)
    files = {name: _file_names(given) for name, given in (
        ("image", image), ("mask", mask), ("reference", reference), ("ref_mask", ref_mask))}
    settings = {"pipeline": kind, "model": str(model), **{k: v for k, v in files.items() if v is not None},
                "prompt": prompt, "steps": steps, "guidance": guidance, "seed": seed, "backend": config.backend,
                "attention": config.attention, **options, "device": device,
                "dtype": str(pipe.dtype).removeprefix("torch."), "height": x.call["height"], "width": x.call["width"]}
    return gen.write_report(out, reference=x.reference, ref_mask=x.ref_mask, settings=settings,
                            extra_images={name: im for name, im in x.images.items() if im is not None},
                            threshold=threshold, alpha=alpha, imacs_threshold=imacs_threshold)


def _file_names(given):
    """A file argument as the report records it: its path, a list of paths (one: that path), or
    None for an image given as an object or not given."""
    if isinstance(given, (list, tuple)):
        names = [_file_names(one) for one in given]
        return None if None in names else names[0] if len(names) == 1 else names
    return str(given) if isinstance(given, (str, os.PathLike)) else None
