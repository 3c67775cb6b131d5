"""Dataset evaluation (`i2am eval`): the paper's Table 2 for a model, on one process or many.

    from i2am.evaluation import DemoTask, evaluate, run_eval
    task = DemoTask(samples=32, steps=10)
    evaluate(task, task.samples(), "eval-out", protocols=["paper"])
    run_eval("eval-out", demo=True)   # the same in one call, as `i2am eval --demo --out eval-out`

datasets   Sample, load_dataset (a JSONL manifest or a VITON-HD-like folder)
tasks      DemoTask, PipelineTask: one traced generation of a sample under a protocol
metrics    SSIM, LPIPS, FID, KID from torchmetrics
runner     evaluate: sharding (accelerate), resumable per-sample results, gathering
summary    summary.md: the table row, correlations (scipy), scatter plots
run        run_eval: `i2am eval` (the options checked, the task and samples made, evaluated)
"""
from ..protocols import PROTOCOLS
from .datasets import Sample, load_dataset
from .run import run_eval
from .runner import evaluate
from .tasks import DemoTask, PipelineTask

__all__ = ["PROTOCOLS", "DemoTask", "PipelineTask", "Sample", "evaluate", "load_dataset", "run_eval"]
