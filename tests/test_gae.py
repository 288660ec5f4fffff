"""GAE: the ``gae`` exercise's checks (minirlhf/homework/checks/gae.py) on the reference, or on a
student's folder with ``--impl``: brute-force sums, the λ = 0 / λ = 1 limits, padding layouts."""
from exercise_checks import exercise_tests

test_exercise_gae = exercise_tests("gae")
