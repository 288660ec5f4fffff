"""PPO-clip policy and value losses: the ``ppo`` exercise's checks (minirlhf/homework/checks/ppo.py,
case tables, analytic gradients, invariances) on the reference, or on a student's folder with ``--impl``."""
import pytest
import torch

from exercise_checks import exercise_tests
from minirlhf import ppo_value_loss

test_exercise_ppo = exercise_tests("ppo")


# --------------------------------------------------------------------------- value clipping (not the exercise)


@pytest.mark.parametrize("value, gradient, loss", [(0.5, 0.0, 0.5 * 0.8**2), (-0.5, -1.5, 0.5 * 1.5**2)])
def test_value_clip_stops_only_a_move_that_reduced_the_error(value, gradient, loss):
    # V_old = 0, R = 1, c = 0.2. V = 0.5 moved towards R past the clip range: its clipped version
    # (0.2, error 0.8) is worse than it (error 0.5), the max picks the constant clipped term, and
    # the gradient is 0. V = −0.5 moved away from R: clipped (−0.2, error 1.2) is better than it
    # (error 1.5), the max keeps ½(V − R)², and the gradient V − R = −1.5 pulls it back.
    values = torch.tensor([[value]], dtype=torch.float64, requires_grad=True)
    zero, one = torch.zeros(1, 1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    value_loss, clip_fraction = ppo_value_loss(values, zero, one, torch.ones(1, 1), clip_range=0.2)
    value_loss.backward()
    assert values.grad.item() == pytest.approx(gradient, abs=1e-12)
    assert value_loss.item() == pytest.approx(loss, abs=1e-12)
    assert clip_fraction.item() == (1.0 if gradient == 0 else 0.0)
