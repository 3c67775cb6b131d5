"""Model families i2am.trace knows, one module per family.

Each module finds a denoiser's attention layers, stands in for their processors (the same
output; the attention that carries the reference goes through the trace's ``attend``, which
streams the maps) and reads what the family's inputs say (latent size, token ranges). It
exposes:

    matches(obj) -> bool                 whether obj is a pipeline or denoiser of the family
    split(obj) -> (pipe or None, denoiser)
    attention_layers(denoiser) -> {name: attention module}, the layers that can be recorded
    install(tc, layers)                  swap processors; append their undo to tc._undo
    read_inputs(tc, args, kwargs)        one denoiser call: set latent size (and grids); returns
                                         whether the call is a new step (Flux true CFG: not its
                                         negative pass)
    timestep(args, kwargs)               its timestep in pipe.scheduler.timesteps' units
    CFG_BATCH                            whether the pipelines batch [uncond, cond]
    NEEDS_REF_GRID                       whether ref_grid must be given (else the inputs say it)
    PROTOCOLS                            the protocols (i2am.protocols) defined for the family

A new family (SD3, Qwen-Image-Edit) is one new module listed in FAMILIES.
"""
import importlib

FAMILIES = ("flux", "unet")  # tried in this order; unet last: it takes any module with attn2 layers


def family(obj):
    """The integration module for a pipeline or denoiser."""
    for name in FAMILIES:
        module = importlib.import_module(f"{__name__}.{name}")
        if module.matches(obj):
            return module
    transformer = getattr(obj, "transformer", None)
    if transformer is not None:
        raise ValueError(f"{type(obj).__name__} has a {type(transformer).__name__} transformer denoiser; i2am.trace "
                         "supports Flux transformers (FluxTransformer2DModel) and UNet pipelines (pipe.unet)")
    raise TypeError(f"i2am.trace needs a diffusers pipeline with a .unet (UNet2DConditionModel) or a Flux "
                    f"transformer (FluxKontextPipeline), or one of those denoisers; got {type(obj).__name__}")
