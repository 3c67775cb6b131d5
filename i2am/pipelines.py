"""The image-to-image pipelines i2am analyses: load one once, prepare each sample's inputs.

    pipe = pipelines.load("sd-inpaint-patch", "./my-model", device="cuda")
    x = pipelines.inputs("sd-inpaint-patch", pipe, image="person.png", mask="mask.png", reference="cloth.png")
    with i2am.trace(pipe, ref_grid=x.ref_grid, mask=x.mask, points=[(20, 30)]) as tc:
        generated = pipe(**x.call, num_inference_steps=50).images[0]

Models come from a local folder (save_pretrained) or the local Hugging Face cache; nothing is
downloaded. Each kind is one entry of KINDS (what it is, how to load it, how to prepare a
sample); a new pipeline is one more entry. Bad arguments raise i2am.inputs.InputError naming the argument.
"""
import json
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from .inputs import InputError, arg, binary_mask, check_protocols, open_image, same_size, to_pil
from .protocols import PROTOCOLS


@dataclass(frozen=True)
class Inputs:
    """One sample prepared for a pipeline: its call's keyword arguments and what a trace and a
    report of it need."""
    call: dict  # pipe(**call, num_inference_steps=..., guidance_scale=..., generator=...)
    latent_size: tuple  # (h, w) of the maps' queries
    ref_grid: tuple  # (hI, wI) of the reference tokens
    reference: object  # the reference (PIL) as the model saw it: resized and cropped by its encoder; a list
    # of them, ref 0 first, for a pipeline of several references
    mask: Optional[torch.Tensor] = None  # 0/1 float (H, W) for i2am.trace: the region filled or edited
    ref_mask: object = None  # 0/1 float on `reference`: gives IMACS_r; a list like `reference` for a pipeline of
    # several references (None for a reference without one)
    images: dict = field(default_factory=dict)  # the input images as the model used them, for a report
    ref_grids: tuple = ()  # every reference's (hI, wI), ref 0 first, for a pipeline of several references
    ground_truth: object = None  # the expected output (PIL) framed as the output is, for SSIM and LPIPS


@dataclass(frozen=True)
class Kind:
    """One pipeline i2am knows: load(model, device, dtype, **options) -> pipe on device, and
    prepare(pipe, given) -> Inputs, where `given` holds the sample's opened images and prompt;
    description: what it is and what its maps are (`i2am run --help` lists them)."""
    load: Callable
    prepare: Callable
    description: str
    options: tuple = ()  # the load keywords it takes beyond model, device and dtype
    cuda_dtype: str = "float16"  # dtype "auto" on a CUDA device (float32 elsewhere)
    protocols: tuple = tuple(PROTOCOLS)
    takes_prompt: bool = False
    edits_reference: bool = False  # no image: the pipeline edits its reference
    several: bool = False  # takes several references (a list), ref 0 first
    output_of: int = 0  # an editor's output takes this reference's frame (so do its mask and ground truth)
    guidance: float = 5.0  # the guidance scale when none is given (None: the pipeline's own)

    def guidance_scale(self, scale=None):
        """The guidance scale of a run: `scale`, else the kind's default."""
        return self.guidance if scale is None else scale


def load(kind, model, *, device="cpu", dtype="auto", progress=True, **options):
    """The pipeline of `kind` from `model` (a save_pretrained folder or a cached model id) on
    `device`; dtype: a torch dtype, its name, or "auto" (the kind's on CUDA, else float32);
    progress: the libraries' loading bars and the pipeline's step bar. options: ip-adapter's
    ip_adapter (the weights file) and ip_adapter_scale."""
    entry = kind_of(kind)
    unknown = set(options) - set(entry.options)
    if unknown:
        raise InputError(f"the {kind} pipeline takes no {', '.join(arg(o) for o in sorted(unknown))}")
    with _loading_bars(progress):
        pipe = entry.load(model, device, torch_dtype(dtype, device, entry.cuda_dtype), **options)
    pipe.set_progress_bar_config(disable=not progress)
    return pipe


def inputs(kind, pipe, *, reference, image=None, mask=None, ref_mask=None, prompt="", ground_truth=None):
    """One sample's Inputs for `pipe` (from load(kind, ...)). Images are file paths or PIL images;
    reference: one image, or a list of them for a pipeline of several references (ref 0 first);
    masks are white (1) where the image is filled (an editor's: the edited region, optional) and
    on the reference's relevant region (ref_mask, optional; one per reference, a list, with several).
    ground_truth (optional): the expected output, framed as the output is in Inputs.ground_truth."""
    return kind_of(kind).prepare(pipe, read(kind, reference=reference, image=image, mask=mask, ref_mask=ref_mask,
                                            prompt=prompt, ground_truth=ground_truth))


# what each input is, for the messages of sample_rules' needed inputs
NEEDED = {"image": "the image to inpaint", "mask": "the region to fill, white", "reference": "the reference image",
          "prompt": "the edit instruction"}


def sample_rules(kind=None):
    """What one sample of `kind` must give and must not: ({name: what it is} of the inputs it
    needs, {name: why} of those it takes none of); every other input (image, mask, reference,
    ref_mask, prompt, ground_truth) is optional. The one rule behind read (`i2am run`) and the
    `i2am eval` manifests. An inpainting pipeline needs the image to fill, its mask and the
    reference; an editor (edits_reference) needs its references and the edit instruction, and
    takes no image. kind None: what every inpainting pipeline needs, refusing nothing."""
    entry = Kind(None, None, "an inpainting pipeline", takes_prompt=True) if kind is None else kind_of(kind)
    names = ("reference", "prompt") if entry.edits_reference else ("image", "mask", "reference")
    refused = {"image": "it edits its reference"} if entry.edits_reference else {}
    if not entry.takes_prompt:
        refused["prompt"] = "its reference replaces the text"
    return {name: NEEDED[name] for name in names}, refused


def read(kind, *, reference, image=None, mask=None, ref_mask=None, prompt="", ground_truth=None):
    """The sample's images opened and checked (sample_rules, sizes, masks that mark a region)
    before any model is loaded: {"reference", "image", "mask", "ref_mask", "prompt",
    "ground_truth"}, absent ones None; "reference" and "ref_mask" are lists for a pipeline of
    several references. The mask and the ground truth take the output's frame: the image's, or an
    editor's reference output_of (flux2: ref 0; qwen-image-edit-plus: the last)."""
    entry = kind_of(kind)
    references = list(reference) if isinstance(reference, (list, tuple)) else [reference]
    if not references:
        raise InputError(f"{arg('reference')} is empty: give at least one image")
    if len(references) > 1 and not entry.several:
        several = ", ".join(name for name, k in KINDS.items() if k.several)
        raise InputError(f"the {kind} pipeline takes one {arg('reference')}, got {len(references)}; "
                         f"pipelines of several references: {several}")
    values = {"image": image, "mask": mask, "reference": references, "prompt": prompt}
    needed, refused = sample_rules(kind)
    for name, why in refused.items():
        if _given(values[name]):
            raise InputError(f"the {kind} pipeline takes no {arg(name)}: {why}")
    for name, what in needed.items():
        if not _given(values[name]):
            raise InputError(f"the {kind} pipeline needs {arg(name)} ({what})")
    ref_masks = _one_per_reference(ref_mask, len(references))
    opened = [open_image(one, "reference") for one in references]
    ref_masks = [None if m is None else open_image(m, "ref_mask", mode="L") for m in ref_masks]
    given = {"reference": opened if entry.several else opened[0], "prompt": prompt,
             "image": None if image is None else open_image(image, "image"),
             "mask": None if mask is None else open_image(mask, "mask", mode="L"),
             "ground_truth": None if ground_truth is None else open_image(ground_truth, "ground_truth"),
             "ref_mask": ((ref_masks if any(m is not None for m in ref_masks) else None) if entry.several
                          else ref_masks[0])}
    r = entry.output_of % len(opened)
    frame = (given["image"], "image") if image is not None else (opened[r], _nth("reference", r, len(opened)))
    for name in ("mask", "ground_truth"):
        if given[name] is not None:
            same_size(given[name], name, *frame)
    if given["mask"] is not None:
        binary_mask(given["mask"], "mask")
    for r, m in enumerate(ref_masks):
        if m is not None:
            same_size(m, _nth("ref_mask", r, len(opened)), opened[r], _nth("reference", r, len(opened)))
    if given["ref_mask"] is not None and entry.edits_reference and given["mask"] is None:
        raise InputError(f"{arg('ref_mask')} gives IMACS_r, which needs {arg('mask')} (the edited region) "
                         f"with {kind}")
    return given


def _given(value):
    """Whether an input was given: neither None nor an empty text or list."""
    return value is not None and not (isinstance(value, (str, list)) and len(value) == 0)


def _one_per_reference(ref_mask, count):
    """ref_mask as a list of one mask (or None) per reference."""
    if ref_mask is None:
        return [None] * count
    masks = list(ref_mask) if isinstance(ref_mask, (list, tuple)) else [ref_mask]
    if len(masks) != count:
        raise InputError(f"{arg('ref_mask')} gives {len(masks)} mask(s) for {count} references: give one per "
                         "reference, ref 0 first (None for a reference without one)")
    return masks


def _nth(name, r, count):
    """The argument `name` of reference r, numbered when there are several."""
    return name if count == 1 else f"{name} {r}"


def check_protocols_of(kind, protocols):
    """The protocols (i2am.inputs.check_protocols) that `kind` is traced under."""
    return check_protocols(protocols, kind_of(kind).protocols, model=kind)


def kind_of(kind):
    if kind not in KINDS:
        raise InputError(f"unknown {arg('pipeline')} {kind!r}: choose one of {', '.join(KINDS)}")
    return KINDS[kind]


def torch_dtype(name, device, cuda="float16"):
    """A torch dtype from a dtype or its name; "auto": `cuda` on a CUDA device, else float32."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        name = cuda if torch.device(device).type == "cuda" else "float32"
    if not isinstance(getattr(torch, str(name), None), torch.dtype):
        raise InputError(f"{arg('dtype')} {name!r} is not a torch dtype (e.g. float32, float16, bfloat16)")
    return getattr(torch, name)


# ---- the UNet inpainting pipelines -------------------------------------------------------------
def _load_paint_by_example(model, device, dtype):
    import diffusers
    from diffusers import AutoencoderKL, PaintByExamplePipeline, UNet2DConditionModel
    from diffusers.pipelines.deprecated.paint_by_example import PaintByExampleImageEncoder
    from transformers import CLIPImageProcessor

    # diffusers no longer resolves the deprecated PaintByExampleImageEncoder that model_index.json
    # names, so the pipeline is assembled from its components (without a safety checker)
    _locate(model, unused=("safety_checker",))
    with _local_only(PaintByExamplePipeline, model):
        parts = {name: cls.from_pretrained(model, subfolder=name, local_files_only=True) for name, cls in (
            ("vae", AutoencoderKL), ("unet", UNet2DConditionModel), ("image_encoder", PaintByExampleImageEncoder),
            ("feature_extractor", CLIPImageProcessor))}
        # any scheduler class reads scheduler_config.json; the one it names is built from it
        config = diffusers.DDIMScheduler.load_config(model, subfolder="scheduler", local_files_only=True)
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    pipe = PaintByExamplePipeline(**parts, scheduler=scheduler, safety_checker=None, requires_safety_checker=False)
    return pipe.to(device, dtype)


def _load_sd_inpaint_patch(model, device, dtype):
    from diffusers import StableDiffusionInpaintPipeline

    # the reference tokens replace the prompt: a text encoder is neither needed nor loaded
    _locate(model, unused=("text_encoder", "tokenizer"))
    with _local_only(StableDiffusionInpaintPipeline, model):
        pipe = StableDiffusionInpaintPipeline.from_pretrained(model, torch_dtype=dtype, text_encoder=None,
                                                              tokenizer=None, local_files_only=True).to(device)
    for name in ("image_encoder", "feature_extractor"):
        if getattr(pipe, name, None) is None:
            raise InputError(f"{arg('model')} {model!r} has no {name} component: sd-inpaint-patch encodes the "
                             "reference with the pipeline's image_encoder (a transformers vision model) "
                             "preprocessed by its feature_extractor")
    return pipe


def _load_ip_adapter(model, device, dtype, ip_adapter=None, ip_adapter_scale=1.0):
    from diffusers import StableDiffusionInpaintPipeline

    if ip_adapter is None:
        raise InputError(f"the ip-adapter pipeline needs {arg('ip_adapter')} FILE (the adapter weights)")
    weights = Path(ip_adapter)
    if not weights.is_file():
        raise InputError(f"{arg('ip_adapter')} file not found: {weights}")
    _locate(model)
    with _local_only(StableDiffusionInpaintPipeline, model):
        pipe = StableDiffusionInpaintPipeline.from_pretrained(model, torch_dtype=dtype, local_files_only=True)
        pipe.load_ip_adapter(str(weights.parent), subfolder="", weight_name=weights.name, local_files_only=True)
    pipe.set_ip_adapter_scale(ip_adapter_scale)
    return pipe.to(device)


def _inpainting(pipe, given, ref_grid, reference_inputs):
    """Inputs of a UNet inpainting pipeline: image and mask at the image's size, the reference
    (and its mask) as the encoder's processor resizes and crops it, so that each reference patch
    covers the pixels its token saw."""
    image, mask_image = given["image"], given["mask"]
    scale = pipe.vae_scale_factor
    if image.height % scale or image.width % scale:
        raise InputError(f"{arg('image')} is {image.width}x{image.height}: its sides must be multiples of the VAE "
                         f"scale factor {scale}")
    seen = _as_encoded(pipe.feature_extractor, given["reference"])
    ref_mask_image = ref_mask = None
    if given["ref_mask"] is not None:
        ref_mask_image = _as_encoded(pipe.feature_extractor, given["ref_mask"]).convert("L")
        ref_mask = binary_mask(ref_mask_image, "ref_mask", ", cropped as the reference,")
    call = dict(image=image, mask_image=mask_image, height=image.height, width=image.width, **reference_inputs)
    return Inputs(call, (image.height // scale, image.width // scale), ref_grid, seen, binary_mask(mask_image),
                  ref_mask, {"input": image, "mask": mask_image, "ref_mask": ref_mask_image},
                  ground_truth=given["ground_truth"])


def _prepare_paint_by_example(pipe, given):
    return _inpainting(pipe, given, (1, 1), {"example_image": given["reference"]})  # one reference token


def _prepare_sd_inpaint_patch(pipe, given):
    encoder, processor = pipe.image_encoder, pipe.feature_extractor
    device = pipe.unet.device
    pixels = processor(images=given["reference"], return_tensors="pt").pixel_values.to(device, encoder.dtype)
    with torch.no_grad():
        tokens = encoder(pixel_values=pixels).last_hidden_state.to(pipe.unet.dtype)
    if tokens.shape[-1] != pipe.unet.config.cross_attention_dim:
        raise InputError(f"the image_encoder's tokens have width {tokens.shape[-1]} but the UNet cross-attends "
                         f"to width {pipe.unet.config.cross_attention_dim}")
    config = encoder.config
    ref_grid = tuple(s // p for s, p in zip(_pair(config.image_size), _pair(config.patch_size)))
    # zero tokens are the null reference of classifier-free guidance
    return _inpainting(pipe, given, ref_grid, {"prompt_embeds": tokens,
                                               "negative_prompt_embeds": torch.zeros_like(tokens)})


def _prepare_ip_adapter(pipe, given):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    # the adapter's image tokens are not spatial: the reference grid is 1 x N
    tokens = {p.num_tokens[0] for p in pipe.unet.attn_processors.values() if isinstance(p, IPAdapterAttnProcessor2_0)}
    return _inpainting(pipe, given, (1, tokens.pop()), {"prompt": given["prompt"],
                                                        "ip_adapter_image": given["reference"]})


# ---- FLUX.1 Kontext ----------------------------------------------------------------------------
def _load_flux_kontext(model, device, dtype):
    from diffusers import FluxKontextPipeline

    from .integrations import flux

    _locate(model)
    with _local_only(FluxKontextPipeline, model):
        return flux.load_kontext(model, device=device, dtype=dtype)


def _prepare_flux_kontext(pipe, given):
    """The pipeline edits the reference at its own size floored to the packed token size; both
    grids are the packed token grid."""
    from .integrations import flux

    reference = given["reference"]
    height, width = flux.edit_size(pipe, reference)
    if height == 0 or width == 0:
        raise InputError(f"{arg('reference')} is {reference.width}x{reference.height}: flux-kontext needs sides "
                         f"of at least {pipe.vae_scale_factor * 2} pixels")
    grid = flux.token_grid(pipe, height, width)
    crop = {name: None if given[name] is None else given[name].crop((0, 0, width, height))  # as it is encoded
            for name in ("reference", "mask", "ref_mask", "ground_truth")}
    masks = {name: None if crop[name] is None else binary_mask(crop[name], name) for name in ("mask", "ref_mask")}
    return Inputs(flux.kontext_call(crop["reference"], given["prompt"], height, width), grid, grid, crop["reference"],
                  masks["mask"], masks["ref_mask"], {"mask": crop["mask"], "ref_mask": crop["ref_mask"]},
                  ground_truth=crop["ground_truth"])


# ---- several references: Qwen-Image-Edit-Plus, FLUX.2 -------------------------------------------
def _loader(cls_name):
    """load() of a diffusers pipeline class that takes its components as saved."""
    def load(model, device, dtype):
        import diffusers

        cls = getattr(diffusers, cls_name)
        _locate(model)
        with _local_only(cls, model):
            return cls.from_pretrained(model, torch_dtype=dtype, local_files_only=True).to(device)
    return load


def _several(pipe, given, fit, kind):
    """Inputs of a pipeline of several references: fit(image) is an image the size of a reference
    as the VAE encodes that reference (each reference's mask is fitted as it is); the output takes
    the fitted size of the reference the kind's output_of names, and the mask and the ground truth
    are fitted as that reference. Every grid is the packed token grid (size / 16)."""
    seen = [fit(im) for im in given["reference"]]
    out = seen[KINDS[kind].output_of]
    token = pipe.vae_scale_factor * 2  # latents packed 2x2
    grids = tuple((im.height // token, im.width // token) for im in seen)
    call = dict(image=list(given["reference"]), prompt=given["prompt"], height=out.height, width=out.width)
    fitted = {name: None if given[name] is None else fit(given[name]) for name in ("mask", "ground_truth")}
    mask_image = None if fitted["mask"] is None else fitted["mask"].convert("L")
    images = {"mask": mask_image}
    ref_mask = None
    if given["ref_mask"] is not None:
        ref_mask = []
        for r, m in enumerate(given["ref_mask"]):
            images[f"ref_mask_{r}"] = None if m is None else fit(m).convert("L")
            ref_mask.append(None if m is None else binary_mask(images[f"ref_mask_{r}"], f"ref_mask {r}",
                                                               ", resized as its reference,"))
    mask = None if mask_image is None else binary_mask(mask_image, "mask", ", resized as the output,")
    return Inputs(call, (out.height // token, out.width // token), grids[0], seen, mask, ref_mask, images,
                  ref_grids=grids, ground_truth=fitted["ground_truth"])


def _prepare_qwen_image_edit_plus(pipe, given):
    """QwenImageEditPlusPipeline resizes each reference to about 1024x1024 pixels (sides multiples
    of 32) for its VAE; the output takes the last reference's shape at that area."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import VAE_IMAGE_SIZE, calculate_dimensions

    def fit(im):
        width, height = calculate_dimensions(VAE_IMAGE_SIZE, im.width / im.height)
        return _as_vae_input(pipe.image_processor, im, height, width)
    return _several(pipe, given, fit, "qwen-image-edit-plus")


def _prepare_flux2(pipe, given):
    """Flux2Pipeline scales each reference down to at most 1024x1024 pixels and crops it to
    multiples of 16; the output takes the first reference's size."""
    processor, multiple = pipe.image_processor, pipe.vae_scale_factor * 2

    def fit(im):
        im = processor._resize_if_exceeds_area(im.convert("RGB"), 1024 * 1024)
        width, height = im.width // multiple * multiple, im.height // multiple * multiple
        if width == 0 or height == 0:
            raise InputError(f"{arg('reference')} is {im.width}x{im.height}: flux2 needs sides of at least "
                             f"{multiple} pixels")
        return _as_vae_input(processor, im, height, width, resize_mode="crop")
    return _several(pipe, given, fit, "flux2")


def on_regions(x, regions):
    """The Inputs `x` of a run traced on two regions of its one latent (i2am.regions.Regions,
    checked on x's latent grid): the maps' grids are the regions' shapes and the inpainting
    mask is the query region's part."""
    from .regions import crop, shape

    regions.check(x.latent_size)
    if x.ref_mask is not None:
        raise InputError(f"{arg('ref_mask')} marks a separate reference image; with {arg('ref_region')} the "
                         "reference is a region of the generated image: leave it out")
    mask = None if x.mask is None else crop(x.mask, regions.query, x.latent_size)
    return replace(x, latent_size=shape(regions.query), ref_grid=shape(regions.ref), mask=mask)


KINDS = {
    "paint-by-example": Kind(
        _load_paint_by_example, _prepare_paint_by_example,
        "diffusers PaintByExamplePipeline (run without its safety checker): one reference token, so the "
        "reference grid is 1x1 and M_r is a single value; M_g is still meaningful"),
    "sd-inpaint-patch": Kind(
        _load_sd_inpaint_patch, _prepare_sd_inpaint_patch,
        "StableDiffusionInpaintPipeline whose cross-attention keys are the CLS and patch tokens "
        "(last_hidden_state) of its image_encoder component (e.g. a CLIPVisionModel) on the reference, "
        "preprocessed by its feature_extractor; zero tokens are the null reference of classifier-free guidance"),
    "ip-adapter": Kind(
        _load_ip_adapter, _prepare_ip_adapter,
        "StableDiffusionInpaintPipeline with an IP-Adapter (loaded from its weights file): the maps come from the "
        "attention over the adapter's N image tokens, which are not spatial: the reference grid is 1xN",
        options=("ip_adapter", "ip_adapter_scale"), takes_prompt=True),
    "flux-kontext": Kind(
        _load_flux_kontext, _prepare_flux_kontext,
        "diffusers FluxKontextPipeline editing the reference by the prompt (no image): the maps come from every "
        "joint attention layer, the latent grid is the packed token grid (size / 16) of generated and reference "
        "tokens alike; a mask (optional, the size of the reference) marks the edited region for IMACS_g; the "
        "output keeps the reference's size (floored to multiples of 16)",
        cuda_dtype="bfloat16", protocols=("paper",), takes_prompt=True, edits_reference=True, guidance=2.5),
    "qwen-image-edit-plus": Kind(
        _loader("QwenImageEditPlusPipeline"), _prepare_qwen_image_edit_plus,
        "diffusers QwenImageEditPlusPipeline (Qwen-Image-Edit-2509, -2511) editing by the prompt with one or "
        "several references (no image); maps per reference, on the packed token grids (size / 16); the output "
        "takes the last reference's frame, and so does a mask of the edited region (optional, for IMACS_g)",
        cuda_dtype="bfloat16", protocols=("paper",), takes_prompt=True, edits_reference=True, several=True,
        output_of=-1, guidance=None),
    "flux2": Kind(
        _loader("Flux2Pipeline"), _prepare_flux2,
        "diffusers Flux2Pipeline (FLUX.2 [dev]) editing by the prompt with one or several references (no image); "
        "maps per reference, on the packed token grids (size / 16); the output takes the first reference's frame, "
        "and so does a mask of the edited region (optional, for IMACS_g); the FLUX.2 [klein] pipelines "
        "(Flux2KleinPipeline, Flux2KleinKVPipeline) are not loaded here: trace them from Python with i2am.trace",
        cuda_dtype="bfloat16", protocols=("paper",), takes_prompt=True, edits_reference=True, several=True,
        guidance=4.0),
}


# ---- loading helpers ---------------------------------------------------------------------------
def _locate(model, unused=()):
    """Fail early, naming what is missing, when `model` is a folder that is not there or lacks a
    component its model_index.json lists (diffusers' own error names only a file); `unused`
    components may be missing. A model id is looked up in the local Hugging Face cache later."""
    folder = Path(model)
    if not folder.is_dir():
        if folder.is_absolute() or str(model).startswith(".") or str(model).count("/") > 1:
            raise InputError(f"{arg('model')} folder not found: {model}")
        return
    index = folder / "model_index.json"
    if not index.is_file():
        raise InputError(f"{folder} is not a diffusers pipeline folder (save_pretrained): no model_index.json")
    entries = json.loads(index.read_text())
    missing = [name for name, entry in entries.items()
               if not name.startswith("_") and isinstance(entry, list) and entry[0] is not None
               and name not in unused and not (folder / name).is_dir()]
    if missing:
        raise InputError(f"{arg('model')} folder {folder} lacks {', '.join(missing)}: listed in its "
                         "model_index.json but not there")


@contextmanager
def _local_only(cls, model):
    """Loading errors (nothing local: no download is ever tried) as an InputError naming the model."""
    try:
        with warnings.catch_warnings():  # torch_dtype works in every supported diffusers; newer ones call it dtype
            warnings.filterwarnings("ignore", "`torch_dtype` is deprecated", FutureWarning)
            yield
    except (OSError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        where = "the folder" if Path(model).is_dir() else "the local Hugging Face cache (no download is tried)"
        raise InputError(f"cannot load {cls.__name__} {str(model)!r} from {where}: {err}") from err


@contextmanager
def _loading_bars(shown):
    """diffusers' and transformers' loading bars on or off, as they were after."""
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


def _as_encoded(processor, image):
    """image resized and cropped as the reference encoder's processor does it, not normalised."""
    if processor is None:
        return image
    return to_pil(processor(images=image.convert("RGB"), do_normalize=False, return_tensors="pt").pixel_values[0])


def _as_vae_input(processor, image, height, width, **options):
    """image resized (and cropped) to height x width as the pipeline's image processor prepares it
    for the VAE."""
    return to_pil(processor.postprocess(processor.preprocess(image.convert("RGB"), height=height, width=width,
                                                             **options), output_type="pt")[0])


def _pair(x):
    return (x, x) if isinstance(x, int) else tuple(x)
