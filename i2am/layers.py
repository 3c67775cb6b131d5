"""Layer sets: which traced layers a recording keeps and a map integrates over.

A layer set is None (every layer), an fnmatch name pattern ("up_blocks.*"), an (h_l, w_l)
resolution, or a list of those.
"""
from fnmatch import fnmatchcase

MIDDLE_BLOCKS = ("mid_block", "middle_block")  # diffusers and LDM names of the UNet's middle block


def layer_selected(name, grid, spec):
    """Whether layer `name` with query grid (h_l, w_l) matches the layer set `spec`."""
    if spec is None:
        return True
    items = [spec] if isinstance(spec, str) or is_resolution(spec) else list(spec)
    for it in items:
        if isinstance(it, str) and fnmatchcase(name, it):
            return True
        if is_resolution(it) and tuple(it) == tuple(grid):
            return True
        if not isinstance(it, str) and not is_resolution(it):
            raise TypeError(f"layers entries must be name patterns (str) or (h_l, w_l) resolutions, got {it!r}")
    return False


def in_middle_block(name):
    """Whether a layer name lies in the UNet's middle block (a dotted path part mid_block/middle_block)."""
    return any(part in MIDDLE_BLOCKS for part in name.split("."))


def check_layers(spec):
    """A TypeError unless spec is None, a name pattern, an (h_l, w_l) resolution or a list of those."""
    expected = "layers must be fnmatch name patterns (str) and/or (h_l, w_l) resolutions, or a list of those"
    if spec is None or isinstance(spec, str) or is_resolution(spec):
        return
    try:
        items = list(spec)
    except TypeError:
        raise TypeError(f"{expected}; got {spec!r}") from None
    bad = [it for it in items if not isinstance(it, str) and not is_resolution(it)]
    if bad or not items:
        raise TypeError(f"{expected}; got {spec!r}" + (f" (entry {bad[0]!r})" if bad else ""))


def could_select(names, spec):
    """Whether a layers= spec may select one of `names`: a pattern matching one, or any resolution
    (layers' resolutions are known only once they run)."""
    if spec is None:
        return True
    items = [spec] if isinstance(spec, str) or is_resolution(spec) else list(spec)
    return any(not isinstance(it, str) or any(fnmatchcase(n, it) for n in names) for it in items)


def is_resolution(x):
    return isinstance(x, tuple) and len(x) == 2 and all(isinstance(i, int) and not isinstance(i, bool) for i in x)
