"""Reliability, round two: results that stay in their folder, every step kept, inputs read at
their own bit depth, undefined scores, compile and deepcopy, and the smaller misuse cases."""
import copy
import json
import threading
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import i2am
from i2am import AttributionMaps, Recorder
from i2am.kernels import attention_with_maps, prepare

import tiny_models as tm
from test_cli import inputs, tiny_pipeline  # noqa: F401 (fixtures)
from test_reliability import REF_GRID, qkv, unet_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- maps never carry autograd history, whatever the probes ----------------------------------
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_probes_with_requires_grad_leave_no_history(backend):
    q, k, v = qkv()
    key_probes = torch.rand(2, 13).requires_grad_()
    query_probes = torch.rand(3, 24).requires_grad_()
    acc = {"gen_query": torch.zeros(2, 2, 2, 24), "ref_key": torch.zeros(2, 2, 3, 13)}
    for _ in range(2):
        _, maps = attention_with_maps(q, k, v, key_probes=key_probes, query_probes=query_probes, backend=backend,
                                      accumulate=acc)
        assert all(m.grad_fn is None and not m.requires_grad for m in maps.values())
    _, fresh = attention_with_maps(q, k, v, key_probes=key_probes, query_probes=query_probes, backend=backend)
    assert all(m.grad_fn is None and not m.requires_grad for m in fresh.values())


# ---- the smaller misuse cases -----------------------------------------------------------------
def test_buffers_made_under_inference_mode_take_a_later_step_outside_it():
    unet = tm.unet(9)
    with i2am.trace(unet, ref_grid=REF_GRID, num_steps=2) as tc:
        with torch.inference_mode():
            unet(**unet_inputs(0))
        with torch.no_grad():
            unet(**unet_inputs(1))
    assert tc.maps().generated().isfinite().all()
    q, k, v = qkv()
    with torch.inference_mode():
        _, acc = attention_with_maps(q, k, v, backend="torch")
    attention_with_maps(q, k, v, backend="torch", accumulate=acc)  # the returned maps accumulate later


def test_float64_inputs_give_float64_accuracy():
    q, k, v = qkv(Nq=20, Nk=11, d=16, dtype=torch.float64, seed=3)
    out, _ = attention_with_maps(q, k, v, backend="torch")
    want = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_a_prepared_call_refuses_buffers_of_the_wrong_shape():
    q, k, v = qkv()
    call = prepare(q, k, v, backend="torch")
    bad = {name: torch.zeros(shape[0], shape[1], shape[2], shape[3] + 1) for name, shape in call.shapes.items()}
    with pytest.raises(ValueError, match="gen_query"):
        call(q, k, v, bad)
    with pytest.raises(ValueError, match="float32"):
        call(q, k, v, {name: torch.zeros(shape, dtype=torch.float64) for name, shape in call.shapes.items()})


def test_step_takes_numpy_integers_and_refuses_floats():
    with i2am.recording(latent_size=(4, 4), num_steps=3, ref_grid=(2, 2)) as rec:
        assert rec.step(np.int64(2)) == 2 and isinstance(rec.current_step, int)
        with pytest.raises(TypeError, match="step"):
            rec.step(1.0)


def test_a_call_from_another_thread_is_recorded_or_reported():
    q, k, v = qkv(B=1, Nq=16, Nk=4)
    layer = torch.nn.Linear(1, 1)
    model = torch.nn.Sequential(layer)
    with i2am.recording(model, ref_grid=(2, 2), num_steps=1) as rec:
        rec.recorder.set_latent_size((4, 4))
        rec.step()
        errors = []
        thread = threading.Thread(target=lambda: errors.append(i2am.attention(q, k, v, layer=layer)))
        thread.start()
        thread.join()
    assert rec.maps().layers and len(rec.maps().layers) == 1  # the module names its recording
    with i2am.recording(latent_size=(4, 4), num_steps=1, ref_grid=(2, 2)) as rec:
        rec.step()
        with pytest.warns(RuntimeWarning, match="another thread"):
            thread = threading.Thread(target=lambda: i2am.attention(q, k, v, layer="blocks.0"))
            thread.start()
            thread.join()


def test_a_reversed_ref_keys_slice_is_the_reversed_index_list():
    q, k, v = qkv()
    probes = torch.rand(2, 12)
    sliced = attention_with_maps(q, k, v, ref_keys=slice(12, 0, -1), key_probes=probes, backend="torch")[1]
    listed = attention_with_maps(q, k, v, ref_keys=torch.arange(12, 0, -1), key_probes=probes, backend="torch")[1]
    for name in sliced:
        torch.testing.assert_close(sliced[name], listed[name])
    with i2am.recording(latent_size=(4, 6), num_steps=1, ref_grid=(3, 4), ref_keys=slice(12, 0, -1)) as rec:
        rec.step()
        i2am.attention(q, k, v, layer="blocks.0")
    assert rec.maps().reference().shape == (3, 4)
    with pytest.raises(ValueError, match="ref_keys selects no index"):
        attention_with_maps(q, k, v, ref_keys=slice(5, 2), backend="torch")


# ---- an undefined score is None with its reason, never 0.0 ---------------------------------------
def one_token_maps(protocol="paper"):
    """Maps of a one-reference-token model (Paint-by-Example: a 1x1 reference grid) with a mask."""
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1
    rec = Recorder(ref_grid=(1, 1), latent_size=(8, 8), num_steps=1, mask=mask, backend="torch", protocol=protocol)
    g = torch.Generator().manual_seed(0)
    for name, nq in (("down.attn2", 16), ("up.attn2", 64)):  # official M_r: the layer at half resolution
        rec.record(name, *(torch.randn(1, 2, n, 8, generator=g) for n in (nq, 2, 2)), step=0)
    return rec.maps()


@pytest.mark.parametrize("protocol", ["paper", "official"])
def test_imacs_of_a_constant_map_is_none_with_the_reason(protocol):
    ref_mask = torch.zeros(6, 6)
    ref_mask[1:4, 1:4] = 1
    scores = one_token_maps(protocol).imacs(ref_mask=ref_mask)
    assert scores["ref"] is None and "1x1 reference grid" in scores["undefined"]["ref"]
    assert isinstance(scores["gen"], float) and "gen" not in scores["undefined"]


def test_reports_and_eval_summaries_leave_an_undefined_score_out(tmp_path, capsys):
    from i2am.cli import _print_scores
    from i2am.evaluation import summary
    from i2am.report import write_report

    ref_mask = torch.zeros(6, 6)
    ref_mask[1:4, 1:4] = 1
    scores = write_report(tmp_path / "r", one_token_maps(), ref_mask=ref_mask)
    saved = json.loads((tmp_path / "r" / "scores.json").read_text())
    assert saved["IMACS_r"] is None and "1x1" in saved["undefined"]["IMACS_r"]
    assert "| IMACS_r | undefined (the reference map is constant" in (tmp_path / "r" / "report.md").read_text()
    _print_scores(scores, tmp_path / "r")
    assert "IMACS_r: undefined (the reference map is constant" in capsys.readouterr().out
    records = [{"id": str(i), "scores": {"paper": {"IMACS_g": g, "IMACS_r": r, **extra}}}
               for i, (g, r, extra) in enumerate([(0.5, None, {"undefined": {"IMACS_r": "constant"}}),
                                                  (0.25, 0.75, {})])]
    result = summary.write(tmp_path, records, {}, {}, [], [], [], ["paper"])
    assert result["protocols"]["paper"] == {"IMACS_g": 0.375, "IMACS_r": 0.75}


# ---- saved maps are checked on loading; IMACS_r without a generated layer set --------------------
def test_load_checks_every_buffer_against_the_metadata(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "maps.safetensors"
    one_token_maps().save(path)
    assert AttributionMaps.load(path).imacs()["gen"] is not None
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {n: f.get_tensor(n) for n in f.keys()}
    bad = tmp_path / "bad.safetensors"
    for name, wrong in (("gen/up.attn2", lambda t: t[..., :-1].contiguous()),  # a plausible smaller map
                        ("ref/down.attn2", lambda t: torch.cat([t, t], 3)),
                        ("gen/down.attn2", lambda t: t.double())):
        save_file({**tensors, name: wrong(tensors[name])}, str(bad), metadata=meta)
        with pytest.raises(ValueError, match=f"bad.safetensors.*{name}"):
            AttributionMaps.load(bad)
    for raw in ("[]", json.dumps({**json.loads(meta["i2am"]), "layers": []}),
                json.dumps({**json.loads(meta["i2am"]), "layer_grids": []})):
        save_file(tensors, str(bad), metadata={"i2am": raw})
        with pytest.raises(ValueError, match="bad.safetensors"):
            AttributionMaps.load(bad)


def test_official_imacs_r_without_a_generated_layer_set():
    """Only layers whose keys lie on their own grid (StableVITON's warp blocks): no official M_g,
    IMACS_r still defined."""
    mask = torch.zeros(8, 8)
    mask[2:6, 2:6] = 1
    rec = Recorder(ref_grid="layer", latent_size=(8, 8), num_steps=1, mask=mask, backend="torch",
                   protocol="official")
    g = torch.Generator().manual_seed(0)
    for name, n in (("warp.0", 16), ("warp.1", 64)):
        rec.record(name, *(torch.randn(1, 2, n, 8, generator=g) for _ in range(3)), step=0)
    maps = rec.maps()
    ref_mask = torch.zeros(8, 8)
    ref_mask[1:5, 2:7] = 1
    scores = maps.imacs(ref_mask=ref_mask)
    assert isinstance(scores["ref"], float) and scores["gen"] is None
    assert "generated layer set" in scores["undefined"]["gen"]


# ---- images and masks of any bit depth are scaled by their type's range --------------------------
def sixteen_bit(tmp_path):
    """A 16-bit PNG: left half 20000 (0.31 of full white), right half 40000 (0.61)."""
    a = np.full((8, 12), 20000, np.uint16)
    a[:, 6:] = 40000
    Image.fromarray(a).save(tmp_path / "g16.png")
    return tmp_path / "g16.png", a


def test_sixteen_bit_images_and_masks_are_scaled_not_clipped(tmp_path):
    from i2am.evaluation import tasks
    from i2am.inputs import as_mask, open_image, to_pil

    path, a = sixteen_bit(tmp_path)
    want = np.round(a / 65535 * 255)
    for image in (open_image(path, "image"), open_image(Image.open(path), "reference"), to_pil(tasks.as_uint8(path)),
                  to_pil(Image.open(path)), to_pil(a)):
        got = np.asarray(image)
        assert image.mode == "RGB" and np.array_equal(got[..., 0], want), got[0, :, 0]
    inside = torch.zeros(8, 12, dtype=torch.bool)
    inside[:, 6:] = True
    for mask in (Image.open(path), a, open_image(path, "mask", mode="L"), Image.fromarray(a.astype(np.int32), "I"),
                 Image.fromarray((a / 65535).astype(np.float32), "F")):
        assert torch.equal(as_mask(mask), inside), type(mask)
    with pytest.raises(ValueError, match="mask.*mode F.*values in \\[0, 1\\]"):
        as_mask(Image.fromarray(np.full((4, 4), 3.0, np.float32), "F"))


# ---- i2am eval: ids are file names inside --out, bad samples stop the run before generation -----
def manifest(tmp_path, *entries):
    for name in ("p.png", "m.png", "c.png"):
        tm.image(0).save(tmp_path / name)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    good = {"image": "p.png", "mask": "m.png", "reference": "c.png"}
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({**good, **e}) + "\n" for e in entries))
    return tmp_path / "d.jsonl"


@pytest.mark.parametrize("entries, message", [
    ([{"id": "s0"}, {"id": "./s0"}], r"line 2: sample id 's0' appears twice"),
    ([{"id": "s0"}, {"id": "S0"}], r"line 2: sample id 'S0' appears twice"),
    ([{"id": "../x"}], r"line 1: sample id '../x' must be a file name"),
    ([{"id": "a/b"}], r"line 1: sample id 'a/b' must be a file name"),
    ([{"id": "a\\b"}], r"line 1: sample id 'a\\\\b' must be a file name"),
    ([{"id": "ok"}, {"id": "s1", "mask": "bad.png"}], r"line 2: mask .*bad.png is not a readable image.*id 's1'"),
    ([{"id": "s0", "seed": "7"}], r"line 1: seed must be an integer, got '7'.*id 's0'"),
    ([{"id": "s0", "seed": 7.9}], r"line 1: seed must be an integer, got 7.9.*id 's0'"),
])
def test_manifest_ids_and_samples_are_checked_before_generation(tmp_path, entries, message):
    from i2am.evaluation import load_dataset
    from i2am.evaluation.datasets import DatasetError

    with pytest.raises(DatasetError, match=message):
        load_dataset(manifest(tmp_path, *entries))


def test_eval_writes_inside_out_and_names_the_failing_sample(tmp_path):
    from i2am.evaluation import evaluate, load_dataset
    from i2am.evaluation.datasets import DatasetError, Sample
    from i2am.evaluation.runner import SampleError

    class Task:
        settings, correlated, calls = {}, (), []

        def run(self, sample, protocol, seed):
            self.calls.append(sample.id)
            raise RuntimeError("the model broke")

    task = Task()
    escaping = [Sample(id="../outside", index=0, image=None, mask=None, reference=None)]
    with pytest.raises(DatasetError, match="'../outside' must be a file name"):
        evaluate(task, escaping, tmp_path / "out", features=torch.nn.Identity(), progress=False)
    assert task.calls == [] and not (tmp_path / "outside.json").exists()
    samples = load_dataset(manifest(tmp_path, {"id": "./s0"}))
    assert samples[0].id == "s0"
    with pytest.raises(SampleError, match=r"d.jsonl, line 1 \(id 's0'\): the model broke"):
        evaluate(task, samples, tmp_path / "out", features=torch.nn.Identity(), progress=False)


# ---- i2am run --out: a used folder is refused unless --overwrite, and then nothing stale survives --
def test_run_into_a_used_folder_needs_overwrite_and_leaves_nothing_stale(capsys, inputs, tiny_pipeline, tmp_path):
    from test_cli import cli, run_args

    out = tmp_path / "report"
    code, _, err = cli(capsys, *run_args(inputs, tiny_pipeline, out, "--ref-mask", inputs["ref_mask"]))
    assert code == 0 and (out / "ref_mask.png").is_file(), err
    before = sorted(p.name for p in out.iterdir())
    code, _, err = cli(capsys, *run_args(inputs, tiny_pipeline, out))
    assert code == 2 and f"--out {out} is not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == before  # refused before any work
    code, _, err = cli(capsys, *run_args(inputs, tiny_pipeline, out, "--overwrite"))
    assert code == 0, err
    assert not (out / "ref_mask.png").exists() and "IMACS_r" not in json.loads((out / "scores.json").read_text())
    code, stdout, _ = cli(capsys, "show", out / "maps.safetensors", "--out", tmp_path / "shown")
    assert code == 0 and "IMACS_g" in stdout and "IMACS_r" not in stdout
    kept = sorted(p.name for p in out.iterdir())
    code, _, err = cli(capsys, "show", out / "maps.safetensors", "--out", out)  # rewritten in its own folder
    assert code == 0 and sorted(p.name for p in out.iterdir()) == kept, err
    (out / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, *run_args(inputs, tiny_pipeline, out, "--overwrite"))
    assert code == 2 and "notes.txt" in err and (out / "notes.txt").read_text() == "mine"


# ---- torch.compile and copy.deepcopy around traced models ----------------------------------------
def test_torch_compile_of_the_op_and_of_a_traced_unet_gives_the_eager_maps():
    q, k, v = qkv()
    out, maps = torch.compile(attention_with_maps, backend="eager")(q, k, v, backend="torch")
    want_out, want = attention_with_maps(q, k, v, backend="torch")
    torch.testing.assert_close(out, want_out)
    torch.testing.assert_close(maps, want)
    unet = tm.unet(9)
    results = []
    for compiled in (False, True):
        with torch.no_grad(), i2am.trace(unet, ref_grid=REF_GRID, num_steps=2, points=[(2, 3)]) as tc:
            run = torch.compile(unet, backend="eager") if compiled else unet
            outs = [run(**unet_inputs(seed)).sample for seed in (0, 1)]
        results.append((outs, tc.maps()))
    (eager_outs, eager), (compiled_outs, compiled) = results
    torch.testing.assert_close(compiled_outs, eager_outs)
    assert compiled.num_steps == 2
    torch.testing.assert_close(compiled.generated(by="time"), eager.generated(by="time"))
    torch.testing.assert_close(compiled.specific_reference((2, 3)), eager.specific_reference((2, 3)))


def test_a_traced_model_deep_copies_into_an_untraced_one():
    import tiny_flux as tf

    unet = tm.unet(9)
    inputs = unet_inputs(0)
    with torch.no_grad():
        want = unet(**inputs).sample
    with torch.no_grad(), i2am.trace(unet, ref_grid=REF_GRID, num_steps=1) as tc:
        twin = copy.deepcopy(unet)
        torch.testing.assert_close(twin(**inputs).sample, want)  # the copy runs, and is not the traced model
    assert tc.current_step is None and type(twin.mid_block.attentions[0].transformer_blocks[0].attn2.processor) \
        is type(unet.mid_block.attentions[0].transformer_blocks[0].attn2.processor)
    with i2am.trace(unet, ref_grid=REF_GRID, num_steps=1):  # the copy is free to be traced on its own
        with i2am.trace(twin, ref_grid=REF_GRID, num_steps=1) as twin_trace, torch.no_grad():
            twin(**inputs)
    assert twin_trace.maps().generated().shape == tm.LATENT
    pipe = tf.pipeline()
    flux_inputs = tf.kontext_inputs(batch=1)
    with torch.no_grad():
        want = pipe.transformer(**flux_inputs)[0]
    with i2am.trace(pipe, backend="torch", num_steps=1) as tc, torch.no_grad():
        transformer = copy.deepcopy(pipe.transformer)
        torch.testing.assert_close(transformer(**flux_inputs)[0], want)
        assert tc.current_step is None  # the copy's calls are not the traced model's
    assert all(type(m.processor).__name__ == "FluxAttnProcessor" for m in transformer.modules() if hasattr(m, "processor"))
    with i2am.trace(transformer, backend="torch", num_steps=1) as twin_trace, torch.no_grad():
        transformer(**flux_inputs)
    assert twin_trace.maps().generated().shape == tf.GRID


def test_bench_output_paths_are_made_or_refused_before_the_benchmark(capsys, monkeypatch, tmp_path):
    from i2am import benchmark
    from test_cli import cli

    ran = []
    monkeypatch.setattr(benchmark, "run", lambda *a, **k: ran.append(1) or [])
    target = tmp_path / "new" / "folder" / "bench.json"
    code, _, err = cli(capsys, "bench", "--quick", "--no-pipeline", "--json", target)
    assert code == 0 and json.loads(target.read_text())["rows"] == [], err
    (tmp_path / "file").write_text("")
    code, _, err = cli(capsys, "bench", "--quick", "--no-pipeline", "--json", tmp_path / "file" / "b.json")
    assert code == 2 and "--json" in err and ran == [1]
