"""Keel for application code: a permit around every provider call.

::

    from keel_pdp.client import KeelClient

    keel = KeelClient("127.0.0.1:50051", tenant="acme", workload="support-bot")
    with keel.permit("gpt-4o-mini", provider="openai", estimated_input_tokens=1200,
                     max_output_tokens=500) as p:
        resp = openai_client.chat.completions.create(
            model=p.model, max_completion_tokens=p.max_output_tokens, messages=...)
        p.record(resp)          # closeout with the provider's usage on exit

or, with no other change to the calling code::

    client = keel.wrap(openai.OpenAI())     # or anthropic.Anthropic()

``AsyncKeelClient`` is the same for asyncio (``async with keel.permit(...)``,
``keel.wrap(openai.AsyncOpenAI())``).

* A fresh request id per permit; Authorize is retried on UNAVAILABLE with that
  same id (never a second hold) within the caller's deadline (``timeout``).
* DENY raises ``PermitDenied`` (block reasons, retry-after, exception paths).
* An unreachable sidecar: ``fail_mode="closed"`` raises ``SidecarUnavailable``;
  ``"open"`` lets the call through with a local, unmetered permit.
* On exit: Closeout with the recorded usage, or Void when the block raised
  before any usage was recorded (or recorded none).
"""

from keel_pdp.client._core import (
    BlockReason,
    FailMode,
    KeelError,
    KeelRequestError,
    Permit,
    PermitDenied,
    PermitRequest,
    Retry,
    Settlement,
    SidecarUnavailable,
)
from keel_pdp.client.aio import AsyncKeelClient
from keel_pdp.client.sync import KeelClient
from keel_pdp.client.usage import UsageMeter, read_usage
from keel_pdp.pricing import TokenUsage

__all__ = [
    "AsyncKeelClient",
    "BlockReason",
    "FailMode",
    "KeelClient",
    "KeelError",
    "KeelRequestError",
    "Permit",
    "PermitDenied",
    "PermitRequest",
    "Retry",
    "Settlement",
    "SidecarUnavailable",
    "TokenUsage",
    "UsageMeter",
    "read_usage",
]
