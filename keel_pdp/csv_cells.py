"""CSV cells as every file the product writes carries them to a spreadsheet.

A spreadsheet runs a cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return as a formula (CSV injection): a tenant, workload or provider
line description named ``=HYPERLINK(...)`` must stay text. Such text gets a
leading apostrophe; so does text that already starts with one, which keeps the
rule reversible (``csv_text`` reads a cell back to the exact name). Numbers,
negative amounts included, are written as they are so finance can sum them.

Every CSV writer of the ledger and of reconciliation goes through this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_ESCAPED_START = (*_FORMULA_START, "'")
_NUMBER = re.compile(r"-?[0-9]+(\.[0-9]+)?")


def csv_cell(cell: str) -> str:
    """``cell`` as a CSV file carries it: text that would start a formula (or that
    starts with an apostrophe) gets a leading apostrophe; numbers are unchanged."""
    if cell.startswith(_ESCAPED_START) and not _NUMBER.fullmatch(cell):
        return "'" + cell
    return cell


def csv_text(cell: str) -> str:
    """The text ``csv_cell`` was given, from the cell it wrote (the inverse)."""
    if cell.startswith("'") and csv_cell(cell[1:]) == cell:
        return cell[1:]
    return cell


def csv_value(value: object) -> str:
    """Any value a writer holds (text, an integer, None for an empty cell) as its cell."""
    if value is None:
        return ""
    return csv_cell(value if isinstance(value, str) else str(value))


def csv_rows(rows: Iterable[Sequence[object]]) -> Iterator[list[str]]:
    return ([csv_value(c) for c in r] for r in rows)


def csv_dict(row: Mapping[str, object]) -> dict[str, str]:
    return {k: csv_value(v) for k, v in row.items()}
