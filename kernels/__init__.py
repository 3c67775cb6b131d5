"""i2am.kernels: cross-attention that streams I2AM attribution maps into small buffers.

The kernel layer: one op, :func:`attention_with_maps`, with interchangeable backends
("triton", "cuda", "torch", "reference"). The analysis layer (``i2am``) builds on it.
"""
if __name__ == "kernels":
    # This folder was imported under the top-level name "kernels" because the repository root is
    # on sys.path (`python -m pytest` or `python -m i2am` in a checkout). That name belongs to
    # Hugging Face's `kernels` package, which transformers imports: load it in this module's place
    # (the import system returns whatever sys.modules holds after this file has run).
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.join(os.path.dirname(__file__), os.pardir))
    _spec = importlib.machinery.PathFinder.find_spec(
        "kernels", [p for p in sys.path if os.path.realpath(p or os.curdir) != _root])
    if _spec is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (this repository's kernels/ folder is imported as "
                                  "i2am.kernels)", name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
else:
    from .api import (BACKENDS, MAP_NAMES, MapsCall, attention_with_maps, backend_module, graph_break, prepare,
                      query_row_range, slice_indices, triton_available)

    __all__ = ["attention_with_maps", "prepare", "MapsCall", "BACKENDS", "MAP_NAMES", "backend_module",
               "graph_break", "query_row_range", "slice_indices", "triton_available"]
