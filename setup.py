"""i2am: fused attention kernels for I2AM attribution maps.

Two packages come from this repository: ``i2am`` (the analysis layer, ``i2am/``) and
``i2am.kernels`` (the kernel layer, the top-level ``kernels/`` folder).
"""
import os
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

install_requires = [
    "torch>=2.4",
    "numpy",
    "diffusers>=0.30",
    "safetensors",
    "pillow",
    "matplotlib",
    "tqdm",
]
# Triton is not a base requirement: torch's CUDA builds bring their own, and a CPU machine needs it
# only for the test suite, which runs the Triton kernel in its interpreter (the test extra).
EVAL = ["accelerate>=0.26", "torchmetrics>=1.0", "scipy"]


# ---- optional CUDA library (kernels/cuda, CMakeLists.txt) ---------------------------------------
# I2AM_BUILD_CUDA=1 builds libi2am_cuda.so into i2am.kernels, =0 never; unset: only when cmake and
# nvcc are on PATH and `nvidia-smi -L` lists a GPU, so CPU machines (CI) install in seconds. A
# failed build warns and installs without it; backend="cuda" then says how to build it.
def _build_cuda_library():
    wanted = os.environ.get("I2AM_BUILD_CUDA", "auto")
    if wanted != "auto":
        return wanted == "1"
    tools = all(shutil.which(t) for t in ("cmake", "nvcc", "nvidia-smi"))
    return tools and subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


class BuildCudaLibrary(build_ext):
    def get_ext_filename(self, fullname):  # the plain name cuda_backend.py loads, not a Python module name
        name = super().get_ext_filename(fullname)
        return os.path.join(os.path.dirname(name), "libi2am_cuda.so")

    def build_extension(self, ext):
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        build_dir = os.path.join(os.path.abspath(self.build_temp), "cuda")
        subprocess.run(["cmake", "-S", os.path.dirname(os.path.abspath(__file__)), "-B", build_dir,
                        f"-DI2AM_LIB_DIR={out_dir}"], check=True)
        subprocess.run(["cmake", "--build", build_dir, "-j", str(os.cpu_count() or 1)], check=True)

    def run(self):
        try:
            super().run()
        except Exception as e:  # never fail the install for the optional library
            print(f"WARNING: libi2am_cuda.so was not built ({e}); backend='cuda' stays unavailable", file=sys.stderr)


cuda_build = {"ext_modules": [Extension("i2am.kernels.libi2am_cuda", sources=[])],
              "cmdclass": {"build_ext": BuildCudaLibrary}} if _build_cuda_library() else {}

setup(
    name="i2am",
    version="0.1.0",
    description="Fused attention kernels for I2AM attribution maps of image-to-image diffusion models",
    python_requires=">=3.10",
    packages=find_packages(include=["i2am", "i2am.*"]) + ["i2am.kernels"],
    package_data={"i2am": ["demo/*.safetensors", "demo/*.json"]},
    package_dir={"i2am": "i2am", "i2am.kernels": "kernels"},
    install_requires=install_requires,
    # `i2am eval`: sharding, metrics, correlations. LPIPS (torchvision) and the FID Inception
    # (torch-fidelity) are the user's to add with their weights: a PyPI torchvision is built for
    # CUDA torch and would break a CPU install
    extras_require={"eval": EVAL, "test": ["pytest", "pytest-benchmark", "transformers",
                                           "triton>=3.0; platform_system == 'Linux'", *EVAL]},
    entry_points={"console_scripts": ["i2am = i2am.cli:main"]},
    **cuda_build,
)
