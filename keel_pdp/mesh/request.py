"""An OpenAI-, Anthropic-, Google- or Bedrock-style HTTP request, read the way Authorize needs it.

The names callers import, gathered from the modules that own them:

* ``keel_pdp.mesh.apis``: ``Api``, the cap-field tables, ``LlmRequest``,
  ``BadRequest`` (the vocabulary every reader shares);
* ``keel_pdp.mesh.routes``: method and path to API, provider and model
  (``route_for``, ``resolve``);
* ``keel_pdp.mesh.estimate``: the input-token estimate (the heuristic is in that
  module's docstring);
* ``keel_pdp.mesh.bodies``: decoding, reading (``parse_body``,
  ``parse_partial``) and rewriting (``rewrite_cap``) request bodies;
* ``keel_pdp.mesh.usage_chunk``: the usage chunk Keel asked a chat stream for,
  stripped on the way back.

Pure code throughout: no gRPC, no Envoy types.
"""

from __future__ import annotations

from keel_pdp.mesh.apis import (
    CAP_FIELD_TO_ADD,
    CAP_FIELDS,
    MAX_BODY_BYTES,
    MAX_TOKENS_LIMIT,
    SIGNED_APIS,
    Api,
    BadRequest,
    LlmRequest,
)
from keel_pdp.mesh.bodies import (
    BODY_LABEL,
    body_digest,
    decode_body,
    decode_prefix,
    parse_body,
    parse_partial,
    request_id,
    rewrite_cap,
)
from keel_pdp.mesh.estimate import (
    BYTES_PER_TOKEN,
    FILE_TOKENS,
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    estimate_input_tokens,
)
from keel_pdp.mesh.routes import (
    FROM_BODY,
    FROM_BUNDLE,
    FROM_ENV,
    FROM_NAME,
    FROM_PATH,
    DeploymentMap,
    Resolved,
    Route,
    match_path,
    path_model,
    provider_for,
    resolve,
    route_for,
)
from keel_pdp.mesh.usage_chunk import UsageChunkStripper

__all__ = [
    "BODY_LABEL",
    "BYTES_PER_TOKEN",
    "CAP_FIELDS",
    "CAP_FIELD_TO_ADD",
    "FILE_TOKENS",
    "FROM_BODY",
    "FROM_BUNDLE",
    "FROM_ENV",
    "FROM_NAME",
    "FROM_PATH",
    "IMAGE_TOKENS",
    "MAX_BODY_BYTES",
    "MAX_TOKENS_LIMIT",
    "MESSAGE_OVERHEAD_TOKENS",
    "REPLY_PRIMING_TOKENS",
    "SIGNED_APIS",
    "Api",
    "BadRequest",
    "DeploymentMap",
    "LlmRequest",
    "Resolved",
    "Route",
    "UsageChunkStripper",
    "body_digest",
    "decode_body",
    "decode_prefix",
    "estimate_input_tokens",
    "match_path",
    "parse_body",
    "parse_partial",
    "path_model",
    "provider_for",
    "request_id",
    "resolve",
    "rewrite_cap",
    "route_for",
]
