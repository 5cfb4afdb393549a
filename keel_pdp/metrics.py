"""Every Prometheus metric of the sidecar, defined in one place.

Label values come from small closed sets (decision, reason code, RPC method,
status code, script name, outcome, flag): never a tenant, workload, identity or
permit id. The one open set, budget ids on the budget gauges, is capped to the
busiest 200 budgets.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Sub-millisecond resolution where the sidecar is expected to live.
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.decisions = Counter(
            "keel_pdp_decisions_total", "Authorize decisions by decision and primary reason code.",
            ["decision", "reason"], registry=r)
        self.rpc_latency = Histogram(
            "keel_pdp_rpc_duration_seconds", "Server-side latency of PDP RPCs.",
            ["method"], buckets=LATENCY_BUCKETS, registry=r)
        self.rpc_errors = Counter(
            "keel_pdp_rpc_errors_total", "RPCs answered with a gRPC error status.",
            ["method", "code"], registry=r)
        self.closeouts = Counter(
            "keel_pdp_closeouts_total", "Closeouts by status.", ["status"], registry=r)
        self.voids = Counter("keel_pdp_voids_total", "Voids by status.", ["status"], registry=r)
        self.store_latency = Histogram(
            "keel_pdp_store_call_duration_seconds", "Latency of budget store script calls.",
            ["script"], buckets=LATENCY_BUCKETS, registry=r)
        self.store_errors = Counter(
            "keel_pdp_store_errors_total", "Budget store calls that failed or timed out.",
            ["script"], registry=r)
        self.store_short_waits = Counter(
            "keel_pdp_store_short_waits_total",
            "Script calls whose WAIT (--wait-replicas) was confirmed by fewer replicas than "
            "asked within its timeout; answered as usual (not durable on a replica yet).",
            ["script"], registry=r)
        self.threshold_crossings = Counter(
            "keel_pdp_budget_threshold_crossings_total",
            "Soft budget thresholds crossed (each once per budget window).", registry=r)
        self.escrow_refills = Counter(
            "keel_pdp_escrow_refills_total",
            "Leases on shared budgets refilled from the budget (escrow, sharded key "
            "space): each cost its Authorize three more store round trips.", registry=r)
        self.escrow_returns_micros = Counter(
            "keel_pdp_escrow_returned_micros_total",
            "Unused lease headroom given back to shared budgets (idle or refused).",
            registry=r)
        self.holds_expired = Counter(
            "keel_pdp_holds_expired_total", "Holds released by the expiry sweeper.", registry=r)
        self.correction = Counter(
            "keel_pdp_correction_micros_total",
            "Sum of |actual - held| booked at closeout, by sign.", ["sign"], registry=r)
        self.policy_revision = Gauge(
            "keel_pdp_policy_revision_info", "The active policy bundle (value 1).",
            ["revision", "content_hash", "price_revision"], registry=r)
        self.policy_loads = Counter(
            "keel_pdp_policy_loads_total", "Policy bundle load attempts by result.",
            ["result"], registry=r)
        self.policy_loaded = Gauge(
            "keel_pdp_policy_loaded", "1 once a valid policy bundle is serving.", registry=r)
        self.outbox = Gauge(
            "keel_pdp_outbox_events", "Decision events waiting for the store to come back.",
            registry=r)
        self.outbox_dropped = Counter(
            "keel_pdp_outbox_dropped_total",
            "Decision events dropped because the outbox was full.", registry=r)
        self.outbox_journal_errors = Counter(
            "keel_pdp_outbox_journal_errors_total",
            "Outbox journal writes that failed (disk full, directory gone): the events "
            "wait in memory only.", registry=r)
        self.outbox_set_aside = Counter(
            "keel_pdp_outbox_set_aside_total",
            "Outbox entries this version could not replay, kept in rejected-*.jsonl.",
            registry=r)
        self.clock_offset = Gauge(
            "keel_pdp_clock_offset_seconds",
            "The budget store's clock (Redis TIME) minus this host's, at the last sample.",
            registry=r)
        self.clock_following = Gauge(
            "keel_pdp_clock_following_store",
            "1 while this sidecar keeps time by the store's clock because its own is off "
            "by the tolerance or more.", registry=r)
        self.caller_refusals = Counter(
            "keel_pdp_caller_refusals_total",
            "Calls whose caller identity lacks a Callers binding: refused (mode enforce) or "
            "served and counted (mode observe), by RPC and what was missing.",
            ["rpc", "reason", "mode"], registry=r)
        self.inflight = Gauge(
            "keel_pdp_inflight_rpcs", "RPCs being served right now.", registry=r)
        self.internal_errors = Counter(
            "keel_pdp_internal_errors_total",
            "Unexpected exceptions in an RPC, answered by a fail-mode decision or INTERNAL.",
            ["method"], registry=r)
        self.idle_streams = Gauge(
            "keel_pdp_idle_streams", "Calls opened whose request message has not arrived yet.",
            registry=r)
        self.closeout_overruns = Counter(
            "keel_pdp_closeout_overruns_total",
            "Closeouts booked above what their permit allowed, by flag "
            "(USAGE_ABOVE_PERMIT, COST_ABOVE_HOLD).", ["flag"], registry=r)
        self.closeout_unpriced_tiers = Counter(
            "keel_pdp_closeout_service_tier_unpriced_total",
            "Closeouts whose reported service tier has no rate in the permit's price: "
            "booked at the highest rate it knows (flag SERVICE_TIER_UNPRICED).", registry=r)
        self.closeout_web_searches = Counter(
            "keel_pdp_closeout_web_searches_total",
            "Web search calls booked by closeouts (billed per call by the provider).",
            registry=r)
        self.closeout_unpriced_searches = Counter(
            "keel_pdp_closeout_unpriced_web_searches_total",
            "Web search calls booked at nothing because the permit's price has no "
            "web_search_per_1k (flag WEB_SEARCH_UNPRICED).", registry=r)
        self.closeout_implausible = Counter(
            "keel_pdp_closeout_implausible_total",
            "Closeouts refused because the usage or cost is impossible for the permit "
            "(nothing booked), by the field named.", ["field"], registry=r)
        self.holds_aborted = Counter(
            "keel_pdp_holds_aborted_total",
            "Authorize calls whose answer was not the store's (store timeout or error): "
            "the hold they may have made is undone, by result: released, tombstone (the "
            "script had not run), noop (the permit had ended, or a replay had handed it "
            "out: it stays the caller's).", ["result"], registry=r)
        self.idle_streams_closed = Counter(
            "keel_pdp_idle_streams_closed_total",
            "Calls ended because their request message never came, by reason "
            "(timeout, evicted).", ["reason"], registry=r)
        # Budget ids come from the policy bundle (operators' names, not callers'),
        # and only the most-used budgets are exported (keel_pdp.budget.gauges).
        self.budget_utilisation = Gauge(
            "keel_pdp_budget_utilisation_ratio",
            "(settled + held) / cap in the current window, the highest counter of the budget.",
            ["budget"], registry=r)
        self.budget_projected = Gauge(
            "keel_pdp_budget_projected_ratio",
            "Spend projected at the window's end at the burn rate so far, / cap; the highest "
            "counter of the budget.", ["budget"], registry=r)
        self.budget_gauge_refreshes = Counter(
            "keel_pdp_budget_gauge_refreshes_total",
            "Refreshes of the budget gauges from the store, by result (ok, error).",
            ["result"], registry=r)
        # Series that alerts read with rate()/increase() exist from the start, so the
        # first failure is an increase from 0 rather than a new series (which those
        # functions cannot see).
        for result in ("ok", "rejected"):
            self.policy_loads.labels(result)
        for script in ("authorize", "closeout", "void"):
            self.store_errors.labels(script)
        for script in ("authorize", "closeout"):
            self.store_short_waits.labels(script)

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, looked up once: ``labels()`` takes a lock and
        builds a key on every call, which the hot paths should not pay."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found
