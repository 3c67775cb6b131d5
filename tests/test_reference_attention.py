"""Reference self-attention (ReferenceNet, "reference-only", IDM-VTON garment nets) through
i2am.attention / i2am.recording: the queries are the generated image's own tokens, the keys
[own, reference] and ref_keys the reference part (SPEC 3c). Every map is checked against a
float64 computation from the definitions."""
import pytest
import torch
import torch.nn.functional as F

import i2am

OWN, REF = (4, 6), (3, 5)  # the layer's own token grid and the reference features' grid
H, D, STEPS, G = 2, 16, 3, 3
POINT, PATCH = (2, 3), (1, 4)


def features(seed, n):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, H, n, D, generator=gen) * 2  # [uncond, cond]


def expected(calls):
    """float64 maps of the cond entry: P over [own, reference] keys, C over the own queries."""
    n_own = OWN[0] * OWN[1]
    acc = {n: torch.zeros(G, H, *s, dtype=torch.float64) for n, s in
           (("gen", (n_own,)), ("patch", (n_own,)), ("ref", (REF[0] * REF[1],)), ("point", (REF[0] * REF[1],)))}
    for t, (q, k) in enumerate(calls):
        s = (q.double() @ k.double().transpose(-1, -2))[1] * D ** -0.5  # (H, Nq, Nk), cond entry
        P, C = s.softmax(-1)[..., n_own:], s.softmax(-2)[..., n_own:]
        acc["gen"][t] += C.mean(-1)
        acc["patch"][t] += C[..., PATCH[0] * REF[1] + PATCH[1]]
        acc["ref"][t] += P.mean(-2)
        acc["point"][t] += P[:, POINT[0] * OWN[1] + POINT[1]]
    return acc


@pytest.mark.parametrize("layout", ["4-D", "LDM (B*H, N, d)"])
def test_reference_self_attention_maps_match_float64(layout):
    rec = i2am.recording(latent_size=OWN, num_steps=STEPS, time_groups=G, ref_grid=REF, points=[POINT],
                         patches=[PATCH], backend="torch")
    calls = []
    with rec:
        for t in range(STEPS):
            rec.step()
            q, k_own, v_own = (features(10 * t + i, OWN[0] * OWN[1]) for i in range(3))
            k_ref, v_ref = (features(10 * t + 5 + i, REF[0] * REF[1]) for i in range(2))
            k, v = torch.cat([k_own, k_ref], 2), torch.cat([v_own, v_ref], 2)  # keys = [own, reference]
            n_own = q.shape[2]
            if layout == "4-D":
                out = i2am.attention(q, k, v, layer="down.attn1", ref_keys=slice(n_own, None))
            else:
                out = i2am.attention(*(x.flatten(0, 1) for x in (q, k, v)), heads=H, layer="down.attn1",
                                     ref_keys=slice(n_own, None)).unflatten(0, (2, H))
            torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)
            calls.append((q, k))
    maps, want = rec.maps(), expected(calls)

    def tol(w):
        return dict(rtol=1e-6, atol=1e-6 * w.abs().max().item())

    for by in (None, "time", "head"):
        def integrate(name, grid, clamp):
            m = want[name]
            m = m if by == "time" else m.sum(0, keepdim=True)
            m = m.clamp_min(0) if clamp else m
            m = m / H if by == "head" else m.mean(1, keepdim=True)  # SPEC 3: 1/N sum_n, by head too
            m = (m[:, 0] if by == "time" else m[0] if by == "head" else m[0, 0])
            return m.reshape(*m.shape[:-1], *grid)

        checks = {"generated": (maps.generated(by=by, normalize=False), integrate("gen", OWN, True)),
                  "specific_generated": (maps.specific_generated(PATCH, by=by, normalize=False),
                                         integrate("patch", OWN, True)),
                  "reference": (maps.reference(by=by, normalize=False), integrate("ref", REF, False)),
                  "specific_reference": (maps.specific_reference(POINT, by=by, normalize=False),
                                         integrate("point", REF, False))}
        for what, (got, w) in checks.items():
            torch.testing.assert_close(got.double(), w, **tol(w), msg=lambda m: f"{what} by={by}: {m}")


def test_call_ref_keys_must_match_the_reference_grid():
    rec = i2am.recording(latent_size=OWN, num_steps=1, ref_grid=REF)
    q, k = features(0, 24), features(1, 24 + 15)
    with rec, pytest.raises(ValueError, match=r"ref_keys selects 14 keys of layer .a. but its reference grid \(3, 5\) has 15"):
        rec.step()
        i2am.attention(q, k, k, layer="a", ref_keys=slice(25, None))


def test_a_layer_keeps_its_reference_keys():
    rec = i2am.recording(latent_size=OWN, num_steps=1, ref_grid=REF)
    q, k = features(0, 24), features(1, 24 + 15)
    with rec:
        rec.step()
        i2am.attention(q, k, k, layer="a", ref_keys=slice(24, None))
        i2am.attention(q, k, k, layer="a", ref_keys=slice(24, 39))  # the same keys, spelt otherwise
        with pytest.raises(ValueError, match="this call's ref_keys differ from its first call's"):
            i2am.attention(q, k, k, layer="a", ref_keys=slice(0, 15))
