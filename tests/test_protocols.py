"""protocol="official" against a float64 materialised implementation of SPEC 3a, ref_grid="layer",
and reading one trace under both protocols."""
import pytest
import torch

import i2am
import official_reference as ofr
import tiny_stableviton as sv
from i2am import Recorder, display

T, G = 4, 2
MASK = torch.zeros(16, 12)
MASK[4:13, 2:9] = 1
CLOTH = torch.zeros(20, 15)
CLOTH[3:16, 4:12] = 1
POINTS = [(2, 1), (5, 4)]
GRID_OF = {48: (8, 6), 12: (4, 3), 4: (2, 2)}


def assert_close(got, want, what):
    """1e-4 relative to the map's scale."""
    want = want.double()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * float(want.abs().max()), msg=what)


def viton_run(n_context, protocol="official", backend="torch", steps=T, groups=G, **options):
    """Trace the StableVITON-shaped model with CFG; (maps, oracle sums, layer grids, layer names)."""
    model = sv.TinyStableVITON()
    calls, names = [], {m: n for n, m in model.named_modules()}
    model.register_forward_pre_hook(lambda *_: calls.append(None))  # a step boundary
    for m in model.attention_layers():
        m.calls = calls
    context, reference = sv.inputs(n_context)
    with i2am.recording(model, ref_grid="layer", protocol=protocol, num_steps=steps, time_groups=groups,
                        mask=MASK, points=POINTS, backend=backend, cfg=True, **options) as rec:
        sv.sample(model, context, reference, steps)
    per_step, t = [], -1
    for c in calls:
        if c is None:
            t += 1
        else:
            per_step.append((names[c[0]], t, c[1], c[2]))
    grids = {n: GRID_OF[q.shape[2]] for n, _, q, _ in per_step}
    return rec.maps(), ofr.sums(per_step, steps, groups, [1]), grids


@pytest.fixture(scope="module", params=[1, 7], ids=["one-token", "many-token"])
def viton(request):
    return viton_run(request.param)


def test_official_maps_match_the_materialised_spec(viton):
    maps, S, grids = viton
    gen_layers = [n for n in grids if n.endswith("attn2") and not n.startswith("middle_block")]
    assert maps.protocol == "official" and maps.ref_grid == (8, 6)
    for by in (None, "time", "head"):
        want = ofr.generated(S, grids, sv.LATENT, gen_layers, by)[0]
        assert_close(maps.generated(by=by, normalize=False), want, f"M_g by={by}")
    want = ofr.generated(S, grids, sv.LATENT, gen_layers)[0]
    lo, hi = want.min(), want.max()
    assert_close(maps.generated(), (want - lo) / (hi - lo), "M_g normalised")

    # M_r: the default is the one block at half the latent resolution; any layers= at 3 resolutions
    warps = [n for n in grids if n.endswith("warp")]
    assert {grids[n] for n in warps} == {(8, 6), (4, 3), (2, 2)}
    for layers, default in ((["output_blocks.1.warp"], None), (warps, "*warp")):
        for by in (None, "time", "head"):
            want = ofr.reference(S, grids, (8, 6), layers, by)[0]
            assert_close(maps.reference(by=by, layers=default, normalize=False), want, f"M_r {layers} by={by}")
    cloth = ofr.reference(S, grids, (8, 6), ["output_blocks.1.warp"])[0] * ofr.bicubic(CLOTH.double(), (8, 6))
    assert_close(maps.reference(ref_mask=CLOTH, normalize=False), cloth, "cloth-mask reference map")
    for p in POINTS:
        w = {"output_blocks.1.warp": ofr.cell_weights((4, 3), sv.LATENT, p)}
        want = ofr.reference(S, grids, (8, 6), ["output_blocks.1.warp"], query_weights=w)[0]
        assert_close(maps.specific_reference(p, normalize=False), want, f"M_sr {p}")

    scores = maps.imacs(ref_mask=CLOTH)
    M_g = ofr.generated(S, grids, sv.LATENT, gen_layers)[0]
    M_r = ofr.reference(S, grids, (8, 6), ["output_blocks.1.warp"])[0]
    assert scores["gen"] == pytest.approx(ofr.imacs_gen(M_g, MASK), rel=1e-4, abs=1e-6)
    assert scores["ref"] == pytest.approx(ofr.imacs_ref(M_r, CLOTH), rel=1e-4, abs=1e-6)


def test_official_context_layers_have_no_reference_side(viton):
    maps = viton[0]
    assert maps.layers["input_blocks.0.attn2"]["key_grid"] is None and "ref" not in maps.layers["input_blocks.0.attn2"]
    assert maps.layers["output_blocks.0.warp"]["per_key"] == 0  # no Nq x Nk per-key rows on own-grid keys
    with pytest.raises(ValueError, match="layer 'input_blocks.0.attn2' has no reference keys"):
        maps.reference(layers="input_blocks.0.attn2")
    with pytest.raises(ValueError, match="cannot be read under 'paper'.*trace with protocol='paper'"):
        maps.with_protocol("paper")


def test_official_round_trip_keeps_the_protocol_and_the_grids(viton, tmp_path):
    maps = viton[0]
    maps.save(tmp_path / "m.safetensors")
    back = i2am.AttributionMaps.load(tmp_path / "m.safetensors")
    assert back.protocol == "official" and back.ref_grid == maps.ref_grid
    grids = {n: (lay["grid"], lay["key_grid"], lay["per_key"]) for n, lay in maps.layers.items()}
    assert {n: (lay["grid"], lay["key_grid"], lay["per_key"]) for n, lay in back.layers.items()} == grids
    assert back.imacs(ref_mask=CLOTH) == maps.imacs(ref_mask=CLOTH)
    assert torch.equal(back.specific_reference(POINTS[0]), maps.specific_reference(POINTS[0]))


def test_paper_protocol_on_own_grid_keys():
    with pytest.raises(ValueError, match=r"layer 'input_blocks.0.attn2' has Nk=1 keys, which fit neither 48 nor 49 "
                                         r"\(a CLS token first\) keys of the layer's own grid 8x6"):
        viton_run(1, protocol="paper")
    maps, S, grids = viton_run(1, protocol="paper", layers="*warp")
    assert maps.protocol == "paper" and maps.ref_grid == (8, 6)
    # at the latent resolution the paper's pulled-back uniform probe is the plain query mean
    want = ofr.reference(S, grids, (8, 6), ["output_blocks.0.warp"])[0]
    assert_close(maps.reference(layers="output_blocks.0.warp", normalize=False), want, "paper M_r at 8x6")
    # coarser layers' key maps are resized to the common grid and clamped at 0
    assert maps.reference(layers="output_blocks.2.warp", normalize=False).shape == (8, 6)
    assert (maps.reference(by="time", normalize=False) >= 0).all()


def test_triton_backend_gives_the_torch_backend_official_maps():
    got, _, _ = viton_run(7, backend="triton", steps=2, groups=1)
    want, _, _ = viton_run(7, backend="torch", steps=2, groups=1)
    for name, lay in want.layers.items():
        for kind in ("gen", "ref"):
            if kind in lay:
                assert_close(got.layers[name][kind], lay[kind], f"{kind} {name}")
    assert got.imacs(ref_mask=CLOTH) == pytest.approx(want.imacs(ref_mask=CLOTH), rel=1e-4, abs=1e-6)


# ---- a fixed reference grid: CLS + 3 x 4 keys -------------------------------------------
LAYERS = {"down.attn2": ((8, 6), 2), "mid.attn2": ((4, 3), 2), "up.attn2": ((8, 6), 3)}


def fixed_grid_run(protocol, seed=0):
    rec = Recorder(ref_grid=(3, 4), latent_size=(8, 6), num_steps=T, time_groups=G, mask=MASK, points=POINTS,
                   patches=[(1, 2)], protocol=protocol, backend="torch")
    gen, calls = torch.Generator().manual_seed(seed), []
    for t in range(T):
        for name, (grid, H) in LAYERS.items():
            sizes = ((grid[0] * grid[1], 3), (13, 1), (13, 1))
            q, k, v = (torch.randn(2, H, n, 8, generator=gen) * s for n, s in sizes)
            rec.record(name, q, k, v, step=t)
            calls.append((name, t, q, k))
    return rec.maps(), ofr.sums(calls, T, G, [1]), {n: g for n, (g, _) in LAYERS.items()}


def test_official_with_a_cls_token_and_a_fixed_grid():
    maps, S, grids = fixed_grid_run("official")
    want = ofr.generated(S, grids, (8, 6), list(LAYERS))[0]  # the mean over all 13 keys, CLS included
    assert_close(maps.generated(normalize=False), want, "M_g over CLS + 12 keys")
    ref_grid = {n: (3, 4) for n in LAYERS}
    assert_close(maps.reference(normalize=False), ofr.reference(S, ref_grid, (3, 4), ["mid.attn2"])[0], "M_r")
    assert_close(maps.reference(by="time", normalize=False),
                 ofr.reference(S, ref_grid, (3, 4), ["mid.attn2"], by="time")[0], "M_r by time")


def test_official_maps_read_as_paper_equal_a_paper_trace():
    official, paper = fixed_grid_run("official")[0].with_protocol("paper"), fixed_grid_run("paper")[0]
    assert official.protocol == "paper"
    for by in (None, "time", "head"):
        layers = "*down*" if by == "head" else None
        torch.testing.assert_close(official.generated(by=by, layers=layers), paper.generated(by=by, layers=layers))
        torch.testing.assert_close(official.reference(by=by, masked=True, layers=layers),
                                   paper.reference(by=by, masked=True, layers=layers))
    torch.testing.assert_close(official.specific_reference(POINTS[1]), paper.specific_reference(POINTS[1]))
    torch.testing.assert_close(official.specific_generated((1, 2)), paper.specific_generated((1, 2)))
    assert official.imacs(ref_mask=CLOTH) == pytest.approx(paper.imacs(ref_mask=CLOTH))
    with pytest.raises(ValueError, match="lack one key probe per context key"):
        paper.with_protocol("official")


def test_protocol_errors():
    with pytest.raises(ValueError, match="protocol must be one of"):
        Recorder(ref_grid=(1, 1), protocol="mine")
    with pytest.raises(ValueError, match="use convention='official'"):
        Recorder(ref_grid=(1, 1), protocol="official", convention="paper")
    with pytest.raises(ValueError, match="ref_grid must be"):
        Recorder(ref_grid="layers")
    with pytest.raises(ValueError, match="leave ref_size out"):
        Recorder(ref_grid=(2, 2), ref_size=(4, 4))
    with pytest.raises(ValueError, match="patches with ref_grid='layer' need ref_size"):
        Recorder(ref_grid="layer", patches=[(0, 0)])


def test_official_display_inverts_the_generated_map():
    maps = fixed_grid_run("official")[0]
    M = maps.generated()
    assert torch.equal(display.normalize(M), M)  # generated() itself is never inverted
    from i2am import protocols
    torch.testing.assert_close(protocols.get("official").shown_generated(M), 1 - M)


# ---- through i2am.trace, the report and the command line ----------------------------------
def test_trace_official_and_ref_grid_layer_on_a_diffusers_unet():
    import tiny_models as tm

    model = tm.patch_inpainting()
    embeds = torch.randn(1, 1 + 8 * 12, tm.CROSS_DIM, generator=torch.Generator().manual_seed(5))
    run = dict(prompt_embeds=embeds, negative_prompt_embeds=torch.zeros_like(embeds))
    mask = tm.inpainting_mask()
    traced = {}
    for ref_grid in ("layer", (8, 12)):  # the 8 x 12 layers' keys: CLS + their own 8 x 12 grid
        with i2am.trace(model.pipe, ref_grid=ref_grid, layers=[(8, 12)], mask=mask, protocol="official") as tc:
            model.run(**run)
        traced[ref_grid] = tc.maps()
    layer, fixed = traced["layer"], traced[(8, 12)]
    assert layer.ref_grid == (8, 12) and layer.protocol == "official"
    for name, lay in fixed.layers.items():
        assert layer.layers[name]["key_grid"] == (8, 12) and layer.layers[name]["per_key"] == 0
        assert_close(layer.layers[name]["ref"], lay["ref"], name)  # the kernel reduced other key sets
    with pytest.raises(ValueError, match="fit neither 24 nor 25"):
        with i2am.trace(model.pipe, ref_grid="layer", mask=mask):  # the 4 x 6 layers see 97 keys too
            model.run(**run)

    with i2am.trace(model.pipe, ref_grid=model.ref_grid, mask=mask, protocol="official") as tc:
        model.run()
    maps = tc.maps()
    assert any(n.startswith("mid_block") for n in maps.layers)
    assert maps._names(None, None, "generated") == [n for n in maps.layers if not n.startswith("mid_block")]
    assert maps._names(None, None, "reference") == [n for n in maps.layers if maps.layers[n]["grid"] == (4, 6)][:1]


def test_report_says_its_protocol_and_compares_both(tmp_path):
    import json

    from i2am import report

    maps = fixed_grid_run("official")[0]
    scores = report.write_report(tmp_path, maps, ref_mask=CLOTH, compare_protocols=True)
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["protocol"] == "official" and saved["settings"]["protocol"] == "official"
    assert set(saved["by_protocol"]) == {"paper", "official"}
    assert saved["by_protocol"]["official"]["IMACS_g"] == pytest.approx(scores["IMACS_g"])
    assert saved["by_protocol"]["paper"]["IMACS_g"] == pytest.approx(maps.with_protocol("paper").imacs()["gen"])
    md = (tmp_path / "report.md").read_text()
    assert "Protocol: **official**" in md and "IMACS under each protocol" in md and "1 - M_g" in md

    from i2am.cli import main
    assert main(["show", str(tmp_path / "maps.safetensors"), "--protocol", "paper", "--out", str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / "scores.json").read_text())["protocol"] == "paper"
    fixed_grid_run("paper")[0].save(tmp_path / "paper.safetensors")
    assert main(["show", str(tmp_path / "paper.safetensors"), "--protocol", "official",
                 "--out", str(tmp_path / "o")]) == 2  # paper buffers lack the per-key maps


def test_specific_generated_patches_on_the_common_grid():
    """ref_grid="layer": a patch of the common grid reads each layer's key map resized to it."""
    maps, S, grids = viton_run(1, protocol="paper", layers="*warp", ref_size=(8, 6), patches=[(3, 2)])
    for name in ("output_blocks.0.warp", "output_blocks.1.warp"):  # key grids 8x6 (= common) and 4x3
        C = S[name][1].sum(1)  # (Br, H, Nq, Nk)
        at_patch = ofr.bicubic(C.reshape(*C.shape[:3], *grids[name]), (8, 6))[..., 3, 2]  # (Br, H, Nq)
        want = ofr.bicubic(at_patch.reshape(*at_patch.shape[:2], *grids[name]), sv.LATENT).clamp_min(0).mean(1)[0]
        assert_close(maps.specific_generated((3, 2), layers=name, normalize=False), want, f"patch map {name}")
