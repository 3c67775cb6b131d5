"""Where the fused call spends its time on a GPU: each kernel of the Triton backend beside SDPA.

    python bench/triton_passes.py [--reps N]      (CUDA; scripts/gpu_check.sh runs it)

For a few of the benchmark's GPU shapes (fp16, B=2, second entry recorded, default maps) it profiles
`attention_with_maps(backend="triton")` and SDPA on the same q, k, v with torch.profiler and
prints one markdown table: device time per call of every kernel (stats, col_lse, main,
ref_reduce, the unrecorded entry's SDPA, small torch ops) against the whole SDPA call, and the
configs the autotuner chose. It answers "which pass" when a bound of issue #3 is missed.
With I2AM_C_FROM_P_RANGE=-1 every pass takes two exponentials (no C from P): run it both ways
to see what the one-exponential paths gain.
"""
import argparse

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from i2am.benchmark import default_probes
from i2am.kernels import attention_with_maps, triton_kernels
from i2am.kernels.torch_backend import C_FROM_P_RANGE

SHAPES = [(4096, 77, 40), (4096, 1025, 64), (16384, 257, 64), (16384, 1025, 128), (65536, 77, 40)]  # Nq, Nk, d
H = 8


def kernel_times(fn, reps, device):
    """{kernel name: device microseconds per call} over reps calls after a warm-up."""
    fn()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize(device)
    return {e.key: e.device_time_total / reps for e in prof.key_averages() if e.device_type == DeviceType.CUDA}


def short(name):
    """Triton kernels by their Python name, others cut to a readable length."""
    for k in ("stats_kernel", "exact_lse_kernel", "col_lse_kernel", "main_kernel", "ref_reduce_kernel"):
        if k in name:
            return k
    return name if len(name) <= 60 else name[:57] + "..."


def main(reps):
    if not torch.cuda.is_available():
        raise SystemExit("bench/triton_passes.py profiles CUDA kernels: it needs a GPU")
    device = torch.device("cuda")
    print(f"C from P while scores spread under {C_FROM_P_RANGE} (log2; -1: two exponentials everywhere)\n")
    print("| Nq, Nk, d | kernel | us per call | x SDPA call |")
    print("|---|---|---:|---:|")
    for nq, nk, d in SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, H, n, d, generator=g).to(device, torch.float16) for n in (nq, nk, nk))
        ref_idx = torch.arange(1, nk, device=device)
        kp, qp = default_probes(nq, nk - 1, device)
        sdpa = sum(kernel_times(lambda: F.scaled_dot_product_attention(q, k, v), reps, device).values())
        ours = kernel_times(lambda: attention_with_maps(q, k, v, ref_keys=ref_idx, record=[1], key_probes=kp,
                                                        query_probes=qp, backend="triton"), reps, device)
        label = f"{nq}, {nk}, {d}"
        print(f"| {label} | SDPA (both entries) | {sdpa:.1f} | 1.00 |")
        for name, us in sorted(ours.items(), key=lambda kv: -kv[1]):
            print(f"| {label} | {short(name)} | {us:.1f} | {us / sdpa:.2f} |")
        print(f"| {label} | **i2am total** | {sum(ours.values()):.1f} | {sum(ours.values()) / sdpa:.2f} |")
    print()
    for kernel in (triton_kernels.stats_kernel, triton_kernels.main_kernel):
        for key, config in kernel.cache.items():
            print(f"{kernel.fn.__name__} {key}: {config}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=10)
    main(parser.parse_args().reps)
