"""The one error type of the data layer: a dataset that cannot be used as given."""

from __future__ import annotations

from typing import Iterable


class DatasetError(ValueError):
    """Raised when a dataset (or one file of it) cannot be used; one line per problem, each naming the file.

    ``problems`` keeps the individual lines so callers (the ``check`` CLI, tests) can count or filter them.
    """

    def __init__(self, problems: str | Iterable[str]):
        self.problems = [problems] if isinstance(problems, str) else [str(p) for p in problems]
        super().__init__("\n".join(self.problems))
