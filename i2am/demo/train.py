"""Train the demo model: `python -m i2am.demo.train [--out PATH] [--minutes N] [--seed S] [--threads T]`.

Every setting lives in TRAINING and model.DEFAULT_CONFIG, so the shipped weights can be
reproduced on a CPU. It writes the weights, config.json (model + training settings) and
train_log.json (the loss curve) next to each other.
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from diffusers.optimization import get_cosine_schedule_with_warmup

from .data import make_batch
from .model import DEFAULT_CONFIG, WEIGHTS, build_pipeline, denoiser_input, save_weights, to_latent, training_scheduler

TRAINING = {
    "seed": 0,
    "steps": 3000,
    "batch_size": 16,
    "learning_rate": 1e-3,
    "warmup_steps": 100,
    "weight_decay": 0.0,
    "grad_clip": 1.0,
    "null_reference_prob": 0.1,  # the unconditional branch of classifier-free guidance
    "threads": 2,
    "log_every": 25,
}


def regression_target(scheduler, clean, noise, timesteps):
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    return clean


def train(model_config=DEFAULT_CONFIG, settings=TRAINING, minutes=None, report=print):
    """Train from scratch; returns (pipeline, log). `minutes` stops early (then not reproducible)."""
    torch.manual_seed(settings["seed"])
    data = torch.Generator().manual_seed(settings["seed"] + 1)
    pipe = build_pipeline(model_config)
    unet, encoder = pipe.unet, pipe.reference_encoder
    scheduler = training_scheduler(model_config)
    params = list(unet.parameters()) + list(encoder.parameters())
    optimizer = torch.optim.AdamW(params, settings["learning_rate"], weight_decay=settings["weight_decay"])
    lr = get_cosine_schedule_with_warmup(optimizer, settings["warmup_steps"], settings["steps"])
    log = {"step": [], "loss": [], "seconds": []}
    start, running = time.time(), []
    for step in range(1, settings["steps"] + 1):
        batch = make_batch(settings["batch_size"], generator=data)
        n = len(batch["target"])
        tokens = encoder(batch["reference"])
        drop = torch.rand(n) < settings["null_reference_prob"]
        tokens = torch.where(drop[:, None, None], encoder.null_tokens(n), tokens)

        clean = to_latent(batch["target"], model_config["fold"])
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (n,))
        noisy = scheduler.add_noise(clean, noise, timesteps)
        pred = unet(denoiser_input(noisy, batch["masked"], batch["mask"], model_config["fold"]), timesteps, encoder_hidden_states=tokens).sample
        loss = F.mse_loss(pred, regression_target(scheduler, clean, noise, timesteps))

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings["grad_clip"])
        optimizer.step()
        lr.step()
        running.append(loss.item())
        elapsed = time.time() - start
        if step % settings["log_every"] == 0 or step == settings["steps"]:
            log["step"].append(step)
            log["loss"].append(sum(running) / len(running))
            log["seconds"].append(round(elapsed, 1))
            report(f"step {step}/{settings['steps']}  loss {log['loss'][-1]:.4f}  {elapsed / 60:.1f} min")
            running = []
        if minutes is not None and elapsed > minutes * 60:
            report(f"stopped at step {step}: the {minutes} minute budget is spent")
            break
    return pipe, log


def main(argv=None):
    parser = argparse.ArgumentParser(description="Train the i2am demo model on CPU.")
    parser.add_argument("--out", default=WEIGHTS, help="weights file; config.json and train_log.json go beside it")
    parser.add_argument("--minutes", type=float, default=None, help="stop early after this many minutes")
    parser.add_argument("--seed", type=int, default=TRAINING["seed"])
    parser.add_argument("--steps", type=int, default=TRAINING["steps"])
    parser.add_argument("--threads", type=int, default=TRAINING["threads"],
                        help="CPU threads; 1 is faster when other jobs share the cores (same results)")
    args = parser.parse_args(argv)
    settings = dict(TRAINING, seed=args.seed, steps=args.steps, threads=args.threads)
    torch.set_num_threads(settings["threads"])

    pipe, log = train(DEFAULT_CONFIG, settings, minutes=args.minutes)
    folder = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(folder, exist_ok=True)
    save_weights(pipe, args.out)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model": DEFAULT_CONFIG, "training": settings}, f, indent=1)
    with open(os.path.join(folder, "train_log.json"), "w") as f:
        json.dump(log, f)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB), final loss {log['loss'][-1]:.4f}")


if __name__ == "__main__":
    main()
