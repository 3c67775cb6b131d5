"""i2am.trace on real diffusers pipelines and i2am.attention in plain PyTorch (SPEC section 4).

Every traced run is checked against an independent record of the same run: forward hooks on
each attn2's to_q and on the projection of the reference keys (to_k, or the IP-Adapter's
to_k_ip) capture q and k per call, a pre-hook counts the steps, and the maps are recomputed
with the materialised equations of i2am.reference and probes built here.
"""
import functools
import types
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import i2am
import tiny_models as tm
from i2am import reference

T, G = tm.STEPS, 2
POINT, BOX = (2, 3), (1, 2, 5, 9)
GRIDS = {8 * 12: (8, 12), 4 * 6: (4, 6)}  # the two UNet resolutions of a 8 x 12 latent
SOFTMAX = {"official": ("gen_query", "ref_key"), "paper": ("gen_key", "ref_query")}
BUF_TOL = dict(rtol=1e-4, atol=1e-6)


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def built(name):
    """(model, its untraced output) per tiny model, built once for the module."""
    model = tm.BUILDERS[name]()
    return model, model.run()


@pytest.fixture(params=list(tm.BUILDERS))
def model(request):
    return built(request.param)


def patch(model):
    return (model.ref_grid[0] - 1, model.ref_grid[1] - 1)


def ref_mask(model):
    """A reference-image mask (4 pixels a patch), top half set."""
    m = torch.zeros(model.ref_grid[0] * 4, model.ref_grid[1] * 4)
    m[: m.shape[0] // 2] = 1
    return m


# ---- the independent record and the oracle -------------------------------------------------
class Collector:
    """Forward hooks that keep (layer, step, q, k, heads, scale) of every attn2 call."""

    def __init__(self, model):
        self.model, self.calls, self.step, self.handles = model, [], -1, []

    def __enter__(self):
        unet = self.model.pipe.unet
        self.handles.append(unet.register_forward_pre_hook(self._count))
        for name, attn in unet.named_modules():
            if name.endswith("attn2"):
                keys = attn.processor.to_k_ip[0] if self.model.ip_adapter else attn.to_k
                self.handles.append(attn.to_q.register_forward_hook(partial(self._query, name)))
                self.handles.append(keys.register_forward_hook(partial(self._key, name, attn)))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _count(self, module, args):
        self.step += 1

    def _query(self, name, module, args, out):
        self.pending = out

    def _key(self, name, attn, module, args, out):
        self.calls.append((name, self.step, self.pending, out, attn.heads, attn.scale))


def latent_probe(label, mask, size):
    h, w = size
    p = torch.zeros(h, w, dtype=torch.float64)
    if label[0] == "uniform":
        p += 1 / (h * w)
    elif label[0] == "mask":
        p = F.interpolate(torch.as_tensor(mask)[None, None].double(), size=(h, w), mode="nearest")[0, 0] / (h * w)
    elif label[0] == "point":
        p[label[1]] = 1
    else:
        t, l, b, r = label[1]
        p[t:b, l:r] = 1 / ((b - t) * (r - l))
    return p


def key_probe(label, ref_grid):
    u = torch.zeros(ref_grid, dtype=torch.float64)
    if label[0] == "uniform":
        u += 1 / u.numel()
    else:
        u[label[1]] = 1
    return u.flatten()


def oracle(calls, maps, convention="official", mask=None, grids=GRIDS):
    """Per layer {"gen": (Br, G, H, Ru, h_l, w_l), "ref": (Br, G, H, Rw, K)} in the row order of
    maps' probe labels, for its recorded entries, from the collected q and k."""
    gen_name, ref_name = SOFTMAX[convention]
    u = torch.stack([key_probe(lab, maps.ref_grid) for lab in maps.key_labels])
    latent = [latent_probe(lab, mask, maps.latent_size) for lab in maps.query_labels]
    kr = maps.ref_grid[0] * maps.ref_grid[1]
    T_, G_ = maps.num_steps, maps.time_groups
    out = {}
    for name, step, q, k, heads, scale in calls:
        B, nq = q.shape[:2]
        grid = grids[nq]
        q, k = (x.reshape(B, -1, heads, x.shape[-1] // heads).transpose(1, 2) for x in (q, k))  # IP keys: (B, 1, N, C)
        m = torch.stack([reference.pullback(p, grid) for p in latent])
        _, got = reference.call_maps(q, k, k, scale=scale, ref_idx=torch.arange(k.shape[2] - kr, k.shape[2]),
                                     record_idx=torch.tensor(maps.record), key_probes=u, query_probes=m,
                                     names=(gen_name, ref_name))
        buf = out.setdefault(name, {"gen": torch.zeros(len(maps.record), G_, heads, len(u), *grid),
                                    "ref": torch.zeros(len(maps.record), G_, heads, len(m), kr)})
        buf["gen"][:, step * G_ // T_] += got[gen_name].reshape(*got[gen_name].shape[:3], *grid)
        buf["ref"][:, step * G_ // T_] += got[ref_name]
    return out


def assert_buffers(maps, want):
    assert sorted(maps.layers) == sorted(want)
    for name, bufs in want.items():
        for kind in ("gen", "ref"):
            torch.testing.assert_close(maps.layers[name][kind], bufs[kind], **BUF_TOL,
                                       msg=lambda m: f"{name} {kind}: {m}")


def expected_imacs(M, mask, lam=3.0, threshold=0.4):
    """SPEC section 3, written out: normalise, bicubic to the mask, clamp, normalise, threshold.
    A constant map (a 1x1 reference grid) ranks nothing: its IMACS is undefined, None."""
    if M.max() == M.min():
        return None

    def norm(x):
        return (x - x.min()) / (x.max() - x.min()) if x.max() > x.min() else torch.zeros_like(x)

    mask = torch.as_tensor(mask).double()
    x = F.interpolate(norm(M.double())[None, None], size=mask.shape, mode="bicubic", align_corners=False)[0, 0]
    x = norm(x.clamp(0, 1))
    x = torch.where(x <= threshold, torch.zeros_like(x), x)
    return ((x * mask).sum() / mask.sum() - lam * (x * (1 - mask)).sum() / (1 - mask).sum()).item()


def hooks(module):
    return (dict(module._forward_pre_hooks), dict(module._forward_hooks))


def assert_restored(unet, processors, hook_state):
    now = unet.attn_processors
    assert now.keys() == processors.keys()
    assert all(now[n] is p for n, p in processors.items()), "an original processor object is not back"
    assert hooks(unet) == hook_state


# ---- the three pipelines ------------------------------------------------------------------
@pytest.mark.parametrize("convention", ["official", "paper"])
def test_trace_equals_untraced_and_the_oracle(model, convention):
    model, untraced = model
    unet, mask = model.pipe.unet, tm.inpainting_mask()
    processors, hook_state = dict(unet.attn_processors), hooks(unet)
    with Collector(model) as col, i2am.trace(model.pipe, ref_grid=model.ref_grid, time_groups=G, mask=mask,
                                             points=[POINT], boxes=[BOX], patches=[patch(model)],
                                             convention=convention) as tc:
        out = model.run()
    assert_restored(unet, processors, hook_state)
    torch.testing.assert_close(out, untraced, rtol=1e-4, atol=1e-4)

    maps = tc.maps()
    assert maps.record == [1] and maps.num_steps == T and len(maps.layers) == 7
    want = oracle(col.calls, maps, convention, mask)
    assert_buffers(maps, want)

    def rows(kind, label):
        labels = maps.key_labels if kind == "gen" else maps.query_labels
        i = labels.index(label)
        return [b[kind][0, :, :, i] for b in want.values()]

    for by in (None, "time", "head"):
        for label in [("uniform",), ("patch", patch(model))]:
            got = maps.generated(by=by, normalize=False) if label == ("uniform",) else \
                maps.specific_generated(patch(model), by=by, normalize=False)
            torch.testing.assert_close(got.double(), reference.generated(rows("gen", label), tm.LATENT, by=by),
                                       rtol=1e-4, atol=1e-7)
        for label, got in [(("uniform",), maps.reference(by=by, normalize=False)),
                           (("mask",), maps.reference(by=by, masked=True, normalize=False)),
                           (("point", POINT), maps.specific_reference(POINT, by=by, normalize=False)),
                           (("box", BOX), maps.specific_reference(BOX, by=by, normalize=False))]:
            torch.testing.assert_close(got.double(), reference.reference(rows("ref", label), model.ref_grid, by=by),
                                       rtol=1e-4, atol=1e-7)

    scores = maps.imacs(ref_mask=ref_mask(model))
    gen = reference.generated(rows("gen", ("uniform",)), tm.LATENT)
    ref = reference.reference(rows("ref", ("mask",)), model.ref_grid)
    assert scores["gen"] == pytest.approx(expected_imacs(gen, mask), abs=1e-4)
    want = expected_imacs(ref, ref_mask(model))
    assert scores["ref"] == (None if want is None else pytest.approx(want, abs=1e-4))


@pytest.mark.parametrize("branch, record, guidance", [
    ("cond", [1], 5.0), ("uncond", [0], 5.0), ("all", [0, 1], 5.0), ([1, 0], [1, 0], 5.0), ("cond", [0], 1.0)])
def test_branches_record_their_entries(model, branch, record, guidance):
    model, _ = model
    # without guidance an IP-Adapter takes the image embeddings as given: the positive one alone
    # (given both, its keys would be 2 x 7, which fit no reference grid)
    embeds = {"ip_adapter_image_embeds": [model.kwargs["ip_adapter_image_embeds"][0][1:]]} \
        if model.ip_adapter and guidance == 1.0 else {}
    with Collector(model) as col, i2am.trace(model.pipe, ref_grid=model.ref_grid, branch=branch) as tc:
        model.run(guidance_scale=guidance, **embeds)
    maps = tc.maps()
    assert maps.record == record
    assert_buffers(maps, oracle(col.calls, maps))
    assert maps.generated().shape == ((2,) if len(record) == 2 else ()) + tm.LATENT


class Boom(Exception):
    pass


def test_restored_after_an_exception_inside_the_run(model):
    model, untraced = model
    unet = model.pipe.unet
    processors, hook_state = dict(unet.attn_processors), hooks(unet)
    calls = []

    def explode(module, args, out):
        calls.append(1)
        if len(calls) == 2:
            raise Boom

    handle = unet.mid_block.register_forward_hook(explode)
    try:
        with pytest.raises(Boom), i2am.trace(model.pipe, ref_grid=model.ref_grid):
            model.run()
    finally:
        handle.remove()
    assert_restored(unet, processors, hook_state)
    assert torch.equal(model.run(), untraced)
    with i2am.trace(model.pipe, ref_grid=model.ref_grid) as tc:  # the model is free again
        model.run()
    assert tc.maps().num_steps == T


def test_layers_select_by_name_and_resolution():
    model, untraced = built("patch_inpainting")
    with i2am.trace(model.pipe, ref_grid=model.ref_grid, layers=["up_blocks.*", (4, 6)]) as tc:
        out = model.run()
    torch.testing.assert_close(out, untraced, rtol=1e-4, atol=1e-4)
    names = tc.maps()._select()
    assert names and all(n.startswith("up_blocks.") or tc.maps().layers[n]["gen"].shape[-2:] == (4, 6) for n in names)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2" not in names


def test_ip_adapter_weights_and_scale_are_the_originals():
    model, untraced = built("ip_adapter")
    pipe = model.pipe
    keys = {k: v for k, v in pipe.unet.state_dict(keep_vars=True).items()}
    with i2am.trace(pipe, ref_grid=model.ref_grid) as tc:
        inside = pipe.unet.state_dict(keep_vars=True)
        assert inside.keys() == keys.keys() and all(inside[k] is keys[k] for k in keys)
        pipe.set_ip_adapter_scale(0.3)  # reaches the original processors through the i2am ones
        try:
            traced = model.run()
        finally:
            pipe.set_ip_adapter_scale(0.7)
    pipe.set_ip_adapter_scale(0.3)
    try:
        torch.testing.assert_close(traced, model.run(), rtol=1e-4, atol=1e-4)
    finally:
        pipe.set_ip_adapter_scale(0.7)
    assert not torch.allclose(traced, untraced)
    assert tc.maps().reference().shape == model.ref_grid


def test_triton_backend_matches_torch():
    """A traced pipeline through the Triton backend: its CPU interpreter here, compiled on CUDA."""
    try:
        i2am.kernels.backend_module("triton")
    except ImportError as e:
        pytest.skip(f"the Triton backend does not import: {e}")
    model, _ = built("patch_inpainting")
    model.pipe.to("cuda" if torch.cuda.is_available() else "cpu")
    runs = {}
    try:
        for backend in ("torch", "triton"):
            with i2am.trace(model.pipe, ref_grid=model.ref_grid, time_groups=G, mask=tm.inpainting_mask(),
                            points=[POINT], patches=[patch(model)], backend=backend,
                            layers=["mid_block.*", "up_blocks.1.attentions.0.*"]) as tc:  # both resolutions
                runs[backend] = model.run(num_inference_steps=2), tc.maps()
    finally:
        model.pipe.to("cpu")
    torch.testing.assert_close(runs["triton"][0], runs["torch"][0], rtol=1e-4, atol=1e-4)
    assert_buffers(runs["triton"][1], runs["torch"][1].layers)


# ---- clear errors -------------------------------------------------------------------------
def test_ref_grid_that_does_not_match_the_keys():
    model, _ = built("patch_inpainting")  # CLS + 4 x 3 keys
    with pytest.raises(ValueError, match=r"Nk=13 keys, which fit neither 25 nor 26 .* ref_grid 5x5"):
        with i2am.trace(model.pipe, ref_grid=(5, 5)):
            model.run()
    with pytest.raises(ValueError, match="ref_keys selects 13 keys"):
        with i2am.trace(model.pipe, ref_grid=(4, 3), ref_keys=slice(0, None)):
            model.run()


def test_pipelines_without_attn2_layers():
    from diffusers import DDIMPipeline, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    with pytest.raises(ValueError, match="no cross-attention layers"):
        i2am.trace(DDIMPipeline(unet=unet, scheduler=tm.scheduler()), ref_grid=(1, 1))
    with pytest.raises(ValueError, match="transformer"):
        i2am.trace(types.SimpleNamespace(transformer=nn.Linear(2, 2)), ref_grid=(1, 1))
    with pytest.raises(TypeError, match="pipeline with a .unet"):
        i2am.trace(object(), ref_grid=(1, 1))


def test_unsupported_processor_is_refused_untouched():
    from diffusers.models.attention_processor import AttnProcessor2_0

    class Custom(AttnProcessor2_0):
        pass

    model, _ = built("patch_inpainting")
    unet = model.pipe.unet
    attn = unet.get_submodule("mid_block.attentions.0.transformer_blocks.0.attn2")
    original = attn.processor
    attn.set_processor(Custom())
    try:
        processors = dict(unet.attn_processors)
        with pytest.raises(ValueError, match="runs Custom"):
            with i2am.trace(model.pipe, ref_grid=model.ref_grid):
                pass
        assert all(unet.attn_processors[n] is p for n, p in processors.items())
    finally:
        attn.set_processor(original)


def unet_inputs(size, batch=2):
    return dict(sample=torch.randn(batch, 9, *size), timestep=torch.tensor(10),
                encoder_hidden_states=torch.randn(batch, 13, tm.CROSS_DIM))


def test_bare_denoiser_latent_size_change_and_step_count():
    model, _ = built("patch_inpainting")
    unet = model.pipe.unet
    with pytest.raises(ValueError, match="num_steps is needed"):
        i2am.trace(unet, ref_grid=model.ref_grid)
    processors, hook_state = dict(unet.attn_processors), hooks(unet)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"latent size changed from \(8, 12\) to \(4, 6\)"):
            with i2am.trace(unet, ref_grid=model.ref_grid, num_steps=2):
                unet(**unet_inputs(tm.LATENT))
                unet(**unet_inputs((4, 6)))
        with pytest.raises(ValueError, match="outside the 2 steps"):
            with i2am.trace(unet, ref_grid=model.ref_grid, num_steps=2):
                for _ in range(3):
                    unet(**unet_inputs(tm.LATENT))
        with pytest.raises(ValueError, match="attention mask"):
            with i2am.trace(unet, ref_grid=model.ref_grid, num_steps=1):
                unet(**unet_inputs(tm.LATENT), encoder_attention_mask=torch.ones(2, 13))
    assert_restored(unet, processors, hook_state)


@pytest.mark.parametrize("strength,steps", [(1.0, 4), (0.5, 2)])
def test_steps_of_a_run_that_starts_partway_down_the_schedule(strength, steps):
    """Inpainting with strength 0.5 over 4 DDIM timesteps makes 2 denoiser calls: T = 2, so the 2
    time groups get one step each (T = 4 would put both in the first group)."""
    model, _ = built("patch_inpainting")
    with i2am.trace(model.pipe, ref_grid=model.ref_grid, time_groups=2) as tc:
        model.run(num_inference_steps=4, strength=strength)
    maps = tc.maps()
    assert maps.num_steps == steps
    by_time = maps.generated(by="time", normalize=False)
    assert by_time.shape[0] == 2 and (by_time.flatten(1).abs().sum(1) > 0).all()


def test_steps_from_begin_index_or_the_first_timestep():
    from types import SimpleNamespace

    from i2am.tracing import _steps_from
    heun = SimpleNamespace(timesteps=torch.tensor([9., 7., 7., 5., 5.]), begin_index=3)  # repeats: keeps begin_index
    assert _steps_from(heun, torch.tensor(5.)) == 2
    ddim = SimpleNamespace(timesteps=torch.tensor([9, 7, 5, 0]))
    assert _steps_from(ddim, torch.tensor([5, 5])) == 2  # a batch of timesteps
    assert _steps_from(ddim, 9) == 4 and _steps_from(ddim, 0.009) == 4  # rescaled: the whole list


def test_nested_and_reused_traces_are_errors():
    model, _ = built("patch_inpainting")
    unet = model.pipe.unet
    processors, hook_state = dict(unet.attn_processors), hooks(unet)
    with i2am.trace(model.pipe, ref_grid=model.ref_grid) as tc:
        with pytest.raises(RuntimeError, match="nested or concurrent"):
            with i2am.trace(unet, ref_grid=model.ref_grid, num_steps=T):
                pass
        with pytest.raises(RuntimeError, match="nested or concurrent"):
            with i2am.recording(unet, ref_grid=model.ref_grid, num_steps=T):
                pass
        assert all(unet.attn_processors[n] is not p for n, p in processors.items() if "attn2" in n)
    with pytest.raises(RuntimeError, match="already entered"):
        with tc:
            pass
    assert_restored(unet, processors, hook_state)


# ---- i2am.attention in plain PyTorch (an LDM-style model) --------------------------------------
class CrossAttention(nn.Module):
    """LDM's CrossAttention (ldm/modules/attention.py), reduced, with the i2am line in place of
    einsum-softmax-einsum; it serves self- (attn1) and cross-attention (attn2)."""

    def __init__(self, dim, context_dim, heads):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None, mask=None):
        h = self.heads
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.unflatten(-1, (h, -1)).transpose(1, 2).flatten(0, 1) for t in (q, k, v))  # b n (h d) -> (b h) n d
        out = i2am.attention(q, k, v, heads=h, scale=self.scale, attn_mask=mask, layer=self)
        return self.to_out(out.unflatten(0, (-1, h)).transpose(1, 2).flatten(2))  # (b h) n d -> b n (h d)


class TinyLDM(nn.Module):
    """A denoiser with self- and cross-attention at the latent grid and at half of it."""

    def __init__(self, dim=8, context_dim=6, heads=2):
        super().__init__()
        self.inp = nn.Conv2d(4, dim, 1)
        self.down, self.mid = (nn.ModuleDict({"attn1": CrossAttention(dim, dim, heads),
                                              "attn2": CrossAttention(dim, context_dim, heads)}) for _ in range(2))
        self.out = nn.Conv2d(dim, 4, 1)

    def forward(self, x, t, context):
        h = self.inp(x)
        for block, stride in ((self.down, 1), (self.mid, 2)):
            y = h[..., ::stride, ::stride]
            size = y.shape[-2:]
            y = y.flatten(2).transpose(1, 2)
            y = y + block["attn1"](y)
            y = y + block["attn2"](y, context)
            h = h + F.interpolate(y.transpose(1, 2).unflatten(2, size), size=h.shape[-2:])
        return self.out(h)


def ldm_run(ldm, rec=None, steps=3):
    """A CFG-batched sampling loop of `steps` calls; rec.step() before each when given."""
    gen = torch.Generator().manual_seed(5)
    x, context = torch.randn(1, 4, 6, 8, generator=gen), torch.randn(2, 1 + 3 * 4, 6, generator=gen)
    for t in range(steps):
        if rec is not None:
            rec.step()
        x = x - 0.1 * ldm(torch.cat([x, x]), t, context)[1:]
    return x


def test_attention_is_sdpa_outside_a_recording():
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 7, 4), torch.randn(2, 2, 7, 3)
    mask = torch.rand(5, 7) > 0.3
    mask[:, 0] = True
    assert torch.equal(i2am.attention(q, k, v, layer="x"), F.scaled_dot_product_attention(q, k, v))
    assert torch.equal(i2am.attention(q, k, v, attn_mask=mask, scale=0.3),
                       F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3))


def test_recording_an_ldm_style_model():
    torch.manual_seed(6)
    ldm = TinyLDM()
    untraced = ldm_run(ldm)
    calls = []  # (layer, step, q, k, heads, scale) of every cross-attention call, by hooks
    for name, m in ldm.named_modules():
        if name.endswith("attn2"):
            m.to_q.register_forward_hook(lambda mod, a, q, m=m: setattr(m, "pending", q))
            m.to_k.register_forward_hook(lambda mod, a, k, n=name, m=m: calls.append(
                (n, len(calls) // 2, m.pending, k, m.heads, m.scale)))
    options = dict(ref_grid=(3, 4), num_steps=3, time_groups=G, points=[(1, 2)], patches=[(2, 3)], layers="*.attn2")
    with i2am.recording(ldm, **options) as rec:
        out = ldm_run(ldm)
    torch.testing.assert_close(out, untraced, rtol=1e-5, atol=1e-5)
    maps = rec.maps()
    assert sorted(maps.layers) == ["down.attn2", "mid.attn2"]  # self-attention is left out by layers=
    assert maps.latent_size == (6, 8) and maps.record == [1] and not ldm._forward_pre_hooks
    assert_buffers(maps, oracle(calls, maps, grids={48: (6, 8), 12: (3, 4)}))

    # the same calls without a denoiser: (B, H, N, d) tensors, names as strings, rec.step()
    def heads_first(q, k, heads):
        return [x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k)]

    with i2am.recording(latent_size=(6, 8), **options) as rec:
        q, k = heads_first(*calls[0][2:5])
        with pytest.raises(ValueError, match="before the first step"):
            i2am.attention(q, k, k, layer="down.attn2")
        for step in range(3):
            assert rec.step() == step
            for name, _, q, k, heads, scale in calls[2 * step: 2 * step + 2]:
                q, k = heads_first(q, k, heads)
                i2am.attention(q, k, k, scale=scale, layer=name)
        mask = torch.rand(q.shape[2], k.shape[2]) > 0.5
        assert torch.equal(i2am.attention(q, k, k, attn_mask=mask, layer="mid.attn1"),  # not in layers=
                           F.scaled_dot_product_attention(q, k, k, attn_mask=mask))
        with pytest.raises(ValueError, match="attention mask"):
            i2am.attention(q, k, k, attn_mask=mask, layer="mid.attn2")
        with pytest.raises(ValueError, match=r"\(B\*H, N, d\) with heads=H"):
            i2am.attention(q.flatten(0, 1), k.flatten(0, 1), k.flatten(0, 1), layer="mid.attn2")
        with pytest.raises(ValueError, match="not a module of this recording"):
            i2am.attention(q, k, k, layer=ldm.mid.attn2)
        with pytest.raises(ValueError, match="outside the 3 steps"):
            rec.step()
    assert_buffers(rec.maps(), {n: {kind: maps.layers[n][kind] for kind in ("gen", "ref")} for n in maps.layers})


def test_one_reference_answers_the_several_reference_calls_with_ref_0():
    model, _ = built("patch_inpainting")
    i, j = patch(model)
    with i2am.trace(model.pipe, ref_grid=model.ref_grid, patches=[(i, j)], mask=tm.inpainting_mask()) as tc:
        model.run()
    maps = tc.maps()
    assert maps.references == (model.ref_grid,)
    torch.testing.assert_close(maps.generated(ref=0), maps.generated())
    torch.testing.assert_close(maps.reference(ref=0, masked=True), maps.reference(masked=True))
    torch.testing.assert_close(maps.specific_generated((0, i, j)), maps.specific_generated((i, j)))
    assert maps.imacs(ref=0) == maps.imacs()
    share = maps.sources()
    assert list(share) == ["ref0"] and torch.equal(share["ref0"], (maps.generated(normalize=False) > 0).float())
    with pytest.raises(ValueError, match=r"ref=1: the maps have 1 reference\(s\)"):
        maps.reference(ref=1)
    with pytest.raises(ValueError, match=r"patch \(1, 0, 0\): reference 1 does not exist"):
        maps.specific_generated((1, 0, 0))
    with pytest.raises(ValueError, match="sources\\(all_keys=True\\) needs them"):
        maps.sources(all_keys=True)
