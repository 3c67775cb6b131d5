import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # tests import their shared helpers (cases.py)

if not torch.cuda.is_available():
    # Without CUDA the Triton kernels run in Triton's CPU interpreter. The variable must be set
    # before anything imports triton (diffusers does, through torch._dynamo): triton builds its
    # @jit standard library (tl.cdiv, tl.max, ...) for the mode in force at its import.
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared CPU: thread start-up costs more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the backends of the op, for the contract suite (test_backends.py) and the CUDA tests -------

GPU = torch.cuda.is_available()  # the suite's cases lie on the GPU when there is one


@pytest.fixture(scope="session")
def built_library(tmp_path_factory):
    """libi2am_cuda.so compiled from this checkout: for the GPU present, else sm_80 as a compile check."""
    from cuda_build import cmake_build, require_toolchain
    from i2am.kernels import cuda_backend

    require_toolchain()
    arch = "native" if torch.cuda.is_available() else "80-real"
    lib_dir = cmake_build(tmp_path_factory.mktemp("cuda"), f"-DCMAKE_CUDA_ARCHITECTURES={arch}")
    return lib_dir / cuda_backend.LIB_NAME


@pytest.fixture(scope="session")
def emulated(tmp_path_factory):
    """The CUDA kernels' source built as its host emulation (threads as fibers, the MMAs emulated)."""
    from cuda_build import cmake_build, require_toolchain
    from i2am.kernels import cuda_backend

    if torch.cuda.is_available():  # it stands in for a GPU; spend no device time on it
        pytest.skip("a GPU is present: the gpu-marked tests run the real kernels")
    require_toolchain()  # the emulation compiles with the host compiler but uses the toolkit headers
    lib_dir = cmake_build(tmp_path_factory.mktemp("emulation"), "-DI2AM_HOST_EMULATION=ON")
    return cuda_backend.load_library(lib_dir / "libi2am_emulated.so")


@pytest.fixture(scope="session")
def gpu_library(request):
    """The library for GPU tests: $I2AM_CUDA_LIB, else built from this checkout, else the installed one."""
    import shutil

    from i2am.kernels import cuda_backend

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if os.environ.get(cuda_backend.LIB_ENV):
        return cuda_backend.load_library()
    if shutil.which("cmake") and shutil.which("nvcc"):
        return cuda_backend.load_library(request.getfixturevalue("built_library"))
    if cuda_backend.library_path().is_file():
        return cuda_backend.load_library()
    pytest.skip(f"no CUDA library: {cuda_backend.BUILD_HINT}")


class Backend:
    """One backend of the op as the contract suite runs it: its name, the options its `run` takes
    (the CUDA library: emulated without a GPU), and the dtypes it computes."""

    def __init__(self, name, library=None):
        self.name, self.options = name, ({} if library is None else {"library": library})
        self.dtypes = (torch.float16, torch.float32) if name == "triton" and not GPU else \
            (torch.float16, torch.bfloat16, torch.float32)  # the interpreter has no bfloat16 dots

    def tiles(self, case, rows=12, splits=None):
        """Options that cut a small case into several tiles: torch chunks of `rows` query rows,
        `splits` Triton programs per head."""
        if self.name == "torch":
            return {"chunk_bytes": 4 * case.q.shape[1] * case.k.shape[2] * rows}
        if self.name == "triton" and splits:
            return {"splits": splits}
        return {}

    def route(self, monkeypatch):
        """Calls of the op with backend=self.name run this backend's library."""
        if self.options:
            import functools

            from i2am.kernels import cuda_backend
            monkeypatch.setattr(cuda_backend, "run", functools.partial(cuda_backend.run, **self.options))


@pytest.fixture(params=["torch", "triton", "cuda", "reference"])
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    if request.param == "cuda":
        return Backend("cuda", request.getfixturevalue("gpu_library" if GPU else "emulated"))
    return Backend(request.param)


@pytest.fixture
def record_bars(monkeypatch):
    """record_bars(module) -> a list that gets the keyword arguments of every tqdm bar `module`
    opens from then on: what was asked for, not what the terminal shows."""
    def record(module):
        bars = []

        class Recorded(module.tqdm):
            def __init__(self, *args, **kwargs):
                bars.append(kwargs)
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(module, "tqdm", Recorded)
        return bars
    return record


@pytest.fixture
def step_bars(record_bars):
    """The bars diffusers' pipelines open over their steps (DiffusionPipeline.progress_bar)."""
    from diffusers.pipelines import pipeline_utils

    return record_bars(pipeline_utils)
