"""One mask rule everywhere: PIL masks equal numpy and tensor masks in trace, IMACS, the report
and the command line (figures: test_viz); the install without Triton."""
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import setuptools
import torch
from PIL import Image

import i2am
import tiny_models as tm
from i2am import report
from i2am.inputs import as_mask, binary_mask, open_image
from i2am.kernels import attention_with_maps
from test_viz import gradient_image, tiny_maps


def as_pil(m):
    return Image.fromarray((np.asarray(m) * 255).astype(np.uint8))


def test_trace_takes_the_pipelines_own_pil_mask():
    """trace(mask=PIL.Image), the type the pipeline takes, records what the numpy mask records."""
    model = tm.patch_inpainting()
    results = []
    for mask in (tm.inpainting_mask(), model.kwargs["mask_image"]):
        with i2am.trace(model.pipe, ref_grid=model.ref_grid, mask=mask, points=[(2, 3)]) as tc:
            model.run()
        results.append(tc.maps())
    numpy_maps, pil_maps = results
    assert isinstance(model.kwargs["mask_image"], Image.Image)
    assert torch.equal(pil_maps.mask, numpy_maps.mask)
    assert torch.equal(pil_maps.reference(masked=True), numpy_maps.reference(masked=True))
    assert pil_maps.imacs() == numpy_maps.imacs()


def test_trace_checks_the_mask_when_entered():
    model = tm.patch_inpainting()
    with pytest.raises(ValueError, match="mask must hold values in \\[0, 1\\]"):
        i2am.trace(model.pipe, ref_grid=model.ref_grid, mask=tm.inpainting_mask() * 255)


def test_imacs_and_report_take_pil_masks(tmp_path):
    maps = tiny_maps()
    ref_mask = np.zeros((32, 24))
    ref_mask[4:20, 6:18] = 1
    gen_mask = np.zeros((16, 16))
    gen_mask[3:12, 4:10] = 1
    for given in (as_pil(ref_mask), torch.from_numpy(ref_mask)):
        assert maps.imacs(ref_mask=given) == maps.imacs(ref_mask=ref_mask)
    assert maps.imacs(gen_mask=as_pil(gen_mask)) == maps.imacs(gen_mask=gen_mask)
    a = report.write_report(tmp_path / "a", maps, image=gradient_image(32, 32), reference=gradient_image(32, 24),
                            ref_mask=as_pil(ref_mask))
    b = report.write_report(tmp_path / "b", maps, image=gradient_image(32, 32), reference=gradient_image(32, 24),
                            ref_mask=ref_mask)
    assert a == b
    assert (tmp_path / "a" / "overview.png").read_bytes() == (tmp_path / "b" / "overview.png").read_bytes()


def test_command_line_masks_follow_the_rule(tmp_path):
    grey = np.array([[0, 100, 128, 255]] * 2, dtype=np.uint8)  # 128/255 > 0.5 is inside, 100/255 is not
    Image.fromarray(grey).save(tmp_path / "m.png")
    read = binary_mask(open_image(tmp_path / "m.png", "mask", mode="L"), "mask")
    assert torch.equal(read, as_mask(grey).float()) and read[0].tolist() == [0, 0, 1, 1]


def test_base_install_has_no_triton(monkeypatch):
    """Triton comes with torch's CUDA builds; on CPU only the test extra (the interpreter tests) needs it."""
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.setenv("I2AM_BUILD_CUDA", "0")
    runpy.run_path(str(Path(__file__).parents[1] / "setup.py"), run_name="__main__")
    assert not [r for r in seen["install_requires"] if r.startswith("triton")]
    assert any(r.startswith("triton") for r in seen["extras_require"]["test"])


def test_triton_backend_without_triton_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton fails, find_spec finds nothing
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="pip install triton"):
        attention_with_maps(q, q, q, backend="triton")
    out, _ = attention_with_maps(q, q, q, backend="auto")  # auto falls back to the torch backend
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, q, q))
