"""The CUDA C++ backend (kernels/cuda, CMakeLists.txt, kernels/cuda_backend.py).

Without a GPU: CMake compiles the library with nvcc (warnings are errors), the loader and the C
ABI report errors clearly, and the very same kernel source, built as the host emulation
(-DI2AM_HOST_EMULATION=ON: threads as fibers, ldmatrix/mma emulated from the PTX tables), runs
on CPU tensors against the reference. With a GPU (marked gpu): the case matrix of the torch
backend tests against the reference, determinism and agreement with the triton backend.
"""
import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cases import assert_map_close, check_backend, expected, make_case
from i2am.kernels import attention_with_maps, cuda_backend, torch_backend

ROOT = Path(__file__).resolve().parents[1]
ALL = ("gen_query", "gen_key", "ref_key", "ref_query")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def cmake_build(build_dir, *options):
    """Configure and build the repository's CMakeLists.txt in build_dir; returns the library folder."""
    lib_dir = build_dir / "lib"
    jobs = str(min(8, os.cpu_count() or 1))
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DI2AM_LIB_DIR={lib_dir}", "-DI2AM_WERROR=ON",
                 *options],
                ["cmake", "--build", str(build_dir), "-j", jobs]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    return lib_dir


def require_toolchain():
    missing = [tool for tool in ("cmake", "nvcc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the CUDA library needs {' and '.join(missing)} on PATH")


@pytest.fixture(scope="module")
def built_library(tmp_path_factory):
    """libi2am_cuda.so compiled from this checkout: for the GPU present, else sm_80 as a compile check."""
    require_toolchain()
    arch = "native" if torch.cuda.is_available() else "80-real"
    lib_dir = cmake_build(tmp_path_factory.mktemp("cuda"), f"-DCMAKE_CUDA_ARCHITECTURES={arch}")
    return lib_dir / cuda_backend.LIB_NAME


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    if torch.cuda.is_available():  # it stands in for a GPU; spend no device time on it
        pytest.skip("a GPU is present: the gpu-marked tests run the real kernels")
    require_toolchain()  # the emulation compiles with the host compiler but uses the toolkit headers
    lib_dir = cmake_build(tmp_path_factory.mktemp("emulation"), "-DI2AM_HOST_EMULATION=ON")
    return cuda_backend.load_library(lib_dir / "libi2am_emulated.so")


@pytest.fixture(scope="module")
def gpu_library(request):
    """The library for GPU tests: $I2AM_CUDA_LIB, else built from this checkout, else the installed one."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if os.environ.get(cuda_backend.LIB_ENV):
        return cuda_backend.load_library()
    if shutil.which("cmake") and shutil.which("nvcc"):
        return cuda_backend.load_library(request.getfixturevalue("built_library"))
    if cuda_backend.library_path().is_file():
        return cuda_backend.load_library()
    pytest.skip(f"no CUDA library: {cuda_backend.BUILD_HINT}")


def matrix_dtype(d, Nk):
    """Each head dim and each Nk of the case matrix meets every dtype."""
    return DTYPES[((40, 80, 160).index(d) + (1, 7, 77, 257).index(Nk)) % 3]


# ---- build and errors (no GPU needed) ----------------------------------------------------------

def test_cmake_build_compiles_and_exports_the_c_api(built_library):
    lib = cuda_backend.load_library(built_library)  # also checks the problem struct's size
    for name in ("i2am_problem_size", "i2am_workspace_bytes", "i2am_run", "i2am_last_error"):
        assert hasattr(lib, name)
    assert not cuda_backend.is_host_emulation(lib)


def test_c_api_reports_invalid_arguments(built_library):
    lib = cuda_backend.load_library(built_library)
    p = cuda_backend.Problem(dtype=7, batch=1, heads=1, nq=1, nk=1, d=8, dv=8)
    size = cuda_backend.ctypes.c_size_t()
    assert lib.i2am_workspace_bytes(p, size) == 1  # I2AM_INVALID_ARGUMENT
    assert b"dtype must be" in lib.i2am_last_error()
    p.dtype, p.d = 0, 300
    assert lib.i2am_run(p, None, 0, None) == 1
    assert b"head dims up to 256" in lib.i2am_last_error()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path without a device")
def test_c_api_reports_cuda_errors_without_a_device(built_library):
    """A CUDA failure (here: no device) comes back as a status and a message, not a crash."""
    case = make_case(Nq=5, Nk=3, d=8)
    with pytest.raises(cuda_backend.CudaBackendError, match="selecting CUDA device 0 failed: cuda"):
        _run(cuda_backend.load_library(built_library), case, bypass_device_check=True)


def test_missing_library_says_how_to_build(monkeypatch, tmp_path):
    monkeypatch.setenv(cuda_backend.LIB_ENV, str(tmp_path / "nowhere" / cuda_backend.LIB_NAME))
    with pytest.raises(cuda_backend.CudaBackendError, match="cmake -S . -B build") as err:
        cuda_backend.load_library()
    assert "I2AM_CUDA_LIB=" in str(err.value) and "I2AM_BUILD_CUDA=1" in str(err.value)


def test_cpu_tensors_are_refused():
    case = make_case(Nq=5, Nk=3, d=8)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        check_backend("cuda", case)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        attention_with_maps(case.q, case.k, case.v, backend="cuda")


def _run(lib, case, bypass_device_check=False):
    """One call of the backend with fresh buffers; returns (out, maps)."""
    B, H, Nq = case.q.shape[:3]
    out = torch.zeros(B, H, Nq, case.v.shape[-1], dtype=case.q.dtype, device=case.q.device)
    shapes = {"gen": (case.key_probes.shape[0], Nq), "ref": (case.query_probes.shape[0], case.ref_idx.numel())}
    maps = {n: torch.zeros(case.record_idx.numel(), H, *shapes[n[:3]], device=case.q.device) for n in case.names}
    if bypass_device_check:  # straight to the C API
        cuda_backend._call(lib, case.q, case.k, case.v, out, maps, case.scale, case.ref_idx, case.record_idx,
                           case.key_probes, case.query_probes)
    else:
        cuda_backend.run(case.q, case.k, case.v, out, maps, scale=case.scale, ref_idx=case.ref_idx,
                         record_idx=case.record_idx, key_probes=case.key_probes, query_probes=case.query_probes,
                         library=lib)
    return out, maps


# ---- the kernels in the host emulation (no GPU needed) -----------------------------------------

@pytest.mark.parametrize("d", [40, 80, 160])
@pytest.mark.parametrize("Nk", [1, 7, 77, 257])
def test_emulated_matches_reference(emulated, d, Nk):
    case = make_case(Nq=45, Nk=Nk, d=d, dtype=matrix_dtype(d, Nk), names=ALL, seed=d + Nk)
    check_backend("cuda", case, library=emulated)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ref", ["tail", "index", "all"])
def test_emulated_strided_ref_keys_record_subset(emulated, dtype, ref):
    case = make_case(B=3, H=3, Nq=6 * 5, Nk=1 + 4 * 3, d=80, dv=40, dtype=dtype, ref=ref, record=[2, 0],
                     strided=True, names=ALL)
    check_backend("cuda", case, library=emulated)


@pytest.mark.slow
@pytest.mark.parametrize("sms", [1, 3])
def test_emulated_slots_probe_chunks_and_accumulation(emulated, monkeypatch, sms):
    """Nq = 200: four query blocks over 2 or 4 slots; 17 key and 18 query probes: two probe chunks."""
    monkeypatch.setenv("I2AM_EMULATED_SMS", str(sms))
    case = make_case(B=2, H=1, Nq=200, Nk=77, d=40, dtype=torch.float16, record=[1], Ru=17, Rw=18, names=ALL,
                     seed=5)
    check_backend("cuda", case, calls=2, library=emulated)


def test_emulated_repeated_ref_keys_and_single_maps(emulated):
    case = make_case(Nq=20, Nk=9, d=40, dtype=torch.float16, names=("gen_key",))
    case = dataclasses.replace(case, ref_idx=torch.tensor([3, 1, 3, 8, 3, 0]), key_probes=torch.rand(2, 6))
    check_backend("cuda", case, library=emulated)
    check_backend("cuda", dataclasses.replace(case, names=("ref_query",)), library=emulated)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_emulated_transposed_and_misaligned_inputs(emulated, dtype):
    """Column strides != 1 and rows off 16-byte alignment take the element-wise tile loads."""
    case = make_case(B=2, H=2, Nq=37, Nk=21, d=40, dtype=dtype, names=ALL)
    q = case.q.transpose(-1, -2).contiguous().transpose(-1, -2)  # (B,H,Nq,d) with unit stride along Nq
    k = torch.cat([case.k, case.k[..., :1]], -1)[..., 1:]  # rows of d + 1 elements, one element in
    k.copy_(case.k)
    check_backend("cuda", dataclasses.replace(case, q=q, k=k), library=emulated)


def test_emulated_float64_computes_in_float32(emulated):
    case = make_case(Nq=20, Nk=9, d=40, dtype=torch.float64, names=ALL)
    out, maps = _run(emulated, case)
    want_out, want = expected(case)
    torch.testing.assert_close(out.float(), want_out, rtol=2e-4, atol=2e-5)
    for n in ALL:
        torch.testing.assert_close(maps[n], want[n], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_emulated_c_from_p_or_by_its_own_exponential(emulated, monkeypatch, dtype):
    """By default C is P times the rank-one factors; a range of -1 (I2AM_C_FROM_P_RANGE=-1) takes
    every head's C by its own exponential, and every row's and column's log-sum-exp from the
    exact pass. Both match the reference, and closely each other."""
    case = make_case(Nq=45, Nk=77, d=40, dtype=dtype, names=ALL, seed=3)
    check_backend("cuda", case, library=emulated)
    shared = _run(emulated, case)
    monkeypatch.setattr(torch_backend, "C_FROM_P_RANGE", -1.0)
    check_backend("cuda", case, library=emulated)
    direct = _run(emulated, case)
    assert not torch.equal(shared[1]["gen_query"], direct[1]["gen_query"])  # the two paths did run
    for n in ("gen_query", "ref_query"):
        assert_map_close(shared[1][n], direct[1][n], dtype, n)


def test_emulated_extreme_scores_take_the_direct_exponential(emulated):
    """Queries 0-15 score up to ~100 nats: the head's c lies far past the range above its smallest
    lse_col, so C is computed directly (from P it would lose whole columns)."""
    case = make_case(Nq=45, Nk=77, d=40, names=ALL)
    case.q[:, :, :16] *= 20
    check_backend("cuda", case, library=emulated)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_emulated_rows_far_below_their_warp_take_the_exact_pass(emulated, dtype):
    """Odd queries score up to ~100 nats: at the shift their warp shares, the even rows' sums
    vanish below float's range; those rows are redone with their own shift."""
    case = make_case(Nq=45, Nk=77, d=40, dtype=dtype, names=ALL, seed=7)
    case.q[:, :, 1::2] *= 20
    check_backend("cuda", case, library=emulated)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_emulated_columns_far_below_every_row_take_the_exact_pass(emulated, dtype):
    """Key 5 scores ~170 log2 units below the others for every query: its column sum vanishes at
    every shared shift, so its lse_col comes from the exact pass (C of key 5 is a full softmax)."""
    case = make_case(Nq=45, Nk=77, d=40, dtype=dtype, names=ALL, seed=8)
    case.q[..., 0] = 16
    case.k[..., 0] = 24
    case.k[..., 5, 0] = -24
    check_backend("cuda", case, library=emulated)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_emulated_key_tiles_prefetched_without_column_barrier(emulated, dtype):
    """Without C maps the stats pass's key loop has one barrier a key block: the next key tile's
    cp.async must start only after every warp has read the tile it overwrites (5 key blocks)."""
    case = make_case(Nq=45, Nk=257, d=40, dtype=dtype, names=("gen_key", "ref_key"), seed=9)
    check_backend("cuda", case, library=emulated)


def test_emulated_bits_do_not_depend_on_thread_interleaving(emulated, monkeypatch):
    case = make_case(Nq=45, Nk=77, d=40, dtype=torch.bfloat16, names=ALL)
    runs = []
    for seed in (1, 2):
        monkeypatch.setenv("I2AM_EMULATION_SEED", str(seed))
        runs.append(_run(emulated, case))
    assert torch.equal(runs[0][0], runs[1][0])
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in ALL)


# ---- the kernels on a GPU ----------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("d", [40, 80, 160])
@pytest.mark.parametrize("Nk", [1, 7, 77, 257])
def test_gpu_matches_reference(gpu_library, d, Nk):
    case = make_case(Nq=45, Nk=Nk, d=d, dtype=matrix_dtype(d, Nk), names=ALL, seed=d + Nk, device="cuda")
    check_backend("cuda", case, library=gpu_library)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ref", ["tail", "index", "all"])
def test_gpu_strided_ref_keys_record_subset(gpu_library, dtype, ref):
    case = make_case(B=3, H=3, Nq=6 * 5, Nk=1 + 4 * 3, d=80, dv=40, dtype=dtype, ref=ref, record=[2, 0],
                     strided=True, names=ALL, device="cuda")
    check_backend("cuda", case, library=gpu_library)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", [64, 128, 256])
def test_gpu_larger_shapes_accumulate(gpu_library, dtype, d):
    case = make_case(B=2, H=3, Nq=1000, Nk=257, d=d, dtype=dtype, record=[1], Ru=20, Rw=18, names=ALL,
                     device="cuda", strided=True)
    check_backend("cuda", case, calls=2, library=gpu_library)


@pytest.mark.gpu
def test_gpu_deterministic(gpu_library):
    case = make_case(B=2, H=8, Nq=4096, Nk=257, d=64, dtype=torch.float16, names=ALL, device="cuda")
    (out1, maps1), (out2, maps2) = _run(gpu_library, case), _run(gpu_library, case)
    assert torch.equal(out1, out2)
    assert all(torch.equal(maps1[n], maps2[n]) for n in ALL)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_agrees_with_triton(gpu_library, monkeypatch, dtype):
    pytest.importorskip("triton")
    monkeypatch.setenv(cuda_backend.LIB_ENV, gpu_library._name)  # the public API loads this build
    case = make_case(B=2, H=4, Nq=777, Nk=257, d=64, dtype=dtype, ref="tail", names=ALL, device="cuda")
    kw = dict(scale=case.scale, ref_keys=case.ref_idx, record=[1], key_probes=case.key_probes,
              query_probes=case.query_probes, gen=("query", "key"), ref=("key", "query"))
    out_c, maps_c = attention_with_maps(case.q, case.k, case.v, backend="cuda", **kw)
    out_t, maps_t = attention_with_maps(case.q, case.k, case.v, backend="triton", **kw)
    torch.testing.assert_close(out_c, out_t, rtol=2e-2, atol=2e-2)
    for n in ALL:
        torch.testing.assert_close(maps_c[n], maps_t[n], rtol=3e-2, atol=3e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("kind,dtype", [("text, gen, ref", torch.float16), ("ref, gen", torch.float32),
                                        ("text, ref, gen, text", torch.bfloat16)])
def test_emulated_query_rows_through_the_op(emulated, monkeypatch, kind, dtype):
    """query_rows (SPEC 3c) in the op's wrapper: the kernel sees the row views of diffusers-layout
    q and out (offset, often off 16-byte alignment) and writes only those rows."""
    import functools

    from test_query_rows import check, joint_case, poison

    poison(monkeypatch)
    monkeypatch.setattr(cuda_backend, "run", functools.partial(cuda_backend.run, library=emulated))
    tol = {torch.float32: (1e-4, 1e-5), torch.float16: (2e-2, 2e-3), torch.bfloat16: (5e-2, 2e-2)}[dtype]
    check(joint_case(kind, d=40, dtype=dtype, seed=4), "cuda", record=[1], tol=tol)
