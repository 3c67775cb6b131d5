"""Compile the Triton kernels for an H100 (sm_90a) without a GPU and report their resources.

    python bench/triton_sass.py [d ...]        (default d: 40 64 80 128)

For the SPEC section 6 default maps (gen query uniform; ref key: uniform, mask, 4 points) on an
fp16 call in the diffusers layout, each autotune config of the stats and main kernels is
compiled the way a launch would specialise it (integer arguments equal to 1 become constants,
pointers and multiples of 16 get the divisibility hint), then reported: registers and spill
bytes from ptxas, shared memory, and the SASS instructions that bound a tile (MUFU.EX2 for the
exponentials, HGMMA/HMMA for the tensor cores, LDL/STL for spills). A static view, no timing:
it tells which configs spill and how many exponentials a tile costs. tests/test_triton_compile.py
compiles through the same helper.
"""
import collections
import math
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
SASS_OPS = re.compile(r"\b(MUFU\.EX2|HGMMA\.[\w.]+|HMMA\.[\w.]+|LDL[\w.]*|STL[\w.]*)")


def compile_sm90(kernel, args, consts, num_warps, num_stages=2):
    """Compile `kernel` for sm_90a. args: name -> a pointer type ("*fp16"), a float, or an int
    (its value: 1 becomes a constant, a multiple of 16 gets the divisibility hint, as a launch
    specialises); consts: the constexpr arguments."""
    kernel = kernel.fn if hasattr(kernel, "configs") else kernel  # an autotuned kernel wraps the JIT function
    sig, attrs, constants = {}, {}, dict(consts)
    for i, name in enumerate(kernel.arg_names):
        value = args.get(name)
        if name in consts:
            sig[name] = "constexpr"
        elif isinstance(value, str):
            sig[name] = value
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        elif value == 1:
            sig[name] = "constexpr"
            constants[name] = 1
        else:
            sig[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, sig, constants, attrs), target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


def resources(compiled):
    """Registers, spill bytes (stores, loads), shared bytes and SASS op counts of a compiled kernel."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        ptxas = next(p for p in ("ptxas-blackwell", "ptxas") if os.path.exists(os.path.join(BIN, p)))
        log = subprocess.run([os.path.join(BIN, ptxas), "-v", "-arch=sm_90a", ptx, "-o", os.devnull],
                             capture_output=True, text=True).stderr
        sass = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = tuple(int(n) for n in re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return regs, spills, compiled.metadata.shared, collections.Counter(SASS_OPS.findall(sass))


def call_args(d, dtype="fp16", maps=("gen_query", "ref_key"), H=8, Nq=4096, Nk=1025, Ru=1, Rw=6):
    """(arguments, tile constants, map constants) of the stats and main kernels for one recorded
    entry of a (2, Nq, H*d) call in `dtype`; the default maps are SPEC section 6's."""
    q = (Nq * H * d, d, H * d, 1)  # (B, H, N, d) strides of a (B, N, H*d) tensor
    k = (Nk * H * d, d, H * d, 1)
    gen = (H * Ru * Nq, Ru * Nq, Nq, 1)
    args = dict(Q="*" + dtype, K="*" + dtype, V="*" + dtype, OUT="*" + dtype, REC="*i64",
                qk_scale=d ** -0.5 * math.log2(math.e), H=H, Nq=Nq, Nk=Nk, D=d, DV=d, Ru=Ru, Rw=Rw, su_k=Ru)
    args.update({n: "*fp32" for n in ("LSE_ROW", "COL_MAX", "COL_SUM", "LSE_COL", "U", "GK", "GQ", "RK", "RQ")})
    args["M"] = "*fp32" if dtype == "fp32" else "*fp16"  # query probes: fp16 rows in [-1, 1] for fp16/bf16 calls
    for prefix, strides in (("sq", q), ("sk", k), ("sv", k), ("so", q)):
        args.update(zip((prefix + s for s in ("_b", "_h", "_n", "_d")), strides))
    for prefix in ("sgk", "sgq"):
        args.update(zip((prefix + s for s in ("_i", "_h", "_r", "_n")), gen))
    block, precision = max(16, triton.next_power_of_2(d)), "ieee" if dtype == "fp32" else "tf32"
    flags = {name.upper(): name in maps for name in ("gen_key", "gen_query", "ref_key", "ref_query")}
    return (args, dict(BLOCK_D=block, DOT_PRECISION=precision),
            dict(flags, BLOCK_U=16, BLOCK_R=16, BLOCK_DV=block, MAP_PRECISION=precision))


def main(dims):
    from i2am.kernels import triton_kernels as tk
    print("| d | BLOCK_M x BLOCK_N, warps | kernel | registers | spill bytes | shared KiB | MUFU.EX2 | MMA |")
    print("|---|---|---|---|---|---|---|---|")
    for d in dims:
        args, shared, maps = call_args(d)
        for cfg in tk.CONFIGS:
            tiles = dict(shared, BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"])
            for name, fn, consts in (("stats", tk.stats_kernel, dict(tiles, NEED_COL=True)),
                                     ("main", tk.main_kernel, dict(tiles, **maps))):
                regs, spills, smem, ops = resources(compile_sm90(fn, args, consts, cfg.num_warps, cfg.num_stages))
                mma = sum(n for op, n in ops.items() if "MMA" in op)
                print(f"| {d} | {tiles['BLOCK_M']}x{tiles['BLOCK_N']}, {cfg.num_warps} | {name} | {regs} | "
                      f"{spills[0]}/{spills[1]} | {smem / 1024:.0f} | {ops['MUFU.EX2']} | {mma} |", flush=True)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    main([int(a) for a in sys.argv[1:]] or [40, 64, 80, 128])
