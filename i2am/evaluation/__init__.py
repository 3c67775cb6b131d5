"""Dataset evaluation (`i2am eval`): the paper's Table 2 for a model, on one process or many.

    from i2am.evaluation import DemoTask, evaluate
    task = DemoTask(samples=32, steps=10)
    evaluate(task, task.samples(), "eval-out", protocols=["paper"])

datasets   Sample, load_dataset (a JSONL manifest or a VITON-HD-like folder)
tasks      DemoTask, PipelineTask: one traced generation of a sample under a protocol
metrics    SSIM, LPIPS, FID, KID from torchmetrics
runner     evaluate: sharding (accelerate), resumable per-sample results, gathering
summary    summary.md: the table row, correlations (scipy), scatter plots
"""
from ..protocols import PROTOCOLS
from .datasets import Sample, load_dataset
from .runner import evaluate
from .tasks import DemoTask, PipelineTask

__all__ = ["PROTOCOLS", "DemoTask", "PipelineTask", "Sample", "evaluate", "load_dataset"]
