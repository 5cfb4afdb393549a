"""Seeded fault simulation, cluster mode: the same walk on a real Redis Cluster.

The walk of ``tests.simulation.harness`` (Authorize and its retries, Closeout
and its retries, Void, expiry sweeps, policy reload, sidecar kill, ledger-writer
kill, Redis pauses, dropped connections, SCRIPT FLUSH, a busy script) runs
against the local cluster of ``tests.integration.cluster_fixture`` (3 masters +
3 replicas) with a sharded key space (``shards`` hash tags spread over the
masters): two engines with the production cluster client, and a ledger writer
reading every shard's stream into SQLite. The policy has per-tenant budgets and
two budgets every tenant shares (a tight fail-closed one and a large fail-open
one), which a sharded key space enforces by escrow (leases).

Two cluster faults join the walk:

* ``migrate``: the slot of a shard in use moves to another master, a few keys
  at a time, while the walk goes on (MOVED and ASK under traffic). Nothing may
  go wrong beyond the client's transparent retries: every answer during the
  move is counted, and one that says the store was unavailable is a failure.
* ``failover`` (at most once per seed, and only when the seed asks for it): a
  master serving shards in use is killed with -9 and the walk goes on until its
  replica is promoted. Every answer in that time must come within its deadline
  (the budgets' fail modes decide). Afterwards the simulation's record of what
  was answered is compared with what the surviving nodes hold: permits, holds
  and settlements the dead master took with it are counted as lost (with
  ``wait_replicas`` = 1 none may be), and the killed node is restarted as a
  replica so the rest of the walk has its full cluster again.

Checked after every step: every per-tenant window's settled + held within its
cap (plus what the provider billed for holds that had already ended); every
shared budget's parent settled + held + leased within its cap, what its leases
were given within what the parent leased, and every lease's settled + held
within what it was given. At the end: every hold ended exactly once, no hold is
left, every entry of every shard's stream is in the ledger exactly once (event
id ``<tag>/<stream id>``) and the ledger's settled total equals the streams'
and Redis'. Events the ledger stored that the surviving nodes no longer hold
(written to the dead master, read by the writer, never replicated) are counted,
not hidden.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import pathlib
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis

from keel_pdp.budget.cluster import ClusterClient, key_slot
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore
from keel_pdp.decision import AuthorizeInput, Code, DecisionKind, Outcome
from keel_pdp.engine import CloseoutResult, Engine, VoidResult
from keel_pdp.ledger.commands import stream_client
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.ledger.writer import LedgerWriter, WriterConfig
from keel_pdp.metrics import Metrics
from keel_pdp.policy.loader import load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.pricing import TokenUsage
from tests.helpers import BUSY_LUA, budget, write_bundle
from tests.integration.cluster_fixture import RedisCluster
from tests.simulation.harness import TENANTS, InvariantViolation, Report, Simulation

CLUSTER_FAULTS = ("pause", "kill_conns", "script_flush", "migrate", "sidecar_kill",
                  "writer_kill", "policy_reload", "busy")
SHARED = ("org", "org-tight")  # budgets every tenant spends from: escrow
STORE_TIMEOUT_S = 0.1
DEADLINE_S = 0.25  # the caller's deadline for every call of the walk
# Event-loop and scheduling slack on a loaded 2-core machine.
DEADLINE_SLACK_S = 0.15
# A replica kept busy by a script reads nothing from its master meanwhile (well
# under the cluster's node timeout, so nobody marks it as failing).
STALL_MS = 300
STALL_LUA = "#!lua flags=no-writes\n" + BUSY_LUA.strip()


@dataclass
class ClusterReport(Report):
    shards: int = 0
    wait_replicas: int = 0
    migrations: int = 0
    keys_migrated: int = 0
    redirects: Counter[str] = field(default_factory=Counter)
    # Answers given while a slot moved, and how many said "store unavailable".
    migration_answers: int = 0
    migration_unavailable: int = 0
    migration_slow: int = 0  # of those, a node that did not answer within the timeout
    migrate_max_ms: float = 0.0  # the longest MIGRATE (the source blocks meanwhile)
    migration_window_max_ms: float = 0.0  # the longest time a slot stayed split
    failover_s: float = 0.0
    failover_answers: Counter[str] = field(default_factory=Counter)
    failover_slowest_ms: float = 0.0
    failover_slowest: str = ""
    lost_permits: int = 0  # answered holds the surviving nodes do not know
    lost_settlements: int = 0  # answered closeouts/voids rolled back by the failover
    ledger_only: int = 0  # in the ledger, gone from the surviving streams
    # Leased to shards beyond what the shared budget's parent still records (its
    # take was lost with the master): headroom that may be spent twice.
    unbacked_lease_micros: int = 0
    short_waits: int = 0  # WAITs answered by fewer replicas than asked, before the kill
    burst_short_waits: int = 0  # of those, in the burst answered just before the kill
    replica_stalled: bool = False
    refills: int = 0
    returns: int = 0

    def line(self) -> str:
        extra = (f"; cluster: {self.shards} shards, wait_replicas {self.wait_replicas}, "
                 f"{self.migrations} migrations ({self.keys_migrated} keys, "
                 f"{self.migration_answers} answers during them, "
                 f"{self.migration_unavailable} store-unavailable of which "
                 f"{self.migration_slow} a node's timeout, longest MIGRATE "
                 f"{self.migrate_max_ms:.0f} ms, longest split "
                 f"{self.migration_window_max_ms:.0f} ms), redirects "
                 f"{dict(self.redirects)}, escrow refills {self.refills} returns "
                 f"{self.returns}")
        if self.failover_s:
            extra += (f"; failover in {self.failover_s:.2f} s, answers during it "
                      f"{dict(self.failover_answers)}, slowest {self.failover_slowest_ms:.0f} ms "
                      f"({self.failover_slowest})"
                      f", lost permits {self.lost_permits}, lost settlements "
                      f"{self.lost_settlements}, ledger-only events {self.ledger_only}, "
                      f"unbacked lease {self.unbacked_lease_micros} micro-USD, "
                      f"short WAITs {self.short_waits} ({self.burst_short_waits} just before "
                      f"the kill), replica stalled {self.replica_stalled}")
        return super().line() + extra


def cluster_bundles(root: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """The single-node walk's budgets plus a tight budget every tenant shares."""
    common = [
        budget("org", "1000000", window="monthly", fail_mode="open"),
        budget("org-tight", "0.080000", window="monthly", scope={"workload": "chat"},
               fail_mode="closed"),
        budget("acme-daily", "0.050000", scope={"tenant": "acme"}, fail_mode="closed",
               thresholds=[50, 90]),
        budget("tenant-hourly", "0.030000", per=["tenant"], window="hourly",
               scope={"workload": "chat"}, fail_mode="closed"),
    ]
    settings = {"hold_ttl_seconds": 5, "min_output_tokens": 20}
    v1 = write_bundle(root / "v1", [*common, budget(
        "globex-open", "0.040000", scope={"tenant": "globex"}, fail_mode="open")],
        settings=settings, revision="sim-1")
    v2 = write_bundle(root / "v2", [*common, budget(
        "globex-open", "0.060000", scope={"tenant": "globex"}, fail_mode="open")],
        settings=settings, revision="sim-2")
    return v1, v2


def repair(cluster: RedisCluster) -> None:
    """Restart every killed node: it comes back empty and rejoins as a replica."""
    for node in cluster.nodes:
        if node.proc is None:
            node.start(cluster.binary)
    cluster.wait_ok(timeout_s=60, replicas=3)


def fail_mode_answer(req: AuthorizeInput) -> str:
    """What the budgets of ``cluster_bundles`` answer without the store: ALLOW only
    when every budget that applies fails open (org and globex-open do; org-tight,
    tenant-hourly (chat) and acme-daily fail closed)."""
    closed = req.workload == "chat" or req.tenant == "acme"
    return "DENY" if closed else "ALLOW"


class TimedEngine(Engine):
    """An engine whose every call carries the caller's deadline, and which records
    how long each answer took and whether it said "store unavailable"."""

    sim: ClusterSimulation

    def _note(self, started: float, unavailable: bool, what: str) -> None:
        self.sim.answered(time.monotonic() - started, unavailable, what)

    async def authorize(self, req: AuthorizeInput,
                        deadline_s: float | None = None) -> Outcome:
        started = time.monotonic()
        out = await super().authorize(req, DEADLINE_S if deadline_s is None else deadline_s)
        down = any(r.code is Code.STORE_UNAVAILABLE for r in out.reasons)
        kind = "ALLOW" if out.decision is not DecisionKind.DENY else "DENY"
        if down and kind != fail_mode_answer(req):
            raise InvariantViolation(f"{req.tenant}/{req.workload} answered {kind} without "
                                     f"the store; its budgets' fail modes say "
                                     f"{fail_mode_answer(req)}")
        self._note(started, down, f"authorize {'unavailable ' if down else ''}{kind}")
        return out

    async def closeout(self, permit_id: str, usage: TokenUsage, outcome: str,
                       provider_cost_micros: int | None,
                       deadline_s: float | None = None, *,
                       service_tier: str = "") -> CloseoutResult:
        started = time.monotonic()
        res = await super().closeout(permit_id, usage, outcome, provider_cost_micros,
                                     DEADLINE_S if deadline_s is None else deadline_s,
                                     service_tier=service_tier)
        self._note(started, res.status == "CLOSEOUT_STORE_UNAVAILABLE", f"closeout {res.status}")
        return res

    async def void(self, permit_id: str, reason: str = "",
                   deadline_s: float | None = None) -> VoidResult:
        started = time.monotonic()
        res = await super().void(permit_id, reason,
                                 DEADLINE_S if deadline_s is None else deadline_s)
        self._note(started, res.status == "VOID_STORE_UNAVAILABLE", f"void {res.status}")
        return res


class _Why(logging.Handler):
    """Keeps the engine's "store unavailable" log lines written while a slot moves,
    and every error it logs."""

    def __init__(self, sim: ClusterSimulation) -> None:
        super().__init__(logging.WARNING)
        self.sim = sim

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR:  # a client bug, not an outage: never expected
            self.sim._errors.append(f"{record.getMessage()[:200]} ({record.exc_text or ''})")
        elif self.sim._phase == "migrate" and "store unavailable" in record.getMessage():
            self.sim._why.append(record.getMessage()[:200])


class ClusterSimulation(Simulation):
    def __init__(self, seed: int, steps: int, workdir: pathlib.Path, cluster: RedisCluster,
                 *, shards: int = 8, wait_replicas: int = 0, failover: bool = False) -> None:
        super().__init__(seed, steps, workdir)
        self.cluster = cluster
        self.prefix = f"cs{seed}"
        self.keys = KeySpace(self.prefix, shards)
        self.wait_replicas = wait_replicas
        self.failover_planned = failover
        self.report = ClusterReport(seed, shards=shards, wait_replicas=wait_replicas)
        self.v1, self.v2 = cluster_bundles(workdir / "cbundles")
        self.bundle = self.v1
        caps: dict[str, int] = {}
        for b in (self.v1, self.v2):
            for bud in load_bundle(b).budgets:
                caps[bud.id] = max(caps.get(bud.id, 0), bud.limit_micros)
        self.caps = caps
        self._scanned_at: dict[int, str] = {}
        self.lost: dict[str, Any] = {}  # permits the failover took with it
        self._phase = ""  # "", "migrate" or "failover": what answers are counted for
        self._rc: Any = None
        self._retired: list[Engine] = []
        # A failover that may have lost acknowledged writes (no WAIT, or a short one).
        self._lossy = False
        self._why: list[str] = []  # why the store was unavailable while a slot moved
        self._errors: list[str] = []  # errors the engine logged (internal errors)
        self._log = _Why(self)

    # ------------------------------------------------------------ plumbing
    def answered(self, took_s: float, unavailable: bool, what: str) -> None:
        rep = self.report
        assert isinstance(rep, ClusterReport)
        if self._phase == "migrate":
            rep.migration_answers += 1
            rep.migration_unavailable += unavailable
        elif self._phase == "failover":
            rep.failover_answers[what] += 1
            if took_s * 1000 > rep.failover_slowest_ms:
                rep.failover_slowest_ms, rep.failover_slowest = took_s * 1000, what
        if took_s > DEADLINE_S + DEADLINE_SLACK_S:
            raise InvariantViolation(f"{what} answered after {took_s * 1000:.0f} ms, past the "
                                     f"{DEADLINE_S * 1000:.0f} ms deadline (phase "
                                     f"{self._phase or 'walk'!r}, step {rep.steps})")

    def _engine(self, i: int) -> Engine:
        holder = PolicyHolder(self.bundle)
        holder.set(load_bundle(self.bundle))
        # The two sidecars write different idempotency records formats (each reads
        # both), as while `keel-pdp records --upgrade` reaches a fleet.
        store = BudgetStore.from_url(self.cluster.url, prefix=self.prefix,
                                     timeout_s=STORE_TIMEOUT_S, shards=self.keys.shards,
                                     wait_replicas=self.wait_replicas,
                                     records=1 + (self.seed + i) % 2)
        eng = TimedEngine(holder, store, Metrics(), outbox_dir=str(self.work / f"outbox-{i}"),
                          lease_idle_s=0.5)
        eng.sim = self
        if len(self.engines) > i:
            self._retired.append(self.engines[i])
        return eng

    def _new_writer(self) -> None:
        self._writer_n += 1
        store = LedgerStore(self.ledger_url)
        store.migrate()
        cfg = WriterConfig(key_prefix=self.prefix, consumer=f"w{self._writer_n}",
                           batch_size=50, block_ms=1, claim_idle_ms=50, claim_interval_s=0.0,
                           trim=False, backoff_initial_s=0.01, backoff_max_s=0.05,
                           shards=self.keys.shards)
        self.writer = LedgerWriter(cfg, store, stream_client(self.cluster.url,
                                                             socket_timeout=2))

    def _drain_writer(self, max_rounds: int = 10_000) -> None:
        assert self.writer is not None
        idle = 0
        for _ in range(max_rounds):
            try:
                n = self.writer.step()
            except (redis.RedisError, IndexError, KeyError):
                # redis-py's cluster client between a failover and its new map
                time.sleep(0.05)
                n = 0
            idle = idle + 1 if n == 0 else 0
            if idle >= 3:
                return

    def _sync(self) -> Any:
        """A cluster client (follows MOVED/ASK) for reads of single keys."""
        if self._rc is None:
            self._rc = stream_client(self.cluster.url, socket_timeout=5)
        return self._rc

    def _scan(self, pattern: str) -> list[str]:
        found: set[str] = set()
        for port in self.cluster.masters():
            for raw in self.cluster.admin(port).scan_iter(match=pattern, count=1000):
                found.add(raw.decode())
        return sorted(found)

    def _figures(self, key: str, *fields: str) -> list[int]:
        raw = self._sync().hmget(key, *fields)
        return [int(x or 0) for x in raw]

    # -------------------------------------------------------------- faults
    async def fault(self, kind: str) -> None:
        self.report.faults[kind] += 1
        masters = self.cluster.masters()
        one = self.cluster.admin(self.rng.choice(masters))
        if kind == "pause":
            one.execute_command("CLIENT", "PAUSE", "120", "ALL")  # type: ignore[no-untyped-call]
        elif kind == "kill_conns":
            for port in masters:
                self.cluster.admin(port).execute_command(  # type: ignore[no-untyped-call]
                    "CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
            self._reset_sync()
        elif kind == "script_flush":
            for port in masters:
                self.cluster.admin(port).script_flush()
        elif kind == "migrate":
            await self.migrate()
        elif kind == "failover":
            await self.failover()
        elif not await self.shared_fault(
                kind, lambda: redis.Redis(port=self.rng.choice(masters), socket_timeout=5)):
            raise ValueError(kind)

    def _reset_sync(self) -> None:
        if self._rc is not None:
            self._rc.close()
            self._rc = None

    async def _random_op(self) -> None:
        x = self.rng.random()
        if x < 0.5:
            await self.op_authorize(retry=x < 0.1)
        elif x < 0.85:
            await self.op_closeout()
        else:
            await self.op_void()

    async def op_closeout(self) -> None:
        if not (self._phase == "failover" and self._lossy):
            await super().op_closeout()
            return
        # A failover that may have lost writes is under way: a permit or settlement
        # the dead master took with it shows up here first (UNKNOWN_PERMIT, or a
        # settled permit settling again). Counted as lost; anything else as usual.
        rep = self.report
        assert isinstance(rep, ClusterReport)
        if not self.permits:
            return
        p = self.rng.choice(list(self.permits.values()))
        res = await self.rng.choice(self.engines).closeout(p.pid, self._usage(p), "SUCCEEDED",
                                                            None)
        if res.status == "UNKNOWN_PERMIT" and not p.degraded:
            rep.lost_permits += 1
            rep.lost_settlements += p.state in ("settled", "voided")
            self.lost[p.pid] = self.permits.pop(p.pid)
        elif res.status in ("SETTLED", "SETTLED_AFTER_EXPIRY", "SETTLED_AFTER_VOID",
                            "ALREADY_SETTLED"):
            if p.state == "settled" and res.status != "ALREADY_SETTLED":
                rep.lost_settlements += 1
            elif p.state == "settled" and res.actual_cost_micros != p.actual:
                raise InvariantViolation(f"closeout retry of {p.pid}: {res}")
            p.state, p.actual = "settled", res.actual_cost_micros
        elif res.status not in ("CLOSEOUT_STORE_UNAVAILABLE", "CLOSEOUT_PERMIT_PENDING"):
            raise InvariantViolation(f"closeout of {p.pid}: {res.status}")

    async def migrate(self) -> None:
        """Move the slot of a tenant's shard to another master while the walk goes on,
        as docs/redis-cluster.md advises: SETSLOT MIGRATING, the slot's keys in one
        MIGRATE batch, SETSLOT NODE, within a few milliseconds. Calls that reach the
        slot meanwhile see ASK and TRYAGAIN (a multi-key script whose keys are not
        all on one node waits until the slot is settled), then MOVED on the old map."""
        rep = self.report
        assert isinstance(rep, ClusterReport)
        tenant = self.rng.choice(TENANTS)
        slot = key_slot("{" + self.keys.tags[self.keys.tenant_shard(tenant)] + "}")
        source = self.cluster.owner(slot)
        target = self.rng.choice([m for m in self.cluster.masters() if m != source])
        src, dst = self.cluster.node_id(source), self.cluster.node_id(target)
        pauses = [self.rng.uniform(0.002, 0.02) for _ in range(2)]
        window = [0.0, 0.0]  # from SETSLOT MIGRATING to the last SETSLOT NODE
        done = asyncio.Event()

        async def move() -> None:
            # The admin commands run in a thread: the sidecars' calls go on meanwhile.
            def cmd(port: int, *args: str | int) -> Any:
                return asyncio.to_thread(self.cluster.cmd, port, *args)

            try:
                await cmd(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", src)
                await cmd(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", dst)
                window[0] = time.monotonic()
                await asyncio.sleep(pauses[0])
                while True:
                    keys = await cmd(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
                    if not keys:
                        break
                    began = time.monotonic()
                    await cmd(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS",
                              *keys)
                    rep.migrate_max_ms = max(rep.migrate_max_ms,
                                             (time.monotonic() - began) * 1000)
                    rep.keys_migrated += len(keys)
                await asyncio.sleep(pauses[1])
                for port in (target, source,
                             *(m for m in self.cluster.masters() if m not in (source, target))):
                    await cmd(port, "CLUSTER", "SETSLOT", slot, "NODE", dst)
                window[1] = time.monotonic()
            finally:
                done.set()

        # A connection an earlier fault killed fails the first call written on it
        # (written, then lost: never re-sent); let that happen before, not during,
        # the move, which is not what this fault is about.
        for eng in self.engines:
            transport = eng.store.transport
            if isinstance(transport, ClusterClient):
                with contextlib.suppress(Exception):
                    await transport.on_every_master("PING", timeout_s=1.0)
        self._phase = "migrate"
        engine_log = logging.getLogger("keel_pdp.engine")
        level = engine_log.level
        engine_log.setLevel(logging.WARNING)  # why an answer said "store unavailable"
        mover = asyncio.ensure_future(move())
        try:
            while not done.is_set():
                await self._random_op()  # one walk step after another while it moves
                await asyncio.sleep(0)
            for _ in range(3):  # the sidecars' maps still name the source: MOVED
                await self._random_op()
        finally:
            self._phase = ""
            engine_log.setLevel(level)
            await mover
        rep.migrations += 1
        # A node that does not answer within the store timeout (MIGRATE blocks the
        # source while it copies; a loaded machine), or a TRYAGAIN past the deadline
        # while the slot stayed split for longer than a call may wait, is counted.
        # Anything else that made an answer fail while the slot moved (a redirect
        # not followed, TRYAGAIN past the deadline of a short move, a cross-slot
        # refusal) breaks the walk.
        split_s = window[1] - window[0]
        rep.migration_window_max_ms = max(rep.migration_window_max_ms, split_s * 1000)
        slow = [w for w in self._why if "did not answer within" in w or (
            "TRYAGAIN" in w and split_s >= STORE_TIMEOUT_S)]
        rep.migration_slow += len(slow)
        other = [w for w in self._why if w not in slow]
        self._why.clear()
        # (An answer counted as unavailable without a store failure logged: the
        # Void of a fail-open permit whose record the outbox has not replayed yet,
        # which answers VOID_STORE_UNAVAILABLE, "retry"; not the move's doing.)
        if other:
            raise InvariantViolation(f"{rep.migration_unavailable} answers said the store was "
                                     f"unavailable while a slot moved: {other[-3:]}")
        if self.cluster.owner(slot) != target:
            raise InvariantViolation(f"slot {slot} did not move to {target}")
        if self.cluster.cmd(source, "CLUSTER", "COUNTKEYSINSLOT", slot):
            raise InvariantViolation(f"keys of slot {slot} were left on {source}")
        self._reset_sync()

    async def failover(self) -> None:
        """kill -9 a master serving a shard in use; walk on until its replica serves;
        count what the surviving nodes lost; restart the node as a replica."""
        rep = self.report
        assert isinstance(rep, ClusterReport)
        tenant = self.rng.choice(TENANTS)
        slot = key_slot("{" + self.keys.tags[self.keys.tenant_shard(tenant)] + "}")
        victim = self.cluster.owner(slot)
        heir = self.cluster.replica_of(victim)
        rep.short_waits = sum(e.store.short_waits for e in [*self.engines, *self._retired])
        self._phase = "failover"
        # Half the time the replication link is down when the master dies: a
        # read-only script keeps the replica busy (it cannot reconnect) and the
        # master drops its link, so what the burst below writes reaches no replica.
        # (With the link up, nothing is lost on loopback: what the master wrote to
        # the socket before it died is still read by the replica.)
        stall: Any = None
        if self.rng.random() < 0.5:
            rep.replica_stalled = True
            staller = redis.Redis(port=heir, socket_timeout=5)
            stall = asyncio.get_running_loop().run_in_executor(
                None, lambda: staller.eval(STALL_LUA, 0, STALL_MS))
            await asyncio.sleep(0.02)
            self.cluster.cmd(victim, "CLIENT", "KILL", "TYPE", "replica")
        # A burst of calls answered just before the master dies: writes its replica
        # may not have (unless each one WAITed for it).
        burst_started = time.monotonic()
        for _ in range(self.rng.randrange(5, 20)):
            await self._random_op()
            if time.monotonic() - burst_started > STALL_MS / 2000:
                break
        short_before = rep.short_waits
        rep.short_waits = sum(e.store.short_waits for e in [*self.engines, *self._retired])
        rep.burst_short_waits = rep.short_waits - short_before
        self._lossy = self.wait_replicas == 0 or rep.short_waits > 0
        self.cluster.node(victim).kill()
        killed = time.monotonic()
        try:
            if stall is not None:
                await stall
                staller.close()
            while time.monotonic() - killed < 30:
                await self._random_op()
                await asyncio.sleep(0.01)
                if self._serves(slot, heir):
                    break
            else:
                raise InvariantViolation("the replica was not promoted within 30 s")
            rep.failover_s = time.monotonic() - killed
            for _ in range(5):  # the first answers from the new master
                await self._random_op()
        except BaseException:
            repair(self.cluster)
            raise
        finally:
            self._phase = ""
        try:
            self.cluster.wait_ok(replicas=2)
            self._reset_sync()
            self._count_lost()
        finally:
            repair(self.cluster)
        self._reset_sync()

    def _serves(self, slot: int, heir: int) -> bool:
        try:
            info = self.cluster.cmd(heir, "CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            return "cluster_state:ok" in text and self.cluster.owner(slot) == heir
        except (redis.RedisError, LookupError):
            return False

    def _count_lost(self) -> None:
        """Compare what was answered with what the surviving nodes hold."""
        rep = self.report
        assert isinstance(rep, ClusterReport)
        r = self._sync()
        for pid, p in list(self.permits.items()):
            if p.degraded:
                continue  # journaled in an outbox, not in Redis until replayed
            state = r.hget(self.keys.permit(pid), "state")
            if state is None:
                rep.lost_permits += 1
                rep.lost_settlements += p.state in ("settled", "voided")
                self.lost[pid] = self.permits.pop(pid)
            elif p.state in ("settled", "voided") and state.decode() != p.state:
                # The closeout or void was lost; the surviving node knows the state
                # before it (held, expired, or voided before a lost settlement).
                rep.lost_settlements += 1
                p.state = "voided" if state == b"voided" else "held"
        for eng in [*self.engines, *self._retired]:
            eng._permits = type(eng._permits)(100_000)  # what it cached may be gone

    # ---------------------------------------------------------- invariants
    def _scan_late(self, r: Any) -> None:
        for shard, stream in enumerate(self.keys.streams):
            last = self._scanned_at.get(shard)
            start = "-" if last is None else "(" + last
            for eid, f in r.xrange(stream, start, "+"):
                self._scanned_at[shard] = eid.decode()
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
        """Per-tenant windows: settled + held <= cap (+ what was billed after a hold
        ended). Shared budgets: the parent's settled + held + leased <= cap, its
        leases given no more than it leased, each lease's use within its grant."""
        if self._errors:
            raise InvariantViolation(f"the engine logged errors: {self._errors[:3]}")
        r = self._sync()
        self._scan_late(r)
        given: Counter[str] = Counter()
        # What leases booked after a hold had ended is charged to their parent
        # (escrow's debt): the parent may pass its cap by that much, as a window does.
        late_in_leases: Counter[str] = Counter()
        for key in self._scan(f"{self.prefix}:*:l:*"):
            g, s, h, parent = r.hmget(key, "g", "s", "h", "p")
            g, s, h = int(g or 0), int(s or 0), int(h or 0)
            if h < 0 or g < 0:
                raise InvariantViolation(f"{key}: negative figures g {g} h {h}")
            if s + h > g + self.late[key]:
                raise InvariantViolation(f"{key}: lease settled {s} + held {h} > given {g}")
            if parent is not None:
                given[parent.decode()] += g
                late_in_leases[parent.decode()] += self.late[key]
        for key in self._scan(f"{self.prefix}:*:b:*"):
            bid = key.split(":b:", 1)[1].split(":", 1)[0]
            s, h, leased = self._figures(key, "s", "h", "l")
            if h < 0 or leased < 0:
                raise InvariantViolation(f"{key}: negative held {h} or leased {leased}")
            cap = self.caps[bid]
            if s + h + leased > cap + self.late[key] + late_in_leases[key]:
                raise InvariantViolation(f"{key}: settled {s} + held {h} + leased {leased} > "
                                         f"cap {cap}")
            if bid in SHARED and given[key] > leased:
                if not self._lossy:
                    raise InvariantViolation(f"{key}: leases were given {given[key]} > "
                                             f"leased {leased}")
                rep = self.report
                assert isinstance(rep, ClusterReport)
                rep.unbacked_lease_micros = max(rep.unbacked_lease_micros,
                                                given[key] - leased)
        self.report.checks += 1

    def check_no_unanswered_hold(self) -> None:
        r = self._sync()
        for key in self._scan(f"{self.prefix}:*:permit:*"):
            if r.hget(key, "state") != b"held":
                continue
            pid = key.rsplit(":", 1)[1]
            if pid not in self.permits:
                raise InvariantViolation(f"{pid} holds but no answer gave it out")
        self.report.checks += 1

    def check_terminal_and_ledger(self) -> None:
        rep = self.report
        assert isinstance(rep, ClusterReport)
        r = self._sync()
        for zset in self.keys.expiry_sets:
            if r.zcard(zset):
                raise InvariantViolation(f"holds left in {zset}")
        for key in self._scan(f"{self.prefix}:*:b:*") + self._scan(f"{self.prefix}:*:l:*"):
            if int(r.hget(key, "h") or 0) != 0:
                raise InvariantViolation(f"{key}: held left at the end")
        for key in self._scan(f"{self.prefix}:*:permit:*"):
            state = (r.hget(key, "state") or b"").decode()
            if state in ("denied", "aborted"):
                continue
            if state not in ("settled", "voided", "expired"):
                raise InvariantViolation(f"{key} ended in state {state!r}")
        ids: list[str] = []
        releases: Counter[str] = Counter()
        held: set[str] = set()
        decisions: Counter[str] = Counter()
        settled_total = 0
        dead = 0
        for tag, stream in zip(self.keys.tags, self.keys.streams, strict=True):
            for eid, f in r.xrange(stream):
                ids.append(f"{tag}/{eid.decode()}")
                etype = f[b"type"].decode()
                if etype == "lease":
                    continue
                pid = f[b"pid"].decode()
                res = json.loads(f[b"res"])
                if etype == "decision":
                    decisions[pid] += 1
                    if decisions[pid] > 1:
                        raise InvariantViolation(f"{pid} has {decisions[pid]} decisions")
                    if res.get("d") in ("ALLOW", "CONSTRAIN") and not res.get("degraded"):
                        held.add(pid)
                if etype in ("void", "expiry") or (etype == "settlement" and
                                                   res.get("prior") == "held"):
                    releases[pid] += 1
                if etype == "settlement":
                    settled_total += int(res["act"])
                self.check_not_aborted_after_handout(etype, pid, f)
            if r.exists(stream + ":dead"):
                dead += r.xlen(stream + ":dead")
        for pid in held:
            if releases[pid] != 1:
                raise InvariantViolation(f"hold {pid} ended {releases[pid]} times")
        org = self._scan(f"{self.prefix}:*:b:org:*") + self._scan(f"{self.prefix}:*:l:org:*")
        redis_total = sum(int(r.hget(k, "s") or 0) for k in org)
        if redis_total != settled_total:
            raise InvariantViolation(f"streams settled {settled_total} != Redis {redis_total}")
        store = LedgerStore(self.ledger_url)
        rows = store.query("SELECT event_id, etype, res FROM ledger_events")
        store.close()
        stored = Counter(row[0] for row in rows)
        in_streams = set(ids)
        rep.events = len(ids)
        rep.ledger_events = sum(1 for row in rows if row[0] in in_streams)
        rep.lost = len(in_streams - set(stored))
        rep.doubled = sum(n - 1 for n in stored.values())
        rep.ledger_only = len(set(stored) - in_streams)
        ledger_settled = sum(int(json.loads(row[2])["act"]) for row in rows
                             if row[1] == "settlement" and row[0] in in_streams)
        if dead:
            raise InvariantViolation(f"{dead} events dead-lettered")
        if rep.lost or rep.doubled or rep.ledger_events != len(ids):
            raise InvariantViolation(f"ledger lost {rep.lost}, doubled {rep.doubled} of "
                                     f"{len(ids)} events")
        if ledger_settled != settled_total:
            raise InvariantViolation(f"ledger settled {ledger_settled} != {settled_total}")
        if rep.ledger_only and not rep.failover_s:
            raise InvariantViolation(f"{rep.ledger_only} ledger events are in no stream")
        if self.wait_replicas and rep.lost_permits + rep.lost_settlements > rep.short_waits:
            # Only an answer whose WAIT came back short may be lost with its master.
            raise InvariantViolation(
                f"with WAIT for a replica the failover lost {rep.lost_permits} permits and "
                f"{rep.lost_settlements} settlements, more than the {rep.short_waits} short "
                f"WAITs")

    # --------------------------------------------------------------- run
    async def run(self) -> Report:
        rep = self.report
        assert isinstance(rep, ClusterReport)
        for port in self.cluster.masters():
            self.cluster.admin(port).flushall()
        failover_at = self.rng.randrange(self.steps // 4, self.steps * 3 // 4) \
            if self.failover_planned else -1
        engine_log = logging.getLogger("keel_pdp.engine")
        engine_log.addHandler(self._log)
        try:
            self.engines = [self._engine(0), self._engine(1)]
            self._new_writer()
            for step in range(self.steps):
                self.report.steps = step + 1
                x = self.rng.random()
                if step == failover_at:
                    await self.fault("failover")
                else:
                    await self.walk(x, CLUSTER_FAULTS)
                if step % 7 == 0:
                    self._drain_writer(3)
                self.check_budgets()
            await self.finish()
            for eng in [*self.engines, *self._retired]:
                rep.redirects.update(getattr(eng.store.transport, "redirects", {}))
                rep.refills += eng.escrow.refills
                rep.returns += eng.escrow.returns
            return self.report
        finally:
            engine_log.removeHandler(self._log)
            for eng in [*self.engines, *self._retired]:
                await eng.store.close()
            self._reset_sync()


async def run_cluster_seed(cluster: RedisCluster, seed: int, steps: int, *, shards: int = 8,
                           wait_replicas: int = 0, failover: bool = False) -> ClusterReport:
    work = pathlib.Path(tempfile.mkdtemp(prefix=f"keel-csim-{seed}-"))
    try:
        sim = ClusterSimulation(seed, steps, work, cluster, shards=shards,
                                wait_replicas=wait_replicas, failover=failover)
        rep = await sim.run()
        assert isinstance(rep, ClusterReport)
        return rep
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cluster_summary(reports: list[ClusterReport]) -> dict[str, Any]:
    return {
        "migrations": sum(r.migrations for r in reports),
        "keys_migrated": sum(r.keys_migrated for r in reports),
        "migration_answers": sum(r.migration_answers for r in reports),
        "migration_unavailable": sum(r.migration_unavailable for r in reports),
        "migration_slow": sum(r.migration_slow for r in reports),
        "migrate_max_ms": round(max((r.migrate_max_ms for r in reports), default=0), 1),
        "migration_window_max_ms": round(max((r.migration_window_max_ms for r in reports),
                                             default=0), 1),
        "failovers": sum(1 for r in reports if r.failover_s),
        "lost_permits": sum(r.lost_permits for r in reports),
        "lost_settlements": sum(r.lost_settlements for r in reports),
        "ledger_only": sum(r.ledger_only for r in reports),
        "unbacked_lease_micros": sum(r.unbacked_lease_micros for r in reports),
        "short_waits": sum(r.short_waits for r in reports),
        "escrow_refills": sum(r.refills for r in reports),
        "escrow_returns": sum(r.returns for r in reports),
    }


__all__ = ["ClusterReport", "ClusterSimulation", "cluster_summary", "run_cluster_seed"]
