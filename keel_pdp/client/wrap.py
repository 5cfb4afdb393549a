"""Put an existing OpenAI or Anthropic client behind Keel with a two-line change.

::

    from keel_pdp.client import KeelClient
    client = KeelClient("127.0.0.1:50051").wrap(openai.OpenAI(), tenant="acme",
                                                workload="support-bot")

``client.chat.completions.create``, ``client.responses.create`` (OpenAI) and
``client.messages.create`` (Anthropic), streamed or not, then each run under one
permit: the request is priced from its body (model, output cap, the input
estimate of ``keel_pdp.mesh.request``, the web searches its tools allow, the
prompt-cache breakpoints it marks), the permit's constraints are applied to
the call (a lower output cap, a rerouted model; a cap is always sent, so the
provider never generates more than was held), a chat stream asks for its final
usage chunk, and the permit is closed out with the provider's usage when the
answer (or the stream) ends. ``with_options`` returns a wrapped copy; every
other attribute is the wrapped client's own, unmetered.

How a call that goes wrong ends its permit follows the mesh's settlement rule
(``keel_pdp.mesh.settle``): an HTTP error from the provider voids it (a 504 is
booked at the hold); a connection error, a timeout or a cancellation while the
call was out is booked at the hold (the provider may have billed it); a stream
that breaks or that the caller stops reading is closed out PARTIAL with the
usage seen so far. A DENY raises ``PermitDenied`` before the provider is called.
A stream dropped (garbage-collected) before it ended or was closed is a caller
that stopped reading: its finalizer closes the permit out PARTIAL, on the thread
that dropped it (sync), or on the client's event loop (asyncio; off the loop, on
a blocking channel of its own, when that loop no longer runs).

Every attempt at the provider is a provider call of its own, so the SDK's own
retries (``max_retries``) are made here, one permit per attempt: the SDK client
is called with ``max_retries=0`` and a failed attempt that the SDK would retry
(connection error, timeout, 408/409/429/5xx, ``x-should-retry``) ends its permit
by the rule above and is tried again under a fresh permit, after the SDK's
delay. An attempt that timed out may have been billed and stays booked at its
hold even when the retry succeeds.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import weakref
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from keel_pdp.client._core import (
    FailMode,
    Permit,
    PermitDenied,
    PermitRequest,
    error_text,
    log,
)
from keel_pdp.mesh import settle as rule
from keel_pdp.mesh.apis import TIER_APIS
from keel_pdp.mesh.cache_marks import cache_write_ttl
from keel_pdp.mesh.request import CAP_FIELD_TO_ADD, CAP_FIELDS, Api, estimate_input_tokens
from keel_pdp.mesh.usage import Reading
from keel_pdp.mesh.websearch import request_bound
from keel_pdp.pricing import tier_problem

if TYPE_CHECKING:
    from keel_pdp.client.aio import AsyncKeelClient
    from keel_pdp.client.sync import KeelClient

__all__ = ["wrap_async", "wrap_sync"]

# Keyword arguments of the SDKs' create() that are transport options, not body.
_TRANSPORT = frozenset({"extra_headers", "extra_query", "extra_body", "timeout"})


class Call:
    """One create() call: its permit request and the keyword arguments to send."""

    def __init__(self, api: Api, provider: str, kwargs: dict[str, Any]) -> None:
        if not isinstance(kwargs.get("model"), str) or not kwargs["model"]:
            raise TypeError(f"{api} create() needs model=")
        self.api, self.provider = api, provider
        self.kwargs = dict(kwargs)
        # The SDKs' NOT_GIVEN / omit sentinels are arguments not given.
        body: dict[str, Any] = {k: v for k, v in kwargs.items() if k not in _TRANSPORT
                                and type(v).__name__ not in _SDK_SENTINELS}
        extra = kwargs.get("extra_body")
        if isinstance(extra, Mapping):
            body.update(extra)
        self.body = body
        self.cap_field = next((f for f in CAP_FIELDS[api] if isinstance(body.get(f), int)),
                              CAP_FIELD_TO_ADD[api])
        cap = body.get(self.cap_field)
        self.cap = cap if isinstance(cap, int) and not isinstance(cap, bool) else 0
        self.stream = body.get("stream") is True
        self.service_tier = _service_tier(api, body.get("service_tier"))
        # The web searches it may make and the cache breakpoints it marks, as the mesh
        # reads them from a request body.
        self.max_web_search_calls = request_bound(api, body["model"], body)
        self.cache_write_ttl = cache_write_ttl(api, body)

    def permit_request(self, tenant: str, workload: str,
                       labels: Mapping[str, str]) -> PermitRequest:
        return PermitRequest(tenant, workload, self.body["model"], self.provider,
                             estimate_input_tokens(self.api, self.body), self.cap, dict(labels),
                             service_tier=self.service_tier,
                             max_web_search_calls=self.max_web_search_calls,
                             cache_write_ttl=self.cache_write_ttl)

    def constrained_kwargs(self, p: Permit) -> dict[str, Any]:
        """The create() arguments with the permit's constraints applied."""
        kw = dict(self.kwargs)
        if p.local:
            return kw
        if p.provider and p.provider != self.provider:
            raise PermitDenied(
                f"Keel rerouted request {p.request_id} to {p.provider}/{p.model}, which this "
                f"{self.provider} client cannot call; allow a {self.provider} model in the "
                "workload's downgrade chain", p.reasons, p.request_id, p.policy_revision)
        kw["model"] = p.model
        if p.max_output_tokens and (self.cap == 0 or p.max_output_tokens < self.cap):
            kw[self.cap_field] = p.max_output_tokens
        extra = kw.get("extra_body")
        if isinstance(extra, Mapping):
            # The SDKs merge extra_body over the body: the permit's model and cap
            # must win there too.
            eb = dict(extra)
            if "model" in eb:
                eb["model"] = p.model
            for f in CAP_FIELDS[self.api]:
                if f in eb and p.max_output_tokens and not (
                        isinstance(eb[f], int) and 0 < eb[f] <= p.max_output_tokens):
                    eb[f] = p.max_output_tokens
            kw["extra_body"] = eb
        if self.stream and self.api is Api.CHAT:
            opts = dict(kw.get("stream_options") or {})
            opts["include_usage"] = True
            kw["stream_options"] = opts
        return kw


_SDK_SENTINELS = frozenset({"NotGiven", "Omit"})


def _service_tier(api: Api, value: object) -> str:
    """The tier an OpenAI call asks for (its ``service_tier`` argument); "" when not
    given (None, or the SDK's NOT_GIVEN / omit sentinels). Anything else that is no
    tier name is refused before a permit is asked for."""
    if api not in TIER_APIS or value is None or type(value).__name__ in _SDK_SENTINELS:
        return ""
    problem = tier_problem(value)
    if problem is not None or not value:
        shown = repr(value[:40]) if isinstance(value, str) else type(value).__name__
        raise TypeError(f"{api} create(): service_tier {shown} {problem or 'is empty'} "
                        "(a tier such as \"auto\", \"default\", \"flex\" or \"priority\")")
    assert isinstance(value, str)
    return value


def rule_for_error(p: Permit, exc: BaseException) -> rule.Settlement:
    """How a create() that raised ends its permit (module docstring)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):  # the provider answered with an HTTP error
        return rule.settle(p._rule_permit(), rule.Stage.RESPONDING, status, _EMPTY_READING)
    if names & {"APIConnectionError", "APITimeoutError", "CancelledError",
                 "KeyboardInterrupt"}:
        # the request may have reached the provider: booked at the hold (CANCELLED)
        return rule.settle(p._rule_permit(), rule.Stage.SENT, 0, None)
    # raised before anything was sent (arguments the SDK refused, ...): void
    return rule.settle(p._rule_permit(), rule.Stage.REQUEST, 0, None)


_EMPTY_READING = Reading(None, None, 0, 0, False, False)

# The SDKs' own retry rule (openai and anthropic share it): connection errors and
# timeouts, 408, 409, 429 and 5xx, unless the answer's x-should-retry says
# otherwise; the delay is the answer's retry-after(-ms) up to 60 s, else 0.5 s
# doubling to 8 s, less up to 25 % jitter.
_RETRY_STATUS = frozenset({408, 409, 429})


def sdk_retryable(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "APIConnectionError" in names:  # APITimeoutError included
        return True
    status = getattr(exc, "status_code", None)
    if "APIStatusError" not in names or not isinstance(status, int):
        return False
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    should = headers.get("x-should-retry")
    if should in ("true", "false"):
        return bool(should == "true")
    return status in _RETRY_STATUS or status >= 500


def retry_delay(exc: BaseException, attempt: int) -> float:
    headers = getattr(getattr(exc, "response", None), "headers", None) or {}
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            after = float(str(headers.get(name))) * scale
        except ValueError:  # absent ("None"), or an HTTP date
            continue
        if 0 < after <= 60:
            return after
    return float(min(0.5 * 2.0 ** attempt, 8.0) * (1 - 0.25 * random.random()))


def without_retries(client: Any) -> tuple[Any, int]:
    """The SDK client that makes one attempt per call, and how many retries the
    caller's client would have made."""
    retries = getattr(client, "max_retries", 0)
    if not isinstance(retries, int) or isinstance(retries, bool) or retries <= 0:
        return client, 0
    return client.with_options(max_retries=0), retries


def settle_response(p: Permit, response: Any) -> None:
    """A non-streamed answer: its usage, or the rule's estimate when it has none."""
    p._meter_item(response)
    p._meter_end(broken=False)


class StreamEnd:
    """How one metered stream ends, shared by the stream and its finalizer (which
    must not hold the stream itself)."""

    __slots__ = ("done", "p")

    def __init__(self, p: Permit) -> None:
        self.p, self.done = p, False

    def begin(self, broken: bool) -> bool:
        """Mark the stream ended and take the usage to close out with, by the
        settlement rule; False when it had already ended."""
        if self.done:
            return False
        self.done = True
        self.p._meter_end(broken)
        return True


def _dropped(end: StreamEnd) -> bool:
    """A stream dropped before its end: whether this finalizer is the one that ends
    its permit (PARTIAL, with the usage seen so far)."""
    if not end.begin(broken=True):
        return False
    log.info("keel: stream of permit %s dropped before its end; closing out PARTIAL "
             "with the usage seen so far", end.p.permit_id)
    return True


def _abandoned(end: StreamEnd, stream: Any, keel: KeelClient) -> None:
    """Finalizer of a MeteredStream dropped before it ended or was closed (``for _ in
    stream: break`` and nothing more): the caller stopped reading, so the permit is
    closed out PARTIAL with what was seen, on the thread that dropped it. Never
    raises (it runs inside garbage collection)."""
    try:
        if not _dropped(end):
            return
        try:
            stream.close()  # give the provider connection back
        except Exception as err:
            log.debug("keel: closing a dropped stream: %s", error_text(err))
        keel.end(end.p, None)
    except Exception:
        log.exception("keel: could not end permit %s of a dropped stream", end.p.permit_id)


def _aabandoned(end: StreamEnd, stream: Any, keel: AsyncKeelClient,
                loop: asyncio.AbstractEventLoop | None) -> None:
    """Finalizer of an AsyncMeteredStream dropped before it ended or was closed. The
    closeout is a coroutine on the client's event loop: scheduled there when that
    loop runs (on whatever thread the stream was dropped). Otherwise, when the
    client was closed, or when that task is cancelled before it settles
    (``asyncio.run`` cancels what is left when its main coroutine returns), it is
    made on a blocking channel of its own (``AsyncKeelClient.end_elsewhere``).
    Never raises."""
    try:
        if not _dropped(end):
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if keel.closed:
            keel.end_elsewhere(end.p)
        elif loop is not None and running is loop:
            _settle_on_loop(end.p, stream, keel, loop)
        elif loop is not None and loop.is_running() and not loop.is_closed():
            loop.call_soon_threadsafe(_settle_on_loop, end.p, stream, keel, loop)
        else:
            keel.end_elsewhere(end.p)
    except Exception:
        log.exception("keel: could not end permit %s of a dropped stream", end.p.permit_id)


# Closeouts of dropped async streams under way: the event loop keeps only weak
# references to its tasks.
_SETTLING: set[asyncio.Task[None]] = set()


def _settle_on_loop(p: Permit, stream: Any, keel: AsyncKeelClient,
                    loop: asyncio.AbstractEventLoop) -> None:
    async def settle() -> None:
        if not keel.closed:  # else the done callback below settles it elsewhere
            await keel.end(p, None)
        try:
            await stream.close()  # give the provider connection back
        except Exception as err:
            log.debug("keel: closing a dropped stream: %s", error_text(err))

    def settled(task: asyncio.Task[None]) -> None:
        _SETTLING.discard(task)
        if not p.ended:  # cancelled (before or during the closeout), or its channel closed
            keel.end_elsewhere(p)

    try:
        task = loop.create_task(settle())
    except RuntimeError:  # the loop closed in between
        keel.end_elsewhere(p)
        return
    _SETTLING.add(task)
    task.add_done_callback(settled)


# ---------------------------------------------------------------------- sync
class MeteredStream:
    """The SDK's stream, read through the permit; closing out when it ends, when it
    is closed, or when it is dropped (garbage-collected) unfinished."""

    def __init__(self, stream: Any, p: Permit, keel: KeelClient) -> None:
        self._stream, self._p, self._keel = stream, p, keel
        self._end = StreamEnd(p)
        self._it: Iterator[Any] = iter(stream)
        weakref.finalize(self, _abandoned, self._end, stream, keel)

    def __iter__(self) -> MeteredStream:
        return self

    def __next__(self) -> Any:
        try:
            item = next(self._it)
        except StopIteration:
            self._finish(broken=False)
            raise
        except BaseException as exc:
            self._finish(broken=True, exc=exc)
            raise
        self._p._meter_item(item)
        return item

    def _finish(self, broken: bool, exc: BaseException | None = None) -> None:
        if self._end.begin(broken):
            self._keel.end(self._p, exc if self._p.usage is None else None)

    def close(self) -> None:
        """Stop reading: the provider may still bill what it generated (PARTIAL)."""
        try:
            self._stream.close()
        finally:
            self._finish(broken=True)

    def __enter__(self) -> MeteredStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def permit(self) -> Permit:
        return self._p

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _Endpoint:
    def __init__(self, w: _Wrapped, target: Any, once: Any, api: Api) -> None:
        self._w, self._target, self._once, self._api = w, target, once, api

    def create(self, **kwargs: Any) -> Any:
        call = Call(self._api, self._w.provider, kwargs)
        for attempt in itertools.count():
            try:
                return self._attempt(call)
            except BaseException as exc:
                if attempt >= self._w.max_retries or not sdk_retryable(exc):
                    raise
                time.sleep(retry_delay(exc, attempt))
        raise AssertionError("unreachable")

    def _attempt(self, call: Call) -> Any:
        """One provider call under one permit."""
        w = self._w
        p = w.keel.authorize(call.permit_request(w.tenant, w.workload, w.labels),
                             fail_mode=w.fail_mode)
        w.last_permit = p
        try:
            kw = call.constrained_kwargs(p)
        except PermitDenied:
            w.keel.end(p, None)
            raise
        try:
            response = self._once.create(**kw)
        except BaseException as exc:
            p.apply_rule(rule_for_error(p, exc))
            w.keel.end(p, exc if p.usage is None else None)
            raise
        if call.stream:
            return MeteredStream(response, p, w.keel)
        settle_response(p, response)
        w.keel.end(p, None)
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class _Group:
    """``client.chat`` of a wrapped OpenAI client: ``completions`` is metered."""

    def __init__(self, w: _Wrapped, target: Any, endpoint: _Endpoint) -> None:
        self._target, self.completions = target, endpoint

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class _Wrapped:
    def __init__(self, keel: KeelClient, client: Any, provider: str, tenant: str,
                 workload: str, labels: Mapping[str, str], fail_mode: FailMode | None) -> None:
        self.keel, self.client, self.provider = keel, client, provider
        self.tenant, self.workload, self.labels, self.fail_mode = (tenant, workload,
                                                                   dict(labels), fail_mode)
        self.last_permit: Permit | None = None
        once, self.max_retries = without_retries(client)
        if provider == "openai":
            self.chat = _Group(self, client.chat, _Endpoint(
                self, client.chat.completions, once.chat.completions, Api.CHAT))
            self.responses = _Endpoint(self, client.responses, once.responses, Api.RESPONSES)
        else:
            self.messages = _Endpoint(self, client.messages, once.messages, Api.MESSAGES)

    def with_options(self, **options: Any) -> _Wrapped:
        """The SDK's copy with other options (``timeout``, ``max_retries`` ...), still
        metered."""
        return _Wrapped(self.keel, self.client.with_options(**options), self.provider,
                        self.tenant, self.workload, self.labels, self.fail_mode)

    copy = with_options

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


# ---------------------------------------------------------------------- async
class AsyncMeteredStream:
    """The asyncio SDK's stream, read through the permit; closing out when it ends,
    when it is closed, or when it is dropped (garbage-collected) unfinished."""

    def __init__(self, stream: Any, p: Permit, keel: AsyncKeelClient) -> None:
        self._stream, self._p, self._keel = stream, p, keel
        self._end = StreamEnd(p)
        self._it: AsyncIterator[Any] = stream.__aiter__()
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        weakref.finalize(self, _aabandoned, self._end, stream, keel, loop)

    def __aiter__(self) -> AsyncMeteredStream:
        return self

    async def __anext__(self) -> Any:
        try:
            item = await self._it.__anext__()
        except StopAsyncIteration:
            await self._finish(broken=False)
            raise
        except BaseException as exc:
            await self._finish(broken=True, exc=exc)
            raise
        self._p._meter_item(item)
        return item

    async def _finish(self, broken: bool, exc: BaseException | None = None) -> None:
        if self._end.begin(broken):
            await self._keel.end(self._p, exc if self._p.usage is None else None)

    async def close(self) -> None:
        """Stop reading: the provider may still bill what it generated (PARTIAL)."""
        try:
            await self._stream.close()
        finally:
            await self._finish(broken=True)

    async def __aenter__(self) -> AsyncMeteredStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def permit(self) -> Permit:
        return self._p

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class _AsyncEndpoint:
    def __init__(self, w: _AsyncWrapped, target: Any, once: Any, api: Api) -> None:
        self._w, self._target, self._once, self._api = w, target, once, api

    async def create(self, **kwargs: Any) -> Any:
        call = Call(self._api, self._w.provider, kwargs)
        for attempt in itertools.count():
            try:
                return await self._attempt(call)
            except BaseException as exc:
                if attempt >= self._w.max_retries or not sdk_retryable(exc):
                    raise
                await asyncio.sleep(retry_delay(exc, attempt))
        raise AssertionError("unreachable")

    async def _attempt(self, call: Call) -> Any:
        """One provider call under one permit."""
        w = self._w
        p = await w.keel.authorize(call.permit_request(w.tenant, w.workload, w.labels),
                                   fail_mode=w.fail_mode)
        w.last_permit = p
        try:
            kw = call.constrained_kwargs(p)
        except PermitDenied:
            await w.keel.end(p, None)
            raise
        try:
            response = await self._once.create(**kw)
        except BaseException as exc:
            p.apply_rule(rule_for_error(p, exc))
            await w.keel.end(p, exc if p.usage is None else None)
            raise
        if call.stream:
            return AsyncMeteredStream(response, p, w.keel)
        settle_response(p, response)
        await w.keel.end(p, None)
        return response

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class _AsyncGroup:
    def __init__(self, w: _AsyncWrapped, target: Any, endpoint: _AsyncEndpoint) -> None:
        self._target, self.completions = target, endpoint

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


class _AsyncWrapped:
    def __init__(self, keel: AsyncKeelClient, client: Any, provider: str, tenant: str,
                 workload: str, labels: Mapping[str, str], fail_mode: FailMode | None) -> None:
        self.keel, self.client, self.provider = keel, client, provider
        self.tenant, self.workload, self.labels, self.fail_mode = (tenant, workload,
                                                                   dict(labels), fail_mode)
        self.last_permit: Permit | None = None
        once, self.max_retries = without_retries(client)
        if provider == "openai":
            self.chat = _AsyncGroup(self, client.chat, _AsyncEndpoint(
                self, client.chat.completions, once.chat.completions, Api.CHAT))
            self.responses = _AsyncEndpoint(self, client.responses, once.responses,
                                            Api.RESPONSES)
        else:
            self.messages = _AsyncEndpoint(self, client.messages, once.messages, Api.MESSAGES)

    def with_options(self, **options: Any) -> _AsyncWrapped:
        """The SDK's copy with other options, still metered."""
        return _AsyncWrapped(self.keel, self.client.with_options(**options), self.provider,
                             self.tenant, self.workload, self.labels, self.fail_mode)

    copy = with_options

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def provider_of(client: Any) -> str:
    """``openai`` or ``anthropic``, from the SDK the client object comes from."""
    root = type(client).__module__.split(".", 1)[0]
    if root in ("openai", "anthropic"):
        return root
    raise TypeError(f"cannot wrap {type(client).__qualname__}: expected an openai.OpenAI / "
                    "AsyncOpenAI or anthropic.Anthropic / AsyncAnthropic client")


def _names(keel: Any, tenant: str | None, workload: str | None) -> tuple[str, str]:
    t, w = tenant or keel.tenant, workload or keel.workload
    if not t or not w:
        raise ValueError("wrap() needs tenant= and workload= (here or on the KeelClient)")
    return t, w


def wrap_sync(keel: KeelClient, client: Any, *, tenant: str | None = None,
              workload: str | None = None, labels: Mapping[str, str] | None = None,
              fail_mode: FailMode | str | None = None) -> Any:
    t, w = _names(keel, tenant, workload)
    return _Wrapped(keel, client, provider_of(client), t, w, labels or {},
                    FailMode(fail_mode) if fail_mode else None)


def wrap_async(keel: AsyncKeelClient, client: Any, *, tenant: str | None = None,
               workload: str | None = None, labels: Mapping[str, str] | None = None,
               fail_mode: FailMode | str | None = None) -> Any:
    t, w = _names(keel, tenant, workload)
    return _AsyncWrapped(keel, client, provider_of(client), t, w, labels or {},
                         FailMode(fail_mode) if fail_mode else None)
