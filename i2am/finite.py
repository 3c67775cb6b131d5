"""Non-finite values (NaN, inf) in map buffers, found once when the maps are taken, never on the
per-call path (a check there would cost a host-device synchronisation per attention call)."""
import torch


def nonfinite_groups(layers):
    """{layer name: [time groups]} where a buffer holds NaN or inf; layers as in AttributionMaps:
    {name: {"gen": (Br, G, ...), "ref": (Br, G, ...), ...}} ("ref" absent on layers without
    reference keys)."""
    bad = {}
    for name, buffers in layers.items():
        groups = set()
        for t in (buffers[kind] for kind in ("gen", "ref") if kind in buffers):
            finite = torch.isfinite(t).transpose(0, 1).reshape(t.shape[1], -1).all(1)
            groups.update((~finite).nonzero().flatten().tolist())
        if groups:
            bad[name] = sorted(groups)
    return bad


def describe(bad, num_steps, time_groups):
    """"layer 'x' in time group 1 (steps 2-3), ..." for nonfinite_groups' result."""
    def steps(g):  # the t with floor(t G / T) == g (eq. 10)
        first, end = -(-g * num_steps // time_groups), -(-(g + 1) * num_steps // time_groups)
        return f"step {first}" if end - first == 1 else f"steps {first}-{end - 1}"

    return "; ".join(f"layer {name!r} in time group{'s' if len(groups) > 1 else ''} "
                     + ", ".join(f"{g} ({steps(g)})" for g in groups) for name, groups in bad.items())
