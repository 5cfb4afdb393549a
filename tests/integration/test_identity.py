"""Caller identity against a real PKI (made by ``openssl`` here), a real Redis
and the real gRPC server with mutual TLS: who may Authorize, Closeout and Void
for which tenant and workload, over the PDP API and the ext_authz (Envoy) API,
in enforce and observe modes; an expired certificate; certificates rotated
while serving; bearer tokens; the identity recorded on events and in the ledger.

What each caller may do is written out below as a plain table (``MAY``), apart
from the bindings file, and every combination is tried.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import pathlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis
import yaml

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from keel_pdp.api.keel.pdp.v1 import pdp_pb2_grpc as pb_grpc
from keel_pdp.budget.keys import KeySpace
from keel_pdp.budget.store import BudgetStore
from keel_pdp.engine import Engine
from keel_pdp.ledger.store import open_store
from keel_pdp.mesh import envoy_types as et
from keel_pdp.mesh import services as mesh_services
from keel_pdp.mesh.config import MeshConfig
from keel_pdp.metrics import Metrics
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.server.admin import add_admin
from keel_pdp.server.identity import CallerGuard, CallerInterceptor, CallerTokens
from keel_pdp.server.service import build_server
from keel_pdp.server.tls import ReloadingCredentials, TlsFiles
from tests.conftest import free_port
from tests.helpers import budget, write_bundle
from tests.integration.conftest import drain, make_writer
from tests.integration.identity_pki import make_pki

SUPPORT = "spiffe://corp/ns/support/sa/bot"
TRIAGE = "spiffe://corp/ns/support/sa/triage"
BILLING = "spiffe://corp/ns/billing/sa/etl"
ENVOY = "spiffe://corp/ns/mesh/sa/egress"
STRANGER = "spiffe://corp/ns/other/sa/x"
LEGACY = "legacy-batch"  # a certificate with a CN and no SPIFFE ID

# client certificate file -> the identity it carries
CLIENTS = {"support": SUPPORT, "triage": TRIAGE, "billing": BILLING, "legacy": LEGACY,
           "envoy": ENVOY, "stranger": STRANGER}
BOT, BATCH, ETL = ("acme", "support-bot"), ("acme", "batch"), ("globex", "etl")
SCOPES = (BOT, BATCH, ETL)
# Who may do what, by hand: (identity, rpc) -> scopes allowed.
MAY: dict[tuple[str, str], set[tuple[str, str]]] = {
    (SUPPORT, "authorize"): {BOT}, (SUPPORT, "closeout"): {BOT}, (SUPPORT, "void"): {BOT},
    (TRIAGE, "authorize"): {BOT}, (TRIAGE, "closeout"): {BOT}, (TRIAGE, "void"): {BOT},
    (BILLING, "authorize"): {ETL}, (BILLING, "closeout"): {ETL}, (BILLING, "void"): {ETL},
    (LEGACY, "authorize"): {BATCH}, (LEGACY, "closeout"): {BATCH}, (LEGACY, "void"): {BATCH},
    ("ci-job", "authorize"): {ETL}, ("ci-job", "void"): {ETL},
}
# Who opens the permits that others then try to close.
OWNER = {BOT: "support", BATCH: "legacy", ETL: "billing"}

BINDINGS = [
    {"id": "support-team", "identities": ["spiffe://corp/ns/support/sa/*"],
     "tenants": ["acme"], "workloads": ["support-bot"]},
    {"id": "billing-etl", "identities": [BILLING], "tenants": ["globex"], "workloads": ["etl"]},
    {"id": "legacy-batch", "identities": [LEGACY], "tenants": ["acme"], "workloads": ["batch"]},
    {"id": "egress-gateway", "identities": [ENVOY], "rpcs": ["mesh"]},
    {"id": "ci", "identities": ["ci-job"], "tenants": ["globex"], "workloads": ["*"],
     "rpcs": ["authorize", "void"]},
]
CI_TOKEN = "ci-token-0123456789abcdef"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return make_pki(tmp_path_factory.mktemp("pki"))


def bundle(d: pathlib.Path, bindings: list[dict[str, Any]] = BINDINGS) -> pathlib.Path:
    write_bundle(d, [budget(f"{t}-{w}", "1000", scope={"tenant": t, "workload": w})
                     for t, w in SCOPES])
    (d / "callers.yaml").write_text(yaml.safe_dump(
        {"apiVersion": "keel.pdp/v1", "kind": "Callers", "bindings": bindings}))
    return d


@dataclass
class Sidecar:
    port: int
    engine: Engine
    metrics: Metrics
    holder: PolicyHolder
    keys: KeySpace
    creds: ReloadingCredentials | None

    def refusals(self, mode: str) -> float:
        total = 0.0
        for fam in self.metrics.registry.collect():
            if fam.name == "keel_pdp_caller_refusals":
                total += sum(s.value for s in fam.samples
                             if s.name.endswith("_total") and s.labels["mode"] == mode)
        return total


@asynccontextmanager
async def sidecar(redis_url: str, policies: pathlib.Path, mode: str, prefix: str,
                  tls: tuple[pathlib.Path, pathlib.Path, pathlib.Path] | None,
                  tokens: CallerTokens | None = None,
                  admin_token: str | None = None) -> AsyncIterator[Sidecar]:
    holder = PolicyHolder(policies)
    holder.reload()
    keys = KeySpace(prefix)
    store = BudgetStore(aioredis.Redis.from_url(redis_url), keys, 1.0)
    metrics = Metrics()
    engine = Engine(holder, store, metrics)
    guard = CallerGuard(mode, holder, metrics, store, tokens)
    creds = ReloadingCredentials(TlsFiles(*map(str, tls))) if tls else None
    server, _, port = build_server(
        engine, metrics, f"127.0.0.1:{free_port()}",
        credentials=creds.credentials() if creds else None,
        extra_services=[*mesh_services(engine, metrics, MeshConfig()),
                        add_admin(engine, lambda: admin_token)],
        interceptors=[CallerInterceptor(guard)])
    await server.start()
    try:
        yield Sidecar(port, engine, metrics, holder, keys, creds)
    finally:
        await server.stop(0)
        await store.close()


def mtls(pki: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path, pathlib.Path]:
    return pki / "server.pem", pki / "server.key", pki / "ca.pem"


def channel(pki: pathlib.Path, port: int, client: str | None) -> grpc.aio.Channel:
    roots = (pki / "ca.pem").read_bytes() + (pki / "ca2.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=(pki / f"{client}.key").read_bytes() if client else None,
        certificate_chain=(pki / f"{client}.pem").read_bytes() if client else None)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds,
                                   options=[("grpc.ssl_target_name_override", "localhost")])


_ids = itertools.count()


def areq(scope: tuple[str, str]) -> pb.AuthorizeRequest:
    return pb.AuthorizeRequest(request_id=f"r{next(_ids)}", tenant=scope[0], workload=scope[1],
                               model="gpt-4o-mini", provider="openai",
                               estimated_input_tokens=100, max_output_tokens=50)


def closeout(pid: str) -> pb.CloseoutRequest:
    return pb.CloseoutRequest(permit_id=pid, outcome=pb.SUCCEEDED,
                              usage=pb.Usage(input_tokens=100, output_tokens=10))


def events(redis_url: str, keys: KeySpace) -> list[tuple[str, str, dict[str, Any]]]:
    client = redis.Redis.from_url(redis_url)
    try:
        entries: Any = client.xrange(keys.stream)
        return [(f[b"type"].decode(), f[b"pid"].decode(), json.loads(f[b"data"]))
                for _, f in entries]
    finally:
        client.close()


async def expect_refused(call: Any, code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    assert info.value.code() == code, info.value.details()
    for w in words:
        assert w in (info.value.details() or ""), info.value.details()


# ------------------------------------------------------------ the PDP API
@pytest.mark.parametrize("mode", ["enforce", "observe"])
async def test_every_caller_scope_and_rpc(redis_url: str, tmp_path: pathlib.Path,
                                          pki: pathlib.Path, mode: str) -> None:
    prefix = f"id-{mode}-{next(_ids)}"
    async with sidecar(redis_url, bundle(tmp_path / "b"), mode, prefix, mtls(pki)) as sc:
        chans = {c: channel(pki, sc.port, c) for c in CLIENTS}
        stubs = {c: pb_grpc.PolicyDecisionPointStub(ch) for c, ch in chans.items()}
        want_authorizer: dict[str, str] = {}
        want_closer: dict[str, tuple[str, str]] = {}
        refused = 0
        try:
            for client, who in CLIENTS.items():
                for scope in SCOPES:
                    # Authorize
                    allowed = scope in MAY.get((who, "authorize"), set())
                    call: Any = stubs[client].Authorize(areq(scope), timeout=5)
                    if allowed or mode == "observe":
                        r = await call
                        assert r.decision == pb.ALLOW
                        want_authorizer[r.permit_id] = who
                    else:
                        await expect_refused(call, grpc.StatusCode.PERMISSION_DENIED, who,
                                             repr(scope[0]))
                    refused += not allowed
                    # Closeout and Void of a permit its owner opened
                    for rpc in ("closeout", "void"):
                        owner = OWNER[scope]
                        opened = await stubs[owner].Authorize(areq(scope), timeout=5)
                        assert opened.decision == pb.ALLOW
                        want_authorizer[opened.permit_id] = CLIENTS[owner]
                        allowed = scope in MAY.get((who, rpc), set())
                        refused += not allowed
                        pid = opened.permit_id
                        call = (stubs[client].Closeout(closeout(pid), timeout=5)
                                if rpc == "closeout" else
                                stubs[client].Void(pb.VoidRequest(permit_id=pid), timeout=5))
                        if allowed or mode == "observe":
                            r = await call
                            assert r.status == (pb.SETTLED if rpc == "closeout" else pb.VOIDED)
                            want_closer[pid] = (rpc, who)
                        else:
                            await expect_refused(call, grpc.StatusCode.PERMISSION_DENIED, who)
                            # Nothing moved: the owner still settles its held permit.
                            done = await stubs[OWNER[scope]].Closeout(closeout(pid), timeout=5)
                            assert done.status == pb.SETTLED
                            want_closer[pid] = ("closeout", CLIENTS[OWNER[scope]])
        finally:
            for ch in chans.values():
                await ch.close(None)
        # Counted once per refusal (enforce) or would-be refusal (observe), no tenant label.
        assert sc.refusals(mode) == refused
        # The authorizing and the closing identity are on the permit's events.
        seen_auth: dict[str, str] = {}
        seen_close: dict[str, tuple[str, str]] = {}
        for etype, pid, data in events(redis_url, sc.keys):
            if etype == "decision":
                seen_auth[pid] = data.get("caller", "")
            elif etype in ("settlement", "void"):
                seen_close[pid] = ("closeout" if etype == "settlement" else "void",
                                   data.get("caller", ""))
        assert seen_auth == want_authorizer
        assert seen_close == want_closer
        # ... and in the ledger.
        store = open_store(f"sqlite:///{tmp_path}/ledger.db")
        try:
            drain(make_writer(redis_url, store, key_prefix=prefix))
            rows = store.query("SELECT permit_id, kind, caller FROM ledger_entries")
        finally:
            store.close()
        booked_auth = {p: c for p, k, c in rows if k == "permit"}
        booked_close = {p: (("closeout" if k == "settlement" else "void"), c)
                        for p, k, c in rows if k in ("settlement", "void")}
        assert booked_auth == want_authorizer
        assert booked_close == want_closer


async def test_a_permit_from_another_sidecar_is_checked_on_its_redis_record(
        redis_url: str, tmp_path: pathlib.Path, pki: pathlib.Path) -> None:
    d = bundle(tmp_path / "b")
    prefix = f"id-two-{next(_ids)}"
    async with sidecar(redis_url, d, "enforce", prefix, mtls(pki)) as a, \
            sidecar(redis_url, d, "enforce", prefix, mtls(pki)) as b, \
            channel(pki, a.port, "support") as ca, \
            channel(pki, b.port, "billing") as cb_billing, \
            channel(pki, b.port, "triage") as cb_triage:
        r = await pb_grpc.PolicyDecisionPointStub(ca).Authorize(areq(BOT), timeout=5)
        # b never saw this permit: the owner comes from the permit record.
        await expect_refused(
            pb_grpc.PolicyDecisionPointStub(cb_billing).Closeout(closeout(r.permit_id),
                                                                 timeout=5),
            grpc.StatusCode.PERMISSION_DENIED, BILLING, "tenant 'acme'")
        done = await pb_grpc.PolicyDecisionPointStub(cb_triage).Closeout(
            closeout(r.permit_id), timeout=5)
        assert done.status == pb.SETTLED
        # An unknown permit is answered as before (nothing to protect).
        gone = await pb_grpc.PolicyDecisionPointStub(cb_triage).Closeout(
            closeout("pmt_" + "0" * 28), timeout=5)
        assert gone.status == pb.UNKNOWN_PERMIT


# --------------------------------------------------------- certificates
async def test_an_expired_certificate_is_refused_at_the_handshake(
        redis_url: str, tmp_path: pathlib.Path, pki: pathlib.Path) -> None:
    prefix = f"id-exp-{next(_ids)}"
    async with sidecar(redis_url, bundle(tmp_path / "b"), "enforce", prefix, mtls(pki)) as sc:
        async with channel(pki, sc.port, "expired") as ch:
            await expect_refused(pb_grpc.PolicyDecisionPointStub(ch).Authorize(
                areq(BOT), timeout=3), grpc.StatusCode.UNAVAILABLE)
        async with channel(pki, sc.port, None) as ch:  # no certificate at all
            await expect_refused(pb_grpc.PolicyDecisionPointStub(ch).Authorize(
                areq(BOT), timeout=3), grpc.StatusCode.UNAVAILABLE)
    assert events(redis_url, KeySpace(prefix)) == []


async def test_certificates_rotated_while_serving(redis_url: str, tmp_path: pathlib.Path,
                                                  pki: pathlib.Path) -> None:
    cert, key, ca = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "clients-ca.pem"
    cert.write_bytes((pki / "server.pem").read_bytes())
    key.write_bytes((pki / "server.key").read_bytes())
    ca.write_bytes((pki / "ca.pem").read_bytes())
    prefix = f"id-rot-{next(_ids)}"
    async with sidecar(redis_url, bundle(tmp_path / "b"), "enforce", prefix,
                       (cert, key, ca)) as sc:
        async with channel(pki, sc.port, "support") as ch:
            r = await pb_grpc.PolicyDecisionPointStub(ch).Authorize(areq(BOT), timeout=5)
            assert r.decision == pb.ALLOW
        async with channel(pki, sc.port, "support2") as ch:  # signed by the next CA
            await expect_refused(pb_grpc.PolicyDecisionPointStub(ch).Authorize(
                areq(BOT), timeout=3), grpc.StatusCode.UNAVAILABLE)
        # Rotate: a new server certificate and a new client CA, files replaced in place.
        cert.write_bytes((pki / "server2.pem").read_bytes())
        key.write_bytes((pki / "server2.key").read_bytes())
        ca.write_bytes((pki / "ca2.pem").read_bytes())
        async with channel(pki, sc.port, "support") as ch:  # old CA: refused now
            await expect_refused(pb_grpc.PolicyDecisionPointStub(ch).Authorize(
                areq(BOT), timeout=3), grpc.StatusCode.UNAVAILABLE)
        async with channel(pki, sc.port, "support2") as ch:
            stub = pb_grpc.PolicyDecisionPointStub(ch)
            r = await stub.Authorize(areq(BOT), timeout=5)  # same SPIFFE ID, same bindings
            assert r.decision == pb.ALLOW
            await expect_refused(stub.Authorize(areq(ETL), timeout=5),
                                 grpc.StatusCode.PERMISSION_DENIED, SUPPORT)
        assert sc.creds is not None and sc.creds.reloads == 1


async def test_bindings_reload_with_the_bundle(redis_url: str, tmp_path: pathlib.Path,
                                               pki: pathlib.Path) -> None:
    d = bundle(tmp_path / "b")
    prefix = f"id-rel-{next(_ids)}"
    async with sidecar(redis_url, d, "enforce", prefix, mtls(pki)) as sc, \
            channel(pki, sc.port, "stranger") as ch:
        stub = pb_grpc.PolicyDecisionPointStub(ch)
        await expect_refused(stub.Authorize(areq(ETL), timeout=5),
                             grpc.StatusCode.PERMISSION_DENIED, STRANGER,
                             "no Callers binding matches")
        bundle(d, [*BINDINGS, {"id": "newcomer", "identities": [STRANGER],
                               "tenants": ["globex"], "workloads": ["etl"]}])
        assert sc.holder.reload()
        r = await stub.Authorize(areq(ETL), timeout=5)
        assert r.decision == pb.ALLOW


@pytest.mark.parametrize("mode", ["enforce", "observe"])
async def test_bindings_open_the_admin_api_in_enforce_mode(
        redis_url: str, tmp_path: pathlib.Path, pki: pathlib.Path, mode: str) -> None:
    ops = "spiffe://corp/ns/ops/sa/admin"
    d = bundle(tmp_path / "b", [
        *BINDINGS, {"id": "ops", "identities": [ops], "rpcs": ["admin"]},
        {"id": "approvers", "identities": [BILLING], "rpcs": ["grant_exception"]}])
    prefix = f"id-adm-{mode}-{next(_ids)}"
    # No admin token and no --admin-identities: only bindings can open the admin API.
    async with sidecar(redis_url, d, mode, prefix, mtls(pki)) as sc:
        outcomes: dict[tuple[str, str], str] = {}
        for client in ("ops", "billing", "support"):
            async with channel(pki, sc.port, client) as ch:
                stub = pb_grpc.AdminStub(ch)
                for name, call in (
                        ("ReloadPolicy", stub.ReloadPolicy(pb.ReloadPolicyRequest(), timeout=5)),
                        ("ListExceptions",
                         stub.ListExceptions(pb.ListExceptionsRequest(), timeout=5))):
                    try:
                        await call
                        outcomes[(client, name)] = "OK"
                    except grpc.aio.AioRpcError as exc:
                        outcomes[(client, name)] = exc.code().name
        opened = {("ops", "ReloadPolicy"), ("ops", "ListExceptions"),
                  ("billing", "ListExceptions")} if mode == "enforce" else set()
        assert outcomes == {k: "OK" if k in opened else "PERMISSION_DENIED" for k in outcomes}


# ---------------------------------------------------------------- tokens
@pytest.mark.parametrize("mode", ["enforce", "observe"])
async def test_bearer_tokens_identify_callers_without_certificates(
        redis_url: str, tmp_path: pathlib.Path, mode: str) -> None:
    tok = tmp_path / "tokens"
    tok.write_text(f"ci-job {CI_TOKEN}\n")
    prefix = f"id-tok-{mode}-{next(_ids)}"
    async with sidecar(redis_url, bundle(tmp_path / "b"), mode, prefix, None,
                       CallerTokens(str(tok))) as sc:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sc.port}") as ch:
            stub = pb_grpc.PolicyDecisionPointStub(ch)
            md = (("authorization", f"Bearer {CI_TOKEN}"),)
            bad = (("authorization", "Bearer " + CI_TOKEN[::-1]),)
            outcomes: list[tuple[tuple[str, str], int, object]] = []
            for scope, meta in itertools.product(SCOPES, (md, bad, ())):
                try:
                    r = await stub.Authorize(areq(scope), metadata=meta, timeout=5)
                    outcomes.append((scope, len(meta), r.decision == pb.ALLOW))
                except grpc.aio.AioRpcError as exc:
                    outcomes.append((scope, len(meta), exc.code().name))
            ok_pid = (await stub.Authorize(areq(ETL), metadata=md, timeout=5)).permit_id
            if mode == "enforce":
                assert outcomes == [
                    (BOT, 1, "PERMISSION_DENIED"), (BOT, 1, "UNAUTHENTICATED"),
                    (BOT, 0, "UNAUTHENTICATED"),
                    (BATCH, 1, "PERMISSION_DENIED"), (BATCH, 1, "UNAUTHENTICATED"),
                    (BATCH, 0, "UNAUTHENTICATED"),
                    (ETL, 1, True), (ETL, 1, "UNAUTHENTICATED"), (ETL, 0, "UNAUTHENTICATED")]
                # ci-job may void but not close out (its binding grants authorize and void).
                await expect_refused(stub.Closeout(closeout(ok_pid), metadata=md, timeout=5),
                                     grpc.StatusCode.PERMISSION_DENIED,
                                     "do not grant the closeout RPC")
            else:
                assert all(ok is True for _, _, ok in outcomes)
                assert sc.refusals("observe") == 8
            v = await stub.Void(pb.VoidRequest(permit_id=ok_pid), metadata=md, timeout=5)
            assert v.status == pb.VOIDED
        voids = [d for t, p, d in events(redis_url, sc.keys) if t == "void" and p == ok_pid]
        assert [d.get("caller") for d in voids] == ["ci-job"]


# ----------------------------------------------------------- the Envoy path
def check_request(tenant: str, workload: str, principal: str = "",
                  ext: dict[str, str] | None = None) -> Any:
    req = et.auth.CheckRequest()
    http = req.attributes.request.http
    http.method, http.path, http.host = "POST", "/v1/chat/completions", "api.openai.com"
    body = json.dumps({"model": "gpt-4o-mini", "max_tokens": 50,
                       "messages": [{"role": "user", "content": f"hi {next(_ids)}"}]}).encode()
    http.id = hashlib.sha256(body).hexdigest()[:16]
    http.headers.update({"x-keel-tenant": tenant, "x-keel-workload": workload,
                         "x-request-id": "env-" + http.id})
    http.raw_body = body
    req.attributes.context_extensions.update(ext or {})
    if principal:
        req.attributes.source.principal = principal
    return req


# (peer certificate, source.principal, headers' scope, context_extensions) -> caller judged
ENVOY_CASES: list[tuple[str, str, tuple[str, str], dict[str, str], str]] = [
    ("envoy", SUPPORT, BOT, {}, SUPPORT),  # a mesh gateway vouches for the principal
    ("envoy", SUPPORT, ETL, {}, SUPPORT),
    ("envoy", BILLING, ETL, {}, BILLING),
    ("envoy", "", BOT, {}, ENVOY),  # nobody to vouch for: the gateway itself
    ("stranger", SUPPORT, BOT, {}, STRANGER),  # not a gateway: cannot vouch
    ("support", "", BOT, {}, SUPPORT),  # a workload's own proxy (Istio sidecar)
    ("support", "", ETL, {"keel_tenant": "acme", "keel_workload": "support-bot"}, SUPPORT),
    ("support", "", BOT, {"keel_tenant": "globex", "keel_workload": "etl"}, SUPPORT),
    ("legacy", "", BATCH, {}, LEGACY),
    ("triage", BILLING, ETL, {}, TRIAGE),
]


@pytest.mark.parametrize("mode", ["enforce", "observe"])
async def test_envoy_check_and_ext_proc(redis_url: str, tmp_path: pathlib.Path,
                                        pki: pathlib.Path, mode: str) -> None:
    prefix = f"id-env-{mode}-{next(_ids)}"
    async with sidecar(redis_url, bundle(tmp_path / "b"), mode, prefix, mtls(pki)) as sc:
        chans: dict[str, grpc.aio.Channel] = {}
        want: dict[str, str] = {}
        refused = 0
        try:
            for peer, principal, scope, ext, judged in ENVOY_CASES:
                ch = chans.setdefault(peer, channel(pki, sc.port, peer))
                stub = et.auth_grpc.AuthorizationStub(ch)
                resp = await stub.Check(check_request(*scope, principal, ext), timeout=5)
                named = (ext.get("keel_tenant", scope[0]), ext.get("keel_workload", scope[1]))
                allowed = named in MAY.get((judged, "authorize"), set())
                refused += not allowed
                case = (peer, principal, scope, ext)
                if allowed or mode == "observe":
                    assert resp.WhichOneof("http_response") == "ok_response", case
                    want[str(resp.dynamic_metadata["permit_id"])] = judged
                else:
                    assert resp.denied_response.status.code == 403, case
                    body = json.loads(resp.denied_response.body)["error"]
                    assert body["code"] == "CALLER_NOT_BOUND", case
                    assert judged in body["message"] and repr(named[0]) in body["message"]
            # ext_proc: a gateway (mesh) or a workload with closeout rights may open a
            # stream; anyone else is refused before a message is read.
            for peer, ok in (("envoy", True), ("support", True), ("legacy", True),
                             ("stranger", False)):
                ch = chans.setdefault(peer, channel(pki, sc.port, peer))
                process = ch.stream_stream(
                    "/envoy.service.ext_proc.v3.ExternalProcessor/Process",
                    request_serializer=et.proc.ProcessingRequest.SerializeToString,
                    response_deserializer=et.proc.ProcessingResponse.FromString)
                call = process(iter(()), timeout=5)
                if ok or mode == "observe":
                    assert [m async for m in call] == []
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        _ = [m async for m in call]
                    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert CLIENTS[peer] in (info.value.details() or "")
                refused += not ok
        finally:
            for ch in chans.values():
                await ch.close(None)
        assert sc.refusals(mode) == refused
        got = {p: d.get("caller", "") for t, p, d in events(redis_url, sc.keys)
               if t == "decision"}
        assert got == want
