"""The `i2am` command: help, exit codes, `show` on saved maps, `run` end to end on a tiny pipeline."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from i2am import AttributionMaps, report
from i2am.cli import main
from test_viz import gradient_image, tiny_maps

IMAGE_SIZE, LATENT, REF_GRID = 16, 8, 4  # the tiny pipeline: VAE scale factor 2, 16 px reference patches of 4


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def save_png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def inputs(tmp_path):
    """Image, inpainting mask, reference and reference mask files for the tiny pipeline."""
    rng = np.random.default_rng(0)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE))
    mask[4:12, 6:14] = 255
    ref_mask = np.zeros((20, 12))
    ref_mask[5:15, 2:9] = 255
    return {"image": save_png(tmp_path / "image.png", rng.integers(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3))),
            "mask": save_png(tmp_path / "mask.png", mask),
            "reference": save_png(tmp_path / "reference.png", rng.integers(0, 256, (20, 12, 3))),
            "ref_mask": save_png(tmp_path / "ref_mask.png", ref_mask)}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """An sd-inpaint-patch model: StableDiffusionInpaintPipeline (9-channel UNet, DDIM) whose
    image_encoder is a tiny CLIPVisionModel (CLS + 4x4 patch tokens), saved with save_pretrained."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionInpaintPipeline, UNet2DConditionModel
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=LATENT, in_channels=9, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)
    encoder = CLIPVisionModel(CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=IMAGE_SIZE // REF_GRID,
                                               hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2))
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    pipe = StableDiffusionInpaintPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                          scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=processor,
                                          image_encoder=encoder, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("tiny-sd-inpaint-patch")
    pipe.save_pretrained(folder)
    return folder


def run_args(inputs, model, out, *extra):
    return ["run", "--pipeline", "sd-inpaint-patch", "--model", model, "--image", inputs["image"],
            "--mask", inputs["mask"], "--reference", inputs["reference"], "--steps", 4, "--time-groups", 2,
            "--out", out, *extra]


# ---- help, placeholders, entry point ----------------------------------------------------------
@pytest.mark.parametrize("command", ["demo", "run", "show", "bench"])
def test_help_of_each_command_has_examples(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert f"i2am {command}" in capsys.readouterr().out.split("examples:")[1]


def test_entry_point_module():
    done = subprocess.run([sys.executable, "-m", "i2am.cli", "bench"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "not yet available (issue 8)" in done.stdout


def test_demo_placeholder_until_the_demo_provides_run_demo(capsys, monkeypatch):
    demo = pytest.importorskip("i2am.demo")
    monkeypatch.delattr(demo, "run_demo", raising=False)
    code, out, _ = cli(capsys, "demo")
    assert code == 0 and "not yet available" in out


def test_demo_calls_run_demo(capsys, monkeypatch, tmp_path):
    demo = pytest.importorskip("i2am.demo")
    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append(kw) or 0, raising=False)
    code, _, _ = cli(capsys, "demo", "--out", tmp_path, "--backend", "torch")
    assert code == 0 and calls == [{"out": str(tmp_path), "device": None, "backend": "torch"}]


# ---- show -------------------------------------------------------------------------------------
def test_show_reproduces_the_report_figures(capsys, tmp_path):
    maps = tiny_maps()
    ref_mask = torch.zeros(32, 24)
    ref_mask[4:20, 6:18] = 1
    first, again = tmp_path / "run", tmp_path / "shown"
    scores = report.write_report(first, maps, image=gradient_image(32, 32), reference=gradient_image(32, 24),
                                 ref_mask=ref_mask)
    mask_file = save_png(tmp_path / "ref_mask.png", ref_mask.numpy() * 255)
    code, out, _ = cli(capsys, "show", first / "maps.safetensors", "--image", first / "generated.png",
                       "--reference", first / "reference.png", "--ref-mask", mask_file, "--out", again)
    assert code == 0 and "IMACS_g" in out
    figures = sorted(p.name for p in first.glob("*.png"))
    assert len(figures) == 8 and figures == sorted(p.name for p in again.glob("*.png"))
    for name in figures:
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    shown = json.loads((again / "scores.json").read_text())
    assert shown["IMACS_g"] == scores["IMACS_g"] and shown["IMACS_r"] == scores["IMACS_r"]


def test_show_without_images(capsys, tmp_path):
    tiny_maps().save(tmp_path / "maps.safetensors")
    code, _, _ = cli(capsys, "show", tmp_path / "maps.safetensors", "--out", tmp_path / "figures")
    assert code == 0 and (tmp_path / "figures" / "specific_reference_point_3_4.png").is_file()


def test_show_bad_arguments_exit_2(capsys, tmp_path):
    tiny_maps().save(tmp_path / "maps.safetensors")
    not_maps = save_png(tmp_path / "picture.png", np.zeros((4, 4)))
    code, _, err = cli(capsys, "show", tmp_path / "missing.safetensors", "--out", tmp_path / "o")
    assert code == 2 and "maps file not found" in err
    code, _, err = cli(capsys, "show", not_maps, "--out", tmp_path / "o")
    assert code == 2 and "cannot read maps" in err
    code, _, err = cli(capsys, "show", tmp_path / "maps.safetensors", "--image", tmp_path / "nope.png",
                       "--out", tmp_path / "o")
    assert code == 2 and "--image file not found" in err
    code, _, err = cli(capsys, "show", tmp_path / "maps.safetensors", "--reference", not_maps,
                       "--ref-mask", save_png(tmp_path / "m.png", np.eye(5) * 255), "--out", tmp_path / "o")
    assert code == 2 and "--ref-mask is 5x5 but --reference is 4x4" in err


# ---- run: argument errors ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", [["--points", "1"], ["--boxes", "1,2,3"], ["--steps", "0"], ["--pipeline", "sdxl"],
                                 ["--time-groups", "x"]])
def test_run_argparse_errors_exit_2(capsys, inputs, tmp_path, bad):
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in run_args(inputs, tmp_path, tmp_path / "out")] + bad)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_run_usage_errors_exit_2(capsys, inputs, tmp_path):
    wrong_size = save_png(tmp_path / "small_mask.png", np.full((8, 8), 255))
    empty = save_png(tmp_path / "empty_mask.png", np.zeros((IMAGE_SIZE, IMAGE_SIZE)))
    cases = [
        (dict(image=tmp_path / "missing.png"), [], "--image file not found"),
        (dict(mask=wrong_size), [], "--mask is 8x8 but --image is 16x16"),
        (dict(mask=empty), [], "--mask is empty"),
        (dict(), ["--ref-mask", wrong_size], "--ref-mask is 8x8 but --reference is 12x20"),
        (dict(), ["--time-groups", 5], "--time-groups 5 is more than the 4 --steps"),
        (dict(), ["--model", tmp_path / "no" / "such" / "folder"], "model folder not found"),
        (dict(), ["--model", "i2am-tests/no-such-model"], "local Hugging Face cache"),
    ]
    for files, extra, message in cases:
        code, _, err = cli(capsys, *run_args({**inputs, **files}, tmp_path, tmp_path / "out"), *extra)
        assert code == 2 and message in err, (message, err)
    code, _, err = cli(capsys, *[a if a != "sd-inpaint-patch" else "ip-adapter" for a in run_args(inputs, tmp_path, tmp_path)])
    assert code == 2 and "needs --ip-adapter FILE" in err


@pytest.mark.parametrize("probe, message", [
    (["--points", "8,0"], "point 8,0 is off the latent grid 8x8"),
    (["--boxes", "2,2,2,5"], "box 2,2,2,5 must satisfy"),
    (["--patches", "0,4"], "patch 0,4 is off the reference grid 4x4"),
])
def test_run_probe_off_the_grid_exits_2(capsys, inputs, tiny_pipeline, tmp_path, probe, message):
    code, _, err = cli(capsys, *run_args(inputs, tiny_pipeline, tmp_path / "out"), *probe)
    assert code == 2 and message in err


@pytest.mark.parametrize("component, message", [
    ("image_encoder", "has no image_encoder component"),  # left out of model_index.json
    ("unet", "lacks unet"),  # listed, but its folder is gone
])
def test_run_incomplete_model_exits_2(capsys, inputs, tiny_pipeline, tmp_path, component, message):
    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline, model)
    shutil.rmtree(model / component)
    if component == "image_encoder":
        index = json.loads((model / "model_index.json").read_text())
        index["image_encoder"] = [None, None]
        (model / "model_index.json").write_text(json.dumps(index))
    code, _, err = cli(capsys, *run_args(inputs, model, tmp_path / "out"))
    assert code == 2 and message in err and component in err, err


# ---- run: end to end --------------------------------------------------------------------------
def test_run_end_to_end_writes_the_report(capsys, inputs, tiny_pipeline, tmp_path):
    pytest.importorskip("i2am.trace", reason="i2am.trace (issue 4) has not landed yet")
    out = tmp_path / "report"
    code, stdout, err = cli(capsys, *run_args(inputs, tiny_pipeline, out), "--ref-mask", inputs["ref_mask"],
                            "--seed", 3, "--points", "3,4", "--boxes", "2,2,6,5", "--patches", "1,2")
    assert code == 0, err
    assert {p.name for p in out.iterdir()} == {
        "maps.safetensors", "scores.json", "report.md", "generated.png", "reference.png", "input.png", "mask.png",
        "ref_mask.png", "overview.png", "by_time.png", "by_head.png", "specific_reference_point_3_4.png",
        "specific_reference_box_2_2_6_5.png", "specific_generated_patch_1_2.png"}
    scores = json.loads((out / "scores.json").read_text())
    maps = AttributionMaps.load(out / "maps.safetensors")
    # the reference as the image encoder saw it: its processor's resize of the 12x20 reference and centre crop
    assert Image.open(out / "reference.png").size == (IMAGE_SIZE, IMAGE_SIZE)
    ref_mask = torch.from_numpy(np.asarray(Image.open(out / "ref_mask.png").convert("L")) > 127).float()
    assert ref_mask.shape == (IMAGE_SIZE, IMAGE_SIZE)
    expect = maps.imacs(ref_mask=ref_mask)
    assert scores["IMACS_g"] == pytest.approx(expect["gen"]) and scores["IMACS_r"] == pytest.approx(expect["ref"])
    assert f"IMACS_g: {scores['IMACS_g']}" in stdout
    settings = scores["settings"]
    assert settings["pipeline"] == "sd-inpaint-patch" and settings["steps"] == 4 and settings["seed"] == 3
    assert settings["latent_size"] == [LATENT, LATENT] and settings["ref_grid"] == [REF_GRID, REF_GRID]
    assert settings["num_steps"] == 4 and settings["time_groups"] == 2 and settings["points"] == [[3, 4]]
    assert Image.open(out / "generated.png").size == (IMAGE_SIZE, IMAGE_SIZE)
