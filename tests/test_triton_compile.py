"""The Triton kernels compile for an H100 (sm_90) without a GPU, with Triton's bundled ptxas.

The interpreter accepts programs a GPU compile rejects (tl.dot shapes and dtypes, layouts,
shared memory); this compiles a few variants ahead of time in a fresh process (the kernels
are plain JIT functions only when TRITON_INTERPRET is unset at import).
"""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from i2am.kernels import triton_kernels as tk

    POINTERS = {"REC": "*i64", "REF_IDX": "*i64"}
    FLOATS = {"qk_scale"}

    def compile_kernel(fn, dtype, consts, num_warps):
        kernel = fn.fn if hasattr(fn, "configs") else fn  # an autotuned kernel wraps the JIT function
        sig = {}
        for name in kernel.arg_names:
            if name in consts:
                sig[name] = "constexpr"
            elif name in ("Q", "K", "V", "OUT"):
                sig[name] = dtype
            elif name in POINTERS:
                sig[name] = POINTERS[name]
            elif name.isupper() and name not in ("H", "D", "DV"):  # float32 buffers; those three are sizes
                sig[name] = "*fp32"
            else:
                sig[name] = "fp32" if name in FLOATS else "i32"
        src = ASTSource(kernel, sig, constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": num_warps, "num_stages": 2})
        assert compiled.metadata.shared <= 227 * 1024, (kernel.__name__, compiled.metadata.shared)

    maps = dict(GEN_KEY=True, GEN_QUERY=True, REF_KEY=True, REF_QUERY=True, BLOCK_U=16, BLOCK_R=16)
    for dtype, d, prec, (bm, bn, w) in [("*fp16", 64, "tf32", (128, 64, 8)), ("*bf16", 256, "tf32", (64, 32, 4)),
                                        ("*fp32", 128, "ieee", (64, 32, 4))]:
        tiles = dict(BLOCK_D=d, DOT_PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn)
        compile_kernel(tk.stats_kernel, dtype, dict(tiles, NEED_COL=True), w)
        compile_kernel(tk.main_kernel, dtype, dict(tiles, **maps, BLOCK_DV=d, MAP_PRECISION=prec), w)
    compile_kernel(tk.col_lse_kernel, None, dict(BLOCK=128), 4)
    compile_kernel(tk.ref_reduce_kernel, None, dict(BLOCK=128), 4)
    print("compiled")
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    nvidia = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(nvidia):
        pytest.skip("triton without its NVIDIA backend (bundled ptxas)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
