"""`i2am eval` of the reference editors (flux-kontext, qwen-image-edit-plus, flux2): manifests of
references and edit instructions under the pipelines' own sample rules, IMACS per reference,
ground truths framed as the output, and the real images of FID and KID."""
import json
import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_flux2
import tiny_models
from i2am import AttributionMaps, pipelines
from i2am.evaluation import load_dataset
from i2am.evaluation.datasets import DatasetError
from i2am.evaluation.metrics import ssim
from i2am.evaluation.tasks import as_uint8
from i2am.inputs import InputError, command_line_spelling
from test_cli import cli, save_png
from test_flux_cli import kontext_model  # noqa: F401 (fixture)
from test_pipelines import _stub_pipe


def box(path, size, left, top, right, bottom, rgb=False):
    """A white box on black, size (width, height), as a mask (or an RGB image) file."""
    m = np.zeros((size[1], size[0]), np.uint8)
    m[top:bottom, left:right] = 255
    save_png(path, np.stack([m] * 3, -1) if rgb else m)
    return path


def manifest(path, *samples):
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    return path


def records(out):
    return {r["id"]: r for r in map(json.loads, (out / "samples.jsonl").read_text().splitlines())}


@pytest.fixture
def files(tmp_path):
    tiny_models.image(1, (24, 16)).save(tmp_path / "photo.png")
    tiny_models.image(2, (24, 16)).save(tmp_path / "other.png")
    box(tmp_path / "edit.png", (24, 16), 8, 4, 20, 12)
    return tmp_path


# ---- the manifest -------------------------------------------------------------------------------
def test_editor_manifests_follow_the_pipeline_s_sample_rules(files):
    edit = {"reference": "photo.png", "prompt": "a red hat"}
    inpaint = {"image": "photo.png", "mask": "edit.png", "reference": "other.png"}
    (sample,) = load_dataset(manifest(files / "d.jsonl", edit), "flux-kontext")
    assert (sample.id, sample.image, sample.mask, sample.prompt) == ("photo", None, None, "a red hat")
    assert sample.real is None  # an editor's real image is its ground truth: none here
    # without its own prompt a sample takes the default one (the task's), given here
    (sample,) = load_dataset(manifest(files / "d.jsonl", {"reference": ["other.png"]}), "flux2", prompt="a hat")
    assert (sample.id, sample.prompt, sample.reference) == ("other", "", [files / "other.png"])
    (sample,) = load_dataset(manifest(files / "d.jsonl", {**edit, "ground_truth": "other.png"}), "flux-kontext")
    assert sample.real == files / "other.png"
    (sample,) = load_dataset(manifest(files / "d.jsonl", {**inpaint, "ground_truth": "other.png"}), "sd-inpaint-patch")
    assert sample.real == files / "photo.png"  # an inpainting sample's real image stays its image
    cases = [
        ("flux-kontext", {**edit, "image": "photo.png"},
         '"image" is not an input of the flux-kontext pipeline: it edits its reference'),
        ("flux2", {"reference": ["photo.png", "other.png"]},
         "lacks prompt (the edit instruction), which the flux2 pipeline needs; or a default prompt (--prompt)"),
        ("qwen-image-edit-plus", {**edit, "prompt": ""}, "lacks prompt (the edit instruction)"),
        ("sd-inpaint-patch", {"reference": "photo.png"},
         "lacks image (the image to inpaint), mask (the region to fill, white), which the sd-inpaint-patch"),
        ("paint-by-example", {**inpaint, "prompt": "a hat"},
         '"prompt" is not an input of the paint-by-example pipeline: its reference replaces the text'),
        ("flux2", {**edit, "reference": ["photo.png", "other.png"], "ref_mask": "edit.png"},
         "ref_mask must be a list like reference, one path or null per reference (ref 0 first; 2 here)"),
        ("flux2", {**edit, "reference": ["photo.png", "other.png"], "ref_mask": [None]}, "ref_mask must be a list"),
        ("flux-kontext", {**edit, "ref_mask": ["edit.png"]}, "ref_mask must be a path (reference is one path)"),
        ("flux-kontext", {**edit, "prompt": 3}, "prompt must be a text, got 3"),
        ("flux-kontext", {**edit, "mask": "nope.png"}, "mask file not found"),
        ("flux2", {**edit, "reference": ["photo.png", "other.png"], "ref_mask": [None, "nope.png"]},
         "ref_mask 1 file not found"),
    ]
    valid = {kind: inpaint if kind in ("sd-inpaint-patch", "paint-by-example") else edit for kind, _, _ in cases}
    for kind, line, message in cases:
        with pytest.raises(DatasetError, match=re.escape(f"d.jsonl, line 2: {message}")):
            load_dataset(manifest(files / "d.jsonl", {**valid[kind], "id": "ok"}, line), kind)
    with pytest.raises(DatasetError, match="the flux2 pipeline edits its references: describe its samples in a "
                                           ".jsonl manifest"):
        load_dataset(files, "flux2")


def test_eval_refuses_a_bad_editor_manifest_before_loading_the_model(capsys, files):
    bad = manifest(files / "d.jsonl", {"reference": "photo.png", "prompt": "a hat", "image": "other.png"})
    code, _, err = cli(capsys, "eval", "--pipeline", "flux-kontext", "--model", files / "no-model", "--data", bad,
                       "--out", files / "out")
    assert code == 2 and 'line 1: "image" is not an input of the flux-kontext pipeline' in err
    code, _, err = cli(capsys, "run", "--pipeline", "flux-kontext", "--model", files / "no-model", "--reference",
                       files / "photo.png", "--out", files / "report")
    assert code == 2 and "the flux-kontext pipeline needs --prompt (the edit instruction)" in err


# ---- the inputs: the edited region, the references' masks and the ground truth ------------------
@pytest.fixture
def editing(tmp_path):
    """Two references (100x70 and 50x90), each an RGB white box, and each box as a mask."""
    return {"refs": [box(tmp_path / "a.png", (100, 70), 10, 20, 60, 50, rgb=True),
                     box(tmp_path / "b.png", (50, 90), 5, 30, 40, 80, rgb=True)],
            "masks": [box(tmp_path / "a_mask.png", (100, 70), 10, 20, 60, 50),
                      box(tmp_path / "b_mask.png", (50, 90), 5, 30, 40, 80)]}


def seen_box(image):
    """The white box of a reference as the model saw it, as a 0/1 mask."""
    return torch.from_numpy(np.asarray(image.convert("L")) > 127)


@pytest.mark.parametrize("kind,output_of", [("flux2", 0), ("qwen-image-edit-plus", 1)])
def test_editor_masks_and_ground_truth_are_fitted_as_their_references(editing, kind, output_of):
    """The mask (the edited region) and the ground truth take the frame of the reference the output
    is shaped after (flux2: ref 0, cropped to multiples of 16; qwen: the last, resized to about
    1024x1024), each ref_mask its reference's: a mask drawn on a reference marks the same pixels
    of it as the model saw it."""
    refs, masks = editing["refs"], editing["masks"]
    x = pipelines.inputs(kind, _stub_pipe(kind), reference=refs, prompt="swap", mask=masks[output_of],
                         ref_mask=[None, masks[1]], ground_truth=refs[output_of])
    out = x.reference[output_of]
    assert (x.call["width"], x.call["height"]) == out.size and x.mask.shape == (out.height, out.width)
    assert torch.equal(x.mask.bool(), seen_box(out)) and 0 < x.mask.mean() < 1
    assert x.ref_mask[0] is None and torch.equal(x.ref_mask[1].bool(), seen_box(x.reference[1]))
    assert x.ground_truth.size == out.size and np.array_equal(np.asarray(x.ground_truth), np.asarray(out))
    if kind == "flux2":
        assert [im.size for im in x.reference] == [(96, 64), (48, 80)]


def test_editor_input_errors(editing):
    refs, masks = editing["refs"], editing["masks"]
    qwen = dict(reference=refs, prompt="swap")
    with pytest.raises(InputError, match="mask is 100x70 but reference 1 is 50x90: they must be the same size"):
        pipelines.read("qwen-image-edit-plus", **qwen, mask=masks[0])  # qwen's output takes the last one's frame
    with pytest.raises(InputError, match="ground_truth is 50x90 but reference 0 is 100x70"):
        pipelines.read("flux2", **qwen, ground_truth=refs[1])
    with pytest.raises(InputError, match="ref_mask gives 1 mask"):
        pipelines.read("flux2", **qwen, mask=masks[0], ref_mask=masks[1])
    with pytest.raises(InputError, match="ref_mask 0 is 50x90 but reference 0 is 100x70"):
        pipelines.read("flux2", **qwen, mask=masks[0], ref_mask=[masks[1], None])
    with pytest.raises(InputError, match="ref_mask gives IMACS_r, which needs mask"):
        pipelines.read("flux2", **qwen, ref_mask=[None, masks[1]])
    with pytest.raises(InputError, match=r"the flux-kontext pipeline needs prompt \(the edit instruction\)"):
        pipelines.read("flux-kontext", reference=refs[0])
    with command_line_spelling(), pytest.raises(InputError, match="--ref-mask 1 is 100x70 but --reference 1"):
        pipelines.read("flux2", **qwen, mask=masks[0], ref_mask=[None, masks[0]])


# ---- i2am eval end to end --------------------------------------------------------------------------
class Recorded(tiny_flux2.Pipeline):
    """The stand-in Flux2Pipeline, keeping each call's prompt."""

    def __init__(self):
        super().__init__()
        self.prompts = []

    def __call__(self, **call):
        self.prompts.append(call["prompt"])
        return super().__call__(**call)


@pytest.mark.slow
def test_eval_of_flux2_scores_each_reference(capsys, monkeypatch, tmp_path):
    """A two-sample flux2 manifest, the second with two references: one load, each sample's own
    prompt or the default, IMACS of each reference (its maps against the masks as the model saw
    them), SSIM against the fitted ground truth; `i2am run` of the same samples scores alike."""
    loaded = []
    monkeypatch.setitem(pipelines.KINDS, "flux2", replace(
        pipelines.KINDS["flux2"], load=lambda model, device, dtype: loaded.append(Recorded()) or loaded[-1]))
    tiny_models.image(3, (96, 64)).save(tmp_path / "person.png")
    tiny_models.image(4, (48, 80)).save(tmp_path / "shirt.png")
    tiny_models.image(5, (96, 64)).save(tmp_path / "truth.png")
    box(tmp_path / "edit.png", (96, 64), 32, 16, 80, 48)
    box(tmp_path / "person_mask.png", (96, 64), 16, 0, 64, 64)
    box(tmp_path / "shirt_mask.png", (48, 80), 8, 16, 40, 64)
    data = manifest(tmp_path / "d.jsonl",
                    {"id": "one", "reference": "person.png", "mask": "edit.png", "ref_mask": "person_mask.png"},
                    {"id": "two", "reference": ["person.png", "shirt.png"], "prompt": "the person wears the shirt",
                     "mask": "edit.png", "ref_mask": [None, "shirt_mask.png"], "ground_truth": "truth.png"})
    common = ["--pipeline", "flux2", "--model", "./flux2", "--steps", 2, "--time-groups", 1]
    out = tmp_path / "eval"
    code, stdout, err = cli(capsys, "eval", *common, "--data", data, "--prompt", "a hat", "--save-maps", "--out", out)
    assert code == 0, err
    (pipe,) = loaded  # one load for every sample
    assert pipe.prompts == ["a hat", "the person wears the shirt"]  # the sample's own prompt wins
    rows = records(out)
    one, two = rows["one"]["scores"]["paper"], rows["two"]["scores"]["paper"]
    assert set(one) == {"IMACS_g", "IMACS_r"} and set(two) == {"IMACS_g", "IMACS_g_ref1", "IMACS_r_ref1"}
    maps = AttributionMaps.load(out / "samples" / "two.paper.safetensors")
    assert maps.references == ((4, 6), (5, 3)) and maps.mask is not None
    shirt_mask = seen_box(Image.open(tmp_path / "shirt_mask.png"))  # 48x80: the model saw it as it is
    assert two["IMACS_g"] == maps.imacs(ref=0)["gen"] and two["IMACS_g_ref1"] == maps.imacs(ref=1)["gen"]
    assert two["IMACS_r_ref1"] == maps.imacs(ref_mask=shirt_mask.float(), ref=1)["ref"]
    assert two["IMACS_g"] != two["IMACS_g_ref1"]
    assert "SSIM" not in rows["one"]
    truth = as_uint8(tmp_path / "truth.png")
    assert rows["two"]["SSIM"] == pytest.approx(ssim(as_uint8(out / "samples" / "two.png"), truth))
    summary = json.loads((out / "summary.json").read_text())
    assert "FID and KID left out: 1 of 2 samples have no real image" in summary["left_out"][-1]
    assert summary["protocols"]["paper"]["IMACS_g_ref1"] == two["IMACS_g_ref1"]  # the one sample that has it
    assert "IMACS_g_ref1 (paper) ↑" in (out / "summary.md").read_text()
    runs = {"one": ["--reference", tmp_path / "person.png", "--prompt", "a hat", "--ref-mask",
                    tmp_path / "person_mask.png", "--seed", 0],
            "two": ["--reference", tmp_path / "person.png", "--reference", tmp_path / "shirt.png", "--prompt",
                    "the person wears the shirt", "--seed", 1]}  # run takes one --ref-mask: none for two refs
    for sample, extra in runs.items():
        report = tmp_path / f"run_{sample}"
        code, _, err = cli(capsys, "run", *common, "--mask", tmp_path / "edit.png", *extra, "--out", report)
        assert code == 0, err
        scores = json.loads((report / "scores.json").read_text())
        expected = {k: v for k, v in rows[sample]["scores"]["paper"].items() if not k.startswith("IMACS_r_ref")}
        assert {k: v for k, v in scores.items() if k.startswith("IMACS")} == expected
        assert (report / "generated.png").read_bytes() == (out / "samples" / f"{sample}.png").read_bytes()


@pytest.mark.slow
def test_eval_of_flux_kontext_scores_as_i2am_run(capsys, monkeypatch, kontext_model, tmp_path):  # noqa: F811
    """The tiny FLUX.1 Kontext pipeline end to end: a sample with its prompt, masks and ground truth
    and one with the default prompt, loaded once, each scored as `i2am run` scores it."""
    from diffusers import FluxKontextPipeline

    loads, original = [], FluxKontextPipeline.from_pretrained
    monkeypatch.setattr(FluxKontextPipeline, "from_pretrained",
                        lambda *args, **kwargs: loads.append(args[0]) or original(*args, **kwargs))
    tiny_models.image(1, (24, 16)).save(tmp_path / "photo.png")
    tiny_models.image(2, (24, 16)).save(tmp_path / "other.png")
    tiny_models.image(3, (24, 16)).save(tmp_path / "truth.png")
    box(tmp_path / "edit.png", (24, 16), 8, 4, 20, 12)
    box(tmp_path / "ref_mask.png", (24, 16), 4, 0, 16, 16)
    data = manifest(tmp_path / "d.jsonl",
                    {"id": "a", "reference": "photo.png", "prompt": "a red hat", "mask": "edit.png",
                     "ref_mask": "ref_mask.png", "ground_truth": "truth.png"},
                    {"id": "b", "reference": "other.png", "mask": "edit.png"})
    common = ["--pipeline", "flux-kontext", "--model", kontext_model, "--steps", 2, "--time-groups", 2]
    out = tmp_path / "eval"
    code, stdout, err = cli(capsys, "eval", *common, "--data", data, "--prompt", "a blue hat", "--seed", 5,
                            "--out", out)
    assert code == 0, err
    assert loads == [str(kontext_model)]
    assert "FID and KID left out: 1 of 2 samples have no real image" in stdout
    rows = records(out)
    assert set(rows["a"]["scores"]["paper"]) == {"IMACS_g", "IMACS_r"}
    assert rows["a"]["SSIM"] == pytest.approx(ssim(as_uint8(out / "samples" / "a.png"), as_uint8(tmp_path / "truth.png")))
    assert set(rows["b"]["scores"]["paper"]) == {"IMACS_g"} and "SSIM" not in rows["b"]
    runs = {"a": ["--reference", tmp_path / "photo.png", "--prompt", "a red hat", "--ref-mask",
                  tmp_path / "ref_mask.png", "--seed", 5],
            "b": ["--reference", tmp_path / "other.png", "--prompt", "a blue hat", "--seed", 6]}
    for sample, extra in runs.items():
        report = tmp_path / f"run_{sample}"
        code, _, err = cli(capsys, "run", *common, "--mask", tmp_path / "edit.png", *extra, "--out", report)
        assert code == 0, err
        scores = json.loads((report / "scores.json").read_text())
        assert {k: v for k, v in scores.items() if k.startswith("IMACS")} == rows[sample]["scores"]["paper"]
        assert (report / "generated.png").read_bytes() == (out / "samples" / f"{sample}.png").read_bytes()
