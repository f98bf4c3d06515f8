"""Errors that mean "the user asked for something we cannot do": the CLI prints them as one line, exit 2."""


class BadInput(ValueError):
    """A value from the user (CLI, matrix file, engine option) that is not allowed. The message names it."""


class EngineUnavailable(RuntimeError):
    """An engine cannot run in this environment (missing package, no CUDA). The cell is skipped with this reason."""
