"""Paginated pulls must arrive whole.

The OpenAI Usage and Costs APIs and the Anthropic usage and cost reports page
by time bucket: a page says ``has_more: true`` and hands a ``next_page`` cursor
when the pull goes on, and the next page starts with the bucket after its last
one. A page that says the pull goes on, with no export given that starts where
it ends, means pages were left out: their days would be read as unbilled (every
request on them unexplained, or worse, a month that nets out wrongly), so the
run stops instead, naming the page.
"""

from __future__ import annotations

import json
import pathlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from keel_pdp.reconcile.errors import InputError
from keel_pdp.reconcile.period import Period

# Formats read from time-bucketed report pages, by the pull they come from.
PULLS = {"usage-json": "usage", "costs-json": "cost", "cost-json": "cost",
         "empty-pages": "any"}


@dataclass(frozen=True, slots=True)
class _Page:
    path: pathlib.Path
    where: str  # JSON path of the page ("" for a one-page file)
    pull: str
    cursor: str
    first_start: datetime | None
    last_end: datetime | None
    has_more: bool


def _instant(value: Any) -> datetime | None:
    """A bucket bound: unix seconds (OpenAI) or an RFC 3339 timestamp (Anthropic)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return datetime.fromtimestamp(value, tz=UTC)
    if isinstance(value, str) and value.strip():
        try:
            parsed = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    return None


def _bound(bucket: Any, *names: str) -> datetime | None:
    if not isinstance(bucket, dict):
        return None
    for name in names:
        found = _instant(bucket.get(name))
        if found is not None:
            return found
    return None


class PageChain:
    """Collects the pages of every bucketed report and checks each pull is whole."""

    def __init__(self) -> None:
        self._pages: list[_Page] = []

    def add(self, path: pathlib.Path, fmt: str, text: str) -> None:
        pull = PULLS.get(fmt)
        if pull is None:
            return
        try:
            doc = json.loads(text)
        except ValueError:
            return  # reported by the parser
        many = isinstance(doc, list)
        for index, page in enumerate(doc if many else [doc]):
            if not isinstance(page, dict) or not isinstance(page.get("data"), list):
                continue
            data = page["data"]
            if not data:
                continue
            self._pages.append(_Page(
                path, f"[{index}]." if many else "", pull, str(page.get("next_page") or ""),
                _bound(data[0], "start_time", "starting_at"),
                _bound(data[-1], "end_time", "ending_at"),
                page.get("has_more") is True))

    def check(self, period: Period) -> None:
        starts: dict[str, set[datetime]] = {}
        for p in self._pages:
            if p.first_start is not None:
                starts.setdefault(p.pull, set()).add(p.first_start)
        for p in self._pages:
            if not p.has_more or p.last_end is None or p.last_end >= period.end:
                continue
            following = starts.get(p.pull, set()) | starts.get("any", set())
            if p.pull == "any":
                following = set().union(*starts.values()) if starts else set()
            if p.last_end in following:
                continue
            cursor = f" (next_page {p.cursor!r})" if p.cursor else ""
            raise InputError(
                str(p.path),
                f"has_more is true{cursor}: the pull goes on at "
                f"{p.last_end.isoformat().replace('+00:00', 'Z')}, but no export given "
                "starts there; pass every page of the pull (the days of a missing page "
                "would read as unbilled)",
                where=f"{p.where}has_more")
