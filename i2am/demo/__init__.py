"""The embedded demo: a tiny reference-based inpainting model trained on synthetic try-on data.

data.make_batch / data.examples   seeded images with a known warp (data.true_patch, data.probe_points)
model.load_pipeline               the shipped weights as a diffusers pipeline (CFG, DDIM)
train                             `python -m i2am.demo.train` reproduces the shipped weights
run.run_demo                      `i2am demo`: traced generations, reports, correspondence accuracy
"""
from .run import run_demo

__all__ = ["run_demo"]
