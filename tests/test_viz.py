"""Figures (i2am.viz) and the report folder (i2am.report) on tiny maps fed through a Recorder."""
import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.contour import ContourSet
from PIL import Image

import i2am
from i2am import AttributionMaps, Recorder, display, report, viz
from i2am.inputs import as_mask

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


@pytest.fixture(scope="module")
def maps():
    return tiny_maps()


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def heat_of(ax):
    """The map layer plot_overlay drew (the image is the first layer): a masked (H, W) array."""
    return ax.images[1].get_array()


def contours(ax):
    return [c for c in ax.collections if isinstance(c, ContourSet)]


def outline_vertices(ax):
    return np.concatenate([p.vertices for c in contours(ax) for p in c.get_paths()])


# ---- images and masks in ----------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["chw", "hwc", "hw", "uint8", "pil"])
def test_to_pil_accepts_the_image_layouts(layout):
    u = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    f = torch.from_numpy(u).double() / 255  # floats in [0, 1] that round back to u
    given = {"chw": f.permute(2, 0, 1), "hwc": f, "hw": f[..., 0], "uint8": u, "pil": Image.fromarray(u)}[layout]
    out = viz.to_pil(given)
    assert out.mode == "RGB" and out.size == (5, 6)
    np.testing.assert_array_equal(np.asarray(out), np.repeat(u[..., :1], 3, -1) if layout == "hw" else u)


def test_to_pil_rejects_other_shapes():
    with pytest.raises(ValueError, match="must be"):
        viz.to_pil(torch.zeros(2, 4, 4, 4))


def mask_forms(m):
    """One 0/1 mask (H, W) in every form a user may pass."""
    u8 = (m * 255).astype(np.uint8)
    return {"pil L": Image.fromarray(u8), "pil RGB": Image.fromarray(u8).convert("RGB"), "pil 1": Image.fromarray(
        u8).convert("1"), "uint8": u8, "bool": m > 0, "float": m.astype(np.float32), "int": m.astype(np.int64),
        "tensor": torch.from_numpy(m), "tensor 1xHxW": torch.from_numpy(m)[None], "HxWx1": m[..., None]}


def test_every_mask_form_gives_the_same_mask():
    m = np.zeros((6, 7))
    m[1:4, 2:6] = 1
    for name, given in mask_forms(m).items():
        assert torch.equal(as_mask(given), torch.from_numpy(m > 0)), name


def test_mask_rule_is_above_one_half_after_scaling():
    assert as_mask(np.array([[0.5, 0.51]])).tolist() == [[False, True]]
    assert as_mask(np.array([[127, 128]], dtype=np.uint8)).tolist() == [[False, True]]  # 128/255 > 0.5
    assert as_mask(Image.fromarray(np.array([[127, 128]], dtype=np.uint8))).tolist() == [[False, True]]


@pytest.mark.parametrize("bad, message", [
    (np.array([[0, 255.0]]), "values in \\[0, 1\\].*0 to 255"),
    (np.array([[-1, 0.5]]), "values in \\[0, 1\\]"),
    (np.array([[np.nan, 1]]), "values in \\[0, 1\\]"),
    (np.zeros((2, 3, 4)), "must be 2-D \\(H, W\\)"),
])
def test_bad_masks_say_what_is_expected(bad, message):
    with pytest.raises(ValueError, match=message):
        as_mask(bad)


# ---- plot_overlay -----------------------------------------------------------------------------
def test_plot_overlay_draws_into_the_given_axes_and_returns_it(maps):
    fig, axes = plt.subplots(1, 2)
    ax = i2am.plot_overlay(maps.generated(), gradient_image(16, 16), ax=axes[1])
    assert ax is axes[1] and len(ax.images) == 2 and not axes[0].images  # image and map, in that Axes only
    assert len(fig.axes) == 3  # the two Axes and the colorbar


def test_plot_overlay_without_axes_makes_a_figure(maps):
    ax = i2am.plot_overlay(maps.generated(), None, colorbar=False)
    assert ax.figure is not None and len(ax.figure.axes) == 1  # no colorbar asked for


@pytest.mark.parametrize("threshold", [0.4, 0.0, 0.8])
def test_plot_overlay_leaves_values_at_or_below_threshold_transparent(maps, threshold):
    image = Image.new("RGB", (40, 24), (90, 90, 90))
    M = maps.generated()
    ax = i2am.plot_overlay(M, image, threshold=threshold)
    heat = heat_of(ax)
    size = ax.images[0].get_array().shape[:2]  # the image as shown: enlarged (nearest) to 256 px
    assert size == (24 * 7, 40 * 7)
    expect = display.pixel_level(M.double(), size, threshold).numpy()  # eq. 9 at the shown size
    np.testing.assert_array_equal(np.ma.getmaskarray(heat), expect <= threshold)
    np.testing.assert_allclose(heat.compressed(), expect[expect > threshold])
    assert heat.mask.any() and not heat.mask.all()
    overlay = ax.images[1]  # alpha 0.5 in jet's colours, once (not on the artist as well), masked values clear
    assert overlay.get_alpha() is None and overlay.get_cmap().name == "jet"
    np.testing.assert_allclose(overlay.get_cmap()(np.linspace(0, 1, 5)),
                               plt.get_cmap("jet")(np.linspace(0, 1, 5)) * [1, 1, 1, 0.5])
    assert overlay.get_cmap().get_bad()[3] == 0


def test_plot_overlay_colorbar_and_mask_outline(maps):
    mask = np.zeros((32, 32))
    mask[8:24, 10:26] = 1
    ax = i2am.plot_overlay(maps.generated(), gradient_image(32, 32), mask=mask, threshold=0.4)
    [bar_ax] = [a for a in ax.figure.axes if a is not ax]
    assert "not drawn" in bar_ax.get_ylabel() and 0.4 in bar_ax.get_yticks()
    assert bar_ax.get_ylim() == (0, 1)  # the value scale
    [outline] = contours(ax)
    assert list(outline.levels) == [0.5]
    v = outline_vertices(ax)  # the mask's border, in the shown image's pixels (32 px enlarged 8x)
    assert v[:, 0].min() == pytest.approx(10 * 8 - 0.5, abs=1) and v[:, 0].max() == pytest.approx(26 * 8 - 0.5, abs=1)
    assert v[:, 1].min() == pytest.approx(8 * 8 - 0.5, abs=1) and v[:, 1].max() == pytest.approx(24 * 8 - 0.5, abs=1)


def test_plot_overlay_pil_mask_equals_numpy_mask(maps):
    m = np.zeros((32, 32))
    m[8:24, 10:26] = 1
    drawn = {name: outline_vertices(i2am.plot_overlay(maps.generated(), None, mask=given))
             for name, given in mask_forms(m).items()}
    for name, v in drawn.items():
        np.testing.assert_array_equal(v, drawn["float"], err_msg=name)


def test_plot_overlay_takes_one_2d_map():
    with pytest.raises(ValueError, match="one 2-D map, got shape \\(2, 8, 8\\)"):
        i2am.plot_overlay(torch.rand(2, 8, 8), Image.new("RGB", (8, 8)))


def test_plot_overlay_normalize_false_keeps_the_callers_scale():
    M = torch.linspace(0.2, 0.6, 8).expand(8, 8)  # a ramp: no bicubic overshoot
    ax = i2am.plot_overlay(M, Image.new("RGB", (256, 256)), normalize=False, threshold=0.0)
    assert heat_of(ax).max() == pytest.approx(0.6, abs=0.01) and heat_of(ax).min() == pytest.approx(0.2, abs=0.01)


# ---- probes and figures -----------------------------------------------------------------------
def test_box_is_drawn_around_its_cells():
    fig, ax = plt.subplots()
    viz.draw_probe(ax, (2, 1, 5, 4), (8, 6), (64, 48))  # 8x8-pixel cells: rows 2..4, cols 1..3
    [box] = ax.patches
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (7.5, 15.5, 24, 24)
    assert "(2, 1, 5, 4)" in [t.get_text() for t in ax.texts]


def test_point_is_drawn_at_its_cell_centre():
    fig, ax = plt.subplots()
    viz.draw_probe(ax, (5, 2), (8, 6), (64, 48))
    [line] = ax.lines
    assert (line.get_xdata()[0], line.get_ydata()[0]) == (19.5, 43.5)  # pixel centres are integers


def test_probe_must_be_a_point_or_a_box():
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="point .* or a box"):
        viz.draw_probe(ax, (1, 2, 3), (4, 4), (8, 8))


def test_panel_figure_has_its_panels_probes_and_one_colorbar(maps):
    image, reference = gradient_image(16, 16), gradient_image(16, 12)
    fig = viz.panel_figure([viz.Panel("generated", image, probes=[POINT], probe_grid=maps.latent_size),
                            viz.Panel("M_sr", reference, maps.specific_reference(POINT), mask=torch.ones(4, 4))],
                           title="a title")
    panels, bars = fig.axes[:2], fig.axes[2:]
    assert [a.get_title() for a in panels] == ["generated", "M_sr"] and len(bars) == 1
    assert fig.get_suptitle() == "a title"
    assert len(panels[0].lines) == 1 and len(panels[1].images) == 2
    assert not contours(panels[1])  # a full mask has no outline


def test_split_figure_rows_share_one_colour_scale():
    ramp = torch.linspace(1, 3, 8).expand(8, 8)  # no bicubic overshoot
    fig = viz.split_figure([torch.stack([ramp, 2 * ramp])], column_labels=["a", "b"], row_labels=["M_g"],
                           images=[gradient_image(16, 16)], threshold=0.0)
    a, b = (heat_of(ax) for ax in fig.axes[:2])
    # one scale from the row's min (1) to its max (6), not each map to [0, 1]
    assert b.max() == pytest.approx(1, abs=0.01) and a.max() == pytest.approx((3 - 1) / (6 - 1), abs=0.01)
    assert len(fig.axes) == 3 and [ax.get_title() for ax in fig.axes[:2]] == ["a", "b"]


def test_split_figure_lays_out_rows_and_columns(maps):
    G, R = maps.generated(by="time"), maps.reference(by="time")
    labels = viz.time_labels(maps.time_groups, maps.num_steps)
    fig = viz.split_figure([G, R], column_labels=labels, row_labels=["gen", "ref"],
                           images=[gradient_image(16, 16), gradient_image(16, 12)])
    grid = fig.axes[:4]
    assert [a.get_title() for a in grid] == labels + ["", ""] and [grid[0].get_ylabel(), grid[2].get_ylabel()] == [
        "gen", "ref"]
    assert len(fig.axes) == 5  # one colorbar for the grid


def test_split_figure_keeps_every_row_label_inside_the_figure():
    # two references of other aspects than the image (a square 4x4 and a wide 3x5 grid): the
    # widest row fills its column, and its label must not be pushed off the figure's left edge
    gen, square, wide = torch.rand(3, 4, 6), torch.rand(3, 4, 4), torch.rand(3, 3, 5)
    fig = viz.split_figure([gen, square, gen, wide], column_labels=["a", "b", "c"],
                           row_labels=["M_g, ref 0", "M_r, ref 0", "M_g, ref 1", "M_r, ref 1"],
                           images=[gradient_image(64, 96), gradient_image(64, 64), gradient_image(64, 96),
                                   gradient_image(48, 80)], title="three\nline\ntitle")
    fig.canvas.draw()
    boxes = [ax.yaxis.label.get_window_extent() for ax in fig.axes[0:12:3]]
    assert min(box.x0 for box in boxes) >= 0
    assert max(box.x0 for box in boxes) - min(box.x0 for box in boxes) < 1  # the labels stand in one column
    plt.close(fig)


def test_split_figure_checks_its_labels(maps):
    with pytest.raises(ValueError, match="3 column labels for 2 maps"):
        viz.split_figure([maps.generated(by="time")], column_labels=["a", "b", "c"], row_labels=["g"])
    with pytest.raises(ValueError, match="one row label"):
        viz.split_figure([maps.generated(by="time")], column_labels=["a", "b"], row_labels=[])


def test_save_figure_writes_png_and_pdf_and_closes(tmp_path, maps):
    fig = viz.panel_figure([viz.Panel("M_g", None, maps.generated())])
    names = viz.save_figure(fig, tmp_path / "f")
    assert names == [f"{tmp_path / 'f'}.png", f"{tmp_path / 'f'}.pdf"]
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert not plt.fignum_exists(fig.number)


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
    figures = {f"{stem}.{ext}" for ext in ("png", "pdf") for stem in (
        "overview", "by_time", "by_head", "specific_reference_point_3_4", "specific_reference_box_2_2_6_5",
        "specific_generated_patch_1_2")}
    assert names == {"maps.safetensors", "scores.json", "report.md", "generated.png", "reference.png",
                     "input.png"} | figures
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
    legend = md[:md.index("## Scores")]  # the report opens with its legend
    for term in ("M_g", "M_r", "M_sr", "not drawn", "White outline", "IMACS", "Protocol: **paper**", "docs/maps.md"):
        assert term in legend, term
    assert "1x1" not in md
    loaded = AttributionMaps.load(tmp_path / "maps.safetensors")
    assert torch.equal(loaded.generated(by="time"), maps.generated(by="time"))


def test_report_without_mask_or_images(tmp_path):
    rec = Recorder(ref_grid=(2, 2), latent_size=(4, 4), num_steps=2)
    for t in range(2):
        rec.record("a.attn2", *(torch.randn(1, 2, n, 4) for n in (16, 5, 5)), step=t)
    scores = report.write_report(tmp_path, rec.maps())
    assert set(scores) == {"protocol", "settings", "files"} and scores["protocol"] == "paper"  # no IMACS
    assert {p.name for p in tmp_path.glob("*.p*")} == {"overview.png", "by_head.png", "overview.pdf",
                                                       "by_head.pdf"}  # one time group
    assert sorted(p.name for p in tmp_path.iterdir()) == scores["files"]  # the report lists what it wrote
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


def test_report_of_a_one_token_reference_leaves_out_the_reference_side(tmp_path):
    """A 1x1 reference grid (Paint-by-Example): M_r and M_sr are one value; no panels for them."""
    rec = Recorder(ref_grid=(1, 1), latent_size=(8, 8), num_steps=2, time_groups=2, points=[POINT],
                   patches=[(0, 0)], mask=torch.ones(8, 8).tril())
    for t in range(2):
        rec.record("a.attn2", *(torch.randn(1, 2, n, 4) for n in (64, 2, 2)), step=t)
    report.write_report(tmp_path, rec.maps(), image=gradient_image(16, 16), reference=gradient_image(16, 16))
    assert {p.stem for p in tmp_path.glob("*.pdf")} == {"overview", "by_time", "by_head",
                                                        "specific_generated_patch_0_0"}  # no M_sr figure
    overview = plt.imread(tmp_path / "overview.png")
    assert overview.shape[1] < 1.5 * overview.shape[0] * 2  # two panels (image, M_g) and a colorbar
    assert "reference grid is 1x1" in (tmp_path / "report.md").read_text()


def test_report_keeps_the_run_settings_in_the_maps_file(tmp_path, maps):
    report.write_report(tmp_path, maps, settings={"pipeline": "paint-by-example", "seed": 3}, threshold=0.3)
    loaded = AttributionMaps.load(tmp_path / "maps.safetensors")
    assert loaded.settings == {"pipeline": "paint-by-example", "seed": 3, "threshold": 0.3, "alpha": 0.5,
                               "imacs_threshold": 0.4}
    again = report.write_report(tmp_path / "again", loaded)  # re-rendered maps keep them
    assert again["settings"]["pipeline"] == "paint-by-example" and again["settings"]["seed"] == 3


def pdf_images(path):
    """The RGB image XObjects of a PDF as (H, W, 3) uint8 arrays: the Flate stream of a PNG-predicted
    image is a PNG's IDAT data, so PIL decodes it once wrapped in a PNG header."""
    import io
    import re
    import struct
    import zlib

    data = open(path, "rb").read()
    images = []
    for m in re.finditer(rb"<< /Type /XObject /Subtype /Image(.*?)>>\s*stream\r?\n", data, re.S):
        head = m.group(1)
        assert b"/DeviceRGB" in head.split(b"/BitsPerComponent")[0] and b"/Predictor 10" in head, head[:200]
        w, h = (int(re.search(rb"/%s (\d+)" % k, head).group(1)) for k in (b"Width", b"Height"))
        rows = zlib.decompressobj().decompress(data[m.end():data.index(b"endstream", m.end())])
        idat = zlib.compress(rows)  # the filtered rows, without the stream's line end

        def chunk(kind, body):
            return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
            chunk(b"IDAT", idat) + chunk(b"IEND", b"")
        images.append(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    return images


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_pdf_overlay_has_the_png_s_opacity(tmp_path, alpha):
    """Where the map is 1, the figure shows jet's top colour blended with alpha over the image, in the PDF as
    in the PNG (an artist alpha would be applied twice in the PDF's composited image)."""
    rng = np.random.default_rng(0)
    image = np.full((64, 64, 3), 128, np.uint8)
    image[:, :32] = rng.integers(0, 256, (64, 32, 3))  # many colours: the PDF stores the image as RGB
    M = torch.zeros(8, 8)
    M[:, 4:] = 1
    ax = i2am.plot_overlay(M, image, alpha=alpha, colorbar=False)
    viz.save_figure(ax.figure, tmp_path / "fig")
    expect = (1 - alpha) * 128 + alpha * np.array(plt.get_cmap("jet")(1.0)[:3]) * 255
    [pdf] = pdf_images(tmp_path / "fig.pdf")  # base and overlay composited into one image
    h, w = pdf.shape[:2]
    np.testing.assert_allclose(pdf[h // 4:3 * h // 4, 3 * w // 4 - 4:3 * w // 4 + 4].reshape(-1, 3).mean(0), expect,
                               atol=2)
    png = np.asarray(Image.open(tmp_path / "fig.png").convert("RGB"))
    rows, cols = np.nonzero((np.abs(png.astype(float) - expect).max(-1) <= 2))
    assert len(rows) > 1000  # the PNG shows the same colour over the map's right half
