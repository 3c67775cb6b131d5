"""i2am.trace on Qwen-Image-Edit-Plus: a tiny QwenImageTransformer2DModel called as
QwenImageEditPlusPipeline calls it, with two references of different grids, and that pipeline
itself. Every map of several references against float64 from the model's own q and k
(tests/multi_reference.py)."""
import pytest
import torch
from diffusers.models.transformers import transformer_qwenimage

import i2am
import multi_reference as mr
import tiny_qwen as tq
from i2am.integrations.qwenimage import token_layout
from i2am.kernels import triton_available

G = 2
POINT, PATCH = (1, 4), (1, 2, 3)
LAYERS = ("transformer_blocks.0.attn", "transformer_blocks.1.attn")
BACKENDS = ["torch"] + (["triton"] if triton_available(torch.device("cpu")) else [])
TIMESTEPS = [1.0, 0.7, 0.4]



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zero_cond_t", [False, True])  # Qwen-Image-Edit-2511 modulates the references apart
def test_edit_plus_maps_match_float64(backend, zero_cond_t):
    model, inputs = tq.transformer(zero_cond_t), tq.edit_plus_inputs(batch=2)
    layout = token_layout(inputs["img_shapes"], inputs["encoder_hidden_states"], inputs["hidden_states"])
    assert (layout.rows, layout.ref_keys, layout.text) == (slice(5, 29), slice(29, 60), 5)
    maps, calls = mr.traced_against_untraced(model, lambda: mr.run_steps(model, inputs, TIMESTEPS),
                                             transformer_qwenimage, num_steps=3, time_groups=G,
                                             points=[POINT], patches=[PATCH], backend=backend)
    assert set(maps.layers) == set(LAYERS) and maps.latent_size == tq.GRID and maps.references == tq.REFS
    exp = mr.expected_maps(calls, LAYERS, 3, G, layout, POINT, PATCH)
    mr.check_maps(maps, exp, layout, POINT, PATCH, dict(rtol=1e-4, atol=1e-7 if backend == "torch" else 1e-6))


def test_true_cfg_records_the_cond_pass_and_the_output_is_unchanged(tmp_path):
    model, inputs = tq.transformer(), tq.edit_plus_inputs(batch=1)
    negative = torch.randn_like(inputs["encoder_hidden_states"])
    with torch.no_grad():
        want_out = mr.run_steps(model, inputs, TIMESTEPS, negative)
        with i2am.trace(model, num_steps=3, patches=[PATCH]) as cond_only:
            mr.run_steps(model, inputs, TIMESTEPS)
        with i2am.trace(model, num_steps=3, patches=[PATCH]) as tc:
            got_out = mr.run_steps(model, inputs, TIMESTEPS, negative)
    for a, b in zip(got_out, want_out):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    maps, want = tc.maps(), cond_only.maps()
    for r in (None, 0, 1):
        torch.testing.assert_close(maps.generated(ref=r), want.generated(ref=r))
    for r in (0, 1):
        torch.testing.assert_close(maps.reference(ref=r), want.reference(ref=r))
    maps.save(tmp_path / "m.safetensors")
    back = i2am.AttributionMaps.load(tmp_path / "m.safetensors")
    assert back.references == tq.REFS
    for name, share in maps.sources(all_keys=True).items():
        torch.testing.assert_close(back.sources(all_keys=True)[name], share)
    torch.testing.assert_close(back.specific_generated(PATCH), maps.specific_generated(PATCH))
    torch.testing.assert_close(back.reference(ref=1), maps.reference(ref=1))


@pytest.mark.parametrize("change, message", [
    (dict(img_shapes=[[(1, 4, 6), (1, 4, 4), (1, 3, 4)]]), r"img_shapes \[\(1, 4, 6\), \(1, 4, 4\), \(1, 3, 4\)\] "
                                                          r"holds 52 image tokens, but hidden_states has 55"),
    (dict(img_shapes=[[(1, 4, 6)]], hidden_states=torch.zeros(1, 24, 16)), "has no reference image"),
    (dict(img_shapes=[[(2, 2, 6), (1, 4, 4), (1, 3, 5)]]), r"i2am reads \(1, rows, cols\) per image"),
])
def test_a_layout_it_cannot_read_is_an_error(change, message):
    model, inputs = tq.transformer(), {**tq.edit_plus_inputs(batch=1), **change}
    with pytest.raises(ValueError, match=message), torch.no_grad(), i2am.trace(model, num_steps=1):
        model(**inputs)
    assert not hasattr(transformer_qwenimage.dispatch_attention_fn, "__wrapped__")  # the original is back


def test_a_given_ref_grid_must_be_reference_0s_and_patches_are_checked():
    model, inputs = tq.transformer(), tq.edit_plus_inputs(batch=1)
    with pytest.raises(ValueError, match=r"ref_grid \(3, 5\) was given, but the model's first reference forms a "
                                         r"\(4, 4\) grid \(references: \[\(4, 4\), \(3, 5\)\]\)"):
        with torch.no_grad(), i2am.trace(model, num_steps=1, ref_grid=(3, 5)):
            model(**inputs)
    with pytest.raises(ValueError, match=r"patch \(1, 3, 0\) is off reference 1's grid 3x5"):
        with torch.no_grad(), i2am.trace(model, num_steps=1, patches=[(1, 3, 0)]):
            model(**inputs)
    with pytest.raises(ValueError, match=r"ref=2: the maps have 2 reference\(s\)"):
        with torch.no_grad(), i2am.trace(model, num_steps=1) as tc:
            model(**inputs)
        tc.maps().reference(ref=2)


def test_report_has_rows_per_reference_and_a_sources_figure(tmp_path):
    from PIL import Image

    from i2am.report import write_report

    model, inputs = tq.transformer(), tq.edit_plus_inputs(batch=1)
    with torch.no_grad(), i2am.trace(model, num_steps=3, time_groups=G, points=[POINT], patches=[PATCH]) as tc:
        mr.run_steps(model, inputs, TIMESTEPS)
    refs = [Image.new("RGB", (16 * w, 16 * h), "gray") for h, w in tq.REFS]
    write_report(tmp_path, tc.maps(), image=Image.new("RGB", (96, 64), "white"), reference=refs)
    names = {p.name for p in tmp_path.glob("*.png")}
    assert {"overview.png", "by_time.png", "by_head.png", "sources.png", "specific_generated_patch_1_2_3.png",
            "specific_reference_point_1_4.png"} <= names
    assert "| references | [[4, 4], [3, 5]] |" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="1 reference images for the 2 references"):
        write_report(tmp_path / "again", tc.maps(), reference=refs[:1])


@pytest.mark.parametrize("true_cfg", [False, True])
def test_edit_plus_pipeline_matches_float64(one_thread, true_cfg):
    """QwenImageEditPlusPipeline itself, every component tiny and built in code (tests/tiny_qwen.py):
    two references of different grids, 2 steps, with and without true CFG (whose negative prompt's
    pass is not recorded); every map against float64 from the transformer's own q and k."""
    from i2am import pipelines

    pipe, images = tq.edit_plus_pipeline(), mr.images(tq.REFERENCE_SIZES)
    cfg = dict(negative_prompt="blurry", true_cfg_scale=4.0) if true_cfg else {}

    def run():
        return [pipe(image=images, prompt="swap the colours", height=tq.PIPE_SIZE[0], width=tq.PIPE_SIZE[1],
                     num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent",
                     **cfg).images]
    maps, calls = mr.traced_against_untraced(pipe, run, transformer_qwenimage, time_groups=G, points=[POINT],
                                             patches=[PATCH])
    passes = 1 + true_cfg  # the cond pass, then the negative prompt's
    assert len(calls) == 2 * passes * len(LAYERS)
    calls = mr.first_passes(calls, len(LAYERS), passes)
    layout = mr.joint_layout(calls[0][0].shape[1], tq.GRID, tq.PIPE_REFS)
    assert layout.text > 0 and maps.num_steps == 2 and maps.latent_size == tq.GRID
    assert maps.references == tq.PIPE_REFS == pipelines.inputs("qwen-image-edit-plus", pipe, reference=images,
                                                               prompt="swap the colours").ref_grids
    exp = mr.expected_maps(calls, LAYERS, 2, G, layout, POINT, PATCH)
    mr.check_maps(maps, exp, layout, POINT, PATCH, dict(rtol=1e-4, atol=1e-7))
