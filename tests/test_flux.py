"""i2am.trace on FLUX.1 Kontext: a tiny FluxTransformer2DModel (one double- and one single-stream
block) and a tiny FluxKontextPipeline, built in code.

The maps are checked against a float64 computation written here from the definitions and the
model's own q and k, captured where diffusers hands them to its attention function in an
untraced run: P over all joint keys (text, generated, reference), C over the generated rows,
summed over the steps of each time group.
"""
import contextlib
import warnings

import pytest
import torch
from diffusers.models.transformers import transformer_flux

import i2am
import tiny_flux as tf
from multi_reference import integrated
from i2am.integrations import dit
from i2am.integrations.flux import token_layout
from i2am.kernels import triton_available

G = 2
POINT, PATCH = (1, 4), (2, 1)
LAYERS = ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn")
BACKENDS = ["torch"] + (["triton"] if triton_available(torch.device("cpu")) else [])


@contextlib.contextmanager
def captured_qk():
    """The (query, key) of every attention call, (B, N, heads, d) as diffusers dispatches them."""
    calls, dispatch = [], transformer_flux.dispatch_attention_fn

    def capture(query, key, value, **kwargs):
        calls.append((query.detach().clone(), key.detach().clone()))
        return dispatch(query, key, value, **kwargs)

    transformer_flux.dispatch_attention_fn = capture
    try:
        yield calls
    finally:
        transformer_flux.dispatch_attention_fn = dispatch


def run_steps(model, inputs, timesteps):
    return [model(**{**inputs, "timestep": torch.full_like(inputs["timestep"], t)})[0] for t in timesteps]


def expected_maps(calls, steps, rows, ref, grid, ref_grid):
    """{layer: {probe: (B, G, heads, ...)}} summed per time group, from the captured q and k."""
    h, w = grid
    out = {}
    for i, (q, k) in enumerate(calls):
        layer, t = LAYERS[i % len(LAYERS)], i // len(LAYERS)
        q, k = (x.double().transpose(1, 2) for x in (q, k))  # (B, heads, N, d)
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
        P = s.softmax(-1)[:, :, rows, ref]           # over ALL keys, then the generated rows
        C = s[:, :, rows].softmax(-2)[:, :, :, ref]  # over the generated rows only
        maps = {"gen": C.mean(-1), "patch": C[..., PATCH[0] * ref_grid[1] + PATCH[1]],
                "ref": P.mean(-2), "point": P[:, :, POINT[0] * w + POINT[1]]}
        acc = out.setdefault(layer, {n: torch.zeros(m.shape[0], G, *m.shape[1:], dtype=torch.float64)
                                     for n, m in maps.items()})
        for n, m in maps.items():
            acc[n][:, t * G // steps] += m
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_bare_kontext_transformer_maps_match_float64(backend):
    model, inputs = tf.transformer(), tf.kontext_inputs(batch=2)
    timesteps = [1.0, 0.7, 0.4]
    with torch.no_grad(), captured_qk() as calls:
        want_out = run_steps(model, inputs, timesteps)
    layout = token_layout(inputs["img_ids"], inputs["encoder_hidden_states"], inputs["hidden_states"])
    assert (layout.rows, layout.ref_keys) == (slice(5, 29), slice(29, 45))
    with torch.no_grad(), i2am.trace(model, num_steps=3, time_groups=G, points=[POINT], patches=[PATCH],
                                     backend=backend) as tc:
        got_out = run_steps(model, inputs, timesteps)
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    maps = tc.maps()
    assert set(maps.layers) == set(LAYERS) and maps.latent_size == tf.GRID and maps.ref_grid == tf.REF_GRID

    exp = expected_maps(calls, 3, layout.rows, layout.ref_keys, tf.GRID, tf.REF_GRID)
    tol = dict(rtol=1e-4, atol=1e-7) if backend == "torch" else dict(rtol=1e-4, atol=1e-6)
    for by in (None, "time"):
        checks = {"generated": (maps.generated(by=by, normalize=False), integrated(exp, "gen", by, tf.GRID)),
                  "specific_generated": (maps.specific_generated(PATCH, by=by, normalize=False),
                                         integrated(exp, "patch", by, tf.GRID)),
                  "reference": (maps.reference(by=by, normalize=False), integrated(exp, "ref", by, tf.REF_GRID)),
                  "specific_reference": (maps.specific_reference(POINT, by=by, normalize=False),
                                         integrated(exp, "point", by, tf.REF_GRID))}
        for what, (got, want) in checks.items():
            assert got.shape == want.shape, what  # (B=2, [G], ...): guidance-distilled, every entry recorded
            torch.testing.assert_close(got.double(), want, **tol, msg=lambda m: f"{what} by={by}: {m}")


def test_layers_by_name_pattern_and_a_given_ref_grid_is_checked():
    model, inputs = tf.transformer(), tf.kontext_inputs(batch=1)
    with torch.no_grad(), i2am.trace(model, num_steps=1, ref_grid=tf.REF_GRID, layers="single_*") as tc:
        model(**inputs)
    assert list(tc.maps().layers) == ["single_transformer_blocks.0.attn"]
    with pytest.raises(ValueError, match=r"ref_grid \(2, 8\) was given, but the model's reference tokens form "
                                         r"a \(4, 4\) grid"):
        with torch.no_grad(), i2am.trace(model, num_steps=1, ref_grid=(2, 8)):
            model(**inputs)


def hooks(model):
    """Every forward hook of every module of `model`, by module name."""
    return {n: (dict(m._forward_pre_hooks), dict(m._forward_hooks)) for n, m in model.named_modules()
            if m._forward_pre_hooks or m._forward_hooks}


def test_the_model_is_restored_exactly_after_an_exception():
    """The processors are never replaced; the stand-in dispatch and the layer hooks are there only
    inside the block, also when the block or a traced layer raised."""
    model, inputs = tf.transformer(), tf.kontext_inputs(batch=1)
    before, dispatch = dict(model.attn_processors), transformer_flux.dispatch_attention_fn

    class Boom(Exception):
        pass

    with pytest.raises(Boom), torch.no_grad(), i2am.trace(model, num_steps=2) as tc:
        model(**inputs)
        assert transformer_flux.dispatch_attention_fn is not dispatch
        assert set(hooks(model)) == {"", *LAYERS}  # the step hook, and each traced layer's
        assert all(model.attn_processors[n] is p for n, p in before.items())
        raise Boom
    assert all(model.attn_processors[n] is p for n, p in before.items())
    assert transformer_flux.dispatch_attention_fn is dispatch
    assert hooks(model) == {}
    assert tc.maps().layers  # what was recorded before the exception stays readable

    def raising(*args, **kwargs):
        raise Boom

    # an exception inside a traced layer: the running-layer mark is cleared with the rest
    with pytest.raises(Boom), torch.no_grad(), i2am.trace(model, num_steps=2):
        model.transformer_blocks[0].attn.to_out[0].register_forward_hook(raising)
        model(**inputs)
    model.transformer_blocks[0].attn.to_out[0]._forward_hooks.clear()
    assert dit._LAYER.get() is None and transformer_flux.dispatch_attention_fn is dispatch
    assert hooks(model) == {} and not dit._BOUND


def test_two_traced_transformers_share_the_stand_in():
    """Nested traces of two models bind the stand-in once; the original is back after the last."""
    (a, inputs), b = (tf.transformer(), tf.kontext_inputs(batch=1)), tf.transformer()
    dispatch = transformer_flux.dispatch_attention_fn
    with torch.no_grad(), i2am.trace(a, num_steps=1) as ta:
        with i2am.trace(b, num_steps=1) as tb:
            b(**inputs)
        assert transformer_flux.dispatch_attention_fn is not dispatch
        a(**inputs)
    assert transformer_flux.dispatch_attention_fn is dispatch and not dit._BOUND
    assert set(ta.maps().layers) == set(tb.maps().layers) == set(LAYERS)


def test_inputs_without_reference_tokens_are_a_clear_error():
    model, inputs = tf.transformer(), tf.kontext_inputs(batch=1)
    inputs["img_ids"] = torch.cat([tf.token_ids(tf.GRID, 0), tf.token_ids(tf.REF_GRID, 0)])
    with pytest.raises(ValueError, match="no reference-image tokens"), torch.no_grad(), \
            i2am.trace(model, num_steps=1):
        model(**inputs)
    assert all(type(p).__name__ == "FluxAttnProcessor" for p in model.attn_processors.values())


def test_kontext_pipeline_traced_run_equals_the_untraced_one():
    pipe = tf.pipeline()
    want = pipe(generator=torch.Generator().manual_seed(0), **tf.pipeline_kwargs()).images
    with i2am.trace(pipe, time_groups=G, points=[POINT], patches=[PATCH]) as tc:
        got = pipe(generator=torch.Generator().manual_seed(0), **tf.pipeline_kwargs()).images
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    maps = tc.maps()
    assert maps.num_steps == tf.STEPS and maps.latent_size == tf.GRID and maps.ref_grid == tf.REF_GRID
    assert maps.generated(by="time").shape == (G, *tf.GRID) and maps.reference().shape == tf.REF_GRID
    assert torch.isfinite(maps.specific_reference(POINT)).all()


def test_true_cfg_records_the_cond_pass_of_each_step():
    """FluxKontextPipeline with true_cfg_scale > 1 calls the transformer twice per step, the
    negative prompt second: one step each, the cond calls recorded, the output unchanged."""
    pipe = tf.pipeline()
    kwargs = {**tf.pipeline_kwargs(), "true_cfg_scale": 2.0, "negative_prompt_embeds": torch.randn(1, tf.TEXT, 16),
              "negative_pooled_prompt_embeds": torch.randn(1, tf.POOLED_DIM)}
    with torch.no_grad(), captured_qk() as calls:
        want = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    with i2am.trace(pipe, time_groups=G, points=[POINT], patches=[PATCH]) as tc:
        got = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert len(calls) == 2 * len(LAYERS) * tf.STEPS  # per step: the cond call's layers, then the negative's
    cond = [c for i, c in enumerate(calls) if (i // len(LAYERS)) % 2 == 0]
    n_text = tf.TEXT
    gen, ref = tf.GRID[0] * tf.GRID[1], tf.REF_GRID[0] * tf.REF_GRID[1]
    exp = expected_maps(cond, tf.STEPS, slice(n_text, n_text + gen), slice(n_text + gen, n_text + gen + ref),
                        tf.GRID, tf.REF_GRID)
    maps = tc.maps()
    assert maps.num_steps == tf.STEPS
    torch.testing.assert_close(maps.generated(by="time", normalize=False).double()[None],
                               integrated(exp, "gen", "time", tf.GRID), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(maps.specific_reference(POINT, normalize=False).double()[None],
                               integrated(exp, "point", None, tf.REF_GRID), rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="records the cond pass of true CFG only"), \
            i2am.trace(pipe, branch="all"):
        pipe(**kwargs)


def heun_steps(pipe, inputs):
    """The transformer calls of a FluxKontextPipeline run with FlowMatchHeunDiscreteScheduler, made as
    the pipeline makes them: one call per scheduler step, whose timesteps repeat (t0, t1, t1, t2, t2).
    Returns every call's output."""
    pipe.scheduler.set_timesteps(3)
    n_gen = tf.GRID[0] * tf.GRID[1]
    latents, reference = inputs["hidden_states"][:, :n_gen], inputs["hidden_states"][:, n_gen:]
    outs = []
    for t in pipe.scheduler.timesteps:
        out = pipe.transformer(**{**inputs, "hidden_states": torch.cat([latents, reference], 1),
                                  "timestep": t.expand(1) / 1000})[0]
        outs.append(out)
        latents = pipe.scheduler.step(out[:, :n_gen], t, latents, return_dict=False)[0]
    return outs


def test_heun_repeated_timesteps_are_steps_and_every_call_is_recorded():
    """A scheduler that repeats timesteps: every call is a step of its own (the scheduler stepped
    in between), recorded, no steps left over; the maps are float64's over all five calls."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe, inputs = tf.pipeline(), tf.kontext_inputs(batch=1)
    pipe.scheduler = FlowMatchHeunDiscreteScheduler()
    with torch.no_grad(), captured_qk() as calls:
        want_out = heun_steps(pipe, inputs)
    timesteps = pipe.scheduler.timesteps
    steps = len(timesteps)
    assert steps == 5 and len(set(timesteps.tolist())) == 3  # t0, t1, t1, t2, t2
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of steps left over
        with torch.no_grad(), i2am.trace(pipe, time_groups=G, points=[POINT], backend="torch") as tc:
            got_out = heun_steps(pipe, inputs)
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    maps = tc.maps()
    assert tc.current_step == steps - 1 and maps.num_steps == steps and len(calls) == steps * len(LAYERS)
    n_text, gen, ref = tf.TEXT, tf.GRID[0] * tf.GRID[1], tf.REF_GRID[0] * tf.REF_GRID[1]
    exp = expected_maps(calls, steps, slice(n_text, n_text + gen), slice(n_text + gen, n_text + gen + ref),
                        tf.GRID, tf.REF_GRID)
    torch.testing.assert_close(maps.generated(by="time", normalize=False).double()[None],
                               integrated(exp, "gen", "time", tf.GRID), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(maps.specific_reference(POINT, normalize=False).double()[None],
                               integrated(exp, "point", None, tf.REF_GRID), rtol=1e-4, atol=1e-7)


def test_kontext_answers_ref_0_and_its_sources_sum_to_one():
    model, inputs = tf.transformer(), tf.kontext_inputs(batch=1)
    with torch.no_grad(), i2am.trace(model, num_steps=1, patches=[PATCH]) as tc:
        model(**inputs)
    maps = tc.maps()
    assert maps.references == (tf.REF_GRID,)
    torch.testing.assert_close(maps.generated(ref=0), maps.generated())
    torch.testing.assert_close(maps.specific_generated((0, *PATCH)), maps.specific_generated(PATCH))
    share = maps.sources(all_keys=True)
    assert list(share) == ["ref0", "text", "generated"]
    torch.testing.assert_close(sum(share.values()), torch.ones(tf.GRID))
    assert torch.equal(maps.sources()["ref0"], torch.ones(tf.GRID))
