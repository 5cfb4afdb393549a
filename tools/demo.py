"""The narrated calls of ``make demo`` (scripts/demo.sh starts the stack first).

Each call goes through Envoy to the mock provider with Keel as ext_authz and
ext_proc, and the demo prints what the client got, what the provider saw and
what Keel booked (the settlement or void event on the decision stream).

    python -m tools.demo --envoy http://127.0.0.1:10000 \\
        --mock http://127.0.0.1:8081 --redis-url redis://127.0.0.1:6379/0
"""

from __future__ import annotations

import argparse
import http.client
import json
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

import redis

from keel_pdp.money import usd_plain

STREAM = "keel:{pdp}:events"


@dataclass(frozen=True)
class Call:
    title: str
    path: str
    body: dict[str, Any] | bytes
    tenant: str = "acme"
    workload: str = "chat"
    headers: tuple[tuple[str, str], ...] = ()


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4.1-mini", "max_tokens": 200,
            "messages": [{"role": "user", "content": "Summarise our LLM spend policy."}],
            **extra}


def _claude(**extra: Any) -> dict[str, Any]:
    return {"model": "claude-sonnet-4-5", "max_tokens": 200, "system": "Be brief.",
            "messages": [{"role": "user", "content": "What is a permit?"}], **extra}


CALLS = (
    Call("OpenAI chat completion, 1200 input tokens of which 400 cached", "/v1/chat/completions",
         _chat(), headers=(("x-mock-input-tokens", "1200"), ("x-mock-cached-tokens", "400"))),
    Call("Anthropic streamed message with prompt-cache reads and writes", "/v1/messages",
         _claude(stream=True), headers=(("x-mock-input-tokens", "1000"),
                                        ("x-mock-cached-tokens", "300"),
                                        ("x-mock-cache-write-tokens", "100"))),
    Call("OpenAI Responses API, streamed", "/v1/responses",
         {"model": "gpt-4.1", "input": "Explain holds.", "max_output_tokens": 64,
          "stream": True}),
    Call("Tenant 'tight' asks for 1000 output tokens with $0.002 left this hour",
         "/v1/messages", _claude(max_tokens=1000), tenant="tight"),
    Call("Tenant 'broke' has no budget left today", "/v1/chat/completions", _chat(),
         tenant="broke"),
    Call("Workload 'restricted' may only call gpt-4.1-mini", "/v1/messages", _claude(),
         workload="restricted"),
    Call("The provider's stream breaks half-way", "/v1/chat/completions",
         _chat(stream=True, stream_options={"include_usage": True}),
         headers=(("x-mock-mode", "break"),)),
    Call("The provider answers 500", "/v1/messages", _claude(),
         headers=(("x-mock-mode", "error500"),)),
    Call("A body that is not JSON", "/v1/chat/completions", b'{"model": "gpt-4.1-mini",'),
)


def _send(base: str, call: Call) -> tuple[int, dict[str, str], bytes, bool]:
    u = urllib.parse.urlsplit(base)
    conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=30)
    body = call.body if isinstance(call.body, bytes) else json.dumps(call.body).encode()
    headers = {"content-type": "application/json", "x-keel-tenant": call.tenant,
               "x-keel-workload": call.workload, **dict(call.headers)}
    try:
        conn.request("POST", call.path, body=body, headers=headers)
        resp = conn.getresponse()
        rh = {k.lower(): v for k, v in resp.getheaders()}
        try:
            return resp.status, rh, resp.read(), False
        except http.client.IncompleteRead as exc:
            return resp.status, rh, exc.partial, True
    finally:
        conn.close()


def _mock_calls(mock: str) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{mock}/_mock/stats", timeout=5) as r:  # noqa: S310
        calls: list[dict[str, Any]] = json.load(r)["calls"]
    return calls


def _booked(r: redis.Redis, permit_id: str, timeout_s: float = 5.0) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        entries: Any = r.xrange(STREAM)
        for _, f in entries:
            if f.get("pid") == permit_id and f.get("type") in ("settlement", "void"):
                return {"type": f["type"], "data": json.loads(f["data"]),
                        "res": json.loads(f["res"])}
        time.sleep(0.05)
    return None


def _usd(micros: int) -> str:
    # Always six digits, so the narration lines up.
    return "$" + usd_plain(micros)


def narrate(envoy: str, mock: str, r: redis.Redis) -> int:
    problems = 0
    for n, call in enumerate(CALLS, 1):
        seen_before = len(_mock_calls(mock))
        status, headers, body, broken = _send(envoy, call)
        print(f"\n[{n}] {call.title}")
        print(f"    POST {call.path}  tenant={call.tenant} workload={call.workload}")
        decision = headers.get("x-keel-decision", "-")
        line = f"    client got HTTP {status}, Keel decision {decision}"
        if broken:
            line += " (the stream was cut off)"
        print(line)
        if status >= 400:
            try:
                err = json.loads(body)["error"]
                print(f"    {err.get('code') or err.get('type')}: {err.get('message')}")
            except (ValueError, KeyError, TypeError):
                print(f"    body: {body[:200]!r}")
            if "retry-after" in headers:
                print(f"    retry-after: {headers['retry-after']} s")
        upstream = _mock_calls(mock)[seen_before:]
        if not upstream:
            print("    provider saw: nothing (refused before the call)")
        else:
            caps = upstream[-1].get("caps") or {}
            print(f"    provider saw: {upstream[-1]['path']} with "
                  f"{', '.join(f'{k}={v}' for k, v in caps.items()) or 'no output cap'}")
        pid = headers.get("x-keel-permit-id")
        if not pid or decision == "DENY":
            continue
        ev = _booked(r, pid)
        if ev is None:
            print(f"    Keel booked: nothing yet for {pid} (the hold is still open)")
            problems += 1
        elif ev["type"] == "void":
            print(f"    Keel voided {pid}: {ev['data'].get('reason')}")
        else:
            d, res = ev["data"], ev["res"]
            u = d["usage"]
            print(f"    Keel settled {pid} ({d['outcome']}): input {u['in']} "
                  f"(cached {u['cached']}, cache writes {u['cw']}), output {u['out']} tokens")
            act, held = int(res["act"]), int(res["amt"])
            rest = (f"{_usd(held - act)} of the hold released" if held >= act else
                    f"{_usd(act - held)} booked above the hold (a correction)")
            print(f"    cost {_usd(act)} against a hold of {_usd(held)}: {rest}")
    print()
    for key in sorted(r.scan_iter(match="keel:{pdp}:b:*")):
        vals: Any = r.hmget(key, "s", "h")
        print(f"budget window {key.split(':b:', 1)[1]}: settled "
              f"{_usd(int(vals[0] or 0))}, held {_usd(int(vals[1] or 0))}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--envoy", required=True, help="Envoy listener URL (with Keel)")
    ap.add_argument("--mock", required=True, help="mock provider URL")
    ap.add_argument("--redis-url", required=True)
    ns = ap.parse_args(argv)
    client = redis.Redis.from_url(ns.redis_url, decode_responses=True)
    try:
        return narrate(ns.envoy.rstrip("/"), ns.mock.rstrip("/"), client)
    finally:
        client.close()


if __name__ == "__main__":
    raise SystemExit(main())
