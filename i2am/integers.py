"""Integer arguments: Python and NumPy/torch integers are accepted, floats and bools are errors
(a float where an integer is meant is never truncated: (1.7, 2.2) is not the point (1, 2))."""
import operator

import torch


def as_int(x, what):
    """x as an int, or a TypeError naming `what`."""
    if isinstance(x, bool) or (isinstance(x, torch.Tensor) and x.dtype == torch.bool):
        raise TypeError(f"{what} must be an integer, got {x!r}")
    try:
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {x!r}") from None


def int_tuple(x, n, what):
    """x as a tuple of n ints, or an error saying `what` must be n integers."""
    try:
        items = tuple(x)
    except TypeError:
        raise TypeError(f"{what} must be {n} integers, got {x!r}") from None
    if len(items) != n:
        raise ValueError(f"{what} must be {n} integers, got {x!r}")
    try:
        return tuple(as_int(i, what) for i in items)
    except TypeError:
        raise TypeError(f"{what} must be {n} integers, got {x!r}") from None


def int_tuples(items, n, name, form, element):
    """A list of n-integer tuples (points, boxes, patches); one bare tuple of ints is an error
    that shows the list form. form: the tuples in words, element: one of them in messages."""
    if isinstance(items, torch.Tensor):
        items = items.tolist()
    try:
        items = list(items)
    except TypeError:
        raise TypeError(f"{name} must be a list of {form}, got {items!r}") from None
    if items and not any(isinstance(i, (list, tuple, torch.Tensor)) and not _scalar(i) for i in items):
        raise TypeError(f"{name} must be a list of {form}, got {tuple(items)!r}; a single one is written "
                        f"[{tuple(items)!r}]")
    return tuple(int_tuple(i, n, f"each {element}") for i in items)


def _scalar(x):
    return isinstance(x, torch.Tensor) and x.dim() == 0
