"""Recorder + AttributionMaps against the materialised reference integration (SPEC section 3)."""
import pytest
import torch

from i2am import AttributionMaps, Recorder, display, reference
from i2am.probes import key_probes, query_probes

LATENT, REF_GRID, T, G = (8, 6), (3, 4), 4, 2
MASK = torch.zeros(16, 12)
MASK[4:12, 2:8] = 1
POINTS, BOXES, PATCHES = [(1, 2), (6, 5)], [(2, 1, 5, 4)], [(0, 3), (2, 1)]
LAYERS = {"down.attn2": ((8, 6), 2), "mid.attn2": ((4, 3), 2), "up.attn2": ((8, 6), 3)}


def record_run(convention="official", branch="cond", B=4, layers=None, seed=0):
    """Feed T steps of random calls to a Recorder; return it and the calls."""
    rec = Recorder(ref_grid=REF_GRID, latent_size=LATENT, num_steps=T, time_groups=G, branch=branch,
                   mask=MASK, points=POINTS, boxes=BOXES, patches=PATCHES, convention=convention,
                   backend="torch", layers=layers)
    gen = torch.Generator().manual_seed(seed)
    calls = []
    for t in range(T):
        for name, (grid, H) in LAYERS.items():
            nq = grid[0] * grid[1]
            q, k, v = (torch.randn(B, H, n, 8, generator=gen) * s for n, s in ((nq, 3), (13, 1), (13, 1)))
            out = rec.record(name, q, k, v, step=t)
            torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
            calls.append((name, t, grid, q, k))
    return rec, calls


def oracle_buffers(calls, convention, record):
    """Per layer (Br, G, H, Ru, h_l, w_l) and (Br, G, H, Rw, K) from the materialised equations."""
    u = key_probes(REF_GRID, PATCHES).weights.flatten(1).double()
    m_latent = query_probes(LATENT, MASK, POINTS, BOXES).weights.double()
    out = {}
    for name, t, grid, q, k in calls:
        P, C = reference.softmaxes(q.double(), k.double(), q.shape[-1] ** -0.5)
        P, C = P[record][..., 1:], C[record][..., 1:]  # the last 12 keys are the 3x4 grid
        Sg, Sr = (C, P) if convention == "official" else (P, C)
        m = torch.stack([reference.pullback(r, grid) for r in m_latent])
        gen = (u @ Sg.transpose(-1, -2)).reshape(*Sg.shape[:2], -1, *grid)
        ref = m @ Sr
        tau = t * G // T
        if name not in out:
            out[name] = [torch.zeros(len(record), G, *gen.shape[1:], dtype=torch.float64),
                         torch.zeros(len(record), G, *ref.shape[1:], dtype=torch.float64)]
        out[name][0][:, tau] += gen
        out[name][1][:, tau] += ref
    return out


@pytest.fixture(scope="module", params=["official", "paper"])
def run(request):
    rec, calls = record_run(request.param)
    return request.param, rec.maps(), oracle_buffers(calls, request.param, [2, 3])


def _layers(names):
    return [n for n in LAYERS if n in names]


@pytest.mark.parametrize("by", [None, "time", "head"])
@pytest.mark.parametrize("layers", [None, "*.attn2", ["down*", "mid*"], [(4, 3)]])
def test_generated_and_reference_match_oracle(run, by, layers):
    convention, maps, oracle = run
    names = maps._select(layers)
    if by == "head" and len({LAYERS[n][1] for n in names}) > 1:
        with pytest.raises(ValueError, match="by='head' needs layers with one head count"):
            maps.generated(by=by, layers=layers)
        return
    for probe, row_g, row_r in ((None, 0, 0), ("patch", 2, None), ("mask", None, 1), ("point", None, 2),
                                ("box", None, 4)):
        for b in range(2):
            if row_g is not None:
                want = reference.generated([oracle[n][0][b, :, :, row_g] for n in names], LATENT, by=by)
                got = (maps.generated(by=by, layers=layers, normalize=False) if probe is None else
                       maps.specific_generated(PATCHES[1], by=by, layers=layers, normalize=False))
                torch.testing.assert_close(got[b].double(), want, rtol=1e-4, atol=1e-8)
                got_n = maps.generated(by=by, layers=layers) if probe is None else \
                    maps.specific_generated(PATCHES[1], by=by, layers=layers)
                torch.testing.assert_close(got_n[b].double(), display.normalize(want), rtol=1e-4, atol=1e-4)
            if row_r is not None:
                want = reference.reference([oracle[n][1][b, :, :, row_r] for n in names], REF_GRID, by=by)
                got = {None: lambda **kw: maps.reference(**kw),
                       "mask": lambda **kw: maps.reference(masked=True, **kw),
                       "point": lambda **kw: maps.specific_reference(POINTS[0], **kw),
                       "box": lambda **kw: maps.specific_reference(BOXES[0], **kw)}[probe]
                torch.testing.assert_close(got(by=by, layers=layers, normalize=False)[b].double(), want,
                                           rtol=1e-4, atol=1e-8)
                torch.testing.assert_close(got(by=by, layers=layers)[b].double(), display.normalize(want),
                                           rtol=1e-4, atol=1e-4)


def test_shapes_and_single_image():
    rec, _ = record_run(branch=[1], B=2)
    maps = rec.maps()
    assert maps.generated().shape == LATENT and maps.reference().shape == REF_GRID
    assert maps.generated(by="time").shape == (G, *LATENT)
    assert maps.reference(by="head", layers="mid*").shape == (2, *REF_GRID)
    assert maps.specific_reference((6, 5)).shape == REF_GRID
    for m in (maps.generated(), maps.reference(masked=True), maps.specific_generated((0, 3))):
        assert m.min() == 0 and m.max() == 1


def test_map_methods_take_by_layers_normalize_as_keywords_in_one_order():
    import inspect

    rec, _ = record_run(branch=[1], B=2)
    maps = rec.maps()
    for method in (maps.generated, maps.reference, maps.specific_generated, maps.specific_reference):
        params = inspect.signature(method).parameters
        keywords = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
        assert keywords[:3] == ["by", "layers", "normalize"], method.__name__
        assert all(p.kind is p.KEYWORD_ONLY for n, p in params.items() if n not in ("patch", "point_or_box"))
    with pytest.raises(TypeError):
        maps.generated("time")
    with pytest.raises(TypeError):
        maps.specific_reference((6, 5), "time")
    assert not any(hasattr(maps, name) for name in ("key_row", "per_key_rows", "select"))


@pytest.mark.parametrize("branch,B,cfg,want", [("cond", 4, None, [2, 3]), ("uncond", 4, None, [0, 1]),
                                               ("all", 4, None, [0, 1, 2, 3]), ([3, 0], 4, None, [3, 0]),
                                               ("cond", 3, None, [0, 1, 2]), ("cond", 2, False, [0, 1])])
def test_branch_selection(branch, B, cfg, want):
    rec = Recorder(ref_grid=(1, 1), ref_keys=[2], latent_size=(2, 2), num_steps=1, branch=branch, backend="torch")
    q = torch.randn(B, 1, 4, 8)
    q[want] *= 0  # recorded entries have uniform attention: their maps differ from the others'
    rec.record("x", q, torch.randn(B, 1, 3, 8), torch.randn(B, 1, 3, 8), step=0, cfg=cfg)
    maps = rec.maps()
    assert maps.record == want
    torch.testing.assert_close(maps.layers["x"]["gen"][:, 0, 0, 0], torch.full((len(want), 2, 2), 0.25))


def test_save_load_round_trip(tmp_path):
    rec, _ = record_run()
    maps = rec.maps()
    maps.save(tmp_path / "maps.safetensors")
    back = AttributionMaps.load(tmp_path / "maps.safetensors")
    assert repr(back) == repr(maps)
    for name, b in maps.layers.items():
        for kind in ("gen", "ref"):
            assert torch.equal(back.layers[name][kind], b[kind])
    assert torch.equal(back.mask, maps.mask)
    assert torch.equal(back.specific_reference(BOXES[0], by="time"), maps.specific_reference(BOXES[0], by="time"))
    scores, back_scores = maps.imacs(ref_mask=torch.eye(6, 8)), back.imacs(ref_mask=torch.eye(6, 8))
    assert scores["gen"].shape == (2,) and all(torch.equal(scores[k], back_scores[k]) for k in ("gen", "ref"))


def test_repr():
    rec, _ = record_run()
    assert repr(rec.maps()) == ("AttributionMaps(3 layers, latent 8x6, reference grid 3x4, 2 image(s), 2 time "
                                "group(s) over 4 steps, convention='official', protocol='paper', probes: 1 mask, 2 points, "
                                "1 box, 2 patches)")


def test_imacs_formula_and_maps():
    Mh = torch.tensor([[1.0, 0.0], [0.5, 0.0]])
    x = torch.tensor([[1, 0], [0, 0]])
    assert display.imacs(Mh, x).item() == pytest.approx(1 - 3 * 0.5 / 3)
    rec, calls = record_run(branch=[3], B=4)
    maps = rec.maps()
    ref_mask = torch.zeros(9, 12)
    ref_mask[2:6, 3:9] = 1
    scores = maps.imacs(ref_mask=ref_mask)
    Mg = display.pixel_level(maps.generated(normalize=False).double(), MASK.shape)
    Mr = display.pixel_level(maps.reference(masked=True, normalize=False).double(), ref_mask.shape)
    assert scores["gen"] == pytest.approx(display.imacs(Mg, MASK).item())
    assert scores["ref"] == pytest.approx(display.imacs(Mr, ref_mask).item())
    assert set(maps.imacs(gen_mask=MASK[:8, :8], lam=1.0)) == {"gen"}


def test_pixel_level_thresholds():
    M = torch.rand(5, 7)
    x = display.pixel_level(M, (20, 28))
    assert x.shape == (20, 28) and x.max() == 1
    assert ((x == 0) | (x > 0.4)).all()


def test_normalize_constant_map_is_zero_not_nan():
    assert torch.equal(display.normalize(torch.full((2, 3, 3), 7.0)), torch.zeros(2, 3, 3))


def _recorder(**kw):
    args = dict(ref_grid=(3, 4), latent_size=(8, 6), num_steps=4, backend="torch")
    args.update(kw)
    return Recorder(**args)


def _call(rec, nq=48, nk=13, step=0, B=2, name="a", H=2):
    return rec.record(name, torch.randn(B, H, nq, 8), torch.randn(B, H, nk, 8), torch.randn(B, H, nk, 8), step=step)


@pytest.mark.parametrize("make,act,err,match", [
    (lambda: _recorder(time_groups=5), None, ValueError, "time_groups=5 is more than the 4 steps"),
    (lambda: _recorder(convention="mine"), None, ValueError, "convention must be one of"),
    (lambda: _recorder(branch="both"), None, ValueError, "branch must be one of"),
    (lambda: _recorder(ref_grid=(0, 2)), None, ValueError, "ref_grid"),
    (_recorder, lambda r: _call(r, nk=11), ValueError, r"layer .a. has Nk=11 keys, which fit neither 12 nor 13 .* ref_grid 3x4"),
    (_recorder, lambda r: _call(r, nq=50), ValueError, "cannot infer the grid"),
    (_recorder, lambda r: _call(r, step=4), ValueError, "step 4 is outside the 4 steps"),
    (lambda: _recorder(ref_keys=slice(0, 5)), _call, ValueError, "ref_keys selects 5 keys"),
    (lambda: _recorder(latent_size=None), _call, ValueError, "needs latent_size and num_steps"),
    (lambda: _recorder(branch="uncond"), lambda r: _call(r, B=3), ValueError, "branch='uncond' needs"),
    (_recorder, lambda r: (_call(r), _call(r, B=4)), ValueError, "recorded batch entries changed"),
    (_recorder, lambda r: (_call(r), _call(r, H=3)), ValueError, "layer 'a' was first called"),
    (_recorder, lambda r: r.set_latent_size((16, 12)), ValueError, "latent size changed"),
    (_recorder, lambda r: r.maps(), ValueError, "nothing was recorded"),
])
def test_recorder_errors(make, act, err, match):
    with pytest.raises(err, match=match):
        act(make()) if act else make()


def test_unselected_layers_are_plain_attention():
    rec = _recorder(layers=["down*", (4, 3)])
    assert rec.selected("down.0", (8, 6)) and rec.selected("up", (4, 3)) and not rec.selected("up", (8, 6))
    _call(rec, name="up")
    assert not rec.buffers


@pytest.mark.parametrize("act,match", [
    (lambda m: m.specific_reference((0, 0)), r"point \(0, 0\) was not traced"),
    (lambda m: m.specific_generated((1, 1)), r"patch \(1, 1\) was not traced"),
    (lambda m: m.reference(masked=True), "mask was not traced"),
    (lambda m: m.generated(layers="nope*"), "matches none of the traced layers"),
    (lambda m: m.generated(by="step"), "by must be one of"),
    (lambda m: m.imacs(), "imacs needs gen_mask"),
    (lambda m: m.imacs(gen_mask=torch.zeros(4, 4)), "gen_mask is empty"),
    (lambda m: m.imacs(gen_mask=torch.ones(4, 4)), "gen_mask covers the whole image"),
])
def test_map_errors(act, match):
    rec = _recorder()
    _call(rec)
    with pytest.raises(ValueError, match=match):
        act(rec.maps())


def test_no_nan_with_a_single_reference_patch():
    rec = _recorder(ref_grid=(1, 1), ref_keys=[12], mask=MASK)
    _call(rec)
    maps = rec.maps()
    for m in (maps.generated(), maps.reference(), maps.reference(masked=True, by="time")):
        assert torch.isfinite(m).all()
