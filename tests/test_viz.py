"""Figures (i2am.viz) and the report folder (i2am.report) on tiny maps fed through a Recorder."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from i2am import AttributionMaps, Recorder, display, report, viz

LATENT, REF_GRID = (8, 8), (4, 4)
POINT, BOX, PATCH = (3, 4), (2, 2, 6, 5), (1, 2)


def tiny_maps(batch=1, heads=(2, 2), time_groups=2, steps=4):
    """Real AttributionMaps of random attention calls: two layers (8x8 and 4x4 queries), a CLS
    key plus a 4x4 reference grid, an inpainting mask, a point, a box and a patch."""
    gen = torch.Generator().manual_seed(0)
    mask = torch.zeros(32, 32)
    mask[8:24, 10:26] = 1
    rec = Recorder(ref_grid=REF_GRID, latent_size=LATENT, num_steps=steps, time_groups=time_groups, mask=mask,
                   points=[POINT], boxes=[BOX], patches=[PATCH], branch="all")
    for t in range(steps):
        for (name, nq), h in zip((("down.attn2", 64), ("mid.attn2", 16)), heads):
            q, k, v = (torch.randn(batch, h, n, 8, generator=gen) for n in (nq, 17, 17))
            q[..., 0] += torch.linspace(-3, 3, nq)  # structure, so that the maps are not flat
            k[..., 0] += torch.linspace(-3, 3, 17)
            rec.record(name, q, k, v, step=t)
    return rec.maps()


def gradient_image(h, w):
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return torch.stack([yy, xx, 0.5 * torch.ones_like(xx)])  # (3, H, W) floats in [0, 1]


def pixels(img):
    return np.asarray(img).astype(int)


def find(canvas, tile):
    """Top-left corners where tile appears verbatim in canvas."""
    c, t = pixels(canvas), pixels(tile)
    ys, xs = np.nonzero((c[: c.shape[0] - t.shape[0] + 1, : c.shape[1] - t.shape[1] + 1] == t[0, 0]).all(-1))
    return [(y, x) for y, x in zip(ys, xs) if (c[y:y + t.shape[0], x:x + t.shape[1]] == t).all()]


@pytest.fixture(scope="module")
def maps():
    return tiny_maps()


# ---- images in --------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["chw", "hwc", "hw", "uint8", "pil"])
def test_to_pil_accepts_the_image_layouts(layout):
    u = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    f = torch.from_numpy(u).double() / 255  # floats in [0, 1] that round back to u
    given = {"chw": f.permute(2, 0, 1), "hwc": f, "hw": f[..., 0], "uint8": u, "pil": Image.fromarray(u)}[layout]
    out = viz.to_pil(given)
    assert out.mode == "RGB" and out.size == (5, 6)
    np.testing.assert_array_equal(pixels(out), np.repeat(u[..., :1], 3, -1) if layout == "hw" else u)


def test_to_pil_rejects_other_shapes():
    with pytest.raises(ValueError, match="must be"):
        viz.to_pil(torch.zeros(2, 4, 4, 4))


# ---- overlay and probes -----------------------------------------------------------------------
@pytest.mark.parametrize("threshold", [0.4, 0.0, 0.8])
def test_overlay_changes_exactly_the_pixels_of_the_thresholded_map(maps, threshold):
    image = Image.new("RGB", (40, 24), (90, 90, 90))  # jet never blends back to this grey
    M = maps.generated()
    out = viz.overlay(image, M, threshold=threshold)
    assert out.size == image.size
    heat = display.pixel_level(M.double(), (24, 40), threshold).numpy()
    changed = (pixels(out) != pixels(image)).any(-1)
    assert changed.any()
    np.testing.assert_array_equal(changed, heat > 0)


def test_overlay_takes_one_2d_map():
    with pytest.raises(ValueError, match="one 2-D map, got shape \\(2, 8, 8\\)"):
        viz.overlay(Image.new("RGB", (8, 8)), torch.rand(2, 8, 8))


def test_overlay_blends_jet_with_alpha(maps):
    image = Image.new("RGB", (16, 16), (0, 0, 0))
    heat = display.pixel_level(maps.generated().double(), (16, 16)).numpy()
    out = pixels(viz.overlay(image, maps.generated(), alpha=1.0))
    from matplotlib import colormaps

    expect = np.round(colormaps["jet"](heat)[..., :3] * 255)
    np.testing.assert_array_equal(out[heat > 0], expect[heat > 0])


def test_box_is_drawn_inside_its_cells():
    image = Image.new("RGB", (48, 64), (0, 0, 0))  # grid 8x6 over 64x48 pixels: 8x8-pixel cells
    out = pixels(viz.draw_probe(image, (2, 1, 5, 4), (8, 6)))  # rows 2..4, cols 1..3
    changed = (out != 0).any(-1)
    ys, xs = np.nonzero(changed)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (16, 39, 8, 31)
    for edge in (out[16, 8:32], out[39, 8:32], out[16:40, 8], out[16:40, 31]):
        assert (edge == viz.PROBE_COLOUR).all()
    assert not changed[20:36, 12:28].any()  # only the outline


def test_point_is_drawn_in_its_cell():
    image = Image.new("RGB", (48, 64), (0, 0, 0))
    out = pixels(viz.draw_probe(image, (5, 2), (8, 6)))
    ys, xs = np.nonzero((out != 0).any(-1))
    assert 40 <= ys.min() and ys.max() <= 47 and 16 <= xs.min() and xs.max() <= 23  # the cell's pixels
    assert ys.mean() == pytest.approx(43.5, abs=0.25) and xs.mean() == pytest.approx(19.5, abs=0.25)  # centred
    assert (out[44, 20] == viz.PROBE_COLOUR).all()


def test_probe_must_be_a_point_or_a_box():
    with pytest.raises(ValueError, match="point .* or a box"):
        viz.draw_probe(Image.new("RGB", (8, 8)), (1, 2, 3), (4, 4))


# ---- figures ----------------------------------------------------------------------------------
def test_specific_reference_figure_holds_the_probe_and_the_overlay(maps):
    image, reference = gradient_image(16, 16), gradient_image(16, 12).flip(0)
    M_sr = maps.specific_reference(BOX)
    fig = viz.specific_reference_figure(image, reference, M_sr, BOX, maps.latent_size, tile=48)
    left = viz.draw_probe(viz.to_pil(image).resize((48, 48), Image.NEAREST), BOX, maps.latent_size)
    right = viz.overlay(viz.to_pil(reference).resize((36, 48), Image.NEAREST), M_sr)
    [(y0, x0)], [(y1, x1)] = find(fig, left), find(fig, right)
    assert y0 == y1 and x1 >= x0 + 48
    assert fig.width >= 48 + 36 and fig.height > 48


def test_specific_generated_figure_holds_the_patch_and_the_overlay(maps):
    image, reference = gradient_image(16, 16), gradient_image(16, 12).flip(0)
    M_sg = maps.specific_generated(PATCH)
    fig = viz.specific_generated_figure(reference, image, M_sg, PATCH, maps.ref_grid, tile=48)
    left = viz.draw_probe(viz.to_pil(reference).resize((36, 48), Image.NEAREST), (1, 2, 2, 3), maps.ref_grid)
    right = viz.overlay(viz.to_pil(image).resize((48, 48), Image.NEAREST), M_sg)
    assert find(fig, left) and find(fig, right)


def test_split_figure_has_one_column_per_group_in_order(maps):
    image, reference = gradient_image(16, 16), gradient_image(16, 12)
    G = maps.generated(by="time")
    R = maps.reference(by="time")
    labels = viz.time_labels(maps.time_groups, maps.num_steps)
    fig = viz.split_figure(G, R, image=image, reference_image=reference, column_labels=labels, tile=48)
    base = viz.to_pil(image).resize((48, 48), Image.NEAREST)
    corners = [find(fig, viz.overlay(base, g))[0] for g in G]
    assert [x for _, x in corners] == sorted(x for _, x in corners) and len({y for y, _ in corners}) == 1
    ref_base = viz.to_pil(reference).resize((36, 48), Image.NEAREST)
    assert all(find(fig, viz.overlay(ref_base, r))[0][0] > corners[0][0] + 48 for r in R)  # the row below
    wider = viz.split_figure(torch.cat([G, G[:1]]), None, column_labels=labels + ["x"], tile=48)
    narrower = viz.split_figure(G, None, column_labels=labels, tile=48)
    assert wider.width > narrower.width + 48 and wider.height == narrower.height


def test_split_figure_without_images_uses_a_grey_canvas(maps):
    fig = viz.split_figure(maps.generated(by="head"), None, column_labels=["head 0", "head 1"], tile=32)
    grey = Image.new("RGB", (32, 32), viz.NO_IMAGE)
    assert find(fig, viz.overlay(grey, maps.generated(by="head")[1]))


def test_split_figure_checks_its_labels(maps):
    with pytest.raises(ValueError, match="3 column labels for 2"):
        viz.split_figure(maps.generated(by="time"), column_labels=["a", "b", "c"])


def test_overview_figure_holds_every_panel(maps):
    image, reference = gradient_image(16, 16), gradient_image(16, 12)
    fig = viz.overview_figure(image, reference, maps.generated(), maps.reference(), maps.reference(masked=True),
                              tile=48)
    base, ref_base = (viz.to_pil(x).resize((w, 48), Image.NEAREST) for x, w in ((image, 48), (reference, 36)))
    panels = [base, viz.overlay(base, maps.generated()), ref_base, viz.overlay(ref_base, maps.reference()),
              viz.overlay(ref_base, maps.reference(masked=True))]
    xs = [find(fig, p)[0][1] for p in panels]
    assert xs == sorted(xs)


def test_time_labels_follow_eq_10():
    assert viz.time_labels(5, 50) == ["steps 0-9", "steps 10-19", "steps 20-29", "steps 30-39", "steps 40-49"]
    assert viz.time_labels(3, 4) == ["steps 0-1", "step 2", "step 3"]  # tau(t) = floor(3 t / 4)


# ---- report folder ----------------------------------------------------------------------------
def test_report_folder(tmp_path, maps):
    image, reference = gradient_image(32, 32), gradient_image(32, 24)
    ref_mask = torch.zeros(32, 24)
    ref_mask[4:20, 6:18] = 1
    scores = report.write_report(tmp_path, maps, image=image, reference=reference, ref_mask=ref_mask,
                                 settings={"steps": 4}, extra_scores={"accuracy": 0.75},
                                 extra_images={"input": image})
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {"maps.safetensors", "scores.json", "report.md", "generated.png", "reference.png", "input.png",
                     "overview.png", "by_time.png", "by_head.png", "specific_reference_point_3_4.png",
                     "specific_reference_box_2_2_6_5.png", "specific_generated_patch_1_2.png"}
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved == scores
    imacs = maps.imacs(ref_mask=ref_mask)
    assert saved["IMACS_g"] == pytest.approx(imacs["gen"]) and saved["IMACS_r"] == pytest.approx(imacs["ref"])
    assert saved["accuracy"] == 0.75
    assert saved["settings"]["steps"] == 4 and saved["settings"]["points"] == [list(POINT)]
    assert saved["settings"]["ref_grid"] == list(REF_GRID) and saved["settings"]["time_groups"] == 2
    md = (tmp_path / "report.md").read_text()
    for name in names - {"maps.safetensors", "scores.json", "report.md"}:
        assert f"{name}" in md
    assert "IMACS_g" in md and "accuracy" in md
    loaded = AttributionMaps.load(tmp_path / "maps.safetensors")
    assert torch.equal(loaded.generated(by="time"), maps.generated(by="time"))


def test_report_without_mask_or_images(tmp_path):
    rec = Recorder(ref_grid=(2, 2), latent_size=(4, 4), num_steps=2)
    for t in range(2):
        rec.record("a.attn2", *(torch.randn(1, 2, n, 4) for n in (16, 5, 5)), step=t)
    scores = report.write_report(tmp_path, rec.maps())
    assert set(scores) == {"protocol", "settings"} and scores["protocol"] == "paper"
    assert {p.name for p in tmp_path.glob("*.png")} == {"overview.png", "by_head.png"}  # one time group
    assert "IMACS is not defined" in (tmp_path / "report.md").read_text()


def test_report_of_several_images_and_head_counts(tmp_path):
    maps = tiny_maps(batch=2, heads=(2, 4))
    scores = report.write_report(tmp_path, maps, image=[gradient_image(16, 16)] * 2, reference=gradient_image(8, 8))
    assert len(scores["IMACS_g"]) == 2
    names = {p.name for p in tmp_path.glob("*.png")}
    for b in (0, 1):
        assert {f"overview_{b}.png", f"by_time_{b}.png", f"by_head_2heads_{b}.png", f"by_head_4heads_{b}.png",
                f"generated_{b}.png", f"specific_reference_point_3_4_{b}.png"} <= names
    assert "reference.png" in names


def test_report_rerendered_into_its_own_folder(tmp_path, maps):
    report.write_report(tmp_path, maps)
    before = (tmp_path / "overview.png").read_bytes()
    report.write_report(tmp_path, AttributionMaps.load(tmp_path / "maps.safetensors"))
    assert (tmp_path / "overview.png").read_bytes() == before
    assert torch.equal(AttributionMaps.load(tmp_path / "maps.safetensors").generated(), maps.generated())
