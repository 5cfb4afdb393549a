"""kind: Callers bindings: validation, matching, grants, settings and token files.

Matching is checked against a reference written here with its own method
(a regular expression per pattern), over generated identities and patterns.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
from typing import Any

import grpc
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from keel_pdp.metrics import Metrics
from keel_pdp.policy.callers import pattern_matches
from keel_pdp.policy.loader import PolicyError, load_bundle
from keel_pdp.policy.reload import PolicyHolder
from keel_pdp.server.identity import CallerGuard, CallerTokens
from keel_pdp.settings import ServeSettings, SettingsError
from tests.helpers import budget, write_bundle

SUPPORT = "spiffe://corp/ns/support/sa/bot"


def callers_doc(bindings: list[dict[str, Any]]) -> dict[str, Any]:
    return {"apiVersion": "keel.pdp/v1", "kind": "Callers", "bindings": bindings}


def bundle(tmp: pathlib.Path, bindings: list[dict[str, Any]] | None) -> pathlib.Path:
    d = write_bundle(tmp / "bundle", [
        budget("acme-bot", "10", scope={"tenant": "acme", "workload": "support-bot"}),
        budget("globex-etl", "10", scope={"tenant": "globex", "workload": "etl"})])
    if bindings is not None:
        (d / "callers.yaml").write_text(yaml.safe_dump(callers_doc(bindings)))
    return d


BINDINGS: list[dict[str, Any]] = [
    {"id": "support", "identities": ["spiffe://corp/ns/support/sa/*"], "tenants": ["acme"],
     "workloads": ["support-bot"]},
    {"id": "bot-extra", "identities": [SUPPORT], "tenants": ["globex"], "workloads": ["etl"],
     "rpcs": ["authorize"]},
    {"id": "legacy", "identities": ["legacy-batch"], "tenants": ["*"], "workloads": ["*"],
     "rpcs": ["authorize"]},
    {"id": "egress", "identities": ["spiffe://corp/ns/mesh/sa/egress"], "rpcs": ["mesh"]},
]


# ------------------------------------------------------------- validation
def test_a_bundle_without_callers_has_none(tmp_path: pathlib.Path) -> None:
    assert load_bundle(bundle(tmp_path, None)).callers is None


def test_bindings_compile_and_union_over_every_matching_binding(tmp_path: pathlib.Path) -> None:
    snap = load_bundle(bundle(tmp_path, BINDINGS))
    assert snap.callers is not None
    g = snap.callers.grants(SUPPORT)
    assert [b.id for b in g.bindings] == ["bot-extra", "support"]
    assert g.allows("authorize", "acme", "support-bot")
    assert g.allows("authorize", "globex", "etl")  # from the exact binding
    assert g.allows("closeout", "acme", "support-bot")
    assert not g.allows("closeout", "globex", "etl")  # bot-extra grants authorize only
    assert "no binding grants closeout for tenant 'globex'" in g.lacking("closeout", "globex",
                                                                         "etl")
    other = snap.callers.grants("spiffe://corp/ns/support/sa/triage")
    assert [b.id for b in other.bindings] == ["support"]
    assert not other.allows("authorize", "globex", "etl")
    assert not other.allows("authorize", "acme", "other-workload")
    assert "with workload 'other-workload'" in other.lacking("authorize", "acme",
                                                              "other-workload")
    nobody = snap.callers.grants("spiffe://corp/ns/support/sa/bot/extra")
    assert nobody.bindings == () and "no Callers binding matches" in nobody.lacking(
        "authorize", "acme", "support-bot")
    egress = snap.callers.grants("spiffe://corp/ns/mesh/sa/egress")
    assert egress.allows("mesh") and not egress.allows("authorize", "acme", "support-bot")
    assert "do not grant the authorize RPC" in egress.lacking("authorize", "acme", "x")


@pytest.mark.parametrize(("binding", "field", "message"), [
    ({"id": "a", "identities": ["spiffe://corp/ns/*-bots/sa/x"], "tenants": ["acme"]},
     "bindings.0.identities.0", "one whole '/' segment"),
    ({"id": "a", "identities": [" spiffe://corp/x"], "tenants": ["acme"]},
     "bindings.0.identities.0", "surrounding spaces"),
    ({"id": "a", "identities": ["x"]}, "bindings.0.tenants", "names at least one tenant"),
    ({"id": "a", "identities": [], "tenants": ["acme"]}, "bindings.0.identities",
     "at least 1 item"),
    ({"id": "a", "identities": ["x"], "tenants": ["acme"], "rpcs": ["delete_everything"]},
     "bindings.0.rpcs.0", "authorize"),
    ({"id": "a", "identities": ["x"], "tenants": ["acme"], "colour": "red"},
     "bindings.0.colour", "Extra inputs"),
])
def test_bad_bindings_are_rejected_naming_file_and_field(
        tmp_path: pathlib.Path, binding: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(PolicyError) as info:
        load_bundle(bundle(tmp_path, [binding]))
    found = [p for p in info.value.problems if p.file == "callers.yaml" and p.field == field]
    assert found, info.value.problems
    assert message in found[0].reason


def test_duplicate_binding_ids_are_rejected(tmp_path: pathlib.Path) -> None:
    b = {"id": "a", "identities": ["x"], "tenants": ["acme"]}
    with pytest.raises(PolicyError, match="binding id 'a' already defined"):
        load_bundle(bundle(tmp_path, [b, b]))


def test_unknown_tenants_and_workloads_and_any_trust_domain_are_warned(
        tmp_path: pathlib.Path) -> None:
    snap = load_bundle(bundle(tmp_path, [
        {"id": "typo", "identities": ["spiffe://*/ns/a/sa/b"], "tenants": ["acmee"],
         "workloads": ["support-bot", "suport-bot"]}]))
    text = "\n".join(snap.warnings)
    assert "tenant 'acmee' is not named by any budget" in text
    assert "workload 'suport-bot' is not named" in text
    assert "'support-bot'" not in text
    assert "every trust domain" in text


def test_policy_check_lists_warnings_and_explain_shows_overlaps(tmp_path: pathlib.Path) -> None:
    d = bundle(tmp_path, [*BINDINGS, {"id": "typo", "identities": ["x"], "tenants": ["acmee"]}])
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "policy", "check", str(d)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "warning: callers.yaml: bindings.4.tenants.0: tenant 'acmee'" in res.stdout
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "policy", "explain",
                          "--policies", str(d), "--identity", SUPPORT, "--tenant", "globex",
                          "--workload", "etl"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "2 bindings match" in out
    assert "bot-extra" in out and "support" in out
    assert "exact identity" in out and "wildcard" in out
    assert "authorize: allowed by bot-extra" in out
    assert "closeout: refused" in out


# --------------------------------------------------------------- matching
def reference(pattern: str, identity: str) -> bool:
    """'*' is one whole non-empty segment between '/' (a regular expression)."""
    parts = [("[^/]+" if seg == "*" else re.escape(seg)) for seg in pattern.split("/")]
    return re.fullmatch("/".join(parts), identity) is not None


SEGMENT = st.sampled_from(["spiffe:", "", "corp", "ns", "sa", "support", "bot", "a.b", "*"])


@settings(max_examples=400, deadline=None)
@given(st.lists(SEGMENT, min_size=1, max_size=7), st.lists(SEGMENT, min_size=1, max_size=7))
def test_pattern_matching_agrees_with_a_regular_expression(
        pattern: list[str], identity: list[str]) -> None:
    pat = "/".join(pattern)
    ident = "/".join(s for s in identity if s != "*") or "x"
    assert pattern_matches(pat, ident) == reference(pat, ident)


def test_a_wildcard_never_matches_an_empty_segment_or_a_different_depth() -> None:
    assert pattern_matches("spiffe://corp/ns/support/sa/*", SUPPORT)
    assert not pattern_matches("spiffe://corp/ns/support/sa/*", "spiffe://corp/ns/support/sa/")
    assert not pattern_matches("spiffe://corp/ns/support/sa/*", SUPPORT + "/x")
    assert not pattern_matches("spiffe://corp/ns/*/sa/bot", "spiffe://corp/ns/sa/bot")


# ------------------------------------------------------------------ guard
def test_judge_names_identity_and_missing_binding(tmp_path: pathlib.Path) -> None:
    holder = PolicyHolder(bundle(tmp_path, BINDINGS))
    holder.reload()
    guard = CallerGuard("enforce", holder, Metrics())
    assert guard.judge("authorize", SUPPORT, "acme", "support-bot") is None
    r = guard.judge("authorize", "spiffe://corp/ns/support/sa/triage", "globex", "etl")
    assert r is not None and r.code == grpc.StatusCode.PERMISSION_DENIED
    assert "spiffe://corp/ns/support/sa/triage" in r.message and "'globex'" in r.message
    assert r.reason == "scope"
    none = guard.judge("authorize", "", "acme", "support-bot")
    assert none is not None and none.code == grpc.StatusCode.UNAUTHENTICATED
    assert guard.judge("closeout", "legacy-batch", "acme", "x").reason == "rpc"  # type: ignore[union-attr]
    assert guard.judge("authorize", "stranger", "acme", "x").reason == "not_bound"  # type: ignore[union-attr]
    # Hot reload: the bindings go with the bundle.
    (holder.directory / "callers.yaml").unlink()  # type: ignore[operator]
    assert holder.reload()
    r = guard.judge("authorize", SUPPORT, "acme", "support-bot")
    assert r is not None and "has no Callers bindings" in r.message


def test_modes_are_validated() -> None:
    with pytest.raises(ValueError, match="not one of"):
        CallerGuard("lenient", PolicyHolder(), Metrics())


# ----------------------------------------------------------------- tokens
def test_tokens_map_to_identities_and_follow_the_file(tmp_path: pathlib.Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# identity token\nci-job  tok-aaaaaaaaaaaaaaaa\nbatch tok-bbbbbbbbbbbbbbbb\n")
    tokens = CallerTokens(str(f))
    assert tokens.identity("tok-aaaaaaaaaaaaaaaa") == "ci-job"
    assert tokens.identity("tok-bbbbbbbbbbbbbbbb") == "batch"
    assert tokens.identity("tok-aaaaaaaaaaaaaaab") == ""
    assert tokens.identity("") == ""
    f.write_text("ci-job tok-cccccccccccccccc\n")
    tokens._checked = 0.0  # next call re-reads (normally at most once a second)
    assert tokens.identity("tok-aaaaaaaaaaaaaaaa") == ""
    assert tokens.identity("tok-cccccccccccccccc") == "ci-job"
    f.write_text("ci-job short\n")  # a bad file keeps the last good table
    tokens._checked = 0.0
    assert tokens.identity("tok-cccccccccccccccc") == "ci-job"
    bad = tmp_path / "bad"
    bad.write_text("only-one-field\n")
    with pytest.raises(ValueError, match="bad:1: expected '<identity> <token>'"):
        CallerTokens(str(bad))


# --------------------------------------------------------------- settings
def _settings(**kw: Any) -> ServeSettings:
    base: dict[str, Any] = {
        "policies": "p", "redis_url": "redis://x", "listen": "127.0.0.1:1", "metrics_port": 0,
        "metrics_host": "127.0.0.1", "store_timeout_s": 0.025, "key_prefix": "k",
        "sweep_interval_s": 1.0, "reload_interval_s": 1.0, "log_level": "INFO",
        "grace_s": 1.0}
    base.update(kw)
    return ServeSettings(**base).validate()


def test_open_is_the_default_only_on_loopback() -> None:
    assert _settings().caller_auth_mode == "open"
    assert _settings(listen="[::1]:1").caller_auth_mode == "open"
    assert _settings(listen="0.0.0.0:1").caller_auth_mode == "enforce"
    assert _settings(listen="10.1.2.3:1").caller_auth_mode == "enforce"
    assert _settings(listen="0.0.0.0:1", caller_auth="observe").caller_auth_mode == "observe"
    assert _settings(caller_auth="enforce").caller_auth_mode == "enforce"
    with pytest.raises(SettingsError, match="--caller-auth 'strict'"):
        _settings(caller_auth="strict")


def test_enforce_without_any_way_to_identify_callers_refuses_to_start() -> None:
    res = subprocess.run([sys.executable, "-m", "keel_pdp.cli", "serve", "--listen",
                          "0.0.0.0:0", "--allow-insecure-listen", "--metrics-port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert "--caller-auth enforce (the default beyond loopback) needs a way to identify" \
        in res.stderr


def test_policy_diff_names_binding_changes(tmp_path: pathlib.Path) -> None:
    from keel_pdp.policy.commands import diff_snapshots

    old = load_bundle(bundle(tmp_path / "old", BINDINGS))
    changed = [dict(b) for b in BINDINGS if b["id"] != "legacy"]
    changed[0]["tenants"] = ["acme", "globex"]
    changed.append({"id": "newcomer", "identities": ["x"], "tenants": ["acme"]})
    new = load_bundle(bundle(tmp_path / "new", changed))
    lines = diff_snapshots(old, new)
    assert "Caller binding support: tenants now also globex." in lines
    assert any(x.startswith("Caller binding legacy removed (was legacy (identities "
                            "legacy-batch;") for x in lines)
    assert any(x.startswith("Caller binding newcomer added: newcomer (identities x;")
               for x in lines)
    gone = diff_snapshots(old, load_bundle(bundle(tmp_path / "none", None)))
    assert any("Callers bindings were removed" in x for x in gone)


async def test_the_interceptor_refuses_a_handler_it_cannot_wrap(tmp_path: pathlib.Path) -> None:
    from keel_pdp.server.identity import CallerInterceptor

    holder = PolicyHolder(bundle(tmp_path, BINDINGS))
    holder.reload()
    icpt = CallerInterceptor(CallerGuard("enforce", holder, Metrics()))

    async def streaming(requests: Any, context: Any) -> Any:
        return None

    class Details:
        method = "/keel.pdp.v1.PolicyDecisionPoint/Authorize"

    async def continuation(details: Any) -> Any:
        return grpc.stream_unary_rpc_method_handler(streaming)

    handler = await icpt.intercept_service(continuation, Details())
    assert handler.unary_unary is not None and handler.stream_unary is None

    class Ctx:
        async def abort(self, code: grpc.StatusCode, details: str) -> None:
            raise RuntimeError(f"{code.name}: {details}")

    with pytest.raises(RuntimeError, match="INTERNAL: caller identity checks could not"):
        await handler.unary_unary(None, Ctx())


def test_ledger_migration_3_adds_the_caller_to_an_existing_store(
        tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from keel_pdp.ledger import migrations
    from keel_pdp.ledger import store as ledger_store

    url = f"sqlite:///{tmp_path}/old.db"
    # The store as the release before caller identities left it: schema 2, one entry.
    monkeypatch.setattr(ledger_store, "MIGRATIONS", migrations.MIGRATIONS[:2])
    monkeypatch.setattr(ledger_store, "LATEST", 2)
    old = ledger_store.open_store(url)
    with old.tx() as tx:
        tx.run("INSERT INTO ledger_entries (event_id, seq, kind, permit_id, ts_ms, "
               "booked_at_ms, period, belongs_to) VALUES ('1-0', 0, 'void', 'pmt_x', 1, 1, "
               "'2026-11', '2026-11')")
    old.close()
    monkeypatch.undo()
    new = ledger_store.open_store(url)
    try:
        assert new.schema_version() == migrations.LATEST  # 3 and every later one
        assert new.query("SELECT caller FROM ledger_entries") == [("",)]
        # The append-only guards still hold for the new column.
        with pytest.raises(Exception, match="append-only"), new.tx() as tx:
            tx.run("UPDATE ledger_entries SET caller = 'someone'")
    finally:
        new.close()
