"""SDPA, attention_with_maps(backend="torch") and the three-call composition at the CPU bench's
UNet shapes, side by side in one process on the same inputs, interleaved, min of reps: wall
time and process CPU time (which a loaded machine disturbs less).

    PYTHONPATH=. taskset -c 1 python bench/composition_small.py --threads 1
    PYTHONPATH=. python bench/composition_small.py --threads 2
"""
import argparse
import os
import time

import torch

from i2am import benchmark as bm

NAMES = ("sdpa", "i2am-torch maps", "composition")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cols = bm.columns("cpu")
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    for label, nq, nk, d, h in bm.CPU_SHAPES:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(2, h, n, d, generator=g) for n in (nq, nk, nk))
        ref_idx = torch.arange(1, nk)
        kp, qp = bm.default_probes(nq, nk - 1, "cpu")
        call = (q, k, v, d ** -0.5, ref_idx, [1], kp, qp)
        bm.check_composition(*call)
        wall, cpu = ({n: [] for n in NAMES} for _ in range(2))
        for rep in range(args.reps + 1):  # the first round warms up
            for n in NAMES[rep % 3:] + NAMES[:rep % 3]:
                t0, c0 = time.perf_counter(), time.process_time()
                cols[n](*call)
                if rep:
                    wall[n].append(1e3 * (time.perf_counter() - t0))
                    cpu[n].append(1e3 * (time.process_time() - c0))
        for what, t in (("wall", wall), ("cpu", cpu)):
            lo = {n: min(x) for n, x in t.items()}
            print(f"{label:16s} {what:4s} ms " + "  ".join(f"{n} {lo[n]:.2f}" for n in NAMES)
                  + f"  torch/composition {lo['i2am-torch maps'] / lo['composition']:.2f}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
