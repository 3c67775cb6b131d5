"""The Triton kernels compile for an H100 (sm_90) without a GPU, with Triton's bundled ptxas.

The interpreter accepts programs a GPU compile rejects (tl.dot shapes and dtypes, layouts,
shared memory); this compiles a few variants ahead of time in a fresh process (the kernels
are plain JIT functions only when TRITON_INTERPRET is unset at import), specialised as a launch
would by bench/triton_sass.py.
"""
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
SCRIPT = textwrap.dedent("""
    import triton_sass as ts
    from i2am.kernels import triton_kernels as tk

    ALL = ("gen_key", "gen_query", "ref_key", "ref_query")
    for dtype, d, (bm, bn, w) in [("fp16", 64, (128, 64, 8)), ("bf16", 256, (64, 32, 4)), ("fp32", 128, (64, 32, 4))]:
        args, tiles, maps = ts.call_args(d, dtype, ALL)
        tiles.update(BLOCK_M=bm, BLOCK_N=bn)
        for fn, consts in ((tk.stats_kernel, dict(tiles, NEED_COL=True)), (tk.main_kernel, dict(tiles, **maps))):
            shared = ts.compile_sm90(fn, args, consts, w).metadata.shared
            assert shared <= 227 * 1024, (fn.fn.__name__, dtype, d, shared)
    args, tiles, _ = ts.call_args(40)
    exact = dict(A=args["Q"], B=args["K"], REC=args["REC"], LSE="*fp32", H=args["H"], Na=args["Nq"], Nb=args["Nk"],
                 qk_scale=args["qk_scale"])
    exact.update({"sa" + s: args["sq" + s] for s in ("_b", "_h", "_n", "_d")})
    exact.update({"sb" + s: args["sk" + s] for s in ("_b", "_h", "_n", "_d")})
    ts.compile_sm90(tk.exact_lse_kernel, exact, dict(tiles, BLOCK_M=64, BLOCK_N=64), 4)
    ts.compile_sm90(tk.col_lse_kernel, dict(COL_MAX="*fp32", COL_SUM="*fp32", LSE_COL="*fp32", Nk=1025,
                                            n_splits=3, TILE_N=32), dict(BLOCK=128), 4)
    ts.compile_sm90(tk.ref_reduce_kernel, dict(PART="*fp32", REF_IDX="*i64", M_SCALE="*fp32", BUF="*fp32", sb_i=8 * 6 * 1024,
                                               sb_h=6 * 1024, sb_r=1024, sb_k=1, H=8, Rw=6, Kr=1024, nk_pad=1088,
                                               n_splits=3), dict(BLOCK=128), 4)
    # more than one key probe (an MMA, not row sums) and more query probes than one block holds
    args, tiles, maps = ts.call_args(80, "fp16", ALL, Ru=2, Rw=70)
    assert not maps["ROWSUM"] and not maps["ONE_R"]
    ts.compile_sm90(tk.main_kernel, args, dict(tiles, **maps, BLOCK_M=64, BLOCK_N=32), 4)
    print("compiled")
""")


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    nvidia = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(nvidia):
        pytest.skip("triton without its NVIDIA backend (bundled ptxas)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([BENCH, env.get("PYTHONPATH", "")])
    res = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-4000:]
