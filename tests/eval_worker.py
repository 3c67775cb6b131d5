"""`i2am eval --demo` as the eval tests run it, under `accelerate launch` or alone.

    python tests/eval_worker.py OUT [--samples N] [--steps S] [--kill-at K] [--protocol P ...]

The FID/KID feature extractor is TinyFeatures, a small fixed conv net standing in for the
Inception (tests only). --kill-at K: the process SIGKILLs itself as it starts its K-th
sample (counting from 0 over the samples it runs), as a crash would. Every sample a process
generates is appended to OUT/generated.log, so a test can see what was redone.
"""
import argparse
import os
import signal

import torch
from torch import nn

from i2am.evaluation import DemoTask, evaluate


class TinyFeatures(nn.Module):
    """uint8 (N, 3, H, W) -> (N, 8): a seeded conv, a ReLU and a global mean, scaled so that the
    FID of the demo's images is of order 1."""

    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, images):
        return 100 * torch.relu(self.conv(images.float() / 255)).mean((2, 3))


class Logged:
    """The demo task, logging each generation and crashing where told to."""

    def __init__(self, task, log, kill_at):
        self.task, self.log, self.kill_at, self.started = task, log, kill_at, 0
        self.settings, self.correlated = task.settings, task.correlated

    def run(self, sample, protocol, seed):
        with open(self.log, "a") as f:
            f.write(f"{sample.id}\n")
        if self.started == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.started += 1
        return self.task.run(sample, protocol, seed)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--protocol", nargs="+", default=["paper"])
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    demo = DemoTask(samples=args.samples, steps=args.steps)
    task = Logged(demo, os.path.join(args.out, "generated.log"), args.kill_at)
    evaluate(task, demo.samples(), args.out, protocols=args.protocol, features=TinyFeatures(), progress=False)


if __name__ == "__main__":
    main()
