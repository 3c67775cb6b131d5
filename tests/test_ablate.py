"""i2am.ablate and i2am.randomize against float64 references, with and without i2am.trace.

Drop mode's reference is the unchanged model given an attention mask that hides the dropped keys
from the ablated batch entries (SDPA with -inf scores: exactly the softmax over the remaining
keys); zero mode's is the unchanged model with those key and value tokens zeroed by hooks on
the key and value projections.
"""
import copy

import numpy as np
import pytest
import torch

import i2am
import tiny_flux as tf
import tiny_incontext as tic
import tiny_models as tm

REF_GRID = (3, 4)  # the UNet tests' reference tokens: a CLS token and a 3 x 4 grid
CELLS = [(0, 1), (2, 3), (1, 0)]


def unet_inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    n = 1 + REF_GRID[0] * REF_GRID[1]
    return dict(sample=torch.randn(2, 4, *tm.LATENT, generator=gen, dtype=dtype), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, n, tm.CROSS_DIM, generator=gen, dtype=dtype))


def dropped_keys(cells, grid, first):
    return [first + i * grid[1] + j for i, j in cells]


def unet_reference(unet, inputs, mode, entries, keys):
    """The untouched float64 UNet with `keys` removed from the attn2 attention of `entries`."""
    inputs = dict(inputs)
    if mode == "drop":
        keep = torch.ones(inputs["encoder_hidden_states"].shape[:2], dtype=torch.bool)
        for e in entries:
            keep[e, keys] = False
        inputs["encoder_attention_mask"] = keep
        with torch.no_grad():
            return unet(**inputs).sample
    handles = [lin.register_forward_hook(_zero_rows(entries, keys, 0))
               for name, m in unet.named_modules() if name.endswith("attn2") for lin in (m.to_k, m.to_v)]
    try:
        with torch.no_grad():
            return unet(**inputs).sample
    finally:
        for h in handles:
            h.remove()


def _zero_rows(entries, keys, offset):
    def hook(module, args, out):
        out = out.clone()
        for e in entries:
            out[e, [k - offset for k in keys]] = 0
        return out
    return hook


@pytest.fixture(scope="module")
def unet64():
    return tm.unet().double().eval()


@pytest.mark.parametrize("mode", ["drop", "zero"])
@pytest.mark.parametrize("patches", ["list", "array"])
def test_unet_ablation_equals_the_float64_reference(unet64, mode, patches):
    inputs = unet_inputs()
    keys = dropped_keys(CELLS, REF_GRID, 1)
    want = unet_reference(unet64, inputs, mode, [1], keys)  # branch "cond": entry 1 of [uncond, cond]
    given = CELLS if patches == "list" else _array(CELLS, REF_GRID)
    with torch.no_grad(), i2am.ablate(unet64, given, mode=mode, ref_grid=REF_GRID if patches == "list" else None):
        got = unet64(**inputs).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    with torch.no_grad():
        plain = unet64(**inputs).sample
    # entry 0 (uncond) runs the original attention
    torch.testing.assert_close(got[0], unet_reference(unet64, inputs, mode, [], keys)[0], rtol=0, atol=1e-10)
    assert (got[1] - plain[1]).abs().max() > 1e-4  # the ablation changed the cond entry


def _array(cells, grid):
    a = np.zeros(grid, dtype=bool)
    for i, j in cells:
        a[i, j] = True
    return a


@pytest.mark.parametrize("order", ["ablate_outside", "trace_outside"])
def test_unet_ablation_under_trace_gives_the_ablated_run_and_its_maps(unet64, order):
    inputs = unet_inputs()
    keys = dropped_keys(CELLS, REF_GRID, 1)
    want = unet_reference(unet64, inputs, "drop", [1], keys)
    processors = dict(unet64.attn_processors)
    ablation = i2am.ablate(unet64, CELLS)
    tracer = i2am.trace(unet64, ref_grid=REF_GRID, num_steps=1, backend="torch")
    outer, inner = (ablation, tracer) if order == "ablate_outside" else (tracer, ablation)
    with torch.no_grad(), outer, inner:
        got = unet64(**inputs).sample
    assert all(unet64.attn_processors[n] is p for n, p in processors.items())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)  # a float64 trace without ablation is 1.4e-8 off
    maps = tracer.maps()
    m_r = maps.reference(normalize=False)
    assert all(m_r[i, j] == 0 for i, j in CELLS)  # the dropped keys carry no mass
    assert (m_r > 0).sum() == REF_GRID[0] * REF_GRID[1] - len(CELLS)
    # every full-resolution layer's reference row (the uniform query probe: the plain mean over its
    # queries) is the mean of the softmax over the kept keys
    cond = {}
    for name, module in unet64.named_modules():
        if name.endswith("attn2") and maps.layers[name]["grid"] == tm.LATENT:
            module.register_forward_pre_hook(lambda m, a, kw, n=name: cond.__setitem__(n, (m, a, kw)) or None,
                                             with_kwargs=True)
    with torch.no_grad(), i2am.ablate(unet64, CELLS, ref_grid=REF_GRID):
        unet64(**inputs)
    assert len(cond) == 3
    for name, (m, args, kw) in cond.items():
        m._forward_pre_hooks.clear()
        h, e = args[0] if args else kw["hidden_states"], kw["encoder_hidden_states"]
        q = m.to_q(h[1:]).unflatten(-1, (m.heads, -1)).transpose(1, 2)
        k = m.to_k(e[1:]).unflatten(-1, (m.heads, -1)).transpose(1, 2)
        s = (q @ k.transpose(-1, -2)) * m.scale
        s[..., keys] = -torch.inf
        p = s.softmax(-1)[0, :, :, 1:]  # (H, Nq, hI*wI)
        buf = maps.layers[name]["ref"][0, 0, :, 0]  # (H, hI*wI): the uniform query probe
        torch.testing.assert_close(buf.double(), p.mean(1), rtol=1e-5, atol=1e-7)


class Boom(Exception):
    pass


@pytest.mark.parametrize("with_trace", [False, True])
def test_restored_exactly_after_an_exception(unet64, with_trace):
    inputs = unet_inputs()
    processors = dict(unet64.attn_processors)
    with torch.no_grad():
        before = unet64(**inputs).sample

    def explode(module, args, out):
        raise Boom

    handle = unet64.mid_block.register_forward_hook(explode)
    try:
        with pytest.raises(Boom), torch.no_grad(), i2am.ablate(unet64, CELLS, ref_grid=REF_GRID):
            if with_trace:
                with i2am.trace(unet64, ref_grid=REF_GRID, num_steps=1, backend="torch"):
                    unet64(**inputs)
            unet64(**inputs)
    finally:
        handle.remove()
    assert all(unet64.attn_processors[n] is p for n, p in processors.items())
    assert not unet64._forward_pre_hooks
    with torch.no_grad():
        assert torch.equal(unet64(**inputs).sample, before)
    with i2am.ablate(unet64, CELLS, ref_grid=REF_GRID):  # free again
        pass


def test_bad_arguments_are_clear_errors(unet64):
    with pytest.raises(ValueError, match="mode"):
        i2am.ablate(unet64, CELLS, mode="remove")
    with pytest.raises(ValueError, match="ref=1"):
        i2am.ablate(unet64, CELLS, ref=1)
    with pytest.raises(ValueError, match="no reference cell"):
        i2am.ablate(unet64, np.zeros(REF_GRID, dtype=bool))
    with pytest.raises(ValueError, match="ref_grid"), torch.no_grad(), i2am.ablate(unet64, CELLS):
        unet64(**unet_inputs())
    with pytest.raises(ValueError, match="outside"), torch.no_grad(), i2am.ablate(unet64, [(3, 0)], ref_grid=REF_GRID):
        unet64(**unet_inputs())


# ---- Flux / Kontext ------------------------------------------------------------------------
def flux_reference(transformer, inputs, mode, entries, keys):
    """The untouched float64 transformer with `keys` (joint-sequence indices) removed for `entries`."""
    n = tf.TEXT + inputs["hidden_states"].shape[1]
    if mode == "drop":
        keep = torch.ones(inputs["hidden_states"].shape[0], 1, 1, n, dtype=torch.bool)
        for e in entries:
            keep[e, ..., keys] = False
        with torch.no_grad():
            return transformer(**inputs, joint_attention_kwargs={"attention_mask": keep})[0]
    handles = []
    for m in transformer.modules():
        if type(m).__name__ == "FluxAttention":
            offset = tf.TEXT if m.added_kv_proj_dim is not None else 0  # double-stream: image tokens only
            handles += [lin.register_forward_hook(_zero_rows(entries, keys, offset)) for lin in (m.to_k, m.to_v)]
    try:
        with torch.no_grad():
            return transformer(**inputs)[0]
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("mode", ["drop", "zero"])
def test_flux_ablation_equals_the_float64_reference(mode):
    transformer = tf.transformer().double().eval()
    inputs = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
              for k, v in tf.kontext_inputs().items()}
    first = tf.TEXT + tf.GRID[0] * tf.GRID[1]
    cells = [(0, 0), (3, 2), (1, 3)]
    keys = dropped_keys(cells, tf.REF_GRID, first)
    want = flux_reference(transformer, inputs, mode, [0], keys)
    processors = dict(transformer.attn_processors)
    with torch.no_grad(), i2am.ablate(transformer, cells, mode=mode, branch=[0]):
        got = transformer(**inputs)[0]
    assert all(transformer.attn_processors[n] is p for n, p in processors.items())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    with torch.no_grad():
        plain = transformer(**inputs)[0]
    torch.testing.assert_close(got[1], plain[1], rtol=0, atol=1e-12)  # entry 1 is not ablated
    assert (got[0] - plain[0]).abs().max() > 1e-4
    if mode == "drop":  # under a trace: the same output, and no mass on the dropped cells
        with torch.no_grad(), i2am.trace(transformer, num_steps=1, backend="torch", branch=[0]) as tc, \
                i2am.ablate(transformer, cells, branch=[0]):
            traced = transformer(**inputs)[0]
        torch.testing.assert_close(traced, want, rtol=0, atol=1e-7)  # the trace's own error
        m_r = tc.maps().reference(normalize=False)
        assert all(m_r[i, j] == 0 for i, j in cells) and (m_r > 0).sum() == 16 - len(cells)


# ---- randomize -----------------------------------------------------------------------------
def test_randomize_reinitialises_q_and_k_and_restores_exactly():
    unet = tm.unet()
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    attn = unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    with i2am.randomize(unet, seed=3):
        first = attn.to_q.weight.clone()
        block = "down_blocks.0.attentions.0.transformer_blocks.0"
        assert not torch.equal(attn.to_q.weight, state[f"{block}.attn2.to_q.weight"])
        assert not torch.equal(attn.to_k.weight, state[f"{block}.attn2.to_k.weight"])
        assert torch.equal(attn.to_v.weight, state[f"{block}.attn2.to_v.weight"])
        assert torch.equal(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight,
                           state["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"])
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(Boom), i2am.randomize(unet, seed=3):
        assert torch.equal(attn.to_q.weight, first)  # the seed decides
        raise Boom
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="matches none"):
        i2am.randomize(unet, layers="nothing.*")


def test_ablate_under_a_trace_on_regions_is_an_error_and_restores():
    """query_region/ref_region put the reference inside the generated grid, where ablate's cells
    (the model's own reference tokens) are not: a clear error, the model back as it was."""
    from diffusers.models.transformers import transformer_flux

    model, inputs = tf.transformer(), tic.fill_inputs(batch=1)
    dispatch = transformer_flux.dispatch_attention_fn
    with pytest.raises(ValueError, match="query_region/ref_region"):
        with torch.no_grad(), i2am.trace(model, num_steps=1, query_region=tic.FILL_QUERY, ref_region=tic.FILL_REF):
            with i2am.ablate(model, [(0, 0)], ref_grid=(4, 4)):
                model(**inputs)
    assert transformer_flux.dispatch_attention_fn is dispatch
    assert not model._forward_pre_hooks and not i2am.faithfulness.active(model)
