"""The "reference" backend: the materialised equations of kernels.testing. Tests only.

It takes the whole call, query_rows included (QUERY_ROWS), and computes every row from the
definitions: an oracle independent of how attention_with_maps splits the other backends' calls.
"""
from .testing import call_maps

QUERY_ROWS = True


def run(q, k, v, out, maps, *, scale, ref_idx, record_idx, key_probes, query_probes, query_rows=None):
    full, new = call_maps(q, k, v, scale=scale, ref_idx=ref_idx, record_idx=record_idx, key_probes=key_probes,
                          query_probes=query_probes, query_rows=query_rows, names=tuple(maps))
    out[record_idx] = full[record_idx].to(out.dtype)
    for name, buf in maps.items():
        buf += new[name].to(buf.device)
