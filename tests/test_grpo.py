"""Group advantages (GRPO, Dr. GRPO), RLOO and the GRPO loss: the ``grpo`` exercise's checks
(minirlhf/homework/checks/grpo.py) on the reference, or on a student's folder with ``--impl``."""
from exercise_checks import exercise_tests

test_exercise_grpo = exercise_tests("grpo")
