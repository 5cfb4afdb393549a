"""Seeded fault simulation: one seed reproduces a whole run.

Two sidecars (engines with the production Redis transport) share one real
Redis server with AOF; a ledger writer consumes the stream into SQLite. A
seeded random walk interleaves Authorize, retries, Closeout (and its retries),
Void, expiry sweeps and faults: Redis pauses (timeouts), dropped connections,
SCRIPT FLUSH (NOSCRIPT), a Redis restart from its AOF, a sidecar kill (a new
engine with the same outbox journal), a ledger-writer kill (a new consumer;
the dead one's pending entries are claimed) and a policy reload.

After every step the budget invariant is checked; at the end every hold must
have reached exactly one terminal state, every stream event must be in the
ledger exactly once, and the ledger's settled totals must equal Redis'.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput, DecisionKind, InvalidRequest
from keel_pdp.engine import Engine
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.ledger.writer import LedgerWriter, WriterConfig
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import TokenUsage
from tests.conftest import RedisServer, free_port
from tests.helpers import BUSY_LUA, budget, write_bundle

PREFIX = "sim"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000

TENANTS = ("acme", "globex", "initech")
FAULTS = ("pause", "kill_conns", "script_flush", "redis_restart", "sidecar_kill",
          "writer_kill", "policy_reload", "busy")


class InvariantViolation(AssertionError):
    pass


@dataclass
class Permit:
    pid: str
    tenant: str
    held: int
    max_out: int
    input_tokens: int
    state: str = "held"  # held | settled | voided
    actual: int = -1
    degraded: bool = False
    expires_at_ms: int = 0


@dataclass
class Report:
    seed: int
    steps: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    checks: int = 0
    events: int = 0
    ledger_events: int = 0
    lost: int = 0
    doubled: int = 0
    replays: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        return (f"seed {self.seed}: {self.steps} steps, {sum(self.ops.values())} operations "
                f"({dict(self.ops)}), {sum(self.faults.values())} faults ({dict(self.faults)}), "
                f"{self.checks} invariant checks, {self.events} events, "
                f"{self.ledger_events} in the ledger, lost {self.lost}, doubled {self.doubled}, "
                f"replays by permit state {dict(self.replays)}")


def bundles(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    common = [
        budget("org", "1000000", window="monthly", fail_mode="open"),
        budget("acme-daily", "0.050000", scope={"tenant": "acme"}, fail_mode="closed",
               thresholds=[50, 90]),
        budget("tenant-hourly", "0.030000", per=["tenant"], window="hourly",
               scope={"workload": "chat"}, fail_mode="closed"),
    ]
    v1 = write_bundle(root / "v1", [*common, budget(
        "globex-open", "0.040000", scope={"tenant": "globex"}, fail_mode="open")],
        settings={"hold_ttl_seconds": 5, "min_output_tokens": 20}, revision="sim-1")
    v2 = write_bundle(root / "v2", [*common, budget(
        "globex-open", "0.060000", scope={"tenant": "globex"}, fail_mode="open")],
        settings={"hold_ttl_seconds": 5, "min_output_tokens": 20}, revision="sim-2")
    return v1, v2


class Simulation:
    def __init__(self, seed: int, steps: int, workdir: pathlib.Path) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.steps = steps
        self.work = workdir
        self.report = Report(seed)
        self.redis = RedisServer(free_port(), workdir / "redis")
        self.keys = KeySpace(PREFIX)
        self.permits: dict[str, Permit] = {}
        self.requests: dict[str, tuple[AuthorizeInput, str]] = {}
        # Held permits a retry received after the first answer was degraded: the
        # hold that first attempt's lost reply made. Never released by its abort.
        self.handed_by_replay: set[str] = set()
        self.v1, self.v2 = bundles(workdir / "bundles")
        self.bundle = self.v1
        self.engines: list[Engine] = []
        self.ledger_url = f"sqlite:///{workdir / 'ledger.db'}"
        self.writer: LedgerWriter | None = None
        self._writer_n = 0
        # Cost booked for permits whose hold had already ended (late closeouts after
        # expiry or void, fail-open settlements): the provider billed it, so it may
        # take a window past its cap. Read from the stream, per window key.
        self.late: Counter[str] = Counter()
        self._scanned = "-"
        self._rid = 0

    # ------------------------------------------------------------ plumbing
    def _engine(self, i: int) -> Engine:
        holder = PolicyHolder(self.bundle)
        holder.set(load_bundle(self.bundle))
        # The two sidecars write different idempotency records formats, as during
        # `keel-pdp records --upgrade` (one restarted, one not): each reads both.
        store = BudgetStore.from_url(self.redis.url, prefix=PREFIX, timeout_s=0.05,
                                     records=1 + (self.seed + i) % 2)
        return Engine(holder, store, Metrics(), outbox_dir=str(self.work / f"outbox-{i}"))

    def _new_writer(self) -> None:
        self._writer_n += 1
        store = LedgerStore(self.ledger_url)
        store.migrate()
        cfg = WriterConfig(key_prefix=PREFIX, consumer=f"w{self._writer_n}", batch_size=50,
                           block_ms=1, claim_idle_ms=50, claim_interval_s=0.0, trim=False,
                           backoff_initial_s=0.01, backoff_max_s=0.05)
        self.writer = LedgerWriter(cfg, store, redis.Redis(port=self.redis.port,
                                                           socket_timeout=2))

    def _drain_writer(self, max_rounds: int = 10_000) -> None:
        assert self.writer is not None
        idle = 0
        for _ in range(max_rounds):
            try:
                n = self.writer.step()
            except redis.RedisError:
                n = 0
            idle = idle + 1 if n == 0 else 0
            if idle >= 3:
                return

    def _sync(self) -> Any:
        return redis.Redis(port=self.redis.port, socket_timeout=5)

    # ---------------------------------------------------------- operations
    def _new_request(self) -> AuthorizeInput:
        r = self.rng
        self._rid += 1
        rid = f"s{self.seed}-{self._rid}"
        return AuthorizeInput(rid, r.choice(TENANTS), r.choice(("chat", "batch")),
                              r.choice(("gpt-4o-mini", "gpt-4.1")), "openai",
                              r.randrange(0, 4000), r.choice((0, 50, 300, 1000)))

    async def op_authorize(self, retry: bool) -> None:
        eng = self.rng.choice(self.engines)
        if retry and self.requests:
            req, first_pid = self.requests[self.rng.choice(list(self.requests))]
        else:
            req, first_pid = self._new_request(), ""
        before = self.permits.get(first_pid)
        state = ""
        if before is not None:
            state = before.state
            if state == "held" and before.expires_at_ms and before.expires_at_ms <= _now_ms():
                state = "expired"
            self.report.replays["degraded" if before.degraded else state] += 1
        try:
            out = await eng.authorize(req)
        except InvalidRequest as exc:
            raise InvariantViolation(f"valid request rejected: {exc}") from exc
        if before is not None and out.permit_id == first_pid and state != "held" and \
                out.decision is not DecisionKind.DENY:
            raise InvariantViolation(
                f"replay of {req.request_id} rode on permit {first_pid} in state {state}")
        if out.decision is DecisionKind.DENY or out.degraded:
            if out.degraded and out.decision is not DecisionKind.DENY:
                self.permits[out.permit_id] = Permit(out.permit_id, req.tenant, 0,
                                                     out.max_output_tokens,
                                                     req.estimated_input_tokens, degraded=True)
                # Its request may be replayed too (decided afresh: no hold was made).
                self.requests.setdefault(req.request_id, (req, out.permit_id))
            return
        if first_pid and out.replayed and out.permit_id != first_pid:
            if before is None or not before.degraded:
                raise InvariantViolation(f"retry of {req.request_id} got a second permit")
            # The first answer was degraded (it held nothing) because the hold's reply
            # came too late: the retry received that hold. The caller now has two
            # ALLOWs as after any degraded answer, both metered; the hold stays held.
            self.handed_by_replay.add(out.permit_id)
            self.report.replays["held after degraded"] += 1
        if out.permit_id not in self.permits:
            self.permits[out.permit_id] = Permit(out.permit_id, req.tenant,
                                                 out.estimated_cost_micros,
                                                 out.max_output_tokens,
                                                 req.estimated_input_tokens,
                                                 expires_at_ms=out.expires_at_ms)
        if not out.replayed:
            self.requests[req.request_id] = (req, out.permit_id)

    def _usage(self, p: Permit) -> TokenUsage:
        # Never more than was authorized, so actual <= held for a held permit.
        tin = self.rng.randrange(0, p.input_tokens + 1)
        cached = self.rng.randrange(0, tin + 1)
        return TokenUsage(tin, cached, 0, self.rng.randrange(0, p.max_out + 1))

    async def op_closeout(self) -> None:
        open_ = [p for p in self.permits.values() if p.state != "settled"]
        done = [p for p in self.permits.values() if p.state == "settled"]
        eng = self.rng.choice(self.engines)
        if done and (not open_ or self.rng.random() < 0.25):
            p = self.rng.choice(done)
            res = await eng.closeout(p.pid, self._usage(p), "SUCCEEDED", None)
            if res.status in ("CLOSEOUT_STORE_UNAVAILABLE", "CLOSEOUT_PERMIT_PENDING"):
                return
            if res.status != "ALREADY_SETTLED" or res.actual_cost_micros != p.actual:
                raise InvariantViolation(f"closeout retry of {p.pid}: {res}")
            return
        if not open_:
            return
        p = self.rng.choice(open_)
        res = await eng.closeout(p.pid, self._usage(p), "SUCCEEDED", None)
        if res.status in ("SETTLED", "SETTLED_AFTER_EXPIRY", "SETTLED_AFTER_VOID",
                          "ALREADY_SETTLED"):
            p.state, p.actual = "settled", res.actual_cost_micros
        elif res.status not in ("CLOSEOUT_STORE_UNAVAILABLE", "CLOSEOUT_PERMIT_PENDING"):
            raise InvariantViolation(f"closeout of {p.pid}: {res.status}")

    async def op_void(self) -> None:
        open_ = [p for p in self.permits.values() if p.state == "held"]
        if not open_:
            return
        p = self.rng.choice(open_)
        res = await self.rng.choice(self.engines).void(p.pid, "sim")
        if res.status in ("VOIDED", "ALREADY_VOIDED"):
            p.state = "voided"

    async def op_sweep(self, far: bool = False) -> None:
        now = (2**41) if far else None
        for eng in self.engines:
            try:
                if now is None:
                    await eng.sweep_once(limit=1000)
                else:
                    while await eng.sweep_once(now_ms=now, limit=1000):
                        pass
            except Exception as exc:  # store faults during a sweep are expected
                if "Unavailable" not in type(exc).__name__:
                    raise

    # -------------------------------------------------------------- faults
    async def fault(self, kind: str) -> None:
        self.report.faults[kind] += 1
        r = self._sync()
        try:
            if kind == "pause":
                r.execute_command("CLIENT", "PAUSE", "120", "ALL")
            elif kind == "kill_conns":
                r.execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            elif kind == "script_flush":
                r.script_flush()
            elif kind == "redis_restart":
                self.redis.kill()
                self.redis.start()
            else:
                await self.shared_fault(kind, self._sync)
        finally:
            r.close()

    async def shared_fault(self, kind: str, blocker: Callable[[], Any]) -> bool:
        """The faults both walks make alike: a sidecar or the ledger writer killed,
        Redis kept busy (by a client from ``blocker``) while sidecars decide, a policy
        reload. False for any other kind."""
        if kind == "sidecar_kill":
            i = self.rng.randrange(len(self.engines))
            # The old one is simply gone (the kernel lets go of its journal).
            self.engines[i].relay.close()
            self.engines[i] = self._engine(i)
        elif kind == "writer_kill":
            self._new_writer()
        elif kind == "busy":
            # Redis busy past the store timeout while this sidecar decides: the
            # hold script runs late; the answer must still agree with Redis.
            client = blocker()
            task = asyncio.get_running_loop().run_in_executor(
                None, lambda: client.eval(BUSY_LUA, 0, 150))
            await asyncio.sleep(0.02)
            for _ in range(self.rng.randrange(1, 4)):
                await self.op_authorize(retry=self.rng.random() < 0.3)
            await task
            client.close()
        elif kind == "policy_reload":
            self.bundle = self.v2 if self.bundle == self.v1 else self.v1
            snap = load_bundle(self.bundle)
            for eng in self.engines:
                eng.policies.set(snap)
        else:
            return False
        return True

    # ---------------------------------------------------------- invariants
    def _scan_late(self, r: Any) -> None:
        start = self._scanned if self._scanned == "-" else "(" + self._scanned
        for eid, f in r.xrange(self.keys.stream, start, "+"):
            self._scanned = eid.decode()
            if f[b"type"] != b"settlement":
                continue
            res = json.loads(f[b"res"])
            if res.get("prior") == "held":
                continue
            keys = r.hget(self.keys.permit(f[b"pid"].decode()), "keys") or b""
            for key in keys.decode().split("\n"):
                if key:
                    self.late[key] += int(res["act"])

    def check_budgets(self) -> None:
        """settled + held <= cap for every enforce budget window, allowing only what
        the provider billed for permits whose hold had already ended."""
        r = self._sync()
        try:
            self._scan_late(r)
            snap = load_bundle(self.bundle)
            caps = {b.id: b.limit_micros for b in snap.budgets}
            caps["globex-open"] = max(caps["globex-open"], 60_000)
            for raw in r.scan_iter(match=f"{PREFIX}:{{pdp}}:b:*"):
                key = raw.decode()
                bid = key.split(":b:", 1)[1].split(":", 1)[0]
                s, h = (int(x or 0) for x in r.hmget(key, "s", "h"))
                if h < 0:
                    raise InvariantViolation(f"{key}: negative held {h}")
                late = self.late[key]
                if s + h > caps[bid] + late:
                    raise InvariantViolation(f"{key}: settled {s} + held {h} > cap {caps[bid]}")
        finally:
            r.close()
        self.report.checks += 1

    # --------------------------------------------------------------- run
    async def run(self) -> Report:
        self.redis.workdir.mkdir(parents=True)
        self.redis.start()
        try:
            self.engines = [self._engine(0), self._engine(1)]
            self._new_writer()
            for step in range(self.steps):
                self.report.steps = step + 1
                x = self.rng.random()
                await self.walk(x, FAULTS)
                if step % 7 == 0:
                    self._drain_writer(3)
                self.check_budgets()
            await self.finish()
            return self.report
        finally:
            for eng in self.engines:
                await eng.store.close()
            self.redis.stop()

    async def walk(self, x: float, faults: Sequence[str]) -> None:
        """One step of the walk for the random draw ``x``: a fault from ``faults``
        (6 %), an Authorize, a retried one, a Closeout, a Void or a sweep."""
        if x < 0.06:
            await self.fault(self.rng.choice(faults))
        elif x < 0.45:
            self.report.ops["authorize"] += 1
            await self.op_authorize(retry=False)
        elif x < 0.55:
            self.report.ops["authorize_retry"] += 1
            await self.op_authorize(retry=True)
        elif x < 0.85:
            self.report.ops["closeout"] += 1
            await self.op_closeout()
        elif x < 0.93:
            self.report.ops["void"] += 1
            await self.op_void()
        else:
            self.report.ops["sweep"] += 1
            await self.op_sweep()

    async def finish(self) -> None:
        await asyncio.sleep(0.15)  # any pause is over
        for p in list(self.permits.values()):
            if p.state == "held":
                for _ in range(20):
                    if self.rng.random() < 0.5:
                        res = await self.engines[0].closeout(p.pid, self._usage(p), "SUCCEEDED",
                                                             None)
                        ok = res.status != "CLOSEOUT_STORE_UNAVAILABLE"
                    else:
                        v = await self.engines[0].void(p.pid, "end")
                        ok = v.status != "VOID_STORE_UNAVAILABLE"
                    if ok:
                        break
        for eng in self.engines:
            await eng.flush_outbox()
        self.check_no_unanswered_hold()
        await self.op_sweep(far=True)
        for eng in self.engines:
            await eng.flush_outbox()
            if eng.outbox_len:
                raise InvariantViolation("outbox not drained after recovery")
        self.check_budgets()
        self._drain_writer()
        self.check_terminal_and_ledger()

    def check_no_unanswered_hold(self) -> None:
        """No hold without an ALLOW answer: once every outbox is replayed, each permit
        record still holding was handed out by some answer."""
        r = self._sync()
        try:
            for raw in r.scan_iter(match=f"{PREFIX}:{{pdp}}:permit:*"):
                if r.hget(raw, "state") != b"held":
                    continue
                pid = raw.decode().rsplit(":", 1)[1]
                if pid not in self.permits:
                    raise InvariantViolation(f"{pid} holds but no answer gave it out")
        finally:
            r.close()
        self.report.checks += 1

    def check_not_aborted_after_handout(self, etype: str, pid: str,
                                        fields: dict[bytes, bytes]) -> None:
        """A hold that a replay handed out is the caller's: no abort may release it."""
        if etype == "void" and pid in self.handed_by_replay and \
                str(json.loads(fields[b"data"]).get("reason", "")).startswith("aborted"):
            raise InvariantViolation(f"{pid} was handed out by a replay, then aborted")

    def check_terminal_and_ledger(self) -> None:
        r = self._sync()
        try:
            if r.zcard(self.keys.expiries):
                raise InvariantViolation("holds left in the expiry set")
            windows = list(r.scan_iter(match=f"{PREFIX}:{{pdp}}:b:*"))
            for key in windows:
                if int(r.hget(key, "h") or 0) != 0:
                    raise InvariantViolation(f"{key.decode()}: held left at the end")
            for raw in r.scan_iter(match=f"{PREFIX}:{{pdp}}:permit:*"):
                state = (r.hget(raw, "state") or b"").decode()
                if state in ("denied", "aborted"):
                    continue  # a recorded denial's marker, an aborted decision's tombstone
                if state not in ("settled", "voided", "expired"):
                    raise InvariantViolation(f"{raw.decode()} ended in state {state!r}")
            entries = r.xrange(self.keys.stream)
            ids = [eid.decode() for eid, _ in entries]
            releases: Counter[str] = Counter()
            held: set[str] = set()
            settled_total = 0
            decisions: Counter[str] = Counter()
            for _, f in entries:
                etype = f[b"type"].decode()
                pid = f[b"pid"].decode()
                res = json.loads(f[b"res"])
                if etype == "decision":
                    decisions[pid] += 1
                    if decisions[pid] > 1:
                        raise InvariantViolation(f"{pid} has {decisions[pid]} decisions")
                if etype == "decision" and res.get("d") in ("ALLOW", "CONSTRAIN") and \
                        not res.get("degraded"):
                    held.add(pid)
                if etype in ("void", "expiry") or (etype == "settlement" and
                                                   res.get("prior") == "held"):
                    releases[pid] += 1
                if etype == "settlement":
                    settled_total += int(res["act"])
                self.check_not_aborted_after_handout(etype, pid, f)
            for pid in held:
                if releases[pid] != 1:
                    raise InvariantViolation(f"hold {pid} ended {releases[pid]} times")
            org = [k for k in windows if b":b:org:" in k]
            redis_total = sum(int(r.hget(k, "s") or 0) for k in org)
            if redis_total != settled_total:
                raise InvariantViolation(f"stream settled {settled_total} != Redis {redis_total}")
            dead = r.xlen(self.keys.stream + ":dead") if r.exists(
                self.keys.stream + ":dead") else 0
        finally:
            r.close()
        store = LedgerStore(self.ledger_url)
        rows = store.query("SELECT event_id, etype, res FROM ledger_events")
        stored = Counter(row[0] for row in rows)
        self.report.events = len(ids)
        self.report.ledger_events = len(rows)
        self.report.lost = len(set(ids) - set(stored))
        self.report.doubled = sum(n - 1 for n in stored.values())
        ledger_settled = sum(int(json.loads(row[2])["act"]) for row in rows
                             if row[1] == "settlement")
        store.close()
        if dead:
            raise InvariantViolation(f"{dead} events dead-lettered")
        if self.report.lost or self.report.doubled or len(rows) != len(ids):
            raise InvariantViolation(f"ledger lost {self.report.lost}, doubled "
                                     f"{self.report.doubled} of {len(ids)} events")
        if ledger_settled != settled_total:
            raise InvariantViolation(f"ledger settled {ledger_settled} != {settled_total}")


async def run_seed(seed: int, steps: int) -> Report:
    work = pathlib.Path(tempfile.mkdtemp(prefix=f"keel-sim-{seed}-"))
    try:
        return await Simulation(seed, steps, work).run()
    finally:
        shutil.rmtree(work, ignore_errors=True)


def summary(reports: list[Report]) -> dict[str, Any]:
    return {
        "seeds": len(reports),
        "steps": sum(r.steps for r in reports),
        "operations": sum(sum(r.ops.values()) for r in reports),
        "faults": sum(sum(r.faults.values()) for r in reports),
        "checks": sum(r.checks for r in reports),
        "events": sum(r.events for r in reports),
        "lost": sum(r.lost for r in reports),
        "doubled": sum(r.doubled for r in reports),
    }
