"""Envoy ext_authz (``envoy.service.auth.v3.Authorization/Check``) in front of provider calls.

A metered call (POST to chat completions, responses or messages) becomes one
``Engine.authorize``; the decision becomes Envoy's answer:

* ALLOW / CONSTRAIN: OK. Request headers ``x-keel-permit-id``,
  ``x-keel-decision``, ``x-keel-model``, ``x-keel-provider``,
  ``x-keel-max-tokens``, ``x-keel-input-tokens``, ``x-keel-policy-revision`` and,
  when the body's cap must be lowered, ``x-keel-enforce-max-tokens`` (ext_proc
  rewrites the body). The same facts go into dynamic metadata under
  ``envoy.filters.http.ext_authz``; the client's response gets the permit id and
  the decision.
* DENY: 429 for budgets, 403 for policy (model not allowed, no price), 503 when
  the budget store or the policy could not be consulted and the budget fails
  closed; a JSON body with the block reasons and ``retry-after`` when waiting
  can help.
* An unreadable body: 400 (413/415 for size or encoding) with the reason.

Protobuf stays here; the reading of the HTTP request is ``keel_pdp.mesh.request``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

import grpc

from keel_pdp.decision import AuthorizeInput, Code, DecisionKind, InvalidRequest, Outcome
from keel_pdp.engine import Engine
from keel_pdp.errors import RequestIdReused
from keel_pdp.mesh import config as c
from keel_pdp.mesh import envoy_types as et
from keel_pdp.mesh import request as rq
from keel_pdp.mesh.metrics import MeshMetrics
from keel_pdp.mesh.watch import PermitWatch
from keel_pdp.server.identity import envoy_refusal

log = logging.getLogger("keel_pdp.mesh.authz")

GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7
GRPC_INVALID_ARGUMENT = 3
GRPC_UNAVAILABLE = 14

_STATUS_BY_CODE: dict[str, int] = {
    Code.BUDGET_EXHAUSTED: 429,
    Code.MODEL_NOT_ALLOWED: 403,
    Code.UNKNOWN_MODEL_PRICE: 403,
    Code.STORE_UNAVAILABLE: 503,
    Code.DEADLINE_TOO_SHORT: 503,
    Code.POLICY_NOT_LOADED: 503,
    Code.REQUEST_ID_REUSED: 409,
}
_ERROR_TYPE = {400: "invalid_request_error", 403: "permission_error", 409: "invalid_request_error",
               413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error",
               500: "api_error", 503: "overloaded_error"}


def deny_status(out: Outcome) -> int:
    """HTTP status for a DENY: 429 budgets, 403 policy, 503 store/policy unavailable."""
    return _STATUS_BY_CODE.get(out.primary_code, 403)


def retry_after(out: Outcome, status: int) -> int | None:
    """Seconds until waiting can help: the end of the exhausted window, 1 s when unavailable."""
    if status == 429:
        waits = [r.retry_after_seconds for r in out.reasons
                 if r.code is Code.BUDGET_EXHAUSTED and r.retry_after_seconds > 0]
        return max(waits) if waits else 60
    if status == 503:
        return 1
    return None


def deny_body(out: Outcome, status: int, api: str = "") -> dict[str, object]:
    """The JSON error body: readable by OpenAI and Anthropic clients (``error.message``);
    it names the provider, model and API the call resolved to."""
    first = next((r for r in out.reasons if r.code == out.primary_code), None)
    message = first.message if first else "Denied by Keel policy."
    return {"type": "error", "error": {
        "type": _ERROR_TYPE.get(status, "permission_error"),
        "code": out.primary_code,
        "message": message,
        "permit_id": out.permit_id,
        "policy_revision": out.policy_revision,
        "provider": out.provider,
        "model": out.model,
        **({"api": api} if api else {}),
        "block_reasons": [r.to_json() for r in out.reasons],
    }}


def error_body(status: int, code: str, message: str) -> dict[str, object]:
    return {"type": "error", "error": {"type": _ERROR_TYPE.get(status, "api_error"),
                                       "code": code, "message": message}}


_JSON_TYPE = (("content-type", "application/json"),)


def _denied(status: int, body: Mapping[str, object],
            headers: tuple[tuple[str, str], ...] = ()) -> Any:
    grpc_code = GRPC_INVALID_ARGUMENT if status in (400, 409, 413, 415) else (
        GRPC_UNAVAILABLE if status == 503 else GRPC_PERMISSION_DENIED)
    return et.auth.CheckResponse(status={"code": grpc_code}, denied_response={
        "status": {"code": status},
        "headers": _header_options(_JSON_TYPE + headers),
        "body": json.dumps(body, ensure_ascii=False, separators=(",", ":"))})


# The answers are built in one constructor call from plain dicts and lists:
# the protobuf runtime (upb) then builds every nested message in C. Building
# them one by one (a message per header, appended, which copies it) cost
# about twice as much.
def _header_options(pairs: Iterable[tuple[str, str]]) -> list[dict[str, Any]]:
    """``et.header_option`` for each pair, as constructor arguments."""
    return [{"header": {"key": k, "value": v}, "append_action": et.OVERWRITE}
            for k, v in pairs]


def request_headers(check: Any) -> dict[str, str]:
    http = check.attributes.request.http
    out = dict(http.headers)
    if http.HasField("header_map"):
        out.update(et.header_map(http.header_map))
    return out


class AuthorizationServicer(et.auth_grpc.AuthorizationServicer):  # type: ignore[misc]
    def __init__(self, engine: Engine, metrics: MeshMetrics, cfg: c.MeshConfig,
                 watch: PermitWatch | None = None) -> None:
        self.engine = engine
        self.watch = watch
        self.m = metrics
        self.cfg = cfg
        self._lat = metrics.base.rpc_latency.labels("Check")
        self._tasks: set[asyncio.Future[Any]] = set()

    async def Check(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        t0 = time.perf_counter()
        remaining = context.time_remaining()
        deadline = remaining if remaining is not None and remaining < 3600 else None
        try:
            resp = await self.check(request, deadline)
            if context.cancelled():
                self._release_if_held(resp)
            return resp
        except Exception:
            log.exception("ext_authz check failed")
            self.m.checks.labels("error").inc()
            return _denied(500, error_body(500, "KEEL_INTERNAL_ERROR",
                                           "Keel could not decide on this request."))
        finally:
            self._lat.observe(time.perf_counter() - t0)

    # A permit whose Check Envoy gave up on (client gone, ext_authz timeout)
    # reaches no ext_proc stream: void it now rather than let the hold expire.
    async def _authorize(self, inp: AuthorizeInput, deadline_s: float | None) -> Outcome:
        task = asyncio.ensure_future(self.engine.authorize(inp, deadline_s))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._abandoned)
            raise

    def _abandoned(self, task: asyncio.Future[Outcome]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        out = task.result()
        if out.decision is not DecisionKind.DENY and not out.replayed:
            self._void_later(out.permit_id)

    def _release_if_held(self, resp: Any) -> None:
        if resp.WhichOneof("http_response") == "ok_response" and "permit_id" in \
                resp.dynamic_metadata.fields and not resp.dynamic_metadata["replayed"]:
            self._void_later(str(resp.dynamic_metadata["permit_id"]))

    def _void_later(self, permit_id: str, count: bool = True, reason: str = (
            "Envoy gave up on the check (client gone or ext_authz timeout)")) -> None:
        if count:
            self.m.abandoned.inc()
        if self.watch is not None:
            self.watch.forget(permit_id)
        task = asyncio.get_running_loop().create_task(self.engine.void(permit_id, reason, 1.0))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _passthrough(self, reason: str, method: str, host: str, path: str) -> Any:
        self.m.checks.labels("passthrough").inc()
        self.m.unmetered.labels(reason).inc()
        # Never the query string: some APIs carry keys there (Gemini's ?key=).
        log.info("unmetered call passed through (%s): %s %s%s", reason, method[:16],
                 host[:200], path.split("?", 1)[0][:300])
        return et.auth.CheckResponse(status={}, ok_response={
            "headers_to_remove": c.KEEL_SET_HEADERS})

    def _unmetered(self, method: str, host: str, path: str, named_provider: str) -> Any:
        """A request no metered API matches: pass it only where it is known not to be LLM
        traffic; a provider's endpoint Keel cannot read is refused (NOT_METERED)."""
        cfg = self.cfg
        if cfg.listed_unmetered(host, path):
            return self._passthrough("listed", method, host, path)
        provider_call = bool(named_provider) or cfg.is_provider_host(host)
        if cfg.pass_unmetered and not provider_call:
            return self._passthrough("not_provider_host", method, host, path)
        self.m.checks.labels("not_metered").inc()
        where = f"{method[:16]} {host[:200]}{path.split('?', 1)[0][:300]}"
        why = ("is a provider endpoint Keel cannot meter" if provider_call
               else "is not an LLM API Keel can meter")
        return _denied(403, error_body(
            403, "NOT_METERED", f"{where} {why}, and this sidecar sends no call that nothing "
            "would book. If it is not LLM traffic, list it in KEEL_MESH_UNMETERED_ROUTES."),
            ((c.H_DECISION, "DENY"), ("x-keel-reason", "NOT_METERED")))

    def _bad(self, exc: rq.BadRequest | InvalidRequest, status: int = 400,
             code: str = "KEEL_BAD_REQUEST") -> Any:
        self.m.checks.labels("bad_request").inc()
        status = exc.status if isinstance(exc, rq.BadRequest) else status
        return _denied(status, error_body(status, code, str(exc)))

    def _reused(self, message: str) -> Any:
        self.m.checks.labels("request_id_reused").inc()
        return _denied(409, error_body(409, Code.REQUEST_ID_REUSED, message),
                       ((c.H_DECISION, "DENY"), ("x-keel-reason", Code.REQUEST_ID_REUSED)))

    def read_body(self, route: rq.Route, provider: str, headers: Mapping[str, str],
                  raw: bytes, path_model: str) -> rq.LlmRequest:
        """The request body as Authorize needs it; a body Envoy cut (flagged, shorter than
        its content-length, or as long as max_request_bytes with no content-length and
        not a whole JSON document) is estimated from what arrived, never refused as 400.
        ``path_model``: the model the path names (resolved, for an Azure deployment)."""
        api = route.api
        encoding = headers.get("content-encoding", "")
        length_text = headers.get("content-length", "")
        length = int(length_text) if length_text.isdigit() else -1
        cut = headers.get("x-envoy-auth-partial-body") == "true" or 0 <= len(raw) < length
        if not cut:
            try:
                return rq.parse_body(api, provider, rq.decode_body(raw, encoding), path_model,
                                     route.stream)
            except rq.BadRequest:
                if length >= 0 or len(raw) < self.cfg.max_request_bytes:
                    raise
        prefix = rq.decode_prefix(raw, encoding)
        # The whole body's size: content-length scaled by the prefix's compression ratio.
        total = len(prefix) if length < 0 else -(-length * len(prefix) // max(1, len(raw)))
        return rq.parse_partial(api, provider, prefix, total, path_model, route.stream)

    async def check(self, check: Any, deadline_s: float | None) -> Any:
        cfg = self.cfg
        attrs = check.attributes
        http = attrs.request.http
        headers = request_headers(check)
        method = http.method or headers.get(":method", "")
        path = http.path or headers.get(":path", "")
        host = http.host or headers.get(":authority", "")
        ext = attrs.context_extensions
        named_provider = ext.get("keel_provider") or headers.get(cfg.provider_header, "")
        # The serving snapshot, read once per check: a reloaded bundle's
        # deployment map applies from the next call on.
        resolved = cfg.resolve(method, path, host, named_provider, self.engine.policies.current)
        if resolved is None:
            return self._unmetered(method, host, path, named_provider)
        route, provider = resolved.route, resolved.provider
        api = route.api
        tenant = ext.get("keel_tenant") or headers.get(cfg.tenant_header, "")
        workload = ext.get("keel_workload") or headers.get(cfg.workload_header, "")
        refused = envoy_refusal(check, tenant, workload)  # caller bindings (enforce mode)
        if refused:
            self.m.checks.labels("deny").inc()
            return _denied(403, error_body(403, "CALLER_NOT_BOUND", refused))
        rid = ""
        try:
            for name, value in ((cfg.tenant_header, tenant), (cfg.workload_header, workload)):
                if not value:
                    raise rq.BadRequest(f"header {name} is required: it names who pays")
            raw = http.raw_body or http.body.encode("utf-8", "surrogatepass")
            llm = self.read_body(route, provider, headers, raw, resolved.model)
            rid = rq.request_id(headers.get(cfg.request_id_header, ""), http.id,
                                (tenant.encode(), http.path.encode(), raw,
                                 attrs.request.time.SerializeToString()))
            inp = AuthorizeInput(
                request_id=rid, tenant=tenant, workload=workload, model=llm.model,
                provider=provider, estimated_input_tokens=llm.estimated_input_tokens,
                max_output_tokens=llm.max_output_tokens, service_tier=llm.service_tier,
                max_web_search_calls=llm.max_web_search_calls,
                cache_write_ttl=llm.cache_write_ttl,
                # The body's digest is part of what makes two requests with one
                # request id the same request: another body is another call.
                labels=(("api", str(api)), ("stream", "true" if llm.stream else "false"),
                        (rq.BODY_LABEL, rq.body_digest(raw, headers.get("content-length", "")))))
            out = await self._authorize(inp, deadline_s)
        except rq.BadRequest as exc:
            return self._bad(exc)
        except RequestIdReused as exc:
            return self._reused(f"{exc}: x-request-id {rid[:64]!r} came with another "
                                "body or parameters; every provider call needs its own "
                                "request id. This call was not sent.")
        except InvalidRequest as exc:
            return self._bad(exc)
        if out.replayed and out.decision is not DecisionKind.DENY:
            # Every Check is a provider call: none may ride on a permit another call
            # obtained (still in flight, or already settled, voided or expired).
            return self._reused(f"x-request-id {rid[:64]!r} already obtained permit "
                                f"{out.permit_id} for a call with this body; every provider "
                                "call needs its own request id. This call was not sent.")
        if out.decision is DecisionKind.DENY:
            return self._deny(out, str(api))
        if (route.path_model or route.deployment) and out.model != llm.model:
            # A reroute changes the body's model; these APIs name it in the path.
            return self._refuse_after_hold(
                out, "REROUTE_NOT_POSSIBLE",
                f"Keel would reroute this call from {llm.model} to {out.model} (decision "
                f"{out.decision}, permit {out.permit_id}), but this API names the model in "
                f"the request path, which Keel does not rewrite. Call {out.model} directly.")
        if api in rq.SIGNED_APIS and not cfg.resign_signed and llm.max_output_tokens and \
                0 < out.max_output_tokens < llm.max_output_tokens:
            # A lowered cap is a body change, which breaks a SigV4 signature
            # unless Envoy re-signs after Keel: refuse rather than send uncapped.
            return self._refuse_after_hold(
                out, "SIGNED_BODY_NOT_REWRITABLE",
                f"Keel would lower this call's output cap from {llm.max_output_tokens} to "
                f"{out.max_output_tokens} tokens (decision {out.decision}, permit "
                f"{out.permit_id}), but the request is SigV4-signed and this sidecar is not "
                "told that Envoy re-signs it (KEEL_MESH_RESIGN_SIGNED). Ask for at most "
                f"{out.max_output_tokens} tokens, or configure re-signing.")
        return self._allow(out, llm, rewritable=api not in rq.SIGNED_APIS or cfg.resign_signed)

    def _refuse_after_hold(self, out: Outcome, code: str, message: str) -> Any:
        """Refuse a call Keel allowed but cannot enforce as decided: release its hold now."""
        self._void_later(out.permit_id, count=False, reason=f"{code}: {message}"[:500])
        self.m.checks.labels("deny").inc()
        return _denied(403, error_body(403, code, message),
                       ((c.H_DECISION, "DENY"), ("x-keel-reason", code),
                        (c.H_PERMIT, out.permit_id)))

    def _deny(self, out: Outcome, api: str = "") -> Any:
        self.m.checks.labels("deny").inc()
        status = deny_status(out)
        hdrs: list[tuple[str, str]] = [(c.H_DECISION, "DENY"), ("x-keel-reason", out.primary_code)]
        if out.permit_id:
            hdrs.append((c.H_PERMIT, out.permit_id))
        wait = retry_after(out, status)
        if wait is not None:
            hdrs.append(("retry-after", str(wait)))
        if out.provider:
            hdrs.append((c.H_PROVIDER, out.provider))
        return _denied(status, deny_body(out, status, api), tuple(hdrs))

    def _allow(self, out: Outcome, llm: rq.LlmRequest, rewritable: bool = True) -> Any:
        self.m.checks.labels(str(out.decision).lower()).inc()
        # A reroute to another model also needs the body rewritten (its "model").
        # An API with no output cap (embeddings) has nothing to enforce; a signed
        # body Envoy does not re-sign is left alone when its own cap fits.
        enforce = rewritable and bool(rq.CAP_FIELD_TO_ADD[llm.api]) and ((
            out.max_output_tokens > 0 and (
                llm.max_output_tokens == 0 or llm.max_output_tokens > out.max_output_tokens))
            or out.model != llm.model)
        # A chat stream that does not ask for its usage is asked for it (the same
        # body rewrite), so it settles on the provider's count, not an estimate.
        stream_usage = self.cfg.stream_usage if (
            llm.api is rq.Api.CHAT and llm.stream and not llm.include_usage
            and self.cfg.stream_usage != "off" and out.max_output_tokens > 0) else ""
        enforce = enforce or bool(stream_usage)
        facts = [
            (c.H_PERMIT, out.permit_id),
            (c.H_DECISION, str(out.decision)),
            (c.H_MODEL, out.model),
            (c.H_PROVIDER, out.provider),
            (c.H_MAX_TOKENS, str(out.max_output_tokens)),
            (c.H_INPUT, str(llm.estimated_input_tokens)),
            (c.H_REVISION, out.policy_revision),
            (c.H_API, str(llm.api)),
            (c.H_WEB_SEARCHES, str(out.web_search_calls)),
        ]
        remove: list[str] = []
        if enforce:
            facts.append((c.H_ENFORCE, str(out.max_output_tokens)))
        else:
            remove.append(c.H_ENFORCE)
        if stream_usage:
            facts.append((c.H_STREAM_USAGE, stream_usage))
        else:
            remove.append(c.H_STREAM_USAGE)
        if self.watch is not None and not out.replayed:
            self.watch.issued(out.permit_id)
        return et.auth.CheckResponse(status={}, ok_response={
            "headers": _header_options(facts),
            "headers_to_remove": remove,
            "response_headers_to_add": _header_options(
                ((c.H_PERMIT, out.permit_id), (c.H_DECISION, str(out.decision))))},
            # A dict initialises a google.protobuf.Struct as Struct.update does.
            dynamic_metadata={
                "permit_id": out.permit_id, "decision": str(out.decision),
                "policy_revision": out.policy_revision, "price_revision": out.price_revision,
                "model": out.model, "provider": out.provider,
                "max_tokens": out.max_output_tokens,
                "input_tokens": llm.estimated_input_tokens,
                "web_search_calls": out.web_search_calls,
                "estimated_cost_micros": str(out.estimated_cost_micros), "api": str(llm.api),
                "enforce_max_tokens": enforce, "degraded": out.degraded,
                "replayed": out.replayed, "stream_usage": stream_usage,
            })
