"""The shape cache: what a plan reuses between requests of one shape, and when not."""

from __future__ import annotations

import hashlib
import json
import pathlib
from datetime import UTC, datetime
from typing import Any

from keel_pdp import decision, events, permits
from keel_pdp.decision import AuthorizeInput, Code, Plan, ShapeCache, fingerprint
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.snapshot import PolicySnapshot
from tests.helpers import budget, write_bundle

# One cache per snapshot, as the engine keeps one (it starts afresh on a new snapshot).
_CACHES: dict[int, ShapeCache] = {}


def plan(snap: PolicySnapshot, r: AuthorizeInput, now_ms: int) -> Plan:
    cache = _CACHES.setdefault(id(snap), ShapeCache())
    return decision.plan(snap, r, now_ms, permits.new_permit_id(now_ms), cache)


def event_data(p: Plan) -> str:
    return events.decision_data(p)


def _ms(y: int, mo: int, d: int, h: int = 0, mi: int = 0) -> int:
    return int(datetime(y, mo, d, h, mi, tzinfo=UTC).timestamp() * 1000)


def req(rid: str = "r1", tin: int = 1000, tout: int = 500, tenant: str = "acme",
        model: str = "gpt-4.1", labels: tuple[tuple[str, str], ...] = ()) -> AuthorizeInput:
    return AuthorizeInput(rid, tenant, "chat", model, "openai", tin, tout, labels)


def test_one_shape_serves_every_request_of_it_within_its_windows(tmp_path: pathlib.Path) -> None:
    snap = load_bundle(write_bundle(tmp_path, [
        budget("hour", "10", window="hourly"), budget("day", "10")]))
    t = _ms(2026, 11, 22, 10, 5)
    a, b = plan(snap, req("a"), t), plan(snap, req("b", tin=7), t + 60_000)
    assert a.shape is b.shape
    assert a.targets is b.targets
    # The next hour: the hourly window moved, so the shape is built again.
    c = plan(snap, req("c"), _ms(2026, 11, 22, 11, 0))
    assert c.shape is not a.shape
    assert [t_.window_start_ms for t_ in c.targets] == [_ms(2026, 11, 22), _ms(2026, 11, 22, 11)]
    # A clock that steps back gets its own windows, not the later shape's.
    d = plan(snap, req("d"), _ms(2026, 11, 22, 9, 59))
    assert [t_.window_start_ms for t_ in d.targets] == [_ms(2026, 11, 22), _ms(2026, 11, 22, 9)]


def test_a_price_change_ends_a_shape_even_inside_its_budget_window(
        tmp_path: pathlib.Path) -> None:
    prices = {"openai": {"gpt-4.1": [
        {"input": "2.00", "output": "8.00", "max_output_tokens": 100},
        {"input": "1.00", "output": "4.00", "max_output_tokens": 100,
         "effective_from": "2026-12-15"}]}}
    snap = load_bundle(write_bundle(tmp_path, [budget("m", "100", window="monthly")],
                                    prices=prices))
    before = plan(snap, req("a"), _ms(2026, 12, 14, 23, 59))
    after = plan(snap, req("b"), _ms(2026, 12, 15))
    assert before.targets[0].window_start_ms == after.targets[0].window_start_ms
    assert before.estimate_micros == 1000 * 2 + 500 * 8
    assert after.estimate_micros == 1000 * 1 + 500 * 4
    assert json.loads(event_data(after))["price"][0] == 1_000_000  # pico-USD per token
    # And back before the change: the old price again.
    again = plan(snap, req("c"), _ms(2026, 12, 14, 12))
    assert again.estimate_micros == 1000 * 2 + 500 * 8


def test_prefer_cheap_chooses_per_request_within_one_shape(tmp_path: pathlib.Path) -> None:
    # "reader" is cheap on input and dear on output, "writer" the other way round.
    prices = {"openai": {
        "reader": {"input": "0.10", "output": "10.00", "max_output_tokens": 100},
        "writer": {"input": "5.00", "output": "0.50", "max_output_tokens": 100}}}
    snap = load_bundle(write_bundle(
        tmp_path, [budget("r", "100", scope={"model": "reader"}),
                   budget("w", "100", scope={"model": "writer"})],
        prices=prices, routes=[{"id": "cheap", "scope": {"tenant": "acme"},
                                "mode": "prefer-cheap",
                                "downgrade": ["openai/reader", "openai/writer"]}]))
    t = _ms(2026, 11, 22, 10)
    long_input = plan(snap, req("a", tin=100_000, tout=10, model="reader"), t)
    long_output = plan(snap, req("b", tin=10, tout=100_000, model="reader"), t)
    assert long_input.candidates[0].model == "reader"
    assert [x.budget.id for x in long_input.targets] == ["r"]
    assert long_output.candidates[0].model == "writer"
    assert [x.budget.id for x in long_output.targets] == ["w"]
    events = [json.loads(event_data(p)) for p in (long_input, long_output)]
    assert [e["provider"] for e in events] == ["openai", "openai"]
    assert [[b["id"] for b in e["budgets"]] for e in events] == [["r"], ["w"]]
    assert events[1]["cands"][0]["m"] == "writer" and events[1]["model"] == "reader"


def test_the_event_carries_the_request_and_the_shape(tmp_path: pathlib.Path) -> None:
    snap = load_bundle(write_bundle(tmp_path, [budget("day", "10", per=["tenant"])]))
    t = _ms(2026, 11, 22, 10)
    p = plan(snap, req('quote"and\\slash', tin=123, tout=45, labels=(("team", "é"),)), t)
    e = json.loads(event_data(p))
    assert e["rid"] == 'quote"and\\slash'
    assert (e["in_tok"], e["out_tok"], e["est"], e["now"]) == (123, 45, p.estimate_micros, t)
    assert e["labels"] == {"team": "é"}
    assert (e["tenant"], e["workload"], e["model"], e["provider"]) == (
        "acme", "chat", "gpt-4.1", "openai")
    assert e["rev"] == snap.policy_revision
    assert e["budgets"][0]["split"] == ["acme"]
    assert event_data(p).isascii()
    for rid in ("plain-id_1.2:x/y", "tab\tin", "ünï", "{not}[json]"):
        assert json.loads(event_data(plan(snap, req(rid), t)))["rid"] == rid


def test_a_denied_shape_is_reused_and_keeps_its_reason(tmp_path: pathlib.Path) -> None:
    snap = load_bundle(write_bundle(tmp_path, [budget("day", "10")]))
    t = _ms(2026, 11, 22, 10)
    a, b = plan(snap, req("a", model="nope"), t), plan(snap, req("b", model="nope"), t)
    assert a.shape is b.shape
    assert [r.code for r in b.denial] == [Code.UNKNOWN_MODEL_PRICE]
    assert json.loads(event_data(b))["reasons"][0]["code"] == "UNKNOWN_MODEL_PRICE"


def test_fingerprint_keeps_its_stored_format() -> None:
    # Idempotency records written by earlier versions hold this digest: a retry
    # after an upgrade must still be recognised as the same request.
    r = req("x", labels=(("b", "2"), ("a", "ü")))
    body = json.dumps(["acme", "chat", "gpt-4.1", "openai", 1000, 500, [["a", "ü"], ["b", "2"]]],
                      ensure_ascii=True, separators=(",", ":"))
    assert fingerprint(r) == hashlib.blake2b(body.encode(), digest_size=12).hexdigest()


def test_shape_cache_is_bounded_and_starts_afresh_on_a_new_snapshot(
        tmp_path: pathlib.Path) -> None:
    snap = load_bundle(write_bundle(tmp_path, [budget("day", "10", per=["tenant"])]))
    cache = ShapeCache(limit=5)
    sizes = []
    for i in range(20):
        decision.plan(snap, req(f"r{i}", tenant=f"t{i}"), _ms(2026, 11, 22, 10), f"p{i}", cache)
        sizes.append(len(cache))
    assert max(sizes) == 5
    newer = load_bundle(write_bundle(tmp_path / "v2", [budget("day", "20", per=["tenant"])]))
    p = decision.plan(newer, req("x", tenant="t19"), _ms(2026, 11, 22, 10), "px", cache)
    assert len(cache) == 1 and p.targets[0].budget.limit_micros == 20_000_000


def test_permit_ids_are_unique_and_well_formed() -> None:
    ids: Any = {permits.new_permit_id(1) for _ in range(2000)}  # crosses a 4 KiB refill
    assert len(ids) == 2000
    assert all(len(i) == 32 and i.startswith("pmt_000000000001") for i in ids)
    assert not any(permits.is_degraded_permit_id(i) for i in ids)
    twins = {permits.degraded_permit_id(i) for i in ids}
    assert len(twins) == 2000 and twins.isdisjoint(ids)
    assert all(permits.is_degraded_permit_id(i) and permits.permit_issued_ms(i) == 1
               for i in twins)


def test_permit_ids_come_from_the_injected_randomness_and_clock() -> None:
    ids = permits.PermitIds(random_bytes=lambda n: bytes([0xFF]) * n, clock_ms=lambda: 0xABC)
    pid = ids.new()
    assert pid == "pmt_000000000abc" + "7" + "f" * 15  # top bit of the random part cleared
    assert permits.degraded_permit_id(pid) == "pmt_000000000abc" + "f" * 16
