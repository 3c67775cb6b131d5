"""Peak extra memory of one Kontext-sized joint attention call on CPU.

    python bench/kontext_memory.py [--heads 24] [--naive-heads 2] [--references 1]

A 1024 x 1024 FLUX.1 Kontext layer: 512 text + 4096 generated + 4096 reference tokens, every one
a query and a key (Nq = Nk = 8704), 24 heads of 128, fp32, batch 1 (guidance-distilled: every
entry recorded). The maps are the recorder's defaults on the generated rows (query_rows) and the
reference keys: gen query uniform + ref key uniform, inpainting mask and 4 points. Each column
runs in a fresh process and reports the growth of its peak resident set over the inputs
(output included): SDPA alone, attention_with_maps on the torch backend, and the naive path
(materialise the generated rows' fp32 scores, both softmaxes). The naive path is measured at
--naive-heads heads and scaled to --heads: its tensors are per head, and at 24 heads it would
not fit this machine (one (24, 4096, 8704) fp32 tensor is 3.2 GiB).

--references 2 measures a Qwen-Image-Edit-Plus-sized layer: two 1024 x 1024 references, 512
text + 4096 generated + 2 x 4096 reference tokens (N = 12800); the maps' reference keys are the
union of both references' tokens.
"""
import argparse
import json
import subprocess
import sys
import textwrap

TEXT, GEN, REF, D = 512, 4096, 4096, 128

CHILD = textwrap.dedent("""
    import json, resource, sys, time, torch
    import torch.nn.functional as F
    from i2am.benchmark import default_probes, naive
    from i2am.kernels import attention_with_maps
    column, H, REF = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    TEXT, GEN, D = {text}, {gen}, {d}
    N = TEXT + GEN + REF
    rows, refs = slice(TEXT, TEXT + GEN), slice(TEXT + GEN, N)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D) for _ in range(3))
    kp, qp = default_probes(GEN, REF, "cpu")
    def call():
        if column == "sdpa":
            return F.scaled_dot_product_attention(q, k, v)
        if column == "naive":  # the rows' scores materialised; SDPA for the other rows
            out = F.scaled_dot_product_attention(q, k, v)
            return out, naive(q[:, :, rows], k, v, D ** -0.5, torch.arange(TEXT + GEN, N), [0], kp, qp)
        return attention_with_maps(q, k, v, query_rows=rows, ref_keys=refs, key_probes=kp, query_probes=qp,
                                   backend="torch")
    small = q[:, :, :8], k[:, :, :8], v[:, :, :8]  # warm-up: import-time allocations out of the figure
    attention_with_maps(*small, backend="torch"); F.scaled_dot_product_attention(*small)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - start
    extra = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({{"column": column, "heads": H, "extra_bytes": extra, "seconds": seconds}}))
""").format(text=TEXT, gen=GEN, d=D)


def measure(column, heads, ref):
    done = subprocess.run([sys.executable, "-c", CHILD, column, str(heads), str(ref)], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.split("\n")[-2])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--naive-heads", type=int, default=2)
    parser.add_argument("--references", type=int, default=1, help="1024 x 1024 references (4096 tokens each)")
    args = parser.parse_args()
    ref = REF * args.references
    rows = [measure(c, h, ref) for c, h in (("sdpa", args.heads), ("i2am-torch", args.heads),
                                             ("naive", args.naive_heads))]
    out_bytes = args.heads * (TEXT + GEN + ref) * D * 4
    print(f"| column | heads measured | peak extra MiB (at {args.heads} heads) | s |")
    print("|---|---:|---:|---:|")
    for r in rows:
        scaled = r["extra_bytes"] * args.heads / r["heads"]
        print(f"| {r['column']} | {r['heads']} | {scaled / 2**20:.0f} | {r['seconds']:.1f} |")
    print(f"\noutput (1, {args.heads}, {TEXT + GEN + ref}, {D}) fp32: {out_bytes / 2**20:.0f} MiB; one "
          f"({args.heads}, {GEN}, {TEXT + GEN + ref}) fp32 score tensor: {args.heads * GEN * (TEXT + GEN + ref) * 4 / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
