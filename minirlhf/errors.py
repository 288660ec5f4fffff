"""Errors that minirlhf reports to a user as a message, not a traceback."""


class MinirlhfError(Exception):
    """A problem with the user's input or configuration.

    The message names where (file, line/record), which field, and what was expected. The CLI
    prints it and exits with status 2.
    """


class DataError(MinirlhfError):
    """A dataset file or record that cannot be converted."""


class TrainingDiverged(MinirlhfError):
    """A loss became NaN/inf; the message names the step and the batch."""
