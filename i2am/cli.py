"""The `i2am` command: run an analysis of a pipeline, re-render saved maps, the demo, benchmarks,
data-set evaluation.

Argument parsing and printing only: the work, and the rules for what users pass, are the
library's (i2am.pipelines, i2am.inputs, ...). Exit codes: 0 success, 2 bad arguments (argparse
errors and the library's InputError: missing files, a mask of the wrong size, a probe off the
grid, a model that is not available locally), 1 failure.
"""
import argparse
import logging
import math
import os
import re
import sys
import textwrap
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

# Before torch loads OpenMP: threads that wait for work sleep instead of spinning. The maps take a
# few multi-threaded ops a layer beside the attention; on a busy CPU a spinning thread holds the
# core its partner needs, and each op then costs a scheduler time slice (a 16x16 layer under two
# busy processes: 63 ms spinning, 3 ms sleeping; no change on an idle CPU). A user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from . import pipelines  # noqa: E402 (after the threading policy)
from .config import ATTENTIONS, CONVENTIONS
from .evaluation.datasets import DATA_SETS
from .inputs import InputError, check_device, check_out_file, command_line_spelling
from .protocols import PROTOCOLS

BACKENDS = ("auto", "torch", "triton", "cuda")  # the kernels' float64 "reference" is for tests, not offered


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)  # bad arguments: argparse prints usage and exits with 2
    import matplotlib

    matplotlib.use("Agg")  # the figures are files: never an interactive backend
    try:
        with _library_warnings_silenced(everything=getattr(args, "quiet", False)), command_line_spelling():
            return args.handler(args) or 0
    except InputError as err:
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

""" + _pipelines_help() + """

examples:
  i2am run --pipeline paint-by-example --model Fantasy-Studio/Paint-by-Example \\
      --image person.png --mask mask.png --reference shirt.png --points 30,32 --out report
  i2am run --pipeline sd-inpaint-patch --model ./my-model --image person.png --mask mask.png \\
      --reference cloth.png --ref-mask cloth-mask.png --steps 50 --time-groups 5 \\
      --points 20,30 34,30 --boxes 16,20,40,44 --patches 3,4 --out report
  i2am run --pipeline flux-kontext --model black-forest-labs/FLUX.1-Kontext-dev \\
      --reference photo.png --prompt "make the jacket red" --steps 28 \\
      --points 20,30 --patches 20,30 --out report
  i2am run --pipeline sd-inpaint-patch --model ./my-model --image pair.png --mask mask.png \\
      --reference cloth.png --attention self --query-region 0,0,64,48 --ref-region 0,48,64,96 \\
      --points 20,30 --out report     # the reference beside the image in one latent
  i2am run --pipeline qwen-image-edit-plus --model Qwen/Qwen-Image-Edit-2509 \\
      --reference person.png --reference shirt.png --prompt "the person wears the shirt" \\
      --points 20,30 --patches 0,10,12 1,8,8 --out report""")
    _pipeline_options(run)
    run.add_argument("--image", help=f"the image to inpaint ({_kinds(lambda k: not k.edits_reference)})")
    run.add_argument("--mask", help="inpainting mask, same size as --image, white = fill "
                     f"({_kinds(lambda k: k.edits_reference)}: optional, the edited region, the size of the "
                     "--reference the output is framed as)")
    run.add_argument("--reference", required=True, action="append",
                     help=f"the reference (example) image ({_kinds(lambda k: k.edits_reference)}: the image to "
                          f"edit); given again for each further reference of {_kinds(lambda k: k.several)}")
    run.add_argument("--ref-mask", help="mask of the reference's relevant region (e.g. the cloth), "
                                        "same size as --reference: gives IMACS_r")
    run.add_argument("--points", nargs="*", default=[], type=_ints(2, "row,col"), metavar="ROW,COL",
                     help="latent points for specific-reference maps")
    run.add_argument("--boxes", nargs="*", default=[], type=_ints(4, "top,left,bottom,right"),
                     metavar="T,L,B,R", help="latent boxes (end-exclusive) for specific-reference maps")
    run.add_argument("--patches", nargs="*", default=[], type=_ints((2, 3), "[ref,]row,col"), metavar="[R,]I,J",
                     help="reference patches for specific-generated maps (R: the reference, default 0)")
    run.add_argument("--query-region", type=_ints(4, "top,left,bottom,right"), metavar="T,L,B,R",
                     help="with --ref-region: the generated part of a latent holding both (end-exclusive)")
    run.add_argument("--ref-region", type=_ints(4, "top,left,bottom,right"), metavar="T,L,B,R",
                     help="the reference part of the same latent; points and boxes are then in the query "
                          "region's coordinates, patches in the reference region's")
    run.add_argument("--attention", choices=ATTENTIONS, default="cross",
                     help="UNet pipelines: trace the cross- (attn2) or the self-attention (attn1) layers "
                          "(default: %(default)s)")
    _protocol_option(run, "paper: the printed equations; official: the authors' released code (its M_g, display, "
                          "IMACS and layer sets)")
    _report_options(run)
    run.add_argument("--out", required=True, help="report folder: new or empty, unless --overwrite")
    run.add_argument("--overwrite", action="store_true", help="replace the i2am report in --out (only the files "
                     "i2am wrote there are removed; any other file stops the run)")
    run.add_argument("--quiet", action="store_true", help="no progress bars, library warnings or scores on the "
                                                          "terminal")

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
    show.add_argument("--reference", help="the reference image (default: reference.png beside MAPS, when there; "
                                          "maps of several references: always reference_R.png beside MAPS)")
    show.add_argument("--ref-mask", help="reference mask, same size as --reference: gives IMACS_r (default: "
                                         "ref_mask.png beside MAPS, when there; several references: ref_mask_R.png)")
    show.add_argument("--protocol", choices=tuple(PROTOCOLS),
                      help="read the maps under this protocol (default: the one they were traced under; maps "
                           "traced under official can also be read as paper)")
    _report_options(show, saved=True)
    show.add_argument("--out", required=True, help="report folder")

    ev = _command(sub, "eval", _eval, "evaluate a model over a data set: IMACS, SSIM, LPIPS, FID, KID, correlations", """\
Per sample: one traced generation per protocol, IMACS_g and IMACS_r, SSIM and LPIPS against
the ground truth; over the set: FID and KID. Writes samples.jsonl, summary.md (the table row,
Pearson and Spearman correlations of IMACS with each metric) and scatter plots. The same
command run again on the same --out resumes: finished samples are kept, the rest are run.
Under `accelerate launch -m i2am eval ...` (or torchrun) the samples are shared among the
processes. LPIPS needs torchvision and its AlexNet weights in the torch hub cache; FID and KID
need torch-fidelity and --inception-weights: without them (or an editor's sample without a
ground truth) those columns are left out, and the summary says so.

data sets (--data: a JSONL manifest or a VITON-HD-like test folder):
""" + textwrap.indent(DATA_SETS, "  ") + """
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
    _pipeline_options(ev, pipeline=dict(required=False, help="with --data: the pipeline, as for `i2am run`"),
                      model=dict(required=False, help="with --data: local folder or cached model id"),
                      prompt=dict(help="the prompt of samples without their own (ip-adapter and the editors; "
                                       "default empty)"),
                      steps=dict(default=None, help="denoising steps (default: 50; 10 with --demo)"),
                      guidance=dict(help=f"guidance scale (default: {_per_kind('guidance')}; the demo's own with "
                                         "--demo)"),
                      seed=dict(help="sample i is generated from seed + i (default: %(default)s)"),
                      device=dict(help="torch device (default: the process's accelerator, else cpu)"))
    ev.add_argument("--protocol", nargs="+", default=["paper"], choices=tuple(PROTOCOLS),
                    help="IMACS protocol(s), one traced run each (default: paper)")
    ev.add_argument("--inception-weights", metavar="FILE", help="torch-fidelity's FID Inception weights "
                    "(pt_inception-2015-12-05-6726825d.pth): gives FID and KID")
    ev.add_argument("--save-maps", action="store_true", help="also save each sample's maps (.safetensors)")
    ev.add_argument("--faithfulness", action="store_true", help="--demo: the deletion test instead (i2am.ablate: "
                    "top-k M_r and top M_sr cells against random cells, M_g against a swapped reference) with 95%% "
                    "bootstrap intervals; faithfulness.md and faithfulness.png")
    ev.add_argument("--randomized", action="store_true", help="with --faithfulness: also on the model whose "
                    "query and key projections are re-initialised (i2am.randomize)")
    ev.add_argument("--draws", type=_positive, default=3, help="with --faithfulness: random draws per baseline "
                    "(default: %(default)s)")
    ev.add_argument("--out", required=True, help="output folder (an existing one is resumed)")
    ev.add_argument("--quiet", action="store_true", help="no progress bar or library warnings on the terminal")

    bench = _command(sub, "bench", _bench,
                     "time i2am against SDPA, three fused SDPA calls, the naive path and a chunked capture", """\
examples:
  i2am bench --quick
  i2am bench --device cuda --json bench.json --plot bench.png""")
    bench.add_argument("--quick", action="store_true", help="a few small shapes (CPU: under 2 minutes)")
    bench.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    bench.add_argument("--json", help="write the rows, machine, versions and commit to this JSON file")
    bench.add_argument("--plot", help="write the ratio-to-SDPA plot (PNG) to this file")
    bench.add_argument("--no-pipeline", action="store_true", help="skip the traced-vs-untraced pipeline row")
    bench.add_argument("--quiet", action="store_true", help="no progress lines or library warnings, only the table")
    return parser


# ---- commands -------------------------------------------------------------------------------
def _demo(args):
    from .demo import run_demo

    return run_demo(**_given(args, "out", "device", "backend", "protocol"))


def _eval(args):
    from .evaluation import run_eval

    summary = run_eval(args.out, protocols=args.protocol, progress=not args.quiet, **_load_options(args),
                       **_given(args, "demo", "data", "pipeline", "model", "samples", "prompt", "steps", "guidance",
                                "seed", "time_groups", "convention", "backend", "device", "dtype", "inception_weights",
                                "save_maps", "faithfulness", "randomized", "draws"))
    if summary is not None:  # the main process
        print(f"summary written to {summary}")


def _bench(args):
    from . import benchmark

    if args.device:
        check_device(args.device, "auto")
    for option in ("json", "plot"):
        if getattr(args, option):
            check_out_file(getattr(args, option), option)
    benchmark.main(quick=args.quick, device=args.device, json_path=args.json, plot_path=args.plot,
                   pipeline=not args.no_pipeline, progress=not args.quiet)


def _show(args):
    from .report import rewrite_report

    scores = rewrite_report(args.maps, args.out, **_given(args, "image", "reference", "ref_mask", "protocol",
                                                          "threshold", "alpha", "imacs_threshold"))
    _print_scores(scores, args.out)


def _run(args):
    from .config import TraceConfig
    from .generation import run_report

    config = TraceConfig(**_given(args, "time_groups", "points", "boxes", "patches", "query_region", "ref_region",
                                  "attention", "convention", "protocol", "backend"))
    scores = run_report(args.pipeline, args.model, args.out, config, progress=not args.quiet, **_load_options(args),
                        **_given(args, "reference", "image", "mask", "ref_mask", "prompt", "steps", "guidance", "seed",
                                 "device", "dtype", "overwrite", "threshold", "alpha", "imacs_threshold"))
    _print_scores(scores, args.out, quiet=args.quiet)


def _given(args, *names):
    """The parsed options `names` as the library's keywords (an option is its keyword's spelling)."""
    return {name: getattr(args, name) for name in names}


def _load_options(args):
    """The pipeline's own load options (ip-adapter's weights and scale); none without one (eval --demo)."""
    return _given(args, *pipelines.KINDS[args.pipeline].options) if args.pipeline else {}


@contextmanager
def _library_warnings_silenced(everything=False):
    """Inside a command, the warnings and log notes of the libraries i2am drives (deprecations,
    accelerate hints, component types) are not the user's business: silenced, and restored after.
    i2am's own warnings still show. everything (--quiet): every warning not raised in i2am's own
    code too (those a library raises through a caller's frame included)."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "accelerate", "torch")]
    levels = [logger.level for logger in loggers]
    with warnings.catch_warnings():
        if everything:
            warnings.simplefilter("ignore")
            warnings.filterwarnings("default", module=r"i2am(\.|$)")
        warnings.filterwarnings("ignore", module=r"(diffusers|transformers|torch|huggingface_hub|accelerate)(\.|$)")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def _print_scores(scores, out, quiet=False):
    from .report import score_lines

    for key, value in score_lines(scores):
        if not quiet:
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


def _pipeline_options(parser, **changes):
    """The options of `run` and `eval` that choose and drive a pipeline; changes: {dest: the
    add_argument keywords that differ}."""
    options = dict(
        pipeline=dict(required=True, choices=tuple(pipelines.KINDS), help="the pipeline (see pipelines: below)"),
        model=dict(required=True, metavar="PATH_OR_ID", help="local folder or cached model id"),
        prompt=dict(default="", help=f"text prompt ({_kinds(lambda k: k.takes_prompt)}; default empty)"),
        ip_adapter=dict(metavar="FILE", help="IP-Adapter weights (.safetensors or .bin); its image encoder is the "
                        "model's image_encoder or the file's image_encoder/ folder"),
        ip_adapter_scale=dict(type=float, default=1.0, help="IP-Adapter scale (default: %(default)s)"),
        steps=dict(type=_positive, default=50, help="denoising steps (default: %(default)s)"),
        guidance=dict(type=float, help=f"guidance scale (default: {_per_kind('guidance')})"),
        seed=dict(type=int, default=0, help="random seed (default: %(default)s)"),
        time_groups=dict(type=_positive, default=5, help="time groups G (default: %(default)s)"),
        convention=dict(choices=tuple(CONVENTIONS), default="official", help="softmax convention: official takes "
                        "M_g from the softmax over queries and M_r from the softmax over keys, as the authors' code; "
                        "paper the printed eq. 4 and 12's axes (default: %(default)s)"),
        backend=dict(choices=BACKENDS, default="auto", help="attention backend"),
        device=dict(help="torch device (default: cuda when available, else cpu)"),
        dtype=dict(choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                   help=f"auto: float32 off CUDA; on CUDA {_per_kind('cuda_dtype')}"))
    for dest, keywords in options.items():
        parser.add_argument("--" + dest.replace("_", "-"), **{**keywords, **changes.get(dest, {})})


def _report_options(parser, saved=False):
    """--threshold, --alpha and --imacs-threshold, in [0, 1]; saved (show): by default the run's,
    which the maps file keeps."""
    runs = "the run's, else " if saved else ""
    for name, default, help in (
            ("--threshold", 0.4, "display threshold in [0, 1]: map values <= it are not drawn; it never changes a "
                                 "score"),
            ("--alpha", 0.5, "overlay opacity in [0, 1]"),
            ("--imacs-threshold", 0.4, "IMACS threshold in [0, 1]: map values <= it count as 0 in the scores "
                                       "(official: in IMACS_r; its IMACS_g cuts M_g at 0.6)")):
        parser.add_argument(name, type=_fraction, default=None if saved else default,
                            help=f"{help} (default: {runs}{default})")


def _pipelines_help():
    """The `pipelines:` block of `i2am run --help`: each kind's description (pipelines.Kind)."""
    lines, indent = ["pipelines:"], " " * 20
    for name, kind in pipelines.KINDS.items():
        if len(name) > 16:
            lines.append(f"  {name}")
        first = f"  {name:<18}" if len(name) <= 16 else indent
        lines.append(textwrap.fill(kind.description, 96, initial_indent=first, subsequent_indent=indent))
    return "\n".join(lines)


def _kinds(has):
    """The pipeline kinds whose Kind satisfies `has`, for the help."""
    return ", ".join(name for name, kind in pipelines.KINDS.items() if has(kind))


def _per_kind(field):
    """A Kind field's default, then the kinds that set their own: "5; flux-kontext: 2.5; ...", for the help."""
    show = lambda v: "its own" if v is None else f"{v:g}" if isinstance(v, float) else v  # noqa: E731
    own = {}
    for name, kind in pipelines.KINDS.items():
        own.setdefault(show(getattr(kind, field)), []).append(name)
    default = show(getattr(pipelines.Kind, field))
    return "; ".join([default] + [f"{', '.join(names)}: {v}" for v, names in own.items() if v != default])


def _number(convert, rule, ok):
    """An argparse type: the text as convert(text) (int or float), which must satisfy ok (`rule`)."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if convert is int else 'a number'}") \
                from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is not {rule}")
        return value
    return parse


_fraction = _number(float, "in [0, 1]", lambda v: math.isfinite(v) and 0 <= v <= 1)
_positive = _number(int, "positive", lambda v: v >= 1)


def _ints(n, form):
    """n integers separated by commas; n: a count or the counts allowed."""
    counts = (n,) if isinstance(n, int) else n

    def parse(text):
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) not in counts:
            many = " or ".join(str(c) for c in counts)
            raise argparse.ArgumentTypeError(f"{text!r} is not {form} ({many} integers separated by commas)")
        if min(values) < 0:
            raise argparse.ArgumentTypeError(f"{text}: coordinates must be >= 0")
        return values
    parse.__name__ = form  # argparse names the type in its messages
    return parse


if __name__ == "__main__":
    sys.exit(main())
