"""The fixed versions of ``exercises/find_the_bug/`` (the grader's reference; ``solutions/find_the_bug/``
is generated from them). Each module's docstring explains its bug, why it is silent and which
property catches it."""
