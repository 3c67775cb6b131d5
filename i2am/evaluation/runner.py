"""The evaluation loop: samples sharded over processes, one result file per sample, resumable.

Under `accelerate launch` (or torchrun) every process takes its share of the unfinished
samples; one process alone takes them all. Each finished sample leaves samples/ID.png (the
generated image) and then samples/ID.json (its scores), both written to a temporary name and
renamed, so a killed run leaves whole results or none: the same command run again redoes only
the samples without a .json. The output folder is shared by the processes (on several machines
it must be a shared file system). When every sample is done, the FID and KID are computed with
each process feeding its contiguous slice of the set to torchmetrics, which reduces the
statistics across processes; the main process then writes samples.jsonl, summary.md and the
scatter plots. The real images of FID and KID are the samples' images to inpaint, or an editor's
ground truths (Sample.real): a set where some sample has none leaves them out and says why.
"""
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..inputs import InputError, check_protocols
from . import metrics, summary
from .datasets import check_samples
from .tasks import as_uint8

SETTINGS_FILE, SAMPLES_FILE, RESULTS_DIR = "settings.json", "samples.jsonl", "samples"


class SampleError(RuntimeError):
    """A sample failed during its generation or scoring; the message names it."""


class SettingsMismatch(InputError):
    """The output folder holds results made with other settings: resuming would mix them."""


def evaluate(task, samples, out, *, protocols=("paper",), seed=0, features=None, inception_weights=None,
             save_maps=False, device="cpu", progress=True):
    """Run `task` over `samples` into the folder `out`; returns the summary dict (main process).

    features: a module standing in for the Inception as the FID/KID feature extractor (uint8
    (N, 3, H, W) -> (N, d)); otherwise the Inception from the local file inception_weights.
    seed: sample i is generated from seed + i, or from its own seed plus `seed`.
    """
    from accelerate import PartialState
    from tqdm import tqdm

    protocols = check_protocols(protocols)
    samples = check_samples(samples)  # every id a file name inside `out`, before any generation
    state = PartialState()
    out = Path(out)
    results = out / RESULTS_DIR
    settings = {**task.settings, "protocols": protocols, "seed": seed, "samples": len(samples)}
    if state.is_main_process:
        results.mkdir(parents=True, exist_ok=True)
        _claim(out / SETTINGS_FILE, settings)
    state.wait_for_everyone()

    paired = metrics.PairedMetrics(device)
    pending = [s for s in samples if not (results / f"{s.id}.json").is_file()]
    mine = pending[state.process_index::state.num_processes]
    if state.is_main_process and len(pending) < len(samples):
        print(f"resuming: {len(samples) - len(pending)} of {len(samples)} samples already done", flush=True)
    for sample in tqdm(mine, desc="i2am eval", unit="sample", disable=not (progress and state.is_main_process)):
        try:
            record = _evaluate_sample(task, sample, protocols, seed, paired, results if save_maps else None)
        except Exception as err:
            raise SampleError(f"{sample.source or f'sample {sample.index}'} (id {sample.id!r}): {err}") from err
        record["settings"] = settings
        _write_atomic(results / f"{sample.id}.png", lambda p, img=record.pop("_image"): _save_png(img, p))
        _write_atomic(results / f"{sample.id}.json", lambda p, r=record: p.write_text(json.dumps(r) + "\n"))
    state.wait_for_everyone()

    set_scores, missing = _set_metrics(samples, results, features, inception_weights, state, seed, device)
    missing = paired.missing + missing
    if not state.is_main_process:
        return None
    for line in missing:
        print(line, flush=True)
    records = [json.loads((results / f"{s.id}.json").read_text()) for s in samples]
    with open(out / SAMPLES_FILE, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return summary.write(out, records, set_scores, settings, missing, paired.names, task.correlated, protocols)


def _evaluate_sample(task, sample, protocols, seed, paired, maps_dir):
    """The record of one sample: its traced runs (one per protocol), IMACS and paired metrics."""
    # imported here: report draws with matplotlib, which importing i2am.evaluation (the command's
    # help shows its data-set text) does not load
    from ..report import imacs_scores

    sample_seed = seed + (sample.index if sample.seed is None else sample.seed)
    record = {"id": sample.id, "index": sample.index, "seed": sample_seed, "scores": {}}
    image = None
    for protocol in protocols:
        gen = task.run(sample, protocol, sample_seed)
        image = gen.image if image is None else image  # tracing leaves the output as it is: one image
        record["scores"][protocol] = {**imacs_scores(gen.maps, gen.ref_mask), **gen.scores}
        if maps_dir is not None:
            gen.maps.save(maps_dir / f"{sample.id}.{protocol}.safetensors")
    if gen.ground_truth is not None:
        record.update(paired(image, gen.ground_truth))
    record["_image"] = image
    return record


def _set_metrics(samples, results, features, inception_weights, state, seed, device):
    """({"FID", "KID", "KID_std"} or {}, the lines saying what was left out), on every process."""
    unreal = sum(s.real is None for s in samples)
    if unreal:
        return {}, [f"FID and KID left out: {unreal} of {len(samples)} samples have no real image (an edited "
                    "sample's real image is its ground truth: give every sample a ground_truth to add them)"]
    if features is None:
        why = metrics.inception_missing(inception_weights)
        if why:
            return {}, [why]
        features = metrics.inception(inception_weights)
    if len(samples) < 2:
        return {}, ["FID and KID left out: they need at least 2 samples"]
    scores = metrics.SetMetrics(features.to(device), len(samples), device)
    for i in np.array_split(np.arange(len(samples)), state.num_processes)[state.process_index]:
        s = samples[i]
        scores.update(as_uint8(results / f"{s.id}.png"), as_uint8(s.real))
    return scores.compute(seed), []


def _claim(path, settings):
    """Record the run's settings in a new folder; in a used one, insist they are the same."""
    if path.is_file():
        before = json.loads(path.read_text())
        if before != json.loads(json.dumps(settings)):
            changed = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
            raise SettingsMismatch(f"{path.parent} holds results made with other settings ({', '.join(changed)} "
                                   "differ): resume with the same command, or choose a new output folder")
        return
    _write_atomic(path, lambda p: p.write_text(json.dumps(settings, indent=2) + "\n"))


def _write_atomic(path, write):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_png(image, path):
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, format="PNG")
