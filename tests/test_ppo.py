"""PPO-clip policy and value losses: the ``ppo`` exercise's checks (minirlhf/homework/checks/ppo.py,
case tables, analytic gradients, invariances) on the reference, or on a student's folder with ``--impl``."""
from exercise_checks import exercise_tests

test_exercise_ppo = exercise_tests("ppo")
