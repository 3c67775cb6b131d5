"""Compile the Triton kernels for an H100 (sm_90a) without a GPU and measure the cubin Triton built.

    python bench/triton_sass.py [d ...]        (default d: 40 64 80 128)

For the benchmark's default maps (gen query uniform; ref key: uniform, mask, 4 points) on an
fp16 call in the diffusers layout, each autotune config of the stats and main kernels is
compiled the way a launch specialises it (integer arguments equal to 1 become constants,
pointers and multiples of 16 get the divisibility hint), beside a plain one-pass
FlashAttention-2 forward (bench/flash_attention.py) with the same tiles. Everything is read
from the cubin Triton produced (cuobjdump), not from a ptxas rerun without Triton's flags:
registers, local memory (spills), shared memory, CTAs per SM, and for one key tile the SASS
instructions, exponentials (MUFU.EX2), MMA instructions and barriers, plus the global loads
by width (16 bits: scalar fp16, 128: vectorised). "Per key tile" is the fewest instructions
from the head of the key-tile loop to its backward branch that pass every MMA: the usual path,
without the fallbacks for extreme scores (in brackets: the whole loop body, both included).
Instructions are per thread, so compare kernels at one tile and warp count; configs the
launcher prunes for a kernel (they spill) are listed as such. A static view,
no timing; tests/test_triton_compile.py compiles through the same helpers.
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

from i2am.kernels import triton_backend

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


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


SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][\w.]*)([^;]*);")
SM90 = dict(regs_per_partition=16384, partitions=4, warps=64, ctas=32, shared=233472, shared_reserved=1024)


def sass(cubin):
    """[(address, predicated, opcode, operands)] of the one kernel in a cubin, NOPs left out."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([os.path.join(BIN, "cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout
        usage = subprocess.run([os.path.join(BIN, "cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
    code = [(int(a, 16), bool(p), op, args.strip()) for a, p, op, args in SASS_LINE.findall(text) if op != "NOP"]
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage))
    return code, {k: int(v) for k, v in fields.items()}


def _is_mma(op):
    return "MMA" in op


def _target(op, args):
    if op.startswith("BRA"):
        m = re.search(r"0x([0-9a-f]+)", args)
        return int(m.group(1), 16) if m else None
    return None


def key_tile_loop(code):
    """(first, last) indices of the key-tile loop. Loops are a backward branch and its target;
    of those holding MMA instructions, the innermost (an inner loop over probe blocks, with a
    minority of the products, does not count; the loop over query blocks holds the key loop),
    then the most MMAs, then the fewest instructions per tile: of two copies of the key loop
    (main_kernel's usual and rare one), the usual one."""
    index = {a: i for i, (a, *_) in enumerate(code)}
    loops = [(index[t], i) for i, (a, _, op, args) in enumerate(code)
             if (t := _target(op, args)) is not None and t < a and t in index]
    mma = {lh: sum(_is_mma(code[j][2]) for j in range(lh[0], lh[1] + 1)) for lh in loops}
    inner = [lh for lh in loops if mma[lh] and not any(
        o != lh and lh[0] <= o[0] and o[1] <= lh[1] and 2 * mma[o] >= mma[lh] for o in loops)]
    if not inner:
        raise ValueError("no loop with MMA instructions in the SASS")
    return max(inner, key=lambda lh: (mma[lh], -len(tile_path(code, *lh))))


def tile_path(code, lo, hi):
    """Indices of the fewest instructions a key tile runs: from the loop head to its backward
    branch, every MMA instruction included, forward branches taken or not. That skips the
    fallbacks for extreme scores (two exponentials) but no product, and it passes inner loops
    once (one probe block: Rw <= BLOCK_R)."""
    index = {code[j][0]: j for j in range(lo, hi + 1)}
    must = [j for j in range(lo, hi + 1) if _is_mma(code[j][2])]
    dist, prev = {lo: 1}, {}
    for j in range(lo, hi):
        if j not in dist:
            continue
        _, pred, op, args = code[j]
        t = _target(op, args)
        nxt = []
        if not (op.startswith("BRA") and not pred) and not op.startswith("EXIT"):
            nxt.append(j + 1)
        if t is not None and t > code[j][0] and t in index:
            nxt.append(index[t])
        for n in nxt:
            if any(j < m < n for m in must) or n > hi:  # never jump over a product
                continue
            if dist[j] + 1 < dist.get(n, 1 << 30):
                dist[n], prev[n] = dist[j] + 1, j
    path, j = [hi], hi
    while j != lo:
        j = prev[j]
        path.append(j)
    return path[::-1]


def ctas_per_sm(regs, shared, num_warps):
    """Resident CTAs on an H100 SM: registers are allocated per warp in 256s within four
    partitions of 16384, shared memory per CTA plus 1 KiB reserved."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM90["partitions"] * (SM90["regs_per_partition"] // per_warp) // num_warps
    by_shared = SM90["shared"] // (shared + SM90["shared_reserved"])
    return min(by_regs, by_shared, SM90["warps"] // num_warps, SM90["ctas"])


def _width(op):
    """Bits a global load moves per thread: LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32."""
    m = re.search(r"\.(U|S)?(8|16|64|128)\b", op)
    return int(m.group(2)) if m else 32


def resources(compiled):
    """What the cubin Triton built says about a kernel: registers, local memory (spills: bytes
    and LDL/STL instructions), shared bytes, CTAs per SM, and for one key tile (tile_path)
    instructions, MUFU.EX2, MMA and barrier instructions, and the global loads by width."""
    code, usage = sass(compiled.asm["cubin"])
    lo, hi = key_tile_loop(code)
    path = [code[j][2] for j in tile_path(code, lo, hi)]
    loads = collections.Counter(_width(op) for _, _, op, _ in code if op.startswith(("LDG.", "LDGSTS")))
    smem = compiled.metadata.shared
    return dict(regs=usage["REG"], local=usage.get("LOCAL", 0) + usage.get("STACK", 0),
                spill_ops=sum(op.startswith(("LDL", "STL")) for _, _, op, _ in code), shared=smem,
                ctas=ctas_per_sm(usage["REG"], smem, compiled.metadata.num_warps),
                tile=len(path), tile_static=hi - lo + 1, ex2=sum(op == "MUFU.EX2" for op in path),
                mma=sum(_is_mma(op) for op in path), barriers=sum(op.startswith("BAR") for op in path),
                loads=dict(sorted(loads.items())))


def call_args(d, dtype="fp16", maps=("gen_query", "ref_key"), H=8, Nq=4096, Nk=1025, Ru=1, Rw=6):
    """(arguments, tile constants, map constants) of the stats and main kernels for one recorded
    entry of a (2, Nq, H*d) call in `dtype`; the benchmark's default maps."""
    q = (Nq * H * d, d, H * d, 1)  # (B, H, N, d) strides of a (B, N, H*d) tensor
    k = (Nk * H * d, d, H * d, 1)
    gen = (H * Ru * Nq, Ru * Nq, Nq, 1)
    args = dict(Q="*" + dtype, K="*" + dtype, V="*" + dtype, OUT="*" + dtype, REC="*i64",
                qk_scale=d ** -0.5 * math.log2(math.e), H=H, Nq=Nq, Nk=Nk, nq_bucket=triton.next_power_of_2(Nq),
                Ru=Ru, Rw=Rw, su_k=Ru)
    args.update({n: "*fp32" for n in ("LSE_ROW", "COL_MAX", "COL_SUM", "LSE_COL", "C_SHIFT", "B", "U", "UB", "GK", "GQ",
                                      "RK", "RQ")})
    nk_pad = triton_backend._padded_keys(Nk)  # the main pass's own buffers, as the launcher pads them
    args.update(FROM_P="*i32", nk_pad=nk_pad, sub_h=nk_pad * triton_backend._probe_width(Ru))
    args["M"] = "*fp32" if dtype == "fp32" else "*fp16"  # query probes: fp16 rows in [-1, 1] for fp16/bf16 calls
    for prefix, strides in (("sq", q), ("sk", k), ("sv", k), ("so", q)):
        args.update(zip((prefix + s for s in ("_b", "_h", "_n", "_d")), strides))
    for prefix in ("sgk", "sgq"):
        args.update(zip((prefix + s for s in ("_i", "_h", "_r", "_n")), gen))
    precision = "ieee" if dtype == "fp32" else "tf32"
    flags = {name.upper(): name in maps for name in ("gen_key", "gen_query", "ref_key", "ref_query")}
    block_r = triton_backend._pow2(min(Rw, triton_backend.MAX_PROBES))  # as the launcher
    align = math.gcd(16 // (4 if dtype == "fp32" else 2), *q[:3], *k[:3])  # as triton_backend._alignment
    block_d, block_d2 = triton_backend.head_tiles(d)  # the head dim's tiles, as the launcher
    return (args, dict(D=d, ALIGN=align, BLOCK_D=block_d, BLOCK_D2=block_d2, DOT_PRECISION=precision),
            dict(flags, DV=d, BLOCK_U=triton_backend._pow2(min(Ru, triton_backend.MAX_PROBES)), BLOCK_R=block_r,
                 ROWSUM=Ru == 1, ONE_R=Rw <= block_r, BLOCK_DV=block_d, BLOCK_DV2=block_d2,
                 MAP_PRECISION=precision))


def fa2_args(d, dtype="fp16", H=8, Nq=4096, Nk=1025):
    """(arguments, constants) of the FlashAttention-2 yardstick on the tensors of call_args."""
    args, tiles, _ = call_args(d, dtype, (), H, Nq, Nk)
    fa2 = dict(Q=args["Q"], K=args["K"], V=args["V"], OUT=args["OUT"], H=H, Nq=Nq, Nk=Nk, qk_scale=args["qk_scale"])
    for x in "qkvo":
        fa2.update({f"s{x}_{s}": args[f"s{x}_{s}"] for s in "bhn"})
    return fa2, dict(D=d, BLOCK_D=max(16, triton.next_power_of_2(d)), ALIGN=tiles["ALIGN"])  # one padded tile


def measure(d, cfg):
    """{kernel: resources, or None where the launcher prunes the config} for one head dim and
    one autotune config: the stats pass with column statistics, the main pass with the default
    maps, and the FlashAttention-2 forward."""
    from i2am.kernels import triton_kernels as tk
    from flash_attention import flash_attention_forward
    args, shared, maps = call_args(d)
    tiles = dict(BLOCK_M=cfg.kwargs["BLOCK_M"], BLOCK_N=cfg.kwargs["BLOCK_N"])
    fa2, fa2_consts = fa2_args(d)
    kernels = (("stats", tk.stats_kernel, args, dict(shared, NEED_COL=True, **tiles)),
               ("main", tk.main_kernel, args, dict(shared, **maps, **tiles)),
               ("FA2", flash_attention_forward, fa2, dict(fa2_consts, **tiles)))
    return {name: resources(compile_sm90(fn, a, c, cfg.num_warps, cfg.num_stages))
            if name == "FA2" or cfg in tk._prune(tk.CONFIGS, {**a, **c}) else None for name, fn, a, c in kernels}


def main(dims):
    from i2am.kernels import triton_kernels as tk
    print("| d | BLOCK_M x BLOCK_N, warps | kernel | registers | local bytes (LDL/STL) | shared KiB | CTAs/SM "
          "| instr. per key tile (static) | MUFU.EX2 | MMA | barriers | global loads by bits |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    summary = []
    for d in dims:
        for cfg in tk.CONFIGS:
            tile = f"{cfg.kwargs['BLOCK_M']}x{cfg.kwargs['BLOCK_N']}, {cfg.num_warps}"
            res = measure(d, cfg)
            for name, r in res.items():
                if r is None:
                    print(f"| {d} | {tile} | {name} | pruned by the launcher (spills) | | | | | | | | |")
                    continue
                loads = " ".join(f"{n}x{w}" for w, n in r["loads"].items())
                print(f"| {d} | {tile} | {name} | {r['regs']} | {r['local']} ({r['spill_ops']}) | "
                      f"{r['shared'] / 1024:.0f} | {r['ctas']} | {r['tile']} ({r['tile_static']}) | {r['ex2']} | "
                      f"{r['mma']} | {r['barriers']} | {loads} |", flush=True)
            if res["stats"] and res["main"]:
                summary.append((d, tile, res["stats"]["tile"] + res["main"]["tile"], res["FA2"]["tile"]))
    print("\n| d | BLOCK_M x BLOCK_N, warps | recorded call (stats + main) | FA2 | ratio |")
    print("|---|---|---:|---:|---:|")
    for d, tile, call, fa2 in summary:
        print(f"| {d} | {tile} | {call} | {fa2} | {call / fa2:.2f} |")


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # flash_attention.py
    main([int(a) for a in sys.argv[1:]] or [40, 64, 80, 128])
