"""`i2am eval`: sharded over processes, resumed after a kill, metrics as torchmetrics computes them.

The demo runs go through tests/eval_worker.py in subprocesses (4 samples, 2 steps), with a
small fixed feature extractor standing in for the Inception. Every run uses one thread per
process: the scores are float sums whose order depends on the thread count, and the runs are
compared exactly.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from i2am.cli import main
from i2am.evaluation import load_dataset
from i2am.evaluation.datasets import DatasetError
from i2am.evaluation.tasks import as_uint8
from i2am.inputs import check_protocols

import tiny_models
from eval_worker import TinyFeatures
from test_cli import cli, inputs, save_png, tiny_pipeline  # noqa: F401 (fixtures)

WORKER = Path(__file__).with_name("eval_worker.py")
ROOT = WORKER.parent.parent
SAMPLES, STEPS = 4, 2
COMPARED = ("samples.jsonl", "summary.md", "summary.json", "settings.json", "scatter_paper.png")


def run_worker(out, *extra, processes=None, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(WORKER), str(out), "--samples", str(SAMPLES), "--steps", str(STEPS), *extra]
    if processes:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", str(processes),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", *command[1:]]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def read(out, name):
    return (out / name).read_bytes()


def records(out):
    return sorted((json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()),
                  key=lambda r: r["id"])


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-one") / "out"
    run_worker(out)
    return out


@pytest.mark.slow
def test_one_process_writes_every_sample_and_the_summary(one_process):
    rows = records(one_process)
    assert [r["id"] for r in rows] == [f"demo_{b:03d}" for b in range(SAMPLES)]
    assert [r["seed"] for r in rows] == list(range(SAMPLES))
    for r in rows:
        paper = r["scores"]["paper"]
        assert set(paper) == {"IMACS_g", "IMACS_r", "correspondence_accuracy", "correspondence_best_single_patch"}
        assert -3 <= paper["IMACS_g"] <= 1 and -3 <= paper["IMACS_r"] <= 1
        assert 0 <= r["SSIM"] <= 1 and r["settings"]["steps"] == STEPS and r["settings"]["protocols"] == ["paper"]
    summary = json.loads(read(one_process, "summary.json"))
    assert summary["samples"] == SAMPLES and summary["FID"] >= 0 and "KID" in summary
    assert summary["SSIM"] == pytest.approx(np.mean([r["SSIM"] for r in rows]))
    assert summary["protocols"]["paper"]["IMACS_r"] == pytest.approx(
        np.mean([r["scores"]["paper"]["IMACS_r"] for r in rows]))
    text = read(one_process, "summary.md").decode()
    assert "| FID ↓ | KID ↓ | SSIM ↑ | IMACS_g (paper) ↑ | IMACS_r (paper) ↑ |" in text
    assert f"{summary['FID']:.4g}" in text and "![IMACS against the metrics](scatter_paper.png)" in text
    assert "| paper | IMACS_g | SSIM | 4 |" in text
    assert Image.open(one_process / "scatter_paper.png").size[0] > 300


@pytest.mark.slow
def test_two_processes_under_accelerate_equal_one(one_process, tmp_path):
    out = tmp_path / "out"
    run_worker(out, processes=2)
    assert records(out) == records(one_process)
    for name in COMPARED:
        assert read(out, name) == read(one_process, name), name
    # each sample was generated once, by one of the two processes
    assert sorted((out / "generated.log").read_text().split()) == [f"demo_{b:03d}" for b in range(SAMPLES)]


@pytest.mark.slow
def test_killed_run_resumed_equals_the_uninterrupted_run(one_process, tmp_path):
    out = tmp_path / "out"
    killed = run_worker(out, "--kill-at", "2", check=False)
    assert killed.returncode != 0
    done = sorted(p.stem for p in (out / "samples").glob("*.json"))
    assert done == ["demo_000", "demo_001"] and not (out / "samples.jsonl").exists()
    assert not list((out / "samples").glob(".*"))  # no temporary file left behind: none was being written
    run_worker(out)
    generated = (out / "generated.log").read_text().split()
    # the killed run started demo_002; the resumed run redid demo_002 and demo_003, nothing else
    assert generated == ["demo_000", "demo_001", "demo_002", "demo_002", "demo_003"]
    for name in COMPARED:
        assert read(out, name) == read(one_process, name), name


@pytest.mark.slow
def test_metrics_equal_torchmetrics_on_the_saved_images(one_process):
    from scipy import stats
    from torchmetrics.functional.image import structural_similarity_index_measure
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    from i2am.demo import data
    from i2am.evaluation import DemoTask

    truth = data.make_batch(SAMPLES, seed=DemoTask.SEED)["target"]
    real = torch.stack([as_uint8(t) for t in truth])
    fake = torch.stack([as_uint8(one_process / "samples" / f"demo_{b:03d}.png") for b in range(SAMPLES)])
    rows = records(one_process)
    for b, r in enumerate(rows):
        expect = structural_similarity_index_measure(fake[b:b + 1] / 255, real[b:b + 1] / 255, data_range=1.0)
        assert r["SSIM"] == pytest.approx(expect.item(), abs=1e-6)
    fid = FrechetInceptionDistance(feature=TinyFeatures())
    kid = KernelInceptionDistance(feature=TinyFeatures(), subset_size=SAMPLES)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    torch.manual_seed(0)  # the eval draws KID's subsets from its seed
    kid_mean, _ = kid.compute()
    summary = json.loads(read(one_process, "summary.json"))
    # the eval extracts features image by image, torchmetrics here in one batch: float32 rounding
    assert summary["FID"] == pytest.approx(fid.compute().item(), rel=1e-4)
    assert summary["KID"] == pytest.approx(kid_mean.item(), rel=1e-4)
    assert "KID_std" not in summary  # 4 samples: KID's one subset size is the whole set
    # and the correlations are scipy's over the per-sample columns
    imacs = [r["scores"]["paper"]["IMACS_g"] for r in rows]
    row = next(c for c in summary["correlations"] if c["imacs"] == "IMACS_g" and c["metric"] == "SSIM")
    assert row["n"] == SAMPLES
    assert row["pearson"] == pytest.approx(stats.pearsonr(imacs, [r["SSIM"] for r in rows]).statistic)
    assert row["spearman"] == pytest.approx(stats.spearmanr(imacs, [r["SSIM"] for r in rows]).statistic)


@pytest.mark.slow
def test_left_out_columns_say_how_to_add_them(one_process):
    summary = json.loads(read(one_process, "summary.json"))
    lines = summary["left_out"]
    assert "LPIPS" not in summary and len(lines) == 1 and lines[0].startswith("LPIPS left out:")
    assert "torchvision" in lines[0] and f"- {lines[0]}" in read(one_process, "summary.md").decode()


# ---- the command ------------------------------------------------------------------------------
@pytest.mark.slow
def test_eval_command_on_a_pipeline_scores_as_i2am_run(capsys, inputs, tiny_pipeline, tmp_path):  # noqa: F811
    manifest = tmp_path / "pairs.jsonl"
    other = save_png(tmp_path / "other_mask.png", np.roll(tiny_models.inpainting_mask(), -6, axis=1) * 255)
    lines = [{"id": "a", "image": "image.png", "mask": "mask.png", "reference": "reference.png",
              "ref_mask": "ref_mask.png", "ground_truth": "image.png"},
             {"id": "b", "image": "image.png", "mask": other.name, "reference": "reference.png",
              "ref_mask": "ref_mask.png"}]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "eval"
    common = ["--pipeline", "sd-inpaint-patch", "--model", tiny_pipeline, "--steps", 2, "--time-groups", 2]
    code, stdout, err = cli(capsys, "eval", *common, "--data", manifest, "--out", out, "--seed", 5)
    assert code == 0, err
    assert "FID and KID left out" in stdout and f"summary written to {out / 'summary.md'}" in stdout
    rows = {r["id"]: r for r in records(out)}
    assert "SSIM" in rows["a"] and "SSIM" not in rows["b"]  # b has no ground truth
    for sample, mask, seed in (("a", inputs["mask"], 5), ("b", other, 6)):
        report = tmp_path / f"run_{sample}"
        code, _, err = cli(capsys, "run", *common, "--image", inputs["image"], "--mask", mask, "--reference",
                           inputs["reference"], "--ref-mask", inputs["ref_mask"], "--seed", seed, "--out", report)
        assert code == 0, err
        scores = json.loads((report / "scores.json").read_text())
        assert rows[sample]["scores"]["paper"] == {"IMACS_g": scores["IMACS_g"], "IMACS_r": scores["IMACS_r"]}
        assert read(out / "samples", f"{sample}.png") == read(report, "generated.png")


def test_run_and_eval_make_one_generation_with_identical_maps(capsys, monkeypatch, inputs, tiny_pipeline,  # noqa: F811
                                                              tmp_path):
    """`i2am run` and `i2am eval` make their generation through i2am.generation.run_traced, and
    for the same sample, settings and seed save the same maps, to the bit."""
    from i2am import generation
    from i2am.maps import AttributionMaps

    made, run_traced = [], generation.run_traced
    monkeypatch.setattr(generation, "run_traced", lambda *a, **k: made.append(run_traced(*a, **k)) or made[-1])
    manifest = tmp_path / "pairs.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": "image.png", "mask": "mask.png",
                                    "reference": "reference.png", "ref_mask": "ref_mask.png"}) + "\n")
    common = ["--pipeline", "sd-inpaint-patch", "--model", tiny_pipeline, "--steps", 2, "--time-groups", 2]
    code, _, err = cli(capsys, "eval", *common, "--data", manifest, "--out", tmp_path / "eval", "--seed", 5,
                       "--save-maps")
    assert code == 0, err
    code, _, err = cli(capsys, "run", *common, "--image", inputs["image"], "--mask", inputs["mask"], "--reference",
                       inputs["reference"], "--ref-mask", inputs["ref_mask"], "--seed", 5, "--out", tmp_path / "run")
    assert code == 0, err
    assert [gen.seed for gen in made] == [5, 5]
    evaluated = AttributionMaps.load(next((tmp_path / "eval").rglob("a.paper.safetensors")))
    ran = AttributionMaps.load(tmp_path / "run" / "maps.safetensors")
    assert list(evaluated.layers) == list(ran.layers)
    for name, layer in ran.layers.items():
        for kind in ("gen", "ref"):
            assert torch.equal(evaluated.layers[name][kind], layer[kind]), (name, kind)
    assert torch.equal(evaluated.generated(), ran.generated())


def test_eval_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--help"])
    assert exit_.value.code == 0
    examples = capsys.readouterr().out.split("examples:")[1]
    assert "i2am eval --demo" in examples and "accelerate launch" in examples


def test_python_m_i2am_is_the_command():
    done = subprocess.run([sys.executable, "-m", "i2am", "eval", "--demo", "--protocol", "exact", "--out", "x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'exact'" in done.stderr


@pytest.mark.slow
def test_both_protocols_score_every_sample(one_process, tmp_path):
    """One traced generation per protocol: the paper scores equal the paper-only run's, the
    official ones (inverted M_g, cloth-mask product) are there beside them and differ."""
    out = tmp_path / "out"
    run_worker(out, "--protocol", "paper", "official")
    rows, paper_only = records(out), records(one_process)
    for r, p in zip(rows, paper_only):
        assert r["scores"]["paper"] == p["scores"]["paper"]
        official = r["scores"]["official"]
        assert {"IMACS_g", "IMACS_r"} <= set(official) and official["IMACS_g"] != p["scores"]["paper"]["IMACS_g"]
    summary = json.loads(read(out, "summary.json"))
    assert set(summary["protocols"]) == {"paper", "official"}
    assert "IMACS_g (official)" in read(out, "summary.md").decode()


def test_eval_protocol_errors(capsys, tmp_path):
    assert check_protocols(["paper", "official"]) == ["paper", "official"]
    with pytest.raises(ValueError, match="unknown protocol 'exact'"):
        check_protocols(["exact"])
    with pytest.raises(ValueError, match="protocol given twice"):
        check_protocols(["paper", "paper"])


@pytest.mark.slow
def test_eval_refuses_a_folder_made_with_other_settings(capsys, one_process, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "settings.json").write_bytes(read(one_process, "settings.json"))
    code, _, err = cli(capsys, "eval", "--demo", "--samples", SAMPLES, "--steps", STEPS + 1, "--out", out)
    assert code == 2 and "other settings (steps, time_groups differ)" in err


def test_eval_usage_errors_exit_2(capsys, tmp_path):
    code, _, err = cli(capsys, "eval", "--data", tmp_path / "missing.jsonl", "--pipeline", "paint-by-example",
                       "--model", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "data set not found" in err
    code, _, err = cli(capsys, "eval", "--data", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "--data needs --pipeline and --model" in err


@pytest.mark.parametrize("options, python, command", [
    (dict(demo=True, randomized=True), "randomized belongs to faithfulness", "--randomized belongs to --faithfulness"),
    (dict(data="pairs.jsonl", faithfulness=True), "faithfulness runs with demo", "--faithfulness runs with --demo"),
    (dict(data="pairs.jsonl", pipeline="paint-by-example"), "data needs pipeline and model",
     "--data needs --pipeline and --model"),
    (dict(), "either demo (the embedded model) or data", "either --demo (the embedded model) or --data"),
])
def test_run_eval_refuses_bad_combinations_naming_them_as_the_caller(tmp_path, options, python, command):
    """i2am.evaluation.run_eval checks the combination before anything is written or loaded, and
    names the options as keywords, or as the command's options inside command_line_spelling."""
    from i2am.evaluation import run_eval
    from i2am.inputs import InputError, command_line_spelling

    out = tmp_path / "out"
    with pytest.raises(InputError) as err:
        run_eval(out, **options)
    assert python in str(err.value) and "--" not in str(err.value)
    with command_line_spelling(), pytest.raises(InputError, match=re.escape(command)):
        run_eval(out, **options)
    assert not out.exists()


@pytest.mark.slow
def test_run_eval_writes_what_the_command_writes(capsys, tmp_path):
    from i2am.evaluation import run_eval

    summary = run_eval(tmp_path / "lib", demo=True, samples=1, steps=2, progress=False)
    assert summary == tmp_path / "lib" / "summary.md" and summary.is_file()
    code, stdout, err = cli(capsys, "eval", "--demo", "--samples", 1, "--steps", 2, "--out", tmp_path / "cli")
    assert code == 0, err
    assert f"summary written to {tmp_path / 'cli' / 'summary.md'}" in stdout
    rows = records(tmp_path / "lib")
    assert len(rows) == 1 and rows == records(tmp_path / "cli")
    for name in ("summary.md", "summary.json", "settings.json"):
        assert read(tmp_path / "lib", name) == read(tmp_path / "cli", name), name
    faithfulness = run_eval(tmp_path / "faith", demo=True, faithfulness=True, samples=2, steps=2, draws=1,
                            progress=False)
    assert faithfulness == tmp_path / "faith" / "faithfulness.md" and faithfulness.is_file()
    assert json.loads(read(tmp_path / "faith", "settings.json"))["draws"] == 1

# ---- data sets --------------------------------------------------------------------------------
def test_manifest_reads_paths_relative_to_it_and_names_bad_lines(tmp_path):
    for name in ("p.png", "m.png", "c.png"):
        tiny_models.image(0).save(tmp_path / name)
    good = {"image": "p.png", "mask": "m.png", "reference": "c.png", "seed": 9}
    (tmp_path / "d.jsonl").write_text(json.dumps(good) + "\n\n" + json.dumps({**good, "id": "x"}) + "\n")
    first, second = load_dataset(tmp_path / "d.jsonl")
    assert (first.id, first.index, first.seed, first.image) == ("p", 0, 9, tmp_path / "p.png")
    assert (second.id, second.index, second.ground_truth, second.ref_mask) == ("x", 1, None, None)
    for line, message in ((json.dumps({"image": "p.png"}), r"line 1: lacks mask \(the region to fill, white\), "
                                                           r"reference \(the reference image\)"),
                          (json.dumps({**good, "mask": "nope.png"}), "line 1: mask file not found"),
                          (json.dumps({**good, "colour": 1}), "line 1: unknown keys colour"),
                          ("{", "line 1: not JSON"),
                          (json.dumps(good) + "\n" + json.dumps(good), "sample id 'p' appears twice")):
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        with pytest.raises(DatasetError, match=message):
            load_dataset(tmp_path / "bad.jsonl")


def test_manifest_reference_may_be_a_list_of_several(tmp_path):
    for name in ("p.png", "m.png", "a.png", "b.png"):
        tiny_models.image(0).save(tmp_path / name)
    good = {"image": "p.png", "mask": "m.png", "reference": ["a.png", "b.png"]}
    (tmp_path / "d.jsonl").write_text(json.dumps(good) + "\n")
    (sample,) = load_dataset(tmp_path / "d.jsonl")
    assert sample.reference == [tmp_path / "a.png", tmp_path / "b.png"]
    for reference, message in ((["a.png", "nope.png"], "line 1: reference 1 file not found"),
                               ([], "line 1: reference must be a path or a non-empty list"),
                               (["a.png", 3], "line 1: reference must be a path or a non-empty list")):
        (tmp_path / "bad.jsonl").write_text(json.dumps({**good, "reference": reference}) + "\n")
        with pytest.raises(DatasetError, match=message):
            load_dataset(tmp_path / "bad.jsonl")


def test_viton_hd_folder_pairs_paired_and_unpaired(tmp_path):
    test = tmp_path / "test"
    for sub, names in (("image", ["00001_00.jpg", "00002_00.jpg"]), ("cloth", ["00001_00.jpg", "00003_00.jpg"]),
                       ("cloth-mask", ["00001_00.jpg", "00003_00.jpg"]),
                       ("agnostic-mask", ["00001_00_mask.png", "00002_00_mask.png"])):
        (test / sub).mkdir(parents=True)
        for name in names:
            tiny_models.image(0).save(test / sub / name)
    (tmp_path / "test_pairs.txt").write_text("00001_00.jpg 00001_00.jpg\n00002_00.jpg 00003_00.jpg\n")
    paired, unpaired = load_dataset(test)
    assert paired.id == "00001_00" and paired.ground_truth == test / "image" / "00001_00.jpg"
    assert paired.mask == test / "agnostic-mask" / "00001_00_mask.png"
    assert paired.ref_mask == test / "cloth-mask" / "00001_00.jpg"
    assert unpaired.id == "00002_00__00003_00" and unpaired.ground_truth is None
    assert unpaired.reference == test / "cloth" / "00003_00.jpg"
    (tmp_path / "test_pairs.txt").write_text("00001_00.jpg 00009_00.jpg\n")
    with pytest.raises(DatasetError, match="line 1: cloth file not found"):
        load_dataset(test)
