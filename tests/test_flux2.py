"""i2am.trace on FLUX.2: a tiny Flux2Transformer2DModel (one double- and one single-stream block)
called as Flux2Pipeline and Flux2KleinKVPipeline call it, with two references of different grids,
and the Klein pipeline objects themselves. Every map of several references against float64 from
the model's own q and k."""
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.transformers import transformer_flux2

import i2am
import multi_reference as mr
import tiny_flux2 as t2
from i2am import pipelines
from i2am.integrations.flux2 import cached_layout, token_layout
from i2am.kernels import triton_available

G = 2
POINT, PATCH = (2, 5), (1, 0, 4)
LAYERS = ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn")
BACKENDS = ["torch"] + (["triton"] if triton_available(torch.device("cpu")) else [])
TIMESTEPS = [1.0, 0.7, 0.4]
TOL = {"torch": dict(rtol=1e-4, atol=1e-7), "triton": dict(rtol=1e-4, atol=1e-6)}



@pytest.mark.parametrize("backend", BACKENDS)
def test_flux2_maps_match_float64(backend):
    model, inputs = t2.transformer(), t2.inputs(batch=2)
    layout = token_layout(inputs["img_ids"], inputs["encoder_hidden_states"], inputs["hidden_states"])
    assert (layout.rows, layout.ref_keys, layout.grids) == (slice(5, 29), slice(29, 60), t2.REFS)
    maps, calls = mr.traced_against_untraced(model, lambda: mr.run_steps(model, inputs, TIMESTEPS),
                                             transformer_flux2, num_steps=3, time_groups=G,
                                             points=[POINT], patches=[PATCH], backend=backend)
    assert set(maps.layers) == set(LAYERS) and maps.latent_size == t2.GRID and maps.references == t2.REFS
    mr.check_maps(maps, mr.expected_maps(calls, LAYERS, 3, G, layout, POINT, PATCH), layout, POINT, PATCH,
                  TOL[backend])


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_maps_match_float64(backend):
    """Flux2KleinKVPipeline: the reference keys exist as the sequence's tokens at the first step
    and as cached K/V afterwards; the references' own attention (their queries) is not recorded."""
    model = t2.transformer(guidance=False, kv=True)
    n_ref = sum(h * w for h, w in t2.REFS)
    maps, calls = mr.traced_against_untraced(model, lambda: t2.kv_steps(model, TIMESTEPS), transformer_flux2,
                                             keep=lambda q, k: q.shape[1] != n_ref, num_steps=3, time_groups=G,
                                             points=[POINT], patches=[PATCH], backend=backend)
    ids, text = t2.image_ids(t2.GRID, 0), torch.zeros(1, t2.TEXT, t2.JOINT_DIM)
    layout = cached_layout(ids, text, None, n_ref, t2.REFS)  # the keys of the extract call are laid out the same
    assert (layout.rows, layout.ref_keys, layout.segments["generated"]) == (slice(5, 29), slice(5, 36),
                                                                            slice(36, 60))
    assert len(calls) == 3 * len(LAYERS)
    mr.check_maps(maps, mr.expected_maps(calls, LAYERS, 3, G, layout, POINT, PATCH), layout, POINT, PATCH,
                  TOL[backend])


def test_kv_cache_with_repeated_timesteps_records_every_call_as_a_step():
    """Flux2KleinKVPipeline with FlowMatchHeunDiscreteScheduler (t0, t1, t1, t2, t2): the extract
    call and each cached call are steps of their own, all recorded, the maps float64's."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    model, scheduler = t2.transformer(guidance=False, kv=True), FlowMatchHeunDiscreteScheduler()
    pipe = SimpleNamespace(transformer=model, scheduler=scheduler)  # what i2am reads of the pipeline
    n_ref = sum(h * w for h, w in t2.REFS)
    scheduler.set_timesteps(3)
    with torch.no_grad(), mr.captured_qk(transformer_flux2, keep=lambda q, k: q.shape[1] != n_ref) as calls:
        want_out = t2.kv_steps(model, None, scheduler=scheduler)
    steps = len(scheduler.timesteps)
    assert steps == 5 and len(set(scheduler.timesteps.tolist())) == 3
    scheduler.set_timesteps(3)
    with torch.no_grad(), i2am.trace(pipe, time_groups=G, points=[POINT], patches=[PATCH], backend="torch") as tc:
        got_out = t2.kv_steps(model, None, scheduler=scheduler)
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert tc.current_step == steps - 1 and tc.maps().num_steps == steps and len(calls) == steps * len(LAYERS)
    ids, text = t2.image_ids(t2.GRID, 0), torch.zeros(1, t2.TEXT, t2.JOINT_DIM)
    layout = cached_layout(ids, text, None, n_ref, t2.REFS)
    mr.check_maps(tc.maps(), mr.expected_maps(calls, LAYERS, steps, G, layout, POINT, PATCH), layout, POINT, PATCH,
                  TOL["torch"])


def test_klein_true_cfg_records_the_cond_pass():
    model, inputs = t2.transformer(guidance=False), t2.inputs(guidance=False)
    negative = torch.randn_like(inputs["encoder_hidden_states"])
    with torch.no_grad():
        want_out = mr.run_steps(model, inputs, TIMESTEPS, negative)
        with i2am.trace(model, num_steps=3) as cond_only:
            mr.run_steps(model, inputs, TIMESTEPS)
        with i2am.trace(model, num_steps=3) as tc:
            got_out = mr.run_steps(model, inputs, TIMESTEPS, negative)
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for name, share in cond_only.maps().sources(all_keys=True).items():
        torch.testing.assert_close(tc.maps().sources(all_keys=True)[name], share)


def test_a_layout_it_cannot_read_is_an_error():
    model, inputs = t2.transformer(), t2.inputs()
    odd = inputs["img_ids"].clone()
    odd[0, 24:40, 0] = 15
    with pytest.raises(ValueError, match=r"time coordinates are \[0, 15, 20\]; i2am reads 0 \(the generated image\) "
                                         r"and 10, 20"), torch.no_grad(), i2am.trace(model, num_steps=1):
        model(**{**inputs, "img_ids": odd})
    with pytest.raises(ValueError, match=r"ref_grid \(3, 5\) was given, but the model's first reference forms a "
                                         r"\(4, 4\) grid"), torch.no_grad(), i2am.trace(model, num_steps=1,
                                                                                        ref_grid=(3, 5)):
        model(**inputs)
    kv = t2.transformer(guidance=False, kv=True)
    with torch.no_grad():
        out, cache = kv(**{**t2.inputs(guidance=False), "kv_cache_mode": "extract", "num_ref_tokens": 31,
                           "hidden_states": torch.randn(1, 55, t2.CHANNELS),
                           "img_ids": torch.cat([t2.reference_ids(), t2.image_ids(t2.GRID, 0)])[None]})
    cached = {**t2.inputs(guidance=False), "hidden_states": torch.randn(1, 24, t2.CHANNELS),
              "img_ids": t2.image_ids(t2.GRID, 0)[None], "kv_cache": cache, "kv_cache_mode": "cached"}
    with pytest.raises(ValueError, match="came before the extract call"), torch.no_grad(), \
            i2am.trace(kv, num_steps=1):
        kv(**cached)
    assert not hasattr(transformer_flux2.dispatch_attention_fn, "__wrapped__")  # the original is back


# ---- the pipeline objects, every component tiny and built in code (tests/tiny_flux2.py) ---------
PIPE_POINT, PIPE_PATCH, TEXT_TOKENS = (2, 5), (1, 4, 3), 48


def klein_run(pipe, images, **options):
    """run() for mr.traced_against_untraced: one 2-step pipeline call on the references (the same
    noise each time), its latents."""
    return lambda: [pipe(image=images, prompt="swap the colours", height=t2.PIPE_SIZE[0], width=t2.PIPE_SIZE[1],
                         num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
                         max_sequence_length=TEXT_TOKENS, **options).images]


def test_klein_pipeline_with_true_cfg_matches_float64(one_thread):
    """Flux2KleinPipeline with guidance_scale > 1: two transformer calls a step, the cond pass
    recorded; every map against float64 from its q and k."""
    pipe, images = t2.klein_pipeline(), mr.images(t2.REFERENCE_SIZES)
    maps, calls = mr.traced_against_untraced(pipe, klein_run(pipe, images, guidance_scale=4.0), transformer_flux2,
                                             time_groups=G, points=[PIPE_POINT], patches=[PIPE_PATCH])
    assert len(calls) == 2 * 2 * len(LAYERS)  # steps x (cond, negative) x layers
    calls = mr.first_passes(calls, len(LAYERS))
    layout = mr.joint_layout(calls[0][0].shape[1], t2.GRID, t2.PIPE_REFS)
    assert layout.text == TEXT_TOKENS
    assert maps.num_steps == 2 and maps.latent_size == t2.GRID
    # what `i2am run` expects of the pipeline before the run
    assert maps.references == t2.PIPE_REFS == pipelines.inputs("flux2", pipe, reference=images, prompt="swap the colours").ref_grids
    mr.check_maps(maps, mr.expected_maps(calls, LAYERS, 2, G, layout, PIPE_POINT, PIPE_PATCH), layout, PIPE_POINT,
                  PIPE_PATCH, TOL["torch"])


def test_klein_kv_pipeline_matches_float64(one_thread):
    """Flux2KleinKVPipeline: the references' K/V extracted at the first step, cached at the second."""
    pipe = t2.klein_pipeline(kv=True)
    n_ref = sum(h * w for h, w in t2.PIPE_REFS)
    maps, calls = mr.traced_against_untraced(pipe, klein_run(pipe, mr.images(t2.REFERENCE_SIZES)), transformer_flux2,
                                             keep=lambda q, k: q.shape[1] != n_ref, time_groups=G,
                                             points=[PIPE_POINT], patches=[PIPE_PATCH])
    assert len(calls) == 2 * len(LAYERS)
    text = torch.zeros(1, TEXT_TOKENS, 1)
    layout = cached_layout(t2.image_ids(t2.GRID, 0), text, None, n_ref, t2.PIPE_REFS)
    assert (layout.rows, layout.ref_keys, layout.segments["generated"]) == (slice(48, 72), slice(48, 84),
                                                                            slice(84, 108))
    assert maps.num_steps == 2 and maps.latent_size == t2.GRID and maps.references == t2.PIPE_REFS
    mr.check_maps(maps, mr.expected_maps(calls, LAYERS, 2, G, layout, PIPE_POINT, PIPE_PATCH), layout, PIPE_POINT,
                  PIPE_PATCH, TOL["torch"])
