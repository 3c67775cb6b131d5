"""The torch backend's extra memory is bounded by its chunk, never by Nq x Nk."""
import subprocess
import sys
import textwrap

import pytest

H, NQ, NK = 8, 65536, 1025

SCRIPT = textwrap.dedent(f"""
    import resource, torch
    from i2am.kernels import attention_with_maps
    q, k, v = torch.randn(1, {H}, {NQ}, 40), torch.randn(1, {H}, {NK}, 40), torch.randn(1, {H}, {NK}, 40)
    probes = torch.rand(6, {NQ})  # uniform, mask, 4 points: the default recorder probes
    attention_with_maps(q[:, :, :64], k, v, query_probes=probes[:, :64], backend="torch")  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, maps = attention_with_maps(q, k, v, query_probes=probes, gen=("query", "key"),
                                    ref=("key", "query"), backend="torch")
    assert torch.isfinite(out).all() and all(torch.isfinite(m).all() for m in maps.values())
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
""")


def peak_extra_memory(script):
    """Bytes by which a fresh process's peak resident set grew over the call `script` measures."""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(res.stdout.split()[-1])


@pytest.mark.slow
def test_peak_extra_memory_below_a_quarter_of_one_score_tensor():
    extra = peak_extra_memory(SCRIPT)
    scores = H * NQ * NK * 4  # one (H, Nq, Nk) float32 tensor: 2.0 GiB
    assert extra < scores / 4, f"peak extra memory {extra / 2**20:.0f} MiB"


JOINT = textwrap.dedent("""
    import resource, torch
    from i2am.kernels import attention_with_maps
    H, N, rows, refs = 4, 8704, ROWS, REFS
    q, k, v = (torch.randn(1, H, N, 64) for _ in range(3))
    probes = torch.rand(6, 4096)
    attention_with_maps(q[:, :, :64], k[:, :, :64], v[:, :, :64], backend="torch")  # warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, maps = attention_with_maps(q, k, v, query_rows=rows, ref_keys=refs, query_probes=probes,
                                    gen=("query", "key"), ref=("key", "query"), backend="torch")
    assert torch.isfinite(out).all() and all(torch.isfinite(m).all() for m in maps.values())
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
""")


LAYOUTS = {  # 512 text tokens, then a Kontext layer's two 64 x 64 grids, one after the other or side by side
    "sequence": ("slice(512, 4608)", "slice(4608, 8704)"),
    "side by side": ("512 + torch.arange(8192).view(64, 128)[:, :64].flatten()",
                     "512 + torch.arange(8192).view(64, 128)[:, 64:].flatten()"),
}


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_joint_attention_with_query_rows_stays_bounded_by_the_chunk(layout):
    rows, refs = LAYOUTS[layout]
    extra = peak_extra_memory(JOINT.replace("ROWS", rows).replace("REFS", refs))
    scores = 4 * 4096 * 8704 * 4  # one (H, rows, Nk) float32 score tensor of the generated rows: 544 MiB
    assert extra < scores / 4, f"peak extra memory {extra / 2**20:.0f} MiB"
