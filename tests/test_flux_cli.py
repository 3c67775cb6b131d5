"""`i2am run --pipeline flux-kontext` on a tiny FluxKontextPipeline saved with save_pretrained."""
import json

import numpy as np
import pytest
from PIL import Image

import tiny_flux
import tiny_models
from i2am import AttributionMaps
from i2am.cli import main


@pytest.fixture(scope="module")
def kontext_model(tmp_path_factory):
    return tiny_flux.saved_pipeline(tmp_path_factory.mktemp("tiny-flux-kontext"))


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.slow
def test_run_flux_kontext_writes_the_report(capsys, kontext_model, tmp_path):
    tiny_models.image(1, (24, 16)).save(tmp_path / "photo.png")
    mask = np.zeros((16, 24), np.uint8)
    mask[4:12, 8:20] = 255
    Image.fromarray(mask).save(tmp_path / "edit.png")
    code, out, err = run(capsys, "run", "--pipeline", "flux-kontext", "--model", kontext_model, "--reference",
                         tmp_path / "photo.png", "--mask", tmp_path / "edit.png", "--prompt", "a red hat",
                         "--steps", 2, "--time-groups", 2, "--points", "1,2", "--patches", "3,5",
                         "--out", tmp_path / "report")
    assert code == 0, err
    report = tmp_path / "report"
    scores = json.loads((report / "scores.json").read_text())
    assert scores["settings"]["pipeline"] == "flux-kontext" and (scores["settings"]["height"], scores["settings"]
                                                                  ["width"]) == (16, 24)
    assert scores["settings"]["guidance"] == 2.5  # no --guidance: FLUX.1 Kontext's own
    assert "image" not in scores["settings"] and scores["settings"]["mask"] == str(tmp_path / "edit.png")
    assert -4 <= scores["IMACS_g"] <= 1  # scored against --mask, the edited region
    maps = AttributionMaps.load(report / "maps.safetensors")
    assert maps.latent_size == (4, 6) and maps.ref_grid == (4, 6) and maps.num_steps == 2
    assert len(maps.layers) == 2 and maps.generated(by="time").shape == (2, 4, 6)
    assert (report / "report.md").is_file()
    assert (report / "generated.png").is_file() and (report / "reference.png").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--image", "x.png"], "takes no --image"),
    (["--points", "4,0"], "point 4,0 is off the latent grid 4x6"),
    (["--patches", "0,6"], "patch 0,6 is off the reference grid 4x6"),
])
@pytest.mark.slow
def test_run_flux_kontext_usage_errors_exit_2(capsys, kontext_model, tmp_path, extra, message):
    tiny_models.image(1, (24, 16)).save(tmp_path / "photo.png")
    code, _, err = run(capsys, "run", "--pipeline", "flux-kontext", "--model", kontext_model, "--reference",
                       tmp_path / "photo.png", "--prompt", "a hat", "--steps", 1, "--time-groups", 1,
                       "--out", tmp_path / "r", *extra)
    assert code == 2 and message in err


def test_other_pipelines_still_need_image_and_mask(capsys, tmp_path):
    code, _, err = run(capsys, "run", "--pipeline", "paint-by-example", "--model", tmp_path, "--reference",
                       tmp_path / "r.png", "--out", tmp_path / "o")
    assert code == 2 and "needs --image" in err


@pytest.mark.slow
def test_run_flux_kontext_quiet_prints_only_where_the_report_is(capsys, kontext_model, tmp_path, step_bars):
    tiny_models.image(1, (24, 16)).save(tmp_path / "photo.png")
    out = tmp_path / "report"
    code, stdout, err = run(capsys, "run", "--pipeline", "flux-kontext", "--model", kontext_model, "--reference",
                            tmp_path / "photo.png", "--prompt", "a red hat", "--steps", 2, "--time-groups", 2,
                            "--out", out, "--quiet")
    assert code == 0, err
    assert stdout.strip() == f"report written to {out / 'report.md'}"
    assert len(step_bars) == 1 and step_bars[0]["disable"] is True  # the bar over the steps is off
