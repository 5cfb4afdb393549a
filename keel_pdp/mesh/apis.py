"""The provider APIs the mesh meters, and what every reader of their calls shares.

``Api`` names each HTTP API; the tables below say which body field carries a
call's output cap and which APIs are SigV4-signed. ``LlmRequest`` is what a
request body reads as (``keel_pdp.mesh.bodies``) and ``BadRequest`` is the one
error a request the mesh cannot read raises. Route resolution, body reading,
the input estimate and usage parsing all build on these names, so they live
apart from each of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from keel_pdp.errors import MeshRequestError

MAX_BODY_BYTES = 64 * 1024 * 1024
MAX_TOKENS_LIMIT = 2_000_000


class BadRequest(MeshRequestError):
    """The request cannot be read; the message says which field and why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Api(StrEnum):
    """A provider HTTP API the mesh meters (its wire format, not its vendor)."""

    CHAT = "chat.completions"
    RESPONSES = "responses"
    MESSAGES = "messages"
    EMBEDDINGS = "embeddings"
    GENERATE_CONTENT = "generate_content"  # Gemini API and Vertex AI
    CONVERSE = "converse"  # Bedrock Converse / ConverseStream
    INVOKE_MESSAGES = "invoke.messages"  # Bedrock InvokeModel with an Anthropic body


# Which body field carries the output cap, in order of preference (a dotted
# name is a nested field).
CAP_FIELDS: dict[Api, tuple[str, ...]] = {
    Api.CHAT: ("max_completion_tokens", "max_tokens"),
    Api.RESPONSES: ("max_output_tokens",),
    Api.MESSAGES: ("max_tokens",),
    Api.EMBEDDINGS: (),
    Api.GENERATE_CONTENT: ("generationConfig.maxOutputTokens",
                           "generation_config.max_output_tokens"),
    Api.CONVERSE: ("inferenceConfig.maxTokens",),
    Api.INVOKE_MESSAGES: ("max_tokens",),
}
# The field written when the body names no cap and one must be enforced.
CAP_FIELD_TO_ADD: dict[Api, str] = {
    Api.CHAT: "max_completion_tokens",
    Api.RESPONSES: "max_output_tokens",
    Api.MESSAGES: "max_tokens",
    Api.EMBEDDINGS: "",
    Api.GENERATE_CONTENT: "generationConfig.maxOutputTokens",
    Api.CONVERSE: "inferenceConfig.maxTokens",
    Api.INVOKE_MESSAGES: "max_tokens",
}
# APIs whose requests are SigV4-signed: a body Keel changes must be re-signed.
SIGNED_APIS = frozenset({Api.CONVERSE, Api.INVOKE_MESSAGES})


@dataclass(frozen=True, slots=True)
class LlmRequest:
    """A metered call as Authorize needs it, read from its path and body."""

    api: Api
    provider: str
    model: str
    max_output_tokens: int  # 0: the body names no cap
    cap_field: str  # the body field that carried the cap ("" if none)
    estimated_input_tokens: int
    stream: bool
    partial: bool = False  # read from a truncated body (model and cap by pattern)
    include_usage: bool = False  # an OpenAI chat stream that asks for its usage chunk
    service_tier: str = ""  # OpenAI's service_tier ("" not set)
    # The most web searches the call may make (keel_pdp.mesh.websearch: 0 none, -1 a
    # search tool without a bound).
    max_web_search_calls: int = 0
    cache_write_ttl: str = ""  # the longest prompt-cache lifetime it marks ("5m", "1h")


# The APIs whose requests name a service tier (``service_tier``) and whose responses
# report the one that served them (OpenAI's; Azure OpenAI's are the same).
TIER_APIS = frozenset({Api.CHAT, Api.RESPONSES})

