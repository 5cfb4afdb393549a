"""Hostile callers of the exception methods on a shared Keel: a binding's tenants
limit what its exception RPCs act on, and asking for an exception does not
imply granting one. Real PKI, real Redis, the real server in enforce mode with
no admin token: only the Callers bindings open the Admin API.

* ``acme-approver`` (``grant_exception`` on acme) cannot request, grant, approve,
  reject or list on globex's budgets, nor on a budget every tenant spends from;
* ``bot-asks`` (``request_exception`` only) can ask on its own tenant and list
  its own requests, and cannot grant, approve or reject anything;
* ``central-finance`` (``grant_exception`` on ``*``) still decides on every tenant;
* ``globex-legacy`` (a bundle written before ``request_exception`` existed:
  ``grant_exception`` alone) still asks and grants on its own tenant;
* the approver-role and self-approval checks are unchanged for all of them.

Each refusal is PERMISSION_DENIED naming the tenant and the caller's binding,
and moves nothing (the request stays pending, no grant is written).
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
import yaml

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from tests.helpers import budget, write_bundle
from tests.integration.identity_pki import make_pki
from tests.integration.test_identity import (
    BILLING,
    LEGACY,
    SUPPORT,
    TRIAGE,
    Sidecar,
    channel,
    mtls,
    sidecar,
)

OPS = "spiffe://corp/ns/ops/sa/admin"
# The clients' certificates (tests.integration.identity_pki) by role here.
ASKER, ACME_APPROVER, CENTRAL, GLOBEX_LEGACY = "support", "triage", "ops", "legacy"

BINDINGS: list[dict[str, Any]] = [
    # Who may Authorize (to be denied, and so have something to ask about).
    {"id": "support-team", "identities": ["spiffe://corp/ns/support/sa/*"],
     "tenants": ["acme"], "workloads": ["support-bot"]},
    {"id": "billing-etl", "identities": [BILLING], "tenants": ["globex"], "workloads": ["etl"]},
    # The workload owner: may ask, for its own tenant and workload.
    {"id": "bot-asks", "identities": [SUPPORT], "tenants": ["acme"],
     "workloads": ["support-bot"], "rpcs": ["request_exception"]},
    # acme's approver.
    {"id": "acme-approver", "identities": [TRIAGE], "tenants": ["acme"], "workloads": ["*"],
     "rpcs": ["grant_exception"]},
    # A central finance approver.
    {"id": "central-finance", "identities": [OPS], "tenants": ["*"],
     "rpcs": ["grant_exception"]},
    # As bundles were written before request_exception: grant_exception alone.
    {"id": "globex-legacy", "identities": [LEGACY], "tenants": ["globex"],
     "rpcs": ["grant_exception"]},
]
# The same without request_exception: what a bundle could say before it existed
# (so the tests of tenant scoping need nothing new to load).
GRANT_ONLY = [b for b in BINDINGS if "request_exception" not in b.get("rpcs", ())]
ROLE = "finance-owner"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def bundle(d: pathlib.Path, bindings: list[dict[str, Any]] = BINDINGS) -> pathlib.Path:
    # 100 + 50 tokens of gpt-4o-mini cost 45 micro-USD: the $0.00001 caps deny them.
    big = {"window": "monthly", "exception_path": "finance-overage"}
    write_bundle(d, [
        budget("acme-bot", "0.000010", scope={"tenant": "acme", "workload": "support-bot"},
               **big),
        budget("globex-monthly", "0.000010", scope={"tenant": "globex"}, **big),
        budget("org-monthly", "1000", **big),                          # every tenant's
        budget("per-tenant", "1000", scope={"tenant": "*"}, per=["tenant"], **big),
    ], exception_paths=[{"name": "finance-overage", "approver_role": ROLE,
                         "max_overage_usd": "10.00", "max_duration_hours": 24}],
        settings={"allow_constrain": False})
    (d / "callers.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "keel.pdp/v1", "kind": "Callers", "bindings": bindings}))
    return d


_n = iter(range(1_000_000))


class Clients:
    def __init__(self, pki: pathlib.Path, sc: Sidecar) -> None:
        self.pki, self.sc = pki, sc
        self.chans: dict[str, grpc.aio.Channel] = {}

    def admin(self, client: str) -> pb_grpc.AdminAsyncStub:
        if client not in self.chans:
            self.chans[client] = channel(self.pki, self.sc.port, client)
        return pb_grpc.AdminStub(self.chans[client])

    def pdp(self, client: str) -> pb_grpc.PolicyDecisionPointAsyncStub:
        self.admin(client)
        return pb_grpc.PolicyDecisionPointStub(self.chans[client])

    async def denial(self, client: str, tenant: str, workload: str) -> str:
        r = await self.pdp(client).Authorize(pb.AuthorizeRequest(
            request_id=f"x{next(_n)}", tenant=tenant, workload=workload,
            model="gpt-4o-mini", provider="openai", estimated_input_tokens=100,
            max_output_tokens=50), timeout=5)
        assert r.decision == pb.DENY, r
        return r.permit_id

    async def close(self) -> None:
        for ch in self.chans.values():
            await ch.close(None)


@asynccontextmanager
async def shared_keel(redis_url: str, d: pathlib.Path, pki: pathlib.Path,
                     bindings: list[dict[str, Any]] = BINDINGS) -> AsyncIterator[Clients]:
    async with sidecar(redis_url, bundle(d, bindings), "enforce", f"exs-{next(_n)}",
                       mtls(pki)) as sc:
        clients = Clients(pki, sc)
        try:
            yield clients
        finally:
            await clients.close()


def ask(denial: str, budget_id: str, **scope: str) -> pb.RequestExceptionRequest:
    return pb.RequestExceptionRequest(
        denial_permit_id=denial, budget_id=budget_id, scope=scope, amount_micros=1_000_000,
        duration_seconds=3600, justification="Quarter close backlog, FIN-77")


def grant(budget_id: str, **scope: str) -> pb.GrantExceptionRequest:
    return pb.GrantExceptionRequest(
        exception_path="finance-overage", budget_id=budget_id, scope=scope,
        amount_micros=1_000_000, duration_seconds=3600, approver_role=ROLE,
        justification="Direct raise, approved in FIN-78")


def decide(exc_id: str, note: str = "") -> pb.DecideExceptionRequest:
    return pb.DecideExceptionRequest(exception_id=exc_id, approver_role=ROLE, note=note)


async def refused(call: Any, *words: str,
                  code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    text = info.value.details() or ""
    assert info.value.code() == code, text
    for w in words:
        assert w in text, text
    return text


async def listed(stub: pb_grpc.AdminAsyncStub) -> dict[str, pb.ExceptionRecord]:
    out = await stub.ListExceptions(pb.ListExceptionsRequest(), timeout=5)
    return {r.exception_id: r for r in out.exceptions}


# ------------------------------------------------------------------ tenants
async def test_a_binding_of_one_tenant_cannot_act_on_another_tenants_budgets(
        redis_url: str, tmp_path: pathlib.Path, pki: pathlib.Path) -> None:
    async with shared_keel(redis_url, tmp_path / "b", pki, GRANT_ONLY) as c:
        globex_denial = await c.denial("billing", "globex", "etl")
        # globex's own approver (an old-style grant_exception binding) asks for globex.
        req = await c.admin(GLOBEX_LEGACY).RequestException(
            ask(globex_denial, "globex-monthly"), timeout=5)
        assert req.state == pb.EXCEPTION_PENDING and req.requester == LEGACY

        acme = c.admin(ACME_APPROVER)
        words = ("tenant 'globex'", "acme-approver")
        await refused(acme.ApproveException(decide(req.exception_id), timeout=5), *words)
        await refused(acme.RejectException(decide(req.exception_id, "not yours to refuse"),
                                           timeout=5), *words)
        await refused(acme.GrantException(grant("globex-monthly"), timeout=5), *words)
        await refused(acme.RequestException(ask(globex_denial, "globex-monthly"), timeout=5),
                      *words)
        # A per-tenant budget: judged on the tenant the grant names.
        await refused(acme.GrantException(grant("per-tenant", tenant="globex"), timeout=5),
                      *words)
        # A budget every tenant spends from: only a tenants ['*'] binding raises it.
        await refused(acme.GrantException(grant("org-monthly"), timeout=5),
                      "tenant '*'", "acme-approver")
        # Lists show only what the caller may decide.
        assert req.exception_id not in await listed(acme)

        # Nothing moved: still pending, undecided; no grant in any budget's window.
        central = c.admin(CENTRAL)
        seen = (await listed(central))[req.exception_id]
        assert seen.state == pb.EXCEPTION_PENDING and not seen.decided_by
        store = c.sc.engine.store
        for bid, split in (("globex-monthly", ()), ("per-tenant", ("globex",)),
                           ("org-monthly", ())):
            b = c.sc.holder.current.budget(bid)  # type: ignore[union-attr]
            assert b is not None
            assert not await store.client.hgetall(
                store.keys.budget_grants(b, split)), bid

        # On its own tenant the same binding grants (per-tenant budget, acme's counter).
        ok = await acme.GrantException(grant("per-tenant", tenant="acme"), timeout=5)
        assert ok.created


async def test_a_central_approver_bound_to_every_tenant_still_decides_everywhere(
        redis_url: str, tmp_path: pathlib.Path, pki: pathlib.Path) -> None:
    async with shared_keel(redis_url, tmp_path / "b", pki, GRANT_ONLY) as c:
        globex_denial = await c.denial("billing", "globex", "etl")
        acme_denial = await c.denial("support", "acme", "support-bot")
        g = await c.admin(GLOBEX_LEGACY).RequestException(
            ask(globex_denial, "globex-monthly"), timeout=5)
        a = await c.admin(ACME_APPROVER).RequestException(ask(acme_denial, "acme-bot"),
                                                          timeout=5)
        central = c.admin(CENTRAL)
        assert {g.exception_id, a.exception_id} <= set(await listed(central))
        # The role check is unchanged: a binding acts in a role, but only the path's.
        await refused(central.ApproveException(pb.DecideExceptionRequest(
            exception_id=g.exception_id, approver_role="platform-lead"), timeout=5),
            "decided by role 'finance-owner'")
        done = await central.ApproveException(decide(g.exception_id), timeout=5)
        assert done.state == pb.EXCEPTION_APPROVED and done.decided_by == OPS
        assert done.grant_id
        no = await central.RejectException(decide(a.exception_id, "use the batch tier"),
                                           timeout=5)
        assert no.state == pb.EXCEPTION_REJECTED
        raised = await central.GrantException(grant("org-monthly"), timeout=5)
        assert raised.created
        # The approved grant lets globex's next call through.
        r = await c.pdp("billing").Authorize(pb.AuthorizeRequest(
            request_id="after", tenant="globex", workload="etl", model="gpt-4o-mini",
            provider="openai", estimated_input_tokens=100, max_output_tokens=50), timeout=5)
        assert r.decision == pb.ALLOW
        assert pb.EXCEPTION_GRANT_APPLIED in [x.code for x in r.block_reasons]


# ------------------------------------------------------- asking is not granting
async def test_request_exception_asks_and_lists_its_own_but_cannot_grant_or_decide(
        redis_url: str, tmp_path: pathlib.Path, pki: pathlib.Path) -> None:
    async with shared_keel(redis_url, tmp_path / "b", pki) as c:
        owner = c.admin(ASKER)
        mine = await owner.RequestException(
            ask(await c.denial("support", "acme", "support-bot"), "acme-bot"), timeout=5)
        assert mine.state == pb.EXCEPTION_PENDING and mine.requester == SUPPORT
        # acme's approver asks on another acme denial: the owner may not see or decide it.
        theirs = await c.admin(ACME_APPROVER).RequestException(
            ask(await c.denial("triage", "acme", "support-bot"), "acme-bot"), timeout=5)

        words = ("grant_exception", "do not grant the grant_exception RPC")
        await refused(owner.GrantException(grant("acme-bot"), timeout=5), *words)
        await refused(owner.ApproveException(decide(mine.exception_id), timeout=5), *words)
        await refused(owner.ApproveException(decide(theirs.exception_id), timeout=5), *words)
        await refused(owner.RejectException(decide(theirs.exception_id, "not needed"),
                                            timeout=5), *words)
        assert set(await listed(owner)) == {mine.exception_id}
        # Asking on another tenant's budget is refused like any other out-of-scope call.
        await refused(owner.RequestException(
            ask(await c.denial("billing", "globex", "etl"), "globex-monthly"), timeout=5),
            "request_exception", "tenant 'globex'", "bot-asks")
        # It cannot reach the rest of the Admin API either.
        await refused(owner.ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5),
                      "do not grant the admin RPC")

        # acme's approver decides the owner's request; the self-approval check holds.
        acme = c.admin(ACME_APPROVER)
        await refused(acme.ApproveException(decide(theirs.exception_id), timeout=5),
                      "cannot decide their own")
        ok = await acme.ApproveException(decide(mine.exception_id), timeout=5)
        assert ok.state == pb.EXCEPTION_APPROVED and ok.decided_by == TRIAGE
        assert set(await listed(acme)) == {mine.exception_id, theirs.exception_id}


async def test_a_grant_exception_binding_written_before_request_exception_still_works(
        redis_url: str, tmp_path: pathlib.Path, pki: pathlib.Path) -> None:
    async with shared_keel(redis_url, tmp_path / "b", pki, GRANT_ONLY) as c:
        legacy = c.admin(GLOBEX_LEGACY)
        req = await legacy.RequestException(
            ask(await c.denial("billing", "globex", "etl"), "globex-monthly"), timeout=5)
        assert req.state == pb.EXCEPTION_PENDING
        assert req.exception_id in await listed(legacy)
        await refused(legacy.ApproveException(decide(req.exception_id), timeout=5),
                      "cannot decide their own")
        direct = await legacy.GrantException(grant("globex-monthly"), timeout=5)
        assert direct.created and direct.amount_micros == 1_000_000
        await refused(legacy.GrantException(grant("acme-bot"), timeout=5),
                      "tenant 'acme'", "globex-legacy")


# ------------------------------------------------------------ policy tools
def test_policy_check_refuses_unknown_rpcs_and_warns_about_unscoped_exception_bindings(
        tmp_path: pathlib.Path) -> None:
    bad = bundle(tmp_path / "bad", [*BINDINGS, {"id": "typo", "identities": ["x"],
                                                "tenants": ["acme"],
                                                "rpcs": ["grant_exceptions"]}])
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "policy", "check", str(bad)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout + res.stderr
    assert "callers.yaml" in out and f"bindings.{len(BINDINGS)}.rpcs.0" in out, out
    assert "request_exception" in out, out  # the accepted names are listed

    warned = bundle(tmp_path / "warn", [
        *BINDINGS,
        {"id": "old-approver", "identities": ["y"], "rpcs": ["grant_exception"]},
        {"id": "ops-acme", "identities": ["z"], "tenants": ["acme"], "rpcs": ["admin"]}])
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "policy", "check",
                          str(warned)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    n = len(BINDINGS)
    assert (f"callers.yaml: bindings.{n}.tenants: binding 'old-approver' grants "
            "grant_exception but names no tenant") in res.stdout, res.stdout
    assert (f"callers.yaml: bindings.{n + 1}.rpcs: binding 'ops-acme' grants admin"
            in res.stdout), res.stdout


def test_policy_explain_shows_request_and_grant_exception_per_tenant(
        tmp_path: pathlib.Path) -> None:
    d = bundle(tmp_path / "b")

    def explain(identity: str, tenant: str, workload: str) -> str:
        res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "policy", "explain",
                              "--policies", str(d), "--identity", identity, "--tenant", tenant,
                              "--workload", workload], capture_output=True, text=True,
                             timeout=60)
        assert res.returncode == 0, res.stderr
        return res.stdout

    out = explain(SUPPORT, "acme", "support-bot")
    assert "rpcs request_exception" in out
    assert "request_exception: allowed by bot-asks." in out
    assert "grant_exception: refused (its bindings (bot-asks, support-team) do not grant the " \
        "grant_exception RPC)" in out
    out = explain(TRIAGE, "globex", "etl")
    assert "grant_exception: refused (no binding grants grant_exception for tenant 'globex'" \
        in out
    assert "request_exception: refused (no binding grants request_exception for tenant " \
        "'globex'" in out
    out = explain(LEGACY, "globex", "etl")
    assert "grant_exception: allowed by globex-legacy." in out
    assert "request_exception: allowed by globex-legacy." in out  # implied by grant_exception
    out = explain(OPS, "initech", "anything")
    assert "grant_exception: allowed by central-finance." in out


def test_every_exception_method_of_the_admin_service_has_its_rpc() -> None:
    """A new Admin method is opened by ``admin`` only until it is listed here."""
    from keel_pdp.server.identity import EXCEPTION_METHODS

    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Admin"].methods}
    assert set(EXCEPTION_METHODS) == {m for m in methods if "Exception" in m}
    assert set(EXCEPTION_METHODS.values()) == {"grant_exception", "request_exception"}
