"""i2am: I2AM attribution maps for image-to-image diffusion models, computed inside attention.

    with i2am.trace(pipe, ref_grid=(16, 16), mask=mask, points=[(20, 30)]) as tc:
        image = pipe(...).images[0]
    maps = tc.maps()
    maps.generated(), maps.reference(masked=True), maps.specific_reference((20, 30))
"""
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("i2am")  # the installed distribution's, so it never drifts from setup.py
except PackageNotFoundError:  # a checkout on sys.path without an install
    __version__ = "0+unknown"

# Every public name is imported on first use, so that `import i2am` imports neither torch nor
# diffusers nor matplotlib: the kernels and the analysis layer import without diffusers (the GPU
# machines have none), and the `i2am` command sets the process's threading policy before torch
# is loaded (i2am.cli).
_PUBLIC = {"AttributionMaps": "maps", "Recorder": "recorder", "TraceConfig": "config", "ablate": "faithfulness",
           "attention": "instrument", "plot_overlay": "viz", "randomize": "faithfulness", "recording": "instrument",
           "trace": "tracing"}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
    if name in _PUBLIC:
        return getattr(import_module(f".{_PUBLIC[name]}", __name__), name)
    raise AttributeError(f"module 'i2am' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))
