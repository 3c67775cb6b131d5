"""i2am: fused attention kernels for I2AM attribution maps.

Two packages come from this repository: ``i2am`` (the analysis layer, ``i2am/``) and
``i2am.kernels`` (the kernel layer, the top-level ``kernels/`` folder).
"""
import sys

from setuptools import find_packages, setup

install_requires = [
    "torch>=2.4",
    "numpy",
    "diffusers>=0.30",
    "safetensors",
    "pillow",
    "matplotlib",
    "tqdm",
]
if sys.platform.startswith("linux"):
    install_requires.append("triton>=3.0")

setup(
    name="i2am",
    version="0.1.0",
    description="Fused attention kernels for I2AM attribution maps of image-to-image diffusion models",
    python_requires=">=3.10",
    packages=find_packages(include=["i2am", "i2am.*"]) + ["i2am.kernels"],
    package_data={"i2am": ["demo/*.safetensors", "demo/*.json"]},
    package_dir={"i2am": "i2am", "i2am.kernels": "kernels"},
    install_requires=install_requires,
    extras_require={"test": ["pytest", "pytest-benchmark", "transformers"]},
    entry_points={"console_scripts": ["i2am = i2am.cli:main"]},
)
