"""Errors that stop a reconciliation before anything is written.

Every input problem names the file, the place in it (row or JSON path) and the
column or field, so the person holding the export can find it.
"""

from __future__ import annotations

from keel_pdp.errors import ReconcileErrorBase


class ReconcileError(ReconcileErrorBase):
    """A reconciliation that cannot run; nothing is written or posted."""


class InputError(ReconcileError):
    """A bad input file: ``path``, ``where`` (row or JSON path), ``column``."""

    def __init__(self, path: str, message: str, *, where: str = "", column: str = "") -> None:
        self.path = path
        self.where = where
        self.column = column
        self.reason = message
        parts = [path]
        if where:
            parts.append(where)
        if column:
            parts.append(f"column {column!r}")
        super().__init__(": ".join(parts) + f": {message}")


class SignoffError(ReconcileError):
    """A sign-off that cannot be recorded."""
