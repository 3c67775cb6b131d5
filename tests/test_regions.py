"""References inside the same image: query_region / ref_region on a CatVTON-shaped UNet (attn1,
[person; garment] along height) and a FLUX.1 Fill-like side-by-side Flux transformer
([image | reference] along width: strided rows and keys).

Every map is checked against float64 computed here from the layers' own q and k, captured in an
untraced run: P over all of the layer's keys, C over the query region's tokens, both restricted
to the reference region's keys; generated-side maps resized over the query axes to the query
region and clamped at 0, reference-side maps of lower-resolution layers resized over the key
axes to the latent-scale reference region and clamped at 0.
"""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import i2am
import multi_reference as mr
import tiny_flux as tf
import tiny_flux2 as t2
import tiny_incontext as tic
import tiny_qwen as tq
from i2am.grid import resize
from test_flux import captured_qk

G = 2
POINT, PATCH = (1, 2), (3, 1)  # in the query region's and the reference region's own coordinates


@contextlib.contextmanager
def captured_attn1(unet):
    """(layer, q, k) of every attn1 call, (B, heads, N, d) as AttnProcessor2_0 hands them to SDPA."""
    calls, running, sdpa = [], [], F.scaled_dot_product_attention
    handles = []
    for name, m in unet.named_modules():
        if name.endswith("attn1"):
            handles.append(m.register_forward_pre_hook(lambda m, a, n=name: running.append(n)))
            handles.append(m.register_forward_hook(lambda m, a, o: running.clear()))  # None: output kept

    def capture(q, k, v, *args, **kwargs):
        if running:
            calls.append((running[-1], q.detach().clone(), k.detach().clone()))
        return sdpa(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = capture
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = sdpa
        for h in handles:
            h.remove()


def region_tokens(region, grid, latent, offset=0):
    """The tokens of `region` (latent coordinates) scaled to a layer grid, row-major, and their grid."""
    (h, w), (h_l, w_l) = latent, grid
    t, l, b, r = region
    t, b, l, r = t * h_l // h, b * h_l // h, l * w_l // w, r * w_l // w
    return offset + torch.arange(h_l * w_l).reshape(h_l, w_l)[t:b, l:r].reshape(-1), (b - t, r - l)


def expected(calls, latent, query, ref, offset=0):
    """{layer: {probe: (B, G, heads, n)}} from (layer, step, q, k) calls, (B, heads, N, d) each."""
    qsize, rsize = (query[2] - query[0], query[3] - query[1]), (ref[2] - ref[0], ref[3] - ref[1])
    uniform = torch.full(qsize, 1.0 / (qsize[0] * qsize[1]), dtype=torch.float64)
    point = torch.zeros(qsize, dtype=torch.float64)
    point[POINT] = 1
    out, steps = {}, 1 + max(c[1] for c in calls)
    for layer, t, q, k in calls:
        n = q.shape[2] - offset
        grid = next((latent[0] // f, latent[1] // f) for f in (1, 2, 4) if latent[0] * latent[1] == n * f * f)
        qi, qg = region_tokens(query, grid, latent, offset)
        ki, kg = region_tokens(ref, grid, latent, offset)
        q, k = q.double(), k.double()
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        P = s.softmax(-1)[:, :, qi][..., ki]         # over all of the layer's keys
        C = s[:, :, qi].softmax(-2)[..., ki]         # over the query region's tokens
        B, H = P.shape[:2]
        P_latent = resize(P.transpose(-1, -2).reshape(B, H, -1, *qg), qsize)  # query axes to the region
        maps = {"gen": C.mean(-1),
                "patch": resize(C.reshape(B, H, -1, *kg), rsize)[..., PATCH[0], PATCH[1]],
                "ref": (P_latent * uniform).sum((-2, -1)), "point": (P_latent * point).sum((-2, -1)),
                "grids": (qg, kg)}
        acc = out.setdefault(layer, {name: torch.zeros(B, G, H, m.shape[-1], dtype=torch.float64)
                                     for name, m in maps.items() if name != "grids"})
        acc["grids"] = maps.pop("grids")
        for name, m in maps.items():
            acc[name][:, t * G // steps] += m
    return out, qsize, rsize


def integrated(exp, name, by, qsize, rsize):
    """Mean over layers and heads (by="head": each head's share 1/N); clamped at 0 after each resize."""
    total = 0
    for lay in exp.values():
        qg, kg = lay["grids"]
        m = lay[name] if by == "time" else lay[name].sum(1, keepdim=True)
        if name in ("gen", "patch"):
            m = resize(m.reshape(*m.shape[:3], *qg), qsize).clamp_min(0)
        else:
            m = m.reshape(*m.shape[:3], *kg)
            if kg != rsize:
                m = resize(m, rsize).clamp_min(0)
        total = total + (m / m.shape[2] if by == "head" else m.mean(2, keepdim=True))  # by head: summing gives M
    total = total / len(exp)
    return {None: total[:, 0, 0], "time": total[:, :, 0], "head": total[:, 0]}[by]


def assert_maps(maps, exp, qsize, rsize):
    for by in (None, "time", "head"):
        checks = {"generated": maps.generated(by=by, normalize=False),
                  "specific_generated": maps.specific_generated(PATCH, by=by, normalize=False),
                  "reference": maps.reference(by=by, normalize=False),
                  "specific_reference": maps.specific_reference(POINT, by=by, normalize=False)}
        for (what, got), name in zip(checks.items(), ("gen", "patch", "ref", "point")):
            want = integrated(exp, name, by, qsize, rsize)
            assert got.shape == want.shape, (what, by)
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-7,
                                       msg=lambda m: f"{what} by={by}: {m}")


def run_unet(unet, inputs, timesteps):
    return [unet(**{**inputs, "timestep": torch.tensor(t)})[0] for t in timesteps]


def test_catvton_unet_self_attention_maps_match_float64():
    unet, inputs, timesteps = tic.catvton_unet(), tic.catvton_inputs(), [900, 500, 100]
    with torch.no_grad(), captured_attn1(unet) as calls:
        want_out = run_unet(unet, inputs, timesteps)
    per_step = len(calls) // len(timesteps)
    calls = [(name, i // per_step, q, k) for i, (name, q, k) in enumerate(calls)]
    with torch.no_grad(), i2am.trace(unet, num_steps=3, time_groups=G, attention="self", cfg=False,
                                     query_region=tic.CATVTON_QUERY, ref_region=tic.CATVTON_REF,
                                     points=[POINT], patches=[PATCH]) as tc:
        got_out = run_unet(unet, inputs, timesteps)
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    maps = tc.maps()
    assert set(maps.layers) == {name for name, *_ in calls} and all(n.endswith("attn1") for n in maps.layers)
    assert {lay["grid"] for lay in maps.layers.values()} == {(8, 6), (4, 3)}  # two resolutions
    assert maps.latent_size == maps.ref_grid == tic.PERSON
    assert all(isinstance(b.rows, slice) for b in tc.recorder.buffers.values())  # [person; garment]: slices
    assert maps.regions == {"latent": tic.CATVTON_LATENT, "query": tic.CATVTON_QUERY, "ref": tic.CATVTON_REF}
    assert_maps(maps, *expected(calls, tic.CATVTON_LATENT, tic.CATVTON_QUERY, tic.CATVTON_REF))


def test_side_by_side_flux_maps_match_float64():
    model, inputs, timesteps = tf.transformer(), tic.fill_inputs(), [1.0, 0.7, 0.4]
    step = lambda t: model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)})[0]  # noqa: E731
    with torch.no_grad(), captured_qk() as calls:
        want_out = [step(t) for t in timesteps]
    layers = ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn")
    calls = [(layers[i % 2], i // 2, q.transpose(1, 2), k.transpose(1, 2)) for i, (q, k) in enumerate(calls)]
    with torch.no_grad(), i2am.trace(model, num_steps=3, time_groups=G, query_region=tic.FILL_QUERY,
                                     ref_region=tic.FILL_REF, points=[POINT], patches=[PATCH]) as tc:
        got_out = [step(t) for t in timesteps]
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    maps = tc.maps()
    assert maps.latent_size == maps.ref_grid == (4, 4) and set(maps.layers) == set(layers)
    buf = tc.recorder.buffers[layers[0]]
    assert isinstance(buf.rows, torch.Tensor)  # side by side: strided rows, no (Nq x Nk) tensor
    assert_maps(maps, *expected(calls, tic.FILL_GRID, tic.FILL_QUERY, tic.FILL_REF, offset=tf.TEXT))
    # the reference keys are some of the generated ones: no separate sources, the one reference has them all
    assert set(maps.sources()) == {"ref0"}
    torch.testing.assert_close(maps.sources()["ref0"], (maps.generated(normalize=False) > 0).float())
    with pytest.raises(ValueError, match="all_keys=True"):
        maps.sources(all_keys=True)


@pytest.mark.parametrize("family", ["qwen", "flux2"])
def test_families_with_separate_references_refuse_regions(family):
    if family == "qwen":
        model, inputs = tq.transformer(), tq.edit_plus_inputs(batch=1)
    else:
        model, inputs = t2.transformer(), t2.inputs(batch=1)
    with torch.no_grad():
        want = mr.run_steps(model, inputs, [1.0])
        with pytest.raises(ValueError, match=f"query_region/ref_region are not supported for {type(model).__name__}"):
            with i2am.trace(model, num_steps=1, query_region=(0, 0, 2, 2), ref_region=(2, 0, 4, 2)):
                mr.run_steps(model, inputs, [1.0])
        torch.testing.assert_close(mr.run_steps(model, inputs, [1.0]), want, rtol=0, atol=0)  # restored


def test_a_bound_that_does_not_scale_names_the_layer():
    unet, inputs = tic.catvton_unet(), tic.catvton_inputs()
    with pytest.raises(ValueError, match=r"layer 'down_blocks\.1\..*attn1'.*query_region \(0, 0, 7, 6\)"):
        with torch.no_grad(), i2am.trace(unet, num_steps=1, attention="self", query_region=(0, 0, 7, 6),
                                         ref_region=(7, 0, 16, 6)):
            run_unet(unet, inputs, [500])
    assert all(type(m.processor).__name__ == "AttnProcessor2_0" for n, m in unet.named_modules()
               if n.endswith("attn1"))  # restored after the error

    # the layers at full resolution alone take the same regions
    with torch.no_grad(), i2am.trace(unet, num_steps=1, attention="self", query_region=(0, 0, 7, 6),
                                     ref_region=(7, 0, 16, 6), layers=["down_blocks.0.*", "up_blocks.1.*"]) as tc:
        run_unet(unet, inputs, [500])
    maps = tc.maps()
    assert {lay["grid"] for lay in maps.layers.values()} == {(7, 6)} and len(maps.layers) == 3
    assert maps.generated().shape == (7, 6) and maps.reference().shape == (9, 6)  # the cond half

def test_overlapping_and_out_of_grid_regions_are_clear_errors():
    with pytest.raises(ValueError, match="overlap"):
        i2am.TraceConfig(query_region=(0, 0, 8, 6), ref_region=(7, 0, 16, 6))
    with pytest.raises(ValueError, match="go together"):
        i2am.TraceConfig(query_region=(0, 0, 8, 6))
    with pytest.raises(ValueError, match="ref_region gives"):
        i2am.TraceConfig(query_region=(0, 0, 8, 6), ref_region=(8, 0, 16, 6), ref_grid=(8, 6))
    with pytest.raises(ValueError, match="top < bottom"):
        i2am.TraceConfig(query_region=(4, 0, 4, 6), ref_region=(8, 0, 16, 6))
    with pytest.raises(ValueError, match="attention must be"):
        i2am.TraceConfig(attention="joint")
    unet, inputs = tic.catvton_unet(), tic.catvton_inputs()
    with pytest.raises(ValueError, match=r"ref_region \(8, 0, 17, 6\) reaches outside the latent grid 16x6"):
        with torch.no_grad(), i2am.trace(unet, num_steps=1, attention="self", query_region=(0, 0, 8, 6),
                                         ref_region=(8, 0, 17, 6)):
            run_unet(unet, inputs, [500])
