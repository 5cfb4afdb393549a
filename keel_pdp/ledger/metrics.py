"""Prometheus metrics of the ledger writer (a separate process from the sidecar).

Label values come from closed sets only (component names); never a tenant,
permit or stream id.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BATCH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class LedgerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.stored = Counter(
            "keel_pdp_ledger_events_stored_total",
            "Stream events stored in the ledger for the first time.", registry=r)
        self.duplicates = Counter(
            "keel_pdp_ledger_events_duplicate_total",
            "Stream events delivered again and skipped because they were already stored.",
            registry=r)
        self.dead_lettered = Counter(
            "keel_pdp_ledger_dead_lettered_total",
            "Stream events moved to the dead-letter stream because they could not be parsed.",
            registry=r)
        self.lost = Counter(
            "keel_pdp_ledger_lost_entries_total",
            "Stream entries deleted (trimmed by someone else, XDEL) before the ledger group "
            "read them: decisions or settlements missing from the ledger (1 when the number "
            "is unknown). Each loss is also recorded in the dead-letter stream.", registry=r)
        self.claimed = Counter(
            "keel_pdp_ledger_claimed_total",
            "Pending entries claimed from consumers that stopped acknowledging.", registry=r)
        self.trimmed = Counter(
            "keel_pdp_ledger_trimmed_total",
            "Stream entries trimmed after every consumer group had acknowledged them.",
            registry=r)
        self.errors = Counter(
            "keel_pdp_ledger_errors_total",
            "Failed calls by component (store or redis); the writer backs off and retries.",
            ["component"], registry=r)
        self.up = Gauge(
            "keel_pdp_ledger_up",
            "1 when the last call to the component succeeded.", ["component"], registry=r)
        self.lag = Gauge(
            "keel_pdp_ledger_lag_entries",
            "Stream entries not yet delivered to the ledger consumer group.", registry=r)
        self.pending = Gauge(
            "keel_pdp_ledger_pending_entries",
            "Entries delivered to the ledger consumer group but not yet acknowledged.",
            registry=r)
        self.dead_letter = Gauge(
            "keel_pdp_ledger_dead_letter_entries",
            "Entries in the dead-letter stream (waiting for an operator).", registry=r)
        self.batch_seconds = Histogram(
            "keel_pdp_ledger_batch_duration_seconds",
            "Time to store and acknowledge one batch.", buckets=BATCH_BUCKETS, registry=r)
        for component in ("store", "redis"):
            self.errors.labels(component)
            self.up.labels(component).set(0)
