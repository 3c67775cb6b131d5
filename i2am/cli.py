"""The `i2am` command: run an analysis of a pipeline, re-render saved maps, the demo, benchmarks,
data-set evaluation.

Exit codes: 0 success, 2 bad arguments (argparse errors and UsageError: missing files, a mask
of the wrong size, a probe off the grid, a model that is not available locally), 1 failure.
"""
import argparse
import importlib
import json
import logging
import math
import os
import re
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

from .protocols import PROTOCOLS

PIPELINES = ("paint-by-example", "sd-inpaint-patch", "ip-adapter", "flux-kontext")
BACKENDS = ("auto", "torch", "triton", "cuda")
DTYPES = ("auto", "float32", "float16", "bfloat16")


class UsageError(Exception):
    """A bad argument found after parsing; main reports it and exits with 2."""


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)  # bad arguments: argparse prints usage and exits with 2
    import matplotlib

    matplotlib.use("Agg")  # the figures are files: never an interactive backend
    try:
        with _library_warnings_silenced():
            return args.handler(args) or 0
    except UsageError as err:
        print(f"i2am {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a failure, not a usage error: keep the traceback for the bug report
        traceback.print_exc()
        print(f"i2am {args.command}: failed: {err}", file=sys.stderr)
        return 1


def build_parser():
    parser = argparse.ArgumentParser(
        prog="i2am", description="I2AM attribution maps for image-to-image diffusion models.",
        epilog="Run `i2am COMMAND --help` for the options and examples of each command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = _command(sub, "demo", _demo, "analyse the embedded tiny image-to-image model", """\
examples:
  i2am demo
  i2am demo --out demo-report --device cuda""")
    demo.add_argument("--out", default="i2am-demo", help="report folder (default: %(default)s)")
    demo.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    demo.add_argument("--backend", choices=BACKENDS, default="auto", help="attention backend")
    _protocol_option(demo, "the protocol of each example's report (both protocols' IMACS are given side by side)")

    run = _command(sub, "run", _run, "run an image-to-image pipeline under i2am.trace and write a report", """\
The model is loaded from a local folder (save_pretrained) or from the local Hugging Face cache;
nothing is downloaded. Points and boxes are latent (row, col) coordinates (image size divided
by the VAE's scale factor, 8 for Stable Diffusion); boxes are end-exclusive; patches are
reference-grid (row, col) cells. The mask is white (1) where the image is to be filled. The
report shows the reference, and applies --ref-mask, as the model's feature_extractor resizes
and crops it, so that each reference patch covers the pixels its token saw.

pipelines:
  paint-by-example  diffusers PaintByExamplePipeline (run without its safety checker): one
                    reference token, so the reference grid is 1x1 and M_r is a single value;
                    M_g is still meaningful
  sd-inpaint-patch  StableDiffusionInpaintPipeline whose cross-attention keys are the CLS and
                    patch tokens (last_hidden_state) of its image_encoder component (e.g. a
                    CLIPVisionModel) on the reference, preprocessed by its feature_extractor;
                    zero tokens are the null reference of classifier-free guidance
  ip-adapter        StableDiffusionInpaintPipeline with an IP-Adapter (--ip-adapter FILE);
                    the maps come from the attention over the adapter's N image tokens,
                    which are not spatial: the reference grid is 1xN
  flux-kontext      diffusers FluxKontextPipeline editing --reference by --prompt (no --image):
                    the maps come from every joint attention layer, the latent grid is the
                    packed token grid (size / 16) of generated and reference tokens alike;
                    --mask (optional, the size of --reference) marks the edited region for
                    IMACS_g; the output keeps the reference's size (floored to multiples of 16)

examples:
  i2am run --pipeline paint-by-example --model Fantasy-Studio/Paint-by-Example \\
      --image person.png --mask mask.png --reference shirt.png --points 30,32 --out report
  i2am run --pipeline sd-inpaint-patch --model ./my-model --image person.png --mask mask.png \\
      --reference cloth.png --ref-mask cloth-mask.png --steps 50 --time-groups 5 \\
      --points 20,30 34,30 --boxes 16,20,40,44 --patches 3,4 --out report
  i2am run --pipeline flux-kontext --model black-forest-labs/FLUX.1-Kontext-dev \
      --reference photo.png --prompt "make the jacket red" --steps 28 --guidance 2.5 \
      --points 20,30 --patches 20,30 --out report""")
    run.add_argument("--pipeline", required=True, choices=PIPELINES)
    run.add_argument("--model", required=True, metavar="PATH_OR_ID", help="local folder or cached model id")
    run.add_argument("--image", help="the image to inpaint (all but flux-kontext)")
    run.add_argument("--mask", help="inpainting mask, same size as --image, white = fill (flux-kontext: "
                                    "optional, the edited region, same size as --reference)")
    run.add_argument("--reference", required=True, help="the reference (example) image; flux-kontext: "
                                                        "the image to edit")
    run.add_argument("--ref-mask", help="mask of the reference's relevant region (e.g. the cloth), "
                                        "same size as --reference: gives IMACS_r")
    run.add_argument("--prompt", default="", help="text prompt (ip-adapter and flux-kontext; default empty)")
    run.add_argument("--ip-adapter", metavar="FILE", help="IP-Adapter weights (.safetensors or .bin); "
                     "its image encoder is the model's image_encoder or the file's image_encoder/ folder")
    run.add_argument("--ip-adapter-scale", type=float, default=1.0)
    run.add_argument("--steps", type=_positive, default=50, help="denoising steps (default: %(default)s)")
    run.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default: %(default)s)")
    run.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    run.add_argument("--time-groups", type=_positive, default=5, help="time groups G (default: %(default)s)")
    run.add_argument("--points", nargs="*", default=[], type=_ints(2, "row,col"), metavar="ROW,COL",
                     help="latent points for specific-reference maps")
    run.add_argument("--boxes", nargs="*", default=[], type=_ints(4, "top,left,bottom,right"),
                     metavar="T,L,B,R", help="latent boxes (end-exclusive) for specific-reference maps")
    run.add_argument("--patches", nargs="*", default=[], type=_ints(2, "row,col"), metavar="I,J",
                     help="reference patches for specific-generated maps")
    run.add_argument("--convention", choices=("official", "paper"), default="official")
    _protocol_option(run, "paper: the printed equations; official: the authors' released code (its M_g, display, "
                          "IMACS and layer sets)")
    run.add_argument("--backend", choices=BACKENDS, default="auto", help="attention backend")
    run.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    run.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float16 on CUDA, else float32")
    _display_options(run)
    run.add_argument("--out", required=True, help="report folder")
    run.add_argument("--quiet", action="store_true", help="no progress bar and no scores on the terminal")

    show = _command(sub, "show", _show, "re-render the figures and report of saved maps", """\
Writes the report folder of a maps file: figures, scores.json (IMACS from the traced mask, and
IMACS_r with --ref-mask) and report.md with the run's settings, which the maps file keeps
(pipeline, model, steps, seed, threshold, alpha, ...). In a report folder of `i2am run` the
run's images are found beside the maps file, so the figures are the run's.

examples:
  i2am show report/maps.safetensors --out figures
  i2am show report/maps.safetensors --image report/generated.png \\
      --reference report/reference.png --out figures""")
    show.add_argument("maps", metavar="MAPS", help="a maps.safetensors file (AttributionMaps.save)")
    show.add_argument("--image", help="the generated image the maps belong to (default: generated.png "
                                      "beside MAPS, when there)")
    show.add_argument("--reference", help="the reference image (default: reference.png beside MAPS, when there)")
    show.add_argument("--ref-mask", help="reference mask, same size as --reference: gives IMACS_r (default: "
                                         "ref_mask.png beside MAPS, when there)")
    show.add_argument("--protocol", choices=tuple(PROTOCOLS),
                      help="read the maps under this protocol (default: the one they were traced under; maps "
                           "traced under official can also be read as paper)")
    _display_options(show, saved=True)
    show.add_argument("--out", required=True, help="report folder")

    ev = _command(sub, "eval", _eval, "evaluate a model over a data set: IMACS, SSIM, LPIPS, FID, KID, correlations", """\
Per sample: one traced generation per protocol, IMACS_g and IMACS_r, SSIM and LPIPS against
the ground truth; over the set: FID and KID. Writes samples.jsonl, summary.md (the table row,
Pearson and Spearman correlations of IMACS with each metric) and scatter plots. The same
command run again on the same --out resumes: finished samples are kept, the rest are run.
Under `accelerate launch -m i2am eval ...` (or torchrun) the samples are shared among the
processes. --data is a JSONL manifest ({"image", "mask", "reference", "ref_mask",
"ground_truth"} paths a line) or a VITON-HD-like test folder (image/, agnostic-mask/, cloth/,
cloth-mask/, test_pairs.txt). LPIPS needs torchvision and its AlexNet weights in the torch hub
cache; FID and KID need torch-fidelity and --inception-weights: without them those columns
are left out, and the summary says so.

examples:
  i2am eval --demo --out eval-demo
  i2am eval --pipeline sd-inpaint-patch --model ./my-model --data viton-hd/test \\
      --steps 50 --inception-weights pt_inception-2015-12-05-6726825d.pth --out eval-viton
  accelerate launch --num_processes 4 -m i2am eval --pipeline paint-by-example \\
      --model ./pbe --data pairs.jsonl --out eval-pbe""")
    what = ev.add_mutually_exclusive_group(required=True)
    what.add_argument("--demo", action="store_true", help="the embedded demo model over its synthetic data set")
    what.add_argument("--data", metavar="PATH", help="JSONL manifest or VITON-HD-like folder")
    ev.add_argument("--samples", type=_positive, default=32, help="--demo: synthetic samples (default: %(default)s)")
    ev.add_argument("--pipeline", choices=PIPELINES, help="with --data: the pipeline, as for `i2am run`")
    ev.add_argument("--model", metavar="PATH_OR_ID", help="with --data: local folder or cached model id")
    ev.add_argument("--prompt", default="", help="text prompt (ip-adapter only; default empty)")
    ev.add_argument("--ip-adapter", metavar="FILE", help="IP-Adapter weights, as for `i2am run`")
    ev.add_argument("--ip-adapter-scale", type=float, default=1.0)
    ev.add_argument("--protocol", nargs="+", default=["paper"], choices=tuple(PROTOCOLS),
                    help="IMACS protocol(s), one traced run each (default: paper)")
    ev.add_argument("--steps", type=_positive, help="denoising steps (default: 50; 10 with --demo)")
    ev.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default: %(default)s; "
                    "the demo's own with --demo)")
    ev.add_argument("--seed", type=int, default=0, help="sample i is generated from seed + i (default: %(default)s)")
    ev.add_argument("--time-groups", type=_positive, default=5, help="time groups G (default: %(default)s)")
    ev.add_argument("--convention", choices=("official", "paper"), default="official")
    ev.add_argument("--backend", choices=BACKENDS, default="auto", help="attention backend")
    ev.add_argument("--device", help="torch device (default: the process's accelerator, else cpu)")
    ev.add_argument("--dtype", choices=DTYPES, default="auto", help="auto: float16 on CUDA, else float32")
    ev.add_argument("--inception-weights", metavar="FILE", help="torch-fidelity's FID Inception weights "
                    "(pt_inception-2015-12-05-6726825d.pth): gives FID and KID")
    ev.add_argument("--save-maps", action="store_true", help="also save each sample's maps (.safetensors)")
    ev.add_argument("--out", required=True, help="output folder (an existing one is resumed)")

    bench = _command(sub, "bench", _bench, "time i2am against SDPA, the naive path and a chunked capture", """\
examples:
  i2am bench --quick
  i2am bench --device cuda --json bench.json --plot bench.png""")
    bench.add_argument("--quick", action="store_true", help="a few small shapes (CPU: under 2 minutes)")
    bench.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    bench.add_argument("--json", help="write the rows, machine, versions and commit to this JSON file")
    bench.add_argument("--plot", help="write the ratio-to-SDPA plot (PNG) to this file")
    bench.add_argument("--no-pipeline", action="store_true", help="skip the traced-vs-untraced pipeline row")
    return parser


# ---- commands -------------------------------------------------------------------------------
def _demo(args):
    """Hands over to i2am.demo.run_demo(out=, device=, backend=, protocol=) -> exit code (None: 0) once the
    demo package provides it."""
    _check_out(args.out)
    _check_device(args.device, args.backend)
    try:
        demo = importlib.import_module("i2am.demo")
    except ModuleNotFoundError as err:
        if err.name != "i2am.demo":
            raise
        demo = None
    run_demo = getattr(demo, "run_demo", None)
    if run_demo is None:
        print("i2am demo: the embedded demo model is not yet available (issue 7); nothing to do.")
        return 0
    return run_demo(out=args.out, device=args.device, backend=args.backend, protocol=args.protocol)


def _eval(args):
    try:
        from accelerate import PartialState
        from .evaluation import DemoTask, PipelineTask, evaluate, load_dataset
    except ModuleNotFoundError as err:
        raise UsageError(f"i2am eval needs {err.name}: pip install 'i2am[eval]'") from err
    from .evaluation.datasets import DatasetError
    from .evaluation.runner import SettingsMismatch

    if len(set(args.protocol)) != len(args.protocol):
        raise UsageError(f"--protocol {' '.join(args.protocol)}: a protocol is given twice")
    _check_out(args.out)
    steps = args.steps or (10 if args.demo else 50)
    device = _check_device(args.device or str(PartialState().device), args.backend)
    if args.demo:
        task = DemoTask(samples=args.samples, steps=steps, device=device, backend=args.backend)
        samples = task.samples()
    else:
        if not (args.pipeline and args.model):
            raise UsageError("--data needs --pipeline and --model (the model to evaluate)")
        if args.time_groups > steps:
            raise UsageError(f"--time-groups {args.time_groups} is more than the {steps} --steps")
        if args.pipeline == "ip-adapter" and not args.ip_adapter:
            raise UsageError("--pipeline ip-adapter needs --ip-adapter FILE (the adapter weights)")
        try:
            samples = load_dataset(args.data)
        except DatasetError as err:
            raise UsageError(str(err)) from err
        dtype = _dtype(args.dtype, device)
        loader = _LOADERS[args.pipeline]
        settings = {"pipeline": args.pipeline, "model": args.model, "data": args.data,
                    "dtype": str(dtype).removeprefix("torch.")}
        if args.pipeline == "ip-adapter":
            settings.update(prompt=args.prompt, ip_adapter=args.ip_adapter, ip_adapter_scale=args.ip_adapter_scale)
        task = PipelineTask(
            lambda reference: loader(args, reference, device, dtype),
            lambda pipe, image: _as_encoded(pipe.feature_extractor, image),
            steps=steps, guidance=args.guidance, time_groups=args.time_groups, convention=args.convention,
            backend=args.backend, settings=settings)
    try:
        evaluate(task, samples, args.out, protocols=args.protocol, seed=args.seed,
                 inception_weights=args.inception_weights, save_maps=args.save_maps, device=device)
    except SettingsMismatch as err:
        raise UsageError(str(err)) from err
    if PartialState().is_main_process:
        print(f"summary written to {Path(args.out) / 'summary.md'}")


def _bench(args):
    from . import benchmark

    if args.device:
        _check_device(args.device, "auto")
    benchmark.main(quick=args.quick, device=args.device, json_path=args.json, plot_path=args.plot,
                   pipeline=not args.no_pipeline)


def _show(args):
    from .maps import AttributionMaps
    from .report import write_report

    _check_out(args.out)
    path = Path(args.maps)
    if not path.is_file():
        raise UsageError(f"maps file not found: {path}")
    try:
        maps = AttributionMaps.load(path)
    except Exception as err:
        raise UsageError(f"cannot read maps from {path}: {err}") from err
    if args.protocol is not None:
        try:
            maps = maps.with_protocol(args.protocol)
        except ValueError as err:
            raise UsageError(f"--protocol {args.protocol}: {err}") from err
    for option, name in (("image", "generated.png"), ("reference", "reference.png"), ("ref_mask", "ref_mask.png")):
        if getattr(args, option) is None and (path.parent / name).is_file():  # the run's report folder
            setattr(args, option, str(path.parent / name))
    image = _open_image(args.image, "--image") if args.image else None
    reference = _open_image(args.reference, "--reference") if args.reference else None
    ref_mask_image = _ref_mask_image(args, reference)
    ref_mask = None if ref_mask_image is None else _binary(ref_mask_image, "--ref-mask")
    if ref_mask is not None and maps.mask is None:
        raise UsageError("--ref-mask gives IMACS_r, which needs maps traced with an inpainting mask; these have none")
    shown = {key: maps.settings.get(key, default) if getattr(args, key) is None else getattr(args, key)
             for key, default in (("threshold", 0.4), ("alpha", 0.5))}  # the run's, unless given
    scores = write_report(args.out, maps, image=image, reference=reference, ref_mask=ref_mask,
                          settings={"maps_file": str(path)}, **shown)
    _print_scores(scores, args.out)


def _run(args):
    from . import generation

    _check_out(args.out)
    device = _check_device(args.device, args.backend)
    if args.time_groups > args.steps:
        raise UsageError(f"--time-groups {args.time_groups} is more than the {args.steps} --steps")
    if args.pipeline == "flux-kontext":
        return _run_kontext(args, device)
    for option in ("image", "mask"):
        if getattr(args, option) is None:
            raise UsageError(f"--pipeline {args.pipeline} needs --{option}")
    image = _open_image(args.image, "--image")
    reference = _open_image(args.reference, "--reference")
    mask_image = _open_image(args.mask, "--mask", mode="L")
    if mask_image.size != image.size:
        raise UsageError(f"--mask is {_wxh(mask_image)} but --image is {_wxh(image)}: they must be the same size")
    mask = _binary(mask_image, "--mask")
    ref_mask_image = _ref_mask_image(args, reference)
    if args.pipeline == "ip-adapter" and not args.ip_adapter:
        raise UsageError("--pipeline ip-adapter needs --ip-adapter FILE (the adapter weights)")

    dtype = _dtype(args.dtype, device)
    with _loading_bars(not args.quiet):
        pipe, ref_grid, inputs = _LOADERS[args.pipeline](args, reference, device, dtype)
    latent = (image.height // pipe.vae_scale_factor, image.width // pipe.vae_scale_factor)
    if image.height % pipe.vae_scale_factor or image.width % pipe.vae_scale_factor:
        raise UsageError(f"--image is {_wxh(image)}: its sides must be multiples of the VAE scale factor "
                         f"{pipe.vae_scale_factor}")
    _check_probes(args, latent, ref_grid)
    # the report shows the reference, and scores its mask, as the encoder saw it: the
    # feature_extractor's resize and crop decide which reference pixels each patch covers
    seen_reference = _as_encoded(pipe.feature_extractor, reference)
    if ref_mask_image is not None:
        ref_mask_image = _as_encoded(pipe.feature_extractor, ref_mask_image).convert("L")
    ref_mask = None if ref_mask_image is None else _binary(ref_mask_image, "--ref-mask, cropped as the reference,")

    pipe.set_progress_bar_config(disable=args.quiet)
    call = dict(image=image, mask_image=mask_image, height=image.height, width=image.width,
                num_inference_steps=args.steps, guidance_scale=args.guidance, **inputs)
    result = generation.run_traced(pipe, call, _trace_config(args, ref_grid=ref_grid, mask=mask), seed=args.seed)
    settings = {key: getattr(args, key) for key in (
        "pipeline", "model", "image", "mask", "reference", "ref_mask", "steps", "guidance", "seed",
        "backend")}  # the protocol is in the maps' own settings
    settings.update(device=device, dtype=str(dtype).removeprefix("torch."))
    if args.pipeline == "ip-adapter":
        settings.update(prompt=args.prompt, ip_adapter=args.ip_adapter, ip_adapter_scale=args.ip_adapter_scale)
    _report(args, result, seen_reference, ref_mask, settings,
            {"input": image, "mask": mask_image, "ref_mask": ref_mask_image})


def _trace_config(args, **given):
    """The i2am.TraceConfig of `i2am run`'s options and the run's own settings (ref_grid, mask)."""
    from .config import TraceConfig

    return TraceConfig(time_groups=args.time_groups, points=args.points, boxes=args.boxes, patches=args.patches,
                       convention=args.convention, protocol=args.protocol, backend=args.backend, **given)


def _report(args, result, reference, ref_mask, settings, extra_images):
    """The run's report (its Generation's write_report) with the input images that were given, and
    its scores printed."""
    extra_images = {name: im for name, im in extra_images.items() if im is not None}
    scores = result.write_report(args.out, reference=reference, ref_mask=ref_mask, settings=settings,
                                 extra_images=extra_images, threshold=args.threshold, alpha=args.alpha)
    _print_scores(scores, args.out, quiet=args.quiet)


def _run_kontext(args, device):
    """flux-kontext: the pipeline edits --reference; both grids are its packed token grid."""
    from . import generation
    from .integrations import flux

    if args.image is not None:
        raise UsageError("--pipeline flux-kontext edits --reference and takes no --image")
    if args.protocol != "paper":
        raise UsageError(f"--protocol {args.protocol} reproduces the authors' UNet code; flux-kontext is traced "
                         "under --protocol paper")
    reference = _open_image(args.reference, "--reference")
    mask_image = None if args.mask is None else _open_image(args.mask, "--mask", mode="L")
    if mask_image is not None and mask_image.size != reference.size:
        raise UsageError(f"--mask is {_wxh(mask_image)} but --reference is {_wxh(reference)}: they must be the "
                         "same size")
    ref_mask_image = _ref_mask_image(args, reference)
    if ref_mask_image is not None and mask_image is None:
        raise UsageError("--ref-mask gives IMACS_r, which needs --mask (the edited region) with flux-kontext")
    dtype = _dtype(args.dtype, device, cuda="bfloat16")
    _locate(args.model)
    from diffusers import FluxKontextPipeline

    with _local_only(FluxKontextPipeline, args.model), _loading_bars(not args.quiet):
        pipe = flux.load_kontext(args.model, device=device, dtype=dtype)
    height, width = flux.edit_size(pipe, reference)
    if height == 0 or width == 0:
        raise UsageError(f"--reference is {_wxh(reference)}: flux-kontext needs sides of at least "
                         f"{pipe.vae_scale_factor * 2} pixels")
    grid = flux.token_grid(pipe, height, width)
    _check_probes(args, grid, grid)
    reference = reference.crop((0, 0, width, height))  # the floored size, as the pipeline encodes it
    crop = (lambda m: None if m is None else m.crop((0, 0, width, height)))
    mask_image, ref_mask_image = crop(mask_image), crop(ref_mask_image)
    mask = None if mask_image is None else _binary(mask_image, "--mask")
    ref_mask = None if ref_mask_image is None else _binary(ref_mask_image, "--ref-mask")

    pipe.set_progress_bar_config(disable=args.quiet)
    call = dict(flux.kontext_call(reference, args.prompt, height, width), num_inference_steps=args.steps,
                guidance_scale=args.guidance)
    result = generation.run_traced(pipe, call, _trace_config(args, mask=mask), seed=args.seed)
    settings = {key: getattr(args, key) for key in (
        "pipeline", "model", "mask", "reference", "ref_mask", "prompt", "steps", "guidance", "seed", "backend")}
    settings.update(device=device, dtype=str(dtype).removeprefix("torch."), height=height, width=width)
    _report(args, result, reference, ref_mask, settings,
            {"mask": mask_image, "ref_mask": ref_mask_image})


# ---- pipelines: each returns (pipe on device, ref_grid, the pipeline call's reference inputs) ----
def _paint_by_example(args, reference, device, dtype):
    import diffusers
    from diffusers import AutoencoderKL, PaintByExamplePipeline, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessor

    # diffusers no longer resolves the deprecated PaintByExampleImageEncoder that model_index.json
    # names, so the pipeline is assembled from its components (without a safety checker)
    _locate(args.model, unused=("safety_checker",))
    with _local_only(PaintByExamplePipeline, args.model):
        parts = {name: cls.from_pretrained(args.model, subfolder=name, local_files_only=True) for name, cls in (
            ("vae", AutoencoderKL), ("unet", UNet2DConditionModel), ("image_encoder", PaintByExampleImageEncoder),
            ("feature_extractor", CLIPImageProcessor))}
        # any scheduler class reads scheduler_config.json; the one it names is built from it
        config = diffusers.DDIMScheduler.load_config(args.model, subfolder="scheduler", local_files_only=True)
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    pipe = PaintByExamplePipeline(**parts, scheduler=scheduler, safety_checker=None, requires_safety_checker=False)
    return pipe.to(device, dtype), (1, 1), {"example_image": reference}


def _sd_inpaint_patch(args, reference, device, dtype):
    import torch
    from diffusers import StableDiffusionInpaintPipeline

    # the reference tokens replace the prompt: a text encoder is neither needed nor loaded
    _locate(args.model, unused=("text_encoder", "tokenizer"))
    with _local_only(StableDiffusionInpaintPipeline, args.model):
        pipe = StableDiffusionInpaintPipeline.from_pretrained(args.model, torch_dtype=dtype, text_encoder=None,
                                                              tokenizer=None, local_files_only=True).to(device)
    encoder, processor = pipe.image_encoder, pipe.feature_extractor
    for name, part in (("image_encoder", encoder), ("feature_extractor", processor)):
        if part is None:
            raise UsageError(f"model {args.model!r} has no {name} component: sd-inpaint-patch encodes the "
                             "reference with the pipeline's image_encoder (a transformers vision model) "
                             "preprocessed by its feature_extractor")
    pixels = processor(images=reference, return_tensors="pt").pixel_values.to(device, encoder.dtype)
    with torch.no_grad():
        tokens = encoder(pixel_values=pixels).last_hidden_state.to(dtype)
    if tokens.shape[-1] != pipe.unet.config.cross_attention_dim:
        raise UsageError(f"the image_encoder's tokens have width {tokens.shape[-1]} but the UNet cross-attends "
                         f"to width {pipe.unet.config.cross_attention_dim}")
    config = encoder.config
    ref_grid = tuple(s // p for s, p in zip(_pair(config.image_size), _pair(config.patch_size)))
    return pipe, ref_grid, {"prompt_embeds": tokens, "negative_prompt_embeds": torch.zeros_like(tokens)}


def _ip_adapter(args, reference, device, dtype):
    from diffusers import StableDiffusionInpaintPipeline
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    weights = Path(args.ip_adapter)
    if not weights.is_file():
        raise UsageError(f"--ip-adapter file not found: {weights}")
    _locate(args.model)
    with _local_only(StableDiffusionInpaintPipeline, args.model):
        pipe = StableDiffusionInpaintPipeline.from_pretrained(args.model, torch_dtype=dtype, local_files_only=True)
        pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name, local_files_only=True)
    pipe.set_ip_adapter_scale(args.ip_adapter_scale)
    tokens = {p.num_tokens[0] for p in pipe.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)}
    return pipe.to(device), (1, tokens.pop()), {"prompt": args.prompt, "ip_adapter_image": reference}


_LOADERS = {"paint-by-example": _paint_by_example, "sd-inpaint-patch": _sd_inpaint_patch, "ip-adapter": _ip_adapter}


def _locate(model, unused=()):
    """Fail early, naming what is missing, when `model` is a folder that is not there or lacks a
    component its model_index.json lists (diffusers' own error names only a file); `unused`
    components may be missing. A model id is looked up in the local Hugging Face cache later."""
    folder = Path(model)
    if not folder.is_dir():
        if folder.is_absolute() or model.startswith(".") or model.count("/") > 1:
            raise UsageError(f"model folder not found: {model}")
        return
    index = folder / "model_index.json"
    if not index.is_file():
        raise UsageError(f"{folder} is not a diffusers pipeline folder (save_pretrained): no model_index.json")
    entries = json.loads(index.read_text())
    missing = [name for name, entry in entries.items()
               if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None
               and name not in unused and not (folder / name).is_dir()]
    if missing:
        raise UsageError(f"model folder {folder} lacks {', '.join(missing)}: listed in its model_index.json "
                         "but not there")


@contextmanager
def _library_warnings_silenced():
    """Inside a command, the warnings and log notes of the libraries i2am drives (deprecations,
    accelerate hints, component types) are not the user's business: silenced, and restored after.
    i2am's own warnings still show."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"(diffusers|transformers|torch|huggingface_hub|accelerate)(\.|$)")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _dtype(name, device, cuda="float16"):
    """The torch dtype of --dtype; auto: `cuda` on a CUDA device, else float32."""
    import torch

    if name == "auto":
        name = cuda if torch.device(device).type == "cuda" else "float32"
    return getattr(torch, name)


@contextmanager
def _loading_bars(shown):
    """diffusers' and transformers' loading bars on or off (--quiet), as they were after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = [(lib, lib.is_progress_bar_enabled()) for lib in (diffusers_logging, transformers_logging)]
    for lib, _ in libraries:
        lib.enable_progress_bar() if shown else lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, enabled in libraries:
            lib.enable_progress_bar() if enabled else lib.disable_progress_bar()


@contextmanager
def _local_only(cls, model):
    """Loading errors (nothing local: no download is ever tried) as a UsageError naming the model."""
    try:
        with warnings.catch_warnings():  # torch_dtype works in every supported diffusers; newer ones call it dtype
            warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
            yield
    except (OSError, ValueError) as err:
        where = "the folder" if Path(model).is_dir() else "the local Hugging Face cache (no download is tried)"
        raise UsageError(f"cannot load {cls.__name__} {model!r} from {where}: {err}") from err


# ---- argument checks --------------------------------------------------------------------------
def _check_out(out):
    """The report folder can be made and written, checked before any work is done."""
    path = Path(out)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"--out {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"--out {path}: {existing} is not writable")


def _check_device(device, backend):
    """The torch device of a run (default: cuda when available, else cpu), checked to exist and to
    support the backend."""
    import torch

    from .kernels import triton_available

    name = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda" and not (torch.cuda.is_available() and (dev.index or 0) < torch.cuda.device_count()):
        missing = "is available" if dev.index is None else "with that index"
        raise UsageError(f"--device {name}: no CUDA device {missing}")
    if (backend == "triton" and not triton_available(dev)) or (backend == "cuda" and dev.type != "cuda"):
        raise UsageError(f"--backend {backend} needs a CUDA device{' and triton installed' * (backend == 'triton')} "
                         f"(this run's device is {name}); use --backend auto or torch")
    if backend == "cuda":
        from .kernels.cuda_backend import CudaBackendError, load_library

        try:
            load_library()
        except CudaBackendError as err:
            raise UsageError(f"--backend cuda: {err}") from None
    return name


def _check_probes(args, latent, ref_grid):
    h, w = latent
    for r, c in args.points:
        if not (0 <= r < h and 0 <= c < w):
            raise UsageError(f"point {r},{c} is off the latent grid {h}x{w} (rows 0..{h - 1}, cols 0..{w - 1})")
    for t, l, b, r in args.boxes:
        if not (0 <= t < b <= h and 0 <= l < r <= w):
            raise UsageError(f"box {t},{l},{b},{r} must satisfy 0 <= top < bottom <= {h} and "
                             f"0 <= left < right <= {w} (end-exclusive, latent grid {h}x{w})")
    for i, j in args.patches:
        if not (0 <= i < ref_grid[0] and 0 <= j < ref_grid[1]):
            raise UsageError(f"patch {i},{j} is off the reference grid {ref_grid[0]}x{ref_grid[1]}")


def _ref_mask_image(args, reference):
    """The --ref-mask image, checked to be the reference's size, or None."""
    if not args.ref_mask:
        return None
    mask = _open_image(args.ref_mask, "--ref-mask", mode="L")
    if reference is not None and mask.size != reference.size:
        raise UsageError(f"--ref-mask is {_wxh(mask)} but --reference is {_wxh(reference)}: they must be the same size")
    return mask


def _as_encoded(processor, image):
    """image resized and cropped as the reference encoder's processor does it, not normalised."""
    if processor is None:
        return image
    from .inputs import to_pil

    return to_pil(processor(images=image.convert("RGB"), do_normalize=False, return_tensors="pt").pixel_values[0])


def _binary(mask_image, what):
    from .inputs import as_mask

    mask = as_mask(mask_image, what).float()
    if mask.sum() == 0 or mask.sum() == mask.numel():
        raise UsageError(f"{what} is {'empty' if mask.sum() == 0 else 'white everywhere'}: it must mark "
                         "a region (white) and leave the rest black")
    return mask


def _open_image(path, what, mode="RGB"):
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise UsageError(f"{what} file not found: {path}")
    try:
        with Image.open(path) as img:
            return img.convert(mode)
    except (OSError, UnidentifiedImageError) as err:
        raise UsageError(f"cannot read {what} {path}: {err}") from err


def _print_scores(scores, out, quiet=False):
    for key, value in scores.items():
        if key != "settings" and not quiet:
            print(f"{key}: {value}")
    print(f"report written to {Path(out) / 'report.md'}")


# ---- parsing helpers --------------------------------------------------------------------------
def _command(sub, name, handler, help, examples):
    parser = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".", epilog=examples,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(handler=handler)
    # "-1,2" is a value (a negative coordinate, reported as such), not an unknown option
    parser._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-\d+(,-?\d+)+$")
    return parser


def _protocol_option(parser, help):
    parser.add_argument("--protocol", choices=tuple(PROTOCOLS), default="paper", help=f"{help} (default: %(default)s)")


def _display_options(parser, saved=False):
    """--threshold and --alpha in [0, 1]; saved: their defaults are the ones the maps file keeps."""
    default = "the run's, else %s" if saved else "%s"
    parser.add_argument("--threshold", type=_fraction, default=None if saved else 0.4,
                        help=f"display threshold in [0, 1]: map values <= it are not drawn (default: {default % 0.4})")
    parser.add_argument("--alpha", type=_fraction, default=None if saved else 0.5,
                        help=f"overlay opacity in [0, 1] (default: {default % 0.5})")


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and 0 <= value <= 1):
        raise argparse.ArgumentTypeError(f"{text} is not in [0, 1]")
    return value


def _positive(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not positive")
    return value


def _ints(n, form):
    def parse(text):
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) != n:
            raise argparse.ArgumentTypeError(f"{text!r} is not {form} ({n} integers separated by commas)")
        if min(values) < 0:
            raise argparse.ArgumentTypeError(f"{text}: coordinates must be >= 0")
        return values
    parse.__name__ = form  # argparse names the type in its messages
    return parse


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def _wxh(img):
    return f"{img.width}x{img.height}"


if __name__ == "__main__":
    sys.exit(main())
