"""User-facing errors.

Every error a user can cause with bad input (a data row, a config key, a model path) is an `AlignError`: the
CLI prints its message as one line and exits with status 2, without a traceback. The message must say *where*
(file, row, field, or config key) and *what* is wrong.
"""


class AlignError(Exception):
    """Base class of the errors the CLI reports as one line (exit status 2)."""


class ConfigError(AlignError):
    """A config file or override is wrong: unknown key, wrong type, value out of range."""


class DataError(AlignError):
    """A data file or row is wrong: missing/empty field, wrong type, unknown chat role, too long."""

    def __init__(self, source: str, row: int | None, field: str | None, problem: str):
        where = source
        if row is not None:
            where += f": row {row}"
        if field is not None:
            where += f": field '{field}'"
        super().__init__(f"{where}: {problem}")
        self.source, self.row, self.field, self.problem = source, row, field, problem
