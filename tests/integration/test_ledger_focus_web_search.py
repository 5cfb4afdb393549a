"""The FOCUS export bills web search calls on a line of their own (calls at the fee,
as the providers bill them), and the token lines keep their token prices: a call
of claude-sonnet-4-5 ($3 / $15 per million input / output tokens) with 3 searches
at $10 per 1,000. Over SQLite and a real PostgreSQL server."""

from __future__ import annotations

import pathlib
from typing import Any

import fakeredis
import pytest

from keel_pdp.decision import AuthorizeInput
from keel_pdp.ledger.events import parse_entry
from keel_pdp.ledger.export import FOCUS_COLUMNS, focus_rows
from keel_pdp.ledger.mapping import CostMapping
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.pricing import TokenUsage
from tests.helpers import budget, make_engine, read_stream, write_bundle
from tests.integration.conftest import STREAM

pytestmark = pytest.mark.integration

PRICES = {"anthropic": {"claude-sonnet-4-5": {
    "input": "3.00", "cached_input": "0.30", "cache_write": "3.75", "output": "15.00",
    "max_output_tokens": 4096, "web_search_per_1k": "10"}}}
IN, OUT, SEARCHES = 2_000, 1_000, 3
INPUT_MICROS = IN * 3          # 6,000: $3 per million
OUTPUT_MICROS = OUT * 15       # 15,000: $15 per million
SEARCH_MICROS = SEARCHES * 10_000  # 30,000: $10 per 1,000


def micros(text: str) -> int:
    whole, _, frac = text.partition(".")
    return int(whole) * 1_000_000 + int((frac + "000000")[:6])


async def test_web_search_calls_are_a_focus_line_of_their_own(
        store_url: str, tmp_path: pathlib.Path) -> None:
    client = fakeredis.FakeAsyncRedis()
    engine = make_engine(client, write_bundle(tmp_path / "b", [budget("all", "100.00")],
                                              prices=PRICES))
    out = await engine.authorize(AuthorizeInput(
        "ws", "acme", "chat", "claude-sonnet-4-5", "anthropic", IN, OUT,
        max_web_search_calls=5))
    res = await engine.closeout(out.permit_id, TokenUsage(IN, 0, 0, OUT, 0, 0, SEARCHES),
                                "SUCCEEDED", None)
    assert res.actual_cost_micros == INPUT_MICROS + OUTPUT_MICROS + SEARCH_MICROS
    store = LedgerStore(store_url)
    store.migrate()
    try:
        raw: Any = await read_stream(client, STREAM)
        store.write_batch([parse_entry(eid.decode(), fields) for eid, fields in raw])
        period = str(store.query("SELECT period FROM ledger_entries WHERE kind = "
                                 "'settlement'")[0][0])
        header, rows = focus_rows(store, period, CostMapping())
    finally:
        store.close()
    by = {r[header.index("x_TokenType")]: dict(zip(FOCUS_COLUMNS, r, strict=True))
          for r in rows}
    assert sorted(by) == ["input", "output", "web_search"]
    search = by["web_search"]
    assert (search["ConsumedQuantity"], search["PricingQuantity"]) == ("3", "3")
    assert (search["ConsumedUnit"], search["PricingUnit"]) == ("Requests", "Requests")
    assert micros(search["ListUnitPrice"]) * 1_000 == 10_000_000  # $0.01 per call
    assert micros(search["BilledCost"]) == micros(search["ListCost"]) == SEARCH_MICROS
    assert search["SkuId"] == "anthropic/claude-sonnet-4-5/web_search"
    assert "web search calls" in search["ChargeDescription"]
    assert micros(by["input"]["BilledCost"]) == INPUT_MICROS
    assert micros(by["output"]["BilledCost"]) == OUTPUT_MICROS
    assert by["input"]["ConsumedUnit"] == "Tokens"
    assert sum(micros(r["BilledCost"]) for r in by.values()) == res.actual_cost_micros
