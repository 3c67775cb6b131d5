"""`i2am demo`: analyse the shipped tiny try-on model, where the true correspondence is known.

For each fixed example the model inpaints the masked target with 50 DDIM steps and
classifier-free guidance under i2am.trace (time groups, the inpainting mask, probe points
inside the mask). Because the data is synthetic, the reference patch each probe point really
comes from is known (the warp): the correspondence accuracy is the fraction of points whose
specific-reference map peaks within one patch of it. The same is measured on a copy of the
model with its cross-attention re-initialised: attribution that survives randomisation is
not attribution.
"""
import json
import time
from pathlib import Path

from tqdm.auto import tqdm

from ..generation import run_traced
from ..inputs import check_device, check_out
from . import data, model

STEPS, GUIDANCE, TIME_GROUPS, POINTS, SEED = 50, 2.0, 5, 8, 0


def near(a, b):
    """Within one patch (8-neighbourhood) of each other."""
    return max(abs(a[0] - b[0]), abs(a[1] - b[1])) <= 1


def correspondence(maps, points, true_patches):
    """Fraction of points whose specific-reference map peaks within one patch of the truth."""
    hits = []
    for p, truth in zip(points.tolist(), true_patches.tolist()):
        m = maps.specific_reference(p, normalize=False)
        hits.append(near(divmod(int(m.argmax()), m.shape[1]), truth))
    return sum(hits) / len(hits)


def best_single_patch(true_patches, grid):
    """The baseline that needs no attribution: the accuracy of always answering the one patch
    that is right most often (a garment's middle patch is near many sources)."""
    truths = true_patches.tolist()
    return max(sum(near((i, j), t) for t in truths) for i in range(grid[0]) for j in range(grid[1])) / len(truths)


def probe_points(pipe, mask):
    """The POINTS probe points (P, 2) inside an example's (T, T) inpainting mask, on the latent grid."""
    fold = pipe.config.fold
    return data.probe_points(mask, POINTS, grid=(mask.shape[0] // fold, mask.shape[1] // fold))


def pipeline_call(example, steps=STEPS):
    """The demo pipeline's keywords for an example (a batch of one), without the generator."""
    return dict(reference=example["reference"], masked=example["masked"], mask=example["mask"],
                num_inference_steps=steps, guidance_scale=GUIDANCE)


def analyse(pipe, example, *, seed, steps=STEPS, backend="auto", protocol="paper", traced_as="official"):
    """One traced generation of an example, a batch of one: reference (1, 3, R, R), masked
    (1, 3, T, T), mask (1, 1, T, T) and warp (1, ...) -> i2am.generation.Generation with the maps
    read under `protocol`, the image, the scores {"correspondence_accuracy",
    "correspondence_best_single_patch"} and each probe point's true source patch. It traces
    under `traced_as`: "official" buffers also hold everything "paper" reads, so that a report
    can give both protocols' scores of one run."""
    fold, encoder, mask = pipe.config.fold, pipe.reference_encoder, example["mask"][0, 0]
    points = probe_points(pipe, mask)
    patch = encoder.config.image_size // encoder.grid[0]
    truth = data.true_patch(example["warp"], points[None], patch, latent_scale=fold)[0]
    gen = run_traced(pipe, pipeline_call(example, steps), seed=seed, target=pipe.unet, ref_grid=encoder.grid,
                     num_steps=steps, time_groups=min(TIME_GROUPS, steps), mask=mask,
                     points=[tuple(p) for p in points.tolist()], protocol=traced_as, backend=backend)
    gen.maps = gen.maps.with_protocol(protocol)
    gen.image = gen.image.cpu()
    gen.scores = {"correspondence_accuracy": correspondence(gen.maps, points, truth),
                  "correspondence_best_single_patch": best_single_patch(truth, encoder.grid)}
    gen.true_sources = {tuple(p): tuple(t) for p, t in zip(points.tolist(), truth.tolist())}
    return gen


def run_demo(out="i2am-demo", device=None, backend="auto", examples=4, steps=STEPS, protocol="paper",
             progress=True):
    """Write one report per example under `out` (its maps, figures and scores under `protocol`,
    the IMACS of both protocols side by side), print the summary; returns the exit code 0.

    progress: a bar over the examples, and diffusers' bar over the steps of each generation
    (the trained model and its randomised copy). out, device and backend are checked first."""
    check_out(out)
    device = check_device(device, backend)
    start = time.perf_counter()
    pipe = model.load_pipeline(device=device)
    randomised = model.with_random_cross_attention(pipe)
    ex = data.examples(examples)
    out = Path(out)
    summary = {"protocol": protocol, "examples": [], "steps": steps, "guidance": GUIDANCE,
               "time_groups": TIME_GROUPS, "points_per_example": POINTS}
    keys = ("IMACS_g", "IMACS_r", "correspondence_accuracy", "correspondence_accuracy_randomised",
            "correspondence_best_single_patch")
    for b in tqdm(range(examples), desc="i2am demo", unit="example", disable=not progress):
        for p, which in ((pipe, "trained"), (randomised, "randomised attn2")):
            p.set_progress_bar_config(disable=not progress, leave=False, desc=f"example {b}, {which}")
        example = {name: ex[name][b:b + 1] for name in ("reference", "masked", "mask", "warp")}
        options = dict(seed=SEED + b, steps=steps, backend=backend, protocol=protocol)
        gen, random = analyse(pipe, example, **options), analyse(randomised, example, **options)
        accuracy, baseline = gen.scores["correspondence_accuracy"], gen.scores["correspondence_best_single_patch"]
        random_accuracy = random.scores["correspondence_accuracy"]
        gen.scores = {"correspondence_accuracy": accuracy, "correspondence_accuracy_randomised": random_accuracy,
                      "correspondence_best_single_patch": baseline}
        scores = gen.write_report(
            out / f"example_{b}", reference=ex["reference"][b], ref_mask=ex["ref_mask"][b, 0],
            settings={"steps": steps, "guidance": GUIDANCE, "seed": SEED + b, "backend": backend},
            extra_images={"target": ex["target"][b], "masked": ex["masked"][b], "ref_mask": ex["ref_mask"][b, 0]},
            title=f"i2am demo, example {b}", compare_protocols=True)
        summary["examples"].append({**{k: scores[k] for k in keys}, "by_protocol": scores["by_protocol"]})
        both = "  ".join(f"{name}: IMACS_g {s['IMACS_g']:.3f} IMACS_r {s['IMACS_r']:.3f}"
                         for name, s in scores["by_protocol"].items())
        tqdm.write(f"example {b}: {both}  correspondence {accuracy:.2f} (randomised attn2: {random_accuracy:.2f}, "
                   f"best single patch: {baseline:.2f})")
    for key in keys:
        summary[key] = sum(e[key] for e in summary["examples"]) / examples
    (out / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"mean ({protocol} protocol): IMACS_g {summary['IMACS_g']:.3f}  IMACS_r {summary['IMACS_r']:.3f}  correspondence accuracy "
          f"{summary['correspondence_accuracy']:.2f} vs {summary['correspondence_accuracy_randomised']:.2f} with "
          f"randomised cross-attention and {summary['correspondence_best_single_patch']:.2f} for the best single "
          f"patch; reports in {out}/example_*/report.md "
          f"({time.perf_counter() - start:.0f} s)")
    return 0

