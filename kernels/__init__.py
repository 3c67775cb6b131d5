"""i2am.kernels: cross-attention that streams I2AM attribution maps into small buffers.

The kernel layer: one op, :func:`attention_with_maps`, with interchangeable backends
("triton", "cuda", "torch", "reference"). The analysis layer (``i2am``) builds on it.
"""
from .api import (BACKENDS, MAP_NAMES, MapsCall, attention_with_maps, backend_module, prepare, query_row_range,
                  triton_available)

__all__ = ["attention_with_maps", "prepare", "MapsCall", "BACKENDS", "MAP_NAMES", "backend_module",
           "query_row_range", "triton_available"]
