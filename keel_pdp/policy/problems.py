"""What is wrong with a policy bundle, in words a policy author can act on.

Every compile step reports into one list of ``Problem`` (file, field path,
reason) instead of stopping at the first, so one ``policy check`` shows all of
them; ``PolicyError`` carries the list to the caller, which keeps serving the
last good bundle.
"""

from __future__ import annotations

from dataclasses import dataclass

from keel_pdp.errors import PolicyErrorBase


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a bundle: the file, the field path in it and why."""

    file: str
    field: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.field}" if self.field else self.file
        return f"{where}: {self.reason}"


class PolicyError(PolicyErrorBase):
    """A bundle that cannot be served; ``problems`` names every file and field."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems[:20]))
