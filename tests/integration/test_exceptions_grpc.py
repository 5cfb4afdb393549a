"""The exception workflow end to end: a real Redis, the sidecar's gRPC server with the
admin service, the `keel-pdp exception` CLI, the ledger writer into SQLite and
PostgreSQL, and the period report; admin token and mutual-TLS identities bound
to approver roles."""

from __future__ import annotations

import asyncio
import contextlib
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.budget.store import BudgetStore
from keel_pdp.cli import main
from keel_pdp.engine import Engine
from keel_pdp.ledger.periods import period_of_ms
from keel_pdp.ledger.report import build_report
from keel_pdp.ledger.store import LedgerStore
from keel_pdp.metrics import Metrics
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.server.admin import add_admin
from keel_pdp.server.service import build_server
from keel_pdp.server.tls import ReloadingCredentials, TlsFiles
from tests.conftest import free_port
from tests.helpers import budget, write_bundle
from tests.integration.conftest import drain, make_writer
from tests.integration.test_security import make_ca, make_cert

TOKEN = "exception-admin-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)
# gpt-4.1 at $2 / $8 per million: 1000 in + 500 out holds $0.006; 1000 in + 250 out
# settles at $0.004.
HOLD_MICROS = 1000 * 2 + 500 * 8
SETTLE_MICROS = 1000 * 2 + 250 * 8


def bundle(tmp_path: pathlib.Path) -> pathlib.Path:
    return write_bundle(
        tmp_path / "bundle",
        [budget("acme", "0.006000", scope={"tenant": "acme"}, window="monthly",
                exception_path="finance-overage")],
        exception_paths=[{"name": "finance-overage", "approver_role": "finance-owner",
                          "max_overage_usd": "10.00", "max_duration_hours": 24}],
        settings={"allow_constrain": False})


@contextlib.asynccontextmanager
async def sidecar(redis_url: str, tmp_path: pathlib.Path, *, identities: tuple[str, ...] = (),
                  credentials: grpc.ServerCredentials | None = None,
                  ) -> AsyncIterator[tuple[int, Engine]]:
    holder = PolicyHolder(bundle(tmp_path))
    holder.reload()
    # As `keel-pdp serve` builds it (the pipelined RESP client). Prefix "t": the ledger
    # test kit's writer reads the "t" stream.
    store = BudgetStore.from_url(redis_url, prefix="t", timeout_s=1.0)
    engine = Engine(holder, store, Metrics())
    server, _, port = build_server(engine, engine.metrics, f"127.0.0.1:{free_port()}",
                                   credentials=credentials,
                                   extra_services=[add_admin(engine, lambda: TOKEN, identities)])
    await server.start()
    try:
        yield port, engine
    finally:
        await server.stop(0)
        await store.close()


def authorize(rid: str) -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(request_id=rid, tenant="acme", workload="chat", model="gpt-4.1",
                               provider="openai", estimated_input_tokens=1000,
                               max_output_tokens=500)


USAGE = pb.Usage(input_tokens=1000, output_tokens=250)


async def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


async def cli(*argv: str) -> tuple[int, str]:
    """Run ``keel-pdp`` in a thread (the server shares this event loop); returns
    the exit code and what it printed."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    buf = io.StringIO()

    def run() -> int:
        with redirect_stdout(buf), redirect_stderr(buf):
            return main(list(argv))

    rc = await asyncio.to_thread(run)
    return rc, buf.getvalue()


async def test_request_approve_and_report_over_grpc_cli_and_ledger(
        redis_url: str, tmp_path: pathlib.Path, store_url: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KEEL_ADMIN_TOKEN", TOKEN)
    async with sidecar(redis_url, tmp_path) as (port, _), \
            grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        target = f"127.0.0.1:{port}"
        pdp, admin = pb_grpc.PolicyDecisionPointStub(ch), pb_grpc.AdminStub(ch)
        fill = await pdp.Authorize(authorize("fill"))
        assert fill.decision == pb.ALLOW
        await pdp.Closeout(pb.CloseoutRequest(permit_id=fill.permit_id, usage=USAGE,
                                              outcome=pb.SUCCEEDED))
        denied = await pdp.Authorize(authorize("denied"))
        assert denied.decision == pb.DENY
        reason = denied.block_reasons[0]
        assert (reason.budget_id, reason.exception_path) == ("acme", "finance-overage")

        ask = pb.RequestExceptionRequest(
            denial_permit_id=denied.permit_id, budget_id=reason.budget_id,
            amount_micros=2 * HOLD_MICROS, duration_seconds=3600,
            justification="Launch week traffic, FIN-42", requester="olivia")
        code, text = await code_of(admin.RequestException(ask))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        code, text = await code_of(admin.RequestException(
            pb.RequestExceptionRequest(**{**_fields(ask), "denial_permit_id": fill.permit_id}),
            metadata=AUTH))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "was allowed" in text
        code, text = await code_of(admin.RequestException(
            pb.RequestExceptionRequest(**{**_fields(ask), "amount_micros": 10_000_001}),
            metadata=AUTH))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "maximum overage" in text

        # The workload owner asks from the command line, with the denial's ids.
        rc, out = await cli("exception", "request", "--target", target, "--denial",
                            denied.permit_id, "--budget", "acme", "--amount-usd", "0.012",
                            "--hours", "1", "--justification", "Launch week traffic, FIN-42",
                            "--requester", "olivia", "--format", "json")
        assert rc == 0, out
        asked = json.loads(out)
        assert asked["state"] == "EXCEPTION_PENDING" and asked["denial_seen"] is True
        exc_id = asked["exception_id"]
        again = await admin.RequestException(ask, metadata=AUTH)
        assert again.exception_id == exc_id and not again.changed

        listed = await admin.ListExceptions(pb.ListExceptionsRequest(state=pb.EXCEPTION_PENDING),
                                            metadata=AUTH)
        assert [r.exception_id for r in listed.exceptions] == [exc_id]
        code, text = await code_of(admin.ApproveException(pb.DecideExceptionRequest(
            exception_id=exc_id, approver="ivan", approver_role="intern"), metadata=AUTH))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "finance-owner" in text
        code, text = await code_of(admin.ApproveException(pb.DecideExceptionRequest(
            exception_id=exc_id, approver="olivia", approver_role="finance-owner"),
            metadata=AUTH))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "own exception" in text
        code, _ = await code_of(admin.ApproveException(pb.DecideExceptionRequest(
            exception_id="exc_ffffffffffffffffffffffff", approver="dana",
            approver_role="finance-owner"), metadata=AUTH))
        assert code == grpc.StatusCode.NOT_FOUND
        assert (await pdp.Authorize(authorize("still-pending"))).decision == pb.DENY

        rc, out = await cli("exception", "approve", exc_id, "--target", target, "--approver",
                            "dana", "--role", "finance-owner", "--note", "ok for launch")
        assert rc == 0 and "approved" in out, out
        rc, out = await cli("exception", "approve", exc_id, "--target", target, "--approver",
                            "dana", "--role", "finance-owner")
        assert rc == 0 and "nothing changed" in out
        code, text = await code_of(admin.RejectException(pb.DecideExceptionRequest(
            exception_id=exc_id, approver="erin", approver_role="finance-owner",
            note="too late"), metadata=AUTH))
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "already approved by dana" in text

        rode = []
        for i in range(3):
            out_ = await pdp.Authorize(authorize(f"after-{i}"))
            if out_.decision != pb.DENY:
                assert pb.EXCEPTION_GRANT_APPLIED in [r.code for r in out_.block_reasons]
                rode.append(out_.permit_id)
                await pdp.Closeout(pb.CloseoutRequest(permit_id=out_.permit_id, usage=USAGE,
                                                      outcome=pb.SUCCEEDED))
        # Left after the fill: $0.002 of the cap + $0.012 granted; each call needs $0.006
        # free and settles at $0.004.
        free, expected = 6_000 - SETTLE_MICROS + 2 * HOLD_MICROS, 0
        while free >= HOLD_MICROS:
            free -= SETTLE_MICROS
            expected += 1
        assert len(rode) == expected

        rc, out = await cli("exception", "list", "--target", target)
        assert rc == 0 and exc_id in out and "approved" in out
        rc, out = await cli("exception", "approve", "exc_nope", "--target", target,
                            "--approver", "dana", "--role", "finance-owner")
        assert rc == 1 and "error: NOT_FOUND: no exception request 'exc_nope'" in out

    ledger = LedgerStore(store_url)
    ledger.migrate()
    writer = make_writer(redis_url, ledger)
    drain(writer)
    events = dict(ledger.query("SELECT etype, COUNT(*) FROM ledger_events GROUP BY etype"))
    assert int(events["exception"]) == 2 and int(events["grant"]) == 1
    steps = ledger.query("SELECT permit_id, res FROM ledger_events WHERE etype = 'exception' "
                         "ORDER BY event_id")
    assert [(str(p), json.loads(str(r))["st"]) for p, r in steps] == \
        [(denied.permit_id, "PENDING"), (denied.permit_id, "APPROVED")]
    grant = ledger.query("SELECT detail FROM ledger_entries WHERE kind = 'exception_grant'")
    assert json.loads(str(grant[0][0]))["denial_permit_id"] == denied.permit_id
    report = build_report(ledger, period_of_ms(int(denied.permit_id[4:16], 16)), ["tenant"])
    (line,) = report.exceptions
    assert (line.exception_id, line.outcome, line.decided_by) == (exc_id, "APPROVED", "dana")
    assert line.denial_in_ledger and line.requester == "olivia"
    assert line.permits_allowed == len(rode)
    assert line.spend_allowed_micros == len(rode) * SETTLE_MICROS
    ledger.close()


def _fields(msg: Any) -> dict[str, Any]:
    return {f.name: getattr(msg, f.name) for f, _ in msg.ListFields()}


async def test_mtls_identities_decide_as_themselves_in_their_bound_roles(
        redis_url: str, tmp_path: pathlib.Path) -> None:
    d = tmp_path / "pki"
    d.mkdir()
    make_ca(d)
    for name, cn in (("server", "localhost"), ("fin", "fin-bot"), ("plat", "plat-bot"),
                     ("ops", "ops-admin"), ("app", "some-app")):
        make_cert(d, name, cn)
    creds = ReloadingCredentials(TlsFiles(str(d / "server.pem"), str(d / "server.key"),
                                          str(d / "ca.pem"))).credentials()
    identities = ("fin-bot=finance-owner", "plat-bot=platform-lead", "ops-admin")
    ca = (d / "ca.pem").read_bytes()

    def channel(port: int, client: str) -> grpc.aio.Channel:
        c = grpc.ssl_channel_credentials(root_certificates=ca,
                                         private_key=(d / f"{client}.key").read_bytes(),
                                         certificate_chain=(d / f"{client}.pem").read_bytes())
        return grpc.aio.secure_channel(f"127.0.0.1:{port}", c,
                                       options=[("grpc.ssl_target_name_override", "localhost")])

    async with sidecar(redis_url, tmp_path, identities=identities,
                       credentials=creds) as (port, _):
        async with channel(port, "app") as ch:
            pdp = pb_grpc.PolicyDecisionPointStub(ch)
            assert (await pdp.Authorize(authorize("fill"))).decision == pb.ALLOW
            denied = await pdp.Authorize(authorize("denied"))
            assert denied.decision == pb.DENY
            code, _ = await code_of(pb_grpc.AdminStub(ch).ListExceptions(
                pb.ListExceptionsRequest()))
            assert code == grpc.StatusCode.UNAUTHENTICATED  # no token, not an identity
        ask = pb.RequestExceptionRequest(
            denial_permit_id=denied.permit_id, budget_id="acme", amount_micros=HOLD_MICROS,
            duration_seconds=600, justification="Nightly batch ran long")
        async with channel(port, "ops") as ch:
            admin = pb_grpc.AdminStub(ch)
            code, text = await code_of(admin.RequestException(
                pb.RequestExceptionRequest(**{**_fields(ask), "requester": "someone-else"})))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "asks as itself" in text
            asked = await admin.RequestException(ask)
            assert asked.requester == "ops-admin"
        decide = pb.DecideExceptionRequest(exception_id=asked.exception_id)
        async with channel(port, "plat") as ch:
            code, text = await code_of(pb_grpc.AdminStub(ch).ApproveException(decide))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "decided by role 'finance-owner', not 'platform-lead'" in text
            # Nor can it grant directly by naming the finance role.
            code, text = await code_of(pb_grpc.AdminStub(ch).GrantException(
                pb.GrantExceptionRequest(
                    exception_path="finance-overage", budget_id="acme",
                    amount_micros=HOLD_MICROS, duration_seconds=600, approver_role="finance-owner",
                    justification="Nightly batch ran long")))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "holds role(s)" in text
        async with channel(port, "fin") as ch:
            admin = pb_grpc.AdminStub(ch)
            code, text = await code_of(admin.ApproveException(pb.DecideExceptionRequest(
                exception_id=asked.exception_id, approver="dana")))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "decides as itself" in text
            code, text = await code_of(admin.ApproveException(pb.DecideExceptionRequest(
                exception_id=asked.exception_id, approver_role="platform-lead")))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "holds role(s)" in text
            done = await admin.ApproveException(decide)
            assert done.state == pb.EXCEPTION_APPROVED
            assert (done.decided_by, done.decided_role) == ("fin-bot", "finance-owner")
        async with channel(port, "app") as ch:
            after = await pb_grpc.PolicyDecisionPointStub(ch).Authorize(authorize("after"))
            assert after.decision == pb.ALLOW
        # The CLI over mutual TLS: the bound identity, no token.
        tls = ("--target", f"127.0.0.1:{port}", "--tls-ca", str(d / "ca.pem"))
        rc, out = await cli("exception", "list", *tls, "--tls-cert", str(d / "fin.pem"),
                            "--tls-key", str(d / "fin.key"))
        assert rc == 0 and asked.exception_id in out and "fin-bot" in out
        rc, out = await cli("exception", "list", *tls, "--tls-cert", str(d / "app.pem"),
                            "--tls-key", str(d / "app.key"))
        assert rc == 1 and "UNAUTHENTICATED" in out
