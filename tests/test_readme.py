"""The README's snippets run as written. A python block preceded by `<!-- docs-test: NAME -->`
is runnable: it is executed verbatim in a namespace that SETUPS[NAME] fills with what the prose
around it names (tiny models built in code, a model id resolved to a tiny saved pipeline).
Unmarked blocks are sketches of edits inside other code bases (placeholders such as `pipe(...)`)."""
import os
import re

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()
BLOCKS = dict(re.findall(r"<!-- docs-test: ([\w-]+) -->\n```python\n(.*?)```", README, re.S))


def plotting(tmp_path, monkeypatch):
    from test_viz import gradient_image, tiny_maps

    cloth_mask = torch.zeros(32, 24)
    cloth_mask[4:20, 6:18] = 1
    mask = torch.zeros(32, 32)
    mask[8:24, 10:26] = 1
    return dict(maps=tiny_maps(), image=gradient_image(32, 32), reference=gradient_image(32, 24), mask=mask,
                cloth_mask=cloth_mask)


def kontext(tmp_path, monkeypatch):
    """from_pretrained of the model id loads the tiny Kontext (tiny text encoders, VAE scale factor
    2: a token is 4 x 4 pixels) saved in tmp_path; the photo is large enough for the snippet's
    point (32, 40) and patch (30, 20): 36 x 44 tokens."""
    import tiny_flux
    from diffusers import FluxKontextPipeline
    from tiny_models import image

    folder = tiny_flux.saved_pipeline(tmp_path)
    original = FluxKontextPipeline.from_pretrained.__func__

    def from_pretrained(cls, model, **kwargs):
        assert model == "black-forest-labs/FLUX.1-Kontext-dev"
        pipe = original(cls, folder, **kwargs)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    monkeypatch.setattr(FluxKontextPipeline, "from_pretrained", classmethod(from_pretrained))
    return dict(photo=image(3, (176, 144)))


def kernel_op(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g) for n in (24, 17, 17))  # a CLS key and 16 patch keys
    return dict(q=q, k=k, v=v, u=torch.softmax(torch.randn(3, 16, generator=g), -1),
                m=torch.softmax(torch.randn(2, 24, generator=g), -1))


SETUPS = {"plotting": plotting, "kontext": kontext, "kernel-op": kernel_op}


def test_every_marked_block_has_a_setup():
    assert set(BLOCKS) == set(SETUPS)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "kontext" else n
                                  for n in sorted(SETUPS)])  # kontext: the pipeline's 28 steps
def test_readme_snippet_runs_as_written(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # files the snippet writes land here
    namespace = SETUPS[name](tmp_path, monkeypatch)
    exec(compile(BLOCKS[name], f"README.md:{name}", "exec"), namespace)
    if name == "plotting":
        assert (tmp_path / "maps.pdf").stat().st_size > 0
    elif name == "kontext":
        maps = namespace["maps"]
        assert maps.latent_size == (36, 44) and maps.specific_reference((32, 40)).shape == (36, 44)
        assert torch.isfinite(maps.generated()).all()
    else:
        out, maps = namespace["out"], namespace["maps"]
        torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(
            namespace["q"], namespace["k"], namespace["v"]))
        assert maps["gen_query"].shape == (1, 2, 3, 24) and maps["ref_key"].shape == (1, 2, 2, 16)


def test_ci_runs_the_readme_s_test_command():
    commands = re.search(r"```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert len(commands) == 2 and "--test" not in commands[0] and "--test" in commands[1]
    assert commands[1] in open(os.path.join(ROOT, ".ci", "run")).read()
