"""The judge's side of a check: expected outputs, comparison with one tolerance policy, messages.

Tolerance policy (every check, unless its ``tol`` says otherwise): the math checks feed float64
inputs, and an output passes when every element satisfies

    |got − expected| ≤ ATOL + RTOL · |expected|,   RTOL = 1e-5, ATOL = 1e-6,

compared in float64. That accepts any arrangement of a correct formula, even one computed in
float32 (relative error ~1e-7), and rejects a wrong one (off by far more). Infinities must match
exactly, NaN never passes, shapes must match exactly (no broadcasting), integer and boolean
tensors must be equal. A check that is *about* precision (float32 log-probs, k3 near 0) states
its own tolerance.
"""
import math
import re

import torch

from minirlhf.homework.execute import clone, execute, plain

RTOL, ATOL = 1e-5, 1e-6
GRADIENT_NOTE = "L = Σ w · outputs with fixed random weights w"


def expected_outputs(check, x, got, reference, memo=None):
    """What ``check`` expects: ``check.expect(x, got)``, or the reference's outputs on ``x`` (kept
    in ``memo`` when given: the grader computes them once per check, not once per submission)."""
    if check.expect is None:
        if memo is not None and id(check) in memo:
            return memo[id(check)]
        record = execute(check, reference, clone(x))
        if record["status"] != "ok":
            raise RuntimeError(f"the reference fails check {check.name!r}: {record['error']}")
        if memo is not None:
            memo[id(check)] = record["outputs"]
        return record["outputs"]
    return plain(check.expect(clone(x), got))


def judge(check, x, record, reference, memo=None):
    """Failure messages of one executed check (an empty list: it passed)."""
    if record["status"] != "ok":
        error = record.get("error") or {}
        if record["status"] == "error" and check.raises and _raised(error, *check.raises):
            return []
        return [_describe_error(record, check.raises)]
    if check.raises:
        kind, pattern = check.raises
        return [f"expected {kind}{f' (message matching {pattern!r})' if pattern else ''}, but the call returned normally"]
    got = record["outputs"]
    if not isinstance(got, dict):
        return ["the call's outputs are malformed"]
    try:
        expected = expected_outputs(check, x, got, reference, memo)
    except Exception as err:  # noqa: BLE001 - a relation on malformed outputs; never the grader's crash
        if check.expect is None:
            raise
        return [f"the outputs cannot be compared (wrong shape or type?): {type(err).__name__}: {str(err)[:300]}"]
    failures = []
    for name, want in expected.items():
        tol = check.tol.get(name, check.tol.get("*", {}))
        try:
            problem = compare(name, want, got.get(name, _MISSING), tol.get("rtol", RTOL), tol.get("atol", ATOL),
                              check.axes.get(name))
        except Exception as err:  # noqa: BLE001 - whatever came back, it is a failed check, not a crash
            problem = f"{name}: cannot be compared ({type(err).__name__}: {str(err)[:200]})"
        if problem:
            failures.append(problem)
    return failures


def check_in_process(check, f, reference, origin=None):
    """Run ``check`` on ``f`` in this process (no isolation) and judge it: ``(failure messages, the
    traceback of the error the call raised, or None)``; no failures: it passed."""
    x = check.inputs()
    record = execute(check, f, clone(x), origin)
    failures = judge(check, x, record, reference)
    return failures, (record.get("error") or {}).get("traceback") if failures else None


def run_in_process(check, f, reference):
    """pytest's path: ``check_in_process``, raising AssertionError with the grader's messages (and the
    call's traceback) when the check fails."""
    failures, trace = check_in_process(check, f, reference)
    if failures:
        hint = f"\nhint: {check.hint}" if check.hint else ""
        raise AssertionError(f"{check.name}\n" + "\n".join(failures) + hint + (f"\n{trace}" if trace else ""))


_MISSING = object()


def compare(name, want, got, rtol=RTOL, atol=ATOL, axes=None):
    """None if ``got`` matches ``want``; otherwise a message naming the output, where and how."""
    if got is _MISSING:
        return f"{name}: the check produced no such output"
    if isinstance(want, dict):
        if not isinstance(got, dict):
            return f"{name}: expected a dict of tensors, got {_kind(got)}"
        problems = [compare(f"{name}[{key}]", value, got.get(key, _MISSING), rtol, atol, axes)
                    for key, value in want.items()]
        return "\n".join(p for p in problems if p) or None
    if torch.is_tensor(want):
        return _compare_tensors(name, want, got, rtol, atol, axes)
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        return _compare_tensors(name, torch.tensor(want, dtype=torch.float64),
                                torch.tensor(float(got), dtype=torch.float64), rtol, atol, axes)
    if want is None:
        return None if got is None else f"{name}: expected None, got {_kind(got)}"
    if got != want:
        return f"{name}: expected {want!r}, got {_short(got)}"
    return None


def _compare_tensors(name, want, got, rtol, atol, axes):
    if got is None:
        if name.startswith("∂L/∂"):
            return (f"{name}: no gradient reached {name[4:]} (is the result detached, or computed outside "
                    "autograd, e.g. with .item(), numpy or a Python float?)")
        return f"{name}: expected a tensor, got None"
    if not torch.is_tensor(got):
        return f"{name}: expected a tensor of shape {list(want.shape)}, got {_kind(got)}"
    if got.shape != want.shape:
        return f"{name}: expected shape {list(want.shape)}, got {list(got.shape)}"
    if want.numel() == 0:
        return None
    if not want.is_floating_point():
        bad = got.double() != want.double()
        return _mismatch(name, want, got, bad, axes, "values differ") if bad.any() else None
    w, g = want.double(), got.double()
    close = (g - w).abs() <= atol + rtol * w.abs()
    same_infinity = torch.isinf(w) & (g == w)
    bad = ~(close | same_infinity) | torch.isnan(g) | torch.isnan(w)
    if not bad.any():
        return None
    return _mismatch(name, w, g, bad, axes, f"values differ (tolerance {atol:g} + {rtol:g}·|expected|)")


def _mismatch(name, want, got, bad, axes, what):
    """``name``: how many differ, the worst one with its position, and a short excerpt."""
    want_d, got_d = want.double(), got.double()
    error = torch.where(bad, (got_d - want_d).abs().nan_to_num(nan=math.inf), torch.zeros_like(want_d))
    worst = int(error.flatten().argmax()) if error.max() > 0 else int(bad.flatten().nonzero()[0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), want.shape)) if want.dim() else ()
    e, g = want_d[index].item(), got_d[index].item()
    abs_err = abs(g - e)
    rel = f", rel err {abs_err / abs(e):.2g}" if e not in (0.0, math.inf, -math.inf) and math.isfinite(abs_err) else ""
    where = f" at {position(index, axes)}" if index else ""
    lines = [f"{name}: {int(bad.sum())} of {bad.numel()} {what}; worst{where}: expected {_num(e)}, got {_num(g)}"
             f" (abs err {abs_err:.2g}{rel})"]
    if want.dim() and want.numel() > 1:
        row = index[:-1]
        lines.append(f"    expected {_excerpt(want_d[row] if row else want_d, index[-1])}")
        lines.append(f"    got      {_excerpt(got_d[row] if row else got_d, index[-1])}")
        if row:
            lines[-2] = f"    {position(row, axes)}: expected {_excerpt(want_d[row], index[-1])}"
            lines[-1] = f"    {' ' * len(position(row, axes))}  got      {_excerpt(got_d[row], index[-1])}"
    return "\n".join(lines)


def position(index, axes=None):
    """``(1, 4)`` -> "row 1, t = 4" (names from ``axes``, default row / t / token)."""
    names = list(axes or ()) + ["row", "t", "token", "dim 3", "dim 4"][len(axes or ()):]
    parts = [f"{names[0]} {index[0]}"] + [f"{n} = {i}" for n, i in zip(names[1:], index[1:])]
    return ", ".join(parts)


def _excerpt(values, focus, width=8):
    """Up to ``width`` values of a 1-D tensor around ``focus``."""
    values = values.flatten().tolist()
    start = max(0, min(focus - width // 2, len(values) - width))
    shown = ", ".join(_num(v) for v in values[start:start + width])
    return f"[{'…, ' if start else ''}{shown}{', …' if start + width < len(values) else ''}]"


def _num(v):
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return f"{v:.6g}".replace("-", "−")


def _kind(x):
    if torch.is_tensor(x):
        return f"a tensor of shape {list(x.shape)}"
    if isinstance(x, dict) and "__repr__" in x:
        return f"a {x['__type__']} ({x['__repr__'][:80]})"
    return f"{type(x).__name__} {_short(x)}"


def _short(x):
    text = repr(x)
    return text if len(text) < 120 else text[:117] + "..."


def _raised(error, kind, pattern):
    return kind in error.get("types", ()) and re.search(pattern, error.get("message", "")) is not None


def _describe_error(record, raises):
    """A failed call: what it raised (and where in the submission), or why it did not finish."""
    error = record.get("error") or {}
    text = f"{error.get('type', 'Error')}: {error.get('message', '')}".strip()
    if error.get("where"):
        text += f" [at {error['where']}]"
    if record["status"] == "error" and raises:
        kind, pattern = raises
        return f"expected {kind}{f' (message matching {pattern!r})' if pattern else ''}, got {text}"
    if record["status"] == "error":
        return f"raised {text}"
    return error.get("message", record["status"])
