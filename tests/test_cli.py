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

import tiny_models
from tiny_models import HEIGHT, WIDTH

LATENT, PATCH_GRID = tiny_models.LATENT, (4, 4)  # the sd-inpaint-patch encoder: 16 px inputs, 4 px patches
IP_TOKENS = 4


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def save_png(path, array):
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def inputs(tmp_path):
    """Image (24x16), inpainting mask, reference (12x20) and reference mask files."""
    ref_mask = np.zeros((20, 12))
    ref_mask[5:15, 2:9] = 255
    tiny_models.image(0).save(tmp_path / "image.png")
    tiny_models.image(1, (12, 20)).save(tmp_path / "reference.png")
    return {"image": tmp_path / "image.png", "reference": tmp_path / "reference.png",
            "mask": save_png(tmp_path / "mask.png", tiny_models.inpainting_mask() * 255),
            "ref_mask": save_png(tmp_path / "ref_mask.png", ref_mask)}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    """An sd-inpaint-patch model saved with save_pretrained: the tiny SD inpainting pipeline whose
    image_encoder is a CLIPVisionModel (CLS + 4x4 patch tokens) with its feature_extractor."""
    from diffusers import StableDiffusionInpaintPipeline
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    encoder = CLIPVisionModel(CLIPVisionConfig(image_size=16, patch_size=16 // PATCH_GRID[0],
                                               hidden_size=tiny_models.CROSS_DIM, intermediate_size=32,
                                               num_hidden_layers=1, num_attention_heads=2))
    pipe = StableDiffusionInpaintPipeline(
        vae=tiny_models.vae(), text_encoder=None, tokenizer=None, unet=tiny_models.unet(9),
        scheduler=tiny_models.scheduler(), safety_checker=None, image_encoder=encoder,
        feature_extractor=CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size=16),
        requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("tiny-sd-inpaint-patch")
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_paint_by_example(tmp_path_factory):
    """The tiny PaintByExamplePipeline of the trace tests, saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny-paint-by-example")
    tiny_models.paint_by_example().pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_ip_adapter(tmp_path_factory):
    """A tiny SD inpainting model (CLIP text encoder with a 28-token vocabulary, CLIP vision
    image_encoder) and IP-Adapter weights (4 image tokens) in a safetensors file."""
    from diffusers import StableDiffusionInpaintPipeline
    from safetensors.torch import save_file
    from transformers import (CLIPImageProcessorPil, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, CLIPVisionConfig,
                              CLIPVisionModelWithProjection)

    folder = tmp_path_factory.mktemp("tiny-ip-adapter")
    letters = {c + "</w>": i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz")}
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, **letters}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    torch.manual_seed(0)
    dim, image_dim, tokens = tiny_models.CROSS_DIM, 12, IP_TOKENS
    small = dict(intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=dim, max_position_embeddings=8,
                                        bos_token_id=0, eos_token_id=1, pad_token_id=1, **small))
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=16, patch_size=4, hidden_size=16,
                                                            projection_dim=image_dim, **small))
    unet = tiny_models.unet(9)
    pipe = StableDiffusionInpaintPipeline(
        vae=tiny_models.vae(), text_encoder=text, unet=unet, scheduler=tiny_models.scheduler(), safety_checker=None,
        tokenizer=CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8),
        feature_extractor=CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size=16), image_encoder=vision,
        requires_safety_checker=False)
    pipe.save_pretrained(folder / "model")
    weights = {"image_proj.proj.weight": torch.randn(dim * tokens, image_dim) / 4,
               "image_proj.proj.bias": torch.zeros(dim * tokens),
               "image_proj.norm.weight": torch.ones(dim), "image_proj.norm.bias": torch.zeros(dim)}
    cross = [name[: -len(".processor")] for name in unet.attn_processors if name.endswith("attn2.processor")]
    for j, name in enumerate(cross):  # diffusers numbers the attention processors, attn1 and attn2 alternating
        for proj in ("to_k_ip", "to_v_ip"):
            weights[f"ip_adapter.{2 * j + 1}.{proj}.weight"] = torch.randn_like(unet.get_submodule(name).to_k.weight)
    save_file(weights, folder / "ip-adapter.safetensors")
    return folder


def run_args(inputs, model, out, *extra, pipeline="sd-inpaint-patch"):
    return ["run", "--pipeline", pipeline, "--model", model, "--image", inputs["image"], "--mask", inputs["mask"],
            "--reference", inputs["reference"], "--steps", 2, "--time-groups", 2, "--out", out, *extra]


# ---- help, entry point -------------------------------------------------------------------------
def help_text(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["demo", "run", "show", "eval", "bench"])
def test_help_of_each_command_has_examples(capsys, command):
    examples = help_text(capsys, command).split("examples:")[1]
    assert f"i2am {command}" in examples
    # an example's lines are continued with a backslash each: a lost one joins them into one long line
    assert all(len(line) <= 100 for line in examples.splitlines()), examples


def test_run_help_describes_every_pipeline_kind(capsys):
    from i2am import pipelines

    block = " ".join(help_text(capsys, "run").split("pipelines:\n")[1].split("examples:")[0].split())
    for name, kind in pipelines.KINDS.items():
        assert f"{name} {' '.join(kind.description.split())}" in block, name


@pytest.mark.slow
def test_entry_point_module():
    done = subprocess.run([sys.executable, "-m", "i2am.cli", "show", "missing.safetensors", "--out", "x"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "missing.safetensors" in done.stderr


def test_demo_calls_run_demo(capsys, monkeypatch, tmp_path):
    import i2am.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda **kw: calls.append(kw) or 0)
    code, _, _ = cli(capsys, "demo", "--out", tmp_path, "--backend", "torch")
    assert code == 0 and calls == [{"out": str(tmp_path), "device": None, "backend": "torch", "protocol": "paper"}]


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


def test_show_rerenders_with_the_runs_settings_and_images(capsys, tmp_path):
    first, again = tmp_path / "run", tmp_path / "shown"
    report.write_report(first, tiny_maps(), image=gradient_image(32, 32), reference=gradient_image(32, 24),
                        settings={"pipeline": "paint-by-example", "model": "m", "steps": 4, "seed": 7}, threshold=0.6)
    code, _, _ = cli(capsys, "show", first / "maps.safetensors", "--out", again)
    assert code == 0
    shown = json.loads((again / "scores.json").read_text())["settings"]
    assert shown["pipeline"] == "paint-by-example" and shown["seed"] == 7 and shown["threshold"] == 0.6
    for name in ("overview.png", "by_time.png", "specific_reference_point_3_4.png"):  # the run's images found
        assert (first / name).read_bytes() == (again / name).read_bytes(), name
    code, _, _ = cli(capsys, "show", first / "maps.safetensors", "--threshold", "0.2", "--out", tmp_path / "t")
    assert json.loads((tmp_path / "t" / "scores.json").read_text())["settings"]["threshold"] == 0.2


def test_show_display_threshold_never_changes_a_score_and_the_scoring_one_does(capsys, tmp_path):
    ref_mask = torch.zeros(32, 24)
    ref_mask[4:20, 6:18] = 1
    first = tmp_path / "run"
    scores = report.write_report(first, tiny_maps(), image=gradient_image(32, 32), reference=gradient_image(32, 24),
                                 ref_mask=ref_mask, threshold=0.2)
    save_png(first / "ref_mask.png", ref_mask.numpy() * 255)  # found beside the maps, as in a run's folder

    def show(name, *flags):
        assert cli(capsys, "show", first / "maps.safetensors", *flags, "--out", tmp_path / name)[0] == 0
        return json.loads((tmp_path / name / "scores.json").read_text()), (tmp_path / name / "report.md").read_text()

    for name, threshold in (("low", "0.0"), ("high", "0.9")):
        shown, md = show(name, "--threshold", threshold)
        assert (shown["IMACS_g"], shown["IMACS_r"]) == (scores["IMACS_g"], scores["IMACS_r"])
        assert shown["settings"]["threshold"] == float(threshold) and shown["settings"]["imacs_threshold"] == 0.4
        assert f"values <= {float(threshold):g} (the display threshold)" in md and "IMACS threshold: 0.4 " in md
    scored, md = show("scored", "--imacs-threshold", "0.9")
    assert scored["IMACS_r"] != scores["IMACS_r"] and scored["settings"]["imacs_threshold"] == 0.9
    assert "IMACS threshold: 0.9 " in md and "values <= 0.2 (the display threshold)" in md  # the run's display
    again, _ = show("kept")
    assert again["IMACS_r"] == scores["IMACS_r"]  # show keeps the run's scoring threshold


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


def two_reference_report(folder):
    """The report folder of maps of two references (the tiny Qwen-Image-Edit-Plus transformer)
    traced with an inpainting mask, written as `i2am run` writes it (reference_R.png,
    ref_mask_R.png); returns the scores."""
    import multi_reference as mr
    import tiny_qwen as tq

    import i2am

    model, inputs = tq.transformer(), tq.edit_plus_inputs(batch=1)
    mask = torch.zeros(tq.GRID)
    mask[1:3, 2:5] = 1
    with torch.no_grad(), i2am.trace(model, num_steps=1, mask=mask) as tc:  # few figures: a quick report
        mr.run_steps(model, inputs, [1.0])
    refs = mr.images([(16 * w, 16 * h) for h, w in tq.REFS], seed=1)
    ref_masks = []
    for r, ref in enumerate(refs):
        m = np.zeros((ref.height, ref.width), np.uint8)
        m[4 + 4 * r:30, 8:40 + 8 * r] = 255  # a different region on each reference
        ref_masks.append(Image.fromarray(m))
    return report.write_report(folder, tc.maps(), image=mr.images([(96, 64)])[0], reference=refs, ref_mask=ref_masks,
                               extra_images={f"ref_mask_{r}": m for r, m in enumerate(ref_masks)})


def imacs_of(scores):
    return {k: v for k, v in scores.items() if k.startswith("IMACS")}


def test_show_of_several_references_reads_their_images_and_masks(capsys, tmp_path):
    first, again = tmp_path / "run", tmp_path / "shown"
    scores = two_reference_report(first)
    assert set(imacs_of(scores)) == {"IMACS_g", "IMACS_r", "IMACS_g_ref1", "IMACS_r_ref1"}
    code, _, _ = cli(capsys, "show", first / "maps.safetensors", "--out", again)
    assert code == 0
    assert imacs_of(json.loads((again / "scores.json").read_text())) == imacs_of(scores)
    pngs = sorted(p.name for p in first.glob("*.png"))
    assert {"reference_0.png", "reference_1.png", "ref_mask_0.png", "ref_mask_1.png"} <= set(pngs)
    assert pngs == sorted(p.name for p in again.glob("*.png"))
    for name in pngs:  # the references and their mask outlines drawn as in the run's figures
        assert (first / name).read_bytes() == (again / name).read_bytes(), name


def test_show_of_several_references_without_some_of_their_files(capsys, tmp_path):
    first = tmp_path / "run"
    scores = two_reference_report(first)
    (first / "ref_mask_0.png").unlink()  # reference 0 then has no mask, reference 1 no image
    (first / "reference_1.png").unlink()
    assert cli(capsys, "show", first / "maps.safetensors", "--out", tmp_path / "some")[0] == 0
    shown = json.loads((tmp_path / "some" / "scores.json").read_text())
    assert imacs_of(shown) == {k: scores[k] for k in ("IMACS_g", "IMACS_g_ref1", "IMACS_r_ref1")}
    assert {"reference_0.png", "ref_mask_1.png"} <= set(shown["files"])
    assert not {"reference_1.png", "ref_mask_0.png"} & set(shown["files"])
    (first / "reference_0.png").unlink()  # no reference image at all: the overview leaves out their column
    assert cli(capsys, "show", first / "maps.safetensors", "--out", tmp_path / "none")[0] == 0
    widths = [Image.open(tmp_path / name / "overview.png").width for name in ("some", "none")]
    assert widths[1] < widths[0]


def test_show_of_several_references_in_their_own_folder_keeps_them(capsys, tmp_path):
    scores = two_reference_report(tmp_path)
    kept = {name: (tmp_path / name).read_bytes() for name in ("reference_0.png", "reference_1.png",
                                                                "ref_mask_0.png", "ref_mask_1.png")}
    assert cli(capsys, "show", tmp_path / "maps.safetensors", "--threshold", "0.2", "--out", tmp_path)[0] == 0
    for name, data in kept.items():
        assert (tmp_path / name).read_bytes() == data, name
    shown = json.loads((tmp_path / "scores.json").read_text())
    assert (shown["IMACS_r"], shown["IMACS_r_ref1"]) == (scores["IMACS_r"], scores["IMACS_r_ref1"])
    assert set(kept) <= set(shown["files"])  # a further rewrite or --overwrite removes them as its own


def test_show_of_several_references_bad_masks_and_options_exit_2(capsys, tmp_path):
    first = tmp_path / "run"
    two_reference_report(first)
    for option in ("--reference", "--ref-mask"):
        code, _, err = cli(capsys, "show", first / "maps.safetensors", option, first / "reference_0.png",
                           "--out", tmp_path / "o")
        key = option[2:].replace("-", "_")
        assert code == 2 and f"{option} is one image, but these maps have 2 references" in err
        assert f"{key}_0.png to {key}_1.png beside the maps file are used" in err
    save_png(first / "ref_mask_1.png", np.eye(5) * 255)
    code, _, err = cli(capsys, "show", first / "maps.safetensors", "--out", tmp_path / "o")
    assert code == 2 and f"{first / 'ref_mask_1.png'} is 5x5 but {first / 'reference_1.png'} is 80x48" in err
    save_png(first / "ref_mask_1.png", np.zeros((48, 80)))
    code, _, err = cli(capsys, "show", first / "maps.safetensors", "--out", tmp_path / "o")
    assert code == 2 and f"({first / 'ref_mask_1.png'}) is empty" in err


# ---- run: argument errors ---------------------------------------------------------------------
@pytest.mark.parametrize("bad", [["--points", "1"], ["--boxes", "1,2,3"], ["--steps", "0"], ["--pipeline", "sdxl"],
                                 ["--time-groups", "x"]])
def test_run_argparse_errors_exit_2(capsys, inputs, tmp_path, bad):
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in run_args(inputs, tmp_path, tmp_path / "out")] + bad)
    assert exit_.value.code == 2 and "error:" in capsys.readouterr().err


def test_run_usage_errors_exit_2(capsys, inputs, tmp_path):
    wrong_size = save_png(tmp_path / "small_mask.png", np.full((8, 8), 255))
    empty = save_png(tmp_path / "empty_mask.png", np.zeros((HEIGHT, WIDTH)))
    cases = [
        (dict(image=tmp_path / "missing.png"), [], "--image file not found"),
        (dict(mask=wrong_size), [], "--mask is 8x8 but --image is 24x16"),
        (dict(mask=empty), [], "--mask is empty"),
        (dict(), ["--ref-mask", wrong_size], "--ref-mask is 8x8 but --reference is 12x20"),
        (dict(), ["--time-groups", 5], "--time-groups=5 is more than the 2 steps"),
        (dict(), ["--model", tmp_path / "no" / "such" / "folder"], "model folder not found"),
        (dict(), ["--model", "i2am-tests/no-such-model"], "local Hugging Face cache"),
    ]
    for files, extra, message in cases:
        code, _, err = cli(capsys, *run_args({**inputs, **files}, tmp_path, tmp_path / "out"), *extra)
        assert code == 2 and message in err, (message, err)
    code, _, err = cli(capsys, *run_args(inputs, tmp_path, tmp_path / "out", pipeline="ip-adapter"))
    assert code == 2 and "needs --ip-adapter FILE" in err


@pytest.mark.parametrize("probe, message", [
    (["--points", "8,0"], "point 8,0 is off the latent grid 8x12"),
    (["--boxes", "2,2,2,5"], "box 2,2,2,5 must satisfy"),
    (["--patches", "0,4"], "patch 0,4 is off the reference grid 4x4"),
])
@pytest.mark.slow
def test_run_probe_off_the_grid_exits_2(capsys, inputs, tiny_pipeline, tmp_path, probe, message):
    code, _, err = cli(capsys, *run_args(inputs, tiny_pipeline, tmp_path / "out"), *probe)
    assert code == 2 and message in err


@pytest.mark.parametrize("component, message", [
    ("image_encoder", "has no image_encoder component"),  # left out of model_index.json
    ("unet", "lacks unet"),  # listed, but its folder is gone
])
@pytest.mark.slow
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
@pytest.mark.parametrize("pipeline, ref_grid, patch, protocol", [
    ("sd-inpaint-patch", PATCH_GRID, (1, 2), "paper"),
    ("paint-by-example", (1, 1), (0, 0), "official"),  # one reference token
    ("ip-adapter", (1, IP_TOKENS), (0, 3), "paper"),  # the adapter's image tokens, in a row
])
@pytest.mark.slow
def test_run_end_to_end_writes_the_report(capsys, request, inputs, tmp_path, pipeline, ref_grid, patch, protocol):
    model = request.getfixturevalue({"sd-inpaint-patch": "tiny_pipeline", "paint-by-example": "tiny_paint_by_example",
                                     "ip-adapter": "tiny_ip_adapter"}[pipeline])
    extra = []
    if pipeline == "ip-adapter":
        model, extra = model / "model", ["--ip-adapter", model / "ip-adapter.safetensors", "--prompt", "a shirt"]
    out = tmp_path / "report"
    code, stdout, err = cli(capsys, *run_args(inputs, model, out, pipeline=pipeline), *extra,
                            "--ref-mask", inputs["ref_mask"], "--seed", 3, "--points", "3,4", "--boxes", "2,2,6,5",
                            "--patches", ",".join(map(str, patch)), "--protocol", protocol)
    assert code == 0, err
    figures = ["overview", "by_time", "by_head", f"specific_generated_patch_{patch[0]}_{patch[1]}"]
    if ref_grid != (1, 1):  # one reference token: no reference-side figures (the report says why)
        figures += ["specific_reference_point_3_4", "specific_reference_box_2_2_6_5"]
    assert {p.name for p in out.iterdir()} == {
        "maps.safetensors", "scores.json", "report.md", "generated.png", "reference.png", "input.png", "mask.png",
        "ref_mask.png"} | {f"{stem}.{ext}" for stem in figures for ext in ("png", "pdf")}
    scores = json.loads((out / "scores.json").read_text())
    maps = AttributionMaps.load(out / "maps.safetensors")
    # reference.png and ref_mask.png are as the image encoder saw them: its processor's resize and
    # centre crop of the 12x20 reference to 16x16
    assert Image.open(out / "reference.png").size == (16, 16)
    ref_mask = torch.from_numpy(np.asarray(Image.open(out / "ref_mask.png").convert("L")) > 127).float()
    expect = maps.imacs(ref_mask=ref_mask)
    assert scores["protocol"] == maps.protocol == protocol
    assert f"Protocol: **{protocol}**" in (out / "report.md").read_text()
    assert scores["IMACS_g"] == pytest.approx(expect["gen"]) and scores["IMACS_r"] == pytest.approx(expect["ref"])
    assert f"IMACS_g: {scores['IMACS_g']}" in stdout
    settings = scores["settings"]
    assert settings["pipeline"] == pipeline and settings["steps"] == 2 and settings["seed"] == 3
    assert settings["image"] == str(inputs["image"]) and settings["reference"] == str(inputs["reference"])
    assert settings["latent_size"] == list(LATENT) and settings["ref_grid"] == list(ref_grid)
    assert settings["num_steps"] == 2 and settings["time_groups"] == 2 and settings["points"] == [[3, 4]]
    assert Image.open(out / "generated.png").size == (WIDTH, HEIGHT)
    md = (out / "report.md").read_text()
    if ref_grid != (1, 1):
        assert "![Specific-reference map M_sr of latent point (3, 4)](specific_reference_point_3_4.png)" in md
    else:
        assert "reference grid is 1x1" in md
    assert AttributionMaps.load(out / "maps.safetensors").settings["seed"] == 3
    assert "Warning" not in err and "warn" not in err.lower(), err  # library warnings are silenced


@pytest.mark.slow
def test_run_quiet_prints_only_where_the_report_is(capsys, inputs, tiny_pipeline, tmp_path, step_bars):
    out = tmp_path / "report"
    code, stdout, err = cli(capsys, *run_args(inputs, tiny_pipeline, out, "--quiet"))
    assert code == 0, err
    assert stdout.strip() == f"report written to {out / 'report.md'}"
    assert len(step_bars) == 1 and step_bars[0]["disable"] is True  # the bar over the steps is off
    code, stdout, err = cli(capsys, *run_args(inputs, tiny_pipeline, tmp_path / "loud"))
    assert "IMACS_g" in stdout and len(step_bars) == 2 and step_bars[1]["disable"] is False


@pytest.mark.parametrize("quiet", [False, True])
def test_eval_quiet_turns_the_progress_bar_off(capsys, monkeypatch, tmp_path, quiet):
    import i2am.evaluation

    given = {}
    monkeypatch.setattr(i2am.evaluation, "run_eval", lambda out, **kw: given.update(kw))
    code, _, err = cli(capsys, "eval", "--demo", "--out", str(tmp_path / "e"), *(["--quiet"] if quiet else []))
    assert code == 0, err
    assert given["progress"] is not quiet and given["demo"] is True


def test_run_on_two_regions_of_one_image(capsys, inputs, tiny_pipeline, tmp_path):
    """--query-region/--ref-region with --attention self: the maps live on the two halves of the
    one generated image (side by side along width), the figures show both halves."""
    out = tmp_path / "report"
    half = (0, 0, LATENT[0], LATENT[1] // 2), (0, LATENT[1] // 2, *LATENT)
    code, stdout, err = cli(capsys, *run_args(inputs, tiny_pipeline, out), "--attention", "self",
                            "--query-region", ",".join(map(str, half[0])), "--ref-region", ",".join(map(str, half[1])),
                            "--points", "3,4", "--patches", "2,5")
    assert code == 0, err
    maps = AttributionMaps.load(out / "maps.safetensors")
    assert maps.latent_size == maps.ref_grid == (LATENT[0], LATENT[1] // 2)
    assert maps.regions == {"latent": LATENT, "query": half[0], "ref": half[1]}
    assert maps.layers and all(name.endswith("attn1") for name in maps.layers)
    assert Image.open(out / "generated.png").size == (WIDTH, HEIGHT)  # the whole image
    assert Image.open(out / "reference.png").size == (WIDTH // 2, HEIGHT)  # its reference half
    assert {"overview.png", "specific_reference_point_3_4.png", "specific_generated_patch_2_5.png"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "scores.json").read_text())["settings"]["attention"] == "self"


@pytest.mark.parametrize("regions, message", [
    (("0,0,8,7", "0,6,8,12"), "overlap"),
    (("0,0,8,6", "0,6,8,13"), "--ref-region 0,6,8,13 reaches outside the latent grid 8x12"),
    (("0,0,8,6", None), "go together"),
])
def test_run_bad_regions_exit_2(capsys, inputs, tiny_pipeline, tmp_path, regions, message):
    extra = ["--query-region", regions[0]] + (["--ref-region", regions[1]] if regions[1] else [])
    code, _, err = cli(capsys, *run_args(inputs, tiny_pipeline, tmp_path / "report"), "--attention", "self", *extra)
    assert code == 2 and message in err, err
