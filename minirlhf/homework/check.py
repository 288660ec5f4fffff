"""What one homework check is, and the small helpers the check specs share.

A check is one case of one exercise, read by students when it fails::

    Check(
        name="right-padded batch, γ = 0.9, λ = 0.8: against the brute-force sum Σ_l (γλ)^l δ_{t+l}",
        inputs=lambda: rollout(seed=0) | {"gamma": 0.9, "lam": 0.8},     # built by the grader
        run=lambda f, x: dict(zip(("advantages", "returns"), f.gae_advantages(**x))),
        expect=lambda x, got: {"advantages": brute_force_gae(**x), ...},
    )

- ``inputs()`` builds deterministic inputs: tensors and JSON values (numbers, strings, lists,
  dicts). The grader builds them in its own process and hands them to the submission's process
  in a file.
- ``run(f, x)`` is the only code that touches the submission: ``f.<function>`` is the student's
  function. It returns the *outputs*: tensors (values, and gradients from ``gradients``) and JSON
  values. It runs in the submission's process; its outputs travel back as plain data.
- ``expect(x, got)`` gives the expected outputs, computed by the grader: a brute-force formula, an
  analytic gradient, or a relation between the submission's own outputs (``got``), e.g. "the
  left-padded result is the right-padded one moved". ``expect=None`` compares with minirlhf's
  reference implementation run on the same inputs.
- ``raises=("ValueError", "divisible")``: the call must raise that exception (or a subclass), its
  message matching the regular expression.
- Only the keys of ``expect``'s dict are compared (``minirlhf/homework/compare.py`` has the one
  tolerance policy); ``tol`` overrides it per output, ``axes`` names each output's dimensions for
  the failure message ("row 1, t = 4"), ``hint`` is a nudge shown when this check fails.
"""
import dataclasses
import typing

import torch


@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    inputs: typing.Callable[[], dict]
    run: typing.Callable[[typing.Any, dict], dict]
    expect: typing.Optional[typing.Callable[[dict, dict], dict]] = None
    raises: typing.Optional[typing.Tuple[str, str]] = None
    tol: dict = dataclasses.field(default_factory=dict)
    axes: dict = dataclasses.field(default_factory=dict)
    hint: str = ""


def gradients(outputs, weights, wrt):
    """``∂L/∂x`` for each named input ``x``, with ``L = Σ_k (weights[k] · outputs[k]).sum()``.

    The fixed random weights make every element of every output count with its own weight, so a
    gradient that is right on average but wrong per element (or per output) still differs.
    Returns ``{"∂L/∂name": tensor or None}``: None where no gradient reaches the input (a detached
    result, or a value computed outside autograd).
    """
    terms = [(weights[k] * y).sum() for k, y in outputs.items() if torch.is_tensor(y) and y.requires_grad]
    if not terms:
        return {f"∂L/∂{name}": None for name in wrt}
    grads = torch.autograd.grad(sum(terms), list(wrt.values()), allow_unused=True)
    return {f"∂L/∂{name}": grad for name, grad in zip(wrt, grads)}


def leaves(x, names):
    """Mark the inputs ``names`` of ``x`` as leaves that need a gradient; returns them by name."""
    return {name: x[name].requires_grad_(True) for name in names}


def random(*shape, seed, scale=1.0, shift=0.0, dtype=torch.float64):
    """Seeded Gaussian values (float64 unless asked otherwise)."""
    generator = torch.Generator().manual_seed(seed)
    return (shift + scale * torch.randn(*shape, generator=generator, dtype=torch.float64)).to(dtype)


def random_response_mask(batch_size, num_tokens, seed, min_len=1):
    """A right-padded ``[B, T]`` bool mask with lengths in ``[min_len, T]`` (row 0 full)."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, num_tokens + 1, (batch_size,), generator=generator)
    lengths[0] = num_tokens
    return torch.arange(num_tokens)[None, :] < lengths[:, None]


def to_left_padded(x, mask):
    """Move each row's valid entries of a right-padded ``x`` to the end of the row (same order)."""
    shifts = (~mask.bool()).sum(dim=-1)
    return torch.stack([torch.roll(row, int(shift), dims=-1) for row, shift in zip(x, shifts)])


def permutation(n, seed):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def minimise(loss_fn, param, steps=100):
    """Newton's method with a backtracking line search on one (small) parameter tensor.

    Exact to machine precision on the smooth convex problems of the checks (one or two numbers);
    written out because ``torch.optim`` costs seconds of imports on its first step.
    """
    with torch.no_grad():
        for _ in range(steps):
            with torch.enable_grad():
                loss = loss_fn()
                (grad,) = torch.autograd.grad(loss, param, create_graph=True)
                grad = grad.flatten()
                hessian = torch.stack([torch.autograd.grad(g, param, retain_graph=True)[0].flatten() for g in grad])
            if grad.abs().max() < 1e-13:
                break
            step = torch.linalg.solve(hessian + 1e-12 * torch.eye(len(grad), dtype=grad.dtype), grad).view_as(param)
            t, start = 1.0, param.detach().clone()
            while t > 1e-10:
                param.copy_(start - t * step)
                if loss_fn() <= loss.detach() - 1e-4 * t * (grad * step.flatten()).sum():
                    break
                t /= 2


def is_detached(x):
    """For outputs the docstring says are detached (logging values, fixed targets)."""
    return torch.is_tensor(x) and not x.requires_grad
