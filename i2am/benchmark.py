"""Side-by-side benchmark of one cross-attention call (`i2am bench`).

Every column runs on the same q, k, v in the same process: torch SDPA (the baseline), i2am
with maps off, i2am with the default maps (gen query uniform; ref key uniform, masked and 4
points) for each available backend, once through attention_with_maps and once on the cached
path a recorder takes (a kept MapsCall adding into kept buffers), the naive path (materialise
fp32 probabilities, softmax over both axes, reduce) and a chunked capture in the style of
attention-map capture tools (1024 queries a chunk, fp32 probabilities over keys, reduced per
chunk) and the peer a capable user would write: the maps from three fused attention calls that
return the log-sum-exp (kernels.composition; checked against the float64 reference before it is
timed). Besides the UNet cross-attention shapes, DiT joint-attention shapes (FLUX.1 Kontext and
Qwen-Image-Edit-Plus token layouts, maps on the generated rows and the reference keys) take the
columns that stand for the analysis: SDPA, i2am with maps, the composition. The columns are
interleaved rep by rep (one call of each, in a rotating order), so that a disturbance of the
machine hits them alike; each reports min, median and spread, GPU calls timed with CUDA events.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .kernels import attention_with_maps, backend_module, prepare, triton_available
from .kernels.composition import three_call_maps
from .kernels.testing import call_maps

# (label, Nq, Nk, d, H): SD1.5- and SDXL-like cross-attention layers, 64x64 to 256x256 latents
GPU_SHAPES = [(f"{s}x{s} d{d} Nk{nk}", s * s, nk, d, h)
              for s in (32, 64, 128, 256) for nk in (77, 257, 1025) for d, h in ((40, 8), (64, 8), (80, 8), (128, 8))]
CPU_SHAPES = [("16x16 d40 Nk77", 256, 77, 40, 8), ("32x32 d40 Nk257", 1024, 257, 40, 8),
              ("64x64 d64 Nk77", 4096, 77, 64, 8), ("64x64 d64 Nk257", 4096, 257, 64, 8)]
QUICK_CPU_SHAPES = CPU_SHAPES[:2]
# (label, text, generated, (reference, ...), d, H): DiT joint attention, every token a query and a
# key, one entry (guidance-distilled); the maps on the generated rows and all reference keys
JOINT_SHAPES = [(f"{name} {t}+{g}+{'+'.join(map(str, refs))}", t, g, refs, 128, 24)
                for t, g in ((256, 1024), (512, 2048))
                for name, refs in (("Kontext", (g,)), ("Qwen-Edit-Plus", (g, g)))]
JOINT_COLUMNS = ("sdpa", "i2am-torch maps", "composition")
# a map against the float64 reference: rtol, and atol as a fraction of the map's largest value
MAP_TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-2, 1e-3), torch.bfloat16: (3e-2, 1e-2)}
CHECK_BYTES = 2**28  # the reference checks as many heads as keep one float64 score tensor within this


@dataclass
class Row:
    shape: str
    column: str
    nq: int
    nk: int
    d: int
    ms: float
    ratio: float  # median / SDPA's median
    tflops: float
    extra_mib: float
    min_ms: float = 0.0
    spread: float = 0.0  # (max - min) / median over the reps


def default_probes(nq, nref, device):
    """The benchmark's default maps: uniform and masked query probes plus 4 points."""
    g = torch.Generator().manual_seed(0)
    qp = torch.zeros(6, nq)
    qp[0] = 1 / nq
    qp[1, : nq // 2] = 2 / nq  # a mask over half the image
    qp[torch.arange(2, 6), torch.randint(nq, (4,), generator=g)] = 1
    return torch.full((1, nref), 1 / nref, device=device), qp.to(device)


def naive(q, k, v, scale, ref_idx, rec, kp, qp):
    """Materialise the (Br,H,Nq,Nk) scores in fp32 and softmax them over both axes."""
    s = scale * q[rec].float() @ k[rec].float().transpose(-1, -2)
    P, C = s.softmax(-1), s.softmax(-2)
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    P, C = P[..., ref_idx], C[..., ref_idx]
    return out, kp @ C.transpose(-1, -2), qp @ P


def chunked_capture(q, k, v, scale, ref_idx, rec, kp, qp, chunk=1024):
    """Capture-tool style: per chunk of queries, fp32 probabilities over keys, reduced at once."""
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    gen = torch.empty(len(rec), q.shape[1], kp.shape[0], q.shape[2], device=q.device)
    ref = 0
    for a in range(0, q.shape[2], chunk):
        p = (scale * q[:, :, a:a + chunk].float() @ k.float().transpose(-1, -2)).softmax(-1)
        out[:, :, a:a + chunk] = (p @ v.float()).to(q.dtype)
        p = p[rec][..., ref_idx]
        gen[..., a:a + chunk] = kp @ p.transpose(-1, -2)
        ref = ref + qp[:, a:a + chunk] @ p
    return out, gen, ref


def composition(q, k, v, scale, ref_idx, rec, kp, qp, rows=None):
    """The default maps from three fused attention calls that return the log-sum-exp."""
    return three_call_maps(q, k, v, scale=scale, ref_idx=ref_idx, record_idx=torch.as_tensor(rec, device=q.device),
                           key_probes=kp, query_probes=qp, query_rows=rows)


def check_composition(q, k, v, scale, ref_idx, rec, kp, qp, rows=None):
    """Every map of the composition against the float64 reference (kernels.testing), on the
    first heads (maps are per head): as many as CHECK_BYTES allows. Raises AssertionError."""
    heads = slice(0, max(1, CHECK_BYTES // (8 * q.shape[2] * k.shape[2])))
    q, k, v = q[:, heads], k[:, heads], v[:, heads]
    rec = torch.as_tensor(rec, device=q.device)
    _, got = composition(q, k, v, scale, ref_idx, rec, kp, qp, rows)
    _, want = call_maps(q, k, v, scale=scale, ref_idx=ref_idx, record_idx=rec, key_probes=kp, query_probes=qp,
                        query_rows=rows, names=tuple(got))
    rtol, frac = MAP_TOL[q.dtype]
    for name, m in got.items():
        torch.testing.assert_close(m, want[name], rtol=rtol, atol=frac * want[name].abs().max().item(),
                                   msg=lambda msg, name=name: f"composition {name}: {msg}")


def columns(device):
    """{name: fn(q, k, v, scale, ref_idx, rec, kp, qp, rows=None)} for everything that runs on
    device (rows: the query rows of joint attention; naive and chunked capture take every row)."""
    cols = {"sdpa": lambda q, k, v, s, *_, rows=None: F.scaled_dot_product_attention(q, k, v, scale=s)}
    backends = ["torch"]
    if triton_available(torch.device(device)) and device == "cuda":
        backends.insert(0, "triton")
    if device == "cuda" and _cuda_backend_loads():
        backends.insert(1, "cuda")
    for be in backends:
        cols[f"i2am-{be} off"] = lambda q, k, v, s, ri, rec, kp, qp, be=be, rows=None: attention_with_maps(
            q, k, v, scale=s, record=[], backend=be)
        cols[f"i2am-{be} maps"] = lambda q, k, v, s, ri, rec, kp, qp, be=be, rows=None: attention_with_maps(
            q, k, v, scale=s, ref_keys=ri, query_rows=rows, record=rec, key_probes=kp, query_probes=qp, backend=be)
        cols[f"i2am-{be} maps cached"] = _cached_call(be)
    cols["composition"] = composition
    cols["naive"] = naive
    cols["chunked capture"] = chunked_capture
    return cols


def _cached_call(backend):
    """The recorder's path: the arguments checked once (a kept MapsCall), maps added into kept
    buffers call after call."""
    kept = {}

    def call(q, k, v, s, ri, rec, kp, qp):
        if "call" not in kept or not kept["call"].matches(q, k, v, s):
            kept["call"] = prepare(q, k, v, scale=s, ref_keys=ri, record=rec, key_probes=kp, query_probes=qp,
                                   backend=backend)
            kept["maps"] = {n: torch.zeros(shape, device=q.device) for n, shape in kept["call"].shapes.items()}
        return kept["call"](q, k, v, kept["maps"])
    return call


def interleaved(fns, device, reps):
    """{name: [ms per rep]}: after one warm-up call each, reps rounds of one call of every fn,
    the order rotating by one each round. GPU calls are timed with CUDA events, all read after
    the round (no synchronisation between the calls of a round)."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        if device == "cuda":
            events = {}
            for name in order:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fns[name]()
                end.record()
                events[name] = (start, end)
            torch.cuda.synchronize()
            for name, (start, end) in events.items():
                times[name].append(start.elapsed_time(end))
        else:
            for name in order:
                t0 = time.perf_counter()
                fns[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def summary(ms):
    """(min, median, spread = (max - min) / median) of a list of times."""
    med = statistics.median(ms)
    return min(ms), med, (max(ms) - min(ms)) / med if med > 0 else 0.0


def _cuda_backend_loads():
    try:
        backend_module("cuda").library()
        return True
    except Exception:
        return False


def _peak_extra_mib(fn, device):
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return _rss_peak_during(fn) / 2**20


def _rss_peak_during(fn):
    """Peak resident memory above the starting level while fn runs (sampled every ms)."""
    page = os.sysconf("SC_PAGE_SIZE")

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    base, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(0, max(peak[0], rss()) - base)


def run(shapes, device="cpu", dtype=torch.float16, reps=5, B=2, naive_limit=2**31, progress=None):
    """Measure every column on every shape; B=2 with one recorded entry (the CFG cond half)."""
    rows = []
    cols = columns(device)
    for label, nq, nk, d, h in shapes:
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(B, h, n, d, generator=g).to(device, dtype) for n in (nq, nk, nk))
        scale, rec = d ** -0.5, [1]
        ref_idx = torch.arange(1 if nk > 1 else 0, nk, device=device)  # a CLS token first
        kp, qp = default_probes(nq, ref_idx.numel(), device)
        args = (q, k, v, scale, ref_idx, rec, kp, qp)
        check_composition(*args)
        calls = {name: (lambda fn=fn: fn(*args)) for name, fn in cols.items()
                 if name != "naive" or B * h * nq * nk * 4 * 3 <= naive_limit}  # else naive would not fit
        rows += _timed(label, calls, device, reps, nq, nk, d, 4 * B * h * nq * nk * d, progress)
    return rows


def run_joint(shapes, device="cpu", dtype=torch.float32, reps=3, progress=None):
    """Measure JOINT_COLUMNS on DiT joint-attention shapes: one entry, recorded, the maps on the
    generated rows and every reference image's keys."""
    rows = []
    cols = columns(device)
    for label, text, gen, refs, d, h in shapes:
        n = text + gen + sum(refs)
        g = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(1, h, n, d, generator=g).to(device, dtype) for _ in range(3))
        ref_idx = torch.arange(text + gen, n, device=device)
        kp, qp = default_probes(gen, ref_idx.numel(), device)
        args = (q, k, v, d ** -0.5, ref_idx, [0], kp, qp)
        check_composition(*args, rows=slice(text, text + gen))
        calls = {name: (lambda fn=cols[name]: fn(*args, rows=slice(text, text + gen))) for name in JOINT_COLUMNS}
        rows += _timed(label, calls, device, reps, gen, n, d, 4 * h * n * n * d, progress, memory=False)
    return rows


def _timed(label, calls, device, reps, nq, nk, d, flops, progress, memory=True):
    """Rows of one shape: every call timed interleaved, the ratio to SDPA's median; peak extra
    memory when `memory` (NaN when not: a joint layer's is bench/kontext_memory.py's, in a fresh process)."""
    times = interleaved(calls, device, reps)
    base_ms = statistics.median(times["sdpa"])
    rows = []
    for name, fn in calls.items():
        lo, ms, spread = summary(times[name])
        mib = _peak_extra_mib(fn, device) if memory else float("nan")
        rows.append(Row(label, name, nq, nk, d, ms, ms / base_ms, flops / ms / 1e9, mib, lo, spread))
        if progress:
            progress(rows[-1])
    return rows


def markdown(rows, device="cuda"):
    """The table; TFLOP/s on GPUs only (see notes), and not for the pipeline rows, which have no
    single attention shape."""
    flops = device == "cuda"
    lines = ["| shape | column | min ms | median ms | spread | x SDPA |" + (" TFLOP/s |" if flops else "")
             + " extra MiB |", "|---|---|---:|---:|---:|---:|" + ("---:|" if flops else "") + "---:|"]
    lines += [f"| {r.shape} | {r.column} | {r.min_ms:.3f} | {r.ms:.3f} | {100 * r.spread:.0f}% | {r.ratio:.2f} | "
              + (f"{r.tflops:.2f} | " if flops and r.d else "- | " if flops else "")
              + f"{'-' if r.extra_mib != r.extra_mib else f'{r.extra_mib:.1f}'} |" for r in rows]
    return "\n".join(lines)


def notes(rows, device):
    """What a reader of the table may wonder about: why there is no TFLOP/s column on CPU, and
    why a fused column can be slower than the naive path at a small shape."""
    lines = [] if device == "cuda" else [
        "No TFLOP/s on CPU: CPU timings are for the ratio to SDPA, not the throughput of a GPU kernel."]
    naive_ms = {r.shape: r.ms for r in rows if r.column == "naive"}
    lines += [f"At {r.shape}, {r.column} is slower than the naive path: at this size its time is the fixed host cost "
              "of its several passes (argument checks, launches), not arithmetic; it pays off as Nq x Nk grows."
              for r in rows
              if r.column.startswith("i2am") and "maps" in r.column and r.ms > naive_ms.get(r.shape, r.ms)]
    return lines


def environment(device):
    def commit():
        try:
            return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                  cwd=os.path.dirname(__file__)).stdout.strip() or None
        except OSError:
            return None

    env = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "python": platform.python_version(),
           "torch": torch.__version__, "device": device, "commit": commit(), "cpu_threads": torch.get_num_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average": os.getloadavg()[0]}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    return env


def plot(rows, path):
    """Write ratio_figure(rows) to path (PNG)."""
    fig = ratio_figure(rows)  # first: it selects the Agg backend before pyplot is imported here
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=150)
    plt.close(fig)


def ratio_figure(rows):
    """Each column's median time over SDPA's, one line per shape, one colour and marker per column
    across the figure (a dot plot: the shapes differ in Nq, Nk and d at once, so no one of them
    makes an x axis). The pipeline rows (no attention shape) are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.d and r.column != "sdpa"]
    shapes = list(dict.fromkeys(r.shape for r in rows))
    columns = list(dict.fromkeys(r.column for r in rows))
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.3 * len(shapes)), layout="constrained")
    for i, column in enumerate(columns):
        ratio, at = zip(*[(r.ratio, shapes.index(r.shape)) for r in rows if r.column == column])
        ax.scatter(ratio, at, color=f"C{i}", marker="osD^vPX*h"[i % 9], label=column, zorder=3)
    ax.set_yticks(range(len(shapes)), shapes, fontsize=8)
    ax.set_ylim(len(shapes) - 0.5, -0.5)  # the first shape on top, as in the table
    ax.grid(axis="y", color="0.9")
    ax.axvline(1, color="black", lw=0.8)
    ax.axvline(2, color="grey", lw=0.8, ls="--")
    ax.set_xlim(left=0)
    ax.set_xlabel("time / SDPA's (median of interleaved reps; solid line: SDPA, dashed: 2 x SDPA)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def pipeline_row(device, dtype, steps=10, reps=3):
    """A small SD-like UNet denoising loop with CFG, traced (default maps) vs untraced; None
    without diffusers. Random weights: the timing does not depend on them."""
    try:
        from diffusers import DDIMScheduler, UNet2DConditionModel
    except ImportError:
        return None
    from .tracing import trace

    big = device == "cuda"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=64 if big else 16, block_out_channels=(320, 640) if big else (32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=768 if big else 64,
        attention_head_dim=8, norm_num_groups=32 if big else 8).to(device, dtype).eval()
    size, ref_grid = (64, 64) if big else (16, 16), (16, 16)
    ctx = torch.randn(2, 1 + ref_grid[0] * ref_grid[1], unet.config.cross_attention_dim, device=device, dtype=dtype)
    sched = DDIMScheduler()
    mask = torch.zeros(size)
    mask[size[0] // 4: 3 * size[0] // 4, size[1] // 4: 3 * size[1] // 4] = 1
    points = [(size[0] // 2, size[1] // 2 + i) for i in range(4)]

    @torch.no_grad()
    def denoise():
        sched.set_timesteps(steps)
        x = torch.randn(1, 4, *size, device=device, dtype=dtype)
        for t in sched.timesteps:
            uncond, cond = unet(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
            x = sched.step(uncond + 5.0 * (cond - uncond), t, x).prev_sample

    def traced():
        with trace(unet, ref_grid=ref_grid, num_steps=steps, mask=mask, points=points):
            denoise()

    times = interleaved({"untraced": denoise, "traced": traced}, device, reps)
    (plain_lo, plain_ms, plain_spread), (traced_lo, traced_ms, traced_spread) = map(summary, times.values())
    label, nq, nk = f"UNet {size[0]}x{size[1]} {steps} steps", size[0] * size[1], ctx.shape[1]
    return [Row(label, "pipeline untraced", nq, nk, 0, plain_ms, 1.0, 0.0, _peak_extra_mib(denoise, device),
                plain_lo, plain_spread),
            Row(label, "pipeline traced", nq, nk, 0, traced_ms, traced_ms / plain_ms, 0.0,
                _peak_extra_mib(traced, device), traced_lo, traced_spread)]


def kontext_pipeline_row(device, dtype, steps=10, reps=3, grid=(16, 16), text=64):
    """A small FLUX.1 Kontext-like transformer (one double- and two single-stream blocks, random
    weights) run as the pipeline does, a flow-matching loop over [generated, reference] tokens,
    traced (default maps) vs untraced; None without diffusers."""
    try:
        from diffusers import FluxTransformer2DModel
    except ImportError:
        return None
    from .tracing import trace

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                                   pooled_projection_dim=32, guidance_embeds=True,
                                   axes_dims_rope=(8, 12, 12)).to(device).eval()
    if dtype != torch.float32:  # (a float32 model is left as built: diffusers warns at any cast)
        model = model.to(dtype)
    n = grid[0] * grid[1]
    ids = torch.zeros(2, *grid, 3)
    ids[1, ..., 0] = 1  # the reference image's tokens, as FluxKontextPipeline marks them
    ids[..., 1], ids[..., 2] = torch.arange(grid[0])[:, None], torch.arange(grid[1])
    g = torch.Generator().manual_seed(0)
    inputs = dict(encoder_hidden_states=torch.randn(1, text, 64, generator=g),
                  pooled_projections=torch.randn(1, 32, generator=g), guidance=torch.full((1,), 2.5), img_ids=ids.reshape(2 * n, 3), txt_ids=torch.zeros(text, 3),
                  return_dict=False)
    inputs = {key: val.to(device, dtype) if isinstance(val, torch.Tensor) and val.is_floating_point() else val
              for key, val in inputs.items()}
    ref = torch.randn(1, n, 16, generator=g).to(device, dtype)
    mask = torch.zeros(grid)
    mask[grid[0] // 4: 3 * grid[0] // 4, grid[1] // 4: 3 * grid[1] // 4] = 1
    points = [(grid[0] // 2 + i // 2, grid[1] // 2 + i % 2) for i in range(4)]

    @torch.no_grad()
    def denoise():
        x = torch.randn(1, n, 16, generator=torch.Generator().manual_seed(1)).to(device, dtype)
        ts = torch.linspace(1, 0, steps + 1)
        for t, t_next in zip(ts[:-1], ts[1:]):
            velocity = model(hidden_states=torch.cat([x, ref], 1), timestep=torch.full((1,), float(t), device=device,
                             dtype=dtype), **inputs)[0][:, :n]
            x = x + float(t_next - t) * velocity

    def traced():
        with trace(model, num_steps=steps, mask=mask, points=points):
            denoise()

    times = interleaved({"untraced": denoise, "traced": traced}, device, reps)
    (plain_lo, plain_ms, plain_spread), (traced_lo, traced_ms, traced_spread) = map(summary, times.values())
    label, nq, nk = f"Kontext {grid[0]}x{grid[1]} {steps} steps", n, text + 2 * n
    return [Row(label, "pipeline untraced", nq, nk, 0, plain_ms, 1.0, 0.0, _peak_extra_mib(denoise, device),
                plain_lo, plain_spread),
            Row(label, "pipeline traced", nq, nk, 0, traced_ms, traced_ms / plain_ms, 0.0,
                _peak_extra_mib(traced, device), traced_lo, traced_spread)]


def main(quick=False, device=None, json_path=None, plot_path=None, dtype=None, pipeline=True, progress=True):
    """Time every column, print the environment and the table once (progress: a line on stderr
    as each row is timed); returns the rows."""
    for path in (json_path, plot_path):  # their folders made first: a bad path fails before the benchmark
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    shapes = GPU_SHAPES if device == "cuda" else (QUICK_CPU_SHAPES if quick else CPU_SHAPES)
    if device == "cuda" and quick:
        shapes = [s for s in GPU_SHAPES if s[1] in (4096, 16384) and s[3] in (40, 64)]
    dtype = dtype or (torch.float16 if device == "cuda" else torch.float32)
    reps = 3 if quick else (10 if device == "cuda" else 5)
    progress = (lambda r: print(f"timed {r.shape}, {r.column}", file=sys.stderr, flush=True)) if progress else None
    rows = run(shapes, device, dtype, reps, progress=progress)
    if not quick:
        rows += run_joint(JOINT_SHAPES, device, dtype, 3 if device == "cpu" else reps, progress=progress)
    for make in (pipeline_row, kontext_pipeline_row) if pipeline else ():
        e2e = make(device, dtype, steps=5 if quick else 10, reps=reps)
        for r in (e2e or ()) if progress else ():
            progress(r)
        rows += e2e or []
        if e2e is None:
            print(f"{make.__name__} skipped: diffusers is not installed")
    env = environment(device)
    print("\n".join(["", json.dumps(env), "", markdown(rows, device), "", *notes(rows, device)]).rstrip())
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"environment": env, "rows": [asdict(r) for r in rows]}, f, indent=1)
    if plot_path:
        plot(rows, plot_path)
    return rows

