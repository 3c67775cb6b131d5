"""The `i2am` command: run an analysis of a pipeline, re-render saved maps, the demo, benchmarks.

Exit codes: 0 success, 2 bad arguments (argparse errors and UsageError: missing files, a mask
of the wrong size, a probe off the grid, a model that is not available locally), 1 failure.
"""
import argparse
import importlib
import json
import logging
import sys
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

PIPELINES = ("paint-by-example", "sd-inpaint-patch", "ip-adapter")
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

examples:
  i2am run --pipeline paint-by-example --model Fantasy-Studio/Paint-by-Example \\
      --image person.png --mask mask.png --reference shirt.png --points 30,32 --out report
  i2am run --pipeline sd-inpaint-patch --model ./my-model --image person.png --mask mask.png \\
      --reference cloth.png --ref-mask cloth-mask.png --steps 50 --time-groups 5 \\
      --points 20,30 34,30 --boxes 16,20,40,44 --patches 3,4 --out report""")
    run.add_argument("--pipeline", required=True, choices=PIPELINES)
    run.add_argument("--model", required=True, metavar="PATH_OR_ID", help="local folder or cached model id")
    run.add_argument("--image", required=True, help="the image to inpaint")
    run.add_argument("--mask", required=True, help="inpainting mask, same size as --image, white = fill")
    run.add_argument("--reference", required=True, help="the reference (example) image")
    run.add_argument("--ref-mask", help="mask of the reference's relevant region (e.g. the cloth), "
                                        "same size as --reference: gives IMACS_r")
    run.add_argument("--prompt", default="", help="text prompt (ip-adapter only; default empty)")
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
    _display_options(show, saved=True)
    show.add_argument("--out", required=True, help="report folder")

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
    """Hands over to i2am.demo.run_demo(out=, device=, backend=) -> exit code (None: 0) once the
    demo package provides it."""
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
    return run_demo(out=args.out, device=args.device, backend=args.backend)


def _bench(args):
    from . import benchmark

    if args.device and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UsageError(f"--device {args.device}: no CUDA device is available")
    benchmark.main(quick=args.quick, device=args.device, json_path=args.json, plot_path=args.plot,
                   pipeline=not args.no_pipeline)


def _show(args):
    from .maps import AttributionMaps
    from .report import write_report

    path = Path(args.maps)
    if not path.is_file():
        raise UsageError(f"maps file not found: {path}")
    try:
        maps = AttributionMaps.load(path)
    except Exception as err:
        raise UsageError(f"cannot read maps from {path}: {err}") from err
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
    import torch

    from .report import write_report
    from .tracing import trace

    image = _open_image(args.image, "--image")
    reference = _open_image(args.reference, "--reference")
    mask_image = _open_image(args.mask, "--mask", mode="L")
    if mask_image.size != image.size:
        raise UsageError(f"--mask is {_wxh(mask_image)} but --image is {_wxh(image)}: they must be the same size")
    mask = _binary(mask_image, "--mask")
    ref_mask_image = _ref_mask_image(args, reference)
    if args.time_groups > args.steps:
        raise UsageError(f"--time-groups {args.time_groups} is more than the {args.steps} --steps")
    if args.pipeline == "ip-adapter" and not args.ip_adapter:
        raise UsageError("--pipeline ip-adapter needs --ip-adapter FILE (the adapter weights)")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype) if args.dtype != "auto" else (
        torch.float16 if torch.device(device).type == "cuda" else torch.float32)
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

    generator = torch.Generator("cpu").manual_seed(args.seed)
    pipe.set_progress_bar_config(disable=args.quiet)
    with trace(pipe, ref_grid=ref_grid, time_groups=args.time_groups, mask=mask, points=args.points,
               boxes=args.boxes, patches=args.patches, convention=args.convention, backend=args.backend) as traced:
        generated = pipe(image=image, mask_image=mask_image, height=image.height, width=image.width,
                         num_inference_steps=args.steps, guidance_scale=args.guidance, generator=generator,
                         **inputs).images[0]
    settings = {key: getattr(args, key) for key in (
        "pipeline", "model", "image", "mask", "reference", "ref_mask", "steps", "guidance", "seed",
        "backend")}
    settings.update(device=device, dtype=str(dtype).removeprefix("torch."))
    if args.pipeline == "ip-adapter":
        settings.update(prompt=args.prompt, ip_adapter=args.ip_adapter, ip_adapter_scale=args.ip_adapter_scale)
    extra_images = {"input": image, "mask": mask_image}
    if ref_mask_image is not None:
        extra_images["ref_mask"] = ref_mask_image
    scores = write_report(args.out, traced.maps(), image=generated, reference=seen_reference, ref_mask=ref_mask,
                          settings=settings, extra_images=extra_images, threshold=args.threshold,
                          alpha=args.alpha)
    _print_scores(scores, args.out, quiet=args.quiet)


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
    return parser


def _display_options(parser, saved=False):
    """--threshold and --alpha; saved: their defaults are the ones the maps file keeps."""
    default = "the run's, else %s" if saved else "%s"
    parser.add_argument("--threshold", type=float, default=None if saved else 0.4,
                        help=f"display threshold: map values <= it are not drawn (default: {default % 0.4})")
    parser.add_argument("--alpha", type=float, default=None if saved else 0.5,
                        help=f"overlay opacity (default: {default % 0.5})")


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
        return values
    parse.__name__ = form  # argparse names the type in its messages
    return parse


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)


def _wxh(img):
    return f"{img.width}x{img.height}"


if __name__ == "__main__":
    sys.exit(main())
