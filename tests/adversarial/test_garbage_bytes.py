"""Garbage bytes from a hostile client against a real sidecar and a real Redis.

Three layers of garbage: protobuf that does not decode, valid-looking requests
mutated byte by byte (seeded), and broken gRPC / HTTP/2 framing. Required: an
undecodable request is INVALID_ARGUMENT (never UNKNOWN, never INTERNAL); a
mutation that still decodes gets a decision or INVALID_ARGUMENT naming the field;
framing garbage ends that stream or connection only; nothing garbage is decided
or recorded; and the money invariants hold afterwards (tests/adversarial/audit.py).
"""

from __future__ import annotations

import asyncio
import pathlib
import random
import socket
from collections import Counter

import grpc

from keel_pdp.api.keel.pdp.v1 import pdp_pb2 as pb
from tests.adversarial.audit import Audit
from tests.adversarial.conftest import Sidecar, areq, usage
from tests.helpers import budget, write_bundle
from tests.integration.test_availability_idle import (
    AUTHORIZE,
    PREFACE,
    RawH2,
    grpc_message,
    h2_frame,
    wait_for,
)

CLOSEOUT = "/keel.pdp.v1.PolicyDecisionPoint/Closeout"
VOID = "/keel.pdp.v1.PolicyDecisionPoint/Void"
ONE_CALL = 210
CAP = 30 * ONE_CALL
SEED = 20261204
MUTATIONS = 300
# Statuses an answer to garbage may carry; anything else (UNKNOWN, INTERNAL) is a bug.
ALLOWED_ERRORS = {"INVALID_ARGUMENT"}


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        i = rng.randrange(len(b)) if b else 0
        if op == 0 and b:
            b[i] = rng.randrange(256)
        elif op == 1:
            b.insert(i, rng.randrange(256))
        elif op == 2 and b:
            del b[i]
        else:
            b = b[: rng.randrange(len(b) + 1)]
    return bytes(b)


def _setup(tmp_path: pathlib.Path, redis_url: str,
           sidecars: list[Sidecar]) -> tuple[Sidecar, Audit]:
    bundle = write_bundle(tmp_path / "bundle",
                          [budget("b", f"{CAP / 1_000_000:.6f}", fail_mode="closed")],
                          settings={"hold_ttl_seconds": 30})
    s = Sidecar(redis_url, bundle).start()
    sidecars.append(s)
    return s, Audit(redis_url, tmp_path, {"b": CAP})


def _still_serves(s: Sidecar, audit: Audit, rid: str) -> None:
    ch, stub = s.stub()
    with ch:
        r = stub.Authorize(areq(rid), timeout=5)
        audit.answer(r.permit_id, pb.Decision.Name(r.decision), r.degraded, rid)
        if r.decision != pb.DENY:
            c = stub.Closeout(pb.CloseoutRequest(permit_id=r.permit_id, usage=usage(),
                                                 outcome=pb.SUCCEEDED), timeout=5)
            assert c.status == pb.SETTLED


def test_undecodable_and_mutated_requests_never_answer_unknown_or_leak_money(
        redis_url: str, tmp_path: pathlib.Path, sidecars: list[Sidecar]) -> None:
    s, audit = _setup(tmp_path, redis_url, sidecars)
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    details: Counter[str] = Counter()
    ch, stub = s.stub()
    with ch:
        raw = {m: ch.unary_unary(m, None, None) for m in (AUTHORIZE, CLOSEOUT, VOID)}
        # Permits to aim mutated Closeouts and Voids at.
        targets = []
        for i in range(6):
            r = stub.Authorize(areq(f"target-{i}"), timeout=5)
            audit.answer(r.permit_id, pb.Decision.Name(r.decision), r.degraded, f"target-{i}")
            targets.append(r.permit_id)
        for n in range(MUTATIONS):
            method = (AUTHORIZE, CLOSEOUT, VOID)[n % 3]
            if method == AUTHORIZE:
                rid = f"fuzz-{n}"
                seed_msg = areq(rid, inp=rng.randint(1, 5000),
                                out=rng.randint(1, 300)).SerializeToString()
            elif method == CLOSEOUT:
                seed_msg = pb.CloseoutRequest(
                    permit_id=targets[n % len(targets)], usage=usage(),
                    outcome=pb.SUCCEEDED).SerializeToString()
            else:
                seed_msg = pb.VoidRequest(permit_id=targets[n % len(targets)],
                                          reason="fuzz").SerializeToString()
            payload = _mutate(rng, seed_msg)
            try:
                answer = raw[method](payload, timeout=5)
            except grpc.RpcError as exc:
                code = exc.code().name
                assert code in ALLOWED_ERRORS, (method, payload, code, exc.details())
                assert exc.details(), (method, payload)  # the problem is named
                outcomes[f"{method.rsplit('/', 1)[1]} {code}"] += 1
                details[(exc.details() or "")[:60]] += 1
                continue
            short = method.rsplit("/", 1)[1]
            if method == AUTHORIZE:
                r = pb.AuthorizeResponse.FromString(answer)
                req = pb.AuthorizeRequest.FromString(payload)
                audit.answer(r.permit_id, pb.Decision.Name(r.decision), r.degraded,
                             req.request_id)
                outcomes[f"{short} {pb.Decision.Name(r.decision)}"] += 1
                if r.decision != pb.DENY and not r.replayed:
                    v = stub.Void(pb.VoidRequest(permit_id=r.permit_id, reason="fuzz done"),
                                  timeout=5)
                    assert v.status == pb.VOIDED, v
            elif method == CLOSEOUT:
                c = pb.CloseoutResponse.FromString(answer)
                outcomes[f"{short} {pb.CloseoutStatus.Name(c.status)}"] += 1
            else:
                v = pb.VoidResponse.FromString(answer)
                outcomes[f"{short} {pb.VoidStatus.Name(v.status)}"] += 1
        # Whatever the mutations did to the targets, each ends in one terminal state.
        for pid in targets:
            stub.Void(pb.VoidRequest(permit_id=pid, reason="fuzz end"), timeout=5)
    _still_serves(s, audit, "after-fuzz")
    assert sum(n for k, n in outcomes.items() if k.endswith("INVALID_ARGUMENT")) > 0
    assert sum(outcomes.values()) == MUTATIONS
    text = s.metrics()
    assert 'code="UNKNOWN"' not in text and 'code="INTERNAL"' not in text
    audit.wait_no_holds()
    figures = audit.check_all()
    print(f"mutations (seed {SEED}): {dict(sorted(outcomes.items()))}; audit: {figures}, "
          f"checks {audit.checks}; most common problems: {details.most_common(6)}")


async def _framing_garbage(port: int) -> tuple[dict[str, int], pb.AuthorizeResponse]:
    """Broken gRPC and HTTP/2 framing. Returns how many streams the sidecar ended, and
    its answer to the one case it may decide: two messages on a unary method, where
    the first is decided and the second ignored (one call, one decision)."""
    c = RawH2("127.0.0.1", port)
    await c.connect()
    body = areq("framing").SerializeToString()
    cases = [
        b"\x01" + len(body).to_bytes(4, "big") + body,  # compressed, no grpc-encoding
        b"\x00" + (2**32 - 1).to_bytes(4, "big") + body,  # claims 4 GiB
        b"\x00" + (len(body) + 50).to_bytes(4, "big") + body,  # ends before its length
        b"\x00\x00",  # a length prefix cut short
        b"\x07" + len(body).to_bytes(4, "big") + body,  # a flag byte that means nothing
    ]
    sids = []
    for payload in cases:
        sid = c.open_stream(AUTHORIZE)
        c.send(sid, payload, end=True)
        sids.append(sid)
    two = c.open_stream(AUTHORIZE)
    body_two = areq("framing-two").SerializeToString()
    c.send(two, grpc_message(body_two) + grpc_message(body_two), end=True)
    await c.flush()
    await wait_for(lambda: all(s in c.ended for s in [*sids, two]), 10)
    ended = sum(1 for s in sids if s in c.ended)
    # Nothing came back on the broken streams but a status.
    assert all(not c.received.get(s) for s in sids), {s: c.received.get(s) for s in sids}
    reply = bytes(c.received.get(two, b""))
    await c.close()
    # A connection that is HTTP/2 until it is not: a frame of an unknown type and a
    # DATA frame on stream 0 (a protocol error); whatever grpc does with it, only
    # this connection is concerned.
    bad = RawH2("127.0.0.1", port)
    await bad.connect()
    assert bad.writer is not None
    bad.writer.write(h2_frame(0x42, 0, 0, b"whatever") + h2_frame(0x0, 0, 0, b"junk"))
    await bad.flush()
    await asyncio.sleep(0.5)
    await bad.close()
    assert reply[:1] == b"\x00" and int.from_bytes(reply[1:5], "big") == len(reply) - 5
    return {"streams": len(sids), "ended": ended}, pb.AuthorizeResponse.FromString(reply[5:])


def test_broken_framing_ends_only_that_stream_or_connection(
        redis_url: str, tmp_path: pathlib.Path, sidecars: list[Sidecar]) -> None:
    s, audit = _setup(tmp_path, redis_url, sidecars)
    # Not HTTP/2 at all: random bytes, then an HTTP/1.1 request, on raw sockets.
    rng = random.Random(SEED)
    for blob in (bytes(rng.randrange(256) for _ in range(4096)),
                 b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", PREFACE[:10]):
        with socket.create_connection(("127.0.0.1", s.port), timeout=5) as sock:
            sock.sendall(blob)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(5)
            try:
                while sock.recv(65536):
                    pass
            except OSError:
                pass  # reset by the sidecar: as good as closed
    figures, two = asyncio.run(_framing_garbage(s.port))
    assert figures["ended"] == figures["streams"], figures
    assert two.decision == pb.ALLOW
    audit.answer(two.permit_id, "ALLOW", two.degraded, "framing-two")
    ch, stub = s.stub()
    with ch:
        assert stub.Void(pb.VoidRequest(permit_id=two.permit_id), timeout=5).status == \
            pb.VOIDED
    _still_serves(s, audit, "after-framing")
    # The only decisions recorded: one for the two-message call, and the real caller's.
    rids = [str(e[3].get("rid", "")) for e in audit.stream() if e[1] == "decision"]
    assert rids == ["framing-two", "after-framing"], rids
    audit.wait_no_holds()
    audit.check_all()
