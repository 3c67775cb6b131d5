"""Model families i2am.trace knows: one module per family, one row per family in FAMILIES.

A family is a class (i2am.integrations.base.Family) whose instance stands in on one
denoiser's attention layers for the length of a trace, owns that change and its undo, and reads
what each denoiser call's inputs say (latent size, timestep, token layout). UNets stand in with
processor copies (i2am.integrations.unet); every DiT stands in at diffusers'
dispatch_attention_fn (i2am.integrations.dit), so a DiT family says only where its generated
rows and reference keys are.

A new family (SD3, Wan) is one new module and one row below; nothing in
the trace, the recording or the CLI changes.
"""
import importlib

# module -> family class, tried in this order; the UNet family last: it takes any module with attn2 layers
FAMILIES = {
    "flux": "FluxFamily",
    "qwenimage": "QwenImageFamily",
    "flux2": "Flux2Family",
    "unet": "UNetFamily",
}


def family(obj):
    """The family class (not yet instantiated) of a pipeline or denoiser."""
    for module, name in FAMILIES.items():
        cls = getattr(importlib.import_module(f"{__name__}.{module}"), name)
        if cls.matches(obj):
            return cls
    transformer = getattr(obj, "transformer", None)
    if transformer is not None:
        raise ValueError(f"{type(obj).__name__} has a {type(transformer).__name__} transformer denoiser; i2am.trace "
                         "supports FluxTransformer2DModel, Flux2Transformer2DModel, QwenImageTransformer2DModel and UNet "
                         "pipelines (pipe.unet)")
    raise TypeError(f"i2am.trace needs a diffusers pipeline with a .unet (UNet2DConditionModel) or a Flux "
                    f"transformer (FluxKontextPipeline), or one of those denoisers; got {type(obj).__name__}")
