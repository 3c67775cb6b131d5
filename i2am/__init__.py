"""i2am: I2AM attribution maps for image-to-image diffusion models, computed inside attention.

    with i2am.trace(pipe, ref_grid=(16, 16), mask=mask, points=[(20, 30)]) as tc:
        image = pipe(...).images[0]
    maps = tc.maps()
    maps.generated(), maps.reference(masked=True), maps.specific_reference((20, 30))
"""
from importlib.metadata import PackageNotFoundError, version

from .config import TraceConfig
from .faithfulness import ablate, randomize
from .maps import AttributionMaps
from .recorder import Recorder
from .recording import attention, recording

try:
    __version__ = version("i2am")  # the installed distribution's, so it never drifts from setup.py
except PackageNotFoundError:  # a checkout on sys.path without an install
    __version__ = "0+unknown"

__all__ = ["AttributionMaps", "Recorder", "TraceConfig", "ablate", "attention", "plot_overlay", "randomize",
           "recording", "trace"]


def __getattr__(name):
    # i2am.trace needs diffusers: imported on first use, so the kernels and the analysis layer
    # import without it (the GPU machines have no diffusers).
    if name == "trace":
        from .tracing import trace

        return trace
    if name == "plot_overlay":  # matplotlib: imported on first use too
        from .viz import plot_overlay

        return plot_overlay
    raise AttributeError(f"module 'i2am' has no attribute {name!r}")
