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


def is_resolution(x):
    return isinstance(x, tuple) and len(x) == 2 and all(isinstance(i, int) for i in x)
