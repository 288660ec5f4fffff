"""check_shapes: named dimensions bind across arguments, layouts, alternatives, dtypes, messages."""
import pytest
import torch

from minirlhf.core.shapes import ShapeError, check_shapes


def test_a_name_binds_one_size_across_arguments_and_the_message_says_where():
    check_shapes("f", logprobs=(torch.zeros(4, 7), "B T"), mask=(torch.zeros(4, 7), "B T"), adv=(torch.zeros(4), "B"))
    with pytest.raises(ShapeError) as error:
        check_shapes("f", rewards=(torch.zeros(2, 6), "B T"), values=(torch.zeros(2, 5), "B T"))
    assert str(error.value) == "f: values must have shape [B=2, T=6] (B, T as in rewards), got [2, 5]"
    # Each name reports the argument that set it.
    with pytest.raises(ShapeError, match=r"x must have shape \[B=2, T=3\] \(B as in a; T as in b\), got \[2, 4\]$"):
        check_shapes("f", a=(torch.zeros(2), "B"), b=(torch.zeros(3), "T"), x=(torch.zeros(2, 4), "B T"))


def test_rank_and_unbound_names():
    with pytest.raises(ShapeError, match=r"^f: x must have shape \[B, T\], got \[2, 3, 1\]$"):
        check_shapes("f", x=(torch.zeros(2, 3, 1), "B T"))
    check_shapes("f", x=(torch.zeros(3, 3), "T T"))  # a name repeated inside one layout: a square
    with pytest.raises(ShapeError, match=r"got \[3, 2\]"):
        check_shapes("f", x=(torch.zeros(3, 2), "T T"))


def test_alternatives_are_tried_in_order_and_all_listed():
    logprobs = torch.zeros(4, 7)
    for advantages in (torch.zeros(4, 7), torch.zeros(4)):
        check_shapes("f", logprobs=(logprobs, "B T"), advantages=(advantages, ("B T", "B")))
    with pytest.raises(ShapeError) as error:
        check_shapes("f", logprobs=(logprobs, "B T"), advantages=(torch.zeros(4, 1), ("B T", "B")))
    assert str(error.value) == "f: advantages must have shape [B=4, T=7] or [B=4] (B, T as in logprobs), got [4, 1]"
    # A square batch does not make [T] pass for [B]: the size is what counts, and B == T here.
    check_shapes("f", logprobs=(torch.zeros(3, 3), "B T"), advantages=(torch.zeros(3), "B"))


def test_literal_sizes():
    check_shapes("f", scores=(torch.zeros(5, 1), ("B", "B 1")))
    with pytest.raises(ShapeError, match=r"must have shape \[B\] or \[B, 1\], got \[5, 2\]"):
        check_shapes("f", scores=(torch.zeros(5, 2), ("B", "B 1")))


def test_none_and_scalars():
    vector = torch.zeros(3)
    for offset in (None, 0.5, 2, torch.tensor(0.5), torch.zeros(3)):
        check_shapes("f", x=(vector, "B"), offset=(offset, (None, "scalar", "B")))
    with pytest.raises(ShapeError) as error:
        check_shapes("f", x=(vector, "B"), offset=(torch.zeros(3, 1), (None, "scalar", "B")))
    assert str(error.value) == "f: offset must be None or a scalar or a tensor of shape [B=3] (B as in x), got [3, 1]"
    for not_a_scalar in (torch.zeros(1), torch.zeros(3), None, "0.5"):
        with pytest.raises(ShapeError, match="f: beta must be a scalar, got"):
            check_shapes("f", beta=(not_a_scalar, "scalar"))


def test_ellipsis_is_any_shape_the_same_for_every_argument():
    for shape in ((), (5,), (2, 3), (2, 3, 4)):
        check_shapes("f", x=(torch.zeros(shape), "..."), mask=(torch.zeros(shape), "..."))
    with pytest.raises(ShapeError) as error:
        check_shapes("f", x=(torch.zeros(4, 7), "..."), mask=(torch.zeros(4), "..."))
    assert str(error.value) == "f: mask must have shape [4, 7] (as in x), got [4]"
    # "B ...": a batch dimension first, then anything.
    check_shapes("f", x=(torch.zeros(4, 7), "B ..."), a=(torch.zeros(4), ("B ...", "B")))
    with pytest.raises(ShapeError, match=r"a must have shape \[B=4, 7\] or \[B=4\] \(B as in x\), got \[7\]"):
        check_shapes("f", x=(torch.zeros(4, 7), "B ..."), a=(torch.zeros(7), ("B ...", "B")))
    with pytest.raises(ShapeError, match=r"must have shape \[B, \.\.\.\], got \[\]"):
        check_shapes("f", x=(torch.zeros(()), "B ..."))


def test_non_tensors_are_a_value_error_and_a_type_error():
    for value, described in (([1.0, 2.0], "a list"), (None, "None"), (3.0, "a float")):
        with pytest.raises(ShapeError) as error:
            check_shapes("f", x=(value, "B T"))
        assert str(error.value) == f"f: x must have shape [B, T], got {described}"
        assert isinstance(error.value, ValueError) and isinstance(error.value, TypeError)


def test_dtypes():
    check_shapes("f", x=(torch.zeros(2, dtype=torch.bfloat16), "B", "float"), ids=(torch.zeros(2).long(), "B", "long"))
    with pytest.raises(ShapeError, match=r"^f: x must be a floating-point tensor, got torch.int64$"):
        check_shapes("f", x=(torch.zeros(2).long(), "B", "float"))
    with pytest.raises(ShapeError, match=r"^f: ids must be a long \(int64\) tensor, got torch.float32$"):
        check_shapes("f", ids=(torch.zeros(2), "B", "long"))
    with pytest.raises(ShapeError, match=r"got torch.int32"):
        check_shapes("f", ids=(torch.zeros(2).int(), "B", "long"))
    check_shapes("f", offset=(None, (None, "B"), "float"))  # None and numbers have no dtype to check
