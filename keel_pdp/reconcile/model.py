"""Normalised provider line items and the names both sides share.

Token types follow Keel's pricing: ``input`` is fresh (uncached) input,
``cached_input`` prompt-cache reads, ``cache_write`` prompt-cache writes (the
5-minute lifetime, and OpenAI's), ``cache_write_1h`` Anthropic's 1-hour cache
writes (a rate of their own), ``output`` includes reasoning tokens. Non-token
charges (web search, code execution) keep their own type name.

Service tiers (OpenAI's ``service_tier`` and Batch API, Anthropic's
``service_tier``) bill one model at several rates; ``service_tier_name`` gives
both sides one spelling: ``standard`` for OpenAI's ``default`` and Anthropic's
``standard``, every other tier its own lower-case name, and "" where the source
does not say (resolved when both sides are gathered: see
``keel_pdp.reconcile.attribution``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date

from keel_pdp.pricing import tier_problem

INPUT = "input"
CACHED_INPUT = "cached_input"
CACHE_WRITE = "cache_write"
CACHE_WRITE_1H = "cache_write_1h"
OUTPUT = "output"
TOKEN_TYPES = (INPUT, CACHED_INPUT, CACHE_WRITE, CACHE_WRITE_1H, OUTPUT)
INPUT_GROUP = (INPUT, CACHED_INPUT, CACHE_WRITE, CACHE_WRITE_1H)
WEB_SEARCH = "web_search"

USAGE = "usage"
CREDIT = "credit"
CORRECTION = "correction"
LINE_KINDS = (USAGE, CREDIT, CORRECTION)

DEFAULT_ACCOUNT = "default"
LONG_CONTEXT = "long_context"

STANDARD_TIER = "standard"
BATCH_TIER = "batch"
_TIER_ALIASES = {"default": STANDARD_TIER, "standard": STANDARD_TIER}
# Keel's own words for a tier nobody knows: a call that let the provider choose
# ("auto"), a hold at the highest rate ("highest"), a report whose tier could not
# be read ("unreadable"). None of them is a tier a provider bills at.
_NOT_A_TIER = frozenset({"auto", "highest", "unreadable"})


def service_tier_name(value: object) -> str:
    """One spelling of a service tier on both sides; "" when ``value`` does not
    name one (absent, empty, ``auto``). Raises ``ValueError`` saying why ``value``
    cannot be a tier name (not text, longer than 64 characters, other characters
    than letters, digits, '_', '-' and '.')."""
    if value is None:
        return ""
    if isinstance(value, str):
        value = value.strip()
    problem = tier_problem(value)
    if problem is not None:
        shown = repr(value)[:40] + ("..." if len(repr(value)) > 40 else "")
        raise ValueError(f"service tier {shown} {problem}")
    assert isinstance(value, str)
    text = value.lower()
    if not text or text in _NOT_A_TIER:
        return ""
    return _TIER_ALIASES.get(text, text)

_DATE_SUFFIX = re.compile(r"-(\d{4}-\d{2}-\d{2}|\d{8})$")
_SLUG = re.compile(r"[^a-z0-9]+")


def normalise_model(name: str, aliases: dict[str, str] | None = None) -> str:
    """One spelling for a model on both sides.

    Dated snapshots (``gpt-4o-2024-08-06``, ``claude-sonnet-4-5-20250929``) and
    console display names (``Claude Sonnet 4.5``) become the family name the
    gateway uses; ``aliases`` (from the mapping file) win over the rules.
    """
    aliases = aliases or {}
    text = name.strip()
    if text in aliases:
        return aliases[text]
    if " " in text:
        text = _SLUG.sub("-", text.lower().replace(".", "-")).strip("-")
    text = text.lower()
    text = _DATE_SUFFIX.sub("", text)
    return aliases.get(text, text)


def slug(text: str) -> str:
    return _SLUG.sub("_", text.strip().lower()).strip("_")


@dataclass(frozen=True, slots=True)
class ProviderLine:
    """One line item of a provider export, normalised.

    ``tokens`` is None when the source carries money only (a cost report);
    ``cost_micros`` is None when it carries tokens only (a usage report).
    ``precision_micros`` is the smallest step the source's amounts can express:
    the rounding a provider line can carry is half of it.
    """

    day: date
    account: str
    model: str
    token_type: str
    tokens: int | None
    cost_micros: int | None
    kind: str = USAGE
    api_key: str = ""
    belongs_to: str = ""
    description: str = ""
    source: str = ""
    where: str = ""
    precision_micros: int = 1
    requests: int | None = None
    # A long-context (or other input-size) tier line: billed at the tier's rates
    # for requests whose input is above ``tier_from`` tokens (0: the provider's
    # documented threshold, from the mapping's ``tiers`` or the defaults).
    tier: str = ""
    tier_from: int = 0
    # The service tier the line was billed at (``service_tier_name``); "" when the
    # export does not say.
    service_tier: str = ""
