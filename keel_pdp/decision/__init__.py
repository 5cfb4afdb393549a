"""The decision itself: pure functions over a policy snapshot. No I/O, no gRPC, no
clock, no randomness and no module state.

* ``model``    — the values: request, plan, answer, reasons, codes.
* ``validate`` — a request's fields within their limits.
* ``shape``    — what every request of one (tenant, workload, model, provider)
  shares at a moment, and the explicit ``ShapeCache`` the engine owns.
* ``plan``     — a request and its shape -> what the budget store must check and hold.
* ``conclude`` — the store's typed reply (or its absence) -> the caller's answer.

The engine injects the time (``now_ms``) and the permit id (``keel_pdp.permits``);
the events module encodes the decision for the stream.
"""

from keel_pdp.decision.conclude import (
    conclude,
    denied_by_policy,
    held_by,
    internal_error,
    not_loaded,
    request_id_ended,
    without_store,
)
from keel_pdp.decision.model import (
    INFORMATIONAL,
    MAX_LABEL_KEY_BYTES,
    MAX_LABEL_VALUE_BYTES,
    MAX_LABELS,
    MAX_NAME_BYTES,
    MAX_REQUEST_ID_BYTES,
    AuthorizeInput,
    Candidate,
    Code,
    DecisionKind,
    HoldFigure,
    InvalidRequest,
    Outcome,
    Plan,
    Reason,
    RequestIdReused,
    Target,
)
from keel_pdp.decision.plan import plan, plan_from_shape
from keel_pdp.decision.shape import Shape, ShapeCache, build_shape, fingerprint, shape_for
from keel_pdp.decision.validate import DIMENSION_NAMES, check_name, validate

__all__ = [
    "DIMENSION_NAMES", "INFORMATIONAL", "MAX_LABELS", "MAX_LABEL_KEY_BYTES",
    "MAX_LABEL_VALUE_BYTES", "MAX_NAME_BYTES", "MAX_REQUEST_ID_BYTES", "AuthorizeInput",
    "Candidate", "Code", "DecisionKind", "HoldFigure", "InvalidRequest", "Outcome", "Plan",
    "Reason", "RequestIdReused", "Shape", "ShapeCache", "Target", "build_shape", "check_name",
    "conclude", "denied_by_policy", "fingerprint", "held_by", "internal_error", "not_loaded",
    "plan", "plan_from_shape", "request_id_ended", "shape_for", "validate", "without_store",
]
