"""Shape contracts: every core function checks its tensor arguments against its docstring.

PyTorch broadcasts silently: advantages ``[B]`` times ratios ``[B, T]`` fails unless ``B == T``,
and then gives each *column* an advantage; a ``[B, 1]`` offset turns ``[B]`` losses into
``[B, B]`` that ``.mean()`` hides. A wrong number that looks plausible is the worst kind of bug,
so each function states its shapes with names and checks them before any arithmetic::

    check_shapes(
        "grpo_loss",
        logprobs=(logprobs, "B T", "float"),
        advantages=(advantages, ("B", "B T"), "float"),  # one per sequence, or one per token
        mask=(mask, "B T"),
        beta=(beta, "scalar"),
    )

Each argument is ``(value, layout)`` or ``(value, layout, dtype)``. A layout names the size of
each dimension: ``"B T"`` is a 2-D tensor whose sizes are called B and T, and a name means the
same size in every argument of the call, so ``rewards [2, 6]`` with ``values [2, 5]`` is an error.

- ``"1"`` (a number): exactly that size, e.g. ``"B 1"`` for a score head's ``[B, 1]`` output;
- ``"..."``: any number of dimensions, the same in every argument (``"..."`` alone: any shape,
  as long as all arguments have it);
- ``"scalar"``: a Python number or a 0-dim tensor;
- a tuple lists the layouts accepted, e.g. ``(None, "scalar", "B")``; ``None`` allows None.

``dtype`` is ``"float"`` (floating point) or ``"long"`` (int64, e.g. token ids). A mismatch
raises ``ShapeError`` naming the function, the argument, the expected shape with the sizes bound
so far, where they came from, and the actual shape::

    grpo_loss: advantages must have shape [B=4] or [B=4, T=7] (B, T as in logprobs), got [4, 1]
"""
import functools
import numbers

import torch


class ShapeError(ValueError, TypeError):
    """An argument whose shape or dtype is not the one the docstring states.

    A ``ValueError``; also a ``TypeError``, which is what Python raises for a non-tensor.
    """


def check_shapes(function, **arguments):
    """Check each ``name=(value, layout[, dtype])`` in order; raise ``ShapeError`` on a mismatch.

    The first argument that has a dimension name binds its size; later ones must agree.
    """
    sizes, bound_by = {}, {}  # dimension name -> size, and the argument that set it
    for name, (value, layouts, *dtype) in arguments.items():
        layouts = layouts if isinstance(layouts, tuple) else (layouts,)
        for layout in layouts:
            new_sizes = _match(value, layout, sizes)
            if new_sizes is not None:
                break
        else:
            raise ShapeError(_mismatch(function, name, value, layouts, sizes, bound_by))
        for dim, size in new_sizes.items():
            sizes[dim], bound_by[dim] = size, name
        if dtype and torch.is_tensor(value):
            _check_dtype(function, name, value, dtype[0])


def _match(value, layout, sizes):
    """The new sizes ``value`` binds if it fits ``layout`` given ``sizes``; None if it does not fit."""
    if layout is None or layout == "scalar":
        is_scalar = isinstance(value, numbers.Real) or (torch.is_tensor(value) and value.dim() == 0)
        return {} if (value is None if layout is None else is_scalar) else None
    if not torch.is_tensor(value):
        return None
    dims, shape = _parse(layout), tuple(value.shape)
    if "..." in dims:  # gather the dimensions "..." stands for into one entry of the shape
        start, count = dims.index("..."), value.dim() - len(dims) + 1
        if count < 0:
            return None
        shape = shape[:start] + (shape[start : start + count],) + shape[start + count :]
    if len(shape) != len(dims):
        return None
    new_sizes = {}
    for dim, size in zip(dims, shape):
        expected = dim if isinstance(dim, int) else sizes.get(dim, new_sizes.get(dim))
        if expected is None:
            new_sizes[dim] = size
        elif size != expected:
            return None
    return new_sizes


@functools.lru_cache(maxsize=None)
def _parse(layout):
    """``"B 1"`` -> ``("B", 1)``: names stay strings, fixed sizes become ints. Parsed once per layout."""
    return tuple(int(dim) if dim.isdigit() else dim for dim in layout.split())


def _check_dtype(function, name, value, dtype):
    if dtype == "float" and not value.is_floating_point():
        raise ShapeError(f"{function}: {name} must be a floating-point tensor, got {value.dtype}")
    if dtype == "long" and value.dtype != torch.long:
        raise ShapeError(f"{function}: {name} must be a long (int64) tensor, got {value.dtype}")


def _mismatch(function, name, value, layouts, sizes, bound_by):
    """``"f: x must have shape [B=4, T=7] (B, T as in y), got [4, 1]"``."""
    tensor_layouts = [layout for layout in layouts if layout not in (None, "scalar")]
    shapes = " or ".join(_render(layout, sizes) for layout in tensor_layouts)
    if len(tensor_layouts) == len(layouts):
        expected = f"have shape {shapes}"
    else:
        words = ["None" if layout is None else "a scalar" for layout in layouts if layout in (None, "scalar")]
        expected = "be " + " or ".join(words + ([f"a tensor of shape {shapes}"] if shapes else []))
    got = list(value.shape) if torch.is_tensor(value) else "None" if value is None else f"a {type(value).__name__}"
    return f"{function}: {name} must {expected}{_sources(tensor_layouts, sizes, bound_by)}, got {got}"


def _sources(layouts, sizes, bound_by):
    """``" (B, T as in logits)"``: the arguments that set the sizes the message shows."""
    by_argument = {}
    for dim in sizes:
        if any(dim in layout.split() for layout in layouts):
            by_argument.setdefault(bound_by[dim], []).append(dim)
    notes = [f"{', '.join(d for d in dims if d != '...')} as in {arg}".lstrip() for arg, dims in by_argument.items()]
    return f" ({'; '.join(notes)})" if notes else ""


def _render(layout, sizes):
    """``"B T"`` -> ``"[B=4, T]"``: the sizes bound so far; ``"..."`` shows the sizes it stands for."""
    parts = []
    for dim in layout.split():
        if dim == "..." and dim in sizes:
            parts += [str(size) for size in sizes[dim]]
        else:
            parts.append(f"{dim}={sizes[dim]}" if dim in sizes else dim)
    return "[" + ", ".join(parts) + "]"
