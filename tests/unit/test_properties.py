"""Property tests: hostile request fields and whole policy bundles never crash
the sidecar; every input ends in INVALID_ARGUMENT (InvalidRequest) or a decision."""

from __future__ import annotations

import asyncio
import pathlib
import tempfile
from typing import Any

import fakeredis
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from keel_pdp.decision import AuthorizeInput, DecisionKind, InvalidRequest
from keel_pdp.policy.loader import PolicyError, compile_bundle
from keel_pdp.pricing import TokenUsage
from tests.conftest import POLICIES
from tests.helpers import make_engine

names = st.one_of(
    st.text(max_size=140),
    st.sampled_from(["acme", "", "*", "a:b", "{pdp}", "%", "\x00", "ü" * 70, "x" * 129]),
)
counts = st.one_of(st.integers(-5, 5), st.integers(0, 3_000_000),
                   st.sampled_from([2**31, 2**62, -(2**62)]))


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(rid=names, tenant=names, workload=names, model=st.one_of(names, st.sampled_from(
    ["gpt-4o-mini", "claude-sonnet-4-5", "o3"])), provider=st.one_of(names, st.sampled_from(
        ["openai", "anthropic"])), tin=counts, tout=counts,
    labels=st.dictionaries(st.text(max_size=70), st.text(max_size=300), max_size=40),
    usage=st.tuples(counts, counts, counts, counts, counts),
    cost=st.one_of(st.none(), counts))
def test_authorize_and_closeout_never_crash(
        rid: str, tenant: str, workload: str, model: str, provider: str, tin: int, tout: int,
        labels: dict[str, str], usage: tuple[int, int, int, int, int], cost: int | None) -> None:
    async def run() -> None:
        engine = make_engine(fakeredis.FakeAsyncRedis(), POLICIES)
        req = AuthorizeInput(rid, tenant, workload, model, provider, tin, tout,
                             tuple(sorted(labels.items())))
        try:
            out = await engine.authorize(req)
        except InvalidRequest as exc:
            assert str(exc)
            return
        assert out.decision in set(DecisionKind)
        if out.decision is DecisionKind.DENY:
            assert out.reasons
            return
        try:
            res = await engine.closeout(out.permit_id, TokenUsage(*usage), "SUCCEEDED", cost)
        except InvalidRequest as exc:
            assert str(exc)
            return
        assert res.status == "SETTLED"
        assert res.actual_cost_micros >= 0

    asyncio.run(run())


scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**7), st.floats(),
                    st.text(max_size=12), st.sampled_from(["1.50", "daily", "*", "enforce"]))
trees = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(
        ["id", "cap_usd", "window", "scope", "tenant", "limits", "per", "mode", "input",
         "output", "tiers", "rules", "budgets", "providers", "allowed_models", "downgrade",
         "revision", "settings", "x"]), inner, max_size=5)), max_leaves=20)


def _example_docs() -> list[dict[str, Any]]:
    return [yaml.safe_load(p.read_text()) for p in sorted(POLICIES.glob("*.yaml"))]


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_bundles_are_accepted_or_rejected_with_file_and_field(data: st.DataObject) -> None:
    docs = _example_docs()
    i = data.draw(st.integers(0, len(docs) - 1))
    doc = docs[i]
    # Replace one value somewhere in one document by an arbitrary tree.
    path: list[Any] = []
    node: Any = doc
    while isinstance(node, dict | list) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(list(node.keys()) if isinstance(node, dict)
                                        else list(range(len(node)))))
        path.append(key)
        node = node[key]
    new = data.draw(trees)
    if path:
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        parent[path[-1]] = new
    else:
        docs[i] = new
    files = [(f"f{j}.yaml", yaml.safe_dump(d).encode()) for j, d in enumerate(docs)]
    try:
        snap = compile_bundle(files, "0" * 64)
    except PolicyError as exc:
        assert exc.problems
        for p in exc.problems:
            assert p.file.startswith(("f", "<bundle>"))
            assert p.reason
        return
    assert snap.revision


def test_a_random_bundle_directory_round_trips_through_the_loader() -> None:
    with tempfile.TemporaryDirectory() as d:
        for p in POLICIES.glob("*.yaml"):
            (pathlib.Path(d) / p.name).write_bytes(p.read_bytes())
        (pathlib.Path(d) / "zz-junk.yaml").write_bytes(b"\xff\xfe not yaml")
        try:
            compile_bundle([(p.name, p.read_bytes()) for p in pathlib.Path(d).glob("*.yaml")],
                           "0" * 64)
        except PolicyError as exc:
            assert any(p.file == "zz-junk.yaml" for p in exc.problems)
        else:
            raise AssertionError("junk file accepted")
