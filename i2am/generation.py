"""One traced generation (after DAAM's GenerationExperiment): a seeded pipeline call under
i2am.trace, and what it gives, the image and the maps, in one small object.

    gen = i2am.generation.run_traced(pipe, dict(image=image, mask_image=mask, **inputs),
                                     ref_grid=(16, 16), mask=mask, seed=0)
    gen.image, gen.maps                         # the first generated image, i2am.AttributionMaps
    gen.write_report("report", reference=reference)

`i2am run`, `i2am eval` and `i2am demo` make every generation through run_traced, so the
three give the same maps for the same call, settings and seed.
"""
from dataclasses import dataclass, field

import torch

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
