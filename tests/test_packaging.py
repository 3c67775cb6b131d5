"""The package imports and runs from a checkout: the repository root on sys.path (`python -m pytest`,
`python -m i2am` there) must not hide Hugging Face's `kernels` package behind our kernels/ folder."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_checkout(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_top_level_kernels_is_hugging_face_s_from_the_checkout():
    r = run_in_checkout("-c", "import kernels, transformers.modeling_utils, i2am.kernels; "
                              "print(kernels.__file__); print(i2am.kernels.__file__)")
    assert r.returncode == 0, r.stderr
    hf, ours = r.stdout.split()
    assert os.path.realpath(os.path.dirname(hf)) != os.path.realpath(os.path.join(ROOT, "kernels"))
    assert os.path.realpath(os.path.dirname(ours)) == os.path.realpath(os.path.join(ROOT, "kernels"))


def test_eval_help_runs_from_the_checkout():
    r = run_in_checkout("-m", "i2am", "eval", "--help")
    assert r.returncode == 0, r.stderr
    assert "--demo" in r.stdout


# Records the threading policy at the moment torch is first imported (OpenMP reads it only then).
WATCH_TORCH_IMPORT = """
import os, sys
class Watch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "seen" not in Watch.__dict__:
            Watch.seen = os.environ.get("OMP_WAIT_POLICY")
        return None
sys.meta_path.insert(0, Watch())
import i2am
assert "torch" not in sys.modules, "import i2am loaded torch"
import i2am.cli
print(Watch.seen)
"""


@pytest.mark.parametrize("given, expected", [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_the_command_sets_the_threading_policy_before_torch_loads(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    r = subprocess.run([sys.executable, "-c", WATCH_TORCH_IMPORT], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [expected]
