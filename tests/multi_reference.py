"""Float64 I2AM maps of several references, written from the definitions (section 3d of the
maps' contract) and the model's own q and k, captured where diffusers hands them to
dispatch_attention_fn in an untraced run (of the transformer or of a whole pipeline). Shared by
the Qwen-Image and FLUX.2 tests."""
import contextlib

import torch
from PIL import Image

import i2am
from i2am.integrations.dit import TokenLayout


@contextlib.contextmanager
def captured_qk(module, keep=lambda q, k: True):
    """The (query, key) of every attention call of `module` (a diffusers transformer module),
    (B, N, heads, d) as diffusers dispatches them; keep(q, k) filters the calls kept."""
    calls, dispatch = [], module.dispatch_attention_fn

    def capture(query, key, value, *args, **kwargs):
        if keep(query, key):
            calls.append((query.detach().clone(), key.detach().clone()))
        return dispatch(query, key, value, *args, **kwargs)

    module.dispatch_attention_fn = capture
    try:
        yield calls
    finally:
        module.dispatch_attention_fn = dispatch


def run_steps(model, inputs, timesteps, negative=None):
    """One transformer call per step, as the pipelines make them; with `negative` (true CFG) a
    second call at the same timestep with the negative prompt's text. Returns every output."""
    outs = []
    for t in timesteps:
        step = {**inputs, "timestep": torch.full_like(inputs["timestep"], t)}
        outs.append(model(**step)[0])
        if negative is not None:
            outs.append(model(**{**step, "encoder_hidden_states": negative})[0])
    return outs


def traced_against_untraced(target, run, module, keep=lambda q, k: True, **trace_options):
    """(maps, calls): run() (a list of outputs) untraced with every (q, k) of `module` that keep
    accepts captured, then traced (i2am.trace(target, **trace_options)), whose outputs must equal
    the untraced ones (1e-6)."""
    with torch.no_grad(), captured_qk(module, keep) as calls:
        want = run()
    with torch.no_grad(), i2am.trace(target, **trace_options) as tc:
        got = run()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    return tc.maps(), calls


def first_passes(calls, layers, passes=2):
    """The calls of each step's first transformer pass, of `passes` per step (true CFG: the cond
    pass, then the negative prompt's)."""
    return [c for i, c in enumerate(calls) if i // layers % passes == 0]


def joint_layout(tokens, grid, refs):
    """The TokenLayout of a joint sequence of `tokens` tokens: [text, generated (grid), ref_0,
    ref_1, ...]: the pipeline tests' own statement of where the tokens are."""
    image = grid[0] * grid[1] + sum(h * w for h, w in refs)
    text = tokens - image
    rows = slice(text, text + grid[0] * grid[1])
    return TokenLayout(text, image, rows, slice(rows.stop, tokens), grid, refs[0], references=tuple(refs))


def images(sizes, seed=0):
    """Random RGB PIL images of the given (width, height)."""
    gen = torch.Generator().manual_seed(seed)
    return [Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=gen, dtype=torch.uint8).numpy())
            for w, h in sizes]


def expected_maps(calls, layers, steps, groups, layout, point, patch):
    """{layer: {name: (B, G, heads, ...)}} float64 sums per time group: "gen" (C, uniform over every
    reference's keys), "gen{r}" (over reference r's), "patch" (reference patch (r, i, j)), "ref{r}"
    (P, uniform query probe), "point{r}" (P of the generated position `point`), "src_<source>" (P
    summed over each source's keys); calls are ordered step by step, layer by layer."""
    h, w = layout.grid
    sizes = [a * b for a, b in layout.grids]
    start = layout.ref_keys.start
    refs = [slice(start + sum(sizes[:r]), start + sum(sizes[:r + 1])) for r in range(len(sizes))]
    out = {}
    for i, (q, k) in enumerate(calls):
        layer, t = layers[i % len(layers)], i // len(layers)
        q, k = (x.double().transpose(1, 2) for x in (q, k))  # (B, heads, N, d)
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        P = s.softmax(-1)[:, :, layout.rows]                # over ALL keys, on the generated rows
        C = s[:, :, layout.rows].softmax(-2)                # over the generated rows only
        r, pi, pj = patch
        maps = {"gen": C[..., layout.ref_keys].mean(-1),
                "patch": C[..., refs[r].start + pi * layout.grids[r][1] + pj],
                "src_text": P[..., layout.segments["text"]].sum(-1),
                "src_generated": P[..., layout.segments["generated"]].sum(-1)}
        for n, K in enumerate(refs):
            maps[f"gen{n}"] = C[..., K].mean(-1)
            maps[f"ref{n}"] = P[..., K].mean(-2)
            maps[f"point{n}"] = P[:, :, point[0] * w + point[1], K]
            maps[f"src_ref{n}"] = P[..., K].sum(-1)
        acc = out.setdefault(layer, {n: torch.zeros(m.shape[0], groups, *m.shape[1:], dtype=torch.float64)
                                     for n, m in maps.items()})
        for n, m in maps.items():
            acc[n][:, t * groups // steps] += m
    return out


def integrated(exp, name, by, shape):
    """Mean over layers and heads; generated-side maps (and sources) clamped at 0 after the time sum."""
    total = 0
    for layer in exp.values():
        m = layer[name]
        m = m if by == "time" else m.sum(1, keepdim=True)
        if not name.startswith(("ref", "point")):
            m = m.clamp_min(0)
        total = total + m.mean(2)
    total = (total / len(exp)).reshape(*total.shape[:2], *shape)
    return total if by == "time" else total[:, 0]


def shares(exp, names, by, shape):
    """The sources' shares: each integrated A over their sum (0 where it is 0)."""
    A = {n: integrated(exp, f"src_{n}", by, shape) for n in names}
    total = sum(A.values())
    return {n: torch.where(total > 0, a / total, torch.zeros_like(a)) for n, a in A.items()}


def check_maps(maps, exp, layout, point, patch, tol):
    """Every section-3d quantity of `maps` against the float64 sums `exp`."""
    refs = range(len(layout.grids))
    for by in (None, "time"):
        checks = {"generated": (maps.generated(by=by, normalize=False), integrated(exp, "gen", by, layout.grid)),
                  "specific_generated": (maps.specific_generated(patch, by=by, normalize=False),
                                         integrated(exp, "patch", by, layout.grid))}
        for r in refs:
            grid = layout.grids[r]
            checks[f"generated ref={r}"] = (maps.generated(by=by, normalize=False, ref=r),
                                            integrated(exp, f"gen{r}", by, layout.grid))
            checks[f"reference ref={r}"] = (maps.reference(by=by, normalize=False, ref=r),
                                            integrated(exp, f"ref{r}", by, grid))
            checks[f"specific_reference ref={r}"] = (maps.specific_reference(point, by=by, normalize=False, ref=r),
                                                     integrated(exp, f"point{r}", by, grid))
        names = [f"ref{r}" for r in refs]
        for all_keys, kinds in ((False, names), (True, names + ["text", "generated"])):
            got, want = maps.sources(by=by, all_keys=all_keys), shares(exp, kinds, by, layout.grid)
            assert list(got) == kinds
            for n in kinds:
                checks[f"sources all_keys={all_keys} {n}"] = (got[n], want[n])
        for what, (got, want) in checks.items():
            want = want[0] if len(maps.record) == 1 else want  # one recorded image: no batch axis
            assert got.shape == want.shape, what
            torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{what} by={by}: {m}")
