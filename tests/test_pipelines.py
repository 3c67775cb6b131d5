"""i2am.pipelines: the README's Python run equals `i2am run`; `i2am eval` loads its model once;
the input rules name arguments as Python keywords, and as options under the command."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from i2am import AttributionMaps, TraceConfig, generation, pipelines
from i2am.inputs import InputError, command_line_spelling
from test_cli import cli, inputs, save_png, tiny_pipeline  # noqa: F401 (fixtures)

README = Path(__file__).parents[1] / "README.md"
STEPS = 3


def readme_run():
    """The README's Python equivalent of `i2am run`."""
    text = README.read_text()
    return re.search(r"The same run from Python.*?```python\n(.*?)```", text, re.S).group(1)


@pytest.mark.slow
def test_readme_python_run_equals_i2am_run(capsys, monkeypatch, inputs, tiny_pipeline, tmp_path):  # noqa: F811
    code = readme_run()
    assert code.count("\n") <= 10 and "num_inference_steps=50" in code
    work = tmp_path / "work"
    work.mkdir()
    for name, given in (("img.png", inputs["image"]), ("mask.png", inputs["mask"]),
                        ("ref.png", inputs["reference"]), ("my-model", tiny_pipeline)):
        os.symlink(given, work / name)
    monkeypatch.chdir(work)
    exec(code.replace("num_inference_steps=50", f"num_inference_steps={STEPS}"), {})
    status, _, err = cli(capsys, "run", "--pipeline", "sd-inpaint-patch", "--model", "./my-model", "--image",
                         "img.png", "--mask", "mask.png", "--reference", "ref.png", "--points", "3,4",
                         "--steps", STEPS, "--time-groups", 1, "--out", "cli")
    assert status == 0, err
    python, command = work / "report", work / "cli"
    assert (python / "generated.png").read_bytes() == (command / "generated.png").read_bytes()
    assert (python / "reference.png").read_bytes() == (command / "reference.png").read_bytes()
    ours, theirs = (AttributionMaps.load(d / "maps.safetensors") for d in (python, command))
    assert ours.ref_grid == theirs.ref_grid == (4, 4) and ours.num_steps == STEPS
    np.testing.assert_array_equal(ours.generated().numpy(), theirs.generated().numpy())
    np.testing.assert_array_equal(ours.specific_reference((3, 4)).numpy(), theirs.specific_reference((3, 4)).numpy())
    scores = [json.loads((d / "scores.json").read_text())["IMACS_g"] for d in (python, command)]
    assert scores[0] == scores[1]
    # the command's work in one call: the same report; an image given as an object is not recorded
    generation.run_report("sd-inpaint-patch", "./my-model", "call", TraceConfig(time_groups=1, points=[(3, 4)]),
                          image=Image.open("img.png"), mask="mask.png", reference="ref.png", steps=STEPS)
    assert (work / "call" / "generated.png").read_bytes() == (command / "generated.png").read_bytes()
    called, ran = (json.loads((d / "scores.json").read_text())["settings"] for d in (work / "call", command))
    assert ran.pop("image") == "img.png" and called == ran and ran["guidance"] == 5.0


@pytest.mark.slow
def test_eval_loads_the_pipeline_once(capsys, monkeypatch, inputs, tiny_pipeline, tmp_path):  # noqa: F811
    from diffusers import StableDiffusionInpaintPipeline

    loads, original = [], StableDiffusionInpaintPipeline.from_pretrained
    monkeypatch.setattr(StableDiffusionInpaintPipeline, "from_pretrained",
                        lambda *args, **kwargs: loads.append(args[0]) or original(*args, **kwargs))
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"s{i}", "image": str(inputs["image"]), "mask": str(inputs["mask"]),
                                            "reference": str(inputs["reference"])}) + "\n" for i in range(3)))
    code, _, err = cli(capsys, "eval", "--pipeline", "sd-inpaint-patch", "--model", tiny_pipeline, "--data", manifest,
                       "--steps", 1, "--time-groups", 1, "--out", tmp_path / "eval")
    assert code == 0, err
    done = [json.loads(line)["id"] for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert sorted(done) == ["s0", "s1", "s2"] and loads == [str(tiny_pipeline)]  # one load, not one per sample


def test_input_errors_name_keywords_and_under_the_command_options(inputs, tmp_path):  # noqa: F811
    wrong_size = save_png(tmp_path / "small.png", np.full((8, 8), 255))
    cases = [(dict(image=None), "the sd-inpaint-patch pipeline needs image", "needs --image"),
             (dict(mask=wrong_size), "mask is 8x8 but image is 24x16", "--mask is 8x8 but --image is 24x16"),
             (dict(ref_mask=wrong_size), "ref_mask is 8x8 but reference is 12x20", "--ref-mask is 8x8 but --reference"),
             (dict(prompt="a shirt"), "takes no prompt", "takes no --prompt")]
    for change, python, command in cases:
        given = {"image": inputs["image"], "mask": inputs["mask"], "reference": inputs["reference"], **change}
        with pytest.raises(InputError, match=python):
            pipelines.read("sd-inpaint-patch", **given)
        with command_line_spelling(), pytest.raises(InputError, match=command):
            pipelines.read("sd-inpaint-patch", **given)
    flux = dict(reference=Image.new("RGB", (24, 16)), image=inputs["image"])
    with pytest.raises(InputError, match="the flux-kontext pipeline takes no image: it edits its reference"):
        pipelines.read("flux-kontext", **flux)
    with pytest.raises(InputError, match="protocol official is not defined for flux-kontext"):
        pipelines.check_protocols_of("flux-kontext", ["official"])
    with pytest.raises(InputError, match="unknown pipeline 'sdxl'"):
        pipelines.load("sdxl", tmp_path)


# ---- several references: qwen-image-edit-plus, flux2 ---------------------------------------------
def _stub_pipe(kind):
    """The parts of QwenImageEditPlusPipeline / Flux2Pipeline that pipelines.inputs reads: the VAE
    scale factor (8) and the pipeline's own image processor."""
    from types import SimpleNamespace

    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

    processor = (Flux2ImageProcessor if kind == "flux2" else VaeImageProcessor)(vae_scale_factor=16)
    return SimpleNamespace(vae_scale_factor=8, image_processor=processor, dtype=None,
                           set_progress_bar_config=lambda **kwargs: None)


@pytest.fixture
def two_references(tmp_path):
    Image.new("RGB", (100, 70), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (50, 90), (10, 10, 200)).save(tmp_path / "b.png")
    return [tmp_path / "a.png", tmp_path / "b.png"]


def test_flux2_inputs_of_two_references(two_references):
    """Each reference as Flux2Pipeline's processor crops it to multiples of 16; the output takes
    the first's size; the call gets every reference, ref 0 first."""
    x = pipelines.inputs("flux2", _stub_pipe("flux2"), reference=two_references, prompt="swap the colours")
    assert [im.size for im in x.reference] == [(96, 64), (48, 80)]
    assert x.ref_grids == ((4, 6), (5, 3)) and x.ref_grid == (4, 6) and x.latent_size == (4, 6)
    assert [im.size for im in x.call["image"]] == [(100, 70), (50, 90)]
    assert (x.call["height"], x.call["width"], x.call["prompt"]) == (64, 96, "swap the colours")
    assert x.mask is None and x.ref_mask is None


def test_qwen_image_edit_plus_inputs_of_two_references(two_references):
    """Each reference at about 1024x1024 pixels, sides multiples of 32; the output takes the last's
    shape."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    x = pipelines.inputs("qwen-image-edit-plus", _stub_pipe("qwen"), reference=two_references, prompt="swap")
    sizes = [calculate_dimensions(1024 * 1024, w / h) for w, h in ((100, 70), (50, 90))]
    assert [im.size for im in x.reference] == sizes
    assert x.ref_grids == tuple((h // 16, w // 16) for w, h in sizes)
    assert x.latent_size == x.ref_grids[1] and (x.call["width"], x.call["height"]) == sizes[1]
    assert len(x.call["image"]) == 2


def test_one_reference_pipelines_refuse_a_second_and_editors_take_no_image(inputs, two_references):  # noqa: F811
    with pytest.raises(InputError, match="the paint-by-example pipeline takes one reference, got 2; pipelines of "
                                         "several references: qwen-image-edit-plus, flux2"):
        pipelines.read("paint-by-example", image=inputs["image"], mask=inputs["mask"], reference=two_references)
    with pytest.raises(InputError, match="reference is empty"):
        pipelines.read("flux2", reference=[])
    with pytest.raises(InputError, match="the flux2 pipeline takes no image: it edits its reference"):
        pipelines.read("flux2", reference=two_references, image=inputs["image"], prompt="swap")
    one = pipelines.read("paint-by-example", image=inputs["image"], mask=inputs["mask"],
                         reference=[inputs["reference"]])
    assert one["reference"].size == (12, 20)  # a list of one is that reference


def test_run_passes_every_reference_and_r_i_j_patches(capsys, monkeypatch, two_references, tmp_path):
    """`i2am run --pipeline flux2 --reference a --reference b --patches 1,2,1 0,3`: the loader gets
    the model, the traced call every reference, the trace the patches, the report every reference
    as the model saw it; a patch off its reference's grid is refused before the run."""
    from dataclasses import replace
    from types import SimpleNamespace

    from i2am import generation

    loaded, traced, reported = [], [], []
    monkeypatch.setitem(pipelines.KINDS, "flux2", replace(
        pipelines.KINDS["flux2"], load=lambda model, device, dtype: loaded.append(model) or _stub_pipe("flux2")))

    def run_traced(pipe, call, config, seed=0):
        traced.append((call, config))
        return SimpleNamespace(write_report=lambda out, **options: reported.append(options) or {})
    monkeypatch.setattr(generation, "run_traced", run_traced)
    common = ["run", "--pipeline", "flux2", "--model", "./flux2", "--reference", two_references[0], "--reference",
              two_references[1], "--prompt", "swap", "--steps", 2, "--time-groups", 1, "--out", tmp_path / "out"]
    status, _, err = cli(capsys, *common, "--patches", "1,2,1", "0,3")
    assert status == 0 and loaded == ["./flux2"], err
    (call, config), = traced
    assert [im.size for im in call["image"]] == [(100, 70), (50, 90)] and call["prompt"] == "swap"
    (report,) = reported
    assert [im.size for im in report["reference"]] == [(96, 64), (48, 80)]
    assert report["settings"]["reference"] == [str(r) for r in two_references]
    assert config.patches == ((1, 2, 1), (0, 0, 3)) and config.ref_grid == (4, 6)
    status, _, err = cli(capsys, *common, "--patches", "1,5,0")
    assert status == 2 and "patch (1, 5, 0) is off reference 1's grid 5x3" in err and len(traced) == 1
    status, _, err = cli(capsys, *common, "--patches", "2,0,0")
    assert status == 2 and "reference 2 does not exist" in err
    with pytest.raises(SystemExit) as exit_:
        cli(capsys, *common, "--patches", "1,2,3,4")
    assert exit_.value.code == 2 and "is not [ref,]row,col (2 or 3 integers" in capsys.readouterr().err
    status, _, err = cli(capsys, "run", "--pipeline", "paint-by-example", "--model", "./m", "--image",
                         two_references[0], "--mask", two_references[0], "--reference", two_references[0],
                         "--reference", two_references[1], "--out", tmp_path / "o2")
    assert status == 2 and "takes one --reference, got 2" in err and not (tmp_path / "o2").exists()
