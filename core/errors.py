"""Errors the engine raises on purpose.

`UserError` carries a one-line message that names what is wrong and how to fix it; the CLI
prints it as is and the JobManager stores it on the job record. `Cancelled` unwinds a job
whose cancel flag was seen at a batch boundary; `Paused` unwinds a training that saved a
checkpoint to continue from. `at_least_one` is the one check of counts that must be positive.
"""


class UserError(ValueError):
    """Bad input: the message says what is wrong and how to fix it, on one line."""


class Cancelled(RuntimeError):
    """The job was cancelled; raised at a batch boundary."""


class Paused(RuntimeError):
    """Training was paused: a checkpoint was saved at a chunk boundary to resume from."""


def at_least_one(**values: int | None) -> None:
    """One-line errors for counts that must be positive (batch sizes, top-k); None is unset."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise UserError(f"{name}={value} must be at least 1")
