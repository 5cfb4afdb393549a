"""Envoy ext_proc (``envoy.service.ext_proc.v3.ExternalProcessor``): closeout on the way back.

One gRPC stream per HTTP call and filter. The ``x-keel-ext-proc`` gRPC
metadata of the filter's ``grpc_service`` names its part (docs/mesh.md):

* ``cap``: a synchronous filter on the request path. When ext_authz asked for
  the output cap to be enforced (``x-keel-enforce-max-tokens``) it reads the
  BUFFERED request body and lowers ``max_tokens`` / ``max_completion_tokens`` /
  ``max_output_tokens`` (adding the field when the body names none); otherwise
  it switches the body off with a mode override.
* ``closeout``: a filter in observability mode (send-and-go: Envoy does not
  wait for Keel) that sees the request headers, the response headers and the
  response body chunks.
* ``both`` (no metadata): one synchronous filter doing both; simpler to
  configure, but every response chunk waits for Keel's answer.

The permit comes from ext_authz's dynamic metadata (forwarded with
``metadata_options``), else from the ``x-keel-*`` request headers ext_authz set.
Response chunks feed a ``ResponseMeter``. When the response ends, breaks, or
the client goes away, ``keel_pdp.mesh.settle`` picks the one closeout or void
for the permit, which runs in the background (with retries while the budget
store is unreachable) so the response is never held up by it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from keel_pdp.decision import InvalidRequest
from keel_pdp.engine import Engine
from keel_pdp.mesh import config as c
from keel_pdp.mesh import envoy_types as et
from keel_pdp.mesh.metrics import MeshMetrics
from keel_pdp.mesh.request import Api, UsageChunkStripper, rewrite_cap
from keel_pdp.mesh.settle import (
    Permit,
    Settlement,
    Stage,
    at_hold_fallback,
    request_sent_no_answer,
    settle,
)
from keel_pdp.mesh.usage import ResponseMeter
from keel_pdp.mesh.watch import PermitWatch

log = logging.getLogger("keel_pdp.mesh.extproc")

SETTLE_DEADLINE_S = 1.0


def _int(text: object, default: int = 0) -> int:
    if isinstance(text, bool):
        return default
    if isinstance(text, int | float):
        return int(text)
    if isinstance(text, str) and text.isdigit():
        return int(text)
    return default


def _code_details(msg: Any) -> str:
    """Envoy's ``response.code_details`` sent with the response headers ("" if not asked)."""
    if c.ATTRIBUTES_NAMESPACE not in msg.attributes:
        return ""
    attrs = msg.attributes[c.ATTRIBUTES_NAMESPACE]
    if "response.code_details" not in attrs.fields:
        return ""
    value = attrs["response.code_details"]
    return value if isinstance(value, str) else ""


def _override(resp: Any, request_body: int, response_headers: int,
              response_body: int) -> None:
    """Set the processing mode for the rest of this call (every field, explicitly)."""
    m = resp.mode_override
    m.request_header_mode = et.HEADERS_SEND
    m.request_body_mode = request_body
    m.response_header_mode = response_headers
    m.response_body_mode = response_body
    m.request_trailer_mode = et.HEADERS_SKIP
    m.response_trailer_mode = et.HEADERS_SKIP


def _role(context: grpc.aio.ServicerContext[Any, Any] | None) -> str:
    if context is None:
        return "both"
    for key, value in context.invocation_metadata() or ():
        if key == c.EXT_PROC_ROLE:
            text = value.decode() if isinstance(value, bytes) else str(value)
            return text if text in c.EXT_PROC_ROLES else "both"
    return "both"


class _Call:
    """State of one HTTP call as one ext_proc stream sees it."""

    def __init__(self, proc: ExternalProcessorServicer, role: str) -> None:
        self.proc = proc
        self.role = role
        self.permit: Permit | None = None
        self.api = Api.CHAT
        self.enforce_cap = 0
        self.model = ""
        self.stage = Stage.REQUEST
        self.status = 0
        # Envoy answered the error itself: the upstream reset after the request went out.
        self.request_sent_no_answer = False
        self.meter: ResponseMeter | None = None
        # Keel asked this chat stream for its usage ("strip": and removes the chunk).
        self.stream_usage = ""
        self.stripper: UsageChunkStripper | None = None
        # Only a stream that sees the response ends the permit.
        self.settled = role == "cap"

    # -------------------------------------------------------------- requests
    def on_request_headers(self, msg: Any, metadata: Any) -> Any:
        headers = et.header_map(msg.request_headers.headers)
        facts = self._facts(headers, metadata)
        resp = et.proc.ProcessingResponse()
        resp.request_headers.SetInParent()  # the answer names what it answers
        common = resp.request_headers.response
        pid = str(facts.get("permit_id") or "")
        enforce = _int(facts.get("enforce"))
        if not pid:
            # Not a metered call (or denied before us): nothing more to see.
            _override(resp, et.BODY_NONE, et.HEADERS_SKIP, et.BODY_NONE)
            self.settled = True
            return resp
        try:
            self.api = Api(str(facts.get("api") or "chat.completions"))
        except ValueError:
            self.api = Api.CHAT
        self.permit = Permit(pid, _int(facts.get("input_tokens")), _int(facts.get("max_tokens")),
                             max(_int(facts.get("web_search_calls")), 0))
        self.model = str(facts.get("model") or "")
        self.stream_usage = str(facts.get("stream_usage") or "")
        if self.role != "cap" and self.proc.watch is not None:
            self.proc.watch.seen(pid)
        if msg.observability_mode:
            # Send-and-go: the request is already on its way upstream.
            self.stage = Stage.SENT
            return resp
        common.header_mutation.remove_headers.append("accept-encoding")
        strip = self.stream_usage == "strip"
        if self.role == "cap":
            if enforce > 0 and not msg.request_headers.end_of_stream:
                self.enforce_cap = enforce
                if strip:
                    # This filter also sees the answer, to take the usage chunk out.
                    self.stripper = UsageChunkStripper()
                    _override(resp, et.BODY_BUFFERED, et.HEADERS_SEND, et.BODY_STREAMED)
                else:
                    _override(resp, et.BODY_BUFFERED, et.HEADERS_SKIP, et.BODY_NONE)
            else:
                _override(resp, et.BODY_NONE, et.HEADERS_SKIP, et.BODY_NONE)
            return resp
        if strip:
            self.stripper = UsageChunkStripper()
        if enforce > 0 and not msg.request_headers.end_of_stream:
            self.enforce_cap = enforce
            _override(resp, et.BODY_BUFFERED, et.HEADERS_SEND, et.BODY_STREAMED)
        else:
            self.stage = Stage.SENT
        return resp

    def _facts(self, headers: dict[str, str], metadata: Any) -> dict[str, object]:
        if metadata is not None and c.METADATA_NAMESPACE in metadata.filter_metadata:
            md = metadata.filter_metadata[c.METADATA_NAMESPACE]
            if "permit_id" in md.fields:
                def get(key: str) -> object:
                    return md[key] if key in md.fields else None

                return {"permit_id": get("permit_id"), "input_tokens": get("input_tokens"),
                        "max_tokens": get("max_tokens"), "api": get("api"),
                        "web_search_calls": get("web_search_calls"),
                        "model": get("model"), "stream_usage": get("stream_usage"),
                        "enforce": get("max_tokens") if get("enforce_max_tokens") is True
                        else 0}
        if headers.get(c.H_PERMIT):
            return {"permit_id": headers[c.H_PERMIT], "input_tokens": headers.get(c.H_INPUT),
                    "max_tokens": headers.get(c.H_MAX_TOKENS), "api": headers.get(c.H_API),
                    "web_search_calls": headers.get(c.H_WEB_SEARCHES),
                    "model": headers.get(c.H_MODEL),
                    "stream_usage": headers.get(c.H_STREAM_USAGE, ""),
                    "enforce": headers.get(c.H_ENFORCE, "")}
        return {}

    def on_request_body(self, msg: Any) -> Any:
        resp = et.proc.ProcessingResponse()
        resp.request_body.SetInParent()
        common = resp.request_body.response
        body = msg.request_body
        if self.enforce_cap and body.end_of_stream:
            new = rewrite_cap(self.api, body.body, self.enforce_cap, self.model,
                              request_usage=bool(self.stream_usage))
            if new is not None:
                common.body_mutation.body = new
                common.header_mutation.set_headers.append(
                    et.raw_header_option("content-length", str(len(new))))
                self.proc.m.body_rewrites.inc()
        if body.end_of_stream:
            self.stage = Stage.SENT
        return resp

    # ------------------------------------------------------------- responses
    def on_response_headers(self, msg: Any) -> Any:
        headers = et.header_map(msg.response_headers.headers)
        self.status = _int(headers.get(":status"), 0)
        self.request_sent_no_answer = request_sent_no_answer(_code_details(msg))
        self.stage = Stage.RESPONDING
        resp = et.proc.ProcessingResponse()
        resp.response_headers.SetInParent()
        if self.permit is None:
            return resp
        self.meter = ResponseMeter(self.api, headers.get("content-type", ""),
                                   headers.get("content-encoding", ""),
                                   self.proc.cfg.max_response_bytes)
        if msg.response_headers.end_of_stream:
            self.stage = Stage.ENDED
            self.finish()
        elif self.status >= 400 and self.status != 504 and not self.request_sent_no_answer:
            # The verdict does not depend on the body: stop reading it.
            _override(resp, et.BODY_NONE, et.HEADERS_SEND, et.BODY_NONE)
            self.finish()
        return resp

    def on_response_body(self, msg: Any) -> Any:
        body = msg.response_body
        if self.meter is not None and not self.settled:
            self.meter.feed(body.body)
            if body.end_of_stream:
                self.stage = Stage.ENDED
                self.finish()
        resp = et.proc.ProcessingResponse()
        resp.response_body.SetInParent()
        if self.stripper is not None and not msg.observability_mode and self.status < 300:
            out = self.stripper.feed(body.body, body.end_of_stream)
            if out != body.body:
                mutation = resp.response_body.response.body_mutation
                if out:
                    mutation.body = out
                else:
                    mutation.clear_body = True  # the whole chunk is held back or dropped
        return resp

    def on_response_trailers(self) -> Any:
        if self.stage is Stage.RESPONDING:
            self.stage = Stage.ENDED
            self.finish()
        resp = et.proc.ProcessingResponse()
        resp.response_trailers.SetInParent()
        return resp

    # ------------------------------------------------------------------ end
    def finish(self) -> None:
        """Choose and start the permit's one terminal action (idempotent)."""
        if self.settled or self.permit is None:
            return
        self.settled = True
        reading = None
        if self.meter is not None:
            reading = self.meter.reading(complete=self.stage is Stage.ENDED)
        elif self.stage >= Stage.RESPONDING:
            reading = ResponseMeter(self.api).reading()
        decision = settle(self.permit, self.stage, self.status, reading,
                          request_sent_no_answer=self.request_sent_no_answer)
        self.proc.spawn(self.permit.permit_id, decision, at_hold_fallback(self.permit, decision))


class ExternalProcessorServicer(et.proc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, engine: Engine, metrics: MeshMetrics, cfg: c.MeshConfig,
                 watch: PermitWatch | None = None) -> None:
        self.engine = engine
        self.watch = watch
        self.m = metrics
        self.cfg = cfg
        self._tasks: set[asyncio.Task[None]] = set()

    async def Process(self, request_iterator: AsyncIterator[Any],
                      context: grpc.aio.ServicerContext[Any, Any] | None) -> AsyncIterator[Any]:
        call = _Call(self, _role(context))
        try:
            async for msg in request_iterator:
                resp = self._one(call, msg)
                # In observability mode Envoy expects (and reads) no answers.
                if resp is not None and not msg.observability_mode:
                    yield resp
        finally:
            # Envoy closed or reset the stream: a response that did not end
            # normally (upstream reset, client gone) still ends its permit.
            call.finish()

    @staticmethod
    def _one(call: _Call, msg: Any) -> Any:
        kind = msg.WhichOneof("request")
        if kind == "request_headers":
            md = msg.metadata_context if msg.HasField("metadata_context") else None
            return call.on_request_headers(msg, md)
        if kind == "request_body":
            return call.on_request_body(msg)
        if kind == "response_headers":
            return call.on_response_headers(msg)
        if kind == "response_body":
            return call.on_response_body(msg)
        if kind == "response_trailers":
            return call.on_response_trailers()
        resp = et.proc.ProcessingResponse()
        resp.request_trailers.SetInParent()
        return resp

    # -------------------------------------------------------------- settling
    def spawn(self, permit_id: str, s: Settlement, fallback: Settlement | None = None) -> None:
        task = asyncio.get_running_loop().create_task(self.apply(permit_id, s, fallback))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait for settlements in flight (tests, shutdown)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def apply(self, permit_id: str, s: Settlement,
                    fallback: Settlement | None = None) -> None:
        """Run ``s``; when the store refuses its usage as impossible for the permit,
        run ``fallback`` (the hold, ``settle.at_hold_fallback``) instead."""
        delay = 0.05
        attempt = 0
        while attempt < self.cfg.closeout_attempts:
            attempt += 1
            try:
                if s.kind == "void":
                    v = await self.engine.void(permit_id, s.reason[:512], SETTLE_DEADLINE_S)
                    status = v.status
                    done = status != "VOID_STORE_UNAVAILABLE"
                else:
                    r = await self.engine.closeout(permit_id, s.usage, s.outcome, None,
                                                   SETTLE_DEADLINE_S,
                                                   service_tier=s.service_tier)
                    status = r.status
                    done = status not in ("CLOSEOUT_STORE_UNAVAILABLE", "CLOSEOUT_PERMIT_PENDING")
            except InvalidRequest as exc:
                if fallback is not None:
                    log.error("ext_proc %s of %s rejected: %s; booking it at the hold",
                              s.kind, permit_id, exc)
                    s, fallback, attempt = fallback, None, 0
                    continue
                log.error("ext_proc %s of %s rejected: %s", s.kind, permit_id, exc)
                self.m.settle_failures.inc()
                return
            except Exception:
                log.exception("ext_proc %s of %s failed", s.kind, permit_id)
                done, status = False, "ERROR"
            if done:
                self.m.settlements.labels(s.kind, s.outcome or "VOID",
                                          "true" if s.estimated else "false").inc()
                if status in ("UNKNOWN_PERMIT", "VOID_UNKNOWN_PERMIT"):
                    log.warning("ext_proc %s: permit %s is unknown to the store", s.kind,
                                permit_id)
                log.debug("ext_proc %s %s: %s (%s)", s.kind, permit_id, status, s.reason)
                return
            if attempt < self.cfg.closeout_attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.m.settle_failures.inc()
        log.error("ext_proc gave up on the %s of %s after %d attempts; the hold will expire",
                  s.kind, permit_id, self.cfg.closeout_attempts)
