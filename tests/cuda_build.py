"""Building the CUDA C++ library (CMakeLists.txt) for the tests: for a GPU, or as its host emulation."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def cmake_build(build_dir, *options):
    """Configure and build the repository's CMakeLists.txt in build_dir; returns the library folder."""
    lib_dir = build_dir / "lib"
    jobs = str(min(8, os.cpu_count() or 1))
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build_dir), f"-DI2AM_LIB_DIR={lib_dir}", "-DI2AM_WERROR=ON",
                 *options],
                ["cmake", "--build", str(build_dir), "-j", jobs]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"
    return lib_dir


def require_toolchain():
    missing = [tool for tool in ("cmake", "nvcc") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the CUDA library needs {' and '.join(missing)} on PATH")
