"""Every error Keel raises on purpose, as one tree.

::

    KeelError
    ├── InvalidRequest (ValueError)     a request field is invalid; the message names it
    │   └── RequestIdReused              the request_id was used with other parameters
    ├── StoreUnavailable                 the budget store did not answer in time (fail modes)
    ├── ReplyError                       a budget script answered off its contract (a bug)
    ├── CrossSlotError (ValueError)      one call's keys span Redis Cluster slots (a bug)
    ├── ConfigError (ValueError)         settings, TLS material, mesh configuration
    │   ├── SettingsError                  (keel_pdp.settings)
    │   ├── TlsError                       (keel_pdp.server.tls)
    │   └── MeshConfigError                (keel_pdp.mesh.config)
    ├── PolicyError                      a bundle that cannot be served (keel_pdp.policy.loader)
    ├── PriceError (ValueError)          a price that cannot be represented exactly
    ├── GrantForbidden                   an approver's role may not approve on this path
    ├── ExceptionWorkflowError           the exception workflow (keel_pdp.overage)
    │   ├── UnknownException (LookupError)
    │   └── ExceptionConflict
    ├── MeshRequestError (ValueError)    an HTTP request the mesh path cannot read
    │   └── BadRequest                     (keel_pdp.mesh.apis; carries an HTTP status)
    ├── FrameError (ValueError)          a broken AWS event-stream frame
    ├── LedgerError                      the ledger (keel_pdp.ledger)
    │   ├── LedgerUnavailable              the ledger store could not be reached; retry
    │   ├── LedgerStoreError               the ledger store cannot be used as it is
    │   │   └── LedgerStoreBroken
    │   ├── LedgerRejected                 the store refused rows (a constraint)
    │   ├── ParseError (ValueError)        a stream entry off the event contract
    │   ├── PeriodError (ValueError)       a bad period name or transition
    │   └── MappingError (ValueError)      a bad cost-allocation mapping file
    └── ReconcileError                   a reconciliation that cannot run (keel_pdp.reconcile)
        ├── InputError                     a bad input file: path, row, column
        └── SignoffError

Leaves whose constructors carry domain values (PolicyError's problems, InputError's
file and row, BadRequest's status) are defined next to their domain and subclass
the node named here. Each error maps to one gRPC status and one HTTP status, here
and nowhere else (``grpc_status_name``, ``http_status``); the transports translate
the name.
"""

from __future__ import annotations


class KeelError(Exception):
    """The root of every error Keel raises on purpose."""


class InvalidRequest(KeelError, ValueError):
    """A request field is invalid; the message names the field."""


class RequestIdReused(InvalidRequest):
    """The request_id was already used by this tenant with other parameters."""


class StoreUnavailable(KeelError):
    """Redis did not answer, or answered with an error, within the store timeout."""


class ReplyError(KeelError):
    """A budget script answered something that is not its documented reply."""


class CrossSlotError(KeelError, ValueError):
    """The keys of one call live in different Redis Cluster slots: a key-layout bug,
    never an outage (so never a fail-open decision)."""


class ConfigError(KeelError, ValueError):
    """Settings, TLS material or mesh configuration that cannot be used."""


class SettingsError(ConfigError):
    """A setting (flag or environment variable) that cannot be used; names it."""


class TlsError(ConfigError):
    """TLS certificates or keys that cannot be loaded."""


class MeshConfigError(ConfigError):
    """A KEEL_MESH_* setting that cannot be used; names it."""


class PolicyErrorBase(KeelError):
    """A policy bundle that cannot be served (see keel_pdp.policy.loader.PolicyError)."""


class PriceError(KeelError, ValueError):
    """A price string that cannot be represented exactly."""


class GrantForbidden(KeelError):
    """The approver's role may not approve on this exception path."""


class ExceptionWorkflowError(KeelError):
    """An exception request step that cannot be taken."""


class UnknownException(ExceptionWorkflowError, LookupError):
    """No exception request with this id (never made, or past its retention)."""


class ExceptionConflict(ExceptionWorkflowError):
    """The request is no longer pending, or was made before with other content."""


class MeshRequestError(KeelError, ValueError):
    """An HTTP request the mesh path cannot read."""


class FrameError(KeelError, ValueError):
    """A broken AWS event-stream frame (length prefix, CRC, header)."""


class LedgerError(KeelError):
    """The ledger."""


class LedgerUnavailable(LedgerError):
    """The ledger store could not be reached or did not accept the transaction; retry."""


class LedgerStoreError(LedgerError):
    """The ledger store cannot be used as it is (bad URL, schema newer than this code)."""


class LedgerStoreBroken(LedgerStoreError):
    """A SQL error that is not an outage (a bug or a damaged schema): stop, do not retry."""


class LedgerRejected(LedgerError):
    """The store refused the rows (a constraint); the batch is dead-lettered."""


class ParseError(LedgerError, ValueError):
    """A stream entry that does not follow the event contract."""


class PeriodError(LedgerError, ValueError):
    """A malformed period name or an invalid period transition."""


class MappingError(LedgerError, ValueError):
    """A mapping file that cannot be used; the message names the file and field."""


class ReconcileErrorBase(KeelError):
    """A reconciliation that cannot run (see keel_pdp.reconcile.errors)."""


_GRPC: tuple[tuple[type[BaseException], str], ...] = (
    (InvalidRequest, "INVALID_ARGUMENT"),
    (StoreUnavailable, "UNAVAILABLE"),
    (LedgerUnavailable, "UNAVAILABLE"),
    (UnknownException, "NOT_FOUND"),
    (ExceptionConflict, "FAILED_PRECONDITION"),
    (GrantForbidden, "PERMISSION_DENIED"),
    (PriceError, "INVALID_ARGUMENT"),
)
_HTTP: tuple[tuple[type[BaseException], int], ...] = (
    (RequestIdReused, 409),
    (InvalidRequest, 400),
    (MeshRequestError, 400),
    (StoreUnavailable, 503),
    (GrantForbidden, 403),
)


def grpc_status_name(exc: BaseException) -> str:
    """The gRPC status code name for ``exc`` (INTERNAL for anything unplanned)."""
    for cls, name in _GRPC:
        if isinstance(exc, cls):
            return name
    return "INTERNAL"


def http_status(exc: BaseException) -> int:
    """The HTTP status for ``exc`` on the mesh path (a BadRequest carries its own)."""
    status = getattr(exc, "status", None)
    if isinstance(status, int):
        return status
    for cls, code in _HTTP:
        if isinstance(exc, cls):
            return code
    return 500
