"""Settings of the mesh adapters (ext_authz and ext_proc), read from the environment.

``keel-pdp serve`` hands the mesh module only the engine and the metrics, so
the few knobs the mesh needs come from ``KEEL_MESH_*`` variables, each with a
default that matches docs/mesh.md and deploy/k8s/.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from keel_pdp.errors import MeshConfigError as MeshConfigError
from keel_pdp.mesh.request import DeploymentMap, Resolved, resolve

# Headers Keel sets on the request it lets through (ext_authz OK response).
# ext_proc reads them back; a client-supplied copy is always overwritten or
# removed, so a caller cannot point the closeout at somebody else's permit.
H_PERMIT = "x-keel-permit-id"
H_DECISION = "x-keel-decision"
H_MODEL = "x-keel-model"
H_PROVIDER = "x-keel-provider"
H_MAX_TOKENS = "x-keel-max-tokens"
H_ENFORCE = "x-keel-enforce-max-tokens"
H_INPUT = "x-keel-input-tokens"
H_REVISION = "x-keel-policy-revision"
H_API = "x-keel-api"
H_STREAM_USAGE = "x-keel-stream-usage"  # "strip" / "pass": Keel asked the stream for usage
H_WEB_SEARCHES = "x-keel-web-search-calls"  # the web searches the hold covers
KEEL_SET_HEADERS = (H_PERMIT, H_DECISION, H_MODEL, H_PROVIDER, H_MAX_TOKENS, H_ENFORCE,
                    H_INPUT, H_REVISION, H_API, H_STREAM_USAGE, H_WEB_SEARCHES)
STREAM_USAGE_MODES = ("strip", "pass", "off")

# gRPC metadata (``grpc_service.initial_metadata``) naming the part one ext_proc
# filter plays: "cap" (request body), "closeout" (response), "both" (default).
EXT_PROC_ROLE = "x-keel-ext-proc"
EXT_PROC_ROLES = ("both", "cap", "closeout")

# ext_authz puts its dynamic metadata under the filter's canonical name.
METADATA_NAMESPACE = "envoy.filters.http.ext_authz"

# Attributes the closeout filter asks Envoy for with the response headers
# (``response_attributes``), sent under ATTRIBUTES_NAMESPACE: the response code
# details tell an error the provider answered ("via_upstream") from one Envoy
# made after the upstream connection reset ("upstream_reset_before_response_started{...}").
RESPONSE_ATTRIBUTES = ("response.code_details",)
ATTRIBUTES_NAMESPACE = "envoy.filters.http.ext_proc"

# Host substring -> provider name, first match wins (Azure before OpenAI).
DEFAULT_PROVIDER_HOSTS = (("openai.azure.com", "azure"), ("aiplatform.googleapis.com", "vertex"),
                          ("generativelanguage.googleapis.com", "gemini"),
                          ("bedrock-runtime", "bedrock"), ("anthropic", "anthropic"),
                          ("openai", "openai"))

# The public API hosts of LLM providers, as domains: a host is one when it is
# the domain, or ends in "." or "-" + the domain (us-central1-aiplatform...).
# Bedrock's hosts are bedrock*.{region}.amazonaws.com. A call to one of them
# that Keel cannot meter is refused (403 NOT_METERED) unless
# KEEL_MESH_UNMETERED_ROUTES lists it: an unknown endpoint of a provider is a
# provider call that nothing would book.
KNOWN_PROVIDER_HOSTS = (
    "api.openai.com", "api.anthropic.com", "openai.azure.com", "services.ai.azure.com",
    "cognitiveservices.azure.com", "generativelanguage.googleapis.com",
    "aiplatform.googleapis.com", "api.mistral.ai", "api.cohere.com", "api.cohere.ai",
    "api.groq.com", "api.together.xyz", "api.fireworks.ai", "api.deepseek.com", "api.x.ai",
    "openrouter.ai",
)
_BEDROCK_HOST = re.compile(r"^bedrock(-[a-z]+)*\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$")




def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    low = raw.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise MeshConfigError(f"{name}={raw!r} is not a boolean (true/false)")


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw not in choices:
        raise MeshConfigError(f"{name}={raw!r} must be one of {', '.join(choices)}")
    return raw


def _int(env: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise MeshConfigError(f"{name}={raw!r} is not an integer") from exc
    if not lo <= value <= hi:
        raise MeshConfigError(f"{name}={value} must be between {lo} and {hi}")
    return value


@dataclass(frozen=True)
class MeshConfig:
    """What the mesh adapters read from a request, and how they answer."""

    tenant_header: str = "x-keel-tenant"
    workload_header: str = "x-keel-workload"
    provider_header: str = "x-keel-provider"
    request_id_header: str = "x-request-id"
    # Requests Keel cannot meter, to hosts that are not LLM providers, pass
    # untouched when true (counted and logged); refused with 403 when false.
    # A provider host is refused either way unless unmetered_routes lists it.
    pass_unmetered: bool = False
    # (host, path prefix) pairs explicitly known not to be LLM traffic; they
    # pass untouched, counted and logged. Host "*": any host;
    # ".example.com": that domain and its subdomains.
    unmetered_routes: tuple[tuple[str, str], ...] = ()
    # Azure OpenAI deployment -> model (the price table's name): a fallback for
    # deployments the policy bundle's kind: Deployments does not map (the
    # bundle wins); a deployment neither lists is priced as the model it is
    # named after.
    azure_deployments: tuple[tuple[str, str], ...] = ()
    # OpenAI-style chat streams that do not ask for usage: "strip" (Keel asks
    # for it and removes the extra final chunk before the client), "pass" (asks;
    # the chunk reaches the client), "off" (settle on the text estimate).
    stream_usage: str = "strip"
    # Envoy re-signs SigV4 requests (Bedrock) after Keel's filters
    # (docs/mesh-bedrock.md). Without it a body change would break the
    # signature, so a CONSTRAIN on a signed API is answered as a DENY.
    resign_signed: bool = False
    # Envoy's with_request_body.max_request_bytes: a body of exactly this length
    # with no content-length may have been cut.
    max_request_bytes: int = 1024 * 1024
    # Host substrings that name the provider when no header does.
    provider_hosts: tuple[tuple[str, str], ...] = DEFAULT_PROVIDER_HOSTS
    # Largest response body kept in memory to read its usage (JSON, not SSE).
    max_response_bytes: int = 32 * 1024 * 1024
    # Closeout retries while the budget store is unreachable.
    closeout_attempts: int = 5
    # Void a permit whose call never reached ext_proc after this long (0: never;
    # see keel_pdp.mesh.watch).
    unseen_permit_s: int = 30

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> MeshConfig:
        e = os.environ if env is None else env
        hosts = cls.provider_hosts
        raw_hosts = e.get("KEEL_MESH_PROVIDER_HOSTS", "")
        if raw_hosts:
            pairs = []
            for item in raw_hosts.split(","):
                sub, sep, provider = item.strip().partition("=")
                if not sep or not sub or not provider:
                    raise MeshConfigError(
                        f"KEEL_MESH_PROVIDER_HOSTS item {item!r} must be HOST_SUBSTRING=PROVIDER")
                pairs.append((sub.lower(), provider))
            hosts = tuple(pairs)
        routes = []
        for item in e.get("KEEL_MESH_UNMETERED_ROUTES", "").split(","):
            item = item.strip()
            if not item:
                continue
            host, slash, path = item.partition("/")
            if not host or " " in item:
                raise MeshConfigError(
                    f"KEEL_MESH_UNMETERED_ROUTES item {item!r} must be HOST[/PATH_PREFIX] "
                    "(HOST: a name, .domain for its subdomains, or * for any host)")
            routes.append((host.lower(), slash + path))
        deployments = []
        for item in e.get("KEEL_MESH_AZURE_DEPLOYMENTS", "").split(","):
            dep, sep, model = item.strip().partition("=")
            if not item.strip():
                continue
            if not sep or not dep or not model:
                raise MeshConfigError(
                    f"KEEL_MESH_AZURE_DEPLOYMENTS item {item!r} must be DEPLOYMENT=MODEL")
            deployments.append((dep, model))
        return cls(
            tenant_header=e.get("KEEL_MESH_TENANT_HEADER", cls.tenant_header).lower(),
            workload_header=e.get("KEEL_MESH_WORKLOAD_HEADER", cls.workload_header).lower(),
            provider_header=e.get("KEEL_MESH_PROVIDER_HEADER", cls.provider_header).lower(),
            request_id_header=e.get("KEEL_MESH_REQUEST_ID_HEADER",
                                    cls.request_id_header).lower(),
            pass_unmetered=_bool(e, "KEEL_MESH_PASS_UNMETERED", cls.pass_unmetered),
            provider_hosts=hosts,
            unmetered_routes=tuple(routes),
            azure_deployments=tuple(deployments),
            resign_signed=_bool(e, "KEEL_MESH_RESIGN_SIGNED", cls.resign_signed),
            stream_usage=_choice(e, "KEEL_MESH_STREAM_USAGE", cls.stream_usage,
                                 STREAM_USAGE_MODES),
            max_request_bytes=_int(e, "KEEL_MESH_MAX_REQUEST_BYTES", cls.max_request_bytes,
                                   1024, 1 << 30),
            max_response_bytes=_int(e, "KEEL_MESH_MAX_RESPONSE_BYTES", cls.max_response_bytes,
                                    1024, 1 << 30),
            closeout_attempts=_int(e, "KEEL_MESH_CLOSEOUT_ATTEMPTS", cls.closeout_attempts,
                                   1, 20),
            unseen_permit_s=_int(e, "KEEL_MESH_UNSEEN_PERMIT_S", cls.unseen_permit_s, 0, 3600),
        )

    def resolve(self, method: str, path: str, host: str, named_provider: str,
                bundle: DeploymentMap | None) -> Resolved | None:
        """The call's API, provider and path-named model, as this sidecar resolves it
        with ``bundle`` (the serving policy snapshot; None when none is loaded)."""
        return resolve(method, path, host, named_provider, self.provider_hosts, bundle,
                       self.azure_deployments)

    def is_provider_host(self, host: str) -> bool:
        """A host that serves LLM calls: a known API host or a configured provider host."""
        name = host.lower().rsplit(":", 1)[0] if host.count(":") == 1 else host.lower()
        if any(sub in name for sub, _ in self.provider_hosts):
            return True
        if _BEDROCK_HOST.match(name):
            return True
        return any(name == d or name.endswith("." + d) or name.endswith("-" + d)
                   for d in KNOWN_PROVIDER_HOSTS)

    def listed_unmetered(self, host: str, path: str) -> bool:
        """Whether KEEL_MESH_UNMETERED_ROUTES names this host and path as not LLM traffic."""
        name = host.lower().rsplit(":", 1)[0] if host.count(":") == 1 else host.lower()
        clean = path.split("?", 1)[0]
        for h, prefix in self.unmetered_routes:
            host_ok = h in ("", "*") or name == h or (h.startswith(".") and (
                name.endswith(h) or name == h[1:]))
            base = prefix.rstrip("/")
            if host_ok and (not base or clean == base or clean.startswith(base + "/")):
                return True
        return False
