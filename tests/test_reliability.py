"""Autograd, non-finite values and misuse (SPEC section 7): the op, the recorder, the trace, the maps."""
import os
import re
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import i2am
import tiny_models as tm
from i2am import AttributionMaps, Recorder
from i2am.kernels import attention_with_maps, prepare

CPU_BACKENDS = ["torch", "reference", "triton"]  # triton: its CPU interpreter (tests/conftest.py)
REF_GRID = (4, 3)  # the patch_inpainting UNet's keys: CLS + 4 x 3 patches


pytestmark = pytest.mark.usefixtures("one_thread")


def qkv(B=2, H=2, Nq=24, Nk=13, d=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, d, generator=g).to(dtype) for n in (Nq, Nk, Nk)]


def unet_inputs(seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 9, *tm.LATENT, generator=g), timestep=torch.tensor(10),
                encoder_hidden_states=torch.randn(batch, 13, tm.CROSS_DIM, generator=g))


# ---- 1. grad mode -----------------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_out_has_sdpa_gradients_and_maps_no_history(backend):
    q, k, v = (t.requires_grad_() for t in qkv())
    q_, k_, v_ = (t.detach().clone().requires_grad_() for t in (q, k, v))
    weight = torch.randn(2, 2, 24, 40, generator=torch.Generator().manual_seed(1))
    acc = {"gen_query": torch.zeros(1, 2, 1, 24), "ref_key": torch.zeros(1, 2, 1, 12)}
    out, maps = attention_with_maps(q, k, v, record=[1], ref_keys=slice(1, None), backend=backend,
                                    accumulate=acc)
    (out * weight).sum().backward()
    (F.scaled_dot_product_attention(q_, k_, v_) * weight).sum().backward()
    for got, want in ((q, q_), (k, k_), (v, v_)):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-5)
    assert maps is acc and all(m.grad_fn is None and not m.requires_grad for m in acc.values())
    _, fresh = attention_with_maps(q, k, v, backend=backend)
    assert not any(m.requires_grad for m in fresh.values())


def test_backward_through_a_traced_unet_gives_sdpa_gradients():
    unet = tm.unet(9)
    grads = []
    for traced in (False, True):
        unet.zero_grad()
        inputs = unet_inputs()
        inputs["sample"].requires_grad_()
        if traced:
            with i2am.trace(unet, ref_grid=REF_GRID, num_steps=1, points=[(2, 3)]) as tc:
                out = unet(**inputs).sample
            for buffers in tc.recorder.buffers.values():
                assert not buffers.gen.requires_grad and not buffers.ref.requires_grad
            assert not tc.maps().generated().requires_grad
        else:
            out = unet(**inputs).sample
        out.square().sum().backward()
        grads.append([inputs["sample"].grad] + [p.grad for p in unet.parameters()])
    for untraced, traced in zip(*grads):
        torch.testing.assert_close(traced, untraced, rtol=1e-3, atol=5e-5)


MEMORY_SCRIPT = textwrap.dedent("""
    import torch, i2am
    from torch import nn
    torch.manual_seed(0)
    B, H, NQ, NK, D = 2, 8, 1024, 77, 64
    to_q, to_k, to_v = (nn.Linear(H * D, H * D) for _ in range(3))  # parameters: outputs carry history
    x, ctx = torch.randn(B, NQ, H * D), torch.randn(B, NK, H * D)
    heads = lambda t: t.unflatten(-1, (H, D)).transpose(1, 2)
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    with i2am.recording(latent_size=(32, 32), num_steps=20, ref_grid=(7, 11), time_groups=5) as rec:
        for t in range(20):  # grad enabled, as a loop without no_grad
            rec.step()
            out = i2am.attention(heads(to_q(x)), heads(to_k(ctx)), heads(to_v(ctx)), layer="layer")
            assert out.requires_grad
            del out
            if t == 4:
                before = rss()
    buffers = rec.recorder.buffers["layer"]
    print("RESULT", buffers.gen.grad_fn is None and buffers.ref.grad_fn is None, rss() - before)
""")


@pytest.mark.slow
def test_a_loop_without_no_grad_keeps_memory_flat():
    # tensors from 64 KiB up are mapped and unmapped one by one: the resident size is what is live
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    res = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    no_history, growth = next(line for line in res.stdout.splitlines() if line.startswith("RESULT")).split()[1:]
    assert no_history == "True"
    growth = int(growth)
    assert growth < 16 * 2**20, f"memory grew by {growth / 2**20:.0f} MiB over 15 calls"


# ---- 2. non-finite values ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_nan_query_row_gives_sdpa_output_and_nan_maps(backend):
    q, k, v = qkv()
    q[1, 0, 5, 3] = float("nan")
    out, maps = attention_with_maps(q, k, v, backend=backend)
    want = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5, equal_nan=True)
    assert torch.isnan(maps["gen_query"][1, 0]).any() and torch.isfinite(maps["gen_query"][0]).all()


def nan_recording(layer_with_nan="b", step_with_nan=1):
    """Two layers over 3 steps and 3 time groups; NaN enters one layer at one step."""
    rec = i2am.recording(latent_size=(4, 6), num_steps=3, time_groups=3, ref_grid=(2, 2))
    with rec:
        for t in range(3):
            rec.step()
            for name in ("a", "b"):
                q, k, v = qkv(B=1, Nq=24, Nk=4, d=8, seed=t)
                if (name, t) == (layer_with_nan, step_with_nan):
                    q[0, 1, 7, 0] = float("nan")
                i2am.attention(q, k, v, layer=name)
    return rec


def test_nan_in_one_layer_is_reported_with_its_layer_and_time_group():
    rec = nan_recording()
    with pytest.warns(RuntimeWarning, match=r"layer 'b'.*time group 1 \(step 1\)"):
        maps = rec.maps()
    for integrate in (maps.generated, maps.reference, lambda: maps.reference(by="time")):
        with pytest.raises(ValueError, match=r"non-finite.*layer 'b'.*time group 1"):
            integrate()
    with pytest.raises(ValueError, match="layer 'b'"):
        maps.imacs(gen_mask=torch.eye(4, 6))
    assert torch.isfinite(maps.generated(layers="a")).all() and maps.generated(layers="a").max() == 1


def test_finite_recordings_do_not_warn():
    rec = nan_recording(layer_with_nan=None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec.maps().generated()


# ---- 3. misconfiguration found on entering the trace ------------------------------------------
def test_trace_arguments_checked_on_entry():
    unet = tm.unet(9)
    processors = dict(unet.attn_processors)
    with pytest.raises(ValueError, match=r"layers='nothing\.\*' matches none of the 7 attention layers"):
        with i2am.trace(unet, ref_grid=REF_GRID, num_steps=1, layers="nothing.*"):
            pytest.fail("the block must not run")
    with pytest.raises(TypeError, match="layers must be"):
        i2am.trace(unet, ref_grid=REF_GRID, num_steps=1, layers=123)
    with pytest.raises(ValueError, match=r"backend must be one of .*got 'nope'"):
        i2am.trace(unet, ref_grid=REF_GRID, num_steps=1, backend="nope")
    for name, bare in (("points", (2, 3)), ("boxes", (1, 2, 3, 4)), ("patches", (0, 1))):
        with pytest.raises(TypeError, match=rf"{name} must be a list of .*" + re.escape(f"[{bare}]")):
            i2am.trace(unet, ref_grid=REF_GRID, num_steps=1, **{name: bare})
    with pytest.raises(ValueError, match=r"patch \(4, 0\) is off the reference grid"):
        i2am.trace(unet, ref_grid=REF_GRID, num_steps=1, patches=[(4, 0)])
    assert unet.attn_processors == processors
    # resolutions are known only once the layers run: a resolution-only spec passes the entry
    with torch.no_grad(), i2am.trace(unet, ref_grid=REF_GRID, num_steps=1, layers=[(4, 6), "up_blocks.*"]) as tc:
        unet(**unet_inputs())
    assert set(tc.maps().layers) == {n for n in tc.attention_layers if not n.startswith("down_blocks.0")}


# ---- 5. fewer steps than declared -------------------------------------------------------------
def test_fewer_denoiser_calls_than_num_steps_warn():
    unet = tm.unet(9)
    with torch.no_grad(), i2am.trace(unet, ref_grid=REF_GRID, num_steps=5, time_groups=5) as tc:
        for _ in range(3):
            unet(**unet_inputs())
    with pytest.warns(UserWarning, match=r"3 of the num_steps=5 .*time groups 3, 4 .*empty"):
        tc.maps()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rec = Recorder(ref_grid=(2, 2), latent_size=(4, 6), num_steps=2)
        for t in range(2):
            rec.record("a", *qkv(B=1, Nk=4, d=8), step=t)
        rec.maps()


# ---- 6. integers ------------------------------------------------------------------------------
@pytest.mark.parametrize("options, message", [
    (dict(points=[(1.7, 2.2)]), r"point \(row, col\) must be 2 integers, got \(1.7, 2.2\)"),
    (dict(boxes=[(0, 0, 2.5, 3)]), r"box .* must be 4 integers"),
    (dict(patches=[(1, 1.0)]), r"patch \(i, j\) must be 2 integers"),
    (dict(points=[(True, 2)]), r"point \(row, col\) must be 2 integers"),
    (dict(ref_grid=(4.5, 3)), r"ref_grid \(hI, wI\) must be two integers, got \(4.5, 3\)"),
    (dict(time_groups=True), "time_groups must be a positive integer, got True"),
    (dict(time_groups=2.0), "time_groups must be a positive integer, got 2.0"),
    (dict(num_steps=3.0), "num_steps must be a positive integer, got 3.0"),
    (dict(num_steps=True), "num_steps must be a positive integer, got True"),
    (dict(branch=[True]), r"branch must be one of .* or a list of batch indices, got \[True\]"),
    (dict(layers=(True, 2)), r"layers must be .*\(entry True\)"),
])
def test_floats_and_bools_are_not_integers(options, message):
    args = {"ref_grid": (2, 2), "latent_size": (4, 6), "num_steps": 2, **options}
    with pytest.raises((TypeError, ValueError), match=message):
        Recorder(**args)


def test_integer_like_values_are_integers():
    rec = Recorder(ref_grid=(np.int64(2), torch.tensor(2)), latent_size=(4, 6), num_steps=np.int32(2),
                   points=[(np.int64(1), 2)], patches=[torch.tensor([1, 0])])
    assert rec.ref_grid == (2, 2) and rec.num_steps == 2 and rec.queries.labels[-1] == ("point", (1, 2))


# ---- 7. bf16 under the Triton interpreter -----------------------------------------------------
def test_bf16_through_the_triton_interpreter_is_refused():
    q, k, v = qkv(dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="bfloat16.*Triton's CPU interpreter"):
        attention_with_maps(q, k, v, backend="triton")
    out, _ = attention_with_maps(q, k, v, backend="torch")  # other backends compute it
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=2e-2, atol=2e-2)


# ---- 8. clear errors --------------------------------------------------------------------------
def test_record_as_a_slice():
    q, k, v = qkv()
    out, maps = attention_with_maps(q, k, v, record=slice(1, None))
    out1, maps1 = attention_with_maps(q, k, v, record=[1])
    torch.testing.assert_close(out, out1)
    torch.testing.assert_close(maps["gen_query"], maps1["gen_query"])
    out, maps = attention_with_maps(q, k, v, record=slice(2, None))  # selects nothing: SDPA only
    assert maps["gen_query"].shape[0] == 0
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_accumulate_values_must_be_tensors():
    q, k, v = qkv()
    bad = {"gen_query": [[0.0]], "ref_key": torch.zeros(2, 2, 1, 13)}
    with pytest.raises(TypeError, match=r"accumulate\['gen_query'\] must be a float32 tensor .*got list"):
        attention_with_maps(q, k, v, accumulate=bad)


def test_maps_call_needs_exactly_its_maps():
    q, k, v = qkv()
    call = prepare(q, k, v, gen=("query", "key"))
    buffers = {n: torch.zeros(s) for n, s in call.shapes.items()}
    for maps in ({"gen_query": buffers["gen_query"], "ref_key": buffers["ref_key"]},
                 {**buffers, "ref_query": torch.zeros(2, 2, 1, 13)}):
        with pytest.raises(ValueError, match=r"maps must hold exactly .*'gen_key'.*got"):
            call(q, k, v, maps)


def test_attention_heads_must_divide_the_batch():
    q, k, v = (t.flatten(0, 1) for t in qkv(B=1, H=3))  # (3, N, d)
    with i2am.recording(latent_size=(4, 6), num_steps=1, ref_grid=(1, 13)) as rec:
        rec.step()
        with pytest.raises(ValueError, match=r"heads=2 does not divide the 3 rows of q \(B\*H, N, d\)"):
            i2am.attention(q, k, v, heads=2, layer="l")
        with pytest.raises(TypeError, match="heads must be an integer, got 1.5"):
            i2am.attention(q, k, v, heads=1.5, layer="l")
        with pytest.raises(ValueError, match=r"heads must be a positive integer .*, got 0"):
            i2am.attention(q, k, v, heads=0, layer="l")
        assert i2am.attention(q, k, v, heads=3, layer="l").shape == (3, 24, 40)


def test_load_of_a_corrupt_file_names_the_path(tmp_path):
    rec = nan_recording(layer_with_nan=None)
    good = tmp_path / "maps.safetensors"
    rec.maps().save(good)
    data = good.read_bytes()
    garbage, truncated = tmp_path / "garbage.safetensors", tmp_path / "truncated.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    truncated.write_bytes(data[: len(data) // 2])
    from safetensors.torch import load_file, save_file
    tensors = load_file(good)
    bad_json, missing_key = tmp_path / "bad_json.safetensors", tmp_path / "missing.safetensors"
    save_file(tensors, bad_json, metadata={"i2am": "{not json"})
    save_file({n: t for n, t in tensors.items() if not n.startswith("ref/")}, missing_key,
              metadata={"i2am": _meta(good)})
    for path in (garbage, truncated, bad_json, missing_key):
        with pytest.raises(ValueError, match=rf"cannot read i2am maps from {path}"):
            AttributionMaps.load(path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "none.safetensors")):
        AttributionMaps.load(tmp_path / "none.safetensors")


def _meta(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()["i2am"]


def test_a_nan_mask_is_not_called_empty():
    maps = nan_recording(layer_with_nan=None).maps()
    mask = torch.zeros(4, 6)
    mask[1:3, 1:4] = 1
    mask[0, 0] = float("nan")
    with pytest.raises(ValueError, match="gen_mask must hold finite values"):
        maps.imacs(gen_mask=mask)
