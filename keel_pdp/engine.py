"""Authorize, Closeout and Void: policy snapshot + pure decision + budget store.

The engine owns the deadline arithmetic, the fail-mode path, the outbox of
events taken while the store was unreachable, the local permit cache that
lets Closeout and Void take one round trip, and the expiry sweeper.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

from keel_pdp import caller
from keel_pdp import decision as dec
from keel_pdp.budget.keys import PERMIT_ID_RE, KeySpace
from keel_pdp.budget.replies import SettleReply
from keel_pdp.budget.resp import Shared
from keel_pdp.budget.store import (
    BudgetStore,
    DegradedPermit,
    HoldCandidate,
    HoldRequest,
    StoreUnavailable,
    hold_shape,
)
from keel_pdp.decision import AuthorizeInput, InvalidRequest, Outcome
from keel_pdp.metrics import Metrics
from keel_pdp.outbox import Outbox
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.policy.snapshot import ModelPrice
from keel_pdp.pricing import Price, TokenUsage, usage_cost_micros

log = logging.getLogger("keel_pdp.engine")

# Time kept back from the caller's deadline to build and send the answer.
DEADLINE_MARGIN_S = 0.002
MAX_PROVIDER_COST_MICROS = 10**12
OUTCOMES = ("OUTCOME_UNSPECIFIED", "SUCCEEDED", "FAILED", "CANCELLED", "PARTIAL")


# The overrun rule (README "Overruns"): a Closeout whose cost is above
# OVERRUN_FACTOR x the permit's estimate + OVERRUN_SLACK_MICROS is impossible for
# the permit and books nothing (INVALID_ARGUMENT naming the field).
OVERRUN_FACTOR = 4
OVERRUN_SLACK_MICROS = 50_000
# How long after issue a degraded permit that the store does not know yet answers
# CLOSEOUT_PERMIT_PENDING (retry) instead of UNKNOWN_PERMIT: its issuing sidecar
# journals it into Redis once the store answers again (or its journal is replayed
# by the next process after a restart).
DEGRADED_PENDING_MS = 3_600_000


@dataclass(slots=True)
class CachedPermit:
    keys: tuple[str, ...]
    meta: dict[str, object]
    degraded: bool = False
    expire_at_s: tuple[int, ...] = ()
    idempotency_key: str = ""


@dataclass(slots=True)
class CloseoutResult:
    status: str
    actual_cost_micros: int = 0
    estimated_cost_micros: int = 0
    correction_micros: int = 0
    held_micros: int = 0
    priced_cost_micros: int = 0
    flags: tuple[str, ...] = ()


@dataclass(slots=True)
class VoidResult:
    status: str
    released_micros: int = 0
    state: str = ""


def _meta_head(tenant: str, workload: str, mp: ModelPrice) -> str:
    """The permit record's metadata up to its timestamp: ``head + str(now) + "}"``."""
    def row(p: Price) -> list[int]:
        return [p.input, p.cached_input, p.cache_write, p.output]

    meta: dict[str, object] = {"t": tenant, "w": workload, "m": mp.model, "p": mp.provider,
                               "price": row(mp.price)}
    if mp.tiers:
        meta["tiers"] = [[above, *row(price)] for above, price in mp.tiers]
    return json.dumps(meta, separators=(",", ":"))[:-1] + ',"ts":'


@dataclass(frozen=True, slots=True)
class _Material:
    """What a shape means to this engine's budget store, derived once per shape."""

    keyspace: KeySpace
    window_keys: tuple[str, ...]
    wexp: tuple[int, ...]
    shared: Shared  # the authorize script's KEYS and ARGV common to the shape
    meta_heads: tuple[str, ...]  # per candidate


def _material(shape: dec.Shape, keyspace: KeySpace) -> _Material:
    m = shape.material
    if isinstance(m, _Material) and m.keyspace is keyspace:
        return m
    targets = shape.targets
    settings = shape.snapshot.settings
    observe = shape.route_mode == "observe"
    wexp = tuple(t.window_end_ms // 1000 + settings.permit_retention_seconds for t in targets)
    window_keys = tuple(keyspace.window(t.budget.id, t.split, t.window_start_ms)
                        for t in targets)
    m = _Material(
        keyspace, window_keys, wexp,
        hold_shape(
            window_keys, [keyspace.grants(t.budget.id, t.split) for t in targets],
            [t.budget.limit_micros for t in targets],
            # Under an observe-mode routing rule nothing blocks; the script then
            # reports the budgets that would have (shadow).
            [t.budget.enforce and not observe for t in targets], wexp,
            [t.budget.thresholds for t in targets],
            idempotency_ttl_s=settings.idempotency_ttl_seconds,
            permit_retention_s=settings.permit_retention_seconds,
            min_output_tokens=settings.min_output_tokens),
        tuple(_meta_head(shape.tenant, shape.workload, mp) for mp in shape.prices))
    shape.material = m
    return m


def _meta_price(meta: dict[str, object], input_tokens: int) -> Price:
    """The rate the permit's model had when it was issued, for this input size.

    A record without a price (written by an older version for a fail-open
    settlement) prices at zero: such a permit is settled already, and the
    closeout script answers with the booked figures.
    """
    base = meta.get("price")
    if not isinstance(base, list):
        return Price(0, 0, 0, 0)
    tiers = meta.get("tiers") or []
    assert isinstance(tiers, list)
    issued = ModelPrice("", "", Price(*[int(x) for x in base]), 0, tiers=tuple(
        (int(t[0]), Price(*[int(x) for x in t[1:5]])) for t in tiers))
    return issued.for_input(input_tokens)


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


class Engine:
    def __init__(self, policies: PolicyHolder, store: BudgetStore, metrics: Metrics, *,
                 permit_cache_size: int = 100_000, outbox_size: int = 100_000,
                 outbox_dir: str | None = None) -> None:
        self.policies = policies
        self.store = store
        self.metrics = metrics
        # Compact entries (strings and a bool only): the garbage collector stops
        # tracking them, so a full cache does not lengthen collection pauses. An
        # OrderedDict evicts its oldest entry in O(1).
        self._permits: OrderedDict[str, tuple[str, str, bool, str, str]] = OrderedDict()
        self._permit_cache_size = permit_cache_size
        self._outbox = Outbox(outbox_size, outbox_dir)
        self._flush_task: asyncio.Task[int] | None = None
        self._hold_latency = metrics.store_latency.labels("authorize")
        self._flush_lock = asyncio.Lock()

    # ----------------------------------------------------------------- helpers
    def _budget(self, deadline_s: float | None) -> float | None:
        if deadline_s is None:
            return None
        return deadline_s - DEADLINE_MARGIN_S

    def _remember(self, pid: str, keys: tuple[str, ...], meta_json: str,
                  degraded: bool = False, wexp: tuple[int, ...] = (), ik: str = "") -> None:
        self._permits[pid] = ("\n".join(keys), meta_json, degraded,
                              ",".join(str(w) for w in wexp), ik)
        if len(self._permits) > self._permit_cache_size:
            self._permits.popitem(last=False)  # the oldest

    def _cached(self, pid: str) -> CachedPermit | None:
        entry = self._permits.get(pid)
        if entry is None:
            return None
        keys, meta, degraded, wexp, ik = entry
        return CachedPermit(tuple(keys.split("\n")) if keys else (), json.loads(meta), degraded,
                            tuple(int(w) for w in wexp.split(",")) if wexp else (), ik)

    def _enqueue(self, etype: str, pid: str, ts: int, data: str, res: str,
                 spec: str = "") -> None:
        before = self._outbox.dropped
        self._outbox.append((etype, pid, ts, data, res, spec))
        if self._outbox.dropped != before:
            self.metrics.outbox_dropped.inc()
        self.metrics.outbox.set(len(self._outbox))

    async def flush_outbox(self) -> int:
        """Append events decided while the store was unreachable; returns how many."""
        done = 0
        async with self._flush_lock:
            while self._outbox:
                etype, pid, ts, data, res, spec = self._outbox.peek()
                try:
                    await self._replay_one(etype, pid, ts, data, res, spec)
                except StoreUnavailable:
                    break
                self._outbox.pop()
                done += 1
            if done:
                self._outbox.sync()
            self.metrics.outbox.set(len(self._outbox))
        return done

    async def _replay_one(self, etype: str, pid: str, ts: int, data: str, res: str,
                          spec: str) -> None:
        """One outbox entry into the store; each kind is idempotent there, so an entry
        whose earlier attempt ran but lost its reply is not applied twice."""
        extra = json.loads(spec) if spec else {}
        if etype == "abort":
            out = await self.store.abort(pid, str(extra["ik"]), list(extra["keys"]), ts, data,
                                         timeout_s=1.0)
            self.metrics.child(self.metrics.holds_aborted, out.status.lower()).inc()
            return
        degraded = None
        if extra:
            degraded = DegradedPermit(
                tuple(extra["keys"]), tuple(int(w) for w in extra["wx"]), str(extra["meta"]),
                int(extra["est"]), int(extra["k"]), int(extra["exp"]), int(extra["ret"]))
        await self.store.record(etype, pid, ts, data, res, timeout_s=1.0, degraded=degraded)

    def _abort_later(self, p: dec.Plan, mat: _Material, ik: str) -> None:
        """Undo the hold the authorize script may still make for ``p`` (its reply is
        lost): journaled first, sent at once (abort.lua; either order is safe)."""
        data = json.dumps({"v": 1, "now": p.now_ms,
                           "reason": "aborted: the answer to this Authorize was not the "
                                     "store's (store timeout or error)"},
                          separators=(",", ":"))
        self._enqueue("abort", p.permit_id, p.now_ms, data, "",
                      json.dumps({"ik": ik, "keys": list(mat.window_keys)},
                                 separators=(",", ":")))
        self._kick_flush()

    def _kick_flush(self) -> None:
        if self._outbox and (self._flush_task is None or self._flush_task.done()):
            self._flush_task = asyncio.get_running_loop().create_task(self.flush_outbox())

    @property
    def outbox_len(self) -> int:
        return len(self._outbox)

    def _count(self, out: Outcome) -> Outcome:
        self.metrics.child(self.metrics.decisions, str(out.decision), out.primary_code).inc()
        return out

    # --------------------------------------------------------------- authorize
    def prepare_hold(self, p: dec.Plan, data: str) -> tuple[HoldRequest, _Material, list[str]]:
        """The hold script's request for plan ``p`` (no I/O); also the shape's
        store material and each candidate's permit metadata."""
        assert p.shape is not None
        req = p.request
        mat = _material(p.shape, self.store.keys)
        stamp = f'{p.now_ms},"ein":{req.estimated_input_tokens}}}'
        metas = [head + stamp for head in mat.meta_heads]
        hold = HoldRequest(
            p.permit_id, self.store.keys.idempotency(req.tenant, req.request_id),
            p.fingerprint, p.now_ms, p.expires_at_ms, data, mat.shared,
            tuple(
                HoldCandidate(req.estimated_input_tokens * c.rate.input, c.rate.output,
                              c.output_tokens, c.may_constrain, meta, c.target_idx)
                for c, meta in zip(p.candidates, metas, strict=True)))
        return hold, mat, metas

    async def authorize(self, req: AuthorizeInput, deadline_s: float | None = None) -> Outcome:
        dec.validate(req)
        now = _now_ms()
        snapshot = self.policies.current
        if snapshot is None:
            return self._count(dec.not_loaded(req, dec.new_permit_id(now)))
        p = dec.plan(snapshot, req, now)
        data = dec.event_data(p)
        budget = self._budget(deadline_s)
        if p.denial:
            out = dec.denied_by_policy(p)
            await self._record_denial(p, data, budget)
            return self._count(out)
        hold, mat, metas = self.prepare_hold(p, data)
        keys, wexp = mat.window_keys, mat.wexp
        first = p.candidates[0].target_idx
        if budget is not None and budget <= 0.0005:
            out = dec.without_store(p, dec.Code.DEADLINE_TOO_SHORT)
            self._record_degraded(p, data, out, tuple(keys[i] for i in first),
                                  tuple(wexp[i] for i in first), metas[0])
            return self._count(out)
        t0 = time.perf_counter()
        try:
            res = await self.store.hold(hold, budget)
        except StoreUnavailable as exc:
            self.metrics.child(self.metrics.store_errors, "authorize").inc()
            log.warning("budget store unavailable during authorize: %s", exc)
            return self._count(self._fail_after_send(p, data, mat, metas, hold.idempotency_key))
        finally:
            self._hold_latency.observe(time.perf_counter() - t0)
        try:
            r = res.outcome
            if r == "reused":
                raise InvalidRequest(
                    f"request_id {req.request_id[:64]!r} was already used by tenant "
                    f"{req.tenant[:64]!r} with different parameters")
            if r == "ended":
                out = dec.request_id_ended(p, res.permit_id, res.ended_state)
                await self._record_denial(p, data, budget, out)
            elif r == "aborted":  # our own tombstone: an abort overtook this very call
                out = self._fail_after_send(p, data, mat, metas, hold.idempotency_key)
            elif r == "replay":
                out = dec.conclude(p, res, replayed=True)
            else:
                c, held = dec.held_by(p, res)
                out = dec.conclude(p, res, held=(c, held))
                if out.decision is not dec.DecisionKind.DENY:
                    self._remember(out.permit_id, tuple(keys[i] for i in held), metas[c],
                                   ik=hold.idempotency_key)
                    if res.alerts:
                        self.metrics.threshold_crossings.inc(len(res.alerts))
        except InvalidRequest:
            raise
        except Exception:
            # The script ran (it may have held) but its answer could not be turned into
            # a decision: undo it and let the fail modes decide.
            log.exception("authorize: the store's answer could not be concluded")
            self.metrics.child(self.metrics.internal_errors, "Authorize").inc()
            out = self._fail_after_send(p, data, mat, metas, hold.idempotency_key,
                                        dec.Code.INTERNAL_ERROR)
        # Store is answering again: replay what was decided without it, once.
        self._kick_flush()
        return self._count(out)

    def _fail_after_send(self, p: dec.Plan, data: str, mat: _Material, metas: list[str],
                         ik: str, code: dec.Code = dec.Code.STORE_UNAVAILABLE) -> Outcome:
        """The fail-mode answer once the hold script was sent but its answer is not
        usable: abort what it may hold, then decide under the degraded permit id."""
        self._abort_later(p, mat, ik)
        out = dec.without_store(p, code)
        first = p.candidates[0].target_idx
        self._record_degraded(p, data, out, tuple(mat.window_keys[i] for i in first),
                              tuple(mat.wexp[i] for i in first), metas[0])
        return out

    async def _record_denial(self, p: dec.Plan, data: str, budget: float | None,
                             out: Outcome | None = None) -> None:
        res = json.dumps({"d": "DENY", "pid": p.permit_id, "amt": 0, "k": 0,
                          **({"reasons": [r.to_json() for r in out.reasons]} if out else {})},
                         separators=(",", ":"))
        try:
            if budget is not None and budget <= 0:
                raise StoreUnavailable("no time left")
            await self.store.record("decision", p.permit_id, p.now_ms, data, res, budget)
        except StoreUnavailable:
            self._enqueue("decision", p.permit_id, p.now_ms, data, res)

    def _record_degraded(self, p: dec.Plan, data: str, out: Outcome,
                         keys: tuple[str, ...] = (), wexp: tuple[int, ...] = (),
                         meta: str = "") -> None:
        """Journal a fail-mode decision (outbox). A fail-open ALLOW also journals its
        permit record, so any sidecar sharing the store can settle it once replayed."""
        pid = out.permit_id
        res = json.dumps({"d": str(out.decision), "pid": pid, "amt": 0,
                          "k": out.max_output_tokens, "degraded": True,
                          "reasons": [r.to_json() for r in out.reasons]},
                         separators=(",", ":"))
        spec = ""
        if out.decision is dec.DecisionKind.ALLOW and meta:
            spec = json.dumps({
                "keys": list(keys), "wx": list(wexp), "meta": meta,
                "est": out.estimated_cost_micros, "k": out.max_output_tokens,
                "exp": out.expires_at_ms or p.expires_at_ms,
                "ret": p.snapshot.settings.permit_retention_seconds},
                separators=(",", ":"))
        self._enqueue("decision", pid, p.now_ms, data, res, spec)
        if spec:
            self._remember(pid, keys, meta, True, wexp)

    def decide_on_failure(self, req: AuthorizeInput) -> Outcome:
        """The decision for an Authorize that raised unexpectedly (a bug, not an outage).

        Each budget's fail mode applies as when the store is unreachable, with the
        reason INTERNAL_ERROR; the decision is journaled like any degraded one (a
        fail-open ALLOW is a degraded permit that Closeout settles). If even planning
        fails, no budget is known and the answer is DENY.
        """
        now = _now_ms()
        try:
            snapshot = self.policies.current
            if snapshot is None:
                return self._count(dec.not_loaded(req, dec.new_permit_id(now)))
            p = dec.plan(snapshot, req, now)
            data = dec.event_data(p)
            if p.denial:
                out = dec.denied_by_policy(p)
                self._record_degraded(p, data, out)
                return self._count(out)
            _, mat, metas = self.prepare_hold(p, data)
            out = dec.without_store(p, dec.Code.INTERNAL_ERROR)
            first = p.candidates[0].target_idx
            self._record_degraded(p, data, out, tuple(mat.window_keys[i] for i in first),
                                  tuple(mat.wexp[i] for i in first), metas[0])
            return self._count(out)
        except Exception:
            log.exception("authorize failed and so did its fail-mode decision; denying")
            return self._count(dec.internal_error(req, dec.new_permit_id(now)))

    # ---------------------------------------------------------------- closeout
    async def _lookup(self, permit_id: str, budget: float | None) -> CachedPermit | str:
        """The permit's keys and price, from this process's cache or the store; or the
        status to answer when the store does not know it (yet)."""
        cached = self._cached(permit_id)
        if cached is not None and not cached.degraded:
            return cached
        if cached is not None and self._outbox:
            # Our own degraded permit: its record reaches the store with the outbox.
            await self.flush_outbox()
        rec = await self.store.permit(permit_id, budget)
        if rec is not None:
            return CachedPermit(rec.keys, rec.meta, rec.state == "degraded", rec.wexp,
                                rec.idempotency_key)
        if cached is not None:
            return "PENDING"
        if dec.is_degraded_permit_id(permit_id) and (
                _now_ms() - dec.permit_issued_ms(permit_id) < DEGRADED_PENDING_MS):
            return "PENDING"
        return "UNKNOWN"

    async def closeout(self, permit_id: str, usage: TokenUsage, outcome: str,
                       provider_cost_micros: int | None,
                       deadline_s: float | None = None) -> CloseoutResult:
        if not PERMIT_ID_RE.match(permit_id):
            raise InvalidRequest(f"permit_id {permit_id[:80]!r} is not a Keel permit id")
        problems = usage.problems()
        if problems:
            raise InvalidRequest("; ".join(problems))
        if provider_cost_micros is not None and not (
                0 <= provider_cost_micros <= MAX_PROVIDER_COST_MICROS):
            raise InvalidRequest(
                f"provider_cost_micros must be between 0 and {MAX_PROVIDER_COST_MICROS}")
        if outcome not in OUTCOMES:
            raise InvalidRequest(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
        budget = self._budget(deadline_s)
        now = _now_ms()
        t0 = time.perf_counter()
        try:
            found = await self._lookup(permit_id, budget)
            if isinstance(found, str):
                status = ("CLOSEOUT_PERMIT_PENDING" if found == "PENDING"
                          else "UNKNOWN_PERMIT")
                self.metrics.child(self.metrics.closeouts, status).inc()
                return CloseoutResult(status)
            cached = found
            price = _meta_price(cached.meta, usage.input_tokens)
            priced = usage_cost_micros(price, usage)
            actual = priced if provider_cost_micros is None else provider_cost_micros
            data = json.dumps({
                "v": 1, "now": now, "outcome": outcome, "priced": priced,
                "provider_cost": provider_cost_micros, "actual": actual,
                "usage": {"in": usage.input_tokens, "cached": usage.cached_input_tokens,
                          "cw": usage.cache_write_tokens, "out": usage.output_tokens,
                          "rsn": usage.reasoning_tokens},
                **caller.event_fields(),
            }, separators=(",", ":"))
            ein = cached.meta.get("ein")
            input_over = isinstance(ein, int) and usage.input_tokens > ein

            async def settle(keys: tuple[str, ...], ik: str) -> SettleReply:
                return await self.store.settle(
                    permit_id, keys, now, actual, data, budget, idempotency_key=ik,
                    output_tokens=usage.output_tokens, input_over=input_over,
                    overrun_factor=OVERRUN_FACTOR, overrun_slack_micros=OVERRUN_SLACK_MICROS)

            out = await settle(cached.keys, cached.idempotency_key)
            if out.status == "KEYS_MISMATCH":
                rec = await self.store.permit(permit_id, budget)
                if rec is None:
                    return CloseoutResult("UNKNOWN_PERMIT")
                out = await settle(rec.keys, rec.idempotency_key)
        except StoreUnavailable as exc:
            self.metrics.child(self.metrics.store_errors, "closeout").inc()
            log.warning("budget store unavailable during closeout: %s", exc)
            self.metrics.child(self.metrics.closeouts, "CLOSEOUT_STORE_UNAVAILABLE").inc()
            return CloseoutResult("CLOSEOUT_STORE_UNAVAILABLE")
        finally:
            self.metrics.child(self.metrics.store_latency, "closeout").observe(
                time.perf_counter() - t0)
        status = out.status
        if status == "IMPLAUSIBLE":
            self._implausible(permit_id, out, usage, provider_cost_micros, actual)
        self.metrics.child(self.metrics.closeouts, status).inc()
        if status == "UNKNOWN_PERMIT":
            return CloseoutResult(status)
        self._permits.pop(permit_id, None)
        act, amt, est = out.actual_micros, out.amount_micros, out.estimate_micros
        prior = out.prior
        flags = out.flags
        if status == "ALREADY_SETTLED":
            return CloseoutResult(status, act, est, act - amt, amt, act, flags)
        # What this settlement released: the hold when it was still held; nothing when
        # a void or an expiry had released it, or the permit never held (degraded).
        held = amt if prior == "held" else 0
        corr = act - held
        self.metrics.child(self.metrics.correction,
                           "positive" if corr >= 0 else "negative").inc(abs(corr))
        for flag in flags:
            self.metrics.child(self.metrics.closeout_overruns, flag).inc()
        return CloseoutResult(status, act, est, corr, held, priced, flags)

    def _implausible(self, permit_id: str, out: SettleReply, usage: TokenUsage,
                     provider_cost: int | None, actual: int) -> None:
        est, k, ceiling = out.estimate_micros, out.max_output_tokens, out.ceiling_micros
        if provider_cost is not None:
            field = "provider_cost_micros"
        elif k and usage.output_tokens > k:
            field = "usage.output_tokens"
        else:
            field = "usage.input_tokens"
        self.metrics.child(self.metrics.closeout_implausible, field).inc()
        raise InvalidRequest(
            f"{field}: a cost of {actual} micro-USD is impossible for permit {permit_id} "
            f"(estimate {est} micro-USD, max_output_tokens {k}; the overrun ceiling is "
            f"{OVERRUN_FACTOR} x estimate + {OVERRUN_SLACK_MICROS} = {ceiling} micro-USD, "
            f"output_tokens {usage.output_tokens}); nothing was booked")

    # -------------------------------------------------------------------- void
    async def void(self, permit_id: str, reason: str = "",
                   deadline_s: float | None = None) -> VoidResult:
        if not PERMIT_ID_RE.match(permit_id):
            raise InvalidRequest(f"permit_id {permit_id[:80]!r} is not a Keel permit id")
        if len(reason) > 512:
            raise InvalidRequest("reason is longer than 512 characters")
        budget = self._budget(deadline_s)
        now = _now_ms()
        try:
            found = await self._lookup(permit_id, budget)
            if isinstance(found, str):
                status = "VOID_STORE_UNAVAILABLE" if found == "PENDING" else "VOID_UNKNOWN_PERMIT"
                self.metrics.child(self.metrics.voids, status).inc()
                return VoidResult(status)
            data = json.dumps({"v": 1, "now": now, "reason": reason, **caller.event_fields()},
                              separators=(",", ":"))
            out = await self.store.release(permit_id, found.keys, now, "voided", data, budget,
                                           idempotency_key=found.idempotency_key)
            if out.status == "KEYS_MISMATCH":
                rec = await self.store.permit(permit_id, budget)
                if rec is not None:
                    out = await self.store.release(permit_id, rec.keys, now, "voided", data,
                                                   budget, idempotency_key=rec.idempotency_key)
        except StoreUnavailable as exc:
            self.metrics.child(self.metrics.store_errors, "void").inc()
            log.warning("budget store unavailable during void: %s", exc)
            self.metrics.child(self.metrics.voids, "VOID_STORE_UNAVAILABLE").inc()
            return VoidResult("VOID_STORE_UNAVAILABLE")
        st = out.status
        if st == "RELEASED":
            self._permits.pop(permit_id, None)
            result = VoidResult("VOIDED", out.amount_micros, "voided")
        elif st == "NOOP":
            state = out.state
            result = VoidResult("ALREADY_VOIDED" if state == "voided" else "NOT_VOIDABLE",
                                0, state)
        else:
            result = VoidResult("VOID_UNKNOWN_PERMIT")
        self.metrics.child(self.metrics.voids, result.status).inc()
        return result

    # ----------------------------------------------------------------- expiry
    async def sweep_once(self, now_ms: int | None = None, limit: int = 200) -> int:
        """Release holds whose TTL passed; safe to run in many sidecars at once."""
        now = _now_ms() if now_ms is None else now_ms
        expired = 0
        for pid in await self.store.due_expiries(now, limit):
            if not PERMIT_ID_RE.match(pid):
                continue
            rec = await self.store.permit(pid, 1.0)
            keys = rec.keys if rec is not None else ()
            data = json.dumps({"v": 1, "now": now}, separators=(",", ":"))
            out = await self.store.release(pid, keys, now, "expired", data, 1.0,
                                           idempotency_key=rec.idempotency_key if rec else "")
            if out.status == "RELEASED":
                expired += 1
                self._permits.pop(pid, None)
        if expired:
            self.metrics.holds_expired.inc(expired)
        return expired

    async def run_background(self, interval_s: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep_once()
                if self._outbox:
                    await self.flush_outbox()
            except StoreUnavailable as exc:
                log.debug("sweeper: store unavailable: %s", exc)
            except Exception:
                log.exception("sweeper failed unexpectedly")
