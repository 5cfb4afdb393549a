"""Where a metered call goes: its API, provider and (where the path names it) model.

Pure functions over the method, path and host of an HTTP call, before its body
is read. The ext_authz check, ``keel-pdp mesh route`` and ``keel-pdp policy
explain --path`` all resolve through ``resolve`` so they agree on what a path
means.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from keel_pdp.mesh.apis import Api

# Path suffix -> (API, provider when nothing else names one). Suffixes, so a
# gateway prefix (/openai/v1/chat/completions) still matches.
_PATHS: tuple[tuple[str, Api, str], ...] = (
    ("/chat/completions", Api.CHAT, "openai"),
    ("/v1/responses", Api.RESPONSES, "openai"),
    ("/v1/messages", Api.MESSAGES, "anthropic"),
    ("/v1/embeddings", Api.EMBEDDINGS, "openai"),
)
# Azure OpenAI: the deployment in the path names the model (docs/mesh-azure.md).
_AZURE = re.compile(r"/openai/deployments/([^/]{1,256})/(chat/completions|responses|embeddings)$")
_AZURE_API = {"chat/completions": Api.CHAT, "responses": Api.RESPONSES,
              "embeddings": Api.EMBEDDINGS}
# Gemini API (/v1beta/models/M:op) and Vertex AI (/v1/projects/P/locations/L/
# publishers/google/models/M:op).
_GOOGLE = re.compile(r"/models/([^/:]{1,256}):(generateContent|streamGenerateContent)$")
# Bedrock Runtime: /model/{modelId}/{converse|converse-stream|invoke|invoke-with-response-stream}
_BEDROCK = re.compile(r"/model/([^/]{1,2048})/(converse|converse-stream|invoke|"
                      r"invoke-with-response-stream)$")


@dataclass(frozen=True, slots=True)
class Route:
    """What the method and path say about a metered call."""

    api: Api
    provider: str  # the provider when no header, context extension or host names one
    path_model: str = ""  # the model the path names (Gemini, Vertex, Bedrock)
    deployment: str = ""  # the Azure OpenAI deployment
    stream: bool = False  # the path asks for a stream (Gemini, Bedrock)



def route_for(method: str, path: str) -> Route | None:
    """The metered API a request goes to, or None."""
    if method.upper() != "POST":
        return None
    clean = urllib.parse.unquote(path.split("?", 1)[0].split("#", 1)[0]).rstrip("/")
    m = _AZURE.search(clean)
    if m is not None:
        return Route(_AZURE_API[m.group(2)], "azure", deployment=m.group(1))
    m = _GOOGLE.search(clean)
    if m is not None:
        provider = "vertex" if "/projects/" in clean else "gemini"
        return Route(Api.GENERATE_CONTENT, provider, path_model=m.group(1),
                     stream=m.group(2) == "streamGenerateContent")
    m = _BEDROCK.search(clean)
    if m is not None:
        op = m.group(2)
        api = Api.CONVERSE if op.startswith("converse") else Api.INVOKE_MESSAGES
        if api is Api.INVOKE_MESSAGES and "anthropic." not in m.group(1):
            return None  # InvokeModel bodies are per model family; Keel reads Anthropic's
        return Route(api, "bedrock", path_model=m.group(1), stream=op.endswith("stream"))
    for suffix, api, provider in _PATHS:
        if clean.endswith(suffix):
            return Route(api, provider)
    return None


class DeploymentMap(Protocol):
    """The policy bundle's ``kind: Deployments`` (``PolicySnapshot``)."""

    def deployment_model(self, provider: str, deployment: str) -> str | None: ...


# Where the model of a call comes from (``path_model``), in words.
FROM_PATH = "the request path"
FROM_BUNDLE = "the bundle's Deployments map"
FROM_ENV = "KEEL_MESH_AZURE_DEPLOYMENTS"
FROM_NAME = "the deployment's own name (not mapped)"
FROM_BODY = "the body's model"


def path_model(route: Route, provider: str, bundle: DeploymentMap | None,
               fallback: Iterable[tuple[str, str]] = ()) -> tuple[str, str]:
    """The model the path names, and where it came from; ("", FROM_BODY) when
    only the body names it.

    An Azure deployment resolves through the serving bundle's Deployments map
    under ``provider`` first, then the ``fallback`` pairs (the sidecar's
    KEEL_MESH_AZURE_DEPLOYMENTS), else to a model named after the deployment
    (which fails closed as UNKNOWN_MODEL_PRICE when nothing prices that name).
    """
    if route.path_model:
        return route.path_model, FROM_PATH
    if not route.deployment:
        return "", FROM_BODY
    mapped = bundle.deployment_model(provider, route.deployment) if bundle else None
    if mapped:
        return mapped, FROM_BUNDLE
    for dep, model in fallback:
        if dep == route.deployment:
            return model, FROM_ENV
    return route.deployment, FROM_NAME


@dataclass(frozen=True, slots=True)
class Resolved:
    """A metered call's API, provider and (where the path decides it) model."""

    route: Route
    provider: str
    model: str  # "" when the body names the model
    model_source: str


def resolve(method: str, path: str, host: str, named_provider: str,
            hosts: Iterable[tuple[str, str]], bundle: DeploymentMap | None,
            fallback: Iterable[tuple[str, str]] = ()) -> Resolved | None:
    """What the mesh resolves a call to before reading its body (None: not metered).

    ``named_provider``: the provider a context extension or header names.
    The ext_authz check, ``keel-pdp mesh route`` and ``keel-pdp policy explain
    --path`` all resolve through here.
    """
    route = route_for(method, path)
    if route is None:
        return None
    provider = provider_for(route.provider, host, named_provider, hosts)
    model, source = path_model(route, provider, bundle, fallback)
    return Resolved(route, provider, model, source)


def match_path(method: str, path: str) -> tuple[Api, str] | None:
    """The metered API a request goes to, with its default provider, or None."""
    route = route_for(method, path)
    return None if route is None else (route.api, route.provider)


def provider_for(default: str, host: str, header_value: str,
                 hosts: Iterable[tuple[str, str]]) -> str:
    """The provider a header names, else the first ``hosts`` pair whose text the host
    contains, else the path's ``default``."""
    if header_value:
        return header_value.strip()
    low = host.lower()
    for sub, provider in hosts:
        if sub in low:
            return provider
    return default
