"""The `i2am` command's argument checks: every bad argument exits 2 with one line, before a model loads."""
import pytest

from i2am.cli import main
from test_cli import cli, inputs, run_args  # noqa: F401 (inputs is a fixture)
from test_viz import tiny_maps


def one_line_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def test_bad_out_found_before_the_model_loads(capsys, inputs, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for out, message in ((blocker, "is a file, not a folder"), (blocker / "report", "is a file, not a folder")):
        # tmp_path is not a model folder: a check after loading would report that instead
        code, _, err = cli(capsys, *run_args(inputs, tmp_path, out))
        one_line_error(code, err, "--out", str(blocker), message)
    tiny_maps().save(tmp_path / "maps.safetensors")
    code, _, err = cli(capsys, "show", tmp_path / "maps.safetensors", "--out", blocker / "figures")
    one_line_error(code, err, "--out", message)
    code, _, err = cli(capsys, "eval", "--demo", "--out", blocker / "eval")
    one_line_error(code, err, "--out", message)


@pytest.mark.parametrize("extra, needles", [
    (["--device", "bogus"], ["--device 'bogus'", "not a torch device"]),
    (["--device", "cuda"], ["--device cuda", "no CUDA device"]),
    (["--device", "cuda:0"], ["--device cuda:0", "no CUDA device"]),
    (["--backend", "cuda"], ["--backend cuda", "needs a CUDA device"]),
    (["--backend", "triton"], ["--backend triton", "needs a CUDA device"]),
])
def test_devices_and_backends_without_support_exit_2(capsys, monkeypatch, inputs, tmp_path, extra, needles):
    monkeypatch.delenv("TRITON_INTERPRET")  # the tests' CPU interpreter would make triton available
    code, _, err = cli(capsys, *run_args(inputs, tmp_path, tmp_path / "out"), *extra)
    one_line_error(code, err, *needles)
    if extra[0] == "--device":
        for command in (["demo", "--out", tmp_path / "demo"], ["bench", "--quick"],
                        ["eval", "--demo", "--out", tmp_path / "eval"]):
            code, _, err = cli(capsys, *command, *extra)
            one_line_error(code, err, *needles)


@pytest.mark.parametrize("bad, needle", [
    (["--alpha", "7"], "--alpha: 7 is not in [0, 1]"),
    (["--alpha", "-0.1"], "--alpha: -0.1 is not in [0, 1]"),
    (["--threshold", "nan"], "--threshold: nan is not in [0, 1]"),
    (["--threshold", "1.5"], "--threshold: 1.5 is not in [0, 1]"),
    (["--threshold", "x"], "--threshold: 'x' is not a number"),
    (["--points", "-1,2"], "--points: -1,2: coordinates must be >= 0"),
    (["--boxes", "0,0,-2,3"], "--boxes: 0,0,-2,3: coordinates must be >= 0"),
])
def test_display_ranges_and_negative_coordinates_exit_2(capsys, inputs, tmp_path, bad, needle):
    with pytest.raises(SystemExit) as exit_:
        main([str(a) for a in run_args(inputs, tmp_path, tmp_path / "out")] + bad)
    assert exit_.value.code == 2 and needle in capsys.readouterr().err
    if bad[0] in ("--alpha", "--threshold"):
        with pytest.raises(SystemExit) as exit_:
            main(["show", "maps.safetensors", "--out", str(tmp_path / "o")] + bad)
        assert exit_.value.code == 2 and needle in capsys.readouterr().err
