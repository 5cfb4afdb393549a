"""Authorize, Closeout and Void: policy snapshot + pure decision + budget store.

The engine owns the clock and the permit ids it injects into the decision, the
deadline arithmetic and the fail-mode path. Beside it: ``permit_cache`` (so
Closeout and Void of its own permits take one round trip), ``outbox.OutboxRelay``
(what was decided without the store, replayed once) and ``sweeper`` (expiry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from keel_pdp import caller, events
from keel_pdp import decision as dec
from keel_pdp.budget.escrow import Escrow
from keel_pdp.budget.keys import PERMIT_ID_RE
from keel_pdp.budget.material import (
    Material,
    Materials,
    meta_input_estimate,
    meta_price,
    meta_stamp,
    meta_tier_price,
)
from keel_pdp.budget.replies import HoldReply, SettleReply
from keel_pdp.budget.store import (
    BudgetStore,
    DegradedPermit,
    HoldCandidate,
    HoldRequest,
)
from keel_pdp.clock import MAX_FOLLOW_MS, ClockSync
from keel_pdp.decision import AuthorizeInput, Outcome
from keel_pdp.errors import InvalidRequest, RequestIdReused, StoreUnavailable
from keel_pdp.metrics import Metrics
from keel_pdp.outbox import OutboxRelay
from keel_pdp.permit_cache import CachedPermit, PermitCache
from keel_pdp.permits import PermitIds, is_degraded_permit_id, permit_issued_ms
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.policy.snapshot import PolicySnapshot
from keel_pdp.pricing import (
    AUTO_TIER,
    PICO_PER_MICRO,
    TokenUsage,
    ceil_div,
    rates_ratio,
    search_fee_unpriced,
    tier_problem,
    usage_cost_pico,
)
from keel_pdp.sweeper import sweep

log = logging.getLogger("keel_pdp.engine")
# Refills an Authorize may make for its shared budgets' leases (escrow).
REFILL_ROUNDS = 2
# How long an Authorize without a deadline waits for the give-back of leases
# above a cap the policy just cut (escrow) before it holds anyway.
CAP_CUT_WAIT_S = 2.0

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

__all__ = ["CachedPermit", "CloseoutResult", "Engine", "VoidResult"]


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


class Engine:
    """The sidecar's decisions: Authorize (plan, hold, conclude), Closeout and Void,
    with every failure answered by the budgets' fail modes. One per process; its
    collaborators (policy holder, budget store, metrics) are injected, and so are
    the permit-id source and the clock (``ids``)."""

    def __init__(self, policies: PolicyHolder, store: BudgetStore, metrics: Metrics, *,
                 permit_cache_size: int = 100_000, outbox_size: int = 100_000,
                 outbox_dir: str | None = None, ids: PermitIds | None = None,
                 lease_idle_s: float = 10.0) -> None:
        self.policies = policies
        self.store = store
        self.metrics = metrics
        self.ids = ids or PermitIds()
        # This sidecar's clock against the store's (keel_pdp.clock).
        self.clock = ClockSync()
        self._clock_apart_logged = False
        self.shapes = dec.ShapeCache()
        self._materials = Materials(store.keys, stored_shapes=store.stored_shapes)
        self._permits = PermitCache(permit_cache_size)
        self.relay = OutboxRelay(store, metrics, outbox_size, outbox_dir)
        self._hold_latency = metrics.store_latency.labels("authorize")
        # Leases unchanged for lease_idle_s are given back by the sweeper.
        self.escrow = Escrow(store, lease_idle_s)
        self._background: set[asyncio.Task[None]] = set()
        # Whether the last sweep found a full page of due holds in some shard.
        self.sweep_full = False
        # Shared budgets' caps in the last policy snapshot seen (escrow: a cap cut
        # gives back the leases above it), and the give-back a cut started.
        self._caps_of: PolicySnapshot | None = None
        self._caps: dict[str, int] = {}
        self._cap_cut: asyncio.Task[None] | None = None
        self._cut_budgets: frozenset[str] = frozenset()

    # ----------------------------------------------------------------- helpers
    def _budget(self, deadline_s: float | None) -> float | None:
        if deadline_s is None:
            return None
        return deadline_s - DEADLINE_MARGIN_S

    async def flush_outbox(self) -> int:
        """Replay what was decided without the store; returns how many entries."""
        return await self.relay.flush()

    @property
    def outbox_len(self) -> int:
        return len(self.relay)

    def _count(self, out: Outcome) -> Outcome:
        self.metrics.child(self.metrics.decisions, str(out.decision), out.primary_code).inc()
        return out

    # --------------------------------------------------------------- authorize
    def plan(self, req: AuthorizeInput, now: int) -> tuple[dec.Plan, str] | None:
        """The plan for ``req`` and its decision event data; None without a policy."""
        snapshot = self.policies.current
        if snapshot is None:
            return None
        p = dec.plan(snapshot, req, now, self._new_id(req.tenant, now), self.shapes)
        return p, events.decision_data(p, caller.current())

    def prepare_hold(self, p: dec.Plan, data: str) -> tuple[HoldRequest, Material, list[str]]:
        """The hold script's request for plan ``p`` (no I/O); also the shape's
        store material and each candidate's permit metadata."""
        assert p.shape is not None
        req = p.request
        mat = self._materials(p.shape)
        stamp = meta_stamp(p.now_ms, req.estimated_input_tokens)
        metas = [mat.meta_head_for(i, c.tier) + stamp for i, c in enumerate(p.candidates)]
        hold = HoldRequest(
            p.permit_id, self.store.keys.idempotency(req.tenant, req.request_id),
            p.fingerprint, p.now_ms, p.expires_at_ms, mat.hold_event(data), mat.shared,
            tuple(
                HoldCandidate(c.fixed_pico, c.rate.output, c.output_tokens,
                              c.may_constrain, meta, c.target_idx, c.estimate_micros)
                for c, meta in zip(p.candidates, metas, strict=True)),
            refill=mat.leased)
        return hold, mat, metas

    async def authorize(self, req: AuthorizeInput, deadline_s: float | None = None) -> Outcome:
        dec.validate(req)
        now = self.ids.now_ms()
        planned = self.plan(req, now)
        if planned is None:
            return self._count(dec.not_loaded(req, self._new_id(req.tenant, now)))
        p, data = planned
        budget = self._budget(deadline_s)
        if p.denial:
            out = dec.denied_by_policy(p)
            await self._record_denial(p, data, budget)
            return self._count(out)
        hold, mat, metas = self.prepare_hold(p, data)
        if mat.leased:
            budget = await self._after_cap_cuts(p, mat, budget)
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
            exhausted = False
            if res.outcome == "lease":
                res, exhausted = await self._refill(hold, mat, res.need, t0, budget)
        except StoreUnavailable as exc:
            self.metrics.child(self.metrics.store_errors, "authorize").inc()
            log.warning("budget store unavailable during authorize: %s", exc)
            return self._count(self._fail_after_send(p, data, mat, metas, hold.idempotency_key))
        except asyncio.CancelledError:
            # The caller is gone (a cancelled RPC, Envoy giving up): nobody will learn
            # the permit id, so whatever the script may hold is aborted (journaled
            # first, as for a timeout) instead of waiting for its expiry.
            self.relay.abort_later(p.permit_id, p.now_ms, hold.idempotency_key,
                                   mat.window_keys)
            raise
        except Exception:
            # A client bug, not an outage: the script may still have been sent, so it
            # is aborted like a timed-out one, and the fail modes decide.
            log.exception("authorize: the hold call failed unexpectedly")
            self.metrics.child(self.metrics.internal_errors, "Authorize").inc()
            return self._count(self._fail_after_send(p, data, mat, metas, hold.idempotency_key,
                                                     dec.Code.INTERNAL_ERROR))
        finally:
            self._hold_latency.observe(time.perf_counter() - t0)
        try:
            r = res.outcome
            if r == "reused":
                raise RequestIdReused(
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
                if exhausted and res.fail >= 0 and mat.parents[res.fail] is not None:
                    # Refused by a lease the shared budget could not refill: give
                    # its rest back so the budget's last slices gather where asked.
                    self._give_back_later(mat, res.fail, p.now_ms)
                if out.decision is not dec.DecisionKind.DENY:
                    self._permits.remember(out.permit_id, tuple(keys[i] for i in held),
                                           metas[c], ik=hold.idempotency_key)
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
        self.relay.kick()
        return self._count(out)

    def _new_id(self, tenant: str, now_ms: int) -> str:
        """A permit id in the tenant's key shard."""
        keys = self.store.keys
        return self.ids.new(now_ms, keys.tenant_shard(tenant), keys.shards)

    async def _refill(self, hold: HoldRequest, mat: Material, need: tuple[tuple[int, int], ...],
                      t0: float, budget: float | None) -> tuple[HoldReply, bool]:
        """Leases short of the estimate: refill each from its shared budget, then ask
        again (escrow; see keel_pdp.budget.escrow). Requests running at once may
        spend a refill before this one asks again: it may refill once more, then
        decides with what the leases have. Also says whether a shared budget could
        not give what a lease was short of."""
        def left() -> float | None:
            return None if budget is None else budget - (time.perf_counter() - t0)

        exhausted = False
        for attempt in range(REFILL_ROUNDS):
            for i, amount in need:
                parent = mat.parents[i] if 0 <= i < len(mat.parents) else None
                if parent is None:
                    raise StoreUnavailable(f"the store asked to refill budget {i}, not a lease")
                got = await self.escrow.refill(parent, mat.window_keys[i], amount,
                                               hold.now_ms, left())
                exhausted = exhausted or got < amount
            self.metrics.escrow_refills.inc(len(need))
            hold.refill = attempt + 1 < REFILL_ROUNDS
            res = await self.store.hold(hold, left())
            if res.outcome != "lease":
                return res, exhausted
            need = res.need
        raise StoreUnavailable("the store asked for a lease refill after the last round")

    def _follow_policy(self, now_ms: int) -> None:
        """See the newest policy's caps, once per snapshot. The newest, not a
        request's: one planned before a reload (still in flight) must not bring the
        old caps back."""
        current = self.policies.current
        if current is not None and current is not self._caps_of:
            self._see_caps(current, now_ms)

    def _see_caps(self, snapshot: PolicySnapshot, now_ms: int) -> None:
        """A policy snapshot not seen yet. When it cuts the cap of a shared budget
        (or is the first this process sees: it cannot know what was cut before it
        started), give back now the unused part of the leases leased under a higher
        cap, so the next refill applies the cap now in force (escrow). A raised cap
        needs nothing: the next refill applies it."""
        before = self._caps if self._caps_of is not None else None
        caps = {b.id: b.limit_micros for b in snapshot.budgets}
        self._caps_of, self._caps = snapshot, caps
        if not self.store.keys.escrow:
            return
        cut = frozenset(i for i, cap in caps.items()
                        if before is None or cap < before.get(i, cap + 1))
        if not cut:
            return

        async def give_back() -> None:
            try:
                returned = await self.escrow.reclaim(now_ms, caps, cut)
            except Exception as exc:  # the sweeper's next look tries again
                log.warning("escrow: giving back leases above a cut cap failed (%s); the "
                            "sweeper tries again", exc)
                return
            if returned:
                self.metrics.escrow_returns_micros.inc(returned)

        self._cut_budgets = cut
        task = self._cap_cut = asyncio.get_running_loop().create_task(give_back())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _after_cap_cuts(self, p: dec.Plan, mat: Material,
                              budget: float | None) -> float | None:
        """Under a policy that cut a shared budget's cap, hold only once the leases
        above the new cap were given back (within the caller's deadline); returns
        what is left of the deadline."""
        assert p.shape is not None
        if p.shape.snapshot is not self._caps_of:
            self._follow_policy(p.now_ms)
        task = self._cap_cut
        if task is None or task.done() or not any(
                parent is not None and parent.budget_id in self._cut_budgets
                for parent in mat.parents):
            return budget
        t0 = time.perf_counter()
        # Past the wait, held anyway: the give-back lands after this request. At
        # most half the deadline, so the request still has time for its own hold.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(task),
                                   CAP_CUT_WAIT_S if budget is None else max(budget / 2, 0.0))
        return None if budget is None else budget - (time.perf_counter() - t0)

    def _give_back_later(self, mat: Material, i: int, now_ms: int) -> None:
        """A lease refused a request: give its unused part back to the shared
        budget, after the answer, so the last slices gather where they are asked."""
        parent = mat.parents[i]
        assert parent is not None  # the caller checked: window i is a lease
        lease_key = mat.window_keys[i]

        async def give() -> None:
            try:
                await self.escrow.give_back(lease_key, parent.key, now_ms, 1.0)
            except StoreUnavailable as exc:
                log.info("escrow: returning %s's unused lease failed (%s); the sweeper "
                         "returns it once idle", parent.budget_id, exc)

        task = asyncio.get_running_loop().create_task(give())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _fail_after_send(self, p: dec.Plan, data: str, mat: Material, metas: list[str],
                         ik: str, code: dec.Code = dec.Code.STORE_UNAVAILABLE) -> Outcome:
        """The fail-mode answer once the hold script was sent but its answer is not
        usable: abort what it may hold, then decide under the degraded permit id."""
        self.relay.abort_later(p.permit_id, p.now_ms, ik, mat.window_keys)
        out = dec.without_store(p, code)
        first = p.candidates[0].target_idx
        self._record_degraded(p, data, out, tuple(mat.window_keys[i] for i in first),
                              tuple(mat.wexp[i] for i in first), metas[0])
        return out

    async def _record_denial(self, p: dec.Plan, data: str, budget: float | None,
                             out: Outcome | None = None) -> None:
        res = events.denial_res(p.permit_id, out.reasons if out else ())
        try:
            if budget is not None and budget <= 0:
                raise StoreUnavailable("no time left")
            await self.store.record("decision", p.permit_id, p.now_ms, data, res, budget)
        except StoreUnavailable:
            self.relay.enqueue("decision", p.permit_id, p.now_ms, data, res)

    def _record_degraded(self, p: dec.Plan, data: str, out: Outcome,
                         keys: tuple[str, ...] = (), wexp: tuple[int, ...] = (),
                         meta: str = "") -> None:
        """Journal a fail-mode decision (outbox). A fail-open ALLOW also journals its
        permit record, so any sidecar sharing the store can settle it once replayed."""
        pid = out.permit_id
        record = None
        if out.decision is dec.DecisionKind.ALLOW and meta:
            record = DegradedPermit(keys, wexp, meta, out.estimated_cost_micros,
                                    out.max_output_tokens, out.expires_at_ms or p.expires_at_ms,
                                    p.snapshot.settings.permit_retention_seconds)
        self.relay.enqueue("decision", pid, p.now_ms, data, events.degraded_res(out), record)
        if record is not None:
            self._permits.remember(pid, keys, meta, True)

    def decide_on_failure(self, req: AuthorizeInput) -> Outcome:
        """The decision for an Authorize that raised unexpectedly (a bug, not an outage).

        Each budget's fail mode applies as when the store is unreachable, with the
        reason INTERNAL_ERROR; the decision is journaled like any degraded one (a
        fail-open ALLOW is a degraded permit that Closeout settles). If even planning
        fails, no budget is known and the answer is DENY.
        """
        now = self.ids.now_ms()
        try:
            planned = self.plan(req, now)
            if planned is None:
                return self._count(dec.not_loaded(req, self._new_id(req.tenant, now)))
            p, data = planned
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
            return self._count(dec.internal_error(req, self.ids.new(now)))

    # ---------------------------------------------------------------- closeout
    async def _lookup(self, permit_id: str, budget: float | None) -> CachedPermit | str:
        """The permit's keys and price, from this process's cache or the store; or the
        status to answer when the store does not know it (yet)."""
        cached = self._permits.get(permit_id)
        if cached is not None and not cached.degraded:
            return cached
        if cached is not None and self.relay:
            # Our own degraded permit: its record reaches the store with the outbox.
            # After an outage the outbox may take seconds to replay: wait at most half
            # this call's budget (the rest is for the look-up and the script); until
            # its record is in, the permit answers PENDING and the caller retries.
            await self.relay.flush_within(None if budget is None else budget / 2)
        rec = await self.store.permit(permit_id, budget)
        if rec is not None:
            return CachedPermit(rec.keys, rec.meta, rec.state == "degraded",
                                rec.idempotency_key)
        if cached is not None:
            return "PENDING"
        if is_degraded_permit_id(permit_id) and (
                self.ids.now_ms() - permit_issued_ms(permit_id) < DEGRADED_PENDING_MS):
            return "PENDING"
        return "UNKNOWN"

    async def closeout(self, permit_id: str, usage: TokenUsage, outcome: str,
                       provider_cost_micros: int | None,
                       deadline_s: float | None = None, *,
                       service_tier: str = "") -> CloseoutResult:
        """Settle ``usage`` against the permit, priced at the rates of the service tier
        the provider reported (``service_tier``; "" when it did not say: the rates the
        permit was held at), its web searches at the permit's fee per call (none
        known: booked at nothing and flagged WEB_SEARCH_UNPRICED)."""
        if not PERMIT_ID_RE.match(permit_id):
            raise InvalidRequest(f"permit_id {permit_id[:80]!r} is not a Keel permit id")
        problems = usage.problems()
        tier_text = tier_problem(service_tier)
        if tier_text is not None:
            problems.append(f"service_tier {str(service_tier)[:40]!r} {tier_text}")
        if problems:
            raise InvalidRequest("; ".join(problems))
        if provider_cost_micros is not None and not (
                0 <= provider_cost_micros <= MAX_PROVIDER_COST_MICROS):
            raise InvalidRequest(
                f"provider_cost_micros must be between 0 and {MAX_PROVIDER_COST_MICROS}")
        if outcome not in OUTCOMES:
            raise InvalidRequest(f"outcome {outcome!r} is not one of {', '.join(OUTCOMES)}")
        budget = self._budget(deadline_s)
        now = self.ids.now_ms()
        t0 = time.perf_counter()
        try:
            found = await self._lookup(permit_id, budget)
            if isinstance(found, str):
                status = ("CLOSEOUT_PERMIT_PENDING" if found == "PENDING"
                          else "UNKNOWN_PERMIT")
                self.metrics.child(self.metrics.closeouts, status).inc()
                return CloseoutResult(status)
            cached = found
            rate = meta_tier_price(cached.meta, usage.input_tokens, service_tier)
            exact = usage_cost_pico(rate.price, usage)
            priced = ceil_div(exact, PICO_PER_MICRO)  # budgets move by the rounded-up cost
            actual = priced if provider_cost_micros is None else provider_cost_micros
            if provider_cost_micros is not None:
                exact = provider_cost_micros * PICO_PER_MICRO
            data = events.settlement_data(now, outcome, priced, provider_cost_micros, actual,
                                          usage, caller.current(), exact,
                                          tier=events.SettledTier(service_tier, rate.tier,
                                                                  rate.unpriced, rate.price))
            ein = meta_input_estimate(cached.meta)
            input_over = ein is not None and usage.input_tokens > ein
            # A call served at a dearer tier than it was held at (flex held, priority
            # reported) may cost that many times its estimate without being impossible.
            factor = OVERRUN_FACTOR
            if service_tier not in ("", AUTO_TIER):  # else priced at the held rate itself
                factor *= rates_ratio(rate.price, meta_price(cached.meta, usage.input_tokens))
            # Not the store's flags (the price is Keel's): kept with the settlement, so a
            # retry is answered with them.
            search_unpriced = search_fee_unpriced(rate.price, usage)
            tier_flag: tuple[str, ...] = ("SERVICE_TIER_UNPRICED",) if rate.unpriced else ()
            if search_unpriced:
                tier_flag += ("WEB_SEARCH_UNPRICED",)

            async def settle(keys: tuple[str, ...], ik: str) -> SettleReply:
                return await self.store.settle(
                    permit_id, keys, now, actual, data, budget, idempotency_key=ik,
                    output_tokens=usage.output_tokens, input_over=input_over,
                    overrun_factor=factor, overrun_slack_micros=OVERRUN_SLACK_MICROS,
                    priced_micros=priced, keel_flags=tier_flag)

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
        self._permits.forget(permit_id)
        act, amt, est = out.actual_micros, out.amount_micros, out.estimate_micros
        prior = out.prior
        flags = out.flags
        if status == "ALREADY_SETTLED":
            # The figures and flags the settlement answered (prior: the state it settled
            # from), whichever sidecar it ran on. A settlement that did not record Keel's
            # price and flags (an earlier release) is answered with the actual cost and
            # this report's flags.
            held = 0 if prior in ("expired", "voided", "unheld") else amt
            first_priced = act if out.priced_micros is None else out.priced_micros
            first_flags = tier_flag if out.keel_flags is None else out.keel_flags
            return CloseoutResult(status, act, est, act - held, held, first_priced,
                                  flags + first_flags)
        # What this settlement released: the hold when it was still held; nothing when
        # a void or an expiry had released it, or the permit never held (degraded).
        held = amt if prior == "held" else 0
        corr = act - held
        self.metrics.child(self.metrics.correction,
                           "positive" if corr >= 0 else "negative").inc(abs(corr))
        for flag in flags:
            self.metrics.child(self.metrics.closeout_overruns, flag).inc()
        if rate.unpriced:
            self.metrics.closeout_unpriced_tiers.inc()
        if usage.web_search_calls:
            self.metrics.closeout_web_searches.inc(usage.web_search_calls)
        if search_unpriced:
            self.metrics.closeout_unpriced_searches.inc(usage.web_search_calls)
        return CloseoutResult(status, act, est, corr, held, priced, flags + tier_flag)

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
            f"{OVERRUN_FACTOR} x estimate (times the reported service tier's rate over the "
            f"held one, when dearer) + {OVERRUN_SLACK_MICROS} = {ceiling} micro-USD, "
            f"output_tokens {usage.output_tokens}); nothing was booked")

    # -------------------------------------------------------------------- void
    async def void(self, permit_id: str, reason: str = "",
                   deadline_s: float | None = None) -> VoidResult:
        if not PERMIT_ID_RE.match(permit_id):
            raise InvalidRequest(f"permit_id {permit_id[:80]!r} is not a Keel permit id")
        if len(reason) > 512:
            raise InvalidRequest("reason is longer than 512 characters")
        budget = self._budget(deadline_s)
        now = self.ids.now_ms()
        try:
            found = await self._lookup(permit_id, budget)
            if isinstance(found, str):
                status = "VOID_STORE_UNAVAILABLE" if found == "PENDING" else "VOID_UNKNOWN_PERMIT"
                self.metrics.child(self.metrics.voids, status).inc()
                return VoidResult(status)
            data = events.release_data(now, reason, caller.current())
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
            self._permits.forget(permit_id)
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
        """Release holds whose TTL passed; safe to run in many sidecars at once.

        A hold is due once this sidecar's clock and the store's have both passed
        its expiry: a sidecar whose clock runs ahead must not end other sidecars'
        holds while their provider calls still run (``now_ms``: a given clock)."""
        if now_ms is None:
            store_now = await self.sync_clock()
            now = self.ids.now_ms()
            due = min(now, store_now)
        else:
            now = due = now_ms
        released, self.sweep_full = await sweep(self.store, due, limit)
        for pid in released:
            self._permits.forget(pid)
        if released:
            self.metrics.holds_expired.inc(len(released))
        if self.store.keys.escrow:
            self._follow_policy(now)
            # Leases above their budget's cap now (cut mid-window) are given back
            # however busy, by whichever sidecar looks first, restarted ones too.
            returned = await self.escrow.return_idle(
                now, self._caps if self._caps_of is not None else None)
            if returned:
                self.metrics.escrow_returns_micros.inc(returned)
        return len(released)

    async def sync_clock(self) -> int:
        """Read the store's clock (Redis ``TIME``) and, when this sidecar's clock is
        off it by ``keel_pdp.clock.TOLERANCE_MS`` or more, keep time by the store's
        from now on (windows, hold expiries, permit ids, grants); returns the
        store's time in epoch ms. Raises ``StoreUnavailable`` as any store call."""
        ids = self.ids
        sent = ids.local_ms()
        store_ms = await self.store.time_ms()
        received = ids.local_ms()
        if ids.follows_store:
            sync = self.clock
            was_following = sync.following
            if sync.observe(sent, store_ms, received):
                ids.offset_ms = sync.applied_ms
                if sync.following:
                    log.warning(
                        "clock: this host's clock is %.3f s %s the budget store's (Redis "
                        "TIME); keeping time by the store's until they agree within %.3f s "
                        "(check NTP on this host)", abs(sync.offset_ms) / 1000,
                        "behind" if sync.offset_ms > 0 else "ahead of",
                        sync.tolerance_ms / 2000)
                elif was_following and abs(sync.offset_ms) <= MAX_FOLLOW_MS:
                    log.warning("clock: this host's clock agrees with the budget store's "
                                "again (%d ms apart); using it as it is", sync.offset_ms)
            if abs(sync.offset_ms) > MAX_FOLLOW_MS and not self._clock_apart_logged:
                self._clock_apart_logged = True
                log.error("clock: this host's clock and the budget store's (Redis TIME) are "
                          "%.1f days apart: one of them was reset. Not following the "
                          "store's; fix the wrong one (budget windows and hold expiries go "
                          "by this host's clock meanwhile)", abs(sync.offset_ms) / 86_400_000)
            self.metrics.clock_offset.set(sync.offset_ms / 1000)
            self.metrics.clock_following.set(1 if sync.following else 0)
        return store_ms

    async def sweep_backlog(self, now_ms: int | None = None, time_budget_s: float = 1.0,
                            limit: int = 200) -> int:
        """Sweep page after page while a page comes back full (a backlog), for at
        most ``time_budget_s``; returns how many holds were released."""
        end = time.monotonic() + time_budget_s
        total = await self.sweep_once(now_ms, limit)
        while self.sweep_full and time.monotonic() < end:
            total += await self.sweep_once(now_ms, limit)
        return total

    async def run_background(self, interval_s: float = 1.0) -> None:
        """Every ``interval_s``: sweep expired holds (a backlog within half the
        interval), replay the outbox (in the background: a replay after a long outage
        may take minutes, and expired holds must not wait for it)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.sweep_backlog(time_budget_s=interval_s / 2)
                self.relay.kick()
            except StoreUnavailable as exc:
                log.debug("sweeper: store unavailable: %s", exc)
            except Exception:
                log.exception("sweeper failed unexpectedly")
