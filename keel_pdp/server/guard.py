"""One server interceptor for every call with a single request message.

It exists because grpc's own handling is wrong for a sidecar on three counts:

* **Idle streams.** grpc's ``maximum_concurrent_rpcs`` counts a call from its
  headers on. Streams that open and never send their message (a hung or hostile
  client, one that sets no deadline) fill the limit, and every real Authorize and
  health check is refused until they go. Here a call is *admitted* only once its
  request message has arrived; until then it is *idle*: it waits at most
  ``first_message_timeout_s`` and, while more than ``max_idle`` calls are idle, the
  one that has waited longest is ended. Health checks are never refused.
* **Undecodable messages.** grpc answers UNKNOWN "Unexpected DecodeError" for bytes
  that are not the method's message; here it is INVALID_ARGUMENT, naming the type.
* **Unexpected exceptions** escape as UNKNOWN. Here they are logged, counted in
  ``keel_pdp_internal_errors_total`` and answered INTERNAL. (The PDP servicer turns
  its own into a fail-mode decision first: see ``service.PdpServicer``.)

It also keeps the RPC metrics in one place: latency by method, non-OK status
codes, and ``keel_pdp_inflight_rpcs`` (admitted calls being served).

Handlers whose request is a stream (Envoy ext_proc, reflection) pass through
unchanged: their first message is theirs to wait for.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc.aio import EOF  # type: ignore[attr-defined]

from keel_pdp.metrics import Metrics

log = logging.getLogger("keel_pdp.server")

# A real client sends its message right behind its headers.
FIRST_MESSAGE_TIMEOUT_S = 2.0
# How often idle calls are checked against the timeout (the timeout's resolution).
_SWEEP_S = 0.1

HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
# ext_authz Check observes its own latency (including releasing a permit whose
# caller went away): not timed twice.
SELF_TIMED = frozenset({"/envoy.service.auth.v3.Authorization/Check"})

if TYPE_CHECKING:
    _Handler = grpc.RpcMethodHandler[Any, Any]
else:
    _Handler = grpc.RpcMethodHandler
_Continuation = Callable[[grpc.HandlerCallDetails], Awaitable["_Handler | None"]]


class _Closed(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class ServerGuard(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Admission, idle-stream limits, decode errors, internal errors, RPC metrics."""

    def __init__(self, metrics: Metrics, *, max_concurrent_rpcs: int | None = None,
                 first_message_timeout_s: float = FIRST_MESSAGE_TIMEOUT_S,
                 max_idle: int | None = None,
                 unlimited: frozenset[str] = HEALTH_METHODS,
                 untimed: frozenset[str] = SELF_TIMED) -> None:
        self.metrics = metrics
        self.limit = max_concurrent_rpcs
        self.first_message_timeout_s = first_message_timeout_s
        self.max_idle = max_idle if max_idle is not None else max(
            256, 4 * (max_concurrent_rpcs or 1024))
        self.unlimited = unlimited
        self.untimed = untimed
        self.active = 0  # admitted calls being served
        # Idle calls in arrival order: id -> (monotonic start, task).
        self._idle: dict[int, tuple[float, asyncio.Task[Any]]] = {}
        self._closing: dict[asyncio.Task[Any], _Closed] = {}
        self._ids = itertools.count()
        self._sweeper: asyncio.TimerHandle | None = None
        self._handlers: dict[str, _Handler] = {}
        self._timeout_closed = metrics.idle_streams_closed.labels("timeout")
        self._evicted = metrics.idle_streams_closed.labels("evicted")

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def intercept_service(self, continuation: _Continuation,
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        # One wrapped handler per method, built on the first call: an interceptor
        # inside this one must decide per call inside its behaviour (as the caller
        # identity checks do), not by returning a different handler per call.
        method = handler_call_details.method
        found = self._handlers.get(method)
        if found is not None:
            return found
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # UNIMPLEMENTED; unknown names are not cached (they are unbounded)
        wrapped = self._wrap(method, handler)
        self._handlers[method] = wrapped
        return wrapped

    # ----------------------------------------------------------------- wrapping
    def _wrap(self, method: str, h: _Handler) -> _Handler:
        if h.request_streaming:
            return h
        behaviour = h.unary_stream if h.response_streaming else h.unary_unary
        if not (inspect.iscoroutinefunction(behaviour) or inspect.isasyncgenfunction(behaviour)):
            return h  # a synchronous handler: grpc runs it in its thread pool, as it is
        deserialize = h.request_deserializer
        short = method.rpartition("/")[2] or method
        limited = self.limit is not None and method not in self.unlimited
        latency = (None if method in self.untimed
                   else self.metrics.rpc_latency.labels(short))
        internal = self.metrics.internal_errors.labels(short)

        async def serve(context: grpc.aio.ServicerContext[Any, Any],
                        call: Callable[[Any], Awaitable[Any]]) -> Any:
            try:
                request = await self._first_message(context, deserialize)
            except _Closed as closed:
                self._count_error(short, closed.code)
                await context.abort(closed.code, closed.details)
            if limited:
                assert self.limit is not None
                if self.active >= self.limit:
                    self._count_error(short, grpc.StatusCode.RESOURCE_EXHAUSTED)
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the sidecar is serving its limit of {self.limit} calls "
                        "(--max-concurrent-rpcs); retry with backoff")
            t0 = time.perf_counter()
            self.active += 1
            self.metrics.inflight.inc()
            try:
                return await call(request)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                log.exception("%s failed unexpectedly", method)
                internal.inc()
                await context.abort(
                    grpc.StatusCode.INTERNAL,
                    f"{short} failed inside the sidecar ({type(exc).__name__}); "
                    "the error is logged and counted")
            finally:
                self.active -= 1
                self.metrics.inflight.dec()
                if latency is not None:
                    latency.observe(time.perf_counter() - t0)
                code = context.code()
                if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
                    self._count_error(short, code)

        if not h.response_streaming:
            unary: Any = h.unary_unary

            async def unary_call(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]
                                 ) -> Any:
                return await serve(context, lambda request: unary(request, context))

            return grpc.stream_unary_rpc_method_handler(
                unary_call, request_deserializer=None,
                response_serializer=h.response_serializer)

        stream: Any = h.unary_stream

        async def drain(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
            if inspect.iscoroutinefunction(stream):
                await stream(request, context)  # the reader/writer API
                return
            async for message in stream(request, context):
                await context.write(message)

        async def stream_call(_requests: Any, context: grpc.aio.ServicerContext[Any, Any]
                              ) -> None:
            await serve(context, lambda request: drain(request, context))

        return grpc.stream_stream_rpc_method_handler(
            stream_call, request_deserializer=None, response_serializer=h.response_serializer)

    def _count_error(self, short: str, code: grpc.StatusCode) -> None:
        self.metrics.child(self.metrics.rpc_errors, short, code.name).inc()

    # -------------------------------------------------------------- idle calls
    async def _first_message(self, context: grpc.aio.ServicerContext[Any, Any],
                             deserialize: Callable[[bytes], Any] | None) -> Any:
        task = asyncio.current_task()
        assert task is not None
        key = next(self._ids)
        idle = self._idle
        idle[key] = (time.monotonic(), task)
        self.metrics.idle_streams.set(len(idle))
        if len(idle) > self.max_idle:
            self._close(idle.pop(next(iter(idle)))[1], _Closed(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"more than {self.max_idle} calls were waiting for their request message; "
                "this one waited longest"))
            self._evicted.inc()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_S, self._sweep)
        try:
            raw = await context.read()
        except asyncio.CancelledError:
            closed = self._closing.pop(task, None)
            if closed is None:
                raise  # the client went away, or the server is stopping
            task.uncancel()
            raise closed from None
        finally:
            idle.pop(key, None)
            self.metrics.idle_streams.set(len(idle))
        if raw is EOF or raw is None:
            raise _Closed(grpc.StatusCode.INVALID_ARGUMENT,
                          "the call ended without a request message")
        if deserialize is None:
            return raw
        try:
            return deserialize(raw)
        except Exception as exc:
            raise _Closed(grpc.StatusCode.INVALID_ARGUMENT,
                          f"the request is not a valid {_message_name(deserialize)} "
                          f"({len(raw)} bytes): {exc}") from None

    def _close(self, task: asyncio.Task[Any], why: _Closed) -> None:
        if task not in self._closing:
            self._closing[task] = why
            task.cancel()

    def _sweep(self) -> None:
        self._sweeper = None
        idle = self._idle
        if not idle:
            return
        cutoff = time.monotonic() - self.first_message_timeout_s
        while idle:
            key = next(iter(idle))
            started, task = idle[key]
            if started > cutoff:
                break
            del idle[key]
            self._timeout_closed.inc()
            self._close(task, _Closed(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no request message within {self.first_message_timeout_s:g}s of the "
                "call's headers"))
        self.metrics.idle_streams.set(len(idle))
        if idle:
            self._sweeper = asyncio.get_running_loop().call_later(_SWEEP_S, self._sweep)


def _message_name(deserialize: Callable[[bytes], Any]) -> str:
    owner = getattr(deserialize, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None)
    return str(name) if name else "request message"
