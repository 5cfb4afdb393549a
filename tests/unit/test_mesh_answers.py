"""ext_authz answers: what Keel builds in one constructor call equals what protobuf's
field-by-field API builds (the way these answers were built before), for any text."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from keel_pdp.mesh import authz
from keel_pdp.mesh import config as c
from keel_pdp.mesh import envoy_types as et

# Empty, one-byte and multibyte lengths, multibyte UTF-8, control characters.
TEXTS = ["", "a", "x-keel-permit-id", "é" * 70, "model-" + "9" * 200, "数据" * 50,
         "emoji 🙂 and \t tabs", "z" * 16_400]


def reference_ok(pairs: list[tuple[str, str]], removed: list[str],
                 added: list[tuple[str, str]], meta: dict[str, Any]) -> Any:
    ref = et.auth.CheckResponse(status=et.rpc_status.Status(code=0))
    ok = ref.ok_response
    for k, v in pairs:
        ok.headers.append(et.header_option(k, v))
    ok.headers_to_remove.extend(removed)
    for k, v in added:
        ok.response_headers_to_add.append(et.header_option(k, v))
    ref.dynamic_metadata.update(meta)
    return ref


def test_ok_answers_equal_the_field_by_field_build() -> None:
    # Metadata is never empty in an ALLOW (an empty dict would set an empty Struct,
    # where update({}) leaves the field unset).
    rng = random.Random(15)
    for _ in range(300):
        pairs = [(rng.choice(TEXTS[1:]), rng.choice(TEXTS)) for _ in range(rng.randint(0, 12))]
        removed = [rng.choice(TEXTS[1:]) for _ in range(rng.randint(0, 3))]
        added = [(rng.choice(TEXTS[1:]), rng.choice(TEXTS)) for _ in range(rng.randint(0, 2))]
        meta: dict[str, Any] = {f"k{i}": rng.choice([True, False, 0, 7, 2**40, rng.choice(TEXTS)])
                                for i in range(rng.randint(1, 15))}
        ours = et.auth.CheckResponse(status={}, ok_response={
            "headers": authz._header_options(pairs), "headers_to_remove": removed,
            "response_headers_to_add": authz._header_options(added)},
            dynamic_metadata=meta)
        assert ours == reference_ok(pairs, removed, added, meta)
        assert ours.HasField("status") and ours.status.code == 0
        assert ours.WhichOneof("http_response") == "ok_response"
        assert ours.SerializeToString(deterministic=True) == reference_ok(
            pairs, removed, added, meta).SerializeToString(deterministic=True)


@pytest.mark.parametrize(("status", "grpc_code"), [(400, 3), (403, 7), (409, 3), (413, 3),
                                              (415, 3), (429, 7), (500, 7), (503, 14)])
def test_denied_answers_equal_the_field_by_field_build(status: int, grpc_code: int) -> None:
    body = {"type": "error", "error": {"message": "é" * 300 + " \u2028 🙂", "n": 1}}
    hdrs = (("x-keel-decision", "DENY"), ("retry-after", "60"), ("x-empty", ""))
    ours = authz._denied(status, body, hdrs)
    ref = et.auth.CheckResponse(status=et.rpc_status.Status(code=grpc_code))
    d = ref.denied_response
    d.status.code = status
    d.body = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    d.headers.append(et.header_option("content-type", "application/json"))
    for k, v in hdrs:
        d.headers.append(et.header_option(k, v))
    assert ours == ref
    assert json.loads(ours.denied_response.body) == body


async def test_passthrough_removes_every_header_keel_sets() -> None:
    from tests.unit.test_mesh_authz import servicer
    resp = servicer()._passthrough("listed", "GET", "example.com", "/health")
    ref = et.auth.CheckResponse(status=et.rpc_status.Status(code=0))
    ref.ok_response.headers_to_remove.extend(c.KEEL_SET_HEADERS)
    assert resp == ref
