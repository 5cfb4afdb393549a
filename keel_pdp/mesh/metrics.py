"""The mesh adapters' Prometheus metrics, registered in the sidecar's registry.

Labels come from closed sets only (result, action, outcome): never a tenant,
workload, model or permit id.
"""

from __future__ import annotations

from prometheus_client import Counter

from keel_pdp.metrics import Metrics


class MeshMetrics:
    def __init__(self, metrics: Metrics) -> None:
        r = metrics.registry
        self.base = metrics
        self.checks = Counter(
            "keel_pdp_mesh_checks_total",
            "Envoy ext_authz checks by result (allow, constrain, deny, bad_request, "
            "request_id_reused, not_metered, passthrough, error).", ["result"], registry=r)
        self.unmetered = Counter(
            "keel_pdp_mesh_unmetered_passthrough_total",
            "Calls passed to the upstream with no permit, by why (listed: "
            "KEEL_MESH_UNMETERED_ROUTES; not_provider_host: KEEL_MESH_PASS_UNMETERED).",
            ["reason"], registry=r)
        self.settlements = Counter(
            "keel_pdp_mesh_settlements_total",
            "Permits ended by ext_proc, by action (closeout, void), outcome and whether the "
            "usage was estimated.", ["action", "outcome", "estimated"], registry=r)
        self.settle_failures = Counter(
            "keel_pdp_mesh_settle_failures_total",
            "ext_proc closeouts or voids given up after all retries (the hold then expires).",
            registry=r)
        self.abandoned = Counter(
            "keel_pdp_mesh_abandoned_checks_total",
            "Permits voided because Envoy gave up on the Check, or no call followed it.",
            registry=r)
        self.body_rewrites = Counter(
            "keel_pdp_mesh_body_rewrites_total",
            "Request bodies whose output-token cap ext_proc lowered to the permit's.",
            registry=r)
