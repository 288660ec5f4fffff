"""Blocking delegation: the copy of minirlhf a submission's process sees for one exercise.

In that copy the reference functions of the exercise being graded (e.g. ``dpo_loss``) keep their
signature and docstring, but their bodies are gone, replaced by ``raise DelegationError(...)``. A
submission that calls them, by any route (``minirlhf.dpo_loss``, ``from minirlhf.core.dpo_losses
import dpo_loss``, ``importlib``), fails those checks with a message that says so. Every other
reference function stays usable: exercise files import helpers (``masked_mean``,
``aggregate_token_losses``) and must keep working, so a mistake in one exercise never costs another.
"""
import ast

from minirlhf.errors import MinirlhfError


class DelegationError(MinirlhfError):
    """A graded function called minirlhf's reference version of itself (or of its exercise)."""

    def __init__(self, name, exercise):
        super().__init__(f"your code calls minirlhf's reference {name}, which the grader blocks while grading "
                         f"'{exercise}': write your own {name}")


def blocked_source(source, names, exercise):
    """``source`` with the bodies of the top-level functions (or methods) ``names`` replaced."""
    tree = ast.parse(source)
    lines = source.splitlines()
    replaced = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            body = node.body[1:] if ast.get_docstring(node) is not None and len(node.body) > 1 else node.body
            if ast.get_docstring(node) is not None and len(node.body) == 1:
                body = []
            start = body[0].lineno - 1 if body else node.body[-1].end_lineno
            indent = " " * (node.body[0].col_offset)
            replaced.append((start, node.end_lineno, f"{indent}raise __import__('minirlhf.homework.delegation', "
                             f"fromlist=['x']).DelegationError({node.name!r}, {exercise!r})"))
    for start, end, line in sorted(replaced, reverse=True):
        lines[start:end] = [line]
    return "\n".join(lines) + "\n"
