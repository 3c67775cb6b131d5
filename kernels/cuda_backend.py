"""CUDA C++ backend: kernels/cuda built by CMakeLists.txt into libi2am_cuda.so, called through ctypes.

The library has a plain C ABI (kernels/cuda/i2am_cuda.h): this module fills its problem struct
with tensor pointers, element strides and sizes, lets torch allocate the workspace, and enqueues
the call on the current torch stream. Semantics are those of the torch backend (kernels/api.py).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path

import torch

from . import torch_backend

LIB_ENV = "I2AM_CUDA_LIB"
LIB_NAME = "libi2am_cuda.so"
BUILD_HINT = (
    "build it from the repository root with `cmake -S . -B build && cmake --build build -j` "
    "(needs nvcc and cmake >= 3.24; writes kernels/libi2am_cuda.so), or reinstall with "
    "`I2AM_BUILD_CUDA=1 pip install -e .`, or set I2AM_CUDA_LIB to a built libi2am_cuda.so"
)
DTYPES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}
MAP_INDEX = {"gen_query": 0, "gen_key": 1, "ref_key": 2, "ref_query": 3}  # enum i2am_map
WORKSPACE_ALIGN = 256  # i2am_run's requirement

_Strides = ctypes.c_int64 * 4


class Problem(ctypes.Structure):
    """Mirror of struct i2am_problem (checked against the library's sizeof)."""

    _fields_ = [
        ("device", ctypes.c_int32), ("dtype", ctypes.c_int32),
        ("batch", ctypes.c_int32), ("heads", ctypes.c_int32), ("nq", ctypes.c_int32),
        ("nk", ctypes.c_int32), ("d", ctypes.c_int32), ("dv", ctypes.c_int32),
        ("n_record", ctypes.c_int32), ("n_ref", ctypes.c_int32),
        ("n_key_probes", ctypes.c_int32), ("n_query_probes", ctypes.c_int32),
        ("scale", ctypes.c_double), ("c_from_p_range", ctypes.c_double),
        ("q", ctypes.c_void_p), ("k", ctypes.c_void_p), ("v", ctypes.c_void_p), ("out", ctypes.c_void_p),
        ("q_stride", _Strides), ("k_stride", _Strides), ("v_stride", _Strides), ("out_stride", _Strides),
        ("record_idx", ctypes.c_void_p), ("ref_idx", ctypes.c_void_p),
        ("key_probes", ctypes.c_void_p), ("query_probes", ctypes.c_void_p),
        ("maps", ctypes.c_void_p * 4), ("map_stride", _Strides * 4),
    ]


class CudaBackendError(RuntimeError):
    """The CUDA library is missing or unusable, or a call into it failed."""


_loaded: dict[str, ctypes.CDLL] = {}


def library_path() -> Path:
    """Where the library is looked for: $I2AM_CUDA_LIB, else next to this module."""
    env = os.environ.get(LIB_ENV)
    return Path(env) if env else Path(__file__).with_name(LIB_NAME)


def load_library(path=None) -> ctypes.CDLL:
    """The library at `path` (default: library_path()), loaded once and checked."""
    path = Path(path) if path is not None else library_path()
    key = str(path.resolve())
    if key in _loaded:
        return _loaded[key]
    if not path.is_file():
        origin = f"{LIB_ENV}={os.environ[LIB_ENV]}" if os.environ.get(LIB_ENV) and path == library_path() else str(path)
        raise CudaBackendError(f"backend='cuda' needs the CUDA library, not found at {origin}; {BUILD_HINT}")
    try:
        lib = ctypes.CDLL(key)
    except OSError as e:
        raise CudaBackendError(f"cannot load the CUDA library {path}: {e}; rebuild it: {BUILD_HINT}") from e
    lib.i2am_problem_size.restype = ctypes.c_size_t
    lib.i2am_workspace_bytes.argtypes = [ctypes.POINTER(Problem), ctypes.POINTER(ctypes.c_size_t)]
    lib.i2am_run.argtypes = [ctypes.POINTER(Problem), ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.i2am_last_error.restype = ctypes.c_char_p
    if lib.i2am_problem_size() != ctypes.sizeof(Problem):
        raise CudaBackendError(f"{path} was built from another i2am_cuda.h (problem struct of "
                               f"{lib.i2am_problem_size()} bytes, expected {ctypes.sizeof(Problem)}); {BUILD_HINT}")
    _loaded[key] = lib
    return lib


def is_host_emulation(lib) -> bool:
    """Whether lib is the CPU emulation build (-DI2AM_HOST_EMULATION=ON), which takes CPU tensors."""
    return hasattr(lib, "i2am_host_emulation")


def run(q, k, v, out, maps, *, scale, ref_idx, record_idx, key_probes, query_probes, library=None):
    """The backend contract of kernels/api.py. library: a loaded library (default: load_library())."""
    if library is None and not q.is_cuda:
        raise ValueError(f"backend='cuda' needs CUDA tensors, got q on {q.device}; "
                         "use backend='torch' (or 'auto') for CPU tensors")
    lib = load_library() if library is None else library
    if not q.is_cuda and not is_host_emulation(lib):
        raise ValueError(f"backend='cuda' needs CUDA tensors, got q on {q.device}")
    if q.dtype in DTYPES:
        _call(lib, q, k, v, out, maps, scale, ref_idx, record_idx, key_probes, query_probes)
        return
    # Other float dtypes (float64): computed in float32, recorded rows copied back.
    out32 = torch.empty(out.shape, dtype=torch.float32, device=out.device)
    _call(lib, q.float(), k.float(), v.float(), out32, maps, scale, ref_idx, record_idx, key_probes, query_probes)
    out[record_idx] = out32[record_idx].to(out.dtype)


def _call(lib, q, k, v, out, maps, scale, ref_idx, record_idx, key_probes, query_probes):
    dev = q.device
    for name, t in maps.items():
        if name not in MAP_INDEX or t.dtype != torch.float32 or t.device != dev or t.dim() != 4:
            raise ValueError(f"map buffer {name!r} must be a 4-D float32 tensor on {dev}")
    if out.dtype != q.dtype or out.device != dev:
        raise ValueError(f"out must be {q.dtype} on {dev}, got {out.dtype} on {out.device}")
    # Contiguous int64 / float32 copies; the caching allocator keeps freed blocks stream-ordered.
    record_idx = record_idx.to(device=dev, dtype=torch.int64).contiguous()
    ref_idx = ref_idx.to(device=dev, dtype=torch.int64).contiguous()
    key_probes = key_probes.to(device=dev, dtype=torch.float32).contiguous()
    query_probes = query_probes.to(device=dev, dtype=torch.float32).contiguous()

    p = Problem()
    p.device = dev.index if dev.index is not None else 0
    p.dtype = DTYPES[q.dtype]
    p.batch, p.heads, p.nq, p.d = q.shape
    p.nk, p.dv = k.shape[2], v.shape[3]
    p.n_record, p.n_ref = record_idx.numel(), ref_idx.numel()
    p.n_key_probes, p.n_query_probes = key_probes.shape[0], query_probes.shape[0]
    p.scale = float(scale)
    p.c_from_p_range = torch_backend.C_FROM_P_RANGE  # read per call: tests and benchmarks change it
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        setattr(p, name, t.data_ptr())
        setattr(p, f"{name}_stride", _Strides(*t.stride()))
    p.record_idx, p.ref_idx = record_idx.data_ptr(), ref_idx.data_ptr()
    p.key_probes, p.query_probes = key_probes.data_ptr(), query_probes.data_ptr()
    for name, t in maps.items():
        p.maps[MAP_INDEX[name]] = t.data_ptr()
        p.map_stride[MAP_INDEX[name]] = _Strides(*t.stride())

    size = ctypes.c_size_t()
    _check(lib, lib.i2am_workspace_bytes(ctypes.byref(p), ctypes.byref(size)))
    workspace = torch.empty(size.value + WORKSPACE_ALIGN, dtype=torch.uint8, device=dev)
    start = -workspace.data_ptr() % WORKSPACE_ALIGN
    stream = torch.cuda.current_stream(dev).cuda_stream if q.is_cuda else None
    with torch.cuda.device(dev) if q.is_cuda else contextlib.nullcontext():
        _check(lib, lib.i2am_run(ctypes.byref(p), workspace.data_ptr() + start, size.value, stream))


def _check(lib, status):
    if status != 0:
        raise CudaBackendError(f"i2am CUDA backend: {lib.i2am_last_error().decode(errors='replace')}")
