"""``keel-pdp exception request|approve|reject|list`` and ``keel-pdp budgets status``:
the admin RPCs from a shell, for workload owners, approvers and operators.

Each command calls a running sidecar (``--target``) with the admin token
(``--admin-token-file`` or ``KEEL_ADMIN_TOKEN``) or a client certificate
(``--tls-cert/--tls-key``, mutual TLS). Amounts are decimal USD strings on the
command line and integer micro-USD on the wire.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.ledger.money import parse_usd, usd
from keel_pdp.ledger.periods import iso_utc
from keel_pdp.money import MAX_MICROS

_STATES = {"pending": pb.EXCEPTION_PENDING, "approved": pb.EXCEPTION_APPROVED,
           "rejected": pb.EXCEPTION_REJECTED, "expired": pb.EXCEPTION_EXPIRED}
_STATE_NAMES = {v: k for k, v in _STATES.items()}
# The wire's int64: a larger figure cannot even be sent (refused here by name).
_INT64_MAX = 2**63 - 1


def _usd_arg(text: str) -> int:
    try:
        micros = parse_usd(text, max_micros=MAX_MICROS)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if micros <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be a positive amount")
    return micros


def _hours_arg(text: str) -> int:
    try:
        seconds = Decimal(text) * 3600
    except InvalidOperation as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of hours") from exc
    if not seconds.is_finite() or seconds < 1 or seconds != seconds.to_integral_value():
        raise argparse.ArgumentTypeError(f"{text} hours is not a whole, positive number of "
                                         "seconds")
    if seconds > _INT64_MAX:
        raise argparse.ArgumentTypeError(f"{text} hours is longer than any exception path "
                                         "allows")
    return int(seconds)


def _scope_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"--scope takes DIMENSION=VALUE, got {text!r}")
    return key, value


def _add_connection(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--target", default=env("KEEL_TARGET", "127.0.0.1:50051"),
                   help="the sidecar's gRPC address (env KEEL_TARGET)")
    p.add_argument("--admin-token-file", default=env("KEEL_ADMIN_TOKEN_FILE", ""),
                   help="file holding the admin token (or the token itself in KEEL_ADMIN_TOKEN)")
    p.add_argument("--tls-ca", default=env("KEEL_TLS_CA", ""),
                   help="PEM CA that signed the sidecar's certificate (enables TLS)")
    p.add_argument("--tls-cert", default=env("KEEL_TLS_CLIENT_CERT", ""),
                   help="client certificate for mutual TLS")
    p.add_argument("--tls-key", default=env("KEEL_TLS_CLIENT_KEY", ""),
                   help="client private key for mutual TLS")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    p.add_argument("--format", choices=("table", "json"), default="table")


class CommandError(Exception):
    pass


def _channel(ns: argparse.Namespace) -> grpc.Channel:
    if not ns.tls_ca:
        return grpc.insecure_channel(ns.target)
    try:
        ca = pathlib.Path(ns.tls_ca).read_bytes()
        cert = pathlib.Path(ns.tls_cert).read_bytes() if ns.tls_cert else None
        key = pathlib.Path(ns.tls_key).read_bytes() if ns.tls_key else None
    except OSError as exc:
        raise CommandError(f"cannot read TLS file: {exc}") from exc
    creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                         certificate_chain=cert)
    return grpc.secure_channel(ns.target, creds)


def _metadata(ns: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    token = ""
    if ns.admin_token_file:
        try:
            token = pathlib.Path(ns.admin_token_file).read_text().strip()
        except OSError as exc:
            raise CommandError(f"cannot read the admin token: {exc}") from exc
    else:
        token = os.environ.get("KEEL_ADMIN_TOKEN", "")
    return (("authorization", f"Bearer {token}"),) if token else ()


def _call(ns: argparse.Namespace, method: str, request: Any) -> Any:
    with _channel(ns) as channel:
        stub = pb_grpc.AdminStub(channel)
        try:
            return getattr(stub, method)(request, metadata=_metadata(ns), timeout=ns.timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = exc.details() if hasattr(exc, "details") else str(exc)
            name = code.name if code is not None else "ERROR"
            raise CommandError(f"{name}: {details}") from exc


def _when(ms: int) -> str:
    return iso_utc(ms) if ms else ""


def exception_fields(r: pb.ExceptionRecord) -> dict[str, str]:
    return {
        "exception_id": r.exception_id, "state": _STATE_NAMES.get(r.state, "?"),
        "budget_id": r.budget_id,
        "scope": ",".join(f"{k}={v}" for k, v in sorted(r.scope.items())),
        "amount_usd": usd(r.amount_micros),
        "hours": str(Decimal(r.duration_seconds) / 3600), "requester": r.requester,
        "requested_at": _when(r.requested_at_ms), "pending_until": _when(r.pending_until_ms),
        "exception_path": r.exception_path, "approver_role": r.approver_role,
        "decided_by": r.decided_by, "decided_at": _when(r.decided_at_ms),
        "grant_id": r.grant_id, "grant_expires_at": _when(r.grant_expires_at_ms),
        "denial_permit_id": r.denial_permit_id,
        "denial_seen": "yes" if r.denial_seen else "no",
    }


def _table(rows: Sequence[dict[str, str]]) -> str:
    if not rows:
        return "(none)\n"
    header = list(rows[0])
    body = [header, *[[r[h] for h in header] for r in rows]]
    widths = [max(len(r[i]) for r in body) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in body]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _print_record(ns: argparse.Namespace, r: pb.ExceptionRecord) -> None:
    if ns.format == "json":
        print(json.dumps(MessageToDict(r, preserving_proto_field_name=True), indent=2))
        return
    note = "" if r.changed else " (already recorded: nothing changed)"
    print(f"exception {r.exception_id}: {_STATE_NAMES.get(r.state, '?')}{note}")
    for k, v in exception_fields(r).items():
        if v and k not in ("exception_id", "state"):
            print(f"  {k:17} {v}")
    if r.justification:
        print(f"  {'justification':17} {r.justification}")
    if r.decision_note:
        print(f"  {'note':17} {r.decision_note}")


# ------------------------------------------------------------------ commands
def cmd_request(ns: argparse.Namespace) -> int:
    req = pb.RequestExceptionRequest(
        denial_permit_id=ns.denial, budget_id=ns.budget, scope=dict(ns.scope or []),
        amount_micros=ns.amount_usd, duration_seconds=ns.hours, justification=ns.justification,
        requester=ns.requester)
    _print_record(ns, _call(ns, "RequestException", req))
    return 0


def cmd_decide(ns: argparse.Namespace) -> int:
    req = pb.DecideExceptionRequest(exception_id=ns.exception_id, approver=ns.approver,
                                    approver_role=ns.role, note=ns.note)
    method = "ApproveException" if ns.exception_command == "approve" else "RejectException"
    _print_record(ns, _call(ns, method, req))
    return 0


def cmd_list(ns: argparse.Namespace) -> int:
    req = pb.ListExceptionsRequest(state=_STATES.get(ns.state, pb.EXCEPTION_STATE_UNSPECIFIED),
                                   budget_id=ns.budget,
                                   limit=ns.limit)
    res = _call(ns, "ListExceptions", req)
    if ns.format == "json":
        print(json.dumps(MessageToDict(res, preserving_proto_field_name=True), indent=2))
        return 0
    cols = ("exception_id", "state", "budget_id", "scope", "amount_usd", "hours", "requester",
            "requested_at", "decided_by", "grant_expires_at")
    rows = [{k: v for k, v in exception_fields(r).items() if k in cols}
            for r in res.exceptions]
    sys.stdout.write(_table(rows))
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    res = _call(ns, "BudgetStatus", pb.BudgetStatusRequest(tenant=ns.tenant,
                                                            budget_id=ns.budget))
    if ns.format == "json":
        print(json.dumps(MessageToDict(res, preserving_proto_field_name=True), indent=2))
        return 0
    print(f"budget status as of {_when(res.as_of_ms) or '-'} (policy {res.policy_revision}), "
          "amounts in USD")
    rows = [{
        "budget_id": b.budget_id,
        "split": ",".join(f"{k}={v}" for k, v in sorted(b.split.items())),
        "window": b.window, "window_start": _when(b.window_start_ms), "mode": b.mode,
        "cap": usd(b.cap_micros), "granted": usd(b.granted_micros),
        "settled": usd(b.settled_micros), "held": usd(b.held_micros),
        "remaining": usd(b.remaining_micros), "grants": str(len(b.grants)),
        "burn_per_hour": usd(b.burn_rate_micros_per_hour),
        "projected_end": usd(b.projected_end_micros),
        "over": "OVER" if b.projected_over_cap else "",
    } for b in res.budgets]
    sys.stdout.write(_table(rows))
    return 0


def _run(fn: Any) -> Any:
    def go(ns: argparse.Namespace) -> int:
        try:
            return int(fn(ns))
        except CommandError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    return go


def register(sub: Any) -> None:
    p = sub.add_parser("exception", help="request, approve, refuse and list budget exceptions")
    esub = p.add_subparsers(dest="exception_command", required=True)

    r = esub.add_parser("request", help="ask to exceed the budget that denied a request")
    _add_connection(r)
    r.add_argument("--denial", required=True, help="permit_id of the denied Authorize")
    r.add_argument("--budget", required=True, help="the budget that denied it "
                   "(block reason budget_id)")
    r.add_argument("--scope", type=_scope_arg, action="append", metavar="DIM=VALUE",
                   help="value of each of the budget's per-dimensions (e.g. tenant=acme)")
    r.add_argument("--amount-usd", type=_usd_arg, required=True, help="cap raise, e.g. 50.00")
    r.add_argument("--hours", type=_hours_arg, required=True, help="how long, once approved")
    r.add_argument("--justification", required=True, help="the business justification")
    r.add_argument("--requester", default=os.environ.get("KEEL_ACTOR", ""),
                   help="who asks (env KEEL_ACTOR; with mutual TLS: the client identity)")
    r.set_defaults(func=_run(cmd_request))

    for name, help_text in (("approve", "approve a pending request (a time-boxed grant)"),
                            ("reject", "refuse a pending request (recorded with a note)")):
        d = esub.add_parser(name, help=help_text)
        _add_connection(d)
        d.add_argument("exception_id")
        d.add_argument("--approver", default=os.environ.get("KEEL_ACTOR", ""),
                       help="who decides (env KEEL_ACTOR; with mutual TLS: the client identity)")
        d.add_argument("--role", default="", help="the approver's role (the exception path's "
                       "approver_role)")
        d.add_argument("--note", default="", required=name == "reject",
                       help="why (required to refuse)")
        d.set_defaults(func=_run(cmd_decide))

    lst = esub.add_parser("list", help="exception requests, newest first")
    _add_connection(lst)
    lst.add_argument("--state", choices=sorted(_STATES), default="")
    lst.add_argument("--budget", default="")
    lst.add_argument("--limit", type=int, default=100)
    lst.set_defaults(func=_run(cmd_list))

    b = sub.add_parser("budgets", help="live budget figures from the budget store")
    bsub = b.add_subparsers(dest="budgets_command", required=True)
    s = bsub.add_parser("status", help="current window of each matching budget: cap, settled, "
                        "held, remaining, grants, burn rate, projected end of window")
    _add_connection(s)
    s.add_argument("--tenant", default="")
    s.add_argument("--budget", default="")
    s.set_defaults(func=_run(cmd_status))
