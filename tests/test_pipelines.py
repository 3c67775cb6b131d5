"""i2am.pipelines: the README's Python run equals `i2am run`; `i2am eval` loads its model once;
the input rules name arguments as Python keywords, and as options under the command."""
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from i2am import AttributionMaps, pipelines
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
    with pytest.raises(InputError, match="flux-kontext edits reference and takes no image"):
        pipelines.read("flux-kontext", **flux)
    with pytest.raises(InputError, match="protocol official is not defined for flux-kontext"):
        pipelines.check_protocols_of("flux-kontext", ["official"])
    with pytest.raises(InputError, match="unknown pipeline 'sdxl'"):
        pipelines.load("sdxl", tmp_path)
