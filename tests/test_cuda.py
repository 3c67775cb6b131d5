"""The CUDA C++ backend (kernels/cuda, CMakeLists.txt, kernels/cuda_backend.py).

Without a GPU: CMake compiles the library with nvcc (warnings are errors), the loader and the C
ABI report errors clearly, and the very same kernel source, built as the host emulation
(-DI2AM_HOST_EMULATION=ON: threads as fibers, ldmatrix/mma emulated from the PTX tables), runs
on CPU tensors against the reference. The case matrix every backend passes is in test_backends.py
(there the emulation stands in for a GPU); here the emulation's and the kernels' own cases, and with
a GPU (marked gpu): larger shapes, determinism and agreement with the triton backend.
"""
import dataclasses

import pytest
import torch

from cases import assert_map_close, check_backend, expected, make_case
from i2am.kernels import attention_with_maps, cuda_backend, torch_backend

ALL = ("gen_query", "gen_key", "ref_key", "ref_query")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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
