"""KL estimators (Schulman's k1, k2, k3) and the KL-shaped per-token rewards of RLHF-PPO: the ``kl``
exercise's checks (minirlhf/homework/checks/kl.py) on the reference, or on a student's folder with
``--impl``."""
from exercise_checks import exercise_tests

test_exercise_kl = exercise_tests("kl")
