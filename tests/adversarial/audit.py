"""The money invariants, checked from outside after a hostile scenario.

Written apart from the engine: it reads the raw Redis keys, the raw stream and the
ledger tables, and does its own arithmetic. What it asserts (DESIGN.md §3):

* settled + held <= cap in every enforce window, beyond it only by what was booked
  for calls whose hold had ended (late closeouts, fail-open permits) or by flagged
  overruns;
* every permit a test was given ALLOW for has exactly one decision in the stream
  that says so, and ends in exactly one terminal state;
* no hold without an ALLOW answer: a decision the stream holds for a permit no
  answer gave out was undone at once (a void whose reason says "aborted");
* no answer contradicts Redis: a DENY answer's permit holds nothing and the stream
  never says ALLOW for it;
* ledger = stream = Redis: the ledger writer stores every stream event exactly once,
  and the settled amounts agree in all three places.
"""

from __future__ import annotations

import json
import pathlib
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from keel_pdp.ledger.store import LedgerStore
from keel_pdp.ledger.writer import LedgerWriter, WriterConfig

TERMINAL = ("settled", "voided", "expired")


@dataclass
class Answer:
    permit_id: str
    decision: str  # ALLOW | CONSTRAIN | DENY
    degraded: bool = False
    request_id: str = ""


@dataclass
class Audit:
    redis_url: str
    workdir: pathlib.Path
    caps: dict[str, int]  # enforce budget id -> cap (micro-USD)
    prefix: str = "keel"
    answers: list[Answer] = field(default_factory=list)
    checks: int = 0

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{pdp}}:"

    def r(self) -> Any:
        return redis.Redis.from_url(self.redis_url, socket_timeout=5)

    def answer(self, permit_id: str, decision: str, degraded: bool = False,
               request_id: str = "") -> None:
        self.answers.append(Answer(permit_id, decision, degraded, request_id))

    # ----------------------------------------------------------------- reads
    def stream(self) -> list[tuple[str, str, str, dict[str, Any], dict[str, Any]]]:
        r = self.r()
        try:
            out = []
            for eid, f in r.xrange(self.base + "events"):
                out.append((eid.decode(), f[b"type"].decode(), f[b"pid"].decode(),
                            json.loads(f[b"data"]), json.loads(f[b"res"]) if f[b"res"] else {}))
            return out
        finally:
            r.close()

    def permit_state(self, pid: str) -> str:
        r = self.r()
        try:
            return (r.hget(self.base + f"permit:{pid}", "state") or b"").decode()
        finally:
            r.close()

    def windows(self) -> dict[str, tuple[int, int]]:
        r = self.r()
        try:
            return {k.decode(): tuple(int(x or 0) for x in r.hmget(k, "s", "h"))  # type: ignore[misc]
                    for k in r.scan_iter(match=self.base + "b:*")}
        finally:
            r.close()

    def wait_no_holds(self, timeout_s: float = 20.0) -> None:
        """Until the expiry set is empty (the sidecars' sweepers ended every hold)."""
        r = self.r()
        try:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and r.zcard(self.base + "expiries"):
                time.sleep(0.1)
            assert r.zcard(self.base + "expiries") == 0, "holds never ended"
        finally:
            r.close()

    # ---------------------------------------------------------------- checks
    def check_caps(self) -> None:
        events = self.stream()
        late: Counter[str] = Counter()  # booked for calls whose hold had ended
        r = self.r()
        try:
            for _, etype, pid, _data, res in events:
                if etype != "settlement":
                    continue
                excess = int(res["act"]) - (int(res["amt"]) if res.get("prior") == "held"
                                            else 0)
                if res.get("prior") != "held" or res.get("flags"):
                    keys = (r.hget(self.base + f"permit:{pid}", "keys") or b"").decode()
                    for key in filter(None, keys.split("\n")):
                        late[key] += max(excess, 0)
        finally:
            r.close()
        for key, (s, h) in self.windows().items():
            bid = key[len(self.base) + 2:].split(":", 1)[0]
            assert h >= 0, f"{key}: negative held {h}"
            if bid in self.caps:
                assert s + h <= self.caps[bid] + late[key], (
                    f"{key}: settled {s} + held {h} > cap {self.caps[bid]} (+{late[key]} late)")
        self.checks += 1

    def check_answers(self) -> None:
        events = self.stream()
        decisions: dict[str, list[dict[str, Any]]] = {}
        ends: Counter[str] = Counter()
        voids: dict[str, str] = {}
        for _, etype, pid, data, res in events:
            if etype == "decision":
                decisions.setdefault(pid, []).append(res)
            elif etype in ("void", "expiry"):
                ends[pid] += 1
                voids[pid] = str(data.get("reason", ""))
            elif etype == "settlement" and res.get("prior") == "held":
                ends[pid] += 1
        for pid, ds in decisions.items():
            assert len(ds) == 1, f"{pid}: {len(ds)} decisions in the stream"
        given = {a.permit_id for a in self.answers if a.decision != "DENY"}
        for a in self.answers:
            ds = decisions.get(a.permit_id, [])
            state = self.permit_state(a.permit_id)
            if a.decision == "DENY":
                assert state in ("", "denied"), f"DENY answer {a.permit_id} has state {state}"
                assert all(d["d"] == "DENY" for d in ds), f"DENY answer {a.permit_id} vs {ds}"
                continue
            assert ds and ds[0]["d"] in ("ALLOW", "CONSTRAIN"), f"{a.permit_id}: {ds}"
            assert bool(ds[0].get("degraded")) == a.degraded, f"{a.permit_id}: {ds}"
            assert state in TERMINAL, f"{a.permit_id} ended in state {state!r}"
            if not a.degraded:
                assert ends[a.permit_id] == 1, f"{a.permit_id} ended {ends[a.permit_id]} times"
        for pid, ds in decisions.items():
            if pid in given or ds[0]["d"] == "DENY" or ds[0].get("degraded"):
                continue
            # A hold the stream shows but no answer gave out: it must have been undone
            # at once, not left to expire, and never settled.
            assert ends[pid] == 1 and voids.get(pid, "").startswith("aborted"), (
                f"{pid} held without an ALLOW answer and was not aborted "
                f"(ends {ends[pid]}, reason {voids.get(pid)!r})")
        self.checks += 1

    def check_ledger(self) -> dict[str, int]:
        events = self.stream()
        db = self.workdir / "audit-ledger.db"
        url = f"sqlite:///{db}"
        store = LedgerStore(url)
        store.migrate()
        cfg = WriterConfig(key_prefix=self.prefix, consumer="audit", batch_size=200, block_ms=1,
                           claim_idle_ms=50, claim_interval_s=0.0, trim=False,
                           backoff_initial_s=0.01, backoff_max_s=0.05)
        writer = LedgerWriter(cfg, store, redis.Redis.from_url(self.redis_url, socket_timeout=5))
        idle = 0
        for _ in range(10_000):
            idle = idle + 1 if writer.step() == 0 else 0
            if idle >= 3:
                break
        rows = store.query("SELECT event_id, etype, res FROM ledger_events")
        stored = Counter(str(row[0]) for row in rows)
        ids = [e[0] for e in events]
        assert set(stored) == set(ids), f"ledger lost {set(ids) - set(stored)}"
        assert all(n == 1 for n in stored.values()), "ledger doubled an event"
        stream_settled = sum(int(res["act"]) for _, t, _, _, res in events if t == "settlement")
        ledger_settled = sum(int(json.loads(row[2])["act"]) for row in rows
                             if row[1] == "settlement")
        assert ledger_settled == stream_settled
        # Every window booked each settlement once: the sum over one budget's windows
        # equals the stream's settlements that touched that budget.
        per_budget: Counter[str] = Counter()
        r = self.r()
        try:
            for _, etype, pid, _, res in events:
                if etype == "settlement":
                    keys = (r.hget(self.base + f"permit:{pid}", "keys") or b"").decode()
                    for key in filter(None, keys.split("\n")):
                        per_budget[key] += int(res["act"])
        finally:
            r.close()
        for key, (s, _h) in self.windows().items():
            assert s == per_budget[key], f"{key}: Redis settled {s} != stream {per_budget[key]}"
        store.close()
        self.checks += 1
        return {"events": len(ids), "ledger": len(rows), "settled": stream_settled}

    def check_all(self) -> dict[str, int]:
        self.check_caps()
        self.check_answers()
        return self.check_ledger()
