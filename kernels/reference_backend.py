"""The "reference" backend: the materialised equations of i2am.reference. Tests only."""
from i2am import reference


def run(q, k, v, out, maps, *, scale, ref_idx, record_idx, key_probes, query_probes):
    full, new = reference.call_maps(q, k, v, scale=scale, ref_idx=ref_idx, record_idx=record_idx,
                                    key_probes=key_probes, query_probes=query_probes, names=tuple(maps))
    out[record_idx] = full[record_idx].to(out.dtype)
    for name, buf in maps.items():
        buf += new[name].to(buf.device)
