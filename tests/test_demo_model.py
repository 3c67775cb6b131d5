"""The demo model: its data generator's warp, the shipped weights, and a short sampling run."""
import torch
import torch.nn.functional as F

from i2am.demo.data import REF_SIZE, make_batch, probe_points, true_patch
from i2am.demo.model import cross_attention_layers, load_pipeline, with_random_cross_attention


def test_the_batch_is_seeded_and_shaped():
    a, b = make_batch(3, seed=7), make_batch(3, seed=7)
    assert torch.equal(a["target"], b["target"]) and torch.equal(a["reference"], b["reference"])
    assert a["reference"].shape == (3, 3, REF_SIZE, REF_SIZE)
    assert a["target"].shape[1:] == (3, 32, 32) and a["mask"].shape[1:] == (1, 32, 32)
    assert set(a["mask"].unique().tolist()) == {0.0, 1.0}
    inside = a["mask"].bool().expand_as(a["masked"])
    assert torch.all(a["masked"][inside] == 0.5)  # nothing of the garment is left to copy
    assert not torch.equal(a["target"], make_batch(3, seed=8)["target"])


def test_warp_round_trips():
    warp = make_batch(4, seed=1)["warp"]
    points = torch.rand(4, 10, 2) * REF_SIZE
    assert torch.allclose(warp.to_reference(warp.to_target(points)), points, atol=1e-4)


def test_the_logo_lands_where_the_warp_says():
    batch = make_batch(8, seed=3)
    ref_rc = batch["logo"]
    target_rc = batch["warp"].to_target(ref_rc[:, None])[:, 0]
    for b in range(8):
        r, c = ref_rc[b].long()
        tr, tc = target_rc[b].long()
        logo_colour = batch["reference"][b, :, r, c]
        assert batch["mask"][b, 0, tr, tc] == 1
        assert torch.allclose(batch["target"][b, :, tr, tc], logo_colour, atol=1e-5)


def test_target_pixels_inside_the_mask_show_their_source():
    batch = make_batch(8, seed=4)
    agree = []
    for b in range(8):
        points = probe_points(batch["mask"][b, 0], 40, border=1)  # edge pixels mix garment and scene
        source = batch["warp"][b : b + 1].to_reference(points[None].float() + 0.5)[0]
        # nearest reference pixel at the source position, via grid_sample's [-1, 1] convention
        grid = (source.flip(-1) / REF_SIZE * 2 - 1).view(1, 1, -1, 2)
        ref = F.grid_sample(batch["reference"][b : b + 1], grid, mode="nearest", align_corners=False)[0, :, 0]
        tgt = batch["target"][b, :, points[:, 0], points[:, 1]]
        agree.append(((ref - tgt).abs().amax(0) < 0.15).float().mean())
    # pattern edges are anti-aliased at a different scale in the two images, interiors agree
    assert torch.stack(agree).mean() > 0.8


def test_true_patch_and_probe_points():
    batch = make_batch(2, seed=5)
    mask = batch["mask"][0, 0]
    points = probe_points(mask, 12)
    assert len(points) == 12 and torch.all(mask[points[:, 0], points[:, 1]] == 1)
    patch = true_patch(batch["warp"][:1], points[None], patch_size=4)[0]
    source = batch["warp"][:1].to_reference(points[None].float() + 0.5)[0]
    assert torch.equal(patch, torch.floor(source / 4).long())
    # the patch lies on the garment in the reference
    on_garment = F.max_pool2d(batch["ref_mask"][:1], 4)[0, 0]
    assert torch.all(on_garment[patch[:, 0], patch[:, 1]] == 1)


def test_shipped_weights_build_the_model():
    pipe = load_pipeline()
    unet, encoder = pipe.unet, pipe.reference_encoder
    assert pipe.config.fold == 2 and unet.config.sample_size == 16  # latent grid 16 x 16
    assert unet.config.in_channels == 12 + 12 + 4 and unet.config.out_channels == 12
    assert encoder.grid == (8, 8)
    tokens = encoder(torch.rand(1, 3, REF_SIZE, REF_SIZE))
    assert tokens.shape == (1, 1 + 8 * 8, unet.config.cross_attention_dim)
    cross = cross_attention_layers(unet)
    assert len(cross) == 7 and all(m.heads == 4 for _, m in cross)


def test_randomised_copy_changes_only_cross_attention():
    pipe = load_pipeline()
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    copy = with_random_cross_attention(pipe, seed=0)
    after = copy.unet.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".attn2." in k for k in changed)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())  # original intact


def test_sampling_runs_cfg_as_uncond_then_cond():
    pipe = load_pipeline()
    batch = make_batch(1, seed=6)
    seen = []
    hook = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"]), with_kwargs=True
    )
    try:
        images = pipe(batch["reference"], batch["masked"], batch["mask"], num_inference_steps=3,
                      generator=torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert len(seen) == 3 and seen[0].shape[0] == 2
    assert torch.all(seen[0][0] == 0) and seen[0][1].abs().sum() > 0  # [null reference, reference]
